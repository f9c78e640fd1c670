"""passes.merge_projections against its eager twin (the separate projections), on Dynamo-captured layers."""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import shutil

import pytest
import torch
import torch.nn.functional as F
from captured import capture
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import fx

from flashu_fx.config import get_config
from flashu_fx.layers import rope_cos_sin, rope_inv_freq
from flashu_fx.masks import omni_mask
from flashu_fx.projection_layout import colocate_projections
from flashu_fx.qwen2 import Qwen2DecoderLayer
from passes.ffn_slicing import slice_ffn
from passes.merge_projections import adjacent, gate_up_of_rows, merge_projections, up_offset_of_rows


def num_linears(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes)


def llm_layer_inputs(model, seq: int):
    return llm_layer_inputs_for(model.config, seq)


def llm_layer_inputs_for(cfg, seq: int):
    x = torch.randn(2, seq, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(seq), rope_inv_freq(cfg.head_dim, cfg.rope_theta), x.dtype)
    return x, cos, sin, omni_mask(torch.tensor([0, 1]), seq, 0)


def test_colocation_keeps_values_shapes_and_strides(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    before = {k: (v.clone(), v.shape, v.stride()) for k, v in model.state_dict().items()}
    separate = len({p.untyped_storage().data_ptr() for p in model.parameters()})
    assert colocate_projections(model)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Storages saved per LLM layer: q/k/v weights 2, biases 2, gate/up 1; SigLIP layer 2 + 2; head block 2 + 1.
    cfg = model.config
    assert separate - len(storages) == 5 * cfg.num_layers + 4 * cfg.und_num_layers + 3 * cfg.head_num_layers
    assert colocate_projections(model)  # idempotent: nothing moves again
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages
    for k, v in model.state_dict().items():
        value, shape, stride = before[k]
        assert v.shape == shape and v.stride() == stride
        assert torch.equal(v, value), k
    attn = model.showo.model.layers[0].self_attn
    assert adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert adjacent([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])


@settings(deadline=None, max_examples=5)
@given(seq=st.integers(1, 9), layer_index=st.integers(0, 1))
def test_merged_llm_layer_equals_eager(tiny_model, seq: int, layer_index: int) -> None:
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    layer = model.showo.model.layers[layer_index]
    args = llm_layer_inputs(model, seq)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    linears = num_linears(gm)
    assert merge_projections(gm) == 2  # q/k/v and gate/up
    assert num_linears(gm) == linears - 3
    torch.testing.assert_close(gm(*inputs)[0], layer(*args), rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=4)
@given(seq=st.integers(1, 7))
def test_merged_head_block_equals_eager(tiny_model, seq: int) -> None:
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    block = model.diffusion_head_a[0]
    cfg = model.config
    x = torch.randn(2, seq, cfg.head_hidden_size)
    c = torch.randn(2, cfg.head_hidden_size)
    in_slot = torch.rand(2, seq, 1) > 0.3
    cos, sin = rope_cos_sin(torch.arange(seq), rope_inv_freq(cfg.head_dim, cfg.rope_theta), x.dtype)
    mask = omni_mask(torch.tensor([0, 0]), seq, 0)
    gm, inputs = capture(lambda mod, *a: mod(*a), block, x, c, in_slot, cos, sin, mask)
    assert merge_projections(gm) == 2
    torch.testing.assert_close(gm(*inputs)[0], block(x, c, in_slot, cos, sin, mask), rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=4)
@given(lo=st.integers(0, 100), width=st.integers(1, 40))
def test_sliced_ffn_keeps_gate_up_separate_and_merges_qkv(tiny_model, lo: int, width: int) -> None:
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    layer = model.showo.model.layers[0]
    args = llm_layer_inputs(model, 4)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    assert slice_ffn(gm, lo, lo + width) == 1
    assert merge_projections(gm) == 1  # gate[lo:hi] and up[lo:hi] are not adjacent: only q/k/v merge
    ref = layer(*args, ffn_ranges=((lo, lo + width),))
    torch.testing.assert_close(gm(*inputs)[0], ref, rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=6)
@given(lo=st.integers(0, 100), width=st.integers(1, 40), seq=st.integers(1, 6))
def test_sliced_ffn_gate_up_merge_into_one_batched_matmul(tiny_model, lo: int, width: int, seq: int) -> None:
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    layer = model.showo.model.layers[1]
    args = llm_layer_inputs(model, seq)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    linears = num_linears(gm)
    assert slice_ffn(gm, lo, lo + width) == 1
    assert merge_projections(gm, ffn_slices=True) == 2
    assert num_linears(gm) == linears - 4  # q/k/v -> one linear; gate and up -> one bmm
    assert sum(n.target is gate_up_of_rows for n in gm.graph.nodes) == 1
    assert_views_of_graph_inputs_only(gm)
    ref = layer(*args, ffn_ranges=((lo, lo + width),))
    torch.testing.assert_close(gm(*inputs)[0], ref, rtol=1e-5, atol=1e-6)


def assert_views_of_graph_inputs_only(gm: fx.GraphModule) -> None:
    """Every strided view the pass writes is taken of a graph input, never of a view taken in the graph (torch
    2.11's inductor drops such a view's offset under ``as_strided``), and no slice it replaced is left behind."""
    for node in gm.graph.nodes:
        viewed = {torch.as_strided: 0, gate_up_of_rows: 1}.get(node.target)
        if viewed is not None:
            assert node.args[viewed].op == "placeholder", node.format_node()
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
            assert node.users, f"{node.format_node()} left without users"


def test_rows_sliced_in_the_graph_of_a_non_input_stay_separate(tiny_model) -> None:
    """Gate rows sliced from something other than a graph input (here, the weight times one) have no input to
    take the strided view of: the gate and up linears stay separate and the result stays exact."""
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    layer = model.showo.model.layers[0]
    args = llm_layer_inputs(model, 3)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    assert slice_ffn(gm, 8, 72) == 1
    gate_slice = next(n for n in gm.graph.nodes if n.target is operator.getitem and isinstance(n.args[1], slice)
                      and n.args[0].op == "placeholder" and "gate" in n.args[0].name)
    with gm.graph.inserting_before(gate_slice):
        scaled = gm.graph.call_function(operator.mul, (gate_slice.args[0], 1.0))
    gate_slice.replace_input_with(gate_slice.args[0], scaled)
    gm.recompile()
    assert merge_projections(gm, ffn_slices=True) == 1  # q/k/v only
    assert not any(n.target is gate_up_of_rows for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs)[0], layer(*args, ffn_ranges=((8, 72),)), rtol=1e-5, atol=1e-6)


