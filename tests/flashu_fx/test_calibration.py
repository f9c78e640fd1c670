"""Per-task calibration: scores against independent computations, OBD closed form against brute force,
keep masks, persistence, the zero-copy pruned layout, and the CLIs. Tiny preset, CPU, fp32 (OBD: fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from flashu_fx.calibration import (
    Calibration,
    calibrate,
    ffn_weight_bytes,
    model_fingerprint,
    prepare_pruned_model,
    specialization,
)
from flashu_fx.config import get_config
from flashu_fx.ffn_layout import build_ffn_layout
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.layout import build_gen_batch, build_mmu_prompt
from flashu_fx.mmu import prompt_embeddings
from flashu_fx.model import Showo2, init_random_weights
from flashu_fx.sampler import draw_noise
from flashu_fx.tokenizer import get_tokenizer

PROMPTS = ["a red cube on a table", "two cats"]
QUESTIONS = ["what is this?", "how many?"]


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> Showo2:
    return init_random_weights(Showo2(get_config("tiny")), seed=seed).to(dtype).eval()


def und_samples(model: Showo2, n: int = 2) -> list[tuple[Tensor, str]]:
    cfg, gen = model.config, torch.Generator().manual_seed(1)
    return [(torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=gen), QUESTIONS[i]) for i in range(n)]


@torch.no_grad()
def down_inputs(model: Showo2, x: Tensor, mask: Tensor) -> list[Tensor]:
    """The intermediate activation of every layer, (positions, I), from an explicit layer-by-layer forward."""
    cos, sin, _, _ = model.rope(x.shape[1], x.dtype, x.device)
    acts = []
    for layer in model.showo.model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)
        h = layer.post_attention_layernorm(x)
        a = F.silu(h @ layer.mlp.gate_proj.weight.T) * (h @ layer.mlp.up_proj.weight.T)
        acts.append(a.reshape(-1, a.shape[-1]))
        x = x + a @ layer.mlp.down_proj.weight.T
    return acts


def wanda_from(model: Showo2, inputs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """score_j = ||X_j||_2 * sum_i |W_down[i, j]| over all (embeddings, mask) inputs: (layers, I)."""
    sq = None
    for x, mask in inputs:
        per_layer = torch.stack([a.double().square().sum(0) for a in down_inputs(model, x, mask)])
        sq = per_layer if sq is None else sq + per_layer
    weights = torch.stack([layer.mlp.down_proj.weight.double().abs().sum(0) for layer in model.showo.model.layers])
    return (sq.sqrt() * weights).float()


# ---- scores ----------------------------------------------------------------------------------------------
def test_wanda_text_only_matches_independent_computation() -> None:
    model = tiny()
    calib = calibrate(model, "gen", PROMPTS, gen_source="text_only", progress=False)
    inputs = []
    for ids in (get_tokenizer(model.config).encode(p) for p in PROMPTS):
        batch = build_gen_batch(model.config, [ids], guided=False)
        inputs.append((model.showo.model.embed_tokens(batch.tokens), batch.mask))  # slot = <|image_pad|>
    torch.testing.assert_close(calib.scores, wanda_from(model, inputs), rtol=1e-5, atol=1e-7)
    assert calib.scores.dtype == torch.float32 and calib.samples_used == 2
    assert calib.meta["positions"] == 2 * model.config.max_seq_len


def test_wanda_denoise_matches_independent_computation() -> None:
    """steps=2, guidance 0: one unguided call at t = 0 on the seeded noise per prompt."""
    model, cfg = tiny(), get_config("tiny")
    calib = calibrate(model, "gen", PROMPTS, steps=2, guidance=0, seed=5, progress=False)
    inputs = []
    for i, ids in enumerate(get_tokenizer(cfg).encode(p) for p in PROMPTS):
        batch = build_gen_batch(cfg, [ids], guided=False)
        noise = draw_noise((1, cfg.latent_channels, *cfg.latent_size), 5 + i)
        with torch.no_grad():
            x = model.embed_inputs(
                batch.tokens, batch.offsets, model.image_embeds(noise), model.time_embeds(torch.zeros(1))
            )
        inputs.append((x, batch.mask))
    torch.testing.assert_close(calib.scores, wanda_from(model, inputs), rtol=1e-5, atol=1e-7)


def test_gen_denoise_counts_every_call_row_and_position() -> None:
    model = tiny()
    calib = calibrate(model, "gen", PROMPTS, steps=3, guidance=7.5, progress=False)
    # 2 prompts x 2 calls x (cond + null rows) x L positions
    assert calib.meta["positions"] == 2 * 2 * 2 * model.config.max_seq_len
    assert calib.meta["gen_source"] == "denoise" and torch.isfinite(calib.scores).all()
    assert (calib.scores > 0).all()
    text_only = calibrate(model, "gen", PROMPTS, gen_source="text_only", progress=False)
    assert not torch.equal(calib.scores, text_only.scores)  # real image tokens + t change the statistics


def test_und_matches_independent_computation() -> None:
    model = tiny()
    samples = und_samples(model)
    calib = calibrate(model, "und", samples, progress=False)
    inputs = []
    for latents, question in samples:
        prompt = build_mmu_prompt(model.config, get_tokenizer(model.config), question)
        with torch.no_grad():
            inputs.append((prompt_embeddings(model, latents, prompt), prompt.mask(model.config)))
    torch.testing.assert_close(calib.scores, wanda_from(model, inputs), rtol=1e-5, atol=1e-7)
    assert calib.task == "und" and calib.config["ffn_prune_ratio"] == 0.1


def test_hooks_removed_even_on_error() -> None:
    model = tiny()
    bad = [(torch.zeros(16, 8, 8), "no batch axis")]
    with pytest.raises(ValueError, match=r"\(1, C, h, w\)"):
        calibrate(model, "und", bad, progress=False)
    assert all(not layer.mlp.down_proj._forward_pre_hooks for layer in model.showo.model.layers)
    with pytest.raises(ValueError, match="method"):
        calibrate(model, "gen", PROMPTS, method="magnitude", progress=False)
    with pytest.raises(ValueError, match="config.task"):
        calibrate(model, "gen", PROMPTS, config=FlashUConfig.for_task("und"), progress=False)


@torch.no_grad()
def obd_scores_bruteforce(layer: torch.nn.Module, args: tuple) -> Tensor:
    """||Y - Y_without_j||_F for every neuron j: zero a_j (down_proj's input) and re-run the whole layer."""
    y = layer(*args)
    out = []
    for j in range(layer.mlp.down_proj.in_features):

        def zero_j(module: torch.nn.Module, inp: tuple[Tensor, ...], j: int = j) -> tuple[Tensor]:
            a = inp[0].clone()
            a[..., j] = 0
            return (a,)

        handle = layer.mlp.down_proj.register_forward_pre_hook(zero_j)
        try:
            out.append((y - layer(*args)).norm())
        finally:
            handle.remove()
    return torch.stack(out)


def test_obd_closed_form_equals_bruteforce() -> None:
    """fp64 model: the brute force differences are exact enough to compare at 1e-5."""
    model = tiny(dtype=torch.float64)
    calib = calibrate(model, "gen", PROMPTS[:1], method="obd", gen_source="text_only", progress=False)
    captured: dict[int, tuple] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args))
        for i, layer in enumerate(model.showo.model.layers)
    ]
    try:
        calibrate(model, "gen", PROMPTS[:1], gen_source="text_only", progress=False)
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(model.showo.model.layers):
        brute = obd_scores_bruteforce(layer, captured[i])
        torch.testing.assert_close(calib.scores[i].double(), brute, rtol=1e-5, atol=1e-9)


