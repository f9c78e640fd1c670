"""passes.layer_skipping against its eager twin (the understanding decoder with skipped layers as the identity, and
``layer_importance`` of each layer's last row); passes.ffn_slicing.slice_ffn_inputs over a partitioned root."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flashu_fx.flashu_gen import layer_importance
from flashu_fx.layout import build_mmu_prompt, mark_length_dynamic
from flashu_fx.tokenizer import get_tokenizer
from flashu_fx.und_cache import UndCache
from passes.ffn_slicing import slice_ffn_inputs
from passes.layer_skipping import layer_boundaries, measure_layer_importance, skip_layers
from passes.partition import partition_showo2_graph


class Identity(nn.Module):
    """A decoder layer that passes its input through (and writes no K/V)."""

    def forward(self, x, *args, **kwargs):
        return x


def prefill_inputs(model, seed: int = 0):
    cfg = model.config
    prompt = build_mmu_prompt(cfg, get_tokenizer(cfg), [5, 6, 7])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    tokens, mask = prompt.tokens.clone(), prompt.mask(cfg)
    mark_length_dynamic(tokens, mask)
    return tokens, latents, None, torch.tensor([prompt.offset]), mask


def run_prefill(model, inputs, transform=None):
    """(logits, extra outputs, captured graph) of the prefill compiled with ``transform`` applied to its graph."""
    seen: dict = {"extra": 0}

    def backend(gm, example_inputs):
        seen["gm"] = gm
        if transform is not None:
            seen["extra"] = transform(gm)

        def call(*args):
            out = gm(*args)
            if seen["extra"]:
                seen["extras"], out = out[len(out) - 1 :], out[: len(out) - 1]
            return out

        return call

    torch._dynamo.reset()
    with torch.no_grad():
        cache = UndCache.for_model(model, 128, torch.float32, "cpu")
        logits = torch.compile(model, backend=backend)(*inputs, cache=cache).logits
    torch._dynamo.reset()
    return logits, seen.get("extras"), seen["gm"]


def eager_prefill(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs, cache=UndCache.for_model(model, 128, torch.float32, "cpu")).logits


@settings(deadline=None, max_examples=6)
@given(layers=st.sets(st.integers(0, 3), min_size=1, max_size=3), seed=st.integers(0, 50))
def test_skipped_layers_are_the_identity(tiny_model, layers: set[int], seed: int) -> None:
    inputs = prefill_inputs(tiny_model, seed)
    counts = []

    def skip(gm) -> int:
        counts.append(skip_layers(gm, tuple(layers)))
        return 0  # no extra output

    got, _, _ = run_prefill(tiny_model, inputs, skip)
    assert counts == [len(layers)]
    twin = copy.deepcopy(tiny_model)
    for i in layers:
        twin.showo.model.layers[i] = Identity()
    want = eager_prefill(twin, inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, eager_prefill(tiny_model, inputs), atol=1e-4)  # skipping changed the result


def test_measured_importance_is_layer_importance_of_the_last_row(tiny_model) -> None:
    inputs = prefill_inputs(tiny_model)
    counts: list[int] = []

    def measure(gm) -> int:
        counts.append(measure_layer_importance(gm))
        return counts[-1]

    logits, extras, _ = run_prefill(tiny_model, inputs, measure)
    assert counts == [tiny_model.config.num_layers]
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append(layer_importance(args[0][:, -1],
                                                                                         out[:, -1])))
             for layer in tiny_model.showo.model.layers]
    try:
        want_logits = eager_prefill(tiny_model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(extras[0], torch.stack(seen), atol=1e-6)
    assert torch.allclose(logits, want_logits, atol=1e-6)  # measuring changes nothing else


def test_a_layer_without_a_boundary_stays_with_a_warning(tiny_model) -> None:
    _, _, gm = run_prefill(tiny_model, prefill_inputs(tiny_model))
    boundaries, reasons = layer_boundaries(gm)
    assert sorted(boundaries) == list(range(tiny_model.config.num_layers)) and not reasons
    with pytest.warns(UserWarning, match="layer 7 stays"):
        assert skip_layers(gm, (7,)) == 0


def test_ffn_inputs_are_sliced_in_the_root(tiny_model) -> None:
    inputs = prefill_inputs(tiny_model)
    _, _, gm = run_prefill(tiny_model, inputs)
    graph = partition_showo2_graph(copy.deepcopy(gm))
    ranges = [(8, 200), None, (0, 192), (64, 256)]
    assert slice_ffn_inputs(graph.root, ranges) == 3  # layer 1 keeps its whole FFN
    sliced = [n for n in graph.root.graph.nodes if n.meta.get("derived_by") == "slice_ffn_inputs"]
    assert len(sliced) == 9 and all(n.target.__name__ == "getitem" for n in sliced)


def test_each_measurement_is_a_part_of_its_own_and_the_layers_stay_plain(tiny_model) -> None:
    """Layer i's measurement is part "importance.i", right after layer.i (one artifact for every layer's); their
    stack is "importance.L" after the final part. The layer and final parts are those of the graph unmeasured, so
    measuring compiles no layer or final form of its own."""
    _, _, gm = run_prefill(tiny_model, prefill_inputs(tiny_model))
    plain = partition_showo2_graph(copy.deepcopy(gm))
    work = copy.deepcopy(gm)
    layers = tiny_model.config.num_layers
    assert measure_layer_importance(work) == layers
    graph = partition_showo2_graph(work)
    names = [p.name for p in graph.parts]
    for i in range(layers):
        assert names.index(f"importance.{i}") == names.index(f"layer.{i}") + 1
    assert names[-1] == f"importance.{layers}" and names[-2] == "final"
    signature = {p.name: p.signature for p in graph.parts}
    assert {signature[f"importance.{i}"] for i in range(layers)} == {signature["importance.0"]}
    assert {p.name: p.signature for p in plain.parts} == {n: s for n, s in signature.items()
                                                          if not n.startswith("importance.")}
    measured = {p.name: sum(n.op == "call_function" and n.meta.get("derived_by") == "measure_layer_importance"
                            for n in p.module.graph.nodes) for p in graph.parts}
    assert measured == {**dict.fromkeys(signature, 0), **{f"importance.{i}": 1 for i in range(layers + 1)}}
