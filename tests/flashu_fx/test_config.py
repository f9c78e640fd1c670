"""Showo2Config: presets, derived sizes (docs/SHOWO2.md §1.1, §1.8), validation naming the field, dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import PRESETS, QWEN_SPECIALS, Showo2Config, get_config

REAL = ("showo2-1.5b", "showo2-7b")
# Every integer size of the config (bools excluded: type() is exact).
INT_FIELDS = [f.name for f in dataclasses.fields(Showo2Config) if type(getattr(PRESETS["tiny"], f.name)) is int]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_valid_and_named(name):
    cfg = get_config(name)
    assert cfg.name == name
    assert Showo2Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}) == cfg
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.head_num_heads % cfg.head_num_kv_heads == 0
    assert cfg.hidden_size != cfg.head_hidden_size


@pytest.mark.parametrize("name", REAL)
def test_real_preset_derived_sizes(name):
    cfg = get_config(name)
    assert cfg.num_image_tokens == 729
    assert cfg.image_slot_len == 730
    assert cfg.latent_size == (54, 54)
    assert cfg.max_text_len == 290
    assert cfg.patch_dim == 64
    assert cfg.max_seq_len == 1024
    assert cfg.vocab_size == 151669
    assert cfg.specials == QWEN_SPECIALS


def test_real_preset_llm_sizes():
    small, big = get_config("showo2-1.5b"), get_config("showo2-7b")
    assert (small.hidden_size, small.num_heads, small.num_kv_heads, small.intermediate_size) == (1536, 12, 2, 8960)
    assert (big.hidden_size, big.num_heads, big.num_kv_heads, big.intermediate_size) == (3584, 28, 4, 18944)
    assert small.tie_word_embeddings and not big.tie_word_embeddings
    for cfg in (small, big):
        assert (cfg.num_layers, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps) == (28, 128, 1e6, 1e-6)
        und = (cfg.und_hidden_size, cfg.und_num_layers, cfg.und_num_heads, cfg.und_intermediate_size)
        assert und == (1152, 26, 16, 4304)
        head = (cfg.head_hidden_size, cfg.head_num_layers, cfg.head_num_heads, cfg.head_num_kv_heads)
        assert head == (2048, 10, 32, 8)
        assert (cfg.head_dim_head, cfg.head_intermediate_size, cfg.head_rope_theta) == (64, 8192, 5e5)
        assert cfg.head_rms_norm_eps == 1e-5


def test_special_token_ids():
    sp = QWEN_SPECIALS
    assert (sp.bos, sp.eos, sp.boi, sp.eoi, sp.img_pad, sp.pad) == (151644, 151645, 151652, 151653, 151655, 151665)


def test_tiny_derived_sizes():
    cfg = get_config("tiny")
    assert (cfg.num_image_tokens, cfg.image_slot_len, cfg.latent_size) == (16, 17, (8, 8))
    assert cfg.max_text_len == 48 - 17 - 4
    assert get_config("tiny-tied").tie_word_embeddings and not cfg.tie_word_embeddings


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("tiny").hidden_size = 8  # type: ignore[misc]


@settings(deadline=None, max_examples=60)
@given(field=st.sampled_from(INT_FIELDS), value=st.integers(-5, 0), preset=st.sampled_from(sorted(PRESETS)))
def test_non_positive_size_raises_naming_field(field, value, preset):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        dataclasses.replace(get_config(preset), **{field: value})
    assert str(value) in str(info.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_kv_heads": 5}, "num_kv_heads"),
        ({"head_num_kv_heads": 3}, "head_num_kv_heads"),
        ({"und_num_heads": 5}, "und_num_heads"),
        ({"hidden_size": 2048}, "hidden_size"),
        ({"und_num_positions": 730}, "und_num_positions"),
        ({"max_seq_len": 733}, "max_seq_len"),
        ({"image_grid": (0, 27)}, "image_grid"),
    ],
)
def test_inconsistent_config_raises_naming_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(get_config("showo2-1.5b"), **changes)


def test_smallest_max_seq_len_is_accepted():
    cfg = dataclasses.replace(get_config("showo2-1.5b"), max_seq_len=734)
    assert cfg.max_text_len == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip_through_json(name):
    cfg = get_config(name)
    data = json.loads(json.dumps(cfg.to_dict()))  # tuples become lists, dataclasses dicts
    back = Showo2Config.from_dict(data)
    assert back == cfg
    assert isinstance(back.image_grid, tuple) and back.specials == cfg.specials


@settings(deadline=None, max_examples=30)
@given(grid=st.tuples(st.integers(1, 64), st.integers(1, 64)), layers=st.integers(1, 12), tied=st.booleans())
def test_dict_round_trip_of_varied_configs(grid, layers, tied):
    cfg = dataclasses.replace(
        get_config("showo2-1.5b"),
        image_grid=grid,
        head_num_layers=layers,
        tie_word_embeddings=tied,
        max_seq_len=grid[0] * grid[1] + 5 + 128,
    )
    assert Showo2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.max_text_len == 128 and cfg.latent_size == (2 * grid[0], 2 * grid[1])


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="showo2-15b") as info:
        get_config("showo2-15b")
    for name in PRESETS:
        assert name in str(info.value)