def test_sliced_ffn_of_separate_weights_stays_two_matmuls(tiny_model) -> None:
    layer = copy.deepcopy(tiny_model.showo.model.layers[0])  # separate storages per parameter
    args = llm_layer_inputs(tiny_model, 3)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    assert slice_ffn(gm, 8, 72) == 1
    assert merge_projections(gm, ffn_slices=True) == 0
    assert not any(n.target is gate_up_of_rows for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs)[0], layer(*args, ffn_ranges=((8, 72),)), rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(neurons=st.integers(1, 24), hidden=st.integers(1, 12), lead=st.lists(st.integers(1, 4), min_size=1,
       max_size=3), data=st.data())
def test_gate_up_of_rows_equals_two_linears(neurons: int, hidden: int, lead: list[int], data) -> None:
    lo = data.draw(st.integers(0, neurons - 1))
    hi = data.draw(st.integers(lo + 1, neurons))
    buffer = torch.randn(2 * neurons * hidden + 5)[5:]  # a storage offset, as a colocated buffer may have
    w_gate, w_up = buffer[: neurons * hidden].view(neurons, hidden), buffer[neurons * hidden :].view(neurons, hidden)
    assert up_offset_of_rows(w_gate[lo:hi], w_up[lo:hi]) == neurons * hidden
    x = torch.randn(*lead, hidden)
    for gate, up in (gate_up_of_rows(x, w_gate[lo:hi], neurons * hidden),  # a block of rows, all of it
                     gate_up_of_rows(x, w_gate, neurons * hidden, lo, hi)):  # the whole weight, rows lo:hi
        torch.testing.assert_close(gate, F.linear(x, w_gate[lo:hi]))
        torch.testing.assert_close(up, F.linear(x, w_up[lo:hi]))


def test_rows_of_other_buffers_or_layouts_are_not_one_block_pair() -> None:
    buffer = torch.randn(2, 6, 4)
    gate, up = buffer[0], buffer[1]
    assert up_offset_of_rows(gate[1:3], up[1:3]) == 24
    assert up_offset_of_rows(up[1:3], gate[1:3]) is None  # up before gate
    assert up_offset_of_rows(gate[1:3], up[1:4]) is None  # different ranges
    assert up_offset_of_rows(gate[1:3], torch.randn(2, 4)) is None  # another storage
    assert up_offset_of_rows(gate[:, :2], up[:, :2]) is None  # not contiguous rows
    assert up_offset_of_rows(gate[1:3], up[1:3].double()) is None


