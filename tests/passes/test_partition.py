"""passes.partition against its eager twin (the captured Show-o2 forward it splits): the parts replay the graph
exactly, come from it node by node, and structurally identical parts share one compiled artifact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st
from model_edits import scale_mlp

from flashu_fx.layout import build_gen_batch
from flashu_fx.projection_layout import colocate_projections
from passes.graph_utils import DERIVED_BY, SOURCE
from passes.merge_projections import merge_projections
from passes.partition import compile_parts, partition_showo2_graph

PARTS = ["embed", "siglip.0", "siglip.1", "fuse", "layer.0", "layer.1", "layer.2", "layer.3", "head_in",
         "head_block.0", "head_block.1", "final"]


def forward_inputs(model, seed: int = 0, t: float = 0.3):
    cfg = model.config
    batch = build_gen_batch(cfg, [[5, 6, 7]], guided=True)
    latents = torch.randn(2, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))
    return batch.tokens, latents, torch.full((2,), t), batch.offsets, batch.mask, False  # no logits


@pytest.fixture(scope="module")
def captured(tiny_model):
    with torch.no_grad():
        return capture(tiny_model, *forward_inputs(tiny_model))


def compute_nodes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def test_parts_follow_the_forward(captured) -> None:
    gm, _ = captured
    graph = partition_showo2_graph(gm)
    assert [p.name for p in graph.parts] == PARTS
    groups = sorted(graph.groups().values())
    assert groups == sorted([["embed"], ["siglip.0", "siglip.1"], ["fuse"],
                             ["layer.0", "layer.1", "layer.2", "layer.3"], ["head_in"],
                             ["head_block.0", "head_block.1"], ["final"]])


def test_every_part_node_comes_from_the_captured_graph_once(captured) -> None:
    gm, _ = captured
    graph = partition_showo2_graph(gm)
    sources = [s for part in graph.parts for s in part.sources]
    assert sorted(sources) == sorted(compute_nodes(gm))  # each captured node in exactly one part
    layer = next(p for p in graph.parts if p.name == "layer.0").module
    ops = {n.target for n in layer.graph.nodes if n.op == "call_function"}
    assert F.scaled_dot_product_attention in ops and F.linear in ops
    assert all(SOURCE in n.meta for n in layer.graph.nodes if n.op == "call_function")
    assert graph.captured_nodes == compute_nodes(gm)


def test_provenance_survives_a_pass(tiny_model) -> None:
    """merge_projections rewrites a layer part: its merged product computes the q, k and v it replaced."""
    model = copy.deepcopy(tiny_model)
    assert colocate_projections(model)
    with torch.no_grad():
        gm, _ = capture(model, *forward_inputs(model))
    graph = partition_showo2_graph(gm)
    layer = next(p for p in graph.parts if p.name == "layer.0")
    before = layer.sources
    assert merge_projections(layer.module) == 2  # q/k/v and gate/up
    assert layer.sources == before
    merged = [n for n in layer.module.graph.nodes if n.meta.get(DERIVED_BY) == "merge_projections"
              and n.target is F.linear]
    assert len(merged) == 2 and all(len(n.meta[SOURCE]) in (2, 3) for n in merged)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.floats(0.01, 0.99))
def test_parts_replay_the_captured_graph_exactly(captured, tiny_model, seed, t) -> None:
    gm, _ = captured
    graph = partition_showo2_graph(gm)
    tokens, latents, times, offsets, mask, _ = forward_inputs(tiny_model, seed, t)
    # Dynamo's graph takes the weights first, then the user's inputs, in the order the example inputs had them.
    _, example = captured
    inputs = list(example)
    for user, value in zip(_user_input_positions(gm), (tokens, latents, times, offsets, mask), strict=True):
        inputs[user] = value
    with torch.no_grad():
        whole, parts = gm(*inputs), graph.root(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts, strict=True))


def _user_input_positions(gm) -> list[int]:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [next(i for i, name in enumerate(names) if name.endswith(f"_{user}_") or name == f"l_{user}_")
            for user in ("tokens", "latents", "t", "offsets", "mask")]


def test_compile_parts_compiles_once_per_structure(captured) -> None:
    gm, example = captured
    graph = partition_showo2_graph(gm)
    compiled = []

    def compiler(module, inputs):
        compiled.append((module, [tuple(x.shape) for x in inputs]))
        return module.forward

    shared = compile_parts(graph, compiler, example)
    assert len(compiled) == 7 and sorted(shared.values()) == [1, 1, 1, 1, 2, 2, 4]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(*example), graph.root(*example), strict=True))


def test_an_overridden_part_compiles_apart_from_its_structural_twins(captured) -> None:
    """layer.0..3 share one structure; layer.0 and layer.1 given a compiler of their own share its artifact, and
    the other two the default's: labels keep the two kinds of artifact apart."""
    gm, example = captured
    graph = partition_showo2_graph(gm)
    seen: dict[str, list[str]] = {"default": [], "exact": []}

    def recording(kind: str):
        def compiler(module, inputs):
            seen[kind].append(module.meta["part"])
            return module.forward
        return compiler

    exact = recording("exact")
    compile_parts(graph, recording("default"), example, overrides={"layer.0": ("exact", exact),
                                                                     "layer.1": ("exact", exact)})
    assert seen["exact"] == ["layer.0"]  # compiled once, for both
    assert "layer.2" in seen["default"] and "layer.3" not in seen["default"]  # its twin's artifact
    assert not {"layer.0", "layer.1"} & set(seen["default"])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(*example), graph.root(*example), strict=True))


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_any_set_of_overridden_parts_replays_the_graph_and_compiles_each_kind_once(captured, data) -> None:
    """Whichever parts a caller compiles otherwise, the result is the captured graph's, and each (structure, label)
    pair is compiled exactly once."""
    gm, example = captured
    graph = partition_showo2_graph(gm)
    names = [part.name for part in graph.parts]
    chosen = data.draw(st.sets(st.sampled_from(names)))
    calls: list[tuple[str, str]] = []

    def compiler_for(label: str):
        def compiler(module, inputs):
            calls.append((label, module.meta["part"]))
            return module.forward
        return compiler

    other = compiler_for("other")
    compile_parts(graph, compiler_for(""), example, overrides={name: ("other", other) for name in chosen})
    signature = {part.name: part.signature for part in graph.parts}
    expected = {(signature[n], "other" if n in chosen else "") for n in names}
    assert sorted((signature[n], label) for label, n in calls) == sorted(expected)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(*example), graph.root(*example), strict=True))


