"""harness.floors: the FLOP and byte counts behind the floors, against a FLOP counter and the parameters."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flashu_fx import Showo2, get_config
from flashu_fx.compiled import compiled_batch, flashu_backend, gen_graph
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_gen_batch
from flashu_fx.schedule import StepPlan
from harness import floors


def plan(call: int, layers: str = "all", head: str = "compute") -> StepPlan:
    return StepPlan(call, 5.0, False, layers, head)


@pytest.mark.parametrize(("plans", "layers", "trunk", "head"), [
    ([plan(1), plan(2)], 4, True, True),
    ([plan(1, "measure"), plan(2, "skip")], 2, True, True),
    ([plan(1, head="store"), plan(2, head="reuse")], 4, False, False),
])
def test_call_flops_match_a_flop_count_of_the_executor(tiny_model, monkeypatch, plans, layers: int, trunk: bool,
                                                      head: bool) -> None:
    """The executor's second call (a CFG pair, the prompt's keys and values already computed for the image) run
    op by op and counted (FFN slicing is a pass, so the full width is counted here)."""
    cfg = tiny_model.config
    torch._dynamo.reset()
    skipping = FlashUConfig.for_task("gen", skip_ratio=0.5, ffn_prune_ratio=0.0)  # 2 of the 4 layers
    backend = flashu_backend("gen", skipping, cuda_graphs=False, piece_backend="eager")
    gen = torch.compile(tiny_model, backend=backend)
    batch = compiled_batch(cfg, build_gen_batch(cfg, [[5, 6, 7]], guided=True))
    x = torch.randn(1, cfg.latent_channels, *cfg.latent_size).repeat(2, 1, 1, 1)
    counters: list[FlopCounterMode] = []
    real = gen_graph.run_maybe_graphed

    def counted(*args, **kwargs):
        if kwargs.get("keep_outputs") or not counting:  # the prefix graph, or a call not measured
            return real(*args, **kwargs)
        # the parts run eagerly (Dynamo refuses to trace under a dispatch mode), so the counter sees every op
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            out = real(*args, **kwargs)
        counters.append(counter)
        return out

    monkeypatch.setattr(gen_graph, "run_maybe_graphed", counted)
    backend.begin_image(2, 5.0, plans=plans)  # the calls to count, whatever the config's schedule
    with torch.no_grad():
        for k in range(2):
            counting = k == 1
            with backend.step(k, cfg_shared_latents=True):
                gen(batch.tokens, x, torch.full((2,), 0.5), batch.offsets, batch.mask, return_logits=False)
    assert len(backend.records[-1].skip_set) == cfg.num_layers - layers
    counts = {str(op): n for op, n in counters[0].get_flop_counts()["Global"].items()}
    expected = floors.gen_call_flops(cfg, batch.tokens.shape[1] - cfg.image_slot_len, layers, cfg.intermediate_size,
                                     trunk, head)
    attention = sum(n for op, n in counts.items() if "attention" in op)
    assert sum(counts.values()) - attention == expected["linear"]
    assert attention in (0, expected["attention"])  # the CPU attention kernel may go uncounted


@pytest.mark.parametrize("preset", ["tiny", "showo2-1.5b", "showo2-7b"])
def test_decode_bytes_are_the_parameters_a_token_reads(preset: str) -> None:
    cfg = get_config(preset)
    with torch.device("meta"):
        model = Showo2(cfg)
    read = sum(p.numel() for p in model.showo.model.layers.parameters()) + model.showo.model.norm.weight.numel()
    read += model.showo.lm_head.weight.numel()
    prompt = cfg.image_slot_len + 50
    kv = cfg.num_kv_heads * cfg.head_dim
    first = floors.und_decode_bytes(cfg, None, prompt, new_tokens=3)
    assert first[0] == 2 * (read + 2 * kv * cfg.num_layers * (prompt + 1))
    assert first[1] - first[0] == 2 * 2 * kv * cfg.num_layers  # one more cached position per layer
    assert floors.und_decode_bytes(cfg, FlashUConfig.off("und"), prompt, 3) == first


@pytest.mark.parametrize("preset", ["showo2-1.5b", "showo2-7b"])
def test_flashu_floors_sit_below_exact_below_upstream(preset: str) -> None:
    report = floors.floors(get_config(preset), floors.Rates(784.0, 4245.0), 50, 64, 780, 32,
                           floors.ANCHOR_SECONDS[preset])
    gen, und = report["gen_floor_s"], report["und_floor"]
    assert gen["flashu"] < gen["exact"] < gen["upstream"]
    assert und["flashu"]["request_s"] < und["exact"]["request_s"]
    assert und["flashu"]["decode_gb_per_token"] < und["exact"]["decode_gb_per_token"]


@pytest.mark.parametrize("flashu", [False, True])
def test_image_flops_by_kind_add_up_to_the_image(flashu: bool) -> None:
    """The products and the attention apart: each call's split summed over the schedule (exact: 49 full calls)."""
    cfg = get_config("showo2-1.5b")
    config = FlashUConfig.for_task("gen") if flashu else None
    by_kind = floors.gen_image_flops_by_kind(cfg, config, 50, 38)
    assert sum(by_kind.values()) == floors.gen_image_flops(cfg, config, 50, 38)
    if not flashu:
        call = floors.gen_call_flops(cfg, 38, cfg.num_layers, cfg.intermediate_size, True, True)
        assert by_kind == {kind: 49 * flops for kind, flops in call.items()}
    assert 0 < by_kind["attention"] < 0.1 * by_kind["linear"]