# ---- keep masks and persistence --------------------------------------------------------------------------
def test_kept_widths() -> None:
    assert FlashUConfig().kept_ffn_width(8960) == 7168  # the reference's 1.5B numbers
    assert FlashUConfig.for_task("und").kept_ffn_width(8960) == 8064
    model = tiny()
    calib = calibrate(model, "gen", PROMPTS[:1], gen_source="text_only", progress=False)
    mask = calib.keep_mask()
    assert mask.dtype == torch.bool and (mask.sum(-1) == 192).all()
    for kept, dropped in zip(calib.scores.where(mask, torch.inf), calib.scores.where(~mask, -torch.inf), strict=True):
        assert kept.min() >= dropped.max()  # the top scores
    with pytest.raises(ValueError, match="task"):
        calib.keep_mask(FlashUConfig.for_task("und"))


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.0, 0.9), multiple=st.sampled_from([1, 8, 32, 64, 128]), size=st.sampled_from([256, 8960]))
def test_kept_width_is_a_multiple(ratio: float, multiple: int, size: int) -> None:
    cfg = FlashUConfig(ffn_prune_ratio=ratio, ffn_width_multiple=multiple)
    try:
        width = cfg.kept_ffn_width(size)
    except ValueError:
        assert (size - int(size * ratio)) < multiple  # nothing left at this multiple
        return
    assert width == size if ratio == 0 else (width % multiple == 0 and 0 < width <= size - int(size * ratio))


