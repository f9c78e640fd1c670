"""passes.prefix_hoisting against its eager twin (the captured forward over the whole batch): the slot graph, fed the
prefix graph's keys and values, gives the same velocity from the image slot's positions alone."""

from __future__ import annotations

import copy

import pytest
import torch
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.layout import build_gen_batch, mark_length_dynamic
from flashu_fx.masks import omni_mask
from passes.head_cache import expose_head_output
from passes.layer_skipping import measure_layer_importance
from passes.prefix_hoisting import (
    MASK,
    OFFSETS,
    TOKENS,
    attend_slots_only,
    hoist_prefix_kv,
    prefix_is_causal,
    slot_mask,
    slot_positions,
)


def batch_inputs(model, prompts: list[list[int]], seed: int = 0, t: float = 0.3):
    cfg = model.config
    batch = build_gen_batch(cfg, prompts, guided=True)
    cut = batch.through_last_slot(cfg.image_slot_len, 1)  # trailing positions in the shorter rows, as served
    m = cut.tokens.shape[0]
    latents = torch.randn(m, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))
    return cut.tokens.contiguous(), latents, torch.full((m,), t), cut.offsets, cut.mask.contiguous()


@pytest.fixture(scope="module")
def captured(tiny_model):
    """The forward captured with its batch length a symbol (as the graph executor captures it)."""
    tokens, latents, t, offsets, mask = batch_inputs(tiny_model, [[5, 6, 7], [9] * 12])
    mark_length_dynamic(tokens, mask)
    with torch.no_grad():
        return capture(tiny_model, tokens, latents, t, offsets, mask, False)


def call_inputs(captured, tokens, latents, t, offsets, mask) -> list:
    """The captured graph's inputs for this batch: its own tensors, the length as its size, the lifted weights."""
    gm, example_inputs = captured
    own = {TOKENS: tokens, "l_latents_": latents, "l_t_": t, OFFSETS: offsets, MASK: mask}
    inputs = []
    for node, example in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs, strict=True):
        if node.name in own:
            inputs.append(own[node.name])
        elif isinstance(node.meta.get("example_value"), torch.SymInt):
            inputs.append(tokens.shape[1])
        else:
            inputs.append(example)
    return inputs


def prefix_inputs(inputs: list, gm, slot_len: int) -> list:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    tokens = inputs[names.index(TOKENS)]
    length, cut = tokens.shape[1], tokens.shape[1] - slot_len
    out = [cut if isinstance(x, int) and not isinstance(x, bool) and x == length else x for x in inputs]
    out[names.index(TOKENS)] = tokens[:, :cut].contiguous()
    out[names.index(MASK)] = inputs[names.index(MASK)][:, :, :cut, :cut].contiguous()
    return out


def test_every_masked_attention_is_hoisted(tiny_model, captured) -> None:
    cfg = tiny_model.config
    prefix, slot = copy.deepcopy(captured[0]), copy.deepcopy(captured[0])
    names = hoist_prefix_kv(prefix)
    assert len(names) == cfg.num_layers + cfg.head_num_layers  # every decoder layer and head block
    assert attend_slots_only(slot, cfg.image_slot_len) == names
    inputs = [n.name for n in slot.graph.nodes if n.op == "placeholder"]
    assert inputs[-2 * len(names):] == [f"prefix_{kv}_{name}" for name in names for kv in "kv"]
    assert not [n for n in slot.graph.nodes if n.op == "call_method" and n.target == "scatter"]  # no slot write


@settings(deadline=None, max_examples=6)
@given(lengths=st.lists(st.integers(1, 20), min_size=2, max_size=2), seed=st.integers(0, 50),
       t=st.floats(0.05, 0.95))
