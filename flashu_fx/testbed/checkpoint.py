"""The shipped testbed checkpoint: weights, word tokenizer, both tasks' calibrations and the run's record.

A testbed directory holds what ``save_pretrained`` writes (``config.json``, ``model.safetensors``), the tokenizer's
``tokenizer_words.json``, ``calibration_gen.*`` and ``calibration_und.*`` (``Calibration.save``) and
``testbed.json`` (the training command, its settings, the loss log and the sampling defaults).

>>> tb = load_testbed()                                        # the checkpoint shipped in the package
>>> latents = generate_images(tb.model, ["a photo of a red circle"], tb.tokenizer, steps=20)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashu_fx.calibration import Calibration
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.loading import from_pretrained
from flashu_fx.model import Showo2
from flashu_fx.testbed.tokenizer import WordTokenizer

SHIPPED_DIR = Path(__file__).parent / "weights"
RECORD_FILE = "testbed.json"
# Sampling defaults of the testbed (testbed.json may override them: the training run's guidance sweep).
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 50


@dataclass
class Testbed:
    model: Showo2
    tokenizer: WordTokenizer
    record: dict[str, Any]
    path: Path

    @property
    def guidance(self) -> float:
        return float(self.record.get("sampling", {}).get("guidance", DEFAULT_GUIDANCE))

    @property
    def steps(self) -> int:
        return int(self.record.get("sampling", {}).get("steps", DEFAULT_STEPS))

    def calibration(self, task: str) -> Calibration:
        """The task's shipped calibration, checked against this model's weights."""
        stem = self.path / f"calibration_{task}"
        if not stem.with_suffix(".json").exists():
            raise FileNotFoundError(f"{stem}.json does not exist: this testbed directory has no {task} calibration")
        return Calibration.load(stem, self.model)


def flashu_config(task: str, **overrides: Any) -> FlashUConfig:
    """The paper's FlashU settings for ``task`` at the testbed's width: kept FFN widths rounded to 8 neurons, not
    64 (64 of the nano model's 512 neurons would turn the paper's 20% into 25%)."""
    return FlashUConfig.for_task(task, **{"ffn_width_multiple": 8, **overrides})


def load_testbed(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Testbed:
    """A testbed checkpoint directory (default: the shipped one), strictly loaded."""
    path = Path(path) if path is not None else SHIPPED_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"testbed directory {path} does not exist")
    record_file = path / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    return Testbed(from_pretrained(path, dtype=dtype, device=device), WordTokenizer.load(path), record, path)
