"""A testbed checkpoint directory with random weights, shared by the quality and analyze tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashu_fx.calibration import calibrate
from flashu_fx.config import get_config
from flashu_fx.loading import save_pretrained
from flashu_fx.model import Showo2, init_random_weights
from flashu_fx.testbed import codec, world
from flashu_fx.testbed.checkpoint import flashu_config
from flashu_fx.testbed.tokenizer import WordTokenizer

CALIBRATION_STEPS = 3  # grid points of each generation calibration sample (few: the scores' values do not matter)
CALIBRATION_GUIDANCE = 4.0


@pytest.fixture(scope="session")
def random_testbed(tmp_path_factory) -> Path:
    """What ``train-testbed`` writes (weights, word tokenizer, both calibrations), from a random nano model:
    the commands run end to end on it; the scores mean nothing."""
    path = tmp_path_factory.mktemp("testbed")
    cfg = get_config("testbed-nano")
    model = init_random_weights(Showo2(cfg), seed=0).eval()
    save_pretrained(model, path)
    tok = WordTokenizer(world.vocabulary(), cfg.specials)
    tok.save(path)
    with torch.no_grad():
        captions = [p.caption for p in world.heldout_gen_prompts(2, seed=7)]
        calibrate(model, "gen", captions, flashu_config("gen"), steps=CALIBRATION_STEPS,
                  guidance=CALIBRATION_GUIDANCE, tokenizer=tok, progress=False).save(path / "calibration_gen")
        items = world.heldout_questions(2, seed=7)
        latents = codec.encode(torch.from_numpy(world.render_batch([it.scene for it in items])))
        samples = [(latents[i : i + 1], it.question) for i, it in enumerate(items)]
        calibrate(model, "und", samples, flashu_config("und"), tokenizer=tok,
                  progress=False).save(path / "calibration_und")
    return path
