"""The compiled understanding path against its eager twins: FlashU vs ``FlashUUndDecoder`` (identical kept
tokens, skip sets and ids; logits within fp32 rel 1e-4), exact-only vs ``answer_question(kv_cache=True)``,
no recompiles across prompt lengths and skip sets, clear errors. CPU: the captured graphs' parts run through the
"eager" piece backend and no CUDA graphs; the ``gpu`` test replays CUDA graphs."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from compiled_oracles import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from flashu_fx import FlashUConfig, init_random_weights
from flashu_fx.compiled import answer_question_compiled, flashu_backend
from flashu_fx.compiled.repeat_calls import loop_call
from flashu_fx.ffn_layout import build_ffn_layout, permute_ffn_weights, top_k_mask
from flashu_fx.flashu_und import FlashUUndDecoder
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.mmu import answer_question, decode_cached, next_token, prompt_embeddings
from flashu_fx.tokenizer import get_tokenizer
from passes.decode_attention import decode_attention
from passes.graph_utils import DERIVED_BY
from passes.merge_projections import adjacent

# Tiny-model FlashU settings under which every technique acts: 8 of 16 image tokens kept after layer 1, a
# 224-of-256 FFN, 2 of 4 layers skipped, re-measured every 3 decode steps.
TINY_UND = FlashUConfig.for_task("und", skip_ratio=0.5, skip_interval=3, ffn_width_multiple=8)


def pruned_model(model, config: FlashUConfig, seed: int, two_tasks: bool):
    """A permuted copy with random "und" scores; ``two_tasks`` adds "gen" ranges so und's range start varies."""
    work = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    layers, inter = work.config.num_layers, work.config.intermediate_size
    tasks = ("gen", "und") if two_tasks else ("und",)
    keep = {t: top_k_mask(torch.rand(layers, inter, generator=gen), config.kept_ffn_width(inter)) for t in tasks}
    layout = build_ffn_layout(keep)
    permute_ffn_weights(work, layout.order)
    return work, layout


def eager_flashu(model, config, layout, latents, question, budget: int, stop_at_eos: bool):
    """``answer_question_flashu``'s loop (greedy), keeping every step's logits: (decoder, ids, logits)."""
    prompt = build_mmu_prompt(model.config, get_tokenizer(model.config), question)
    decoder = FlashUUndDecoder(model, config, layout, prompt, budget)
    logits = [decoder.prefill(prompt_embeddings(model, latents, prompt))]
    ids = [next_token(logits[-1], 0.0, 1, None)]
    while len(ids) < budget and not (stop_at_eos and ids[-1] == model.config.specials.eos):
        logits.append(decoder.step(ids[-1]))
        ids.append(next_token(logits[-1], 0.0, 1, None))
    return decoder, ids, logits


def compiled_answer(model, backend, latents, question, budget: int, stop_at_eos: bool = False):
    """``answer_question_compiled``'s answer, and every step's logits from the same compiled loop run again with
    the greedy choice on the host (copies: on the GPU they are a CUDA graph's outputs, rewritten by the next step)."""
    und = torch.compile(model, backend=backend)
    answer = answer_question_compiled(und, backend, latents, question, max_new_tokens=budget, stop_at_eos=stop_at_eos)
    logits: list[torch.Tensor] = []

    def step(row: torch.Tensor) -> int:
        logits.append(row.clone())
        return int(row.argmax())

    prompt = build_mmu_prompt(model.config, get_tokenizer(model.config), question)
    cache = backend.und_cache(und, prompt.tokens.shape[1] + budget, latents.device)
    ids = decode_cached(und, latents, prompt, budget, step, stop_at_eos, progress=False, cache=cache,
                        decode_context=loop_call)
    assert ids == answer.ids
    return answer, logits


@settings(deadline=None, max_examples=5)
@given(seed=st.integers(0, 1000), question_len=st.integers(1, 30), two_tasks=st.booleans(),
       prune_layer=st.integers(0, 2), stop_at_eos=st.booleans())  # pruning after the last layer is a no-op
