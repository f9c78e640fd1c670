"""Eager FlashU understanding (flashu_fx.flashu_und) on the tiny model, fp32 on the CPU.

The main oracle is a cache-free recomputation of the whole answer in one pass: every layer runs over the
full sequence (prompt + generated ids), and FlashU's decisions become masks:
- V-norm pruning: in layers > p the dropped image tokens are masked as KEYS with an additive -inf mask
  (their rows are computed but discarded), RoPE positions stay 0..n-1;
- layer skipping: a token that skipped layer l is masked as a key in layer l and its row passes through.
Dropping tokens and never writing K/V must equal exactly that, up to float summation order.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx import FlashUConfig, Showo2, answer_question
from flashu_fx.ffn_layout import FFNLayout, build_ffn_layout, permute_ffn_weights, top_k_mask
from flashu_fx.flashu_und import FlashUAnswer, FlashUUndDecoder, answer_question_flashu
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.masks import omni_mask
from flashu_fx.mmu import prompt_embeddings
from flashu_fx.tokenizer import get_tokenizer

QUESTION = "what is in the image?"
NUM_IMAGE = 16  # tiny: a 4 x 4 token grid


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def und_config(**overrides) -> FlashUConfig:
    base = dict(ffn_prune_ratio=0.0, skip_ratio=0.0, token_prune_ratio=0.0, max_new_tokens=6)
    return FlashUConfig.for_task("und", **{**base, **overrides})


def pruned_models(model: Showo2, width: int, seed: int = 2) -> tuple[Showo2, FFNLayout, Showo2]:
    """(copy permuted by a random-score gen+und layout, that layout, copy with und's pruned neurons zeroed)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    keep = {
        t: top_k_mask(torch.rand(cfg.num_layers, cfg.intermediate_size, generator=gen), width) for t in ("gen", "und")
    }
    layout = build_ffn_layout(keep)
    sliced = copy.deepcopy(model)
    permute_ffn_weights(sliced, layout.order)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, k in zip(masked.showo.model.layers, keep["und"], strict=True):
            layer.mlp.down_proj.weight[:, ~k] = 0.0
    return sliced, layout, masked


def answer_with_logits(fn, model: Showo2, *args, **kwargs) -> tuple[object, list[torch.Tensor]]:
    """Run ``fn`` and capture every lm_head output (one (V,) row per generated token)."""
    logits: list[torch.Tensor] = []
    handle = model.showo.lm_head.register_forward_hook(lambda mod, a, out: logits.append(out.detach().clone()))
    try:
        return fn(model, *args, **kwargs), logits
    finally:
        handle.remove()


def reference_logits(
    model: Showo2, lat: torch.Tensor, answer: FlashUAnswer, config: FlashUConfig, layout: FFNLayout | None
) -> torch.Tensor:
    """Cache-free recomputation of every step's logits (len(ids), V) from the answer's own decisions."""
    cfg = model.config
    prompt = build_mmu_prompt(cfg, get_tokenizer(cfg), QUESTION)
    x = prompt_embeddings(model, lat, prompt)
    feed = model.showo.model.embed_tokens(torch.tensor([answer.ids[:-1]], dtype=torch.long))
    h = torch.cat([x, feed], dim=1)  # (1, n, H): the prompt, then every fed token
    n, l0 = h.shape[1], prompt.tokens.shape[1]
    allowed = omni_mask(torch.tensor([prompt.block_offset]), n, cfg.image_slot_len)[0, 0]  # (n, n)
    dropped = torch.zeros(n, dtype=torch.bool)
    if answer.kept_positions is not None:
        dropped[prompt.offset + 1 : prompt.offset + 1 + NUM_IMAGE] = True
        dropped[list(answer.kept_positions)] = False
    cos, sin, _, _ = model.rope(n, h.dtype, h.device)
    for i, layer in enumerate(model.showo.model.layers):
        passthrough = torch.zeros(n, dtype=torch.bool)
        for rec in answer.steps[1:]:  # the token fed at step d sits at position L0 + d - 1
            passthrough[rec.position] = i in rec.skipped
        hidden_keys = passthrough | (dropped if i > config.token_prune_layer else torch.zeros_like(dropped))
        additive = torch.zeros(n, n).masked_fill(~allowed | hidden_keys[None, :], float("-inf"))
        ranges = layout.task_ranges("und", i) if config.ffn_prune_ratio > 0 else None
        out = layer(h, cos, sin, additive[None, None], ffn_ranges=ranges)
        h = torch.where(passthrough[None, :, None], h, out)
    rows = torch.arange(l0 - 1, l0 - 1 + len(answer.ids))
    return model.showo.lm_head(model.showo.model.norm(h)[0, rows])


