"""gen_schedule against the 34-call table of docs/SHOWO2.md §5.4, the paper's ablations, structural properties,
and config validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.flashu_config import ABLATIONS, FlashUConfig
from flashu_fx.schedule import StepPlan, check_plans, exact_schedule, gen_schedule, und_step_layers

NUM_LAYERS = 28  # Show-o2 1.5B and 7B


def facts_table() -> list[tuple[float, str, int, str]]:
    """The 34 rows of docs/SHOWO2.md §5.4 as (guidance, FFN, skipped-layer count, head), written out by hand."""
    rows: dict[int, tuple[float, str, int, str]] = {}

    def fill(calls: range, guidance: float, ffn: str, skipped: int, head: str) -> None:
        for s in calls:
            rows[s] = (guidance, ffn, skipped, head)

    fill(range(1, 2), 7.5, "pruned", 0, "computed")  # recalc
    fill(range(2, 5), 7.5, "pruned", 5, "computed")
    fill(range(5, 6), 7.5, "pruned", 5, "stored")
    fill(range(6, 10), 7.5, "pruned", 5, "cached")
    fill(range(10, 11), 7.5, "pruned", 5, "stored")
    fill(range(11, 12), 7.5, "pruned", 0, "cached")  # recalc
    fill(range(12, 15), 7.5, "pruned", 5, "cached")
    fill(range(15, 16), 7.5, "pruned", 5, "stored")
    fill(range(16, 20), 7.5, "pruned", 5, "cached")
    fill(range(20, 21), 7.5, "pruned", 5, "stored")
    fill(range(21, 22), 7.5, "pruned", 0, "cached")  # recalc
    fill(range(22, 25), 7.5, "pruned", 5, "cached")
    fill(range(25, 35), 10.0, "full", 0, "computed")
    return [rows[s] for s in range(1, 35)]


HEAD_NAMES = {"compute": "computed", "store": "stored", "reuse": "cached"}


def test_defaults_reproduce_the_34_call_table() -> None:
    config = FlashUConfig.for_task("gen")
    assert config.num_points(50) == 35  # 35 grid points = 34 model calls
    plans = gen_schedule(config, 34, 10.0)
    n_skip = config.num_skipped_layers(NUM_LAYERS)
    assert n_skip == 5
    got = [
        (p.guidance, "pruned" if p.ffn_pruned else "full", n_skip if p.layers == "skip" else 0, HEAD_NAMES[p.head])
        for p in plans
    ]
    assert got == facts_table()
    assert [p.call for p in plans] == list(range(1, 35))
    assert [p.call for p in plans if p.layers == "measure"] == [1, 11, 21]
    assert all(p.layers == "all" for p in plans[24:])


def test_table_totals() -> None:
    plans = gen_schedule(FlashUConfig.for_task("gen"), 34, 10.0)
    assert sum(p.layers == "skip" for p in plans) == 21
    assert sum(p.ffn_pruned for p in plans) == 24
    assert sum(p.head == "reuse" for p in plans) == 16
    # Dead trunk on a reuse call unless it must measure: 16 reuses, 2 of them (s = 11, 21) measure.
    assert [p.call for p in plans if not p.needs_trunk] == [6, 7, 8, 9, 12, 13, 14, 16, 17, 18, 19, 22, 23, 24]


def test_everything_off_is_the_plain_pipeline() -> None:
    config = FlashUConfig.off("gen")
    assert config.guidance_schedule == "scaled"  # constant guidance, whatever the reference schedule's values
    assert config.num_points(50) == 50
    for p in gen_schedule(config, 49, 5.0):
        assert (p.guidance, p.ffn_pruned, p.layers, p.head, p.needs_trunk) == (5.0, False, "all", "compute", True)


# ---- the paper's ablations: each call's (guidance, FFN, layers, head), written out by hand ----------------
Row = tuple[float, str, str, str]


def spans(*parts: tuple[int, int, float, str, str, str]) -> list[Row]:
    """Rows of calls first..last (1-based, inclusive, in order and without gaps) -> one row per call."""
    rows: list[Row] = []
    for first, last, guidance, ffn, layers, head in parts:
        assert first == len(rows) + 1
        rows += [(guidance, ffn, layers, head)] * (last - first + 1)
    return rows


PRUNED_PHASE = (  # calls 1..24 of the defaults (docs/SHOWO2.md §5.4): pruned FFN, skipping, the head cache
    (1, 1, 7.5, "pruned", "measure", "compute"), (2, 4, 7.5, "pruned", "skip", "compute"),
    (5, 5, 7.5, "pruned", "skip", "store"), (6, 9, 7.5, "pruned", "skip", "reuse"),
    (10, 10, 7.5, "pruned", "skip", "store"), (11, 11, 7.5, "pruned", "measure", "reuse"),
    (12, 14, 7.5, "pruned", "skip", "reuse"), (15, 15, 7.5, "pruned", "skip", "store"),
    (16, 19, 7.5, "pruned", "skip", "reuse"), (20, 20, 7.5, "pruned", "skip", "store"),
    (21, 21, 7.5, "pruned", "measure", "reuse"), (22, 24, 7.5, "pruned", "skip", "reuse"),
)
FULL = spans(*PRUNED_PHASE, (25, 34, 10.0, "full", "all", "compute"))  # the defaults
NO_HYBRID = spans(  # every call pruned, skipping and caching to the end; guidance still g in the last 10 calls
    *PRUNED_PHASE,
    (25, 25, 10.0, "pruned", "skip", "store"), (26, 29, 10.0, "pruned", "skip", "reuse"),
    (30, 30, 10.0, "pruned", "skip", "store"), (31, 31, 10.0, "pruned", "measure", "reuse"),
    (32, 34, 10.0, "pruned", "skip", "reuse"),
)
NO_LAYER_SKIP = spans(
    (1, 4, 7.5, "pruned", "all", "compute"), (5, 5, 7.5, "pruned", "all", "store"),
    (6, 9, 7.5, "pruned", "all", "reuse"), (10, 10, 7.5, "pruned", "all", "store"),
    (11, 14, 7.5, "pruned", "all", "reuse"), (15, 15, 7.5, "pruned", "all", "store"),
    (16, 19, 7.5, "pruned", "all", "reuse"), (20, 20, 7.5, "pruned", "all", "store"),
    (21, 24, 7.5, "pruned", "all", "reuse"), (25, 34, 10.0, "full", "all", "compute"),
)
NO_ADAPTIVE_GUIDANCE = [(10.0, *row[1:]) for row in FULL]
FFN_PRUNING_ONLY = spans((1, 49, 10.0, "pruned", "all", "compute"))  # the full 50-point grid


@pytest.mark.parametrize(("name", "expected"), [
    ("full", FULL), ("no_hybrid", NO_HYBRID), ("no_layer_skip", NO_LAYER_SKIP),
    ("no_adaptive_guidance", NO_ADAPTIVE_GUIDANCE), ("ffn_pruning_only", FFN_PRUNING_ONLY),
])
def test_paper_ablations_call_by_call(name: str, expected: list[Row]) -> None:
    config = FlashUConfig.ablation("gen", name)
    plans = gen_schedule(config, config.num_points(50) - 1, 10.0)
    got = [(p.guidance, "pruned" if p.ffn_pruned else "full", p.layers, p.head) for p in plans]
    assert got == expected
    assert [p.call for p in plans] == list(range(1, len(expected) + 1))


def test_ablation_names_live_in_one_place() -> None:
    assert list(ABLATIONS["gen"]) == ["full", "no_layer_skip", "no_hybrid", "no_adaptive_guidance",
                                      "ffn_pruning_only"]
    assert list(ABLATIONS["und"]) == ["full", "no_token_pruning", "no_layer_skip"]
    und = FlashUConfig.for_task("und")
    assert FlashUConfig.ablation("und", "full") == und
    assert FlashUConfig.ablation("und", "no_token_pruning") == dataclasses.replace(und, token_prune_ratio=0.0)
    assert FlashUConfig.ablation("und", "no_layer_skip") == dataclasses.replace(und, skip_ratio=0.0)
    assert FlashUConfig.ablation("gen", "no_hybrid", skip_ratio=0.1).skip_ratio == 0.1  # overrides on top
    with pytest.raises(ValueError, match=r"ablation name='no_hybrid' is invalid for task 'und': allowed one of"):
        FlashUConfig.ablation("und", "no_hybrid")
    with pytest.raises(ValueError, match=r"FlashUConfig.task='edit' is invalid"):
        FlashUConfig.ablation("edit", "full")


# ---- guidance schedules -------------------------------------------------------------------------------
def test_guidance_has_its_own_phase_split() -> None:
    config = FlashUConfig.for_task("gen", hybrid_full_fraction=0.5, guidance_full_fraction=0.2)
    plans = gen_schedule(config, 10, 4.0)
    assert [p.guidance for p in plans] == [3.0] * 8 + [4.0] * 2
    assert [p.ffn_pruned for p in plans] == [True] * 5 + [False] * 5


def test_reference_schedule_uses_fixed_scales() -> None:
    reference = FlashUConfig.for_task("gen", guidance_schedule="reference")
    assert [p.guidance for p in gen_schedule(reference, 34, 10.0)] == [7.5] * 24 + [10.0] * 10
    assert gen_schedule(reference, 34, 10.0) == gen_schedule(FlashUConfig.for_task("gen"), 34, 10.0)  # agree at 10
    assert [p.guidance for p in gen_schedule(reference, 34, 0.0)] == [0.0] * 34  # no CFG
    custom = dataclasses.replace(reference, reference_early_guidance=6.0, reference_full_guidance=8.0)
    assert [p.guidance for p in gen_schedule(custom, 10, 8.0)] == [6.0] * 7 + [8.0] * 3
    scaled = [p.guidance for p in gen_schedule(FlashUConfig.for_task("gen"), 10, 5.0)]
    assert scaled == [3.75] * 7 + [5.0] * 3
    with pytest.raises(ValueError, match=r"^guidance=5.0 is invalid with FlashUConfig.guidance_schedule='reference'"
                                         r".*allowed 10.0 or 0"):
        gen_schedule(reference, 34, 5.0)


@settings(max_examples=200, deadline=None)
@given(
    num_calls=st.integers(1, 60),
    guidance=st.sampled_from([0.0, 5.0, 10.0]),
    ffn=st.sampled_from([0.0, 0.2]),
    skip_ratio=st.sampled_from([0.0, 0.1, 0.2]),
    skip_interval=st.integers(0, 12),
    cache=st.integers(0, 7),
    tau=st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0]),
    early=st.sampled_from([0.5, 0.75, 1.0]),
    guided_fraction=st.sampled_from([0.0, 0.2, 0.3, 1.0]),
)
def test_schedule_structure(num_calls, guidance, ffn, skip_ratio, skip_interval, cache, tau, early,
                            guided_fraction) -> None:
    config = FlashUConfig.for_task(
        "gen",
        ffn_prune_ratio=ffn,
        skip_ratio=skip_ratio,
        skip_interval=skip_interval,
        head_cache_interval=cache,
        hybrid_full_fraction=tau,
        early_guidance_ratio=early,
        guidance_full_fraction=guided_fraction,
    )
    plans = gen_schedule(config, num_calls, guidance)
    check_plans(plans, num_calls)  # what a caller's own schedule must satisfy, the config's always does
    full = int(tau * num_calls + 1e-9)
    full_guidance = int(guided_fraction * num_calls + 1e-9)
    assert len(plans) == num_calls
    stored = False
    for s, p in enumerate(plans, start=1):
        assert p.call == s
        assert p.needs_trunk == (p.head != "reuse" or p.layers == "measure")
        assert p.guidance == (guidance if s > num_calls - full_guidance else guidance * early)  # its own phases
        if s > num_calls - full:  # full phase: full FFN, every layer, head computed
            assert (p.ffn_pruned, p.layers, p.head) == (False, "all", "compute")
            continue
        assert p.ffn_pruned == (ffn > 0)
        skipping = skip_ratio > 0 and skip_interval > 0
        assert p.layers == ("all" if not skipping else "measure" if (s - 1) % skip_interval == 0 else "skip")
        if cache and s % cache == 0:
            assert p.head == "store"
            stored = True
        else:
            assert p.head == ("reuse" if stored else "compute")  # never a reuse before the first store


def plan(call: int, layers: str = "all", head: str = "compute") -> StepPlan:
    return StepPlan(call, 5.0, False, layers, head)


@pytest.mark.parametrize(("plans", "message"), [
    ([plan(1)], "allowed a list of 2 StepPlans"),
    ((plan(1), plan(1)), r"plans\[1\]=.* allowed a StepPlan with call=2"),
    ([plan(1), "all"], r"plans\[1\]='all' is invalid"),
    ([plan(1), plan(2, "everything")], "allowed layers 'all', 'measure' or 'skip'"),
    ([plan(1), plan(2, "skip")], "a 'skip' call needs an earlier 'measure' call"),
    ([plan(1), plan(2, head="reuse")], "a head 'reuse' call needs an earlier 'store' call"),
    ([plan(1, "measure", "store"), plan(2, "skip", "reuse")], None),
])
def test_check_plans_names_the_bad_plan(plans, message) -> None:
    if message is None:
        check_plans(plans, 2)
    else:
        with pytest.raises(ValueError, match=message):
            check_plans(plans, 2)


def test_a_compute_forgets_the_stored_head_output() -> None:
    check_plans([plan(1, head="store"), plan(2, head="reuse"), plan(3, "measure"), plan(4, "skip")], 4)
    with pytest.raises(ValueError, match=r"plans\[2\].*needs an earlier 'store'"):
        check_plans([plan(1, head="store"), plan(2), plan(3, head="reuse")], 3)
    check_plans(exact_schedule(5, 3.0), 5)


def test_num_calls_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_calls"):
        gen_schedule(FlashUConfig.for_task("gen"), 0, 10.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("task", "edit"),
        ("ffn_prune_ratio", 1.0),
        ("ffn_prune_ratio", -0.1),
        ("ffn_width_multiple", 0),
        ("skip_ratio", 1.0),
        ("skip_interval", -1),
        ("head_cache_interval", -1),
        ("hybrid_full_fraction", 1.5),
        ("step_fraction", 0.0),
        ("early_guidance_ratio", 0.0),
        ("guidance_full_fraction", -0.1),
        ("guidance_full_fraction", 1.5),
        ("guidance_schedule", "fixed"),
        ("reference_early_guidance", float("nan")),
        ("reference_early_guidance", -1.0),
        ("reference_full_guidance", 0.0),
        ("reference_full_guidance", float("inf")),
        ("token_prune_layer", -1),
        ("token_prune_ratio", 1.0),
        ("calibration_samples", 0),
        ("max_new_tokens", 0),
    ],
)
def test_bad_config_is_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"FlashUConfig.{field}"):
        FlashUConfig(**{field: value})


def test_und_rejects_a_head_cache() -> None:
    with pytest.raises(ValueError, match="head_cache_interval"):
        FlashUConfig.for_task("und", head_cache_interval=5)


@settings(deadline=None, max_examples=60)
@given(skip_ratio=st.sampled_from([0.0, 0.1, 0.5]), interval=st.integers(0, 12), step=st.integers(0, 200))
def test_und_step_layers_measure_every_interval_from_the_prefill(skip_ratio, interval, step) -> None:
    config = FlashUConfig.for_task("und", skip_ratio=skip_ratio, skip_interval=interval)
    mode = und_step_layers(config, step)
    if skip_ratio == 0 or interval == 0:
        assert mode == "all"
    else:
        assert mode == ("measure" if step % interval == 0 else "skip")
        assert und_step_layers(config, 0) == "measure"  # the prefill always measures


def test_und_step_layers_rejects_a_negative_step() -> None:
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        und_step_layers(FlashUConfig.for_task("und"), -1)
