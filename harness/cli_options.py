"""The options ``generate`` and ``answer`` share, and argparse types that check a value where it is parsed (so the
error names the option and its value, and the command exits with status 2 before loading anything)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashu_fx.testbed import world
from flashu_fx.testbed.world import GenPrompt
from harness.arguments import existing_directory, flashu_setting
from harness.devices import DTYPES, resolve_device
from harness.runner import Checkpoint, FlashUSetup, OptionError


@dataclass(frozen=True)
class Text:
    """A prompt or question and where it came from (``--prompt``, or ``--prompts FILE line N``), for errors."""

    text: str
    where: str


# ---- argparse types: each raises ArgumentTypeError, which argparse reports as "argument --x: <message>" ----------
def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"file {value!r} {what}")
    return path


def int_at_least(low: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer (allowed: >= {low})") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{number} is too small (allowed: >= {low})")
        return number

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (allowed: >= 0)") from None
    if not number >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is not allowed (allowed: >= 0)")
    return number


def text_option(option: str):
    """A ``--prompt`` / ``--question`` value: any text with at least one non-blank character."""

    def parse(value: str) -> Text:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"empty {option.lstrip('-')} {value!r}: it needs at least one word")
        return Text(value.strip(), option)

    parse.__name__ = "text"
    return parse


def text_file(option: str):
    """A file of one prompt (or question) per line; blank lines and lines starting with # are skipped."""

    def parse(value: str) -> list[Text]:
        path = existing_file(value)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise argparse.ArgumentTypeError(f"file {value!r} is not UTF-8 text: {err}") from None
        items = [Text(line.strip(), f"{option} {value} line {n}") for n, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not items:
            raise argparse.ArgumentTypeError(f"file {value!r} holds no lines of text (blank lines and lines "
                                             "starting with # are skipped)")
        return items

    parse.__name__ = "file"
    return parse


# ---- the shared options ------------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--weights, --tokenizer, --vae, --flashu, --compile, --device, --dtype."""
    p.add_argument("--weights", type=existing_directory, default=None, metavar="DIR",
                   help="checkpoint directory: a testbed (default: the shipped one) or real Show-o2 weights")
    p.add_argument("--tokenizer", type=existing_directory, default=None, metavar="DIR",
                   help="real Show-o2 weights only: a local Qwen2.5-Instruct tokenizer directory")
    p.add_argument("--vae", type=existing_directory, default=None, metavar="DIR",
                   help="real Show-o2 weights only: a local diffusers-format Wan2.1 VAE directory")
    p.add_argument("--flashu", action=argparse.BooleanOptionalAction, default=True,
                   help="FlashU (default on): the checkpoint's shipped calibration, else one made now")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run through torch.compile with flashu_backend (default: on on CUDA, off on the CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when present; under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--set", action="append", default=[], type=flashu_setting, dest="flashu_settings",
                   metavar="KEY=VALUE",
                   help="a FlashU setting (repeatable), e.g. token_prune_ratio=0 or skip_ratio=0.1 (default: the "
                        "checkpoint's calibrated settings)")


def with_settings(flashu: FlashUSetup | None, settings: list[tuple[str, Any]]) -> FlashUSetup | None:
    """``flashu`` with ``--set``'s settings applied (the last of a repeated key wins); an OptionError names a
    setting the task's FlashUConfig refuses, or ``--set`` given with FlashU off."""
    if not settings:
        return flashu
    if flashu is None:
        raise OptionError("argument --set: FlashU is off (--no-flashu), so there is nothing to set")
    try:
        return dataclasses.replace(flashu, config=dataclasses.replace(flashu.config, **dict(settings)))
    except ValueError as err:
        raise OptionError(f"argument --set: {err}") from None


def resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OptionError("argument --device: cuda was asked for but torch sees no CUDA device (allowed here: auto, "
                          "cpu)")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def use_compile(args: argparse.Namespace, device: torch.device) -> bool:
    return device.type == "cuda" if args.compile is None else args.compile


def encode_texts(ckpt: Checkpoint, texts: list[Text], budget: int | None = None) -> list[list[int]]:
    """Token ids of every text (at most ``budget`` each, when given); OptionError naming the option a text came
    from for an unknown word or an over-long text."""
    ids = []
    for item in texts:
        ids.append(ckpt.encode_text(item.text, f"argument {item.where}"))
        if budget is not None and len(ids[-1]) > budget:
            raise OptionError(f"argument {item.where}: {item.text!r} has {len(ids[-1])} tokens, more than the "
                              f"model's text budget of {budget}")
    return ids


def world_captions(texts: list[Text]) -> tuple[list[Text], list[GenPrompt | None], list[str]]:
    """The testbed's view of prompts: each text as a caption of its world, parsed (``world.parse_caption``) so the
    picture can be scored. The testbed learned captions only in GenEval's template, "a photo of ...", and draws
    noise for a caption without it, so "a red circle" becomes "a photo of a red circle". Returns the texts to draw,
    each one's prompt (None: no caption of the world, not scored) and a note per change or unknown caption (a
    caller encodes the texts before it prints them: words outside the vocabulary stop the command first)."""
    drawn, prompts, notes = [], [], []
    for item in texts:
        prompt = world.parse_caption(item.text)
        if prompt is None and (prompt := world.parse_caption(f"{world.CAPTION_PREFIX} {item.text}")) is not None:
            notes.append(f"{item.where}: drawing {prompt.caption!r} for {item.text!r} (the testbed was trained on "
                         f"GenEval's template, {world.CAPTION_PREFIX!r} + objects)")
            item = Text(prompt.caption, item.where)
        elif prompt is None:
            near = uncoloured_caption(item.text)
            hint = (f"; the nearest caption is {near.caption!r} (a {near.category} caption names no colour)"
                    if near is not None else "")
            notes.append(f"{item.where}: {item.text!r} is no caption of the testbed's world, so the picture is not "
                         f"scored and may be noise{hint}; its captions are like: {'; '.join(CAPTION_EXAMPLES)} "
                         f"(relations: {', '.join(world.RELATIONS)}; colours: {', '.join(world.COLORS)})")
        drawn.append(item)
        prompts.append(prompt)
    return drawn, prompts, notes


def uncoloured_caption(text: str) -> GenPrompt | None:
    """The world's caption ``text`` becomes without its colour words ("a red circle left of a blue square" -> the
    position caption "a photo of a circle left of a square"), or None: position and counting captions name no
    colour."""
    words = [w for w in text.lower().split() if w not in world.COLORS]
    plain = " ".join(words)
    return world.parse_caption(plain) or world.parse_caption(f"{world.CAPTION_PREFIX} {plain}")


def world_questions(texts: list[Text]) -> tuple[list[Text], list[str]]:
    """The testbed's view of questions: each text in its world's wording where it is one of the world's questions
    (``world.parse_question``: letter case, spacing and a final "?" aside; the world's questions have no "?", which
    the testbed's tokenizer lacks), with a note where the wording changed; any other text is asked as given, less a
    final "?", with a note that the testbed never learned it. Returns the texts to ask and the notes (a caller
    encodes the texts before it prints them: words outside the vocabulary stop the command first)."""
    asked, notes = [], []
    for item in texts:
        parsed = world.parse_question(item.text)
        if parsed is not None:
            if parsed[0] != " ".join(item.text.lower().split()):
                notes.append(f"{item.where}: asking {parsed[0]!r} for {item.text!r} (the testbed's wording)")
            asked.append(Text(parsed[0], item.where))
            continue
        text = item.text.strip().removesuffix("?").rstrip()
        notes.append(f"{item.where}: {item.text!r} is no question of the testbed's world, so its answer may mean "
                     f"nothing; its questions are like: {'; '.join(QUESTION_EXAMPLES)}")
        asked.append(Text(text or item.text, item.where))
    return asked, notes


# One question of each kind (world.QA_KINDS order), for messages.
QUESTION_EXAMPLES = ("what color is the circle", "how many squares are there", "is there a red triangle",
                     "where is the blue diamond")


# One caption of each category (world.CATEGORIES order), for messages.
CAPTION_EXAMPLES = ("a photo of a circle", "a photo of a square and a diamond", "a photo of three triangles",
                    "a photo of a red circle", "a photo of a circle left of a square",
                    "a photo of a red circle and a blue square")


def run_command(run: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
                argv: list[str] | None) -> int:
    """Parse ``argv`` and ``run`` the command; an OptionError it raises is reported through ``parser.error`` (the
    usage and the message, exit status 2, no traceback), like a value argparse refused."""
    args = parser.parse_args(argv)
    args.command = " ".join([parser.prog, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    try:
        return run(args)
    except OptionError as err:
        parser.error(str(err))
