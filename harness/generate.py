r"""``python -m harness generate``: pictures from prompts, on one device or data parallel under torchrun.

    python -m harness generate --prompt "a photo of a red circle" --prompt "a photo of two blue squares"
    python -m harness generate --prompts prompts.txt --weights ckpt/show-o2-1.5B \
        --tokenizer ckpt/qwen2.5-1.5b-instruct --vae ckpt/wan2.1-vae-diffusers --batch 4
    torchrun --nproc-per-node 8 -m harness generate --prompts prompts.txt

Prompt i (in the order given, counted from 0) starts from its own noise, seed ``--seed + i``. The prompts are cut
into batches of ``--batch`` in order, and under torchrun rank r of N takes batches r, r + N, ... (with ``--batch 1``:
prompts r, r + N, ...). A batch holds the same prompts whatever N is, so the pictures do not depend on N (FlashU
chooses its skipped layers over a whole batch, so a picture may depend on its batch-mates, never on N).

Writes into ``--out`` (rank 0 alone, after gathering every rank's pictures): one PNG per prompt
(``{i:03d}_{prompt}.png``), ``grid.png`` (each picture under its prompt) and ``generate.json``:

    command, weights, checkpoint ("testbed" | "show-o2"), model, path ("eager" | "flashu-eager" | "compiled-exact" |
    "compiled-flashu"), flashu (where its neuron scores came from; null when off),
    settings {steps, calls_per_image, guidance, seed, batch, device, dtype}, world_size,
    ranks [{rank, device, images, indices, seconds, images_per_second, first_batch_seconds,
    steady_images_per_second}], seconds, images_per_second, steady_images_per_second, grid, score,
    images [{index, prompt, seed, file, rank, seconds, right, found}]

On a testbed each prompt is read as a caption of its world (``world.parse_caption``): "a red circle" is drawn as
"a photo of a red circle", the template the testbed learned, with a note on stderr. Each picture is then scored
by the testbed's scorer: ``right`` is GenEval's verdict for its caption (null for a text that is no caption of the
world), ``found`` what the detector saw ("a red circle, 2 blue squares"), both also under the picture in the grid;
``score`` is {scored, right} over the run (null for real Show-o2 weights, whose pictures no scorer judges).

A rank's seconds are the sum over its batches of generating and decoding (the first compiled batch includes the
compile); an image's are its batch's divided by the batch's prompts; the run's are the slowest rank's. The steady
rates leave each rank's first batch out (compile and warm-up), null where a rank ran one batch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flashu_fx.testbed.scorer import judge_picture, judgement_line
from flashu_fx.testbed.world import GenPrompt
from harness.arguments import command_parser
from harness.cli_options import (
    add_model_arguments,
    encode_texts,
    int_at_least,
    non_negative_float,
    resolve_device_dtype,
    run_command,
    text_file,
    text_option,
    use_compile,
    with_settings,
    world_captions,
)
from harness.devices import auto_threads, intra_op_threads
from harness.distributed import Ranks, process_group
from harness.grids import prompt_grid
from harness.images import write_png
from harness.runner import (
    CALIBRATION_PROMPTS,
    Checkpoint,
    ImageGenerator,
    OptionError,
    load_checkpoint,
    prepare_flashu,
)

PROG = "python -m harness generate"
EXAMPLES = """examples:
  python -m harness generate --prompt "a photo of a red circle" --prompt "a photo of two blue squares"
  python -m harness generate --prompts prompts.txt --batch 4 --weights DIR --tokenizer DIR --vae DIR
  torchrun --nproc-per-node 8 -m harness generate --prompts prompts.txt"""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, __doc__, epilog=EXAMPLES)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", type=text_option("--prompt"), action="append", metavar="TEXT",
                         help="a prompt (repeatable)")
    prompts.add_argument("--prompts", type=text_file("--prompts"), metavar="FILE",
                         help="a file of prompts, one per line (blank lines and lines starting with # skipped)")
    add_model_arguments(p)
    p.add_argument("--steps", type=int_at_least(2), default=None,
                   help="grid points of the baseline sampler, model calls = steps - 1 (FlashU runs its shorter grid; "
                   "default: the testbed's, else 50)")
    p.add_argument("--guidance", type=non_negative_float, default=None,
                   help="classifier-free guidance scale, 0 = off (default: the testbed's, else 7.5)")
    p.add_argument("--seed", type=int, default=0, help="prompt i starts from noise seed SEED + i")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="prompts per model call")
    p.add_argument("--out", type=Path, default=Path("runs/generate"), help="output directory")
    return p


def slug(text: str, limit: int = 48) -> str:
    """A file-name piece from a prompt: lower-case letters and digits joined by '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_") or "prompt"


