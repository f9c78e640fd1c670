"""``python -m harness quality`` on a random-weight testbed, CPU: every row runs, the report holds what it promises,
and the compiled rows track their eager twins."""

from __future__ import annotations

import collections
import json
import struct

import pytest
import torch

from flashu_fx.testbed.checkpoint import flashu_config
from harness import __main__ as cli
from harness import quality
from harness.arguments import flashu_setting
from harness.images import PNG_SIGNATURE
from harness.quality_eval import GenRowResult, Score, UndRowResult
from harness.quality_fidelity import gen_fidelity, swap_gap, und_fidelity
from harness.quality_report import relative_drop
from harness.quality_rows import ABLATIONS, BASELINE, ROWS, RowSpec, select_row_specs

PROMPTS, QUESTIONS = 2, 2


@pytest.fixture(scope="module")
def quality_run(random_testbed, tmp_path_factory):
    """One run of every row of both tasks: 2 prompts (one batch), 2 questions, 3 grid points (2 model calls)."""
    out = tmp_path_factory.mktemp("quality")
    argv = ["--weights", str(random_testbed), "--device", "cpu", "--prompts", str(PROMPTS), "--questions",
            str(QUESTIONS), "--batch", "2", "--steps", "3", "--warmup", "0", "--out", str(out), "--no-progress"]
    torch._dynamo.reset()
    try:
        report = quality.main(argv)
    finally:
        torch._dynamo.reset()
    return report, out


def test_report_structure(quality_run, capsys):
    report, out = quality_run
    assert json.loads((out / "quality.json").read_text())["settings"] == json.loads(json.dumps(report["settings"]))
    for key in ("device", "torch", "command", "settings", "testbed", "gen", "und", "seconds"):
        assert key in report
    assert report["tasks_done"] == ["gen", "und"]
    assert report["command"].startswith("python -m harness quality --weights")
    assert report["settings"]["dtype"] == "fp32" and report["settings"]["steps"] == 3
    for task, items, unit in (("gen", "prompts", "seconds_per_image"), ("und", "questions", "seconds_per_answer")):
        part = report[task]
        assert len(part[items]) == (PROMPTS if task == "gen" else QUESTIONS)
        assert list(part["rows"]) == list(ROWS[task])  # every row, the baseline first
        for name, row in part["rows"].items():
            assert len(row["correct"]) == len(part[items]), name
            assert 0.0 <= row["overall"] <= 1.0 and row["summary"]["overall"] is not None
            assert row[unit] > 0 and len(row["seconds"]) >= 1
            assert "relative_drop_pct" in row
        assert part["rows"][BASELINE]["config"] is None
        assert set(part["fidelity"]) == {"compiled-flashu vs flashu-eager", "compiled-exact vs baseline"}
        for f in part["fidelity"].values():
            assert 0.0 <= f["identical_decisions"] <= 1.0 and 0.0 <= f["scorer_agreement"] <= 1.0
            assert isinstance(f["score_difference"], float) and set(f["passes"]) >= {"decisions", "score"}
    gen = report["gen"]["rows"]
    categories = collections.Counter(p["category"] for p in report["gen"]["prompts"])
    for name, row in gen.items():  # every prompt once among its category's causes; "right" where it was scored so
        assert {c: sum(v.values()) for c, v in row["miss_causes"].items()} == categories, name
        assert sum(v["right"] for v in row["miss_causes"].values()) == sum(row["correct"]), name
    assert gen["no_hybrid"]["config"]["hybrid_full_fraction"] == 0.0
    assert [len(batch) for batch in gen["compiled-flashu"]["decisions"]] == [1]  # FlashU: 3 * 0.7 -> 2 points
    assert [len(batch) for batch in gen[BASELINE]["decisions"]] == [2]
    und = report["und"]["rows"]
    assert all(k is not None for k in und["flashu-eager"]["kept_positions"])
    assert all(k is None for k in und["no_token_pruning"]["kept_positions"])


