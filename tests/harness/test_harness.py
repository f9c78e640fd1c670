"""The harness on the tiny preset, CPU only: demo, bench, the row registry, the PNG writer, the latent preview."""

from __future__ import annotations

import copy
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import get_config
from harness import __main__ as cli
from harness import bench, demo, rows
from harness.images import PNG_SIGNATURE, encode_png, image_grid, latent_preview, latent_projection


def decode_png(data: bytes) -> tuple[int, int, torch.Tensor]:
    """(width, height, uint8 (H, W, 3)) of an 8-bit RGB PNG with filter 0 rows; checks every chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows_ = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(h, 1 + 3 * w)
    assert (rows_[:, 0] == 0).all()  # filter type 0 on every row
    return w, h, rows_[:, 1:].reshape(h, w, 3)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- images -------------------------------------------------------------------------------------------
def test_png_round_trip():
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    w, h, back = decode_png(encode_png(rgb))
    assert (w, h) == (7, 5)
    assert torch.equal(back, rgb)


def test_png_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(torch.zeros(4, 4, dtype=torch.uint8))


def test_latent_preview_shape_and_grid():
    latents = torch.randn(3, 16, 4, 5)
    rgb = latent_preview(latents)
    assert rgb.shape == (3, 32, 40, 3) and rgb.dtype == torch.uint8
    assert rgb.max() == 255 and rgb.min() == 0  # stretched per image
    assert torch.equal(rgb[:, ::8, ::8], latent_preview(latents, scale=1))  # nearest up-sampling
    assert image_grid(rgb, gap=4).shape == (32, 3 * 40 + 2 * 4, 3)
    assert latent_preview(torch.zeros(1, 16, 2, 2)).shape == (1, 16, 16, 3)  # flat input: no division by 0
    assert latent_projection(16).shape == (3, 16)


# ---- registry -----------------------------------------------------------------------------------------
def test_registry():
    assert list(rows.rows_for("gen"))[0] == "eager"
    assert {"eager-kv", "eager-nokv"} <= set(rows.rows_for("und"))
    with pytest.raises(ValueError, match="already registered"):
        rows.register_row("gen", "eager", rows.eager_gen)
    with pytest.raises(ValueError, match="unknown task"):
        rows.register_row("video", "x", rows.eager_gen)
    with pytest.raises(ValueError, match="unknown und row"):
        rows.select_rows("und", ["nope"])
    assert list(rows.select_rows("und", ["eager-kv"])) == ["eager-nokv", "eager-kv"]  # baseline always first
    assert rows.load_optional_rows(["harness.no_such_rows_module"]) == []


def test_row_variants_select_and_validate():
    rows.load_optional_rows()
    chosen = rows.select_rows("gen", ["compiled-exact", "compiled-exact[merge_projections=off, cuda_graphs=no]"])
    assert list(chosen) == ["eager", "compiled-exact", "compiled-exact[merge_projections=off, cuda_graphs=no]"]
    assert chosen["compiled-exact"] is not chosen["compiled-exact[merge_projections=off, cuda_graphs=no]"]
    with pytest.raises(ValueError, match=r"unknown backend option\(s\) \['fast'\]"):
        rows.select_rows("und", ["compiled-flashu[fast=1]"])
    with pytest.raises(ValueError, match=r"unknown backend option\(s\) \[.task.\]"):
        rows.select_rows("und", ["compiled-flashu[task=gen]"])  # the row owns its task
    from harness.compiled_rows import backend_overrides

    assert backend_overrides({"inductor.max_autotune_gemm": True, "tune_decode": False}) == {
        "tune_decode": False, "inductor_options": {"max_autotune_gemm": True}}
    with pytest.raises(ValueError, match="unknown inductor option 'no_such_knob'"):
        rows.select_rows("gen", ["compiled-flashu[inductor.no_such_knob=1]"])
    with pytest.raises(ValueError, match="row 'eager' takes no options"):
        rows.select_rows("gen", ["eager[seed=1]"])
    with pytest.raises(ValueError, match="is not key=value"):
        rows.select_rows("gen", ["compiled-exact[merge_projections]"])
    with pytest.raises(ValueError, match="unknown gen row"):
        rows.select_rows("gen", ["nope[a=1]"])


option_keys = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
option_values = st.one_of(st.booleans(), st.none(), st.integers(-10**6, 10**6),
                          st.from_regex(r"[a-z][a-z_/.-]{0,8}", fullmatch=True).filter(
                              lambda t: rows.option_value(t) == t))


def test_row_names_split_outside_brackets():
    assert rows.split_row_names("a, b[x=1,y=2],,c[]") == ["a", "b[x=1,y=2]", "c[]"]
    assert rows.split_row_names("") == []


@settings(max_examples=60, deadline=None)
@given(base=st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
       options=st.dictionaries(option_keys, option_values, max_size=4))
def test_variant_names_round_trip(base, options):
    spelled = {True: "on", False: "off", None: "none"}
    text = ",".join(f"{k}={spelled.get(v, v) if not isinstance(v, int) or isinstance(v, bool) else v}"
                    for k, v in options.items())
    assert rows.parse_variant(f"{base}[{text}]") == (base, options)
    assert rows.parse_variant(base) is None


@pytest.mark.parametrize(("preset", "tflop"), [("showo2-1.5b", 10.7), ("showo2-7b", 33.9)])
def test_upstream_flops_match_anchors(preset, tflop):
    assert bench.upstream_gen_call_flops(get_config(preset), 2)["total"] / 1e12 == pytest.approx(tflop, rel=0.03)


# ---- commands -----------------------------------------------------------------------------------------
def test_demo_tiny(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--preset", "tiny", "--steps", "3", "--max-new-tokens", "3",
            "--rows", "eager,eager-kv,eager-nokv"]
    report = demo.main(argv)
    png = tmp_path / "t2i_eager.png"
    assert png.exists() and png_size(png) == (2 * 64 + 4, 64)  # two 8x8 latents, 8x nearest, 4-px gap
    out = capsys.readouterr().out
    assert "calls / tokens" in out and "eager-kv" in out and "eager-nokv" in out and str(png) in out
    assert [(r["task"], r["row"]) for r in report["rows"]] == [
        ("gen", "eager"),
        ("und", "eager-nokv"),
        ("und", "eager-kv"),
    ]
    assert (tmp_path / "demo.json").exists()


def test_demo_decodes_with_a_local_vae(tmp_path, capsys, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from flashu_fx.vae import WanLatentCodec

    torch.manual_seed(0)
    tiny = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    diffusers.AutoencoderKLWan(**tiny).save_pretrained(tmp_path / "vae")
    decoded, original = [], WanLatentCodec.decode_to_images

    def recording(self, latents):
        decoded.append(original(self, latents))
        return decoded[-1]

    monkeypatch.setattr(WanLatentCodec, "decode_to_images", recording)
    argv = ["--out", str(tmp_path), "--preset", "tiny", "--steps", "3", "--max-new-tokens", "2", "--rows", "eager"]
    argv += ["--vae", str(tmp_path / "vae")]
    demo.main(argv)
    (images,) = decoded
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8  # two 8x8 latents through the decoder
    _, _, rgb = decode_png((tmp_path / "t2i_eager.png").read_bytes())
    assert torch.equal(rgb, image_grid(images))
    assert "image (eager, VAE)" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["gen", "und"])
def test_bench_tiny_cpu(tmp_path, task, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default report path is relative: runs/bench/bench_<task>.json
    argv = ["--task", task, "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    argv += ["--steps", "3", "--max-new-tokens", "3", "--rows", rows.BASELINES[task]]
    bench.main(argv)
    out = tmp_path / "runs" / "bench" / f"bench_{task}.json"  # one report per task, none in the working dir
    assert not (tmp_path / "bench.json").exists()
    report = json.loads(out.read_text())
    for key in ("device", "torch", "preset", "dtype", "task", "command", "settings", "weights_gb", "rows"):
        assert key in report
    assert report["preset"] == "tiny" and report["command"].startswith("python -m")
    assert report["dtype"] == report["settings"]["dtype"] == "fp32"  # the CPU default; CUDA's is bf16
    assert report["settings"]["out"] == str(out.relative_to(tmp_path))
    base = report["rows"][0]
    assert base["name"] == rows.BASELINES[task] and base["speedup"] == 1.0 and base["peak_mem_gb"] is None
    for key in ("seconds", "times", "count", "unit", "ms_per_unit", "check", "summary"):
        assert key in base
    assert base["count"] == (2 if task == "gen" else 3)
    if task == "und":
        assert report["settings"]["prompt_len"] == get_config("tiny").image_slot_len + 50
    assert "speedup" in capsys.readouterr().out


def test_bench_runs_a_row_variant_beside_its_row(tmp_path):
    out = tmp_path / "bench.json"
    variant = "compiled-exact[merge_projections=off]"
    argv = ["--task", "gen", "--preset", "tiny", "--device", "cpu", "--repeats", "2", "--eager-repeats", "1",
            "--warmup", "0", "--steps", "3", "--out", str(out), "--rows", f"compiled-exact,{variant}"]
    bench.main(argv)
    report = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(report) == ["eager", "compiled-exact", variant]
    # each flag sets its own rows' timed runs (a large batch's eager loop is slow: one run can do)
    assert [len(r["times"]) for r in report.values()] == [1, 2, 2]
    assert "merge_projections=False" in report[variant]["note"]
    assert "merge_projections" not in report["compiled-exact"]["note"]
    assert report[variant]["count"] == report["compiled-exact"]["count"] == 2


@pytest.mark.parametrize("option", ["--tokenizer", "--vae", "--weights"])
def test_demo_names_a_missing_directory_while_parsing(tmp_path, capsys, option):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        demo.main([option, str(missing)])
    assert f"argument {option}: directory '{missing}' does not exist" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        demo.main([option, str(tmp_path / "a-file")])
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--tokenizer", "--weights"])
def test_calibrate_names_a_missing_directory_while_parsing(tmp_path, capsys, option):
    from harness import calibrate_cli

    with pytest.raises(SystemExit):
        calibrate_cli.main(["--task", "gen", option, str(tmp_path / "nowhere")])
    assert f"argument {option}: directory '{tmp_path / 'nowhere'}' does not exist" in capsys.readouterr().err


def test_fit_prompt_cuts_the_harness_prompts_and_says_so(capsys):
    cfg = get_config("tiny")
    assert rows.fit_prompt(cfg, [1] * cfg.max_text_len, "p") == [1] * cfg.max_text_len
    assert capsys.readouterr().err == ""
    assert rows.fit_prompt(cfg, list(range(40)), "the bench prompt") == list(range(cfg.max_text_len))
    assert "the bench prompt cut from 40 to 27 tokens" in capsys.readouterr().err


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "huge"])
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0", "--preset", "tiny"])
    assert "invalid choice" in capsys.readouterr().err


def test_bench_dtype_follows_the_device_unless_given():
    args = bench.build_parser().parse_args([])
    bench.resolve_defaults(args, torch.device("cuda"))
    assert (args.dtype, str(args.out)) == ("bf16", "runs/bench/bench_gen.json")
    args = bench.build_parser().parse_args(["--task", "und", "--dtype", "bf16", "--out", "x.json"])
    bench.resolve_defaults(args, torch.device("cpu"))
    assert (args.dtype, str(args.out)) == ("bf16", "x.json")
    args = bench.build_parser().parse_args(["--task", "und"])
    bench.resolve_defaults(args, torch.device("cpu"))
    assert (args.dtype, str(args.out)) == ("fp32", "runs/bench/bench_und.json")


def test_no_command_prints_the_usage_and_the_commands(capsys):
    assert cli.main([]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("usage: python -m harness")
    assert all(f"{name} {text}" in err for name, (_, text) in cli.COMMANDS.items())
    assert "args" not in err.replace("arguments", "")  # no hidden argument named in the message


COMMAND_MODULES = ["demo", "bench", "floors", "kernels", "calibrate_cli", "analyze_cli", "check_recompiles",
                   "check_equivalence", "guard_cost", "profile_gen", "profile_und", "products"]


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_help_shows_the_whole_description_and_the_defaults(name, capsys):
    import importlib

    module = importlib.import_module(f"harness.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word by word
    first_paragraph = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    assert first_paragraph in text and first_paragraph.endswith((".", ")"))
    assert "(default: " in text


def test_help_states_the_values_a_user_gets(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "once per registered row (eager, eager FlashU, compiled exact, compiled FlashU), with a table and a " \
        "captioned grid." in text  # not cut after "once per"
    for shown in ("(default: the testbed's, else 50)", "(default: the testbed's, else 7.5, upstream's demo)",
                  "(default: runs/demo)", "(default: cpu)", "(default: the shipped testbed, else tiny)"):
        assert shown in text
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: bf16 on CUDA, fp32 on the CPU)" in text and "runs/bench/bench_<task>.json" in text
    assert "(default: showo2-1.5b)" in text and "(default: 10.0)" in text


def test_cli_dispatch(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    monkeypatch.setitem(cli.COMMANDS, "analyze", ("harness.no_such_module", "missing"))
    assert cli.main(["analyze"]) == 2
    assert "harness.no_such_module" in capsys.readouterr().err


@pytest.mark.parametrize("task, options", [("gen", []), ("gen", ["eager_numerics=off"]), ("und", ["tune_decode=off"])])
def test_check_recompiles_tiny(task, options, capsys):
    from harness import check_recompiles

    extra = ["--steps", "3"] if task == "gen" else ["--new-tokens", "2"]
    extra += [arg for option in options for arg in ("--option", option)]
    report = check_recompiles.main(["--preset", "tiny", "--task", task, "--device", "cpu",
                                    "--lengths", "1,4,9,27", *extra])
    expected = {"eager_numerics": False} if "eager_numerics=off" in options else {}
    assert report["options"] == (expected if task == "gen" else {"tune_decode": False})
    assert report["recompiles_after_warmup"] == 0
    # the variants of the captured graph (FlashU's passes) serve every length: new lengths build none
    assert report["variant_builds_after_warmup"] == 0
    assert report["warm_piece_captures"] > 0 and len(report["seconds_per_request"]) == 4
    # the compiler's seconds: a share of the warm-up, named by part (at most the five slowest)
    slowest = report["slowest_parts_s"]
    assert 0 < len(slowest) <= 5 and all(name.startswith("part[") for name in slowest)
    assert 0 <= sum(slowest.values()) <= report["warm_part_compile_s"] + 0.05
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    with pytest.raises(SystemExit):
        check_recompiles.main(["--preset", "tiny", "--option", "fast=on"])
    assert "unknown backend option(s) ['fast']" in capsys.readouterr().err


def test_check_recompiles_default_lengths_fit_the_preset() -> None:
    from harness.check_recompiles import GEN_LENGTHS, UND_LENGTHS, default_lengths

    assert default_lengths("gen", get_config("showo2-1.5b").max_text_len) == GEN_LENGTHS
    assert default_lengths("gen", 27) == (1, 5, 12, 20, 27)  # tiny's budget
    assert default_lengths("gen", 64) == (1, 5, 12, 20, 31, 47, 64)
    assert default_lengths("und", 27) == UND_LENGTHS


def test_check_recompiles_refuses_prompts_over_the_budget(capsys):
    from harness import check_recompiles

    with pytest.raises(SystemExit):
        check_recompiles.main(["--preset", "tiny", "--task", "gen", "--lengths", "1,28"])
    assert "--lengths 1,28 is invalid: allowed lengths 1..27 (the prompt budget of tiny)" in capsys.readouterr().err


def test_check_equivalence_tiny(capsys):
    from harness import check_equivalence

    assert check_equivalence.main(["--preset", "tiny", "--device", "cpu", "--steps", "4",
                                   "--option", "merge_projections=off"]) == 0
    out = capsys.readouterr().out
    assert "backend options: {'merge_projections': False}" in out
    assert "FlashU: decisions identical True" in out and "trajectory (3 calls)" in out
    with pytest.raises(SystemExit):
        check_equivalence.main(["--preset", "tiny", "--option", "merge_projections"])
    assert "is not key=value" in capsys.readouterr().err


def test_bench_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from harness.charts import save_bench_chart

    rows_ = [{"name": "eager", "seconds": 2.2, "speedup": 1.0, "floor_s": 0.667},
             {"name": "compiled-flashu[eager_numerics=off]", "seconds": 0.29, "speedup": 7.6, "floor_s": 0.149},
             {"name": "flashu-eager", "seconds": 0.81, "speedup": 2.7, "floor_s": None}]
    report = {"rows": rows_, "baseline": "eager", "task": "gen", "preset": "showo2-1.5b", "dtype": "bf16",
              "device": "NVIDIA H200"}
    path = save_bench_chart(report, tmp_path / "bench.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and struct.unpack(">II", data[16:24])[0] > 800  # width in pixels


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA device")
def test_gpu_profilers_say_they_need_a_gpu(capsys):
    from harness import profile_gen

    with pytest.raises(SystemExit):
        profile_gen.main(["--preset", "tiny"])
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "python -m harness bench" in err  # where to go instead


def test_host_profile_lists_the_functions_with_the_most_own_time():
    from harness.profile_gen import host_profile

    def busy_host_work() -> int:
        total = 0
        for i in range(200_000):  # its own time, not a callee's
            total += i * i
        return total

    report = host_profile(busy_host_work, rows=3)
    assert "busy_host_work" in report and "tottime" in report
    assert "List reduced" in report  # only the 3 rows asked for


def test_profile_gen_times_every_call_by_kind(tiny_model):
    from flashu_fx.compiled import flashu_backend, lean_guard_options
    from flashu_fx.flashu_config import FlashUConfig
    from harness import profile_gen
    from harness.flashu_rows import permute_for, random_ffn_scores

    model, config = copy.deepcopy(tiny_model), FlashUConfig.for_task("gen")
    layout = permute_for(model, config, random_ffn_scores(model))
    torch._dynamo.reset()
    backend = flashu_backend("gen", config, layout, piece_backend="eager")
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    timings = profile_gen.timed_calls(gen, backend, model, [[5, 6, 7]], steps=8)
    torch._dynamo.reset()
    records = backend.records
    assert len(timings) == len(records) == FlashUConfig.for_task("gen").num_points(8) - 1
    assert all(0 < t.host_ms <= t.total_ms for t in timings)
    table = profile_gen.call_kind_table(records, timings).splitlines()
    kinds = {(r.head, r.trunk_ran, len(r.skip_set), r.importance is not None) for r in records}
    assert len(table) == 1 + len(kinds)  # a header, then one line per kind of call
    assert sum(int(line.split()[4]) for line in table[1:]) == len(records)


def test_pipelined_table_groups_calls_by_kind_with_the_host_lead():
    from flashu_fx.compiled.gen_graph import CallRecord
    from harness.profile_gen import PipelinedCall, pipelined_table

    records = [CallRecord(0, (), "compute", True, [0.1]), CallRecord(1, (2,), "reuse", False, None),
               CallRecord(2, (2,), "reuse", False, None)]
    calls = [PipelinedCall(0.0, 1.0, 0.0, 15.0), PipelinedCall(1.0, 1.5, 15.0, 15.5),
             PipelinedCall(1.5, 2.0, 15.5, 16.0)]
    assert [c.host_ahead_ms for c in calls] == [0.0, 14.0, 14.0]  # the host launched the reuse calls early
    table = pipelined_table(records, calls).splitlines()
    assert len(table) == 3 and table[2].split()[:5] == ["reuse", "0", "1", "0", "2"]
    assert [float(v) for v in table[2].split()[5:]] == [0.5, 0.5, 14.0]


def test_idle_gap_table_sums_the_gaps_by_the_kernel_that_ended_them():
    from harness.profile_gen import idle_gap_table

    spans = [("gemm", 0.0, 100.0), ("norm", 90.0, 110.0), ("copy", 130.0, 140.0), ("gemm", 150.0, 250.0),
             ("copy", 260.0, 262.0)]  # overlapping kernels count once; gaps 20, 10 and 10 us
    lines = idle_gap_table(spans).splitlines()
    assert lines[0].startswith("device busy 0.2 ms, idle between kernels 0.0 ms over 5 kernels")
    rows = {line.split()[-1]: line.split()[:3] for line in lines[2:]}
    assert rows == {"copy": ["0.03", "2", "15.0"], "gemm": ["0.01", "1", "10.0"]}
    assert idle_gap_table([]) == "no device kernels recorded"


@pytest.mark.parametrize(("name", "kind"), [
    ("nvjet_sm90_tst_128x168_64x5_2x1_v_bz_TNT", "matrix product"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "matrix product"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("void cudnn::fusion::lean_reduction_kernel<false, false, false>", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton, reduction"),
    ("triton_per_fused_add_mean_1", "triton, reduction"),
    ("triton_poi_fused__unsafe_view_mul_silu_8", "triton, pointwise"),
    ("Memset (Device)", "memset / copy"), ("Memcpy DtoD (Device -> Device)", "memset / copy"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl>", "other"),
])
def test_kernel_kind_names_what_a_kernel_does(name, kind):
    from harness.profile_gen import kernel_kind

    assert kernel_kind(name) == kind


def test_kernel_kind_table_sums_each_kind_against_its_floor():
    from harness.profile_gen import kernel_kind_table

    spans = [("nvjet_a", 0.0, 3000.0), ("nvjet_b", 3000.0, 4000.0), ("cudnn_sdpa", 4000.0, 5000.0),
             ("Memset (Device)", 5000.0, 5010.0)]  # us
    lines = kernel_kind_table(spans, {"matrix product": 2.0, "attention": 0.25}).splitlines()
    rows = {line[:20].strip(): line[20:].split() for line in lines[1:]}
    assert rows["matrix product"] == ["2", "4.0", "79.8%", "2.0", "50%"]
    assert rows["attention"] == ["1", "1.0", "20.0%", "0.2", "25%"]
    assert rows["memset / copy"] == ["1", "0.0", "0.2%"]  # no floor given: none printed
    assert [line[:20].strip() for line in lines[1:]] == ["matrix product", "attention", "memset / copy"]


def test_guard_cost_reports_every_variant(capsys):
    from harness import guard_cost

    result = guard_cost.main(["--preset", "tiny", "--calls", "5"])
    assert set(result) == set(guard_cost.VARIANTS) and all(us > 0 for us in result.values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["us_per_call"] == result


# ---- analyze on a testbed -----------------------------------------------------------------------------
def test_attention_probe_reproduces_the_attention_output(tiny_model):
    """softmax(QK^T / sqrt(d) + mask) V recomputed by the probe gives the layer's own SDPA output."""
    from flashu_fx.layout import build_gen_batch
    from harness.llm_probes import attention_probabilities

    attn = tiny_model.showo.model.layers[1].self_attn
    batch = build_gen_batch(tiny_model.config, [[5, 6, 7]])
    x = torch.randn(2, tiny_model.config.max_seq_len, tiny_model.config.hidden_size,
                    generator=torch.Generator().manual_seed(0))
    cos, sin, _, _ = tiny_model.rope(x.shape[1], x.dtype, x.device)
    with torch.no_grad():
        expected = attn(x, cos, sin, batch.mask)
        probs, v = attention_probabilities(attn, x, cos, sin, batch.mask)
        heads = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
        got = attn.o_proj((probs @ heads).transpose(1, 2).flatten(2))
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_analyze_testbed_writes_every_chart(random_testbed, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from harness import analyze_cli

    out = tmp_path / "analyze"
    argv = ["--weights", str(random_testbed), "--device", "cpu", "--prompts", "1", "--questions", "1",
            "--steps", "3", "--new-tokens", "2", "--out", str(out)]
    assert analyze_cli.main(argv) == 0
    for name in ("specialization", "layer_similarity", "vnorm_attention", "image_attention"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE, name
    report = json.loads((out / "analysis.json").read_text())
    layers = get_config("testbed-nano").num_layers
    assert len(report["specialization"]["layers"]) == layers
    assert [len(row) for row in report["gen"]["cosine"]] == [layers, layers]  # 3 grid points: 2 calls
    assert len(report["und"]["cosine"]) == 2 and len(report["und"]["vnorm_attention_spearman"]) == layers
    assert all(0.0 <= s <= 1.0 for s in report["gen"]["image_attention_share"][0])
    assert report["und"]["vnorm_layer"] == 1
    assert [loss["ratio"] for loss in report["und"]["pruning_losses"]] == [0.1, 0.25, 0.5]
    assert all(0.0 <= loss["attention_dropped"] <= 1.0 for loss in report["und"]["pruning_losses"])
    printed = capsys.readouterr().out
    assert "und V-norm Spearman" in printed
    assert "V-norm pruning at layer 1, ratio 0.5: drops 50% of the image" in printed
    with pytest.raises(SystemExit):
        analyze_cli.main(["--weights", str(tmp_path / "none"), "--out", str(out)])
    assert f"--weights {tmp_path / 'none'}" in capsys.readouterr().err


def test_pruning_losses_counts_what_the_largest_norms_take():
    from harness.llm_analysis import pruning_losses

    vnorm = np.array([[1.0, 4.0, 2.0, 3.0]])  # ratio 0.5 drops tokens 1 and 3 (the two largest)
    attention = np.array([[0.1, 0.2, 0.3, 0.4]])
    objects = np.array([[False, True, True, False]])
    loss = pruning_losses(vnorm, attention, objects, 0.5)
    assert loss == {"ratio": 0.5, "tokens_dropped": 0.5, "object_tokens_dropped": 0.5,
                    "attention_dropped": pytest.approx(0.6)}
    assert pruning_losses(vnorm, attention, objects, 0.25)["object_tokens_dropped"] == 0.5  # token 1 only


def test_object_tokens_marks_lit_cells():
    from harness.analyze_cli import object_tokens

    image = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    image[0, 3, 0, 1] = 255  # a pixel in the bottom-left 2 x 2 cell
    assert object_tokens(image, (2, 2)).tolist() == [[False, False, True, False]]


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 60), count=st.integers(1, 8))
def test_bench_prompts_are_cuts_of_mixed_lengths(length: int, count: int):
    ids = list(range(100, 100 + length))
    prompts = bench.bench_prompts(ids, count)
    assert len(prompts) == count and prompts[0] == ids
    lengths = [len(p) for p in prompts]
    assert lengths == sorted(lengths, reverse=True) and min(lengths) >= max(1, length // 2)
    assert all(p == ids[: len(p)] for p in prompts)
    if count > 1 and length >= 2 * count:  # room for every cut to differ
        assert len(set(lengths)) == count


def test_bench_times_a_batch_of_prompts_against_both_eager_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--task", "gen", "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
            "--steps", "3", "--batch", "3", "--out", str(out), "--rows", "eager-split,compiled-exact"]
    bench.main(argv)
    report = json.loads(out.read_text())
    by_name = {r["name"]: r for r in report["rows"]}
    assert list(by_name) == ["eager", "eager-split", "compiled-exact"]
    assert report["settings"]["batch"] == 3
    assert by_name["eager-split"]["check"]["rel_err"] == 0.0  # the same images as upstream's eager row
    assert "latents (3, " in by_name["compiled-exact"]["summary"]
    assert by_name["compiled-exact"]["check"]["rel_err"] < 1e-5
    for rec in by_name.values():
        assert rec["images_per_s"] == pytest.approx(3 / rec["seconds"])
        split = by_name["eager-split"]["seconds"]
        assert rec["speedup_vs_split"] == pytest.approx(split / rec["seconds"])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("row "))
    assert "img/s" in header and "vs split" in header


