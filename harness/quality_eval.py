"""Running one quality row over the held-out set: timing, decoding and scoring.

Generation runs the prompts in batches of ``batch`` (noise seed ``seed + batch index``, so every row denoises the
same noise); understanding answers one question at a time. Latency is the median over the timed batches (or
answers) of the seconds per image (per answer); ``warmup`` untimed runs of the first batch (question) come first,
and of the last batch when it is smaller, so a compiled row's compilations are not in it. Every output is kept: the
scores, the latents (generation) and the decisions feed the fidelity comparison of a compiled row with its eager twin.

Under torchrun each rank runs its share (batches j = rank, rank + N, ...; questions likewise) with the same seeds as
one process would, and rank 0 puts the results back in order: the same latents, answers and scores as one process.
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
from harness.distributed import Ranks
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
    miss_causes: dict[str, dict[str, int]] = field(default_factory=dict)  # scorer.miss_causes: how the misses miss

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
    return scene_latents(world.render_batch([item.scene for item in items]), device, dtype)


def scene_latents(images: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rendered scenes uint8 (N, H, W, 3) encoded: (N, C, h, w) in the model dtype on its device."""
    return codec.encode(torch.from_numpy(images)).to(device=device, dtype=dtype)


def run_gen_row(spec: RowSpec, env: Env, prompts: Sequence[world.GenPrompt], batch: int, seed: int,
                warmup: int, progress: bool = True, ranks: Ranks | None = None) -> GenRowResult | None:
    """Generate every prompt with the row, score the decoded images, time each batch (rank 0's result under
    torchrun, None on the other ranks)."""
    ranks = ranks or Ranks()
    device = next(env.model.parameters()).device
    run = gen_runner(spec, env)
    groups = [list(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    captions = [[p.caption for p in group] for group in groups]
    mine = ranks.share(range(len(groups)))
    # This rank's first batch warms up, and its last when smaller (another shape: a compiled row recompiles for it).
    shapes = []
    if mine:
        shapes = [mine[0]] + ([mine[-1]] if len(groups[mine[-1]]) != len(groups[mine[0]]) else [])
    warm = [timed(lambda j=j: run(captions[j], seed + j), device)[1] for _ in range(warmup) for j in shapes]
    done = {}
    for j in tqdm(mine, desc=f"gen {spec.name}", disable=not (progress and ranks.is_main), leave=False):
        out, sec = timed(lambda j=j: run(captions[j], seed + j), device)
        done[j] = (out.latents.float().cpu(), out.decisions, sec)
    shares = ranks.gather(dict(done=done, warm=warm))
    if shares is None:
        return None
    done = {j: result for share in shares for j, result in share["done"].items()}
    latents, decisions, seconds = zip(*(done[j] for j in range(len(groups))), strict=True)
    all_latents = torch.cat(latents)
    images = codec.decode(all_latents).numpy()
    found = [scorer.detect(image) for image in images]
    correct = [bool(scorer.score_detections(p, f)) for p, f in zip(prompts, found, strict=True)]
    return GenRowResult(spec, correct, scorer.geneval_summary(list(prompts), correct), all_latents, images,
                        list(decisions), [len(g) for g in groups], list(seconds), shares[0]["warm"],
                        scorer.miss_causes(list(prompts), found))


def run_und_row(spec: RowSpec, env: Env, items: Sequence[world.QAItem], latents: Tensor, warmup: int,
                progress: bool = True, ranks: Ranks | None = None) -> UndRowResult | None:
    """Answer every question with the row, score the answers, time each answer (rank 0's result under torchrun,
    None on the other ranks)."""
    ranks = ranks or Ranks()
    device = latents.device
    run = und_runner(spec, env)
    mine = ranks.share(range(len(items)))
    warm = [timed(lambda: run(latents[mine[0] : mine[0] + 1], items[mine[0]].question), device)[1]
            for _ in range(warmup if mine else 0)]
    done = {}
    for i in tqdm(mine, desc=f"und {spec.name}", disable=not (progress and ranks.is_main), leave=False):
        out, sec = timed(lambda i=i: run(latents[i : i + 1], items[i].question), device)
        norms = None
        if out.image_values is not None:  # the V-norms the selection ranked (fp32, all KV heads), after the timing
            norms = (out.image_values[0], out.image_values[1].float().norm(dim=-1).tolist())
        done[i] = (out.text, out.kept_positions, out.skipped, norms, sec)
    shares = ranks.gather(dict(done=done, warm=warm))
    if shares is None:
        return None
    done = {i: result for share in shares for i, result in share["done"].items()}
    answers, kept, skipped, norms, seconds = (list(column) for column in zip(*(done[i] for i in range(len(items))),
                                                                             strict=True))
    correct = [bool(scorer.score_answer(a, item)) for a, item in zip(answers, items, strict=True)]
    # A value within half an epsilon of another (relative) may round to either side of it.
    rounding = torch.finfo(next(env.model.parameters()).dtype).eps / 2
    return UndRowResult(spec, answers, correct, scorer.answer_summary(list(items), correct), kept, skipped, seconds,
                        shares[0]["warm"], norms, rounding)