def test_save_load_round_trip_and_fingerprint(tmp_path) -> None:
    model = tiny()
    calib = calibrate(model, "gen", PROMPTS[:1], steps=2, progress=False)
    paths = calib.save(tmp_path / "calib" / "gen")
    assert [p.name for p in paths] == ["gen.safetensors", "gen.json"]
    for spelling in (tmp_path / "calib" / "gen", paths[1], str(paths[0])):
        back = Calibration.load(spelling, model=model)
        assert torch.equal(back.scores, calib.scores)
        assert (back.task, back.method, back.config, back.samples_used, back.fingerprint, back.meta) == (
            calib.task,
            calib.method,
            calib.config,
            calib.samples_used,
            calib.fingerprint,
            calib.meta,
        )
    other = tiny(seed=1)
    with pytest.raises(ValueError) as err:
        Calibration.load(paths[0], model=other)
    assert calib.fingerprint in str(err.value) and model_fingerprint(other) in str(err.value)
    with pytest.raises(ValueError, match=calib.fingerprint):
        prepare_pruned_model(other, [calib])


# ---- the pruned layout --------------------------------------------------------------------------------------
@torch.no_grad()
def test_prepare_pruned_model_is_exact_and_zero_copy() -> None:
    model, cfg = tiny(), get_config("tiny")
    calibs = {
        "gen": calibrate(model, "gen", PROMPTS, steps=2, progress=False),
        "und": calibrate(model, "und", und_samples(model), progress=False),
    }
    originals = [
        [lin.weight.clone() for lin in (ly.mlp.gate_proj, ly.mlp.up_proj, ly.mlp.down_proj)]
        for ly in model.showo.model.layers
    ]
    batch = build_gen_batch(cfg, [get_tokenizer(cfg).encode(p) for p in PROMPTS])
    latents = torch.randn(
        batch.tokens.shape[0], cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0)
    )
    t = torch.full((batch.tokens.shape[0],), 0.3)
    before = model(batch.tokens, latents, t, batch.offsets, batch.mask)
    fingerprint, nbytes = model_fingerprint(model), ffn_weight_bytes(model)

    layout = prepare_pruned_model(model, calibs)

    after = model(batch.tokens, latents, t, batch.offsets, batch.mask)
    torch.testing.assert_close(after.velocity, before.velocity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-6, atol=1e-6)
    assert model_fingerprint(model) == fingerprint  # permutation-invariant on purpose
    assert ffn_weight_bytes(model) == nbytes == 3 * cfg.num_layers * cfg.hidden_size * cfg.intermediate_size * 4
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    for task, calib in calibs.items():
        keep = calib.keep_mask()
        for i, layer in enumerate(model.showo.model.layers):
            gate, up, down = originals[i]
            masked = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up) * keep[i], down)  # the eager twin
            ((lo, hi),) = layout.task_ranges(task, i)
            assert hi - lo == int(keep[i].sum())
            torch.testing.assert_close(layer.mlp(x, layout.task_ranges(task, i)), masked, rtol=1e-5, atol=1e-6)


