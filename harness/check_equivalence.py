"""How close the compiled backend is to eager, at real shapes on the GPU, and how much of the gap is the
bf16 trajectory itself (random-weight velocity fields amplify rounding over the Euler steps).

    python -m harness.check_equivalence --preset showo2-1.5b

Prints, for one model call (t = 0.5) and for whole trajectories, relative errors and latent cosines of:
eager bf16 vs eager fp32 (the intrinsic bf16 noise), compiled exact vs eager bf16 and vs fp32, and compiled
FlashU vs eager FlashU (with their per-call decisions compared), and both FlashU runs vs eager FlashU in fp32.
"""

from __future__ import annotations

import copy

import torch

from flashu_fx.compiled import flashu_backend, generate_images_compiled, lean_guard_options
from flashu_fx.config import get_config
from flashu_fx.ffn_layout import permute_ffn_weights
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.layout import build_gen_batch
from flashu_fx.t2i import generate_images
from harness.arguments import command_parser
from harness.compiled_rows import add_backend_option_argument, parsed_backend_options
from harness.devices import resolve_device
from harness.flashu_rows import permute_for, random_ffn_scores
from harness.random_model import build_random_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m harness.check_equivalence", __doc__)
    parser.add_argument("--preset", default="showo2-1.5b", help="model shapes")
    parser.add_argument("--steps", type=int, default=50, help="baseline grid points")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    add_backend_option_argument(parser)
    args = parser.parse_args(argv)
    options = parsed_backend_options(args, parser)
    torch._dynamo.reset()  # this run's compiles start from a clean Dynamo cache (see compiled_rows)
    device = resolve_device(args.device)
    if options:
        print(f"backend options: {options}")
    model = build_random_model(get_config(args.preset), device, torch.bfloat16)
    fp32 = copy.deepcopy(model).float()
    prompt = [[100 + i for i in range(20)]]
    batch = build_gen_batch(model.config, prompt).to(device)
    x = torch.randn(1, 16, *model.config.latent_size, device=device).repeat(2, 1, 1, 1)
    t = torch.full((2,), 0.5, device=device)
    v16 = model(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False).velocity
    v32 = fp32(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False).velocity
    backend = flashu_backend("gen", **options)
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    backend.begin_image(1, 10.0)
    with backend.step(0, cfg_shared_latents=True):
        vc = gen(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False).velocity.clone()
    print(f"one call: eager bf16 vs fp32 rel {rel(v16, v32):.2e}; compiled vs eager bf16 rel {rel(vc, v16):.2e}; "
          f"compiled vs fp32 rel {rel(vc, v32):.2e}")
    e16 = generate_images(model, prompt, steps=args.steps, guidance=10.0)
    e32 = generate_images(fp32, prompt, steps=args.steps, guidance=10.0)
    c16 = generate_images_compiled(gen, backend, prompt, baseline_steps=args.steps, guidance=10.0)
    print(f"trajectory ({args.steps - 1} calls): cos eager bf16 vs fp32 {cos(e16, e32):.5f}; "
          f"compiled vs eager bf16 {cos(c16, e16):.5f}; compiled vs fp32 {cos(c16, e32):.5f}")
    config = FlashUConfig.for_task("gen")
    layout = permute_for(model, config, random_ffn_scores(model))
    permute_ffn_weights(fp32, layout.order)
    eager = generate_images_flashu(model, prompt, config, layout, baseline_steps=args.steps, guidance=10.0)
    exact = generate_images_flashu(fp32, prompt, config, layout, baseline_steps=args.steps, guidance=10.0)
    del fp32
    fbackend = flashu_backend("gen", config, layout, **options)
    fgen = torch.compile(model, backend=fbackend, options=lean_guard_options())
    fout = generate_images_compiled(fgen, fbackend, prompt, baseline_steps=args.steps, guidance=10.0)
    records = fbackend.records
    same = [r.skip_set for r in records] == [r.skipped for r in eager.records] and \
        [r.head for r in records] == [r.head for r in eager.records]
    same32 = [r.skipped for r in exact.records] == [r.skipped for r in eager.records]
    print(f"FlashU: decisions identical {same}; skip sets {sorted({r.skip_set for r in records})}; "
          f"latent cos compiled vs eager FlashU {cos(fout, eager.latents):.5f}")
    # How far each bf16 run is from the fp32 eager FlashU twin (same decisions?): the bf16 noise floor.
    print(f"FlashU vs fp32 eager FlashU (fp32 decisions equal bf16's: {same32}): eager bf16 "
          f"{cos(eager.latents, exact.latents):.5f}; compiled bf16 {cos(fout, exact.latents):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