def generate_share(generator: ImageGenerator, ckpt: Checkpoint, ids: list[list[int]], batches: list[list[int]],
                   seed: int, ranks: Ranks) -> dict[str, Any]:
    """This rank's batches -> {rank, device, seconds, batch_seconds, batch_sizes,
    items: [{index, seed, image uint8 (H, W, 3), seconds}]}."""
    items, batch_seconds = [], []
    bar = tqdm(batches, desc=f"generate ({generator.path})", unit="batch", disable=not ranks.is_main)
    for batch in bar:
        seeds = [seed + i for i in batch]
        start = time.perf_counter()
        with torch.no_grad():
            images = ckpt.images.decode(generator([ids[i] for i in batch], seeds))  # on the CPU: waits for the device
        seconds = time.perf_counter() - start
        batch_seconds.append(seconds)
        items += [dict(index=i, seed=s, image=image.numpy(), seconds=seconds / len(batch))
                  for i, s, image in zip(batch, seeds, images, strict=True)]
    device = str(next(ckpt.model.parameters()).device)
    return dict(rank=ranks.rank, device=device, seconds=sum(batch_seconds), batch_seconds=batch_seconds,
                batch_sizes=[len(b) for b in batches], items=items)


def steady_rate(images: int, seconds: float) -> float | None:
    return images / seconds if images and seconds > 0 else None