def test_a_layout_refuses_weights_it_did_not_permute() -> None:
    """The layout carries probes of the permuted weights: a fresh copy (never permuted) or reloaded weights are
    refused by every FlashU path instead of being pruned at the wrong neurons; a dtype cast is not a mismatch."""
    from flashu_fx.compiled import compiled_batch, flashu_backend, generate_images_compiled
    from flashu_fx.flashu_gen import ffn_ranges_per_layer
    from flashu_fx.flashu_und import answer_question_flashu
    from flashu_fx.mmu import answer_question

    original = tiny()
    model = tiny()
    config = FlashUConfig.for_task("gen", ffn_width_multiple=8)
    calib = calibrate(model, "gen", PROMPTS, config, steps=2, progress=False)
    layout = prepare_pruned_model(model, {"gen": calib}, {"gen": config})
    assert layout.signature is not None and len(ffn_ranges_per_layer(model, config, layout, "gen")) == 4
    ffn_ranges_per_layer(model.to(torch.bfloat16), config, layout, "gen")  # rounding is not a mismatch
    model.float()
    with pytest.raises(ValueError, match="does not match this model's weights"):
        ffn_ranges_per_layer(original, config, layout, "gen")
    with pytest.raises(ValueError, match="call prepare_pruned_model on the model you run|Call prepare_pruned_model"):
        backend = flashu_backend("gen", config, layout)
        generate_images_compiled(torch.compile(original, backend=backend), backend, [[3, 4]], baseline_steps=4)
    # a user's own loop (the step protocol, no pipeline) is refused by the backend before its first image
    torch._dynamo.reset()
    backend = flashu_backend("gen", config, layout, piece_backend="eager")
    gen = torch.compile(original, backend=backend)
    batch = compiled_batch(original.config, build_gen_batch(original.config, [[3, 4]], guided=True))
    x = torch.zeros(2, original.config.latent_channels, *original.config.latent_size)
    backend.begin_image(2, 5.0)
    with pytest.raises(ValueError, match="does not match this model's weights"), backend.step(0):
        gen(batch.tokens, x, torch.full((2,), 0.5), batch.offsets, batch.mask, return_logits=False)
    und = FlashUConfig.for_task("und", ffn_width_multiple=8)
    und_layout = prepare_pruned_model(model, {"und": calibrate(model, "und", und_samples(model), und,
                                                               progress=False)}, {"und": und})
    with pytest.raises(ValueError, match="does not match this model's weights"):
        answer_question_flashu(tiny(), torch.zeros(1, 16, 8, 8), [4, 5], und, und_layout, max_new_tokens=2)
    torch._dynamo.reset()  # the plain answer loop on a compiled model: the backend refuses it at the prefill
    und_backend = flashu_backend("und", und, und_layout, piece_backend="eager")
    with pytest.raises(ValueError, match="does not match this model's weights"):
        answer_question(torch.compile(tiny(), backend=und_backend), torch.zeros(1, 16, 8, 8), [4, 5],
                        max_new_tokens=2)


def test_prepare_single_task_and_unpruned_task() -> None:
    model = tiny()
    calib = calibrate(model, "gen", PROMPTS[:1], gen_source="text_only", progress=False)
    layout = prepare_pruned_model(model, {"gen": calib}, {"gen": FlashUConfig.off("gen")})
    assert layout.ranges == {} and layout.task_ranges("gen", 0) is None
    assert torch.equal(layout.order[0], torch.arange(get_config("tiny").intermediate_size))
    layout = prepare_pruned_model(model, calib)
    assert set(layout.ranges) == {"gen"} and layout.task_ranges("gen", 3) == ((0, 192),)


