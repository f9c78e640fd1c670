"""The per-call plan of FlashU generation: what each of the denoising calls computes (docs/SHOWO2.md §5.4).

Calls are numbered s = 1..S (S = grid points - 1). Rules, in the reference's order:
- full phase: the last floor(tau * S) calls run the full FFN, all layers, the head computed, guidance g;
- pruned phase: pruned FFN, guidance 0.75 g;
  layers: measure on s = 1, 1 + T_LS, ... (skip nothing, record similarities), else skip the current set;
  head: store when s % T_cache == 0, reuse when a stored output exists, else compute.
The plan is host data: the runtime reads it outside any traced code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashu_fx.flashu_config import FlashUConfig

LayerMode = Literal["all", "measure", "skip"]
HeadMode = Literal["compute", "store", "reuse"]


@dataclass(frozen=True)
class StepPlan:
    call: int  # s, 1-based
    guidance: float
    ffn_pruned: bool
    layers: LayerMode
    head: HeadMode

    @property
    def needs_trunk(self) -> bool:
        """Whether SigLIP, fusion and the LLM are live: a head reuse needs them only to measure."""
        return self.head != "reuse" or self.layers == "measure"


def gen_schedule(config: FlashUConfig, num_calls: int, guidance: float) -> list[StepPlan]:
    """Plans of calls 1..num_calls for guidance scale ``guidance`` (the full-phase value g)."""
    if num_calls < 1:
        raise ValueError(f"num_calls must be >= 1, got {num_calls}")
    full_calls = int(config.hybrid_full_fraction * num_calls + 1e-9)
    skipping = config.skip_ratio > 0 and config.skip_interval > 0
    plans, cached = [], False
    for s in range(1, num_calls + 1):
        full = s > num_calls - full_calls
        if full:
            plans.append(StepPlan(s, guidance, False, "all", "compute"))
            cached = False
            continue
        layers: LayerMode = "all"
        if skipping:
            layers = "measure" if (s - 1) % config.skip_interval == 0 else "skip"
        head: HeadMode = "compute"
        if config.head_cache_interval:
            if s % config.head_cache_interval == 0:
                head, cached = "store", True
            elif cached:
                head = "reuse"
        plans.append(StepPlan(s, guidance * config.early_guidance_ratio, config.ffn_prune_ratio > 0, layers, head))
    return plans
