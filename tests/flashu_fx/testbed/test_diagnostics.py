"""The testbed's diagnostics: the flow-loss split (exact on velocities whose errors are known), the caption edits
and how far they move pictures and velocities (against the world's own), and the grid-position probes."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.layout import build_gen_batch
from flashu_fx.model import Showo2, Showo2Output
from flashu_fx.testbed import codec, scorer, world
from flashu_fx.testbed.checkpoint import load_testbed
from flashu_fx.testbed.diagnostics import (
    CHANGED_PIXELS,
    caption_sensitivity,
    edited_prompt,
    flow_loss_parts,
    grid_position_r2,
    output_centres,
    score_generation,
    split_flow_loss,
    velocity_sensitivity,
    world_sensitivity,
)
from flashu_fx.testbed.train import init_for_training
from tests.flashu_fx.testbed.test_train import SMALL  # the testbed's layout, a two-layer trunk


def renders(n: int, seed: int = 0) -> torch.Tensor:
    _, images = world.training_batch_gen(np.random.default_rng(seed), n)
    return torch.from_numpy(images)


def test_data_projector_holds_every_image_and_nothing_else():
    p = codec.data_projector()
    assert torch.allclose(p @ p, p, atol=1e-5) and torch.allclose(p, p.T, atol=1e-6)
    assert round(float(torch.trace(p))) == codec.DATA_CHANNELS
    z = codec.encode(renders(4)).permute(0, 2, 3, 1).reshape(-1, codec.LATENT_CHANNELS)
    assert torch.allclose(z @ p.T, z, atol=1e-4)  # encoded images lie in the 12 directions


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.floats(0.0, 1.0))
def test_a_velocity_that_removes_part_of_the_noise_is_measured_exactly(seed, keep):
    """v = x1 - x0 + keep * P_null x0: the null directions keep ``keep`` of the noise, the image ones none."""
    images = renders(4, seed)
    x1 = codec.encode(images)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    null = torch.eye(16) - codec.data_projector()

    def velocity(xt, t):
        recovered = (xt - t * x1) / (1 - t)  # the noise, as a model that knows x1 would find it
        return x1 - recovered + keep * torch.einsum("ij,bjhw->bihw", null, recovered)

    for part in split_flow_loss(velocity, images, x0, times=(0.2, 0.7)):
        assert part.image_mse == pytest.approx(0, abs=1e-8)
        expected_null = keep**2 * float(torch.einsum("ij,bjhw->bihw", null, x0).square().mean())
        assert part.null_mse == pytest.approx(expected_null, rel=1e-4, abs=1e-8)
        removal = np.array(part.removal)
        assert np.allclose(removal[:4], 1 - keep, atol=2e-3) and np.allclose(removal[4:], 1, atol=2e-3)


def test_times_are_checked():
    with pytest.raises(ValueError, match=r"times must be values in \(0, 1\), got \[1.0\]"):
        split_flow_loss(lambda xt, t: xt, renders(1), torch.zeros(1, 16, 24, 24), times=(1.0,))


def test_the_shipped_testbed_splits_its_own_flow_loss():
    testbed = load_testbed()
    model, n, seed, t = testbed.model, 3, 4, 0.5
    (part,) = flow_loss_parts(model, testbed.tokenizer, times=(t,), n=n, seed=seed)
    # the same call's MSE computed directly: the split adds up to it
    prompts = world.heldout_gen_prompts(n, seed)
    rng = world.rng_for("heldout", seed + 1)
    x1 = codec.encode(torch.from_numpy(world.render_batch([world.scene_for_prompt(p, rng) for p in prompts])))
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    batch = build_gen_batch(model.config, [testbed.tokenizer.encode(p.caption) for p in prompts], guided=False)
    with torch.no_grad():
        v = model(batch.tokens, t * x1 + (1 - t) * x0, torch.full((n,), t), batch.offsets, batch.mask).velocity
    assert part.mse == pytest.approx(float((v - (x1 - x0)).square().mean()), rel=1e-4)
    assert len(part.removal) == 16 and all(np.isfinite(part.removal))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), edit=st.sampled_from(["relation", "colors"]))
def test_a_caption_edit_changes_only_the_words_that_bind(seed: int, edit: str) -> None:
    category = "position" if edit == "relation" else "color_attr"
    prompt = world.sample_gen_prompt(world.rng_for("heldout", seed), category)
    edited = edited_prompt(prompt, edit)
    assert edited_prompt(edited, edit) == prompt and edited.caption != prompt.caption  # an involution
    words, edited_words = prompt.caption.split(), edited.caption.split()
    assert [w[1] for w in prompt.objects] == [w[1] for w in edited.objects]  # the same shapes, in the same order
    if edit == "colors":  # the same words, two of them exchanged: a bag of words cannot tell the captions apart
        assert sorted(words) == sorted(edited_words)
        assert sum(a != b for a, b in zip(words, edited_words, strict=True)) == 2
    else:
        assert edited.relation != prompt.relation and len(words) == len(edited_words)


def test_caption_edits_are_refused_where_they_do_not_apply() -> None:
    single = world.make_gen_prompt("single_object", [(None, "circle", 1)])
    with pytest.raises(ValueError, match="the 'relation' edit applies to position prompts, got a single_object"):
        edited_prompt(single, "relation")
    with pytest.raises(ValueError, match="edit must be one of"):
        edited_prompt(single, "shapes")


def test_the_shipped_testbed_measures_its_caption_sensitivity() -> None:
    testbed = load_testbed()
    found = caption_sensitivity(testbed.model, testbed.tokenizer, "colors", n=2, steps=4, guidance=4.0, seed=3)
    assert found.edit == "colors" and found.prompts == 2
    assert found.pixel_change >= 0 and found.changed in (0.0, 0.5, 1.0)
    # every pair over the threshold puts the mean over it, none over it keeps the mean under it
    assert found.changed < 1.0 or found.pixel_change > CHANGED_PIXELS
    assert found.changed > 0.0 or found.pixel_change <= CHANGED_PIXELS
    assert 0 <= found.original_correct <= 1 and 0 <= found.edited_correct <= 1


def test_score_generation_detects_each_picture_once_and_scores_what_it_found() -> None:
    testbed = load_testbed()
    prompts = world.heldout_gen_prompts(4)
    scored = score_generation(testbed.model, testbed.tokenizer, prompts, 4.0, 4, seeds=range(4))
    assert scored.images.shape == (4, 48, 48, 3) and len(scored.found) == 4
    assert scored.found == [scorer.detect(image) for image in scored.images]
    assert scored.correct == [scorer.score_prompt(p, image) for p, image in zip(prompts, scored.images, strict=True)]
    assert scored[0] == scored.correct  # the verdicts first, as the two-part result it replaces


class WordVelocity(torch.nn.Module):
    """A stand-in for Showo2 whose velocity is a fixed function of the caption tokens alone: each token's vector
    summed (``ordered=False``: a bag of words) or weighted by its place (``ordered=True``), plus the latents."""

    def __init__(self, config, ordered: bool) -> None:
        super().__init__()
        self.config, self.ordered = config, ordered
        self.table = torch.nn.Parameter(torch.randn(config.vocab_size, codec.LATENT_CHANNELS,
                                                    generator=torch.Generator().manual_seed(0)))

    def forward(self, tokens, latents, t, offsets, mask, return_logits=True):
        place = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float32) if self.ordered else torch.ones(
            tokens.shape[1])
        text = (self.table[tokens] * place[None, :, None]).sum(1)  # (M, C)
        return Showo2Output(velocity=latents + text[:, :, None, None], logits=None)


@pytest.mark.parametrize("ordered", [False, True])
def test_a_bag_of_words_model_ignores_the_colour_exchange_and_an_ordered_one_does_not(ordered: bool) -> None:
    """Exchanging two colours keeps a caption's bag of words, so a bag-of-words velocity does not move (0 exactly);
    reversing a relation changes a word, so every model moves; the share does not depend on the velocity's scale."""
    testbed = load_testbed()
    model, tok = WordVelocity(testbed.model.config, ordered), testbed.tokenizer
    colors, relation = (velocity_sensitivity(model, tok, edit, n=4) for edit in ("colors", "relation"))
    assert colors > 1e-3 if ordered else colors < 1e-5  # the bag's sums differ by float rounding alone
    assert relation > 1e-3
    with torch.no_grad():
        model.table.mul_(10.0)  # ten times the pull and the move (the latents cancel in both): the same share
    assert velocity_sensitivity(model, tok, "relation", n=4) == pytest.approx(relation, rel=1e-4)


