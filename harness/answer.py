r"""``python -m harness answer``: answers to questions about one image.

    python -m harness answer --image scene.png --question "what color is the circle" --question "where is the square"
    python -m harness answer --image photo.jpg --question "What is in this image?" --weights ckpt/show-o2-1.5B \
        --tokenizer ckpt/qwen2.5-1.5b-instruct --vae ckpt/wan2.1-vae-diffusers

The image's shorter side is resized to the model's image size and the centre cropped (the testbed: 48 x 48, encoded by
its exact codec; Show-o2: 432 x 432 through the Wan2.1 VAE); each question is then answered greedily. Prints every
answer and writes ``answer.json`` into ``--out``:

    command, weights, checkpoint ("testbed" | "show-o2"), model, path ("eager" | "flashu-eager" | "compiled-exact" |
    "compiled-flashu"), flashu (where its neuron scores came from; null when off), image,
    settings {max_new_tokens, device, dtype}, seconds, answers [{index, question, answer, ids, tokens, seconds}]

Questions are answered one after another in one process (``generate`` is the command that runs data parallel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.arguments import command_parser
from harness.cli_options import (
    add_model_arguments,
    encode_texts,
    existing_file,
    int_at_least,
    resolve_device_dtype,
    run_command,
    text_file,
    text_option,
    use_compile,
    with_settings,
    world_questions,
)
from harness.devices import auto_threads, intra_op_threads
from harness.distributed import Ranks
from harness.runner import Checkpoint, OptionError, QuestionAnswerer, load_checkpoint, prepare_flashu

PROG = "python -m harness answer"
EXAMPLES = """examples:
  python -m harness answer --image scene.png --question "what color is the circle" --question "where is the square"
  python -m harness answer --image photo.jpg --question "What is it?" --weights DIR --tokenizer DIR --vae DIR"""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, __doc__, epilog=EXAMPLES)
    p.add_argument("--image", type=existing_file, required=True, metavar="FILE", help="the picture (PNG or JPEG)")
    questions = p.add_mutually_exclusive_group()
    questions.add_argument("--question", type=text_option("--question"), action="append", metavar="TEXT",
                           help="a question about the picture (repeatable)")
    questions.add_argument("--questions", type=text_file("--questions"), metavar="FILE",
                           help="a file of questions, one per line (blank lines and lines starting with # skipped)")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help="most tokens per answer (default: 8 for the testbed, else 128)")
    p.add_argument("--out", type=Path, default=Path("runs/answer"), help="output directory")
    return p


def image_latents(ckpt: Checkpoint, path: Path) -> torch.Tensor:
    """The understanding input (1, C, h, w) of an image file, on the model's device."""
    try:
        latents = ckpt.images.encode_file(path)
    except ImportError as err:  # Pillow missing
        raise OptionError(f"argument --image: {err}") from None
    except OSError as err:  # not an image Pillow can read
        raise OptionError(f"argument --image: {path} is not an image Pillow can read (PNG or JPEG): {err}") from None
    return latents.to(next(ckpt.model.parameters()).device)


def main(argv: list[str] | None = None) -> int:
    """The command (also the console script: its exit status is the return value)."""
    return run_command(run, build_parser(), argv)


def run(args: argparse.Namespace) -> int:
    texts = args.question or args.questions
    if not texts:
        raise OptionError("no question given: pass --question TEXT (repeatable) or --questions FILE")
    if Ranks.from_environment().distributed:
        raise OptionError("answer runs as one process; torchrun's data parallelism is for 'generate'")
    device, dtype = resolve_device_dtype(args)
    ckpt = load_checkpoint(args.weights, args.tokenizer, args.vae, device, dtype)
    notes: list[str] = []
    if ckpt.testbed is not None:  # in its world's wording, or asked as given with a note
        texts, notes = world_questions(texts)
    ids = encode_texts(ckpt, texts)  # unknown words fail here, naming the option, before any note
    for note in notes:
        print(note, file=sys.stderr)
    latents = image_latents(ckpt, args.image)
    budget = args.max_new_tokens or ckpt.max_new_tokens

    with intra_op_threads(auto_threads(None, device, ckpt.model.config)):
        flashu = None
        if args.flashu:  # calibration samples: this image with each question (FlashU's 20 at most)
            samples = [(latents, q) for q in ids[: ckpt.flashu_config("und").calibration_samples]]
            flashu = prepare_flashu(ckpt, "und", samples)
        flashu = with_settings(flashu, args.flashu_settings)
        if ckpt.testbed is not None and flashu is not None and flashu.config.token_prune_ratio > 0:
            print(f"note: V-norm token pruning (token_prune_ratio={flashu.config.token_prune_ratio}) drops the "
                  "testbed's object tokens, whose value norms are the largest in its sparse scenes, and with them most "
                  "answers (docs/QUALITY.md); --set token_prune_ratio=0 keeps them", file=sys.stderr)
        answerer = QuestionAnswerer(ckpt, budget, flashu, use_compile(args, device))
        answers, started = [], time.perf_counter()
        for index, (text, question) in enumerate(tqdm(list(zip(texts, ids, strict=True)), desc=answerer.path,
                                                      unit="question")):
            start = time.perf_counter()
            with torch.no_grad():
                answer = answerer(latents, question)
            answers.append(dict(index=index, question=text.text, answer=answer.text, ids=answer.ids,
                                tokens=len(answer.ids), seconds=time.perf_counter() - start))
        seconds = time.perf_counter() - started

    for item in answers:
        print(f"Q: {item['question']}\nA: {item['answer']}")
    report = dict(
        command=args.command, weights=str(ckpt.path), checkpoint=ckpt.kind, model=ckpt.model.config.name,
        path=answerer.path, flashu=flashu.how if flashu else None, flashu_settings=dict(args.flashu_settings),
        image=str(args.image),
        settings=dict(max_new_tokens=budget, device=device.type, dtype=str(dtype).removeprefix("torch.")),
        seconds=seconds, answers=answers,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "answer.json").write_text(json.dumps(report, indent=1))
    print(f"report: {args.out / 'answer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
