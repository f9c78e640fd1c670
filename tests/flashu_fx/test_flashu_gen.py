"""Eager FlashU generation (flashu_fx.flashu_gen): each rule on hand-checkable tiny cases, fp32 on the CPU.

Oracles: the plain pipeline (bit for bit with every technique off), forward hooks on the LLM layers
(which layers ran, their inputs/outputs), a model whose pruned neurons are zeroed (masked FFN).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx import FlashUConfig, Showo2, generate_images
from flashu_fx.ffn_layout import FFNLayout, build_ffn_layout, permute_ffn_weights, top_k_mask
from flashu_fx.flashu_gen import (
    FlashUGenVelocity,
    choose_skip_set,
    generate_images_flashu,
    image_block,
)
from flashu_fx.layout import build_gen_batch
from flashu_fx.sampler import draw_noise, euler_sample, time_grid

PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]  # two prompts: four rows with three different slot offsets


def pruned_models(model: Showo2, width: int, seed: int = 1) -> tuple[Showo2, FFNLayout, Showo2]:
    """(copy permuted by a random-score "gen" layout, that layout, copy with the pruned neurons zeroed)."""
    cfg = model.config
    scores = torch.rand(cfg.num_layers, cfg.intermediate_size, generator=torch.Generator().manual_seed(seed))
    keep = top_k_mask(scores, width)
    layout = build_ffn_layout({"gen": keep})
    sliced = copy.deepcopy(model)
    permute_ffn_weights(sliced, layout.order)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, k in zip(masked.showo.model.layers, keep, strict=True):
            layer.mlp.down_proj.weight[:, ~k] = 0.0  # the pruned neurons contribute nothing
    return sliced, layout, masked


# s: 1 measure/compute, 2 skip/compute, 3 skip/store, 4 measure/reuse, 5 skip/reuse, 6-7 full phase.
RULES = FlashUConfig.for_task(
    "gen",
    ffn_prune_ratio=0.0,
    skip_ratio=0.5,  # 2 of the 4 tiny layers
    skip_interval=3,
    head_cache_interval=3,
    hybrid_full_fraction=0.3,  # int(0.3 * 7) = 2 full calls
    step_fraction=0.7,  # 12 baseline points -> round(8.4) = 8 points, 7 calls
)


def velocity_for(model: Showo2, config: FlashUConfig, num_calls: int = 7, layout=None) -> FlashUGenVelocity:
    batch = build_gen_batch(model.config, PROMPTS)
    return FlashUGenVelocity(model, batch, config, layout, num_calls, 5.0)


def states(model: Showo2, num_calls: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fixed pseudo-states x_k (M, C, h, w) and the grid, so two velocity objects see the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    h, w = model.config.latent_size
    shape = (2 * len(PROMPTS), model.config.latent_channels, h, w)
    return [torch.randn(shape, generator=gen) for _ in range(num_calls)], time_grid(num_calls + 1)


def run_calls(fn: FlashUGenVelocity, xs: list[torch.Tensor], grid: torch.Tensor, upto: int) -> list[torch.Tensor]:
    return [fn(xs[k], grid[k].expand(xs[k].shape[0]), k) for k in range(upto)]


@pytest.mark.parametrize("guidance", [5.0, 0.0])
def test_everything_off_equals_plain_pipeline_bit_for_bit(tiny_model: Showo2, guidance: float) -> None:
    plain = generate_images(tiny_model, PROMPTS, steps=6, guidance=guidance, seed=3)
    out = generate_images_flashu(
        tiny_model, PROMPTS, FlashUConfig.off("gen"), None, baseline_steps=6, guidance=guidance, seed=3
    )
    assert torch.equal(out.latents, plain)
    assert len(out.records) == 5
    assert all((r.layers, r.head, r.skipped, r.trunk) == ("all", "compute", (), True) for r in out.records)


def test_records_follow_the_schedule(tiny_model: Showo2) -> None:
    out = generate_images_flashu(tiny_model, PROMPTS, RULES, None, baseline_steps=12, guidance=5.0)
    recs = out.records
    assert [r.call for r in recs] == [1, 2, 3, 4, 5, 6, 7]  # round(0.7 * 12) = 8 points
    assert [r.layers for r in recs] == ["measure", "skip", "skip", "measure", "skip", "all", "all"]
    assert [r.head for r in recs] == ["compute", "compute", "store", "reuse", "reuse", "compute", "compute"]
    assert [r.guidance for r in recs] == [3.75] * 5 + [5.0] * 2
    assert [r.ffn_pruned for r in recs] == [False] * 7  # RULES prunes no FFN
    assert [r.trunk for r in recs] == [True, True, True, True, False, True, True]  # s = 4 reuses but measures
    assert [r.head_cached for r in recs] == [False, False, True, True, True, False, False]


def test_the_sampler_uses_each_plans_guidance_without_the_hybrid_phase(tiny_model: Showo2) -> None:
    """The paper's "w/o Hybrid Network": every call pruned and skipping to the end, but guidance keeps its own
    phases (g in the last int(0.3 * 7) = 2 calls); the latents are the plain sampler's with that list."""
    config = dataclasses.replace(RULES, hybrid_full_fraction=0.0)
    out = generate_images_flashu(tiny_model, PROMPTS, config, None, baseline_steps=12, guidance=5.0, seed=2)
    expected = [3.75] * 5 + [5.0] * 2
    assert [r.guidance for r in out.records] == expected
    assert [r.layers for r in out.records] == ["measure", "skip", "skip", "measure", "skip", "skip", "measure"]
    noise = draw_noise((len(PROMPTS), 16, *tiny_model.config.latent_size), 2)
    ref = euler_sample(velocity_for(tiny_model, config), noise, time_grid(8), expected)
    assert torch.equal(out.latents, ref)
    tied = euler_sample(velocity_for(tiny_model, config), noise, time_grid(8), [3.75] * 7)  # guidance tied to tau
    assert not torch.allclose(out.latents, tied, atol=1e-3)