@torch.no_grad()
def test_flashu_compiled_matches_eager_twin(tiny_model, seed, question_len, two_tasks, prune_layer, stop_at_eos):
    torch._dynamo.reset()
    config = FlashUConfig.from_dict({**TINY_UND.to_dict(), "token_prune_layer": prune_layer})
    model, layout = pruned_model(tiny_model, config, seed, two_tasks)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=gen)
    question = torch.randint(0, 200, (question_len,), generator=gen).tolist()
    decoder, ids, logits = eager_flashu(model, config, layout, latents, question, 11, stop_at_eos)
    backend = flashu_backend("und", config, layout)
    answer, got = compiled_answer(model, backend, latents, question, 11, stop_at_eos)
    assert answer.ids == ids
    assert answer.kept_positions == decoder.kept_positions and len(answer.kept_positions) == 8
    assert answer.prompt_len == decoder.prompt_len
    for mine, twin in zip(answer.steps, decoder.steps, strict=True):
        assert (mine.step, mine.position, mine.layers) == (twin.step, twin.position, twin.layers)
        assert (mine.skipped, mine.skip_set) == (twin.skipped, twin.skip_set)
        assert (mine.importance is None) == (twin.importance is None)
        if mine.importance is not None:
            torch.testing.assert_close(torch.tensor(mine.importance), torch.tensor(twin.importance),
                                       rtol=1e-4, atol=1e-5)
    assert len(answer.steps) < 4 or any(s.skipped for s in answer.steps), "layer skipping must act"
    assert len(got) == len(logits)
    assert max(rel_err(a, b) for a, b in zip(got, logits, strict=True)) < 1e-4


def decode_nodes(backend) -> list[fx.Node]:
    """Every node of the last decode variant's parts (CPU: the parts run as FX graphs)."""
    decode = backend.und_graphs["decode"].root
    parts = [getattr(getattr(part, "fn", None), "__self__", None) for part in decode.children()]
    return [n for gm in parts if isinstance(gm, fx.GraphModule) for n in gm.graph.nodes]


@pytest.mark.parametrize("option", ["decode_attention", "norm_in_products"])
@torch.no_grad()
def test_decode_candidates_match_eager_twin(tiny_model, option: str) -> None:
    """The decode-step candidates (``decode_attention="reductions"``, ``norm_in_products=True``) rewrite every decode
    variant; the answer, its decisions and every step's logits stay the eager twin's."""
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_UND, 7, two_tasks=False)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    decoder, ids, logits = eager_flashu(model, TINY_UND, layout, latents, [9, 8, 7], 10, False)
    value = "reductions" if option == "decode_attention" else True
    backend = flashu_backend("und", TINY_UND, layout, **{option: value})
    answer, got = compiled_answer(model, backend, latents, [9, 8, 7], 10)
    assert answer.ids == ids and answer.kept_positions == decoder.kept_positions
    assert [s.skipped for s in answer.steps] == [s.skipped for s in decoder.steps]
    assert any(s.skipped for s in answer.steps), "layer skipping must act"
    assert max(rel_err(a, b) for a, b in zip(got, logits, strict=True)) < 1e-4
    nodes = decode_nodes(backend)
    layers_run = tiny_model.config.num_layers - len(answer.steps[-1].skipped)
    if option == "decode_attention":
        targets = [n.target for n in nodes]
        assert targets.count(decode_attention) == layers_run and F.scaled_dot_product_attention not in targets
    else:  # each layer's two norms: the merged q/k/v, and gate and up
        folded = [n for n in nodes if n.target is F.linear and n.meta.get(DERIVED_BY) == "norm_in_products"]
        assert len(folded) == 3 * layers_run


@pytest.mark.parametrize("stop_at", [0, 3])
@torch.no_grad()
def test_a_stop_token_ends_the_answer_as_in_the_eager_twin(tiny_model, stop_at: int) -> None:
    """The compiled loop reads ids one step behind: on a stop token it has run one step more, whose id and record
    it drops. The stop token is made the id the answer reaches at step ``stop_at``."""
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_UND, 5, False)
    gen = torch.Generator().manual_seed(5)
    latents, question = torch.randn(1, 16, 8, 8, generator=gen), [11, 12, 13, 14]
    original = model.config

    def with_eos(eos: int):  # the stop token is also in the prompt's template: the answer changes with it
        model.config = dataclasses.replace(original, specials=dataclasses.replace(original.specials, eos=eos))
        return eager_flashu(model, TINY_UND, layout, latents, question, 9, False)[1]

    candidates = eager_flashu(model, TINY_UND, layout, latents, question, 9, False)[1]
    stop, free = next((c, ids) for c in candidates if c in (ids := with_eos(c))[stop_at:])
    decoder, ids, logits = eager_flashu(model, TINY_UND, layout, latents, question, 9, True)
    assert ids == free[: free.index(stop) + 1] and len(ids) < 9
    answer, got = compiled_answer(model, flashu_backend("und", TINY_UND, layout), latents, question, 9, True)
    assert answer.ids == ids
    assert [s.step for s in answer.steps] == [s.step for s in decoder.steps] == list(range(len(ids)))
    assert len(got) == len(logits) == len(ids)