def test_a_run_stopped_in_its_understanding_half_keeps_the_generation_half(random_testbed, tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as a time limit's signal would stop it
    monkeypatch.setattr(quality, "run_und_row", stopped)
    argv = ["--weights", str(random_testbed), "--device", "cpu", "--prompts", "2", "--questions", "2", "--batch", "2",
            "--steps", "3", "--warmup", "0", "--rows", "baseline", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(KeyboardInterrupt):
        quality.main(argv)
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["tasks_done"] == ["gen"] and "und" not in saved
    assert len(saved["gen"]["rows"][BASELINE]["correct"]) == 2 and saved["seconds"] > 0


def test_compiled_rows_track_their_eager_twins(quality_run):
    """fp32 on the CPU: compiled exact equals the eager baseline up to float rounding, prompt by prompt."""
    report, _ = quality_run
    rows = report["gen"]["rows"]
    for pair, candidate, reference in (("compiled-exact vs baseline", "compiled-exact", BASELINE),
                                       ("compiled-flashu vs flashu-eager", "compiled-flashu", "flashu-eager")):
        fid = report["gen"]["fidelity"][pair]
        assert rows[candidate]["correct"] == rows[reference]["correct"]
        assert min(fid["latent_cosine"]["per_prompt"]) > 0.999 and fid["latent_cosine"]["min"] > 0.999
        assert fid["identical_decisions"] == 1.0 and fid["scorer_agreement"] == 1.0
        assert fid["passes"]["decisions"] and fid["passes"]["latent_cosine"]
        und = report["und"]["fidelity"][pair]
        assert und["identical_decisions"] == 1.0 and und["same_answer_text"] == 1.0


def test_grid_and_table(quality_run):
    pytest.importorskip("matplotlib")
    report, out = quality_run
    data = (out / "quality_grid.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and report["gen"]["grid"] == str(out / "quality_grid.png")
    width, height = struct.unpack(">II", data[16:24])
    assert height > width  # 8 method rows of 2 prompts


def test_rows_and_ablations():
    names = [s.name for s in select_row_specs("gen", ["no_hybrid", "compiled-exact"])]
    assert names == [BASELINE, "no_hybrid", "compiled-exact"]
    by_name = {s.name: s for s in select_row_specs("gen", None)}
    assert by_name[BASELINE].config is None and not by_name[BASELINE].compiled
    assert by_name["compiled-exact"].config is None and by_name["compiled-exact"].compiled
    assert by_name["flashu-eager"].config == flashu_config("gen")
    only = by_name["ffn_pruning_only"].config
    assert (only.skip_ratio, only.head_cache_interval, only.step_fraction, only.early_guidance_ratio,
            only.hybrid_full_fraction) == (0.0, 0, 1.0, 1.0, 0.0)
    assert only.ffn_prune_ratio == flashu_config("gen").ffn_prune_ratio  # one FFN layout serves every row
    und = {s.name: s.config for s in select_row_specs("und", None)}
    assert und["no_token_pruning"].token_prune_ratio == 0.0 and und["no_layer_skip"].skip_ratio == 0.0
    assert set(ABLATIONS["und"]) < set(ROWS["und"])
    with pytest.raises(ValueError, match=r"unknown gen row\(s\) \['no_token_pruning'\]: allowed"):
        select_row_specs("gen", ["no_token_pruning"])


def test_relative_drop():
    assert relative_drop(0.45, 0.5) == pytest.approx(-10.0) and relative_drop(0.5, 0.5) == 0.0
    assert relative_drop(0.2, 0.0) is None  # no relative change from a zero baseline


def test_bad_arguments(random_testbed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--weights", str(random_testbed), "--rows", "baseline,fastest", "--device", "cpu"])
    assert "--rows: unknown row(s) ['fastest']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--weights", str(tmp_path / "none"), "--device", "cpu"])
    assert f"--weights {tmp_path / 'none'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--weights", str(random_testbed), "--prompts", "0", "--device", "cpu"])
    assert "--prompts must be >= 1, got 0" in capsys.readouterr().err
    assert "quality" in cli.COMMANDS


