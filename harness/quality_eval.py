"""Running one quality row over the held-out set: timing, decoding and scoring.

Generation runs the prompts in batches of ``batch`` (noise seed ``seed + batch index``, so every row denoises the
same noise); understanding answers one question at a time. Latency is the median over the timed batches (or
answers) of the seconds per image (per answer); ``warmup`` untimed runs of the first batch (question) come first,
and of the last batch when it is smaller, so a compiled row's compilations are not in it. Every output is kept: the
scores, the latents (generation) and the decisions feed the fidelity comparison of a compiled row with its eager twin.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashu_fx.testbed import codec, scorer, world
from harness.quality_rows import Env, GenDecision, RowSpec, gen_runner, und_runner
from harness.rows import timed


@dataclass(frozen=True)
class Score:
    """An accuracy with its 95% interval and item count: one entry of a scorer summary."""

    accuracy: float
    interval: tuple[float, float]
    count: int

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> Score:
        """{"accuracy", "count", "ci95"} (scorer.geneval_summary / answer_summary) -> Score."""
        low, high = entry["ci95"]
        return cls(float(entry["accuracy"]), (float(low), float(high)), int(entry["count"]))


def overall_score(summary: dict[str, Any]) -> Score:
    return Score.parse(summary["overall"])


def group_scores(summary: dict[str, Any]) -> dict[str, Score]:
    """Per category (generation) or per question kind (understanding), in the scorer's order."""
    groups = summary.get("categories", summary.get("kinds", {}))
    return {name: Score.parse(entry) for name, entry in groups.items()}


@dataclass
class GenRowResult:
    spec: RowSpec
    correct: list[bool]  # per prompt
    summary: dict[str, Any]  # scorer.geneval_summary
    latents: Tensor  # (N, C, h, w) fp32 on the CPU, prompt order
    images: np.ndarray  # uint8 (N, S, S, 3) decoded
    decisions: list[list[GenDecision]]  # per batch, one per model call
    batch_sizes: list[int]
    seconds: list[float]  # per timed batch
    warmup_seconds: list[float] = field(default_factory=list)  # the untimed first-batch runs (compile included)

    @property
    def seconds_per_item(self) -> float:
        return statistics.median(s / n for s, n in zip(self.seconds, self.batch_sizes, strict=True))


@dataclass
class UndRowResult:
    spec: RowSpec
    answers: list[str]
    correct: list[bool]  # per question
    summary: dict[str, Any]  # scorer.answer_summary
    kept_positions: list[tuple[int, ...] | None]  # per question
    skipped: list[list[tuple[int, ...]]]  # per question, per step
    seconds: list[float]  # per answer
    warmup_seconds: list[float] = field(default_factory=list)
    # Eager FlashU rows: per question (first image position, V-norms of the image tokens at the pruning layer).
    image_vnorms: list[tuple[int, list[float]] | None] = field(default_factory=list)
    value_rounding: float = 0.0  # relative rounding of the row's dtype (bf16: 2^-8), the tie tolerance

    @property
    def seconds_per_item(self) -> float:
        return statistics.median(self.seconds)


def question_latents(items: Sequence[world.QAItem], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The questions' scenes rendered and encoded: (N, C, h, w) in the model dtype on its device."""
    images = torch.from_numpy(world.render_batch([item.scene for item in items]))
    return codec.encode(images).to(device=device, dtype=dtype)


def run_gen_row(spec: RowSpec, env: Env, prompts: Sequence[world.GenPrompt], batch: int, seed: int,
                warmup: int, progress: bool = True) -> GenRowResult:
    """Generate every prompt with the row, score the decoded images, time each batch."""
    device = next(env.model.parameters()).device
    run = gen_runner(spec, env)
    groups = [list(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    captions = [[p.caption for p in group] for group in groups]
    # A smaller last batch is another shape (a compiled row recompiles for it): it warms up too.
    shapes = [0] if len(groups[-1]) == len(groups[0]) else [0, len(groups) - 1]
    warm = [timed(lambda j=j: run(captions[j], seed + j), device)[1] for _ in range(warmup) for j in shapes]
    latents, decisions, seconds = [], [], []
    for j, group in enumerate(tqdm(captions, desc=f"gen {spec.name}", disable=not progress, leave=False)):
        out, sec = timed(lambda group=group, j=j: run(group, seed + j), device)
        latents.append(out.latents.float())
        decisions.append(out.decisions)
        seconds.append(sec)
    all_latents = torch.cat(latents)
    images = codec.decode(all_latents).numpy()
    correct = [bool(scorer.score_prompt(p, im)) for p, im in zip(prompts, images, strict=True)]
    return GenRowResult(spec, correct, scorer.geneval_summary(list(prompts), correct), all_latents, images,
                        decisions, [len(g) for g in groups], seconds, warm)


def run_und_row(spec: RowSpec, env: Env, items: Sequence[world.QAItem], latents: Tensor, warmup: int,
                progress: bool = True) -> UndRowResult:
    """Answer every question with the row, score the answers, time each answer."""
    device = latents.device
    run = und_runner(spec, env)
    warm = [timed(lambda: run(latents[:1], items[0].question), device)[1] for _ in range(warmup)]
    outputs, seconds = [], []
    for i, item in enumerate(tqdm(items, desc=f"und {spec.name}", disable=not progress, leave=False)):
        out, sec = timed(lambda i=i, item=item: run(latents[i : i + 1], item.question), device)
        outputs.append(out)
        seconds.append(sec)
    answers = [o.text for o in outputs]
    correct = [bool(scorer.score_answer(a, item)) for a, item in zip(answers, items, strict=True)]
    norms = [None if o.image_vnorms is None else (o.image_vnorms[0], o.image_vnorms[1].tolist()) for o in outputs]
    # A value within half an epsilon of another (relative) may round to either side of it.
    rounding = torch.finfo(next(env.model.parameters()).dtype).eps / 2
    return UndRowResult(spec, answers, correct, scorer.answer_summary(list(items), correct),
                        [o.kept_positions for o in outputs], [o.skipped for o in outputs], seconds, warm, norms,
                        rounding)