def test_skip_set_is_the_lowest_importance_and_applies_from_the_next_call(tiny_model: Showo2) -> None:
    fn = velocity_for(tiny_model, RULES)
    xs, grid = states(tiny_model, 7)
    run_calls(fn, xs, grid, 7)
    recs = fn.records
    for s in (0, 3):  # measuring calls: nothing skipped, the new set from their own importances
        assert recs[s].layers == "measure" and recs[s].skipped == ()
        imp = recs[s].importance
        assert len(imp) == 4 and len(recs[s].skip_set) == 2
        assert recs[s].skip_set == tuple(sorted(sorted(range(4), key=lambda i: imp[i])[:2]))
    assert recs[1].skipped == recs[2].skipped == recs[0].skip_set
    assert recs[4].skipped == recs[3].skip_set
    assert recs[5].skipped == recs[6].skipped == ()  # full phase: every layer


def test_importance_and_skipping_seen_from_layer_hooks(tiny_model: Showo2) -> None:
    """importance_l = 1 - mean cos(in_l, out_l) over every row's image block; skipped layers never run."""
    seen: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []

    def hook(i: int):
        return lambda mod, args, out: seen[-1].append((i, args[0], out))

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(tiny_model.showo.model.layers)]
    try:
        fn = velocity_for(tiny_model, RULES)
        xs, grid = states(tiny_model, 7)
        for k in range(3):
            seen.append([])
            fn(xs[k], grid[k].expand(xs[k].shape[0]), k)
    finally:
        for h in handles:
            h.remove()
    batch, slot = fn.batch, tiny_model.config.image_slot_len
    expected = []
    for _, a, b in seen[0]:
        a, b = image_block(a, batch.offsets, slot), image_block(b, batch.offsets, slot)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (M, slot)
        expected.append(1 - cos.mean().item())
    assert fn.records[0].importance == pytest.approx(expected, abs=1e-6)
    assert [i for i, _, _ in seen[0]] == [0, 1, 2, 3]
    ran = [i for i in range(4) if i not in fn.records[0].skip_set]
    assert [i for i, _, _ in seen[1]] == ran and [i for i, _, _ in seen[2]] == ran