def test_a_changed_forward_changes_the_parts_as_it_changes_eager(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    scale_mlp(model, 2)
    inputs = forward_inputs(model)
    with torch.no_grad():
        gm, example = capture(model, *inputs)
        eager = model(*inputs[:5], return_logits=False).velocity
        before = tiny_model(*inputs[:5], return_logits=False).velocity
    graph = partition_showo2_graph(gm)
    # Only layer 2 changed structure: it no longer shares the other layers' artifact.
    assert sorted(graph.groups().values()) == sorted([["embed"], ["siglip.0", "siglip.1"], ["fuse"],
                                                      ["layer.0", "layer.1", "layer.3"], ["layer.2"], ["head_in"],
                                                      ["head_block.0", "head_block.1"], ["final"]])
    compile_parts(graph, lambda module, _: module.forward, example)
    with torch.no_grad():
        (velocity,) = graph.root(*example)
    assert torch.equal(velocity, eager) and not torch.allclose(velocity, before)


def test_a_graph_without_decoder_layers_stays_whole_and_warns() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    with torch.no_grad():
        gm, example = capture(layer, x)
    with pytest.warns(UserWarning, match="no Show-o2 decoder layer"):
        graph = partition_showo2_graph(gm)
    assert [p.name for p in graph.parts] == ["graph"]
    with torch.no_grad():
        assert torch.equal(graph.root(*example)[0], gm(*example)[0])
