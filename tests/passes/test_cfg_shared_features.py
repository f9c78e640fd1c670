"""passes.cfg_shared_features against its eager twin (the runtime's ``block_embeddings_cfg_shared``): on a CFG
batch of equal latent halves the rewritten graph runs SigLIP and the fusion on half the batch and returns the same
velocity bit for bit; a graph it cannot halve safely stays exact, with a warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.layout import build_gen_batch
from passes.cfg_shared_features import latent_region, share_cfg_features


def cfg_inputs(model, prompts: list[list[int]], seed: int, t: float = 0.3):
    """A guided batch (cond rows, then null rows) whose two latent halves are equal, as the CFG sampler feeds."""
    cfg = model.config
    batch = build_gen_batch(cfg, prompts, guided=True)
    half = torch.randn(len(prompts), cfg.latent_channels, *cfg.latent_size,
                       generator=torch.Generator().manual_seed(seed))
    m = 2 * len(prompts)
    return batch.tokens, torch.cat([half, half]), torch.full((m,), t), batch.offsets, batch.mask, False


def graph_code(gm: torch.fx.GraphModule) -> str:
    return gm.code


@settings(deadline=None, max_examples=6)
@given(num_prompts=st.integers(1, 3), seed=st.integers(0, 1000))
def test_half_batch_features_give_the_same_velocity(tiny_model, num_prompts: int, seed: int) -> None:
    prompts = [[(3 * i + j + seed) % 200 for j in range(1 + (i + seed) % 6)] for i in range(num_prompts)]
    with torch.no_grad():
        gm, inputs = capture(tiny_model, *cfg_inputs(tiny_model, prompts, seed))
        want = gm(*inputs)
        _, region = latent_region(gm)
        work = copy.deepcopy(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the pass must match here, not refuse
            halved = share_cfg_features(work)
        got = work(*inputs)
    assert halved == len(region) > 0
    # the same values; a half-size matmul may round differently in the last bit (BLAS blocks by batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    m = 2 * num_prompts
    names = {r.name for r in region}
    linears = [n for n in work.graph.nodes if n.name in names and n.target is torch.nn.functional.linear]
    assert linears and all(n.meta["example_value"].shape[0] == m // 2 for n in linears)  # SigLIP at half batch
    assert tiny_model(*cfg_inputs(tiny_model, prompts, seed)).velocity.shape[0] == m


def test_the_region_is_the_image_features_alone(tiny_model) -> None:
    """Nothing that reads the tokens, t, offsets or mask is in the region; its one output is the fused features."""
    with torch.no_grad():
        gm, _ = capture(tiny_model, *cfg_inputs(tiny_model, [[5, 6]], 0))
    _, region = latent_region(gm)
    inside = set(region)
    leaving = [n for n in region if any(u not in inside for u in n.users)]
    assert len(leaving) == 1
    h = tiny_model.config.hidden_size
    assert tuple(leaving[0].meta["example_value"].shape) == (2, tiny_model.config.num_image_tokens, h)


def test_an_odd_batch_is_left_exact_with_a_warning(tiny_model) -> None:
    tokens, latents, t, offsets, mask, _ = cfg_inputs(tiny_model, [[5, 6]], 0)
    with torch.no_grad():
        gm, _ = capture(tiny_model, tokens[:1], latents[:1], t[:1], offsets[:1], mask[:1], False)
    before = graph_code(gm)
    with pytest.warns(UserWarning, match="cfg_shared_features: the latents' batch 1"):
        assert share_cfg_features(gm) == 0
    assert graph_code(gm) == before


class FlattenedBatch(torch.nn.Module):
    """Features normalized over the whole batch through a flatten: halving it cannot be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mixed = self.proj(latents).reshape(-1).softmax(0).reshape(latents.shape)
        return mixed * t[:, None]


class SoftmaxOverBatch(FlattenedBatch):
    """The same mixing with every shape kept: only the op's dim shows it."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).softmax(0) * t[:, None]


@pytest.mark.parametrize(("module", "why"), [(FlattenedBatch, "does not keep the batch"),
                                             (SoftmaxOverBatch, "acts along the batch dim")])
def test_a_region_that_mixes_the_batch_is_left_exact_with_a_warning(module, why: str) -> None:
    latents = torch.randn(1, 8).repeat(2, 1)
    with torch.no_grad():
        gm, inputs = capture(module(), latents, torch.ones(2))
        want = gm(*inputs)
    before = graph_code(gm)
    with pytest.warns(UserWarning, match=f"cfg_shared_features: node .* {why}"):
        assert share_cfg_features(gm) == 0
    assert graph_code(gm) == before
    with torch.no_grad():
        assert torch.equal(gm(*inputs)[0], want[0])


def test_a_graph_without_latents_is_left_exact_with_a_warning() -> None:
    with torch.no_grad():
        gm, _ = capture(torch.nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.warns(UserWarning, match="no latents input"):
        assert share_cfg_features(gm) == 0
