"""The per-call plan of FlashU generation: what each of the denoising calls computes (docs/SHOWO2.md §5.4).

Calls are numbered s = 1..S (S = grid points - 1). Rules, in the reference's order:
- guidance (its own phases): the last floor(guidance_full_fraction * S) calls at the full scale, the others
  at the early one: g and 0.75 g ("scaled"), or the reference's fixed 10 and 7.5 ("reference");
- full phase: the last floor(tau * S) calls run the full FFN, all layers, the head computed;
- pruned phase: pruned FFN;
  layers: measure on s = 1, 1 + T_LS, ... (skip nothing, record similarities), else skip the current set;
  head: store when s % T_cache == 0, reuse when a stored output exists, else compute.
With the defaults both fractions are 0.3, so the two phase splits coincide (calls 25..34 of 34).
The plan is host data: the compiled executors read it outside any traced code.

Understanding has one rule per token step d (0 = the prefill): ``und_step_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

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


def phase_guidance(config: FlashUConfig, guidance: float) -> tuple[float, float]:
    """(early, full) guidance scales for the caller's ``guidance`` g (0 = no CFG: both 0)."""
    if config.guidance_schedule == "scaled":
        return guidance * config.early_guidance_ratio, guidance
    if guidance == 0:
        return 0.0, 0.0
    if guidance != config.reference_full_guidance:
        raise ValueError(
            f"guidance={guidance!r} is invalid with FlashUConfig.guidance_schedule='reference', whose scales are "
            f"fixed ({config.reference_early_guidance}, then {config.reference_full_guidance}): allowed "
            f"{config.reference_full_guidance} or 0 (no guidance); or use guidance_schedule='scaled'"
        )
    return config.reference_early_guidance, config.reference_full_guidance


def gen_schedule(config: FlashUConfig, num_calls: int, guidance: float) -> list[StepPlan]:
    """Plans of calls 1..num_calls for guidance scale ``guidance`` (g: the scale of the last calls)."""
    if num_calls < 1:
        raise ValueError(f"num_calls must be >= 1, got {num_calls}")
    full_calls = int(config.hybrid_full_fraction * num_calls + 1e-9)
    full_guidance_calls = int(config.guidance_full_fraction * num_calls + 1e-9)
    early_guidance, full_guidance = phase_guidance(config, guidance)
    skipping = config.skip_ratio > 0 and config.skip_interval > 0
    plans, cached = [], False
    for s in range(1, num_calls + 1):
        g_s = full_guidance if s > num_calls - full_guidance_calls else early_guidance
        if s > num_calls - full_calls:
            plans.append(StepPlan(s, g_s, False, "all", "compute"))
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
        plans.append(StepPlan(s, g_s, config.ffn_prune_ratio > 0, layers, head))
    return plans


def exact_schedule(num_calls: int, guidance: float) -> list[StepPlan]:
    """Plans of calls 1..num_calls without FlashU: every call runs the whole network at guidance ``guidance``."""
    if num_calls < 1:
        raise ValueError(f"num_calls must be >= 1, got {num_calls}")
    return [StepPlan(s, guidance, False, "all", "compute") for s in range(1, num_calls + 1)]


def _choices(mode: object) -> str:
    """A Literal's values as an error message lists them: "'all', 'measure' or 'skip'"."""
    values = [repr(v) for v in get_args(mode)]
    return f"{', '.join(values[:-1])} or {values[-1]}"


def check_plans(plans: object, num_calls: int) -> None:
    """Raise ``ValueError`` unless ``plans`` is a schedule a generation executor can run: one ``StepPlan`` per call,
    numbered 1..num_calls, no skip before a measuring call chose the skip set, no head reuse before a store."""
    if not isinstance(plans, (list, tuple)) or len(plans) != num_calls:
        raise ValueError(f"plans={plans!r} is invalid: allowed a list of {num_calls} StepPlans, one per call")
    measured = stored = False
    for s, plan in enumerate(plans, start=1):
        if not isinstance(plan, StepPlan) or plan.call != s:
            raise ValueError(f"plans[{s - 1}]={plan!r} is invalid: allowed a StepPlan with call={s}")
        if plan.layers not in get_args(LayerMode) or plan.head not in get_args(HeadMode):
            raise ValueError(f"plans[{s - 1}]={plan!r} is invalid: allowed layers {_choices(LayerMode)} and head "
                             f"{_choices(HeadMode)}")
        if plan.layers == "skip" and not measured:
            raise ValueError(f"plans[{s - 1}]={plan!r} is invalid: a 'skip' call needs an earlier 'measure' call, "
                             "which chooses the layers it skips")
        if plan.head == "reuse" and not stored:
            raise ValueError(f"plans[{s - 1}]={plan!r} is invalid: a head 'reuse' call needs an earlier 'store' call")
        measured |= plan.layers == "measure"
        stored = (stored or plan.head == "store") and plan.head != "compute"


def und_step_layers(config: FlashUConfig, step: int) -> LayerMode:
    """Understanding's layer mode at token step ``step`` (0 = the prefill, d >= 1 = decode step d): with layer
    skipping on, measure (run every layer, record each one's importance) on d = 0, T_LS, 2 T_LS, ..., else skip the
    current set; "all" with skipping off. The eager decoder and the compiled executor both follow it."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (config.skip_ratio > 0 and config.skip_interval > 0):
        return "all"
    return "measure" if step % config.skip_interval == 0 else "skip"