def test_choose_skip_set_ties_go_to_the_lower_index() -> None:
    assert choose_skip_set([0.5, 0.1, 0.1, 0.1, 0.9], 2) == (1, 2)
    assert choose_skip_set([0.3, 0.2, 0.1], 0) == ()
    assert choose_skip_set([0.3, 0.2, 0.1], 3) == (0, 1, 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5]), min_size=1, max_size=12), st.data())
def test_choose_skip_set_property(importance: list[float], data) -> None:
    count = data.draw(st.integers(0, len(importance)))
    chosen = choose_skip_set(importance, count)
    assert len(chosen) == count and list(chosen) == sorted(set(chosen))
    rest = [i for i in range(len(importance)) if i not in chosen]
    assert all((importance[c], c) < (importance[r], r) for c in chosen for r in rest)


@pytest.mark.parametrize("call", [4, 5])  # s = 4 reuses and measures, s = 5 reuses and skips
def test_reuse_calls_ignore_x(tiny_model: Showo2, call: int) -> None:
    config = dataclasses.replace(RULES, hybrid_full_fraction=0.0)  # s = 4, 5 reuse the head stored at s = 3
    a, b = velocity_for(tiny_model, config), velocity_for(tiny_model, config)
    xs, grid = states(tiny_model, 7)
    run_calls(a, xs, grid, call - 1)
    run_calls(b, xs, grid, call - 1)
    t = grid[call - 1].expand(xs[0].shape[0])
    va = a(xs[call - 1], t, call - 1)
    vb = b(2.0 * xs[call - 1] + 1.0, t, call - 1)
    assert a.records[-1].head == "reuse"
    assert torch.equal(va, vb)
    assert a.records[-1].trunk == (call == 4)
    if call == 4:  # the trunk ran only to measure: x changes the importances, never the velocity
        assert a.records[-1].importance != b.records[-1].importance


def test_plain_reuse_call_runs_no_trunk(tiny_model: Showo2) -> None:
    config = dataclasses.replace(RULES, hybrid_full_fraction=0.0)
    fn = velocity_for(tiny_model, config)
    xs, grid = states(tiny_model, 7)
    run_calls(fn, xs, grid, 4)
    calls = []
    handle = tiny_model.image_embedder_und.register_forward_hook(lambda *a: calls.append(1))
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in tiny_model.diffusion_head_a]
    try:
        fn(xs[4], grid[4].expand(xs[4].shape[0]), 4)  # s = 5: skip + reuse
    finally:
        for h in (handle, *hooks):
            h.remove()
    assert fn.records[-1].head == "reuse" and not fn.records[-1].trunk and calls == []


def test_head_cache_is_cleared_in_the_full_phase(tiny_model: Showo2) -> None:
    fn = velocity_for(tiny_model, RULES)
    xs, grid = states(tiny_model, 7)
    run_calls(fn, xs, grid, 5)
    assert fn.head_cache is not None and fn.records[-1].head == "reuse"
    v = fn(xs[5], grid[5].expand(xs[5].shape[0]), 5)  # s = 6: first full-phase call
    assert fn.head_cache is None and fn.records[-1].head == "compute" and not fn.records[-1].ffn_pruned
    # a full-phase call depends on x again
    b = velocity_for(tiny_model, RULES)
    run_calls(b, xs, grid, 5)
    assert not torch.equal(v, b(xs[5] + 1.0, grid[5].expand(xs[5].shape[0]), 5))


