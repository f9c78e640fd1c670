"""The rows of ``python -m harness quality``: how each method generates a batch of captions or answers one question.

Generation rows return the latents of a batch and one decision per model call; understanding rows return the
answer text and their decisions (kept image tokens, skipped layers per step). Decisions are what the compiled
backend must reproduce from its eager twin (the issue's fidelity check):

    gen call:  (skipped layers, head action, trunk ran, guidance g_s, pruned FFN)
    und step:  skipped layers; an answer also keeps the positions of its kept image tokens

Every FlashU row shares one model whose FFNs ``prepare_pruned_model`` permuted in place; the permutation is exact,
so the baseline and exact rows run on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flashu_fx.compiled import (
    answer_question_compiled,
    flashu_backend,
    generate_images_compiled,
    lean_guard_options,
)
from flashu_fx.ffn_layout import FFNLayout
from flashu_fx.flashu_config import ABLATIONS as PAPER_ABLATIONS
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.mmu import answer_question
from flashu_fx.model import Showo2
from flashu_fx.t2i import generate_images
from flashu_fx.testbed.checkpoint import flashu_config
from flashu_fx.testbed.tokenizer import WordTokenizer

# The paper's ablations (Tables 5 and 6): the FlashU settings with one technique (or all but FFN pruning) off.
# The paper's ablation rows: flashu_config's named overrides ("full" is the flashu rows). Every override keeps the
# FFN pruning ratio, so one layout serves all rows.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    task: {name: overrides for name, overrides in PAPER_ABLATIONS[task].items() if name != "full"}
    for task in ("gen", "und")
}
BASELINE = "baseline"
MAIN_ROWS = (BASELINE, "flashu-eager", "compiled-exact", "compiled-flashu")
ROWS: dict[str, tuple[str, ...]] = {task: (*MAIN_ROWS, *ABLATIONS[task]) for task in ("gen", "und")}
# The fidelity pairs: (compiled row, its eager twin).
TWINS = (("compiled-flashu", "flashu-eager"), ("compiled-exact", BASELINE))

GenDecision = tuple[tuple[int, ...], str, bool, float, bool]  # skipped, head, trunk ran, guidance, pruned FFN


@dataclass(frozen=True)
class RowSpec:
    """One row: ``compiled`` runs through ``flashu_backend``; ``config`` None is the exact computation."""

    name: str
    task: str
    compiled: bool
    config: FlashUConfig | None


def row_config(task: str, name: str, settings: dict[str, Any] | None = None) -> FlashUConfig | None:
    """The FlashU settings of row ``name`` (None: the baseline computation): the testbed's, then ``settings``
    (every FlashU row), then the row's ablation (so an ablation row still turns its technique off)."""
    if name in (BASELINE, "compiled-exact"):
        return None
    ablation = {} if name in ("flashu-eager", "compiled-flashu") else ABLATIONS[task][name]
    return flashu_config(task, **{**(settings or {}), **ablation})


def select_row_specs(task: str, names: list[str] | None, settings: dict[str, Any] | None = None) -> list[RowSpec]:
    """The rows named (default: all), the baseline first (every score is compared with it), each FlashU row
    with ``settings`` applied; raises naming an unknown row and the allowed ones."""
    if task not in ROWS:
        raise ValueError(f"task={task!r} is invalid: allowed 'gen' or 'und'")
    wanted = list(ROWS[task]) if names is None else names
    unknown = [n for n in wanted if n not in ROWS[task]]
    if unknown:
        raise ValueError(f"unknown {task} row(s) {unknown}: allowed {list(ROWS[task])}")
    ordered = [BASELINE, *dict.fromkeys(n for n in wanted if n != BASELINE)]
    return [RowSpec(n, task, n.startswith("compiled-"), row_config(task, n, settings)) for n in ordered]


@dataclass
class Env:
    """What every row runs on: the (permuted) testbed model, its tokenizer and layout, the sampling settings."""

    model: Showo2
    tokenizer: WordTokenizer
    layout: FFNLayout | None
    steps: int  # grid points of the baseline sampler (FlashU rows: config.num_points(steps))
    guidance: float
    max_new_tokens: int
    backend_options: dict[str, Any]  # extra flashu_backend keyword arguments (``--option``)


