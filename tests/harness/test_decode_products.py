"""harness.decode_products: the decode token's products, their shapes and every timed variant's values."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flashu_fx.config import get_config
from flashu_fx.flashu_config import FlashUConfig
from harness import decode_products as dp
from harness.floors import llm_layer_params


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["showo2-1.5b", "showo2-7b", "tiny"])
def test_a_layer_of_products_reads_the_floors_weights(preset):
    cfg, config = get_config(preset), FlashUConfig.for_task("und")
    products = {p.name: p for p in dp.decode_products(cfg, config)}
    kept = config.kept_ffn_width(cfg.intermediate_size)
    layer = sum(p.weight_bytes(1) for name, p in products.items() if name != "lm_head")
    assert layer == llm_layer_params(cfg, kept)  # the same count as the floors', made independently
    assert products["down"].k == kept < products["down"].k_full == cfg.intermediate_size
    assert products["lm_head"].weight_bytes(2) == 2 * cfg.vocab_size * cfg.hidden_size
    assert dp.token_layers(cfg, config) == cfg.num_layers - config.num_skipped_layers(cfg.num_layers)


def expected(case: dp.Case, eps: float) -> list[torch.Tensor]:
    """What each product computes, written out with F.linear in fp32 (independent of fused_fn)."""
    a = {k: v.float() for k, v in case.acts.items()}
    w = [t.float() for t in case.weights[0]]
    if case.product.kind == "down":
        return [a["res"] + F.linear(F.silu(a["g"]) * a["u"], w[0])]
    if case.product.kind == "plain":
        return [F.linear(a["x"], w[0])]
    xn = F.rms_norm(a["x"], (a["x"].shape[-1],), eps=eps) * a["norm"]
    return [F.linear(xn, t) for t in w]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_computes_its_product_on_the_sliced_weights(dtype):
    cfg = get_config("tiny")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for product in dp.decode_products(cfg, FlashUConfig.for_task("und")):
        case = dp.make_case(product, torch.device("cpu"), dtype, copies=2)
        w = case.weights[1][0]
        assert w.shape == (product.n, product.k) and w.untyped_storage().nbytes() == \
            product.n_full * product.k_full * w.element_size()  # a view of the full weight, as the executors feed it
        want = expected(case, cfg.rms_norm_eps)
        for variant in dp.VARIANTS:
            calls = dp.variant_calls(case, variant, cfg.rms_norm_eps, backend="aot_eager")
            if calls is None:
                assert variant == "inductor-split" and product.kind != "down"
                continue
            assert len(calls) == 2
            got = list(dp._as_tuple(calls[0]()))
            if variant == "library" and product.kind == "down":
                got = [got[0] + case.acts["res"]]
            for g, e in zip(got, want, strict=True):
                torch.testing.assert_close(g.float(), e, atol=tol * e.abs().max().item(), rtol=0)
            assert dp.check_variant(case, calls, variant, cfg.rms_norm_eps) < tol


def test_a_cpu_run_checks_times_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "products.json"
    assert dp.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "1",
                    "--backend", "aot_eager", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [(r["product"], r["variant"]) for r in result["rows"]]
    assert names.count(("down", "inductor-split")) == 1 and len(names) == 11
    assert all(r["us"] > 0 and r["max_rel_err"] < 1e-5 and r["pct_copy_bw"] is None for r in result["rows"])
    token = result["totals"]["library"]
    assert token["token_us"] > token["layer_us"] * result["layers_per_token"]  # + the lm_head
    assert "us per token" in capsys.readouterr().out


def test_bad_repeats_name_the_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dp.main(["--preset", "tiny", "--device", "cpu", "--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats=0 is invalid: allowed an integer >= 1" in capsys.readouterr().err
