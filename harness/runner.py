"""What ``generate``, ``answer`` and ``demo`` share: a checkpoint with its tokenizer and image codec, FlashU's
calibrated layout, and one batch of a task on the path the options pick.

    checkpoint directory ─┬─ tokenizer_words.json beside the weights: the trained testbed (word tokenizer, exact codec,
                          │  sampling defaults from testbed.json)
                          └─ otherwise: real Show-o2 weights, with a Qwen2.5 tokenizer and a Wan2.1 VAE directory

    path            flashu   compile   runs
    eager           off      off       generate_images / answer_question (KV cache)
    flashu-eager    on       off       generate_images_flashu / answer_question_flashu
    compiled-exact  off      on        torch.compile(model, backend=flashu_backend(task)): exact optimizations only
    compiled-flashu on       on        the same backend with the FlashU config and layout

FlashU uses the checkpoint's shipped calibration (``calibration_{task}.json`` beside the weights) when there is one,
else it calibrates on the request's own inputs first (Wanda) and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from flashu_fx.calibration import Calibration, calibrate, prepare_pruned_model
from flashu_fx.compiled import answer_question_compiled, flashu_backend, generate_images_compiled, lean_guard_options
from flashu_fx.ffn_layout import FFNLayout
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.layout import build_gen_batch
from flashu_fx.loading import from_pretrained
from flashu_fx.mmu import Answer, answer_question
from flashu_fx.model import Showo2
from flashu_fx.t2i import eager_velocity, generate_images
from flashu_fx.testbed import codec as testbed_codec
from flashu_fx.testbed.checkpoint import SHIPPED_DIR, Testbed, load_testbed
from flashu_fx.testbed.checkpoint import flashu_config as testbed_flashu_config
from flashu_fx.testbed.tokenizer import FILE_NAME as WORD_TOKENIZER_FILE
from flashu_fx.tokenizer import HFTokenizer, TextTokenizer
from flashu_fx.vae import WanLatentCodec, diffusers_available, preprocess_image

PATHS = ("eager", "flashu-eager", "compiled-exact", "compiled-flashu")
# Sampling defaults for real Show-o2 weights (upstream's demo); the testbed's come from its testbed.json.
SHOWO2_STEPS, SHOWO2_GUIDANCE, SHOWO2_NEW_TOKENS = 50, 7.5, 128
TESTBED_NEW_TOKENS = 8  # the testbed's answers are one or two words and eos
CALIBRATION_PROMPTS = 4  # on-the-fly gen calibration: generations of the first prompts (each a whole sampling run)


class OptionError(ValueError):
    """A problem with the command's options; the message names the option, its value and what is allowed."""


def path_name(flashu: bool, compiled: bool) -> str:
    return PATHS[2 * compiled + flashu]


# ---- images ------------------------------------------------------------------------------------------------------
class ImageCodec(Protocol):
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> uint8 (B, H, W, 3) on the CPU."""
        ...

    def encode_file(self, path: Path) -> Tensor:
        """An image file -> the model's understanding input: latents (1, C, h, w) fp32."""
        ...


class ExactCodecImages:
    """The testbed's exact codec; an image file is resized (shorter side) and centre-cropped to the world's size
    the way ``flashu_fx.vae`` prepares images for the Wan2.1 VAE."""

    def __init__(self, model: Showo2) -> None:
        self.side = model.config.latent_size[0] * testbed_codec.FACTOR  # 24 latents -> 48 pixels

    def decode(self, latents: Tensor) -> Tensor:
        return testbed_codec.decode(latents).cpu()

    def encode_file(self, path: Path) -> Tensor:
        pixels = preprocess_image(path, self.side)  # (1, 3, S, S) in [-1, 1], from uint8 / 255: exact back to uint8
        image = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return testbed_codec.encode(image)


class VaeImages:
    """The Wan2.1 VAE (``flashu_fx.vae.WanLatentCodec``)."""

    def __init__(self, codec: WanLatentCodec, model: Showo2) -> None:
        self.codec, self.config = codec, model.config

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode_to_images(latents)

    def encode_file(self, path: Path) -> Tensor:
        return self.codec.encode_image_file(path, self.config)


