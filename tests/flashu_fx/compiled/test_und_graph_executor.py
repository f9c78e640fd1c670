"""flashu_backend("und"): understanding through Dynamo. The answer loop calls the compiled model
(``Showo2.understand``: a prefill and one decode step per token through an ``UndCache``), Dynamo hands both graphs
to the backend, and what runs is those graphs, rewritten by FlashU's passes (token pruning, layer skipping and its
measurement, the sliced FFN) and split into parts. Eager twins: ``answer_question(kv_cache=True)`` and
``answer_question_flashu``."""

from __future__ import annotations

import copy

import pytest
import torch
from compiled_oracles import permuted_with_layout, rel_err
from model_edits import scale_mlp

from flashu_fx import FlashUConfig
from flashu_fx.compiled import answer_question_compiled, flashu_backend
from flashu_fx.compiled.und_graph import decision_parts
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.mmu import answer_question, decode_cached
from flashu_fx.tokenizer import get_tokenizer
from flashu_fx.und_cache import UndCache

# Token pruning alone: 8 of the tiny model's 16 image tokens kept after layer 1.
PRUNE_ONLY = FlashUConfig.for_task("und", skip_ratio=0.0, ffn_prune_ratio=0.0)
# Every technique acts: token pruning, a 224-of-256 FFN, 2 of 4 layers skipped, re-measured every 3 steps.
FULL = FlashUConfig.for_task("und", skip_ratio=0.5, skip_interval=3, ffn_width_multiple=8)


