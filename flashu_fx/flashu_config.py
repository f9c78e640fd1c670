"""FlashUConfig: the knobs of the six FlashU techniques, with the paper's defaults per task.

Generation defaults are the paper's Table 7 (the reference's ``FlashUConfig``), understanding Table 8.
Every technique switches off on its own: a ratio or an interval of 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["gen", "und"]
TASKS: tuple[str, ...] = ("gen", "und")


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
    early_guidance_ratio: float = 0.75  # gen: guidance multiplier in the pruned phase (adaptive s(t)); 1 = off
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
        return cls.for_task(
            task,
            ffn_prune_ratio=0.0,
            skip_ratio=0.0,
            head_cache_interval=0,
            hybrid_full_fraction=0.0,
            step_fraction=1.0,
            early_guidance_ratio=1.0,
            token_prune_ratio=0.0,
        )

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
