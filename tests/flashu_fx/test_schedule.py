"""gen_schedule against the 34-call table of docs/SHOWO2.md §5.4, structural properties, and config validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.schedule import gen_schedule

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
    assert config.num_points(50) == 50
    for p in gen_schedule(config, 49, 10.0):
        assert (p.guidance, p.ffn_pruned, p.layers, p.head, p.needs_trunk) == (10.0, False, "all", "compute", True)


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
)
def test_schedule_structure(num_calls, guidance, ffn, skip_ratio, skip_interval, cache, tau, early) -> None:
    config = FlashUConfig.for_task(
        "gen",
        ffn_prune_ratio=ffn,
        skip_ratio=skip_ratio,
        skip_interval=skip_interval,
        head_cache_interval=cache,
        hybrid_full_fraction=tau,
        early_guidance_ratio=early,
    )
    plans = gen_schedule(config, num_calls, guidance)
    full = int(tau * num_calls + 1e-9)
    assert len(plans) == num_calls
    stored = False
    for s, p in enumerate(plans, start=1):
        assert p.call == s
        assert p.needs_trunk == (p.head != "reuse" or p.layers == "measure")
        if s > num_calls - full:  # full phase: full FFN, every layer, head computed, guidance g
            assert (p.guidance, p.ffn_pruned, p.layers, p.head) == (guidance, False, "all", "compute")
            continue
        assert p.guidance == guidance * early and p.ffn_pruned == (ffn > 0)
        skipping = skip_ratio > 0 and skip_interval > 0
        assert p.layers == ("all" if not skipping else "measure" if (s - 1) % skip_interval == 0 else "skip")
        if cache and s % cache == 0:
            assert p.head == "store"
            stored = True
        else:
            assert p.head == ("reuse" if stored else "compute")  # never a reuse before the first store


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