def test_velocity_sensitivity_checks_its_arguments() -> None:
    testbed = load_testbed()
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        velocity_sensitivity(testbed.model, testbed.tokenizer, "relation", n=0)
    with pytest.raises(ValueError, match="t must lie in"):
        velocity_sensitivity(testbed.model, testbed.tokenizer, "relation", t=1.0)
    with pytest.raises(ValueError, match="edit must be one of"):
        velocity_sensitivity(testbed.model, testbed.tokenizer, "shapes")


def test_the_shipped_testbed_measures_its_velocity_sensitivity() -> None:
    testbed = load_testbed()
    shares = [velocity_sensitivity(testbed.model, testbed.tokenizer, edit, n=4, seed=1) for edit in ("relation",
                                                                                                      "colors")]
    assert all(np.isfinite(s) and s > 0 for s in shares)


def test_velocity_sensitivity_of_bf16_weights_is_measured_in_fp32() -> None:
    """bf16 weights are measured on an fp32 copy: the same share as the fp32 model of the same (bf16-rounded)
    weights, and the model handed in stays bf16."""
    testbed = load_testbed()
    bf16 = copy.deepcopy(testbed.model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    share = velocity_sensitivity(bf16, testbed.tokenizer, "relation", n=4, seed=2)
    assert share == pytest.approx(velocity_sensitivity(fp32, testbed.tokenizer, "relation", n=4, seed=2), rel=1e-6)
    assert next(bf16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("edit", ["relation", "colors"])
def test_the_world_s_mean_pictures_follow_the_binding_words(edit: str) -> None:
    """A model that knew the world would move its noisy-start velocity under either edit by about as much as the
    caption's whole pull (the scenes a reversed relation or exchanged colours allow differ as much from the original's
    as any caption's do from the unconditional): the scale ``velocity_sensitivity`` is to approach."""
    assert world_sensitivity(edit, n=4, scenes=100) > 0.5
    with pytest.raises(ValueError, match="n and scenes must be >= 1"):
        world_sensitivity(edit, scenes=0)


def test_the_position_probes_find_a_sincos_table_and_not_a_random_one() -> None:
    """A model whose image position table starts as the 2-D sine-cosine table carries each token's row and column
    into the trunk (R^2 near 1); the N(0, 0.02) start carries neither. The hooks are gone afterwards."""
    tokenizer = load_testbed().tokenizer
    found = {init: grid_position_r2(init_for_training(Showo2(SMALL), seed=0, position_init=init).eval(), tokenizer,
                                    n=8) for init in ("sincos", "normal")}
    assert list(found["sincos"]) == ["input", *(f"layer.{i}" for i in range(SMALL.num_layers)),
                                     *(f"head.{i}" for i in range(SMALL.head_num_layers))]
    assert min(found["sincos"]["input"][:2]) > 0.9 and min(found["sincos"]["layer.0"][:2]) > 0.9
    assert max(found["normal"]["input"]) < 0.5
    with pytest.raises(ValueError, match="n must be >= 2"):
        grid_position_r2(load_testbed().model, tokenizer, n=1)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_centres_follow_unpatchify(patch_size: int) -> None:
    """Each output token's velocity lands on p * p raster-consecutive latent pixels (not its own patch): the centres
    are those pixels' mean row and column, and with p = 1 every token lands on its own pixel."""
    cfg = dataclasses.replace(SMALL, patch_size=patch_size)
    h, w = cfg.latent_size
    centres = output_centres(cfg)
    assert centres.shape == (h * w // patch_size**2, 2)
    first = torch.arange(patch_size**2, dtype=torch.float64) + patch_size**2 * 5  # token 5's raster pixels
    assert torch.equal(centres[5], torch.stack([(first // w).mean(), (first % w).mean()]))
    if patch_size == 1:
        k = torch.arange(h * w, dtype=torch.float64)
        assert torch.equal(centres, torch.stack([k // w, k % w], dim=1))