def test_upstream_call_floor_matches_the_anchor() -> None:
    """docs/REFERENCE_MEASUREMENTS.md: one upstream call at 784 TFLOP/s is 13.6 ms (1.5B) and 42.8 ms (7B)."""
    for preset, ms in (("showo2-1.5b", 13.6), ("showo2-7b", 42.8)):
        report = floors.floors(get_config(preset), floors.Rates(784.0, 4245.0), 50, 64, 780, 32,
                               floors.ANCHOR_SECONDS[preset])
        assert 1e3 * report["gen_floor_s"]["upstream"] / 49 == pytest.approx(ms, rel=0.03)


def test_floors_cli(tmp_path, capsys) -> None:
    out = tmp_path / "floors.json"
    report = floors.main(["--preset", "showo2-7b", "--eager-kv", "0.633", "--out", str(out)])
    text = capsys.readouterr().out
    assert "max vs KV cache" in text and "flashu" in text
    assert text.splitlines()[0] == "showo2-7b: floors at 784 TFLOP/s and 4245 GB/s (measured on an NVIDIA H200)"
    assert report["rates"]["source"] == "measured on an NVIDIA H200"
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["eager_s"]["kv"] == 0.633 and report["eager_s"]["nokv"] == floors.ANCHOR_SECONDS["showo2-7b"]["nokv"]
    with pytest.raises(SystemExit):
        floors.main(["--preset", "tiny"])
    assert "no anchor for tiny: pass --eager-gen, --eager-nokv, --eager-kv" in capsys.readouterr().err
    floors.main(["--preset", "showo2-7b", "--tflops", "500"])
    assert "(given with --tflops / --bandwidth)" in capsys.readouterr().out.splitlines()[0]


def test_bench_rows_get_their_floor_on_a_measured_device(tiny_model) -> None:
    import argparse

    from harness import bench, rows
    from harness.random_model import ChunkTokenizer

    rates = floors.device_rates("NVIDIA H200")
    assert rates == floors.Rates(784.0, 4245.0)
    assert floors.device_rates("NVIDIA H100 80GB HBM3") == floors.Rates(798.0, 3000.0)
    assert floors.device_rates("NVIDIA A100-SXM4-80GB") is None  # never measured: no floor, rather than a guess
    cfg = tiny_model.config
    tok = ChunkTokenizer(cfg)
    args = argparse.Namespace(task="gen", steps=50, guidance=10.0)
    ctx = rows.GenContext(tiny_model, [tok.encode("a cube")], steps=50)
    names = ["eager", "compiled-exact", "compiled-flashu[eager_numerics=off]", "flashu-eager"]
    records = [{"name": n, "seconds": 1.0, "count": 49} for n in names]
    bench.add_floors(args, cfg, ctx, "NVIDIA H200", records)
    by_name = {r["name"]: r["floor_s"] for r in records}
    assert by_name["compiled-flashu[eager_numerics=off]"] == by_name["flashu-eager"] < by_name["compiled-exact"]
    assert by_name["compiled-exact"] < by_name["eager"]
    assert all(r["pct_of_floor"] == pytest.approx(100 * r["floor_s"]) for r in records)
    und_args = argparse.Namespace(task="und", steps=50, guidance=10.0)
    und_ctx = rows.UndContext(tiny_model, torch.zeros(1, 16, 8, 8), [5, 6], tok)
    und = [{"name": n, "seconds": 2.0, "count": 8} for n in ("eager-nokv", "eager-kv", "compiled-flashu")]
    bench.add_floors(und_args, cfg, und_ctx, "NVIDIA H200", und)
    assert und[0]["floor_s"] is None and 0 < und[2]["floor_s"] < und[1]["floor_s"]
    bench.add_floors(und_args, cfg, und_ctx, "cpu", und)
    assert all(r["floor_s"] is None and r["pct_of_floor"] is None for r in und)


@torch.no_grad()
def test_prefill_flops_match_a_flop_count_of_the_eager_kv_loop(tiny_model) -> None:
    """answer_question(kv_cache=True) with one new token is the image features, the prefill and the first
    logits: its matmul FLOPs, counted op by op, are the floor's linear count."""
    from flashu_fx.layout import build_mmu_prompt
    from flashu_fx.mmu import answer_question
    from flashu_fx.tokenizer import get_tokenizer

    cfg = tiny_model.config
    latents = torch.randn(1, cfg.latent_channels, *cfg.latent_size)
    with FlopCounterMode(display=False) as counter:
        answer_question(tiny_model, latents, [4, 5, 6], max_new_tokens=1, kv_cache=True, stop_at_eos=False)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "attention" in op)
    prompt_len = build_mmu_prompt(cfg, get_tokenizer(cfg), [4, 5, 6]).tokens.shape[1]
    expected = floors.und_prefill_flops(cfg, None, prompt_len)
    assert sum(counts.values()) - attention == expected["linear"]