@settings(deadline=None, max_examples=6)
@given(lo=st.integers(0, 100), width=st.integers(1, 40), seq=st.integers(1, 6))
def test_ffn_slices_fed_as_views_merge_into_one_batched_matmul(tiny_model, lo: int, width: int, seq: int) -> None:
    """The captured-graph executors slice the FFN in a partition's root and feed each layer's part the views
    (``slice_ffn_inputs``): the part's gate and up weights are placeholders whose example values are row blocks."""
    model = copy.deepcopy(tiny_model)
    colocate_projections(model)
    layer = model.showo.model.layers[0]
    mlp = layer.mlp
    args = llm_layer_inputs(model, seq)
    ranges = ((lo, lo + width),)
    sliced = {"gate_proj": mlp.gate_proj.weight[lo:lo + width], "up_proj": mlp.up_proj.weight[lo:lo + width],
              "down_proj": mlp.down_proj.weight[:, lo:lo + width]}

    def run(mod, x, cos, sin, mask, gate, up, down):
        weights = {"gate_proj": gate, "up_proj": up, "down_proj": down}
        return torch.func.functional_call(mod, {f"mlp.{k}.weight": v for k, v in weights.items()},
                                          (x, cos, sin, mask))

    gm, inputs = capture(run, layer, *args, *sliced.values())
    linears = num_linears(gm)
    assert merge_projections(gm, ffn_slices=True) == 2
    assert num_linears(gm) == linears - 4  # q/k/v -> one linear; gate and up -> one bmm
    assert sum(n.target is gate_up_of_rows for n in gm.graph.nodes) == 1
    assert_views_of_graph_inputs_only(gm)
    torch.testing.assert_close(gm(*inputs)[0], layer(*args, ffn_ranges=ranges), rtol=1e-5, atol=1e-6)


def test_groups_that_cannot_share_a_buffer_are_reported(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    attn = model.showo.model.layers[1].self_attn
    attn.k_proj.weight.data = attn.k_proj.weight.data.double()  # a sibling of another dtype
    assert not colocate_projections(model)
    assert not adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert attn.k_proj.weight.dtype == torch.float64  # left as it was
    other = model.showo.model.layers[0].self_attn
    assert adjacent([other.q_proj.weight, other.k_proj.weight, other.v_proj.weight])


def test_weights_not_colocated_are_left_separate_with_a_warning(tiny_model, caplog) -> None:
    layer = copy.deepcopy(tiny_model.showo.model.layers[0])  # separate storages per parameter
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *llm_layer_inputs(tiny_model, 3))
    before = gm.code
    with caplog.at_level(logging.WARNING):
        assert merge_projections(gm) == 0
    assert gm.code == before
    assert "not adjacent" in caplog.text


def _has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler")),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("ffn_range", [None, (37, 201)])
def test_inductor_reads_the_spanning_view_of_every_layer(tiny_model, device: str, ffn_range) -> None:
    """One inductor artifact, traced on layer 0, run on every layer: the strided views must follow the inputs
    (for an FFN range, the batched view of both row blocks)."""
    from torch._inductor.compile_fx import compile_fx

    model = copy.deepcopy(tiny_model).to(device)
    colocate_projections(model)
    args = [a.to(device) for a in llm_layer_inputs(model, 5)]

    def backend(gm, example_inputs):
        if ffn_range is not None:
            assert slice_ffn(gm, *ffn_range) == 1
        assert merge_projections(gm, ffn_slices=True) == 2
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda mod, *a: mod(*a), backend=backend, fullgraph=True)
    ranges = None if ffn_range is None else (ffn_range,)
    with torch.no_grad():
        for layer in model.showo.model.layers:
            torch.testing.assert_close(compiled(layer, *args), layer(*args, ffn_ranges=ranges), rtol=1e-4, atol=1e-5)


@settings(deadline=None, max_examples=6)
@given(kv=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([4, 8, 16]),
       inter=st.integers(3, 40), seq=st.integers(1, 6), ffn_range=st.booleans(), ffn_slices=st.booleans())
@example(kv=2, groups=3, head_dim=16, inter=3, seq=1, ffn_range=False, ffn_slices=False)  # hidden = head width
def test_merge_on_random_layer_shapes(kv: int, groups: int, head_dim: int, inter: int, seq: int,
                                      ffn_range: bool, ffn_slices: bool) -> None:
    """Random GQA layouts and widths: the merged (and, for a range, sliced) layer equals the eager layer."""
    hidden = kv * groups * head_dim
    # The config rejects hidden_size == head_hidden_size (not a Show-o2 layout); only the LLM layer is built here.
    cfg = dataclasses.replace(get_config("tiny"), hidden_size=hidden, num_heads=kv * groups, num_kv_heads=kv,
                              head_dim=head_dim, intermediate_size=inter, head_hidden_size=2 * hidden)
    layer = Qwen2DecoderLayer(cfg).eval()
    for p in layer.parameters():  # non-degenerate: RMSNorm weights away from 1, every bias non-zero
        torch.nn.init.normal_(p, std=0.3)
    assert colocate_projections(layer)
    args = llm_layer_inputs_for(cfg, seq)
    gm, inputs = capture(lambda mod, *a: mod(*a), layer, *args)
    lo, hi = (inter // 3, inter // 3 + max(1, inter // 2)) if ffn_range else (0, inter)
    if ffn_range:
        assert slice_ffn(gm, lo, hi) == 1
    assert merge_projections(gm, ffn_slices=ffn_slices) == (1 if ffn_range and not ffn_slices else 2)
    ref = layer(*args, ffn_ranges=((lo, hi),) if ffn_range else None)
    torch.testing.assert_close(gm(*inputs)[0], ref, rtol=1e-5, atol=1e-5)
