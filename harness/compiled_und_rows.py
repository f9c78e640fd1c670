"""Rows "compiled-exact" and "compiled-flashu" of the understanding task for ``bench`` and ``demo``:
``torch.compile(model, backend=flashu_backend("und", ...))`` answered through ``answer_question_compiled``.

Preparing a row (untimed) compiles it with one first answer and records: the first-answer (compile) time, the
part compilations and CUDA-graph captures, the prefill time and the per-token decode time (medians of a few
answers of 1 and of all new tokens), and a check against the eager twin on the same weights: compiled-exact
against ``answer_question(kv_cache=True)``, compiled-flashu against ``answer_question_flashu`` on the same
pruned copy (shared id prefix; kept image tokens and per-step skip sets equal).
"""

from __future__ import annotations

import torch

from flashu_fx.compiled import answer_question_compiled, flashu_backend
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.mmu import Answer, answer_question
from harness.compiled_rows import backend_overrides, options_note
from harness.flashu_rows import prepare_flashu
from harness.rows import PreparedRow, UndContext, median_seconds, model_device, register_row, timed

TIMING_REPEATS = 3  # answers per split timing (prefill only / whole answer) in the row note


def shared_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compiled_und_row(config: FlashUConfig | None, options: dict | None = None):
    """The row's function; ``options``: extra ``flashu_backend`` keyword arguments (a row variant)."""
    overrides = backend_overrides(options)

    def row(ctx: UndContext) -> PreparedRow:
        row_config = None if config is None else ctx.flashu_configs.get("und", config)
        if row_config is None:
            model, layout, how = ctx.model, None, "exact optimizations only"
        else:
            model, layout, how = prepare_flashu(ctx, row_config)
        backend = flashu_backend("und", row_config, layout, **overrides)
        und = torch.compile(model, backend=backend)
        device = model_device(model)

        def run(new_tokens: int = ctx.max_new_tokens) -> Answer:
            return answer_question_compiled(und, backend, ctx.latents, ctx.question, ctx.tokenizer,
                                            max_new_tokens=new_tokens, stop_at_eos=ctx.stop_at_eos)

        def seconds(new_tokens: int) -> float:
            # one untimed answer first: a prompt length's prefill is captured on its second use (und_graph)
            return median_seconds(lambda: run(new_tokens), device, TIMING_REPEATS, warmup=1)

        out, first = timed(run, device)
        prefill, whole = seconds(1), seconds(ctx.max_new_tokens)
        per_token = (whole - prefill) / max(len(out.ids) - 1, 1)
        with torch.no_grad():
            if row_config is None:
                twin = answer_question(model, ctx.latents, ctx.question, ctx.tokenizer, ctx.max_new_tokens,
                                       kv_cache=True, stop_at_eos=ctx.stop_at_eos)
                decisions = ""
            else:
                twin = answer_question_flashu(model, ctx.latents, ctx.question, row_config, layout, ctx.tokenizer,
                                              ctx.max_new_tokens, stop_at_eos=ctx.stop_at_eos)
                same = shared_prefix([s.skipped for s in out.steps], [s.skipped for s in twin.steps])
                differ = len(set(out.kept_positions) - set(twin.kept_positions))  # bf16 near-ties at the cut
                decisions = (f"; kept tokens differ in {differ}/{len(twin.kept_positions)}, skip sets equal on "
                             f"{same}/{len(twin.steps)} steps")
        note = (
            f"first answer (compile) {first:.1f} s; {sum(backend.piece_captures.values())} part compilations "
            f"({sum(backend.part_compile_seconds.values()):.1f} s), "
            f"{backend.cuda_graph_captures} CUDA graph captures; prefill {1e3 * prefill:.1f} ms, decode "
            f"{1e3 * per_token:.2f} ms/token; ids vs eager {'KV cache' if config is None else 'FlashU'} "
            f"{shared_prefix(out.ids, twin.ids)}/{len(twin.ids)}{decisions}; {how}{options_note(overrides)}"
        )
        return PreparedRow(run=run, count=lambda answer: len(answer.ids), note=note)

    return row


register_row("und", "compiled-exact", compiled_und_row(None),
             variants=lambda options: compiled_und_row(None, options))
register_row("und", "compiled-flashu", compiled_und_row(FlashUConfig.for_task("und")),
             variants=lambda options: compiled_und_row(FlashUConfig.for_task("und"), options))
