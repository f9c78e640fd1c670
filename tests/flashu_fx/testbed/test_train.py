"""Training the testbed: the joint batch is laid out as the pipelines lay out inference, and the loop learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import get_config
from flashu_fx.layout import build_gen_batch, build_mmu_prompt
from flashu_fx.model import Showo2
from flashu_fx.testbed import codec, world
from flashu_fx.testbed.data import IGNORE, build_gen_pool, build_und_pool
from flashu_fx.testbed.tokenizer import WordTokenizer
from flashu_fx.testbed.train import (
    TrainConfig,
    flow_weights,
    graft_sincos,
    init_for_training,
    joint_batch,
    joint_loss,
    param_groups,
    sample_flow_time,
    sincos_2d,
    train,
    used_length,
)

# The testbed's token layout (grid, sequence length, vocabulary) with a two-layer trunk: a CPU step in ~0.1 s.
SMALL = dataclasses.replace(
    get_config("testbed-nano"), name="testbed-small", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, intermediate_size=128, und_hidden_size=32, und_num_layers=1, und_num_heads=2,
    und_intermediate_size=64, head_hidden_size=48, head_num_layers=1, head_num_heads=3, head_num_kv_heads=1,
    head_dim_head=16, head_intermediate_size=96, frequency_embedding_size=32,
)


@pytest.fixture(scope="module")
def pools():
    tok = WordTokenizer(world.vocabulary(), SMALL.specials)
    rng = world.rng_for("train", 0)
    return tok, build_gen_pool(SMALL, tok, rng, 64, progress=False), build_und_pool(SMALL, tok, rng, 64,
                                                                                     progress=False)


def test_pool_rows_are_the_inference_layouts(pools) -> None:
    tok, gen, und = pools
    rng = world.rng_for("train", 0)  # the same stream: the pools' first examples
    prompts, images = world.training_batch_gen(rng, 64)
    ids = tok.encode(prompts[0].caption)
    expected = build_gen_batch(SMALL, [ids], guided=True)
    assert torch.equal(gen.tokens[0], expected.tokens[0]) and int(gen.offsets[0]) == int(expected.offsets[0])
    assert torch.equal(gen.null_tokens, expected.tokens[1])
    assert torch.equal(gen.images[0], torch.from_numpy(images[0]))
    items, _ = world.training_batch_und(rng, 64)
    prompt = build_mmu_prompt(SMALL, tok, items[0].question)
    n0 = prompt.tokens.shape[1]
    assert torch.equal(und.tokens[0, :n0], prompt.tokens[0])
    assert int(und.offsets[0]) == prompt.offset and int(und.block_offsets[0]) == prompt.block_offset
    answer = [*tok.encode(items[0].answer), SMALL.specials.eos]
    targets = und.targets[0]
    assert targets[n0 - 1 : n0 - 1 + len(answer)].tolist() == answer  # logits at p predict token p + 1
    assert (targets != IGNORE).sum() == len(answer)
    assert und.tokens[0, n0 : n0 + len(answer)].tolist() == answer


def test_training_steps_lower_the_loss_on_a_fixed_batch(pools) -> None:
    _, gen, und = pools
    cfg = TrainConfig(steps=30, batch_gen=4, batch_und=4, lr=3e-3, warmup=1, pool_gen=64, pool_und=64)
    torch.manual_seed(0)
    model = init_for_training(Showo2(SMALL), seed=0)
    batch = joint_batch(model, gen, und, cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [float(v) for v in joint_loss(model, batch, cfg)]
    ema, log = train(model, gen, und, cfg, progress=False)
    with torch.no_grad():
        after = [float(v) for v in joint_loss(model, batch, cfg)]
    assert after[0] < 0.8 * before[0] and after[2] < before[2]  # total and answer cross-entropy both fell
    assert log[0]["step"] == 0 and log[-1]["step"] == 29 and all(k in log[-1] for k in ("flow", "answer", "lr"))
    moved = [not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True)]
    assert any(moved)  # the EMA trails the trained weights


def test_batches_cut_at_the_used_length_give_the_same_loss(pools) -> None:
    """Training cuts every batch after the last position any pool row uses: the same flow and answer losses."""
    _, gen, und = pools
    pad = SMALL.specials.pad
    length = used_length(gen, und, pad)
    last = max(int(torch.nonzero(row != pad).max()) for row in [*gen.tokens, gen.null_tokens, *und.tokens])
    assert length == -(-(last + 1) // 8) * 8 < SMALL.max_seq_len
    assert used_length(gen, und, pad, multiple=1) == last + 1
    assert used_length(gen, und, pad, multiple=1000) == SMALL.max_seq_len  # never past the rows
    with pytest.raises(ValueError, match="multiple=0 is invalid"):
        used_length(gen, und, pad, multiple=0)
    torch.manual_seed(0)
    model = Showo2(SMALL)  # default init: a non-zero velocity
    cfg = TrainConfig(batch_gen=4, batch_und=4, caption_dropout=0.5)
    full = joint_batch(model, gen, und, cfg, torch.Generator().manual_seed(5))
    cut = joint_batch(model, gen, und, cfg, torch.Generator().manual_seed(5), length)
    assert cut["tokens"].shape == (8, length) and cut["mask"].shape[-2:] == (length, length)
    assert torch.equal(cut["tokens"], full["tokens"][:, :length]) and torch.equal(cut["latents"], full["latents"])
    assert (full["answer_targets"][:, length:] == IGNORE).all()
    with torch.no_grad():
        for a, b in zip(joint_loss(model, cut, cfg), joint_loss(model, full, cfg), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_init_starts_the_head_at_zero_velocity(pools) -> None:
    _, gen, und = pools
    model = init_for_training(Showo2(SMALL), seed=0)
    cfg = TrainConfig(batch_gen=2, batch_und=2)
    batch = joint_batch(model, gen, und, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(batch["tokens"], batch["latents"], batch["t"], batch["offsets"], batch["mask"])
    assert torch.count_nonzero(out.velocity) == 0  # zero adaLN and final layer, as DiT and upstream start


def test_bad_train_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="TrainConfig.caption_dropout=1.5"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="TrainConfig.batch_und=0"):
        TrainConfig(batch_und=0)
    with pytest.raises(ValueError, match=r"TrainConfig.probe_every=-1 must be >= 0 \(0: no probe\)"):
        TrainConfig(probe_every=-1)
    with pytest.raises(ValueError, match=r"TrainConfig.foreground_weight=-1 must be >= 0"):
        TrainConfig(foreground_weight=-1)
    with pytest.raises(ValueError, match="TrainConfig.foreground_weight=nan"):
        TrainConfig(foreground_weight=float("nan"))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"TrainConfig.time_shift={bad} must be > 0 \(or 0: Show-o2's own"):
            TrainConfig(time_shift=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"TrainConfig.noise_end_share={bad} must lie in \[0, 1\]"):
            TrainConfig(noise_end_share=bad)
    with pytest.raises(ValueError, match=r"TrainConfig.compile='inductr' is not a torch.compile backend: allowed "
                                         r'"" \(eager\) or one of .*inductor'):
        TrainConfig(compile="inductr")
    assert TrainConfig(compile="eager").compile == "eager"


def test_the_default_time_shift_is_show_o2s_and_a_shift_only_moves_t_toward_the_noise() -> None:
    """Show-o2's shift written its own way (1 - e^mu / (e^mu + 1 / (1 - t) - 1)) draws the same t; shift 1 is the
    plain logit-normal; a larger shift moves every draw toward t = 0 (noise) and keeps its rank."""
    def draw(shift: float) -> torch.Tensor:
        return sample_flow_time(4096, 144, torch.Generator().manual_seed(3), "cpu", shift)

    u = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    plain = torch.sigmoid(u).clamp(1e-5, 1 - 1e-5)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (144 - 256)
    show_o2 = 1 - torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / (1 - plain) - 1))
    torch.testing.assert_close(draw(0.0), show_o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(draw(1.0), plain)
    default, three = draw(0.0), draw(3.0)
    assert bool((three < default).all())
    assert torch.equal(three.argsort(), plain.argsort())
    assert float((three < 0.2).float().mean()) > 1.5 * float((default < 0.2).float().mean())


def test_noise_end_rows_move_only_t_and_its_inputs(pools) -> None:
    """A share of 0 draws the batch of a run without the option bit for bit; a share of 1 puts every generation row
    at the noise end (98% below t = 0.1, against 4% of Show-o2's) and changes nothing but t, x_t and the target."""
    _, gen, und = pools
    model = Showo2(SMALL)

    def batch(share: float) -> dict[str, torch.Tensor]:
        return joint_batch(model, gen, und, TrainConfig(batch_gen=64, batch_und=2, noise_end_share=share),
                           torch.Generator().manual_seed(5))

    plain, none, every = batch(0.0), batch(0.0), batch(1.0)
    assert all(torch.equal(plain[k], none[k]) for k in plain)
    n = 64
    assert float((every["t"][:n] < 0.1).float().mean()) > 0.9
    assert float((plain["t"][:n] < 0.1).float().mean()) < 0.2
    assert torch.equal(every["t"][n:], plain["t"][n:])  # the understanding rows keep t = 1
    for key in ("tokens", "offsets", "mask", "answer_targets", "flow_weight"):
        assert torch.equal(every[key], plain[key]), key
    assert not torch.equal(every["latents"][:n], plain["latents"][:n])
    half = batch(0.5)
    at_end = half["t"][:n] != plain["t"][:n]
    assert 0.3 < float(at_end.float().mean()) < 0.7
    assert torch.equal(half["t"][:n][~at_end], plain["t"][:n][~at_end])


def test_foreground_weight_zero_is_the_plain_mse(pools) -> None:
    _, gen, und = pools
    torch.manual_seed(0)
    model = Showo2(SMALL)  # default init: a non-zero velocity, unlike init_for_training's
    cfg = TrainConfig(batch_gen=4, batch_und=2)
    batch = joint_batch(model, gen, und, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(batch["flow_weight"], torch.ones(4, 1, *batch["latents"].shape[2:]))
    with torch.no_grad():
        out = model(batch["tokens"], batch["latents"], batch["t"], batch["offsets"], batch["mask"])
        _, flow, _ = joint_loss(model, batch, cfg)
        assert torch.count_nonzero(out.velocity[:4]) > 0
        assert torch.equal(flow, F.mse_loss(out.velocity[:4].float(), batch["velocity_target"]))
        # The weighted path with all-one weights is the same MSE, to fp32 rounding.
        _, weighted, _ = joint_loss(model, batch, dataclasses.replace(cfg, foreground_weight=1.0))
    torch.testing.assert_close(weighted, flow, rtol=1e-6, atol=0)


@settings(max_examples=40, deadline=None)
@given(foreground_weight=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_foreground_weights_average_one_and_favour_objects(pools, foreground_weight, seed) -> None:
    _, gen, und = pools
    cfg = TrainConfig(batch_gen=8, batch_und=1, foreground_weight=foreground_weight)
    generator = torch.Generator().manual_seed(seed)
    batch = joint_batch(Showo2(SMALL), gen, und, cfg, generator)
    weight = batch["flow_weight"]
    assert weight.dtype == torch.float32 and weight.shape == (8, 1, *batch["latents"].shape[2:])
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(8))
    t = batch["t"][:8, None, None, None]  # the clean images back from x_t and the velocity: x1 = x_t + (1 - t) v
    images = codec.decode(batch["latents"][:8] + (1 - t) * batch["velocity_target"])
    torch.testing.assert_close(weight, flow_weights(images, foreground_weight), rtol=0, atol=0)
    share = F.avg_pool2d((images > 0).any(dim=-1)[:, None].float(), codec.FACTOR)
    for w, s in zip(weight, share, strict=True):
        assert (s == 1).any() and (s == 0).any()  # every render has an object and some background
        assert w[s == 1].min() > w[s == 0].max()  # object positions outweigh black ones
        assert torch.allclose(w[s == 0], w[s == 0][0]) and torch.allclose(w[s == 1], w[s == 1][0])
        ratio = float(w[s == 1][0] / w[s == 0][0])
        assert ratio == pytest.approx(1 + foreground_weight, rel=1e-5)  # 1 + w before the per-row rescale


def test_a_compiled_training_step_follows_the_eager_one(pools) -> None:
    """``compile`` changes how the step runs, not what it computes (aot_eager: Dynamo + AOT autograd, no codegen)."""
    _, gen, und = pools
    runs = []
    for backend in ("", "aot_eager"):
        torch._dynamo.reset()
        cfg = TrainConfig(steps=3, batch_gen=2, batch_und=2, warmup=1, pool_gen=64, pool_und=64, compile=backend)
        model = init_for_training(Showo2(SMALL), seed=0)
        try:
            _, log = train(model, gen, und, cfg, progress=False)
        finally:
            torch._dynamo.reset()
        runs.append((log[-1]["loss"], [p.detach().clone() for p in model.parameters()]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4)
    for eager, compiled in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@settings(deadline=None, max_examples=8)
@given(scale=st.floats(0.1, 10.0).filter(lambda x: x != 1.0),
       prefix=st.sampled_from(["fusion_proj", "image_embedder_gen", "showo.model.layers.1"]))
def test_lr_scales_scale_exactly_the_named_parameters(scale: float, prefix: str) -> None:
    with torch.device("meta"):
        model = Showo2(SMALL)
    groups = param_groups(model, TrainConfig(lr_scales=((prefix, scale),)))
    names = {id(p): name for name, p in model.named_parameters()}
    scaled = {names[id(p)] for g in groups if g["lr_scale"] == scale for p in g["params"]}
    assert scaled == {name for name in names.values() if name.startswith(prefix)} and scaled
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter in exactly one group
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if "embed" in names[id(p)])


def test_lr_scales_refuse_a_prefix_that_names_nothing() -> None:
    with torch.device("meta"):
        model = Showo2(SMALL)
    with pytest.raises(ValueError, match=r"\['fusion_projection'\] name no parameter.*fusion_proj"):
        param_groups(model, TrainConfig(lr_scales=(("fusion_proj.0", 2.0), ("fusion_projection", 3.0))))
    with pytest.raises(ValueError, match="multiplier > 0"):
        TrainConfig(lr_scales=(("fusion_proj", 0.0),))


def test_a_scaled_group_takes_a_scaled_step(pools) -> None:
    """One AdamW step from the same state: the first step of Adam moves every weight by about lr, so a parameter
    with lr_scale 4 moves about four times as far as with 1."""
    tok, gen, und = pools
    moves = []
    for scale in (1.0, 4.0):
        model = init_for_training(Showo2(SMALL), seed=0)
        before = model.fusion_proj[1].weight.detach().clone()
        cfg = TrainConfig(steps=1, batch_gen=4, batch_und=2, warmup=1, lr_scales=(("fusion_proj", scale),))
        train(model, gen, und, cfg, progress=False)
        moves.append((model.fusion_proj[1].weight.detach() - before).abs().mean())
    assert torch.allclose(moves[1], 4 * moves[0], rtol=1e-3)


def test_the_probe_watches_the_ema_weights_every_probe_every_steps(pools) -> None:
    """The probe runs on the EMA model (what ships), without gradients, at steps probe_every, 2 probe_every, ...;
    its numbers join those steps' log entries, a step between the 50-step entries getting an entry of its own."""
    _, gen, und = pools
    cfg = TrainConfig(steps=25, batch_gen=2, batch_und=2, warmup=1, pool_gen=64, pool_und=64, probe_every=7)
    model = init_for_training(Showo2(SMALL), seed=0)
    seen = []

    def probe(ema: Showo2) -> dict[str, float]:
        assert ema is not model and not torch.is_grad_enabled() and not ema.training
        seen.append([p.detach().clone() for p in ema.parameters()])
        return {"pull": float(len(seen))}

    ema, log = train(model, gen, und, cfg, progress=False, probe=probe)
    assert [(e["step"], e["pull"]) for e in log if "pull" in e] == [(7, 1.0), (14, 2.0), (21, 3.0)]
    assert [e["step"] for e in log] == [0, 7, 14, 21, 24]
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[0], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[-1], strict=True))  # the EMA moved in between
    _, quiet = train(init_for_training(Showo2(SMALL), seed=0), gen, und, dataclasses.replace(cfg, probe_every=0),
                     progress=False, probe=probe)
    assert len(seen) == 3 and not any("pull" in e for e in quiet)  # probe_every=0: never