@st.composite
def keep_sets(draw: st.DrawFn) -> dict[str, Tensor]:
    layers, size = draw(st.integers(1, 4)), draw(st.integers(1, 48))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tasks = draw(st.sampled_from([("gen",), ("und",), ("gen", "und")]))
    keep = {}
    for task in tasks:
        width = draw(st.integers(1, size))
        idx = torch.stack([torch.randperm(size, generator=gen)[:width] for _ in range(layers)])
        keep[task] = torch.zeros(layers, size, dtype=torch.bool).scatter_(1, idx, True)
    return keep


@settings(max_examples=60, deadline=None)
@given(keep=keep_sets())
def test_build_ffn_layout_structure(keep: dict[str, Tensor]) -> None:
    layout = build_ffn_layout(keep)
    layers, size = next(iter(keep.values())).shape
    positions = torch.arange(size)
    for i in range(layers):
        order = layout.order[i]
        assert torch.equal(order.sort().values, positions)  # a permutation
        spans = {}
        for task, mask in keep.items():
            ((lo, hi),) = layout.task_ranges(task, i)
            assert 0 <= lo <= hi <= size and hi - lo == int(mask[0].sum())  # uniform width per task
            assert torch.equal(mask[i][order], (positions >= lo) & (positions < hi))  # exactly the kept ones
            spans[task] = (lo, hi)
        if len(keep) == 1:
            assert next(iter(spans.values()))[0] == 0
            continue
        (g_lo, g_hi), (u_lo, u_hi) = spans["gen"], spans["und"]
        both, union = keep["gen"][i] & keep["und"][i], keep["gen"][i] | keep["und"][i]
        assert g_lo == 0 and u_lo <= g_hi  # union is one contiguous block from 0
        assert max(g_hi, u_hi) == int(union.sum()) and g_hi - u_lo == int(both.sum())  # overlap = intersection


# ---- analysis and CLIs ------------------------------------------------------------------------------------
def test_specialization_counts_add_up() -> None:
    model = tiny()
    gen = calibrate(model, "gen", PROMPTS, steps=2, progress=False)
    und = calibrate(model, "und", und_samples(model), progress=False)
    report = specialization(gen, und, top_fraction=0.5)
    k, size = report["top_k"], report["intermediate_size"]
    assert k == 128 and len(report["layers"]) == 4
    for row in report["layers"]:
        assert row["gen_only"] + row["both"] == k == row["und_only"] + row["both"]
        assert row["gen_only"] + row["und_only"] + row["both"] + row["neither"] == size
    for name, total in report["totals"].items():
        assert total == sum(row[name] for row in report["layers"])
    same = specialization(gen, gen, top_fraction=0.25)
    assert same["totals"]["gen_only"] == 0 and same["totals"]["both"] == 4 * 64
    other = calibrate(tiny(seed=2), "und", und_samples(model), progress=False)
    with pytest.raises(ValueError, match="different models"):
        specialization(gen, other)


def test_cli_calibrate_and_analyze(tmp_path, capsys) -> None:
    from harness.analyze_cli import main as analyze
    from harness.calibrate_cli import main as calibrate_cli

    out = tmp_path / "calib"
    assert calibrate_cli(["--task", "gen", "--samples", "2", "--steps", "3", "--out", str(out / "gen")]) == 0
    assert calibrate_cli(["--task", "und", "--samples", "2", "--method", "wanda", "--out", str(out / "und")]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "kept 192" in text and "gen.safetensors" in text
    assert analyze(["--gen", str(out / "gen"), "--und", str(out / "und"), "--out", str(tmp_path / "an")]) == 0
    text = capsys.readouterr().out
    assert "gen-only" in text and (tmp_path / "an" / "specialization.json").exists()