def _gen_result(name: str, decisions: list, latents: torch.Tensor, correct: list[bool]) -> GenRowResult:
    spec = RowSpec(name, "gen", name.startswith("compiled"), None)
    summary = {"overall": {"accuracy": sum(correct) / len(correct), "count": len(correct), "ci95": (0.2, 0.8)}}
    return GenRowResult(spec, correct, summary, latents, None, decisions, [1] * len(decisions), [1.0] * len(decisions))


def test_gen_fidelity_counts_each_difference():
    latents = torch.randn(4, 16, 2, 2)
    calls = [((), "compute", True, 3.0, True), ((1,), "reuse", False, 3.0, True)]
    reference = _gen_result("flashu-eager", [calls] * 4, latents, [True, True, False, False])
    moved = latents.clone()
    moved[3] = -moved[3]
    other = [calls, calls, calls, [calls[0], ((2,), "reuse", False, 3.0, True)]]
    candidate = _gen_result("compiled-flashu", other, moved, [True, True, False, True])
    f = gen_fidelity(candidate, reference)
    assert f["decision_unit"] == "prompt" and f["identical_decisions"] == 0.75 and f["differing_batches"] == [3]
    assert f["latent_cosine"]["min"] == pytest.approx(-1.0) and f["latent_cosine"]["median"] == pytest.approx(1.0)
    assert f["scorer_agreement"] == 0.75 and f["score_difference"] == pytest.approx(0.25)
    assert f["within_interval"] and f["passes"] == {"decisions": False, "latent_cosine": True, "score": True}


def test_und_fidelity_compares_tokens_skips_and_text():
    def result(name, answers, kept, skipped):
        correct = [a == "red" for a in answers]
        summary = {"overall": {"accuracy": sum(correct) / 2, "count": 2, "ci95": (0.4, 0.6)}}
        return UndRowResult(RowSpec(name, "und", False, None), answers, correct, summary, kept, skipped, [0.1, 0.1])

    reference = result("flashu-eager", ["red", "blue"], [(1, 2), (3, 4)], [[(), (5,)], [(), (5,)]])
    candidate = result("compiled-flashu", ["red", "red"], [(1, 2), (3, 5)], [[(), (5,)], [(), (5,)]])
    f = und_fidelity(candidate, reference)
    assert (f["same_kept_tokens"], f["same_skip_decisions"], f["identical_decisions"]) == (0.5, 1.0, 0.5)
    assert f["same_answer_text"] == 0.5 and f["differing_questions"] == [1] and f["within_interval"] is False
    assert Score.parse({"accuracy": 0.5, "count": 2, "ci95": [0.1, 0.9]}) == Score(0.5, (0.1, 0.9), 2)


def test_swap_gap_measures_the_distance_to_the_selection_threshold():
    evidence = (10, [1.0, 2.0, 2.01, 5.0])  # positions 10..13; the reference keeps 10 and 11
    assert swap_gap((10, 11), (10, 11), evidence) == 0.0
    assert swap_gap((10, 12), (10, 11), evidence) == pytest.approx(0.005 / 2.005)  # 2.0 and 2.01 straddle 2.005
    assert swap_gap((10, 13), (10, 11), evidence) == pytest.approx(2.995 / 2.005)  # a real difference


def test_und_fidelity_accepts_swaps_within_rounding_only():
    def result(name, kept, norms=None):
        summary = {"overall": {"accuracy": 1.0, "count": 3, "ci95": (0.4, 1.0)}}
        return UndRowResult(RowSpec(name, "und", name.startswith("compiled"), None), ["red"] * 3, [True] * 3,
                            summary, kept, [[()]] * 3, [0.1] * 3, [], norms or [], 2.0**-8)

    evidence = [(0, [1.0, 2.0, 2.004, 9.0])] * 3  # tokens 1 and 2 tie at bf16 resolution (gap 0.1%)
    reference = result("flashu-eager", [(0, 1), (0, 1), (0, 1)], evidence)
    candidate = result("compiled-flashu", [(0, 1), (0, 2), (0, 3)])
    f = und_fidelity(candidate, reference)
    assert f["same_kept_tokens"] == pytest.approx(1 / 3) and f["same_kept_tokens_up_to_ties"] == pytest.approx(2 / 3)
    assert f["tie_tolerance"] == 2.0**-8 and set(f["swap_gaps"]) == {"1", "2"}
    assert f["passes"]["decisions"] is False and f["passes"]["decisions_up_to_ties"] is False  # question 2
    candidate = result("compiled-flashu", [(0, 1), (0, 2), (0, 2)])
    assert und_fidelity(candidate, reference)["passes"]["decisions_up_to_ties"] is True