@torch.no_grad()
def check_against_reference(model, config, layout, max_new_tokens=6, seed=0) -> FlashUAnswer:
    lat = latents(seed)
    answer, logits = answer_with_logits(
        answer_question_flashu, model, lat, QUESTION, config, layout, max_new_tokens=max_new_tokens, stop_at_eos=False
    )
    assert len(logits) == len(answer.ids) == len(answer.steps) == max_new_tokens
    ref = reference_logits(model, lat, answer, config, layout)
    torch.testing.assert_close(torch.stack(logits), ref, rtol=1e-4, atol=1e-4)
    return answer


@pytest.mark.parametrize("max_new_tokens", [1, 7])
@torch.no_grad()
def test_everything_off_equals_answer_question_bit_for_bit(tiny_model: Showo2, max_new_tokens: int) -> None:
    lat = latents()
    plain, plain_logits = answer_with_logits(
        answer_question, tiny_model, lat, QUESTION, max_new_tokens=max_new_tokens, stop_at_eos=False
    )
    ours, our_logits = answer_with_logits(
        answer_question_flashu, tiny_model, lat, QUESTION, FlashUConfig.off("und"), None,
        max_new_tokens=max_new_tokens, stop_at_eos=False,
    )  # fmt: skip
    assert ours.ids == plain.ids and ours.text == plain.text and ours.kept_positions is None
    assert len(our_logits) == len(plain_logits) == max_new_tokens
    assert all(torch.equal(a, b) for a, b in zip(our_logits, plain_logits, strict=True))
    assert [s.layers for s in ours.steps] == ["all"] * max_new_tokens


@torch.no_grad()
def test_kept_tokens_equal_an_independent_vnorm(tiny_model: Showo2) -> None:
    """Layers 0..p-1 without any cache, then ||v_proj(input_layernorm(h))|| of the 16 image tokens."""
    sliced, layout, _ = pruned_models(tiny_model, 192)
    config = und_config(token_prune_layer=2, token_prune_ratio=0.5, ffn_prune_ratio=0.25, ffn_width_multiple=1)
    lat = latents(1)
    answer = answer_question_flashu(sliced, lat, QUESTION, config, layout, max_new_tokens=2)
    prompt = build_mmu_prompt(sliced.config, get_tokenizer(sliced.config), QUESTION)
    h = prompt_embeddings(sliced, lat, prompt)
    cos, sin, _, _ = sliced.rope(h.shape[1], h.dtype, h.device)
    layers = sliced.showo.model.layers
    for i in range(2):
        h = layers[i](h, cos, sin, prompt.mask(sliced.config), ffn_ranges=layout.task_ranges("und", i))
    v = layers[2].self_attn.v_proj(layers[2].input_layernorm(h))[0]  # (L0, KV * d)
    start = prompt.offset + 1  # the image tokens follow the time token
    norms = v[start : start + NUM_IMAGE].norm(dim=-1)
    expected = sorted((start + torch.argsort(norms, stable=True)[:8]).tolist())
    assert answer.kept_positions == tuple(expected)
    assert prompt.offset not in answer.kept_positions  # the time token is never a candidate
    # the recorded evidence is these norms (fp32) and where they start
    assert answer.image_start == start
    torch.testing.assert_close(answer.image_values.float().norm(dim=-1), norms.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_pruned_prefill_equals_masking_dropped_keys(tiny_model: Showo2, layer: int) -> None:
    answer = check_against_reference(tiny_model, und_config(token_prune_layer=layer, token_prune_ratio=0.5), None)
    assert len(answer.kept_positions) == 8
    # RoPE positions are the original ones: decode step d feeds position L0 + d - 1 in every layer
    assert [s.position for s in answer.steps] == [answer.prompt_len - 1 + d for d in range(6)]


def test_pruning_changes_the_answer(tiny_model: Showo2) -> None:
    """The token-pruning tests would be vacuous if dropping half the image changed nothing."""
    lat = latents()
    _, a = answer_with_logits(answer_question_flashu, tiny_model, lat, QUESTION, und_config(), None)
    _, b = answer_with_logits(
        answer_question_flashu, tiny_model, lat, QUESTION, und_config(token_prune_ratio=0.5), None
    )
    assert not torch.allclose(a[0], b[0], atol=1e-3)


def test_keeping_every_image_token_equals_no_pruning(tiny_model: Showo2) -> None:
    lat = latents()
    config = und_config(token_prune_ratio=0.05)  # int(16 * 0.05) = 0 dropped: the pruning path keeps all
    a, la = answer_with_logits(answer_question_flashu, tiny_model, lat, QUESTION, config, None)
    b, lb = answer_with_logits(answer_question_flashu, tiny_model, lat, QUESTION, und_config(), None)
    assert len(a.kept_positions) == NUM_IMAGE and b.kept_positions is None and a.ids == b.ids
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=1e-5, atol=1e-5)