# ---- the checkpoint ----------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded model with what it needs to read text and draw pictures, and its sampling defaults."""

    model: Showo2
    tokenizer: TextTokenizer
    images: ImageCodec
    path: Path
    testbed: Testbed | None  # None: real Show-o2 weights

    @property
    def kind(self) -> str:
        return "testbed" if self.testbed is not None else "show-o2"

    @property
    def steps(self) -> int:
        return self.testbed.steps if self.testbed is not None else SHOWO2_STEPS

    @property
    def guidance(self) -> float:
        return self.testbed.guidance if self.testbed is not None else SHOWO2_GUIDANCE

    @property
    def max_new_tokens(self) -> int:
        return TESTBED_NEW_TOKENS if self.testbed is not None else SHOWO2_NEW_TOKENS

    def flashu_config(self, task: str) -> FlashUConfig:
        """The task's FlashU settings for an on-the-fly calibration (a shipped one carries its own)."""
        return testbed_flashu_config(task) if self.testbed is not None else FlashUConfig.for_task(task)

    def shipped_calibration(self, task: str) -> Calibration | None:
        """``calibration_{task}`` beside the weights, checked against them; None when the directory has none."""
        stem = self.path / f"calibration_{task}"
        if not stem.with_suffix(".json").is_file():
            return None
        try:
            return Calibration.load(stem, self.model)
        except (FileNotFoundError, ValueError) as err:  # e.g. scores of other weights
            raise OptionError(f"--weights {self.path}: {err}") from None

    def encode_text(self, text: str, where: str) -> list[int]:
        """Token ids of a prompt or question; OptionError naming ``where`` for words the tokenizer does not know."""
        try:
            return self.tokenizer.encode(text)
        except ValueError as err:  # the testbed's word tokenizer: words outside its world
            raise OptionError(f"{where}: {err}") from None


def is_testbed_dir(path: Path) -> bool:
    return (path / WORD_TOKENIZER_FILE).is_file()


def shipped_testbed_present() -> bool:
    return is_testbed_dir(SHIPPED_DIR)