def test_settings_apply_to_every_flashu_row_but_ablations_win():
    settings = dict([flashu_setting("token_prune_ratio=0.25"), flashu_setting("skip_ratio=0.0")])
    by_name = {s.name: s.config for s in select_row_specs("und", None, settings)}
    assert by_name[BASELINE] is None and by_name["compiled-exact"] is None
    assert by_name["flashu-eager"].token_prune_ratio == 0.25 == by_name["compiled-flashu"].token_prune_ratio
    assert by_name["no_token_pruning"].token_prune_ratio == 0.0  # the ablation still turns its technique off
    assert all(c.skip_ratio == 0.0 for c in by_name.values() if c is not None)


@pytest.mark.parametrize("text, message", [
    ("token_prune_ratio", "allowed KEY=VALUE"),
    ("no_such=1", "allowed KEY=VALUE"),
    ("ffn_prune_ratio=0.3", "come with the calibration and cannot change"),
    ("skip_interval=often", "skip_interval takes a int, got 'often'"),
])
def test_bad_settings_are_named(text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        flashu_setting(text)


def test_bad_setting_on_the_command_line(random_testbed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--weights", str(random_testbed), "--set", "token_prune_ratio=1.5", "--out", str(tmp_path)])
    assert "token_prune_ratio=1.5 is invalid: allowed [0, 1)" in capsys.readouterr().err


def test_torchrun_quality_scores_as_one_process(random_testbed, tmp_path):
    from torchrun import run_torchrun

    args = ["--weights", str(random_testbed), "--device", "cpu", "--prompts", "3", "--questions", "3", "--batch", "1",
            "--steps", "3", "--warmup", "0", "--rows", "baseline,flashu-eager", "--no-progress"]
    done = run_torchrun("quality", [*args, "--out", str(tmp_path / "dp")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout and done.stdout.count("wrote ") == 1  # rank 0 alone reports
    sharded = json.loads((tmp_path / "dp" / "quality.json").read_text())
    torch._dynamo.reset()
    quality.main([*args, "--out", str(tmp_path / "single")])
    single = json.loads((tmp_path / "single" / "quality.json").read_text())
    assert sharded["settings"]["processes"] == 2 and single["settings"]["processes"] == 1
    for task, items in (("gen", "prompts"), ("und", "questions")):
        assert sharded[task][items] == single[task][items]
        for name, row in single[task]["rows"].items():
            other = sharded[task]["rows"][name]
            assert other["correct"] == row["correct"] and other["summary"] == row["summary"], (task, name)
            assert other.get("decisions") == row.get("decisions") and other.get("answers") == row.get("answers")
            assert len(other["seconds"]) == len(row["seconds"])  # every batch / question timed once


def test_miss_table_lists_each_rows_layout_misses_by_cause():
    from harness.quality_report import miss_table

    latents = torch.zeros(1, 16, 2, 2)
    rows = [_gen_result(name, [[]], latents, [True]) for name in ("baseline", "flashu-eager")]
    assert miss_table(rows) is None  # no layout prompt scored: no table
    rows[0].miss_causes = {"position": {"right": 3, "a named shape missing": 1, "relation reversed": 2,
                                        "neither way": 0}}
    rows[1].miss_causes = {"counting": {"right": 1, "too few": 0, "too many": 1}}
    header, rule, first, second = miss_table(rows).splitlines()
    assert header.split("  ")[0] == "row" and "position: relation reversed" in header and "counting" not in header
    assert first.split() == ["baseline", "3", "1", "2", "0"]
    assert second.split() == ["flashu-eager", "0", "0", "0", "0"]  # a row without the category reads zeros