def test_layer_skipping_rules(tiny_model: Showo2) -> None:
    config = und_config(skip_ratio=0.5, skip_interval=3)  # 2 of 4 layers; measure at d = 0, 3, 6
    answer = check_against_reference(tiny_model, config, None, max_new_tokens=8)
    steps = answer.steps
    assert [s.step for s in steps] == list(range(8))
    assert [s.layers for s in steps] == ["measure", "skip", "skip", "measure", "skip", "skip", "measure", "skip"]
    current: tuple[int, ...] = ()
    for s in steps:
        if s.layers == "measure":
            assert s.skipped == () and len(s.importance) == 4
            assert s.skip_set == tuple(sorted(sorted(range(4), key=lambda i: s.importance[i])[:2]))
        else:
            assert s.skipped == current and s.importance is None
        current = s.skip_set


@torch.no_grad()
def test_prefill_importance_is_measured_on_the_last_prompt_token(tiny_model: Showo2) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        for layer in tiny_model.showo.model.layers
    ]
    try:
        answer = answer_question_flashu(tiny_model, latents(), QUESTION, und_config(skip_ratio=0.5), None)
    finally:
        for h in hooks:
            h.remove()
    expected = [1 - torch.cosine_similarity(a[0, -1], b[0, -1], dim=0).item() for a, b in seen[:4]]
    assert answer.steps[0].importance == pytest.approx(expected, abs=1e-6)


@torch.no_grad()
def test_skipped_layers_write_no_kv_and_are_not_attended(tiny_model: Showo2) -> None:
    """Steps d = 1..3 skip the set; step 4 measures, so it runs the skipped layers over their caches."""
    config = und_config(skip_ratio=0.5, skip_interval=4, token_prune_ratio=0.5, token_prune_layer=1)
    prompt = build_mmu_prompt(tiny_model.config, get_tokenizer(tiny_model.config), QUESTION)
    x = prompt_embeddings(tiny_model, latents(), prompt)
    dec, again = (FlashUUndDecoder(tiny_model, config, None, prompt, max_new_tokens=5) for _ in range(2))
    for d in (dec, again):
        d.prefill(x)
        for token in (7, 8, 9):
            d.step(token)
    l0, kept_len = dec.prompt_len, dec.prompt_len - 8
    assert dec.base == [l0, l0, kept_len, kept_len]
    skip = dec.skip_set
    assert len(skip) == 2 and [s.skipped for s in dec.steps[1:]] == [skip] * 3
    for i in range(4):
        slots = [dec.base[i] + k for k in range(3)]
        assert dec.valid[i][: dec.base[i]].all() and not dec.valid[i][dec.base[i] + 3 :].any()
        assert dec.valid[i][slots].tolist() == [i not in skip] * 3
        if i in skip:  # never written, and garbage there must change nothing
            assert not dec.caches[i].k_cache[:, :, slots].any() and not dec.caches[i].v_cache[:, :, slots].any()
            dec.caches[i].k_cache[:, :, slots] = 1e4
            dec.caches[i].v_cache[:, :, slots] = 1e4
    torch.testing.assert_close(dec.step(10), again.step(10), rtol=0, atol=0)
    assert dec.steps[-1].layers == "measure" and dec.steps[-1].skipped == ()


