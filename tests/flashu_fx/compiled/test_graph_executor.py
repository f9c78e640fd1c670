"""flashu_backend(executor="graph"): what runs is the graph Dynamo handed over, split into parts and compiled per
distinct part; its eager twin is the eager pipeline (``generate_images``)."""

from __future__ import annotations

import copy

import pytest
import torch
from compiled_oracles import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from model_edits import scale_mlp

from flashu_fx import FlashUConfig, generate_images
from flashu_fx.compiled import flashu_backend, generate_images_compiled


def compiled_images(model, prompts, seed: int = 0, **options):
    torch._dynamo.reset()
    backend = flashu_backend("gen", executor="graph", **options)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, prompts, baseline_steps=4, guidance=4.0, seed=seed)
    return out, backend


@settings(deadline=None, max_examples=3)
@given(prompt_len=st.integers(1, 20), seed=st.integers(0, 100))
def test_graph_executor_equals_the_eager_pipeline(tiny_model, prompt_len: int, seed: int) -> None:
    prompt = [(5 * i + 2) % 200 for i in range(prompt_len)]
    out, _ = compiled_images(tiny_model, [prompt], seed)
    assert rel_err(out, generate_images(tiny_model, [prompt], steps=4, guidance=4.0, seed=seed)) < 1e-6


def test_every_compiled_part_comes_from_the_captured_graph(tiny_model) -> None:
    _, backend = compiled_images(tiny_model, [[1, 2, 3]])
    graph = backend.captured
    assert graph is not None and backend.compiles == 1
    names = [p.name for p in graph.parts]
    assert names[0] == "embed" and names[-1] == "final" and "layer.3" in names and "head_block.1" in names
    # One compilation per distinct part: embed, one for all decoder layers, head_in, one for the head blocks, final.
    assert sum(backend.piece_captures.values()) == 5
    covered = [s for p in graph.parts for s in p.sources]
    assert sorted(covered) == sorted(graph.captured_nodes)  # every captured node computed, in exactly one part


def test_no_recompiles_across_images_and_prompt_contents(tiny_model) -> None:
    torch._dynamo.reset()
    backend = flashu_backend("gen", executor="graph")
    gen = torch.compile(tiny_model, backend=backend)
    for prompt in ([1, 2, 3], [9, 8, 7], [4], list(range(1, 18))):  # other contents and lengths: same shapes
        generate_images_compiled(gen, backend, [prompt], baseline_steps=3, guidance=3.0)
    assert backend.compiles == 1 and sum(backend.piece_captures.values()) == 5
    assert [(r.call, r.skip_set, r.head, r.trunk_ran) for r in backend.records] == [(0, (), "compute", True),
                                                                                 (1, (), "compute", True)]


def test_a_changed_forward_changes_the_compiled_result_as_it_changes_eager(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    scale_mlp(model, 1)
    out, backend = compiled_images(model, [[1, 2, 3]])
    eager = generate_images(model, [[1, 2, 3]], steps=4, guidance=4.0)
    assert rel_err(out, eager) < 1e-6
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) > 1e-3
    assert sum(backend.piece_captures.values()) == 6  # layer 1 is its own part now


def test_graph_executor_refuses_what_it_does_not_run_yet() -> None:
    with pytest.raises(ValueError, match=r"executor='graph'\) runs the exact generation forward only"):
        flashu_backend("gen", FlashUConfig.for_task("gen"), executor="graph")
    with pytest.raises(ValueError, match=r"executor='parts' is invalid: allowed one of \('runtime', 'graph'\)"):
        flashu_backend("gen", executor="parts")


def test_merged_projections_are_a_pass_over_the_parts(tiny_model) -> None:
    import torch.nn.functional as F

    from flashu_fx.projection_layout import colocate_projections

    model = copy.deepcopy(tiny_model)
    assert colocate_projections(model)  # before the capture: the graph's weights share buffers
    out, backend = compiled_images(model, [[1, 2, 3]])
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) < 1e-6
    layer = next(p for p in backend.captured.parts if p.name == "layer.0").module
    linears = sum(n.op == "call_function" and n.target is F.linear for n in layer.graph.nodes)
    assert linears == 4  # q/k/v as one, o_proj, gate/up as one, down_proj (7 before the pass)


def test_inductor_parts_match_the_eager_pipeline_on_the_cpu(tiny_model, cpp_compiler) -> None:
    out, backend = compiled_images(tiny_model, [[1, 2, 3]], piece_backend="inductor")
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) < 1e-5
    assert sum(backend.piece_captures.values()) == 5
