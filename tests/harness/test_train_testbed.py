"""``train-testbed``: the record of a continued run names every earlier run behind its weights; its option parsers;
bad run options refused before any work."""

from __future__ import annotations

import argparse
import collections
import json

import pytest
import torch

from flashu_fx.testbed import world
from flashu_fx.testbed.checkpoint import RECORD_FILE, load_testbed
from flashu_fx.testbed.diagnostics import EDITS, velocity_sensitivity
from harness.train_testbed import PROBE_PROMPTS, PROBE_TIMES, binding_probe, category_weights, earlier_runs, main


def _record(command: str, history: list[dict] | None = None) -> dict:
    record = dict(command=command, steps_done=10, train_seconds=5.0, device="cpu",
                  loss_log=[dict(step=9, loss=1.23456, flow=1.0, answer=0.23456)],
                  heldout=dict(guidance_sweep={"3.0": {"overall": {"accuracy": 0.5}}},
                               answers={"overall": {"accuracy": 0.75}}))
    if history is not None:
        record["history"] = history
    return record


def test_a_run_from_scratch_has_no_history(tmp_path):
    assert earlier_runs(None) == []
    assert earlier_runs(str(tmp_path)) == []  # an init without a record (e.g. real weights)


def test_history_chains_oldest_first(tmp_path):
    first = tmp_path / "run1"
    first.mkdir()
    (first / RECORD_FILE).write_text(json.dumps(_record("train-testbed --out run1")))
    second = tmp_path / "run2"
    second.mkdir()
    continued = _record("train-testbed --init run1", history=earlier_runs(str(first)))
    (second / RECORD_FILE).write_text(json.dumps(continued))
    chain = earlier_runs(str(second))
    assert [run["command"] for run in chain] == ["train-testbed --out run1", "train-testbed --init run1"]
    assert chain[0]["final"] == {"loss": 1.2346, "flow": 1.0, "answer": 0.2346}
    assert chain[1]["heldout_geneval_overall"] == {"3.0": 0.5} and chain[1]["heldout_answers"] == {"accuracy": 0.75}


def test_category_weights_name_categories_and_default_to_one():
    weights = category_weights("position=3,color_attr=2.5")
    assert dict(zip(world.CATEGORIES, weights, strict=True)) == dict(
        single_object=1.0, two_object=1.0, counting=1.0, colors=1.0, position=3.0, color_attr=2.5)


@pytest.mark.parametrize("text, named", [("posture=3", "posture"), ("position=x", "position=x"),
                                          ("position=-1", "category_weights")])
def test_bad_category_weights_name_the_argument(text, named):
    with pytest.raises(argparse.ArgumentTypeError, match=named):
        category_weights(text)


@pytest.mark.parametrize("argv, message", [
    (["--init", "runs/x", "--position-init", "sincos"],
     "--position-init sincos starts a run from scratch; --init runs/x"),
    (["--position-graft", "1"], "--position-graft 1.0 is invalid: allowed a number > 0, with --init"),
    (["--init", "runs/x", "--position-graft", "0"], "--position-graft 0.0 is invalid"),
    (["--compile", "none"], "TrainConfig.compile='none' is not a torch.compile backend: allowed"),
    (["--probe-every", "-1"], "--probe-every -1 is invalid: allowed an integer >= 0"),
    (["--sensitivity-prompts", "-2"], "--sensitivity-prompts -2 is invalid: allowed an integer >= 0"),
    (["--time-shift", "-3"], "--time-shift -3.0 is invalid: allowed a number > 0 (0: Show-o2's own shift)"),
    (["--time-shift", "nan"], "--time-shift nan is invalid"),
    (["--noise-end-share", "1.5"], "--noise-end-share 1.5 is invalid: allowed a share in [0, 1]"),
    (["--noise-end-share", "nan"], "--noise-end-share nan is invalid"),
])
def test_bad_run_options_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_binding_probe_measures_each_edit_at_t_0_2_and_at_the_noise_end(random_testbed):
    """Both edits at both probe times, each the velocity share ``velocity_sensitivity`` gives at that t (the noise
    end is where the world's own share applies), and the two times read differently."""
    tb = load_testbed(random_testbed)
    torch.manual_seed(0)
    found = binding_probe(tb.tokenizer)(tb.model)
    assert binding_probe(tb.tokenizer, 4)(tb.model) != found  # another number of prompts, another mean
    assert set(found) == {f"{e}_pull{s}" for e in EDITS for s in ("", "_noise_end")}
    assert PROBE_TIMES == {"": 0.2, "_noise_end": 0.01}
    for edit in EDITS:
        for suffix, t in PROBE_TIMES.items():
            expected = velocity_sensitivity(tb.model, tb.tokenizer, edit, n=PROBE_PROMPTS, t=t)
            assert found[f"{edit}_pull{suffix}"] == pytest.approx(expected, rel=1e-5)
        assert found[f"{edit}_pull"] != found[f"{edit}_pull_noise_end"]