def test_sliced_ffn_equals_masked_ffn_inside_the_pipeline(tiny_model: Showo2) -> None:
    config = dataclasses.replace(RULES, ffn_prune_ratio=0.25, ffn_width_multiple=1, hybrid_full_fraction=0.0)
    sliced, layout, masked = pruned_models(tiny_model, config.kept_ffn_width(tiny_model.config.intermediate_size))
    a = generate_images_flashu(sliced, PROMPTS, config, layout, baseline_steps=12, guidance=5.0)
    unpruned = dataclasses.replace(config, ffn_prune_ratio=0.0)
    b = generate_images_flashu(masked, PROMPTS, unpruned, None, baseline_steps=12, guidance=5.0)
    assert all(r.ffn_pruned for r in a.records) and not any(r.ffn_pruned for r in b.records)
    assert [r.skip_set for r in a.records] == [r.skip_set for r in b.records]
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
    # and pruning changes the output (the test would be vacuous otherwise)
    c = generate_images_flashu(tiny_model, PROMPTS, unpruned, None, baseline_steps=12, guidance=5.0)
    assert not torch.allclose(a.latents, c.latents, atol=1e-3)


def test_bad_inputs_are_rejected(tiny_model: Showo2) -> None:
    batch = build_gen_batch(tiny_model.config, PROMPTS)
    with pytest.raises(ValueError, match="task"):
        FlashUGenVelocity(tiny_model, batch, FlashUConfig.for_task("und"), None, 5, 5.0)
    with pytest.raises(ValueError, match="ffn_prune_ratio"):
        FlashUGenVelocity(tiny_model, batch, FlashUConfig.for_task("gen"), None, 5, 5.0)
    _, layout, _ = pruned_models(tiny_model, 100)
    with pytest.raises(ValueError, match="keeps 100"):
        FlashUGenVelocity(tiny_model, batch, FlashUConfig.for_task("gen"), layout, 5, 5.0)
    fn = velocity_for(tiny_model, RULES)
    xs, grid = states(tiny_model, 7)
    with pytest.raises(RuntimeError, match="expects call 0"):
        fn(xs[1], grid[1].expand(xs[1].shape[0]), 1)


WIDTH_CONFIG = dict(ffn_prune_ratio=0.25, ffn_width_multiple=1)  # 256 -> 192 kept in every example


@settings(max_examples=25, deadline=None)
@given(
    skip_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    skip_interval=st.integers(0, 4),
    cache=st.integers(0, 4),
    tau=st.sampled_from([0.0, 0.3, 1.0]),
    baseline_steps=st.integers(3, 9),
    prune=st.booleans(),
)
def test_random_configs_keep_the_invariants(tiny_sliced, skip_ratio, skip_interval, cache, tau, baseline_steps, prune):
    sliced, layout = tiny_sliced
    config = FlashUConfig.for_task(
        "gen",
        **WIDTH_CONFIG,
        skip_ratio=skip_ratio,
        skip_interval=skip_interval,
        head_cache_interval=cache,
        hybrid_full_fraction=tau,
        step_fraction=1.0,
    )
    if not prune:
        config = dataclasses.replace(config, ffn_prune_ratio=0.0)
    out = generate_images_flashu(
        sliced, PROMPTS[:1], config, layout if prune else None, baseline_steps=baseline_steps, guidance=5.0
    )
    assert torch.isfinite(out.latents).all() and len(out.records) == baseline_steps - 1
    n_skip = config.num_skipped_layers(4)
    current: tuple[int, ...] = ()
    for r in out.records:
        assert r.trunk == (r.head != "reuse" or r.layers == "measure")
        assert (r.importance is not None) == (r.layers == "measure")
        assert r.skipped == (current if r.layers == "skip" else ())
        if r.layers == "measure":
            assert r.skip_set == choose_skip_set(r.importance, n_skip) and len(r.skip_set) == n_skip
        current = r.skip_set


@pytest.fixture(scope="module")
def tiny_sliced(tiny_model: Showo2) -> tuple[Showo2, FFNLayout]:
    sliced, layout, _ = pruned_models(tiny_model, 192)
    return sliced, layout
