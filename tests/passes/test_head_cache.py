"""passes.head_cache against its eager twin (``FlashUGenVelocity``'s head store and reuse): the exposed output is
the head blocks' output; a graph fed that output back computes the same velocity without the trunk or the head."""

from __future__ import annotations

import copy

import pytest
import torch
from captured import capture

from flashu_fx.diffusion_head import in_slot_mask
from flashu_fx.layout import build_gen_batch
from passes.head_cache import expose_head_output, reuse_head_output
from passes.partition import anchor


def forward_inputs(model, t: float = 0.3):
    cfg = model.config
    batch = build_gen_batch(cfg, [[5, 6, 7]], guided=True)
    latents = torch.randn(2, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    return batch.tokens, latents, torch.full((2,), t), batch.offsets, batch.mask, False


@pytest.fixture(scope="module")
def captured(tiny_model):
    with torch.no_grad():
        return capture(tiny_model, *forward_inputs(tiny_model))


def test_the_exposed_head_output_is_the_head_blocks_output(tiny_model, captured) -> None:
    gm, inputs = copy.deepcopy(captured[0]), captured[1]
    assert expose_head_output(gm) == 1
    with torch.no_grad():
        velocity, head_out = gm(*inputs)
        tokens, latents, t, offsets, mask, _ = forward_inputs(tiny_model)
        m = tiny_model
        c = m.time_embeds(t)
        x = m.embed_inputs(tokens, offsets, m.image_embeds(latents), c)
        cos, sin, head_cos, head_sin = m.rope(tokens.shape[1], x.dtype, x.device)
        in_slot = in_slot_mask(offsets, tokens.shape[1], m.config.image_slot_len)
        want = m.head_blocks(m.showo(x, cos, sin, mask), c, in_slot, head_cos, head_sin, mask)
    assert torch.allclose(head_out, want, atol=1e-6)
    assert torch.equal(velocity, captured[0](*inputs)[0])  # the velocity is unchanged


def test_a_reused_head_output_gives_the_velocity_without_the_trunk(tiny_model, captured) -> None:
    exposed, inputs = copy.deepcopy(captured[0]), captured[1]
    expose_head_output(exposed)
    with torch.no_grad():
        velocity, head_out = exposed(*inputs)
    reuse = copy.deepcopy(captured[0])
    removed = reuse_head_output(reuse)
    layer_nodes = [n for n in captured[0].graph.nodes if n.op != "placeholder" and anchor(n)]
    assert removed >= len(layer_nodes)  # every decoder layer and head block, and SigLIP, are gone
    assert not [n for n in reuse.graph.nodes if n.op != "placeholder" and anchor(n)]
    with torch.no_grad():
        (again,) = reuse(*inputs, head_out)
    assert torch.equal(again, velocity)