@given(side=st.integers(2, 12), quarter=st.integers(1, 8))
def test_sincos_2d_encodes_the_row_in_one_half_and_the_column_in_the_other(side: int, quarter: int) -> None:
    table = sincos_2d(side, 4 * quarter)
    assert table.shape == (side * side, 4 * quarter)
    grid = table.reshape(side, side, 2, 2 * quarter)  # (row, column, which half, channels)
    assert torch.equal(grid[:, :, 0], grid[:, :1, 0].expand(-1, side, -1))  # the first half: the row alone
    assert torch.equal(grid[:, :, 1], grid[:1, :, 1].expand(side, -1, -1))  # the second: the column alone
    torch.testing.assert_close(table[side, :quarter], torch.sin(1.0 / 10000 ** (torch.arange(quarter) / quarter)))
    assert torch.allclose(table.norm(dim=1), torch.full((side * side,), (2 * quarter) ** 0.5))  # sin^2 + cos^2
    assert len({tuple(row.tolist()) for row in table}) == side * side  # every cell its own vector


def test_a_sincos_start_sets_the_position_table_and_nothing_else() -> None:
    normal = init_for_training(Showo2(SMALL), seed=3)
    sincos = init_for_training(Showo2(SMALL), seed=3, position_init="sincos")
    for (name, a), (_, b) in zip(normal.named_parameters(), sincos.named_parameters(), strict=True):
        if name == "position_embedding.weight":
            assert torch.equal(b, sincos_2d(12, SMALL.und_hidden_size)) and not torch.equal(a, b)
        else:
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="position_init='grid' is invalid: allowed one of"):
        init_for_training(Showo2(SMALL), position_init="grid")
    with pytest.raises(ValueError, match="dim a multiple of 4"):
        sincos_2d(3, 6)


@settings(max_examples=5, deadline=None)
@given(scale=st.floats(0.05, 2.0))
def test_a_graft_adds_the_scaled_sincos_table_to_the_position_table_only(scale: float) -> None:
    trained = init_for_training(Showo2(SMALL), seed=5)
    before = {name: p.clone() for name, p in trained.named_parameters()}
    graft_sincos(trained, scale)
    for name, p in trained.named_parameters():
        if name == "position_embedding.weight":
            expected = before[name] + scale * sincos_2d(12, SMALL.und_hidden_size)
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_a_graft_refuses_a_scale_that_is_not_positive(scale: float) -> None:
    with pytest.raises(ValueError, match=f"graft_sincos: scale={scale} is invalid: allowed a number > 0"):
        graft_sincos(Showo2(SMALL), scale)
