"""``python -m harness calibrate``: per-task FFN neuron scores for one model, written next to each other.

    python -m harness calibrate --task gen --preset tiny --out calib/gen
    python -m harness calibrate --task und --preset showo2-1.5b --weights ckpt/show-o2-1.5B \\
        --tokenizer ckpt/qwen2.5-1.5b-instruct --latents calib_images.safetensors --samples 20

Without ``--weights`` the model has random weights (the scores then only exercise the pipeline). Generation
uses a small built-in list of diverse prompts; understanding uses built-in questions on random latents
unless ``--latents`` names a safetensors file with a ``latents`` tensor (N, C, h, w) of VAE-encoded real
images — real calibration needs real images (the paper calibrates on real image/question pairs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from flashu_fx.calibration import METHODS, calibrate
from flashu_fx.config import PRESETS, get_config
from flashu_fx.flashu_config import TASKS, FlashUConfig
from flashu_fx.loading import from_pretrained
from flashu_fx.model import Showo2, init_random_weights
from flashu_fx.tokenizer import get_tokenizer
from harness.arguments import command_parser, existing_directory
from harness.rows import fit_prompt

GEN_PROMPTS = (
    "A red fox sitting in fresh snow at dawn, soft golden light",
    "A bowl of ramen with a soft-boiled egg, studio food photography",
    "An isometric illustration of a tiny city on a floating island",
    "A portrait of an elderly fisherman with a weathered face, black and white",
    "Three blue glass bottles on a wooden table next to a window",
    "A futuristic train crossing a desert bridge under a purple sky",
    "A watercolor painting of cherry blossoms along a river",
    "A close-up of a mechanical watch movement with visible gears",
)
UND_QUESTIONS = (
    "Describe this image in detail.",
    "What is the main object in the picture?",
    "How many people are in this image?",
    "What colors dominate the scene?",
    "Is this photo taken indoors or outdoors?",
    "What is written on the sign?",
)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m harness calibrate", __doc__)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (random weights)")
    p.add_argument("--weights", type=existing_directory,
                   help="checkpoint directory (config.json + weights); default: random weights")
    p.add_argument("--tokenizer", type=existing_directory,
                   help="Qwen2.5 tokenizer directory; default: the byte fallback")
    p.add_argument("--samples", type=int, help="calibration inputs; default: the task's calibration_samples")
    p.add_argument("--method", choices=METHODS, default="wanda", help="wanda (shipped) or obd (paper Eq. 1)")
    p.add_argument("--gen-source", choices=("denoise", "text_only"), help="gen: what the activations come from")
    p.add_argument("--steps", type=int, help="gen denoise: grid points per generation (calibrate's default: 50)")
    p.add_argument("--guidance", type=float, help="gen denoise: CFG scale (calibrate's default: 7.5)")
    p.add_argument("--ffn-prune-ratio", type=float, help="r_p stored with the calibration; default: the task's")
    p.add_argument("--latents", help="und: safetensors file with 'latents' (N, C, h, w) of real images")
    p.add_argument("--seed", type=int, default=0, help="random weights and latents")
    p.add_argument("--out", help="output path stem (default: calib/<task>)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on cuda, float32 on cpu")
    return p


def load_model(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[Showo2, str]:
    if args.weights:
        model = from_pretrained(args.weights, dtype=dtype, device=device)
        if model.config.hidden_size != get_config(args.preset).hidden_size:
            raise SystemExit(
                f"--weights {args.weights} is a {model.config.name} checkpoint, not --preset {args.preset}"
            )
        return model, f"weights from {args.weights}"
    model = init_random_weights(Showo2(get_config(args.preset)), seed=args.seed).to(device=device, dtype=dtype)
    return model.eval(), "RANDOM weights (no --weights): the scores only exercise the pipeline"


def und_samples(model: Showo2, args: argparse.Namespace, n: int) -> list[tuple[torch.Tensor, str]]:
    """n (latents (1, C, h, w), question) pairs: --latents cycled, else seeded random latents."""
    cfg = model.config
    if args.latents:
        from safetensors.torch import load_file

        bank = load_file(args.latents)["latents"]
        latents = [bank[i % bank.shape[0]][None] for i in range(n)]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        latents = [torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=gen) for _ in range(n)]
    return [(x, UND_QUESTIONS[i % len(UND_QUESTIONS)]) for i, x in enumerate(latents)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    overrides = {} if args.ffn_prune_ratio is None else {"ffn_prune_ratio": args.ffn_prune_ratio}
    config = FlashUConfig.for_task(args.task, **overrides)
    n = args.samples or config.calibration_samples
    model, origin = load_model(args, device, dtype)
    print(f"model: {model.config.name} on {device} ({str(dtype).removeprefix('torch.')}), {origin}")
    tok = get_tokenizer(model.config, args.tokenizer)
    if args.task == "gen":
        samples: list = [fit_prompt(model.config, tok.encode(GEN_PROMPTS[i % len(GEN_PROMPTS)]), f"prompt {i}")
                         for i in range(n)]
        given = {"gen_source": args.gen_source, "steps": args.steps, "guidance": args.guidance}
        kwargs = {k: v for k, v in given.items() if v is not None}
    else:
        if not args.latents:
            print("und inputs: random latents with built-in questions (real calibration uses real images: --latents)")
        samples, kwargs = und_samples(model, args, n), {}
    start = time.perf_counter()
    calib = calibrate(
        model,
        args.task,
        samples,
        config,
        args.method,
        seed=args.seed,
        tokenizer=tok,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    layers, size = calib.scores.shape
    kept = config.kept_ffn_width(size)
    print(
        f"calibrated task={calib.task} method={calib.method} samples={calib.samples_used} in {seconds:.1f} s "
        f"({calib.meta.get('positions', 0)} positions per layer)"
    )
    print(f"layers={layers}  FFN width {size} -> kept {kept} (r_p={config.ffn_prune_ratio})  {calib.meta}")
    print(f"fingerprint {calib.fingerprint}")
    for path in calib.save(args.out or f"calib/{args.task}"):
        print(f"wrote {path}")
    return 0