def test_sliced_ffn_equals_masked_ffn_inside_the_pipeline(tiny_model: Showo2) -> None:
    sliced, layout, masked = pruned_models(tiny_model, 192)
    config = und_config(ffn_prune_ratio=0.25, ffn_width_multiple=1, token_prune_ratio=0.5, skip_ratio=0.5)
    lat = latents()
    a, la = answer_with_logits(answer_question_flashu, sliced, lat, QUESTION, config, layout, stop_at_eos=False)
    unpruned = dataclasses.replace(config, ffn_prune_ratio=0.0)
    b, lb = answer_with_logits(answer_question_flashu, masked, lat, QUESTION, unpruned, None, stop_at_eos=False)
    assert a.kept_positions == b.kept_positions and [s.skip_set for s in a.steps] == [s.skip_set for s in b.steps]
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_rejected(tiny_model: Showo2) -> None:
    lat = latents()
    with pytest.raises(ValueError, match="task"):
        answer_question_flashu(tiny_model, lat, QUESTION, FlashUConfig.for_task("gen"), None)
    with pytest.raises(ValueError, match="token_prune_layer=4"):
        answer_question_flashu(tiny_model, lat, QUESTION, und_config(token_prune_layer=4, token_prune_ratio=0.5), None)
    with pytest.raises(ValueError, match="ffn_prune_ratio"):
        answer_question_flashu(tiny_model, lat, QUESTION, FlashUConfig.for_task("und"), None)
    gen_only = build_ffn_layout({"gen": top_k_mask(torch.rand(4, 256), 192)})
    with pytest.raises(ValueError, match="'und' ranges"):
        answer_question_flashu(
            tiny_model, lat, QUESTION, und_config(ffn_prune_ratio=0.25, ffn_width_multiple=1), gen_only
        )
    with pytest.raises(ValueError, match="latents"):
        answer_question_flashu(tiny_model, lat[0], QUESTION, und_config(), None)


@pytest.fixture(scope="module")
def tiny_sliced_und(tiny_model: Showo2) -> tuple[Showo2, FFNLayout]:
    sliced, layout, _ = pruned_models(tiny_model, 192)
    return sliced, layout


@settings(max_examples=40, deadline=None)
@given(
    prune_layer=st.integers(0, 3),
    token_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    skip_ratio=st.sampled_from([0.0, 0.25, 0.5]),
    skip_interval=st.integers(0, 3),
    ffn=st.booleans(),
    max_new_tokens=st.integers(1, 6),
    seed=st.integers(0, 3),
)
def test_random_configs_equal_the_masked_reference(
    tiny_sliced_und, prune_layer, token_ratio, skip_ratio, skip_interval, ffn, max_new_tokens, seed
) -> None:
    sliced, layout = tiny_sliced_und
    config = und_config(
        token_prune_layer=prune_layer,
        token_prune_ratio=token_ratio,
        skip_ratio=skip_ratio,
        skip_interval=skip_interval,
        ffn_prune_ratio=0.25 if ffn else 0.0,
        ffn_width_multiple=1,
    )
    answer = check_against_reference(sliced, config, layout, max_new_tokens, seed)
    assert (answer.kept_positions is None) == (token_ratio == 0)
    if answer.kept_positions is not None:
        assert len(answer.kept_positions) == config.kept_tokens(NUM_IMAGE)