@dataclass
class GenOutput:
    latents: Tensor  # (B, C, h, w) fp32 on the CPU
    decisions: list[GenDecision]  # one per model call, for the whole batch


@dataclass
class UndOutput:
    text: str
    kept_positions: tuple[int, ...] | None  # None: no token pruning
    skipped: list[tuple[int, ...]]  # per step (0 = prefill)
    image_values: tuple[int, Tensor] | None = None  # eager FlashU: (first image position, values (num_image, C))


GenRunner = Callable[[list[str], int], GenOutput]  # (captions, noise seed) -> output
UndRunner = Callable[[Tensor, str], UndOutput]  # (latents (1, C, h, w), question) -> output


def full_calls(calls: int, guidance: float) -> list[GenDecision]:
    """The decisions of the exact computation: every call runs everything at guidance g."""
    return [((), "compute", True, float(guidance), False)] * calls


def compile_model(model: Showo2, backend) -> torch.nn.Module:
    """``torch.compile`` with the backend, from a clean Dynamo cache: every compiled row adds an entry to
    ``Showo2.forward``'s cache, and past the recompile limit Dynamo would run the model eagerly."""
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, options=lean_guard_options())


def gen_runner(spec: RowSpec, env: Env) -> GenRunner:
    """The row's generation of one batch (nothing runs here: a compiled row compiles on its first batch)."""
    model, tok, config, g = env.model, env.tokenizer, spec.config, env.guidance
    if not spec.compiled and config is None:
        def run(captions: list[str], seed: int) -> GenOutput:
            latents = generate_images(model, captions, tok, steps=env.steps, guidance=g, seed=seed)
            return GenOutput(latents.cpu(), full_calls(env.steps - 1, g))
    elif not spec.compiled:
        def run(captions: list[str], seed: int) -> GenOutput:
            out = generate_images_flashu(model, captions, config, env.layout, tok, baseline_steps=env.steps,
                                         guidance=g, seed=seed)
            decisions = [(r.skipped, r.head, r.trunk, float(r.guidance), r.ffn_pruned) for r in out.records]
            return GenOutput(out.latents.cpu(), decisions)
    else:
        backend = flashu_backend("gen", config, env.layout if config else None, **env.backend_options)
        compiled = compile_model(model, backend)
        calls = (env.steps if config is None else config.num_points(env.steps)) - 1
        # The backend's host plans (generate_images_compiled asks for the same ones): each call's guidance and FFN
        # phase; its records say what each call ran (skipped layers, head action, trunk).
        plans = backend.begin_image(calls, g)

        def run(captions: list[str], seed: int) -> GenOutput:
            latents = generate_images_compiled(compiled, backend, captions, tok, baseline_steps=env.steps,
                                               guidance=g, seed=seed)
            decisions = [(r.skip_set, r.head, r.trunk_ran, float(p.guidance), p.ffn_pruned)
                         for r, p in zip(backend.records, plans, strict=True)]
            return GenOutput(latents.cpu(), decisions)
    return run


def und_runner(spec: RowSpec, env: Env) -> UndRunner:
    """The row's answer to one question (greedy, ``env.max_new_tokens`` at most, stopping at eos)."""
    model, tok, config, budget = env.model, env.tokenizer, spec.config, env.max_new_tokens
    if not spec.compiled and config is None:
        def run(latents: Tensor, question: str) -> UndOutput:
            answer = answer_question(model, latents, question, tok, max_new_tokens=budget, kv_cache=True)
            return UndOutput(answer.text, None, [()] * len(answer.ids))
    elif not spec.compiled:
        def run(latents: Tensor, question: str) -> UndOutput:
            answer = answer_question_flashu(model, latents, question, config, env.layout, tok, max_new_tokens=budget)
            values = None if answer.image_values is None else (answer.image_start, answer.image_values)
            return UndOutput(answer.text, answer.kept_positions, [s.skipped for s in answer.steps], values)
    else:
        backend = flashu_backend("und", config, env.layout if config else None, **env.backend_options)
        compiled = compile_model(model, backend)

        def run(latents: Tensor, question: str) -> UndOutput:
            answer = answer_question_compiled(compiled, backend, latents, question, tok, max_new_tokens=budget)
            return UndOutput(answer.text, answer.kept_positions, [s.skipped for s in answer.steps])
    return run