def latents_for(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def question_for(length: int) -> list[int]:
    return [(7 * i + 3) % 200 for i in range(length)]


def graph_backend(model, config: FlashUConfig | None = None):
    torch._dynamo.reset()
    backend = flashu_backend("und", config)
    return backend, torch.compile(model, backend=backend)


def logits_of(model, latents, question, budget: int, cache=None) -> tuple[list[int], list[torch.Tensor]]:
    """The greedy ids and every step's logits of the answer loop run with ``model`` (eager or compiled)."""
    cfg = model.config
    prompt = build_mmu_prompt(cfg, get_tokenizer(cfg), question)
    rows: list[torch.Tensor] = []

    def step(logits: torch.Tensor) -> int:
        rows.append(logits)
        return int(logits.argmax())

    return decode_cached(model, latents, prompt, budget, step, stop_at_eos=False, progress=False, cache=cache), rows


def test_both_understanding_graphs_come_from_the_captured_graphs(tiny_model) -> None:
    backend, und = graph_backend(tiny_model, PRUNE_ONLY)
    for length in (3, 9):  # two prompt lengths: the prefill is captured once, with a symbolic length
        answer_question_compiled(und, backend, latents_for(length), question_for(length), max_new_tokens=4,
                                 stop_at_eos=False)
    assert backend.compiles == 2  # one prefill, one decode step: no recompile across prompt lengths
    assert set(backend.und_graphs) == {"prefill", "decode"}
    layers = [f"layer.{i}" for i in range(tiny_model.config.num_layers)]
    siglip = [f"siglip.{k}" for k in range(tiny_model.config.und_num_layers)]
    for kind, graph in backend.und_graphs.items():
        names = [p.name for p in graph.parts]
        # the prefill encodes the image (SigLIP layers, then the fusion); a decode step has no image
        assert names == (["embed", *siglip, "fuse", *layers, "final"] if kind == "prefill" else
                         ["embed", *layers, "final"])
        covered = set().union(*(p.sources for p in graph.parts))
        inputs = {n.name for n in graph.root.graph.nodes if n.op == "placeholder"}
        # every node computes something Dynamo handed over (a gathered mask or row count: the input it replaces)
        assert covered <= set(graph.captured_nodes) | inputs
        assert {f"layer.{i}" for i in range(tiny_model.config.num_layers)} <= {p.name for p in graph.parts}
    prefill = backend.und_graphs["prefill"]
    derived = [n for p in prefill.parts for n in p.module.graph.nodes if n.meta.get("derived_by")]
    # every node a pass made is named after it: the pruning pass's, the merged q/k/v and gate/up products, and the
    # SigLIP stream handed over in rows
    assert {n.meta["derived_by"] for n in derived} == {"vnorm_token_pruning", "merge_projections", "part_layout"}


def test_projections_are_merged_in_both_graphs(tiny_model) -> None:
    """The backend colocates each q/k/v and gate/up group of the captured weights, so merge_projections turns
    every layer's 7 linears into 4, in the prefill and in the decode step, and the answer is unchanged."""
    import torch.nn.functional as F

    model = copy.deepcopy(tiny_model)
    latents, question = latents_for(4), question_for(5)
    want = answer_question(model, latents, question, max_new_tokens=4, stop_at_eos=False)
    backend, und = graph_backend(model)
    got = answer_question_compiled(und, backend, latents, question, max_new_tokens=4, stop_at_eos=False)
    assert got.ids == want.ids
    for kind, graph in backend.und_graphs.items():
        layer = next(p for p in graph.parts if p.name == "layer.0").module
        linears = sum(n.op == "call_function" and n.target is F.linear for n in layer.graph.nodes)
        assert linears == 4, kind


def test_eager_numerics_reach_only_the_parts_the_token_choice_reads(tiny_model) -> None:
    """``prefill_eager_numerics``: the prefill's parts up to the pruning layer compile unmerged (each projection the
    GEMM eager runs), the later layers and the decode step merged; the answer is eager FlashU's."""
    import torch.nn.functional as F

    model = copy.deepcopy(tiny_model)
    latents, question = latents_for(5), question_for(6)
    want = answer_question_flashu(model, latents, question, PRUNE_ONLY, None, max_new_tokens=4, stop_at_eos=False)
    torch._dynamo.reset()
    backend = flashu_backend("und", PRUNE_ONLY, prefill_eager_numerics=True)
    got = answer_question_compiled(torch.compile(model, backend=backend), backend, latents, question,
                                   max_new_tokens=4, stop_at_eos=False)
    assert got.ids == want.ids
    prefill = backend.und_graphs["prefill"]
    exact = decision_parts(prefill, PRUNE_ONLY.token_prune_layer)
    assert exact[-1] == f"layer.{PRUNE_ONLY.token_prune_layer}" and exact[0] == prefill.parts[0].name
    def linears(part) -> int:
        return sum(n.op == "call_function" and n.target is F.linear for n in part.module.graph.nodes)

    # the tiny prefill's four layers differ in structure, so each is compiled from its own module
    assert {p.name: linears(p) for p in prefill.parts if p.name.startswith("layer.")} == {
        f"layer.{i}": 7 if f"layer.{i}" in exact else 4 for i in range(model.config.num_layers)}
    decode = backend.und_graphs["decode"]
    assert linears(next(p for p in decode.parts if p.name == "layer.0")) == 4  # the decode step still merges
    with pytest.raises(ValueError, match="token_prune_layer=9 names no part of the prefill"):
        decision_parts(prefill, 9)


def test_merged_ffn_slices_answer_as_eager_flashu(tiny_model) -> None:
    """``merge_ffn_slices``: each layer's pruned gate and up views (their range start varies by layer) run as one
    batched matmul from one artifact; the answer, kept tokens and skip sets are eager FlashU's."""
    from passes.merge_projections import gate_up_of_rows

    model, layout = permuted_with_layout(tiny_model, FULL, 6)
    assert len({lo for lo, _ in layout.ranges["und"]}) > 1
    latents, question = latents_for(4), question_for(5)
    eager = answer_question_flashu(model, latents, question, FULL, layout, max_new_tokens=6, stop_at_eos=False)
    compiles = {}
    for merge in (False, True):
        torch._dynamo.reset()
        backend = flashu_backend("und", FULL, layout, merge_ffn_slices=merge)
        ours = answer_question_compiled(torch.compile(model, backend=backend), backend, latents, question,
                                        max_new_tokens=6, stop_at_eos=False)
        assert ours.ids == eager.ids and ours.kept_positions == eager.kept_positions
        assert [s.skipped for s in ours.steps] == [s.skipped for s in eager.steps]
        compiles[merge] = sum(backend.piece_captures.values())
    # the prefill's parts up to the pruning layer compile unmerged (prefill_eager_numerics, on by default)
    unmerged = {"prefill": decision_parts(backend.und_graphs["prefill"], FULL.token_prune_layer), "decode": []}
    for kind, graph in backend.und_graphs.items():
        layer = next(p for p in graph.parts if p.name.startswith("layer.") and p.name not in unmerged[kind]).module
        assert any(n.target is gate_up_of_rows for n in layer.graph.nodes), kind
    assert compiles[True] == compiles[False]  # one artifact per part, whatever each layer's range start
    torch._dynamo.reset()


def test_a_changed_model_forward_changes_the_compiled_answer_the_same_way(tiny_model) -> None:
    edited = copy.deepcopy(tiny_model)
    scale_mlp(edited, 1)
    latents, question = latents_for(3), question_for(6)
    want_ids, want = logits_of(edited, latents, question, 4)
    _, before = logits_of(tiny_model, latents, question, 4)
    assert rel_err(want[0], before[0]) > 1e-3  # the edit matters
    _, und = graph_backend(edited)
    got_ids, got = logits_of(und, latents, question, 4)
    assert got_ids == want_ids and max(rel_err(a, b) for a, b in zip(got, want, strict=True)) < 1e-5


def test_answer_question_with_the_compiled_model_is_the_eager_answer(tiny_model) -> None:
    latents = latents_for(5)
    want = answer_question(tiny_model, latents, "what is it?", max_new_tokens=4, stop_at_eos=False)
    _, und = graph_backend(tiny_model)
    got = answer_question(und, latents, "what is it?", max_new_tokens=4, stop_at_eos=False)
    assert got.ids == want.ids and got.text == want.text


def test_an_understanding_call_needs_the_und_backend(tiny_model) -> None:
    torch._dynamo.reset()
    und = torch.compile(tiny_model, backend=flashu_backend("gen"))
    with pytest.raises(RuntimeError, match="compile the model for answers with flashu_backend\\('und'\\)"):
        answer_question(und, latents_for(0), "what is it?", max_new_tokens=2)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graph_replays_equal_eager_flashu_on_the_gpu(tiny_model) -> None:
    model, layout = permuted_with_layout(tiny_model, FULL, 3)
    model = model.cuda()
    torch._dynamo.reset()
    backend = flashu_backend("und", FULL, layout)
    und = torch.compile(model, backend=backend)
    for length in (3, 9, 3):  # a repeated prompt length replays the captured graphs
        latents = latents_for(length).cuda()
        eager = answer_question_flashu(model, latents, question_for(length), FULL, layout, max_new_tokens=10,
                                       stop_at_eos=False)
        ours = answer_question_compiled(und, backend, latents, question_for(length), max_new_tokens=10,
                                        stop_at_eos=False)
        assert ours.ids == eager.ids and ours.kept_positions == eager.kept_positions
        assert [s.skipped for s in ours.steps] == [s.skipped for s in eager.steps]
    assert backend.compiles == 2 and backend.cuda_graph_captures > 0


def test_a_decode_step_before_any_prefill_is_refused(tiny_model) -> None:
    _, und = graph_backend(tiny_model)
    cache = UndCache.for_model(tiny_model, 64, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="decode step .* came before any prefill"), torch.no_grad():
        und(torch.tensor([[5]]), None, None, None, None, cache=cache)
    torch._dynamo.reset()


def test_new_prompt_lengths_reuse_the_prefill_parts_and_answer_as_eager(tiny_model) -> None:
    """After two prompt lengths the prefill's parts are symbolic in the length (``dynamic_lengths``): later
    lengths compile nothing, and their answers, kept tokens and skip sets are the eager twin's."""
    model, layout = permuted_with_layout(tiny_model, FULL, 5)
    torch._dynamo.reset()
    backend = flashu_backend("und", FULL, layout)
    und = torch.compile(model, backend=backend)
    for length in (2, 30):  # warm-up: a first length, then a second one
        answer_question_compiled(und, backend, latents_for(length), question_for(length), max_new_tokens=6,
                                 stop_at_eos=False)
    warm, built = dict(backend.piece_captures), backend.variant_builds
    for length in (7, 19):
        ours = answer_question_compiled(und, backend, latents_for(length), question_for(length), max_new_tokens=6,
                                        stop_at_eos=False)
        eager = answer_question_flashu(model, latents_for(length), question_for(length), FULL, layout,
                                       max_new_tokens=6, stop_at_eos=False)
        assert ours.ids == eager.ids and ours.kept_positions == eager.kept_positions
        assert [r.skip_set for r in ours.steps] == [r.skip_set for r in eager.steps]
    assert dict(backend.piece_captures) == warm  # no part compiled again
    # the same plans at new lengths run the variants built for the first: FlashU's passes do not run again
    assert backend.variant_builds == built > 0
    torch._dynamo.reset()
