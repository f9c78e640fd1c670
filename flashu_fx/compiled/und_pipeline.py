"""Understanding through a model compiled with ``flashu_backend(task="und")``: the eager pipeline's prompt,
greedy decoding and stop rule (``answer_question(kv_cache=True)`` / ``answer_question_flashu``), run by the
backend's understanding runtime (``flashu_fx.compiled.und_runtime``).

>>> import torch
>>> from flashu_fx import FlashUConfig, Showo2, get_config, init_random_weights
>>> from flashu_fx.compiled import answer_question_compiled, flashu_backend
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> cfg = FlashUConfig.for_task("und", ffn_prune_ratio=0.0, skip_ratio=0.5, skip_interval=2)
>>> backend = flashu_backend("und", cfg)
>>> und = torch.compile(model, backend=backend)          # lazy: nothing is traced yet
>>> ans = answer_question_compiled(und, backend, torch.randn(1, 16, 8, 8), "what is it?", max_new_tokens=4)
>>> len(ans.kept_positions), [s.layers for s in ans.steps]
(8, ['measure', 'skip', 'measure', 'skip'])
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashu_fx.compiled.backend import FlashUBackend
from flashu_fx.compiled.repeat_calls import loop_call
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import ffn_ranges_per_layer
from flashu_fx.flashu_und import FlashUAnswer
from flashu_fx.inputs import question_ids
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.mmu import check_image_latents, decode_cached
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer
from passes.vnorm_token_pruning import kept_image_positions


@torch.no_grad()
def answer_question_compiled(
    compiled: torch.nn.Module,
    backend: FlashUBackend,
    latents: Tensor,
    question: str | list[int],
    tokenizer: TextTokenizer | None = None,
    max_new_tokens: int | None = None,
    stop_at_eos: bool = True,
) -> FlashUAnswer:
    """Answer ``question`` about one image (VAE latents (1, C, h, w)) greedily with the compiled model.

    ``compiled = torch.compile(model, backend=backend)`` with ``backend = flashu_backend("und", config, layout)``.
    ``max_new_tokens`` defaults to ``config.max_new_tokens`` (128; also for ``config=None``). Returns the eager
    twin's ``FlashUAnswer``: ids, text, kept image positions (None without pruning) and one record per step.
    """
    if backend.executor == "graph":
        return _answer_through_graph(compiled, backend, latents, question, tokenizer, max_new_tokens, stop_at_eos)
    rt = backend.und_runtime(compiled)
    check_image_latents(rt.model.config, latents)  # before tracing: Dynamo would bury a shape error
    budget = rt.config.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
    cfg = rt.model.config
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question_ids(cfg, question, tok))
    ids, kept_positions, steps = rt.answer(latents, prompt, budget, stop_at_eos)
    return FlashUAnswer(ids, tok.decode(ids), kept_positions, steps, prompt.tokens.shape[1])


def _answer_through_graph(compiled: torch.nn.Module, backend: FlashUBackend, latents: Tensor,
                          question: str | list[int], tokenizer: TextTokenizer | None, max_new_tokens: int | None,
                          stop_at_eos: bool) -> FlashUAnswer:
    """executor="graph": the eager answer loop (``decode_cached``) calling the compiled model, so Dynamo captures
    the prefill and the decode step and hands them to the backend; the kept image tokens come from its record."""
    cfg = compiled.config
    check_image_latents(cfg, latents)
    config = backend.config or FlashUConfig.off("und")
    budget = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
    ffn_ranges_per_layer(compiled, config, backend.layout, "und")  # the layout matches the permuted weights
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question_ids(cfg, question, tok))
    cache = backend.und_cache(compiled, prompt.tokens.shape[1] + budget, latents.device)
    # Greedy on the device, the host one step behind; the first decode step runs every Dynamo guard, the later
    # ones only those telling prefill from decode.
    ids = decode_cached(compiled, latents, prompt, budget, None, stop_at_eos, progress=False, cache=cache,
                        decode_context=loop_call)
    state = backend.und_state
    kept = None
    if state.kept_rows is not None:
        kept = kept_image_positions(state.kept_rows, prompt.offset, config.kept_tokens(cfg.num_image_tokens))
    # one record per id: after a stop token the loop ran one step more, whose id it dropped
    return FlashUAnswer(ids, tok.decode(ids), kept, state.records[: len(ids)], prompt.tokens.shape[1])
