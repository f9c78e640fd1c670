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
from flashu_fx.flashu_und import FlashUAnswer
from flashu_fx.inputs import question_ids
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.mmu import check_image_latents
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer


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
