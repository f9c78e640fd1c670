"""Understanding through a model compiled with ``flashu_backend(task="und")``: the eager pipeline's prompt,
greedy decoding and stop rule (``answer_question(kv_cache=True)`` / ``answer_question_flashu``). The loop calls the
compiled model, so Dynamo captures the prefill and the decode step and hands them to the backend, which runs them
rewritten by FlashU's passes (``flashu_fx.compiled.und_graph``).

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
from flashu_fx.config import Showo2Config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import ffn_ranges_per_layer
from flashu_fx.flashu_und import FlashUAnswer, check_token_prune_layer
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
    if backend.task != "und":
        raise ValueError(f"backend.task={backend.task!r} is invalid here: answer_question_compiled needs the backend "
                         "of flashu_backend('und')")
    cfg = getattr(compiled, "config", None)
    if not isinstance(cfg, Showo2Config):
        raise TypeError(f"expected torch.compile(<Showo2>, backend=...), got {type(compiled).__name__}")
    check_image_latents(cfg, latents)  # before tracing: Dynamo would bury a shape error
    config = backend.config or FlashUConfig.off("und")
    budget = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={budget!r} is invalid: allowed an integer >= 1")
    ffn_ranges_per_layer(compiled, config, backend.layout, "und")  # the layout matches the permuted weights
    check_token_prune_layer(config, cfg.num_layers)
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question_ids(cfg, question, tok))
    cache = backend.und_cache(compiled, prompt.tokens.shape[1] + budget, latents.device)
    # Greedy on the device, the host one step behind; the first decode step runs every Dynamo guard, the later
    # ones only those telling prefill from decode.
    ids = decode_cached(compiled, latents, prompt, budget, None, stop_at_eos, progress=False, cache=cache,
                        decode_context=loop_call)
    state = backend.und_state
    if state is None or state.prompt_len != prompt.tokens.shape[1]:
        raise RuntimeError("answer_question_compiled: the model's calls never reached this backend; pass "
                           "compiled = torch.compile(model, backend=backend) with the same backend")
    kept = None
    if state.kept_rows is not None:
        kept = kept_image_positions(state.kept_rows, prompt.offset, config.kept_tokens(cfg.num_image_tokens))
    # one record per id: after a stop token the loop ran one step more, whose id it dropped
    return FlashUAnswer(ids, tok.decode(ids), kept, state.records[: len(ids)], prompt.tokens.shape[1])