def test_a_tiny_run_end_to_end_records_what_the_next_run_is_judged_by(tmp_path, monkeypatch):
    """Two CPU steps of the real command: the record holds the options (the noise-end share), the final binding
    probe at both t beside the world's own share, and the held-out prompts were drawn with one seed each (their
    index), so the numbers compare with a per-prompt evaluation elsewhere."""
    import harness.train_testbed as cli

    calls = []
    score = cli.score_generation

    def spy(model, tok, prompts, guidance, steps, **kwargs):
        calls.append((tuple(p.caption for p in prompts), guidance, list(kwargs.get("seeds"))))
        return score(model, tok, prompts, guidance, steps, **kwargs)

    monkeypatch.setattr(cli, "score_generation", spy)
    out = tmp_path / "run"
    main(["--device", "cpu", "--out", str(out), "--steps", "2", "--batch-gen", "2", "--batch-und", "2", "--pool", "64",
          "--pool-und", "32", "--eval-prompts", "3", "--eval-questions", "2", "--guidance-sweep", "2,4",
          "--eval-steps", "3", "--calib-gen", "0", "--calib-und", "0", "--sensitivity-prompts", "0",
          "--probe-every", "0", "--final-probe-prompts", "2", "--noise-end-share", "0.25"])
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["steps_done"] == 2 and record["train"]["noise_end_share"] == 0.25
    first, second = (tuple(p.caption for p in world.heldout_gen_prompts(3, draw)) for draw in (0, 1))
    assert first != second
    assert calls == [(first, 2.0, [0, 1, 2]), (second, 2.0, [0, 1, 2]), (first, 4.0, [0, 1, 2]),
                     (second, 4.0, [0, 1, 2])]
    heldout = record["heldout"]
    assert set(heldout["guidance_sweep"]) == set(heldout["guidance_sweep_second_draw"]) == {"2.0", "4.0"}
    # the sampling guidance is the second draw's best (the first of equals), not the reported draw's
    on_second = {float(g): v["overall"]["accuracy"] for g, v in heldout["guidance_sweep_second_draw"].items()}
    assert record["sampling"]["guidance"] == max(on_second, key=on_second.get)
    assert heldout["guidance_chosen_on"] == "the second draw"
    # the first draw's misses at that guidance, sorted by cause: one per prompt of each category drawn
    causes = heldout["miss_causes"]
    assert {c: sum(v.values()) for c, v in causes.items()} == collections.Counter(
        p.category for p in world.heldout_gen_prompts(3))
    right = heldout["guidance_sweep"][str(record["sampling"]["guidance"])]["categories"]
    assert all(v["right"] == round(right[c]["accuracy"] * right[c]["count"]) for c, v in causes.items())
    probe = record["velocity_sensitivity"]
    assert probe.pop("prompts_per_edit") == 2
    assert set(probe["model"]) == {f"{e}_pull{s}" for e in EDITS for s in ("", "_noise_end")}
    assert set(probe["world"]) == {f"{e}_pull" for e in EDITS}
    assert all(v >= 0 for part in probe.values() for v in part.values())


def test_the_second_draw_is_on_by_default_and_can_be_turned_off():
    from harness.train_testbed import build_parser

    assert build_parser().parse_args(["--out", "x"]).second_draw is True
    assert build_parser().parse_args(["--out", "x", "--no-second-draw"]).second_draw is False