def test_the_slot_graph_computes_the_whole_forward(tiny_model, captured, lengths, seed, t) -> None:
    slot_len = tiny_model.config.image_slot_len
    prompts = [[(7 * i + n) % 200 + 1 for i in range(n)] for n in lengths]
    batch = batch_inputs(tiny_model, prompts, seed, t)
    inputs = call_inputs(captured, *batch)
    gm = captured[0]
    prefix, slot = copy.deepcopy(gm), copy.deepcopy(gm)
    hoist_prefix_kv(prefix)
    attend_slots_only(slot, slot_len)
    with torch.no_grad():
        want = gm(*inputs)[0]
        kv = prefix(*prefix_inputs(inputs, gm, slot_len))
        got = slot(*inputs, *kv)[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_measured_importance_and_the_stored_head_output_live_in_the_slot(tiny_model, captured) -> None:
    slot_len = tiny_model.config.image_slot_len
    batch = batch_inputs(tiny_model, [[3, 4], [8] * 15])  # the captured batch: two prompts, guided
    inputs = call_inputs(captured, *batch)
    gm = captured[0]
    full = copy.deepcopy(gm)
    measure_layer_importance(full, (OFFSETS, slot_len))
    expose_head_output(full)
    slot, prefix = copy.deepcopy(full), copy.deepcopy(gm)
    assert attend_slots_only(slot, slot_len)
    hoist_prefix_kv(prefix)
    with torch.no_grad():
        _, importance, head_out = full(*inputs)
        _, slot_importance, slot_head = slot(*inputs, *prefix(*prefix_inputs(inputs, gm, slot_len)))
    assert torch.allclose(slot_importance, importance, atol=1e-6)
    offsets = batch[3]
    assert slot_head.shape[1] == slot_len  # (M, S, D): the slot's rows of the full head output
    rows = torch.stack([head_out[m, int(o):int(o) + slot_len] for m, o in enumerate(offsets)])
    assert torch.allclose(slot_head, rows, atol=1e-6)


def test_a_graph_captured_with_a_fixed_length_stays_exact(tiny_model) -> None:
    with torch.no_grad():
        gm, _ = capture(tiny_model, *batch_inputs(tiny_model, [[5, 6, 7]]), False)
    before = gm.code
    with pytest.warns(UserWarning, match="prefix_hoisting: the batch length .* is not a symbol"):
        assert attend_slots_only(gm, tiny_model.config.image_slot_len) is None
    assert gm.code == before


def test_a_graph_without_a_slot_write_stays_exact() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    before = gm.code
    with pytest.warns(UserWarning, match="prefix_hoisting: no slot write"):
        assert hoist_prefix_kv(gm) == []
    assert gm.code == before


@settings(deadline=None, max_examples=20)
@given(offsets=st.lists(st.integers(1, 9), min_size=1, max_size=3), slot_len=st.integers(1, 6),
       trailing=st.integers(0, 3), hidden=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=4))
def test_the_slot_mask_is_the_masks_slot_rows_with_foreign_prefix_columns_blocked(offsets, slot_len, trailing,
                                                                                  hidden) -> None:
    """Any mask: its slot rows each their own (here with keys hidden from some queries)."""
    offsets_t = torch.tensor(offsets)
    length = max(offsets) + slot_len + trailing
    mask = omni_mask(offsets_t, length, slot_len)
    for query, key in hidden:
        mask[0, 0, query % length, key % length] = False
    got = slot_mask(mask, slot_positions(offsets_t, slot_len), offsets_t)
    prefix = length - slot_len
    for m, o in enumerate(offsets):
        rows = list(range(o, o + slot_len))
        want = torch.cat([mask[m, 0][rows][:, :prefix] & (torch.arange(prefix) < o), mask[m, 0][rows][:, rows]], 1)
        assert torch.equal(got[m, 0], want)


def test_the_omni_mask_keeps_the_prompt_causal_and_a_mask_that_looks_ahead_does_not() -> None:
    offsets = torch.tensor([4, 2])
    mask = omni_mask(offsets, 12, 5)
    assert prefix_is_causal(mask, offsets)
    mask[1, 0, 1, 3] = True  # a prompt position of row 1 attends to its slot
    assert not prefix_is_causal(mask, offsets)