def test_bench_batch_is_for_generation_only(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--task", "und", "--preset", "tiny", "--batch", "2"])
    assert "--batch 2 is for --task gen" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--task", "gen", "--preset", "tiny", "--batch", "0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_split_lm_head_computes_the_logits_once_per_call_and_leaves_no_hook(tiny_model, monkeypatch):
    cfg = tiny_model.config
    batch = rows.build_gen_batch(cfg, [[5, 6, 7]], guided=True)
    x = torch.randn(2, cfg.latent_channels, *cfg.latent_size)
    seen = []
    monkeypatch.setattr(rows, "all_position_logits", lambda head, hidden: seen.append(head(hidden)))
    with torch.no_grad():
        want = tiny_model(batch.tokens, x, torch.full((2,), 0.3), batch.offsets, batch.mask, return_logits=True)
        with rows.split_lm_head(tiny_model):
            got = tiny_model(batch.tokens, x, torch.full((2,), 0.3), batch.offsets, batch.mask, return_logits=False)
    assert len(seen) == 1 and torch.equal(seen[0], want.logits) and torch.equal(got.velocity, want.velocity)
    assert not tiny_model.showo._forward_hooks
    with pytest.raises(RuntimeError, match="inside"), rows.split_lm_head(tiny_model):
        raise RuntimeError("inside")
    assert not tiny_model.showo._forward_hooks


def test_profile_und_splits_the_prefill_and_the_decode_token(capsys):
    """The command end to end on the tiny model (CPU: operators, not kernels): the per-token decode table is the
    long answer's profile less the one-token answer's, so it lists the decode step's products and not the image's."""
    from harness import profile_und

    report = profile_und.main(["--preset", "tiny", "--device", "cpu", "--new-tokens", "3", "--repeats", "1",
                               "--rows", "4"])
    assert report["prefill_ms"] > 0 and report["decode_ms_per_token"] > 0 and report["prompt_len"] > 16
    assert report["decode_kernels_per_token"] > 0 and report["decode_floor_ms"] is None  # no rates for a CPU
    out = capsys.readouterr().out
    assert "kernel (per decode token)" in out and "kernel (per prefill)" in out
    with pytest.raises(SystemExit):
        profile_und.main(["--preset", "tiny", "--new-tokens", "1"])
    assert "--new-tokens 1 is invalid: allowed an integer >= 2" in capsys.readouterr().err


def test_per_token_is_the_difference_per_step():
    from harness.profile_und import OpStat, per_token, stat_table

    longer = {"mm": OpStat(12, 900.0), "gather": OpStat(1, 5.0), "copy": OpStat(4, 40.0)}
    shorter = {"mm": OpStat(4, 300.0), "gather": OpStat(1, 5.0), "conv": OpStat(2, 80.0)}
    steps = per_token(longer, shorter, 4)
    assert steps == {"mm": OpStat(2.0, 150.0), "copy": OpStat(1.0, 10.0)}  # unchanged and vanished ones dropped
    table = stat_table(steps, rows=1, unit="decode token")
    assert table.splitlines()[1].split()[:3] == ["150.0", "93.8%", "2.0"] and table.splitlines()[-1].endswith("all")
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        per_token(longer, shorter, 0)


def test_kind_stats_sum_the_kernels_of_each_kind():
    from harness.profile_und import OpStat, kind_stats

    stats = {"nvjet_sm90_a": OpStat(26, 900.0), "gemv2T_kernel_val": OpStat(1, 400.0),
             "triton_red_fused_mm_0": OpStat(52, 3000.0), "Memset (Device)": OpStat(3, 6.0)}
    assert kind_stats(stats) == {"matrix product": OpStat(27, 1300.0), "triton, reduction": OpStat(52, 3000.0),
                                 "memset / copy": OpStat(3, 6.0)}