@settings(deadline=None, max_examples=4)
@given(seed=st.integers(0, 1000), question_len=st.integers(1, 40), budget=st.integers(1, 9))
@torch.no_grad()
def test_exact_only_equals_eager_kv_cache(tiny_model, seed, question_len, budget):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=gen)
    question = torch.randint(0, 200, (question_len,), generator=gen).tolist()
    prompt = build_mmu_prompt(tiny_model.config, get_tokenizer(tiny_model.config), question)
    logits: list[torch.Tensor] = []

    def step(row: torch.Tensor) -> int:
        logits.append(row)
        return int(row.argmax())

    ids = decode_cached(tiny_model, latents, prompt, budget, step, stop_at_eos=False, progress=False)
    answer, got = compiled_answer(tiny_model, flashu_backend("und"), latents, question, budget)
    assert answer.ids == ids
    assert answer.kept_positions is None and {s.layers for s in answer.steps} == {"all"}
    assert max(rel_err(a, b) for a, b in zip(got, logits, strict=True)) < 1e-4


@torch.no_grad()
def test_no_recompiles_across_prompts_and_skip_sets(tiny_model) -> None:
    model, layout = pruned_model(tiny_model, TINY_UND, 0, two_tasks=True)
    backend = flashu_backend("und", TINY_UND, layout)
    und = torch.compile(model, backend=backend)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    # one length compiles the prefill's parts symbolic in it (make_part_compiler, compile_parts)
    answer_question_compiled(und, backend, latents, [1, 2, 3], max_new_tokens=10, stop_at_eos=False)
    warm = dict(backend.piece_captures)
    assert warm
    skip_sets = set()
    for n in (1, 7, 19, 30, 41):  # prompts of 76..116 positions: one prefill bucket, one cache capacity
        question = [(5 * i + n) % 200 for i in range(n)]
        answer = answer_question_compiled(und, backend, latents, question, max_new_tokens=10, stop_at_eos=False)
        skip_sets.update(s.skip_set for s in answer.steps)
    assert dict(backend.piece_captures) == warm
    assert len(skip_sets) > 1, "the prompts must lead to different skip sets"
    assert backend.compiles == 2  # Dynamo captured the prefill and the decode step once each


def test_errors(tiny_model) -> None:
    latents = torch.randn(1, 16, 8, 8)
    with pytest.raises(ValueError, match="needs an FFNLayout with 'und' ranges, got None"):
        flashu_backend("und", TINY_UND)  # pruned FFN but no layout
    plain = flashu_backend("und")
    und = torch.compile(tiny_model, backend=plain)
    with pytest.raises(ValueError, match=r"latents must be \(1, 16, 8, 8\) for one image"):
        answer_question_compiled(und, plain, latents.expand(2, -1, -1, -1), "hi")
    with pytest.raises(ValueError, match="max_new_tokens=0 is invalid: allowed an integer >= 1"):
        answer_question_compiled(und, plain, latents, "hi", max_new_tokens=0)
    with pytest.raises(TypeError, match="expected torch.compile"):
        answer_question_compiled(torch.nn.Linear(2, 2), plain, latents, "hi")
    with pytest.raises(ValueError, match="backend.task='gen' is invalid here"):
        answer_question_compiled(und, flashu_backend("gen"), latents, "hi")
    bad_layer = flashu_backend("und", FlashUConfig.for_task("und", ffn_prune_ratio=0.0, token_prune_layer=4))
    with pytest.raises(ValueError, match="token_prune_layer=4 is invalid"):
        answer_question_compiled(torch.compile(tiny_model, backend=bad_layer), bad_layer, latents, "hi")
    from flashu_fx.layout import build_gen_batch

    b = build_gen_batch(tiny_model.config, [[1, 2]])
    with pytest.raises(Exception, match="answer_question_compiled"):
        und(b.tokens, torch.randn(2, 16, 8, 8), torch.zeros(2), b.offsets, b.mask, return_logits=False)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graphs_match_eager_twin(tiny_model) -> None:
    """On the GPU: decode steps replay CUDA graphs (one capture per variant), the prefill from its length's second
    use on; decisions, ids and every step's logits equal the eager twin's."""
    model, layout = pruned_model(tiny_model, TINY_UND, 3, two_tasks=True)
    model = model.cuda()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)).cuda()
    decoder, ids, logits = eager_flashu(model, TINY_UND, layout, latents, [4, 5, 6], 14, False)
    backend = flashu_backend("und", TINY_UND, layout)
    und = torch.compile(model, backend=backend)

    def answer():
        return answer_question_compiled(und, backend, latents, [4, 5, 6], max_new_tokens=14, stop_at_eos=False)

    first = answer()
    assert first.ids == ids and first.kept_positions == decoder.kept_positions
    assert [s.skipped for s in first.steps] == [s.skipped for s in decoder.steps]
    captures = backend.cuda_graph_captures  # the decode steps' variants: the prefill's first use runs uncaptured
    assert captures > 0
    assert answer().ids == ids and backend.cuda_graph_captures == captures + 1  # the length's second prefill
    assert answer().ids == ids and backend.cuda_graph_captures == captures + 1  # replays from here on
    _, got = compiled_answer(model, backend, latents, [4, 5, 6], 14)  # replays: the logits of the graphs themselves
    assert max(rel_err(a, b) for a, b in zip(got, logits, strict=True)) < 1e-3
    assert backend.cuda_graph_captures == captures + 1


