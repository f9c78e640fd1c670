"""passes.part_layout against its eager twin (the captured forward itself): the values one part hands the next
become contiguous (the SigLIP stream, transposed in eager), the outputs stay bit for bit the same."""

from __future__ import annotations

import copy
import dataclasses

import torch
from captured import capture
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import get_config
from flashu_fx.layout import build_gen_batch
from flashu_fx.model import Showo2, init_random_weights
from passes.graph_utils import DERIVED_BY, SOURCE
from passes.part_layout import contiguous_part_outputs
from passes.partition import partition_showo2_graph


def forward_inputs(model: Showo2, prompts: list[list[int]], seed: int):
    cfg = model.config
    batch = build_gen_batch(cfg, prompts, guided=True)
    m = 2 * len(prompts)
    latents = torch.randn(m, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))
    return batch.tokens, latents, torch.full((m,), 0.4), batch.offsets, batch.mask, False


def part_inputs(gm: torch.fx.GraphModule, inputs: list) -> dict[str, list]:
    """Each part's tensor inputs on one run of ``gm``'s partition (the layouts the compiled parts would see)."""
    graph = partition_showo2_graph(gm)
    seen: dict[str, list] = {}

    def record(name: str, args: tuple) -> None:
        seen.setdefault(name, list(args))

    for part in graph.parts:
        part.module.register_forward_pre_hook(lambda _m, args, name=part.name: record(name, args))
    with torch.no_grad():
        graph.root(*inputs)
    return seen


@settings(max_examples=3, deadline=None)
@given(siglip_layers=st.integers(1, 3), prompts=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_the_siglip_stream_leaves_each_part_as_rows_and_the_outputs_stay_exact(tiny_model, siglip_layers: int,
                                                                                prompts: int, seed: int) -> None:
    config = dataclasses.replace(tiny_model.config, und_num_layers=siglip_layers)
    model = init_random_weights(Showo2(config), seed=seed).eval()
    args = forward_inputs(model, [[5 + i, 6, 7][: 2 + i] for i in range(prompts)], seed)
    with torch.no_grad():
        gm, inputs = capture(model, *args)
    original = copy.deepcopy(gm)
    before = part_inputs(original, inputs)
    transposed = [name for name, values in before.items() if name.startswith("siglip.") or name == "fuse"
                  if not all(v.is_contiguous() for v in values if isinstance(v, torch.Tensor) and v.dim() == 3)]
    assert transposed == [f"siglip.{k}" for k in range(siglip_layers)] + ["fuse"]  # eager's layout, per part

    # one value per boundary of the stream: embed -> siglip.0 -> ... -> fuse
    assert contiguous_part_outputs(gm) == siglip_layers + 1
    after = part_inputs(gm, inputs)
    assert all(v.is_contiguous() for name in transposed for v in after[name] if isinstance(v, torch.Tensor))
    with torch.no_grad():
        expected, got = original(*inputs), gm(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))

    added = [n for n in gm.graph.nodes if n.meta.get(DERIVED_BY) == "part_layout"]
    assert len(added) == siglip_layers + 1 and all(n.target == "contiguous" and n.meta[SOURCE] for n in added)
    # each stays in the part of the value it copies: the parts and their sharing are unchanged
    rewritten, captured = partition_showo2_graph(gm), partition_showo2_graph(original)
    assert [p.name for p in rewritten.parts] == [p.name for p in captured.parts]
    assert sorted(rewritten.groups().values()) == sorted(captured.groups().values())


def test_a_graph_already_in_rows_is_left_alone(tiny_model) -> None:
    with torch.no_grad():
        gm, _ = capture(tiny_model, *forward_inputs(tiny_model, [[5, 6, 7]], 0))
    assert contiguous_part_outputs(gm) == 2 + 1
    code = gm.code
    assert contiguous_part_outputs(gm) == 0  # a second run finds only rows
    assert gm.code == code


def test_the_backend_runs_it_once_per_capture() -> None:
    from flashu_fx.compiled import flashu_backend, generate_images_compiled

    model = init_random_weights(Showo2(get_config("tiny")), seed=1).eval()
    backend = flashu_backend("gen", piece_backend="eager")
    torch._dynamo.reset()
    try:
        generate_images_compiled(torch.compile(model, backend=backend), backend, [[5, 6, 7]], baseline_steps=3)
    finally:
        torch._dynamo.reset()
    assert backend._gen_graph.layout_rewrites == model.config.und_num_layers + 1
