"""FlashUConfig: the knobs of the six FlashU techniques, with the paper's defaults per task.

Generation defaults are the paper's Table 7 (the reference's ``FlashUConfig``), understanding Table 8.
Every technique switches off on its own: a ratio or an interval of 0 (adaptive guidance: a ratio of 1).
The paper's ablations have names here (``ABLATIONS``, ``FlashUConfig.ablation``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["gen", "und"]
TASKS: tuple[str, ...] = ("gen", "und")
GuidanceSchedule = Literal["scaled", "reference"]
GUIDANCE_SCHEDULES: tuple[str, ...] = ("scaled", "reference")

# What FlashUConfig.off() overrides: every technique off.
OFF: dict[str, Any] = dict(
    ffn_prune_ratio=0.0,
    skip_ratio=0.0,
    head_cache_interval=0,
    hybrid_full_fraction=0.0,
    step_fraction=1.0,
    early_guidance_ratio=1.0,
    guidance_schedule="scaled",
    token_prune_ratio=0.0,
)

# The paper's ablations, by task and name: overrides of the task's defaults (FlashUConfig.ablation).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "gen": {
        "full": {},
        "no_layer_skip": dict(skip_ratio=0.0),
        "no_hybrid": dict(hybrid_full_fraction=0.0),  # every call pruned; guidance keeps its own phases
        "no_adaptive_guidance": dict(early_guidance_ratio=1.0),
        # FFN pruning alone, on every call: full grid, constant guidance, no hybrid phase, no skipping or cache
        "ffn_pruning_only": {k: v for k, v in OFF.items() if k != "ffn_prune_ratio"},
    },
    "und": {
        "full": {},
        "no_token_pruning": dict(token_prune_ratio=0.0),
        "no_layer_skip": dict(skip_ratio=0.0),
    },
}


@dataclass(frozen=True)
class FlashUConfig:
    """One task's FlashU settings (paper symbols in brackets)."""

    task: Task = "gen"
    ffn_prune_ratio: float = 0.2  # [r_p] share of FFN neurons pruned per layer (Wanda scores); 0 = off
    ffn_width_multiple: int = 64  # kept width rounded down to a multiple of this (8960 * 0.8 -> 7168)
    skip_ratio: float = 0.2  # [r_LS] share of LLM layers skipped (most similar input/output); 0 = off
    skip_interval: int = 10  # [T_LS] calls (gen) or decode steps (und) between similarity measurements
    head_cache_interval: int = 5  # [T_cache] gen: store the head output every this many calls; 0 = off
    hybrid_full_fraction: float = 0.3  # [tau] gen: the last share of calls runs the full FFN, no skip/cache
    step_fraction: float = 0.7  # gen: grid points relative to the baseline's (50 -> 35, i.e. 34 calls); 1 = off
    # Adaptive guidance s(t), gen: the last `guidance_full_fraction` of calls at full guidance, the others lower.
    # Its own phase split, independent of tau (the paper's "w/o Hybrid Network" keeps adaptive guidance).
    guidance_full_fraction: float = 0.3  # gen: the last share of calls at full guidance (10 of 34 calls)
    # "scaled" (default): early calls at early_guidance_ratio * g, the last at g, for the g the caller passes.
    # "reference": the reference code's fixed scales (reference_early_guidance, then reference_full_guidance);
    # the caller's g must then be reference_full_guidance (or 0: no CFG). The two agree at g = 10.
    guidance_schedule: GuidanceSchedule = "scaled"
    early_guidance_ratio: float = 0.75  # gen, "scaled": guidance multiplier of the early calls; 1 = off
    reference_early_guidance: float = 7.5  # gen, "reference": the early calls' scale (24 of 34 calls)
    reference_full_guidance: float = 10.0  # gen, "reference": the last calls' scale
    token_prune_layer: int = 1  # und: V-norm pruning at this LLM layer (0-based; the paper's "second layer")
    token_prune_ratio: float = 0.5  # und: share of image tokens dropped (largest V-norm); 0 = off
    calibration_samples: int = 1  # calibration inputs (gen: generations; und: image+question prefills)
    max_new_tokens: int = 128  # und: decoding budget

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"FlashUConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        check("task", self.task in TASKS, f"one of {TASKS}")
        check("ffn_prune_ratio", 0.0 <= self.ffn_prune_ratio < 1.0, "[0, 1)")
        check("ffn_width_multiple", self.ffn_width_multiple >= 1, ">= 1")
        check("skip_ratio", 0.0 <= self.skip_ratio < 1.0, "[0, 1)")
        check("skip_interval", self.skip_interval >= 0, ">= 0 (0 = never re-measure: skipping off)")
        check("head_cache_interval", self.head_cache_interval >= 0, ">= 0 (0 = off)")
        check("hybrid_full_fraction", 0.0 <= self.hybrid_full_fraction <= 1.0, "[0, 1]")
        check("step_fraction", 0.0 < self.step_fraction <= 1.0, "(0, 1]")
        check("early_guidance_ratio", 0.0 < self.early_guidance_ratio <= 2.0, "(0, 2]")
        check("guidance_full_fraction", 0.0 <= self.guidance_full_fraction <= 1.0, "[0, 1]")
        check("guidance_schedule", self.guidance_schedule in GUIDANCE_SCHEDULES, f"one of {GUIDANCE_SCHEDULES}")
        check("reference_early_guidance", math.isfinite(self.reference_early_guidance)
              and self.reference_early_guidance >= 0, "a finite number >= 0")
        check("reference_full_guidance", math.isfinite(self.reference_full_guidance)
              and self.reference_full_guidance > 0, "a finite number > 0")
        check("token_prune_layer", self.token_prune_layer >= 0, ">= 0")
        check("token_prune_ratio", 0.0 <= self.token_prune_ratio < 1.0, "[0, 1)")
        check("calibration_samples", self.calibration_samples >= 1, ">= 1")
        check("max_new_tokens", self.max_new_tokens >= 1, ">= 1")
        if self.task == "und" and self.head_cache_interval:
            raise ValueError("FlashUConfig.head_cache_interval applies to task='gen' only; set it to 0 for 'und'")

    @classmethod
    def for_task(cls, task: Task, **overrides: Any) -> FlashUConfig:
        """The paper's defaults for ``task`` (gen: Table 7; und: Table 8), with overrides."""
        if task == "und":
            base = dict(
                task="und",
                ffn_prune_ratio=0.1,
                skip_ratio=0.1,
                head_cache_interval=0,
                hybrid_full_fraction=0.0,
                step_fraction=1.0,
                early_guidance_ratio=1.0,
                calibration_samples=20,
            )
        elif task == "gen":
            base = dict(task="gen")
        else:
            raise ValueError(f"FlashUConfig.task={task!r} is invalid: allowed one of {TASKS}")
        return cls(**{**base, **overrides})

    @classmethod
    def off(cls, task: Task) -> FlashUConfig:
        """Every technique off: the plain eager pipeline."""
        return cls.for_task(task, **OFF)

    @classmethod
    def ablation(cls, task: Task, name: str, **overrides: Any) -> FlashUConfig:
        """The paper's ablation ``name`` of ``task`` (``ABLATIONS``): the task's defaults with one part removed."""
        if task not in ABLATIONS:
            raise ValueError(f"FlashUConfig.task={task!r} is invalid: allowed one of {TASKS}")
        if name not in ABLATIONS[task]:
            raise ValueError(f"ablation name={name!r} is invalid for task {task!r}: allowed one of "
                             f"{tuple(ABLATIONS[task])}")
        return cls.for_task(task, **{**ABLATIONS[task][name], **overrides})

    def kept_ffn_width(self, intermediate_size: int) -> int:
        """Kept FFN neurons: floor((I - int(I * r_p)) / multiple) * multiple (8960 -> 7168 at r_p 0.2)."""
        if self.ffn_prune_ratio == 0:
            return intermediate_size
        kept = (intermediate_size - int(intermediate_size * self.ffn_prune_ratio)) // self.ffn_width_multiple
        if kept < 1:
            raise ValueError(
                f"ffn_prune_ratio={self.ffn_prune_ratio} leaves no neurons of {intermediate_size} "
                f"at multiple {self.ffn_width_multiple}"
            )
        return kept * self.ffn_width_multiple

    def num_skipped_layers(self, num_layers: int) -> int:
        """int(num_layers * r_LS): 5 of 28 at 0.2."""
        return int(num_layers * self.skip_ratio) if self.skip_interval > 0 else 0

    def num_points(self, baseline_points: int) -> int:
        """Grid points of the shorter FlashU grid: round(0.7 * 50) = 35; raises below 2 (no model call)."""
        points = round(baseline_points * self.step_fraction)
        if points < 2:
            raise ValueError(
                f"baseline_points={baseline_points!r} is invalid: FlashU's grid would have {points} point(s) "
                f"(round({self.step_fraction} * {baseline_points})); allowed >= {self.min_baseline_points()}"
            )
        return points

    def min_baseline_points(self) -> int:
        """The fewest baseline grid points whose FlashU grid still has 2 points (one model call): 3 at 0.7."""
        points = 2
        while round(points * self.step_fraction) < 2:
            points += 1
        return points

    def kept_tokens(self, num_image_tokens: int) -> int:
        """Image tokens kept by V-norm pruning (at least one)."""
        return max(1, num_image_tokens - int(num_image_tokens * self.token_prune_ratio))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlashUConfig:
        return cls(**data)
