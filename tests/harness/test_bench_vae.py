"""``python -m harness bench-vae`` on the CPU: the Wan2.1 architecture at a tiny latent size, a real report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from harness import bench_vae  # noqa: E402


def test_bench_vae_reports_decode_and_encode(tmp_path, capsys):
    out = tmp_path / "vae.json"
    report = bench_vae.main(["--device", "cpu", "--size", "4", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"decode (eager)", "encode (eager)"}
    # the decoder runs more convolutions than the encoder at the same picture size, and both count some
    assert rows["decode (eager)"]["tflop"] > rows["encode (eager)"]["tflop"] > 0
    assert all(r["seconds"] > 0 and r["floor_s"] is None for r in rows.values())  # no measured CPU rate
    assert "32 px" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--size", "--batch", "--repeats"])
def test_bench_vae_rejects_non_positive_counts(flag, tmp_path):
    with pytest.raises(SystemExit, match=f"{flag} must be >= 1, got 0"):
        bench_vae.main(["--device", "cpu", flag, "0", "--out", str(tmp_path / "x.json")])