def write_outputs(out: Path, shares: list[dict[str, Any]], prompts: list[str], header: dict[str, Any],
                  world_prompts: list[GenPrompt | None] | None = None) -> dict:
    """Rank 0: every picture in prompt order as a PNG, the grid and the JSON report; returns the report.
    ``world_prompts`` (a testbed's): each picture with a prompt gets the scorer's verdict and what it found."""
    out.mkdir(parents=True, exist_ok=True)
    items = sorted(({**item, "rank": share["rank"]} for share in shares for item in share["items"]),
                   key=lambda item: item["index"])
    digits = max(3, len(str(len(prompts) - 1)))
    images = []
    for item in items:
        item["prompt"] = prompts[item["index"]]
        item["file"] = f"{item['index']:0{digits}d}_{slug(item['prompt'])}.png"
        write_png(out / item["file"], torch.from_numpy(item["image"]))
        if world_prompts is not None:
            item.update(judge_picture(world_prompts[item["index"]], item["image"]))
        images.append(item.pop("image"))
    ranks = [dict(rank=s["rank"], device=s["device"], images=len(s["items"]),
                  indices=[item["index"] for item in s["items"]], seconds=s["seconds"],
                  images_per_second=len(s["items"]) / s["seconds"] if s["seconds"] else None,
                  first_batch_seconds=s["batch_seconds"][0] if s["batch_seconds"] else None,
                  steady_images_per_second=steady_rate(sum(s["batch_sizes"][1:]), sum(s["batch_seconds"][1:])))
             for s in shares]
    seconds = max(s["seconds"] for s in shares)
    steady = None
    if all(len(s["batch_seconds"]) > 1 for s in shares):
        steady = steady_rate(sum(sum(s["batch_sizes"][1:]) for s in shares),
                             max(sum(s["batch_seconds"][1:]) for s in shares))
    report = dict(header, world_size=len(shares), ranks=ranks, seconds=seconds,
                  images_per_second=len(items) / seconds if seconds else None, steady_images_per_second=steady,
                  grid=None, score=None,
                  images=[{k: item[k] for k in ("index", "prompt", "seed", "file", "rank", "seconds", "right",
                                                "found") if k in item} for item in items])
    verdicts = None
    if world_prompts is not None:
        scored = [item["right"] for item in items if item["right"] is not None]
        report["score"] = dict(scored=len(scored), right=sum(scored))
        verdicts = [judgement_line(item) for item in items]
    title = f"{header['model']} ({header['checkpoint']}), {header['path']}"
    try:
        report["grid"] = prompt_grid(images, prompts, out / "grid.png", header["path"], title,
                                     verdicts=verdicts).name
    except ImportError:  # matplotlib, imported when drawing
        print("matplotlib is not installed: no grid.png (pip install 'flashu-fx[plots]')", file=sys.stderr)
    (out / "generate.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """The command (also the console script: its exit status is the return value)."""
    return run_command(run, build_parser(), argv)


def run(args: argparse.Namespace) -> int:
    texts = args.prompt or args.prompts
    if not texts:
        raise OptionError("no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE")
    ranks = Ranks.from_environment()
    device, dtype = resolve_device_dtype(args)
    device = ranks.device(device)
    compiled = use_compile(args, device)
    if compiled and args.guidance == 0:
        raise OptionError("argument --guidance: 0 (no classifier-free guidance) runs on the eager paths only: "
                          "pass --no-compile or a guidance > 0")
    ckpt = load_checkpoint(args.weights, args.tokenizer, args.vae, device, dtype)
    prompts: list[GenPrompt | None] | None = None  # the testbed's: each picture scored against its caption
    notes: list[str] = []
    if ckpt.testbed is not None:
        texts, prompts, notes = world_captions(texts)
    # unknown words and over-long texts fail here, naming the option, before any note
    ids = encode_texts(ckpt, texts, budget=ckpt.model.config.max_text_len)
    for note in notes if ranks.is_main else ():
        print(note, file=sys.stderr)
    steps = args.steps or ckpt.steps
    guidance = ckpt.guidance if args.guidance is None else args.guidance
    batches = [list(range(i, min(i + args.batch, len(ids)))) for i in range(0, len(ids), args.batch)]

    with process_group(ranks, device), intra_op_threads(auto_threads(None, device, ckpt.model.config)):
        flashu = None
        if args.flashu:  # calibration samples: the first prompts of the whole request, the same on every rank
            flashu = prepare_flashu(ckpt, "gen", ids[:CALIBRATION_PROMPTS], steps=steps, guidance=guidance,
                                    seed=args.seed, once=ranks.once, progress=ranks.is_main)
        flashu = with_settings(flashu, args.flashu_settings)
        generator = ImageGenerator(ckpt, steps, guidance, flashu, compiled)
        share = generate_share(generator, ckpt, ids, ranks.share(batches), args.seed, ranks)
        shares = ranks.gather(share)
        if not ranks.is_main:
            return 0
        header = dict(
            command=args.command, weights=str(ckpt.path), checkpoint=ckpt.kind,
            model=ckpt.model.config.name, path=generator.path, flashu=flashu.how if flashu else None,
            flashu_settings=dict(args.flashu_settings),
            settings=dict(steps=steps, calls_per_image=generator.calls_per_image, guidance=guidance, seed=args.seed,
                          batch=args.batch, device=device.type, dtype=str(dtype).removeprefix("torch.")),
        )
        report = write_outputs(args.out, shares, [t.text for t in texts], header, prompts)
    rate, steady = report["images_per_second"], report["steady_images_per_second"]
    after_first = f"; {steady:.1f} images/s after each process's first batch" if steady else ""
    print(f"{len(texts)} picture(s) in {args.out}/ ({report['path']}, {report['world_size']} process(es), "
          f"{rate:.2f} images/s{after_first})" if rate else f"{len(texts)} picture(s) in {args.out}/")
    if report["score"] is not None:
        score = report["score"]
        if score["scored"]:
            print(f"the scorer: {score['right']} of {score['scored']} scored picture(s) right (each picture's verdict "
                  "and findings under it in the grid and in the report)")
        else:
            print("the scorer: no picture scored, since no prompt was a caption of the testbed's world (what each "
                  "picture shows is under it in the grid and in the report)")
    if report["grid"]:
        print(f"grid: {args.out / report['grid']}")
    print(f"report: {args.out / 'generate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
