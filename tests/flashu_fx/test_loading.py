"""Checkpoint I/O: save/load round trips (safetensors and .bin, tied and untied), strict key/shape errors that
name the key and the shapes, missing files, and upstream config.json mapping (docs/SHOWO2.md §1.1, §1.11)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flashu_fx import CheckpointMismatchError, Showo2, from_pretrained, get_config, init_random_weights, save_pretrained
from flashu_fx.layout import build_gen_batch
from flashu_fx.loading import check_state_dict, config_from_upstream


def forward_velocity(model: Showo2) -> torch.Tensor:
    cfg = model.config
    batch = build_gen_batch(cfg, [[3, 4, 5]])
    x = torch.randn(2, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(batch.tokens, x, torch.full((2,), 0.5), batch.offsets, batch.mask).velocity


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def saved_model(request) -> Showo2:
    return init_random_weights(Showo2(get_config(request.param)), seed=1).eval()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_round_trip(saved_model, tmp_path, safe):
    path = save_pretrained(saved_model, tmp_path / "ckpt", safe=safe)
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(["config.json", "model.safetensors" if safe else "pytorch_model.bin"])
    loaded = from_pretrained(path, dtype=torch.float32)
    assert loaded.config == saved_model.config and not loaded.training
    expected = saved_model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    tied = loaded.showo.lm_head.weight is loaded.showo.model.embed_tokens.weight
    assert tied == saved_model.config.tie_word_embeddings
    assert torch.equal(loaded.llm_inv_freq, saved_model.llm_inv_freq)
    assert torch.equal(loaded.head_inv_freq, saved_model.head_inv_freq)
    assert torch.equal(forward_velocity(loaded), forward_velocity(saved_model))


def test_sharded_save_round_trips_and_replaces_an_older_split(saved_model, tmp_path):
    total = sum(v.numel() * v.element_size() for v in saved_model.state_dict().values())
    path = save_pretrained(saved_model, tmp_path / "ckpt", max_shard_bytes=total // 3)
    shards = sorted(p for p in path.glob("*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= total // 3 + 4096 for p in shards)
    assert torch.equal(forward_velocity(from_pretrained(path, dtype=torch.float32)), forward_velocity(saved_model))
    save_pretrained(saved_model, path)  # one file now: the old shards must go, or they would be read again
    assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_bytes must be >= 1, got 0"):
        save_pretrained(saved_model, tmp_path / "other", max_shard_bytes=0)


def test_load_casts_to_dtype(saved_model, tmp_path):
    loaded = from_pretrained(save_pretrained(saved_model, tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(b.is_meta for b in loaded.buffers())
    # the RoPE frequencies are not rounded with the weights: a position's angle stays the fp32 one
    assert loaded.llm_inv_freq.dtype == loaded.head_inv_freq.dtype == torch.float32
    assert torch.equal(loaded.llm_inv_freq, saved_model.llm_inv_freq)
    assert torch.equal(loaded.head_inv_freq, saved_model.head_inv_freq)


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16", "to_empty"])
def test_rope_frequencies_stay_fp32_under_every_cast(cast):
    model = init_random_weights(Showo2(get_config("tiny")), seed=2)
    expected = model.llm_inv_freq.clone(), model.head_inv_freq.clone()
    if cast == "to_empty":  # a model built on the meta device, then given storage: its frequencies must be real
        with torch.device("meta"):
            model = Showo2(get_config("tiny"))
        model = model.to_empty(device="cpu")
    else:
        model = model.to(torch.bfloat16) if cast == "to" else getattr(model, cast)()
        assert model.showo.lm_head.weight.dtype != torch.float32  # the weights did change dtype
    assert torch.equal(model.llm_inv_freq, expected[0]) and torch.equal(model.head_inv_freq, expected[1])
    cos, sin, head_cos, head_sin = model.rope(40, torch.bfloat16, "cpu")
    # the tables: fp32 angles, rounded once, at the end
    positions = torch.arange(40).float()[:, None]
    assert torch.equal(cos, torch.cat([positions * expected[0]] * 2, -1).cos().to(torch.bfloat16))


def test_tied_checkpoint_stores_both_copies(tmp_path):
    model = init_random_weights(Showo2(get_config("tiny-tied")), seed=2)
    path = save_pretrained(model, tmp_path, safe=False)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert torch.equal(state["showo.lm_head.weight"], state["showo.model.embed_tokens.weight"])


# ---- strict checking --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> Showo2:
    return init_random_weights(Showo2(get_config("tiny")), seed=3)


def test_missing_key_named(tiny):
    state = dict(tiny.state_dict())
    del state["diffusion_head_a.1.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key") as info:
        check_state_dict(tiny, state)
    assert "diffusion_head_a.1.self_attn.k_norm.weight" in str(info.value)


def test_unexpected_key_named(tiny):
    state = dict(tiny.state_dict())
    state["showo.model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key") as info:
        check_state_dict(tiny, state)
    assert "showo.model.layers.0.self_attn.q_norm.weight" in str(info.value)


def test_wrong_shape_names_key_and_both_shapes(tiny):
    state = dict(tiny.state_dict())
    state["showo.model.embed_tokens.weight"] = torch.zeros(300, 64)
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(tiny, state)
    message = str(info.value)
    assert "showo.model.embed_tokens.weight" in message and "(300, 64)" in message and "(256, 64)" in message


def test_one_error_lists_every_problem_and_truncates_long_lists(tiny):
    state = {"position_embedding.weight": torch.zeros(1, 1), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(tiny, state)
    message = str(info.value)
    total = len(tiny.state_dict())
    assert f"{total - 1} missing" in message and f"and {total - 1 - 20} more" in message
    assert "extra.weight" in message and "position_embedding.weight: checkpoint (1, 1) vs model (16, 48)" in message
    assert isinstance(info.value, ValueError)


def test_from_pretrained_rejects_a_doctored_file(tiny, tmp_path):
    path = save_pretrained(tiny, tmp_path)
    state = dict(tiny.state_dict())
    state["time_embed.mlp.0.weight"] = torch.zeros(96, 31)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"time_embed\.mlp\.0\.weight: checkpoint \(96, 31\)"):
        from_pretrained(path)


def test_other_safetensors_beside_the_weights_are_not_weights(tiny, tmp_path):
    """A testbed directory keeps its calibrations (``calibration_gen.safetensors``) beside ``model.safetensors``."""
    path = save_pretrained(tiny, tmp_path)
    save_file({"scores": torch.zeros(4, 256)}, str(path / "calibration_gen.safetensors"))
    loaded = from_pretrained(path, dtype=torch.float32)
    assert torch.equal(loaded.showo.lm_head.weight, tiny.showo.lm_head.weight)


# ---- files and configs ------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")


def test_missing_config_json(tiny, tmp_path):
    path = save_pretrained(tiny, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(path)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)


def test_upstream_config_with_unsupported_hidden_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 2048, "image_latent_height": 27}))
    save_file({"showo.model.embed_tokens.weight": torch.zeros(4, 2048)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="hidden_size=2048"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(("hidden", "preset"), [(1536, "showo2-1.5b"), (3584, "showo2-7b")])
def test_upstream_config_mapping(hidden, preset):
    upstream = {
        "hidden_size": hidden,
        "image_latent_height": 32,
        "image_latent_width": 32,
        "num_diffusion_layers": 10,
        "llm_vocab_size": 151669,
        "add_qk_norm": True,  # stored upstream but never read (docs/SHOWO2.md §1.1)
    }
    cfg = config_from_upstream(upstream)
    base = get_config(preset)
    assert cfg.hidden_size == hidden and cfg.tie_word_embeddings == base.tie_word_embeddings
    assert cfg.image_grid == (32, 32) and cfg.num_image_tokens == 1024 and cfg.head_num_layers == 10
    assert cfg.vocab_size == 151669
    # the embedding's row count wins over the config (the vocabulary is read from the checkpoint)
    assert config_from_upstream(upstream, vocab_size=151700).vocab_size == 151700
    assert config_from_upstream({"hidden_size": hidden}) == base


@pytest.mark.parametrize(("side", "max_seq_len", "max_text_len"), [(27, 1024, 290), (32, 1280, 251), (64, 4352, 251)])
def test_upstream_grid_sets_the_documented_token_budget(side, max_seq_len, max_text_len):
    """docs/SHOWO2.md §1.1 / §1.8: 432 -> 1024 (text 290), 512 -> 1280 (251), 1024 -> 4352 (251)."""
    cfg = config_from_upstream({"hidden_size": 1536, "image_latent_height": side, "image_latent_width": side})
    assert (cfg.max_seq_len, cfg.max_text_len, cfg.image_slot_len) == (max_seq_len, max_text_len, side * side + 1)