def load_checkpoint(weights: Path | None, tokenizer: Path | None, vae: Path | None, device: torch.device,
                    dtype: torch.dtype) -> Checkpoint:
    """The model of ``weights`` (None: the shipped testbed) with its tokenizer and image codec, on ``device``.

    A testbed directory brings its own tokenizer and codec; real Show-o2 weights need both directories. Raises
    OptionError naming the option at fault.
    """
    path = weights if weights is not None else SHIPPED_DIR
    if weights is None and not is_testbed_dir(path):
        raise OptionError(f"--weights not given and the shipped testbed ({path}) is not in this installation yet: "
                          "pass --weights DIR (a testbed directory, or Show-o2 weights with --tokenizer and --vae)")
    if not (path / "config.json").is_file():
        raise OptionError(f"--weights {path} is not a checkpoint directory: it has no config.json (a testbed holds "
                          f"config.json, model*.safetensors and {WORD_TOKENIZER_FILE}; Show-o2 weights config.json and "
                          "pytorch_model.bin or *.safetensors)")
    if is_testbed_dir(path):
        for option, value in (("--tokenizer", tokenizer), ("--vae", vae)):
            if value is not None:
                raise OptionError(f"{option} {value}: the testbed {path} has its own word tokenizer and exact codec; "
                                  f"{option} is for real Show-o2 weights only")
        try:
            testbed = load_testbed(path, dtype=dtype, device=device)
        except (FileNotFoundError, ValueError) as err:  # missing files, keys or shapes
            raise OptionError(f"--weights {path}: {err}") from None
        return Checkpoint(testbed.model, testbed.tokenizer, ExactCodecImages(testbed.model), path, testbed)
    missing = [f"{option} DIR ({what})" for option, value, what in (
        ("--tokenizer", tokenizer, "a local Qwen2.5-Instruct tokenizer directory"),
        ("--vae", vae, "a local diffusers-format Wan2.1 VAE directory"),
    ) if value is None]
    if missing:
        raise OptionError(f"--weights {path} holds Show-o2 weights (no {WORD_TOKENIZER_FILE}, so not a testbed): "
                          f"they need {' and '.join(missing)}")
    if not diffusers_available():
        raise OptionError(f"--vae {vae} needs diffusers>=0.33 and Pillow: pip install 'flashu-fx[vae]'")
    try:
        model = from_pretrained(path, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError(f"--weights {path}: {err}") from None
    try:
        text = HFTokenizer(tokenizer, model.config)
    except ValueError as err:
        raise OptionError(f"--tokenizer {tokenizer}: {err}") from None
    try:
        codec = WanLatentCodec.from_pretrained(vae, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError(f"--vae {vae}: {err}") from None
    return Checkpoint(model, text, VaeImages(codec, model), path, None)


# ---- FlashU ------------------------------------------------------------------------------------------------------
@dataclass
class FlashUSetup:
    """One task's FlashU settings and the FFN layout ``prepare_pruned_model`` permuted the model with."""

    config: FlashUConfig
    layout: FFNLayout
    how: str  # where the neuron scores came from, for reports


def shipped_flashu(ckpt: Checkpoint, tasks: Sequence[str]) -> dict[str, FlashUSetup]:
    """FlashU for each of ``tasks`` whose calibration ships with the checkpoint ({} when none does), from ONE
    ``prepare_pruned_model`` call: scores index the neurons in the order they had when calibrated, so the model must
    be permuted once for all tasks."""
    calibs = {task: calib for task in tasks if (calib := ckpt.shipped_calibration(task)) is not None}
    if not calibs:
        return {}
    layout = prepare_pruned_model(ckpt.model, calibs)
    return {task: FlashUSetup(calib.flashu_config(), layout, f"shipped calibration {ckpt.path}/calibration_{task}.json")
            for task, calib in calibs.items()}


def prepare_flashu(ckpt: Checkpoint, task: str, samples: Sequence[Any], *, steps: int = SHOWO2_STEPS,
                   guidance: float = SHOWO2_GUIDANCE, seed: int = 0,
                   once: Callable[[Callable[[], Calibration]], Calibration] = lambda make: make(),
                   progress: bool = True) -> FlashUSetup:
    """Permute ``ckpt.model``'s FFNs in place for ``task`` from its shipped calibration, or from one made now on
    ``samples`` (gen: prompts, each generated with ``steps``, ``guidance`` and noise seed ``seed + i``; und:
    (latents, question) pairs).

    ``once(make)`` runs ``make`` and returns its calibration; under data parallelism it runs it on rank 0 only and
    hands the result to every rank, so all ranks prune the same neurons.
    """
    shipped = shipped_flashu(ckpt, [task])
    if shipped:
        return shipped[task]

    def make() -> Calibration:
        print(f"flashu: {ckpt.path} has no calibration_{task}.json; calibrating {task} now on {len(samples)} "
              "input(s) of this request (Wanda)", file=sys.stderr)
        kwargs = dict(steps=steps, guidance=guidance, seed=seed) if task == "gen" else {}
        return calibrate(ckpt.model, task, samples, ckpt.flashu_config(task), progress=progress,
                         tokenizer=ckpt.tokenizer, **kwargs)

    calib = once(make)
    return FlashUSetup(calib.flashu_config(), prepare_pruned_model(ckpt.model, {task: calib}),
                       f"calibrated now on {len(samples)} input(s) of this request")


# ---- one batch ---------------------------------------------------------------------------------------------------
class ImageGenerator:
    """Latents for a batch of prompts (token ids) with per-prompt noise seeds, on one of the four paths."""

    def __init__(self, ckpt: Checkpoint, steps: int, guidance: float, flashu: FlashUSetup | None,
                 compiled: bool) -> None:
        self.ckpt, self.steps, self.guidance, self.flashu = ckpt, steps, guidance, flashu
        self.path = path_name(flashu is not None, compiled)
        self.backend = self.compiled = None
        if compiled:
            config, layout = (flashu.config, flashu.layout) if flashu is not None else (None, None)
            self.backend = flashu_backend("gen", config, layout)
            self.compiled = torch.compile(ckpt.model, backend=self.backend, options=lean_guard_options())

    @property
    def calls_per_image(self) -> int:
        points = self.steps if self.flashu is None else self.flashu.config.num_points(self.steps)
        return points - 1

    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> Tensor:
        model, steps, guidance = self.ckpt.model, self.steps, self.guidance
        if self.compiled is not None:
            return generate_images_compiled(self.compiled, self.backend, prompts, baseline_steps=steps,
                                            guidance=guidance, seeds=seeds)
        if self.flashu is not None:
            return generate_images_flashu(model, prompts, self.flashu.config, self.flashu.layout,
                                          baseline_steps=steps, guidance=guidance, seeds=seeds).latents
        # The eager baseline without lm_head: the logits never reach the image, so skip their cost.
        batch = build_gen_batch(model.config, prompts, guided=guidance != 0).to(next(model.parameters()).device)
        velocity = eager_velocity(model, batch, return_logits=False)
        return generate_images(model, prompts, steps=steps, guidance=guidance, velocity=velocity, seeds=seeds)


class QuestionAnswerer:
    """Greedy answers to questions about one image's latents, on one of the four paths."""

    def __init__(self, ckpt: Checkpoint, max_new_tokens: int, flashu: FlashUSetup | None, compiled: bool) -> None:
        self.ckpt, self.max_new_tokens, self.flashu = ckpt, max_new_tokens, flashu
        self.path = path_name(flashu is not None, compiled)
        self.backend = self.compiled = None
        if compiled:
            config, layout = (flashu.config, flashu.layout) if flashu is not None else (None, None)
            self.backend = flashu_backend("und", config, layout)
            self.compiled = torch.compile(ckpt.model, backend=self.backend)

    def __call__(self, latents: Tensor, question: list[int]) -> Answer:
        model, tok, budget = self.ckpt.model, self.ckpt.tokenizer, self.max_new_tokens
        if self.compiled is not None:
            return answer_question_compiled(self.compiled, self.backend, latents, question, tok, max_new_tokens=budget)
        if self.flashu is not None:
            return answer_question_flashu(model, latents, question, self.flashu.config, self.flashu.layout, tok,
                                          max_new_tokens=budget)
        return answer_question(model, latents, question, tok, max_new_tokens=budget, kv_cache=True)