@torch.no_grad()
def test_new_weights_on_the_same_model_are_laid_out_again(tiny_model) -> None:
    """load_state_dict(assign=True) puts new tensors under the same modules: the merged projections would read
    past the new, separate buffers, so the backend colocates them before the answer that first reads them."""
    model = copy.deepcopy(tiny_model)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    backend = flashu_backend("und")
    und = torch.compile(model, backend=backend)
    first = answer_question_compiled(und, backend, latents, [4, 5, 6], max_new_tokens=8, stop_at_eos=False)
    other = init_random_weights(copy.deepcopy(tiny_model), seed=7)
    model.load_state_dict(other.state_dict(), assign=True)
    second = answer_question_compiled(und, backend, latents, [4, 5, 6], max_new_tokens=8, stop_at_eos=False)
    twin = answer_question(model, latents, [4, 5, 6], max_new_tokens=8, kv_cache=True, stop_at_eos=False)
    assert second.ids == twin.ids and second.ids != first.ids
    attn = model.showo.model.layers[2].self_attn
    assert adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    third = answer_question_compiled(und, backend, latents, [4, 5, 6], max_new_tokens=8, stop_at_eos=False)
    assert third.ids == second.ids


@pytest.mark.parametrize("shape", [(1, 8, 8, 8), (1, 16, 6, 6), (2, 16, 8, 8)])
def test_bad_inputs_get_clear_errors_before_tracing(tiny_model, shape) -> None:
    backend = flashu_backend("und")
    und = torch.compile(tiny_model, backend=backend)
    expected = r"latents must be \(1, 16, 8, 8\) for one image .* got " + re.escape(str(shape))
    with pytest.raises(ValueError, match=expected):
        answer_question_compiled(und, backend, torch.zeros(shape), [4, 5], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"question ids must lie in \[0, 256\), got 3..999"):
        answer_question_compiled(und, backend, torch.zeros(1, 16, 8, 8), [3, 999], max_new_tokens=2)


@torch.no_grad()
@pytest.mark.parametrize("merge_ffn_slices", [False, True])
def test_inductor_parts_match_the_eager_twin_on_the_cpu(tiny_model, cpp_compiler, merge_ffn_slices: bool) -> None:
    """The part compiler for real (inductor, merged projections, decode parts with their tuning setting) on the
    CPU: the same ids, kept tokens and skip sets as eager FlashU. With ``merge_ffn_slices`` one inductor artifact
    reads every layer's gate and up rows through a view whose start (the layer's range) varies by layer."""
    model, layout = pruned_model(tiny_model, TINY_UND, 3, two_tasks=True)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    decoder, ids, _ = eager_flashu(model, TINY_UND, layout, latents, [4, 5, 6], 10, False)
    backend = flashu_backend("und", TINY_UND, layout, piece_backend="inductor", merge_ffn_slices=merge_ffn_slices)
    und = torch.compile(model, backend=backend)
    answer = answer_question_compiled(und, backend, latents, [4, 5, 6], max_new_tokens=10, stop_at_eos=False)
    assert answer.ids == ids and answer.kept_positions == decoder.kept_positions
    assert [s.skipped for s in answer.steps] == [s.skipped for s in decoder.steps]
