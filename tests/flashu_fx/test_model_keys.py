"""The module tree of both real presets, built on the meta device, has exactly the official state dict.

tests/data/showo2_{1.5b,7b}_state_dict.tsv are copies of the reference key/shape lists (docs/SHOWO2.md §1.11), which
were taken from the official module tree instantiated on the meta device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from flashu_fx import Showo2, get_config

DATA = Path(__file__).resolve().parents[1] / "data"
CASES = {
    "showo2-1.5b": ("showo2_1.5b_state_dict.tsv", 2_830_777_056, 3_063_740_640),
    "showo2-7b": ("showo2_7b_state_dict.tsv", 8_932_118_752, 8_932_118_752),
}


def read_reference(file_name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from a ``key<TAB>(d0, d1)`` file."""
    out = {}
    for line in (DATA / file_name).read_text().splitlines():
        key, shape = line.split("\t")
        assert key not in out, f"duplicate key {key} in {file_name}"
        out[key] = tuple(ast.literal_eval(shape))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def meta_model(request) -> tuple[str, Showo2]:
    with torch.device("meta"):
        return request.param, Showo2(get_config(request.param))


def test_state_dict_keys_and_shapes_equal_reference(meta_model):
    name, model = meta_model
    reference = read_reference(CASES[name][0])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(reference) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(reference)) == [], "keys our model has but the checkpoint does not"
    wrong = {k: (ours[k], reference[k]) for k in reference if ours[k] != reference[k]}
    assert wrong == {}
    assert len(ours) == len(reference) == 910


def test_parameter_totals(meta_model):
    name, model = meta_model
    _, unique, stored = CASES[name]
    assert sum(p.numel() for p in model.parameters()) == unique  # a tied tensor counts once
    assert sum(v.numel() for v in model.state_dict().values()) == stored  # the checkpoint stores lm_head anyway


def test_lm_head_tied_only_for_1_5b(meta_model):
    name, model = meta_model
    tied = model.showo.lm_head.weight is model.showo.model.embed_tokens.weight
    assert tied == (name == "showo2-1.5b")
    assert get_config(name).tie_word_embeddings == tied


def test_rope_tables_are_not_in_the_state_dict(meta_model):
    _, model = meta_model
    buffers = dict(model.named_buffers())
    assert {"llm_inv_freq", "head_inv_freq"} <= set(buffers)
    assert not any("inv_freq" in k for k in model.state_dict())


def test_reference_files_are_the_documented_ones():
    small, big = read_reference(CASES["showo2-1.5b"][0]), read_reference(CASES["showo2-7b"][0])
    assert set(small) == set(big)
    assert small["showo.model.embed_tokens.weight"] == (151669, 1536)
    assert big["showo.lm_head.weight"] == (151669, 3584)
    assert small["diffusion_head_a.9.adaLN_modulation.1.weight"] == (12288, 2048)
    assert small["fusion_proj.0.weight"] == (2688,) and big["fusion_proj.0.weight"] == (4736,)
