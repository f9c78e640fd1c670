"""The backend: what runs is the graph Dynamo handed over, split into parts and compiled per
distinct part; its eager twin is the eager pipeline (``generate_images``)."""

from __future__ import annotations

import copy

import pytest
import torch
from compiled_oracles import permuted_with_layout, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from model_edits import scale_mlp

from flashu_fx import FlashUConfig, generate_images
from flashu_fx.compiled import compiled_batch, flashu_backend, generate_images_compiled
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.layout import build_gen_batch, mark_length_dynamic


def compiled_images(model, prompts, seed: int = 0, **options):
    torch._dynamo.reset()
    backend = flashu_backend("gen", **options)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, prompts, baseline_steps=4, guidance=4.0, seed=seed)
    return out, backend


@settings(deadline=None, max_examples=3)
@given(prompt_len=st.integers(1, 20), seed=st.integers(0, 100))
def test_graph_executor_equals_the_eager_pipeline(tiny_model, prompt_len: int, seed: int) -> None:
    prompt = [(5 * i + 2) % 200 for i in range(prompt_len)]
    out, _ = compiled_images(tiny_model, [prompt], seed)
    assert rel_err(out, generate_images(tiny_model, [prompt], steps=4, guidance=4.0, seed=seed)) < 1e-6


def test_every_compiled_part_comes_from_the_captured_graph(tiny_model) -> None:
    _, backend = compiled_images(tiny_model, [[1, 2, 3]])
    graph = backend.captured
    assert graph is not None and backend.compiles == 1
    names = [p.name for p in graph.parts]
    assert names[0] == "embed" and names[-1] == "final" and "layer.3" in names and "head_block.1" in names
    # One compilation per distinct part: embed, one for all SigLIP layers, fuse, one for all decoder layers, head_in,
    # one for the head blocks, final; and the prefix graph's (passes.prefix_hoisting): embed, one for all decoder
    # layers, head_in, the head blocks but the last, and the last (its keys and values alone).
    assert sum(backend.piece_captures.values()) == 7 + 5
    for parts in (graph.parts, backend.captured_prefix.parts):  # each captured node in at most one part of each
        covered = [s for p in parts for s in p.sources]
        assert len(covered) == len(set(covered))
    # Every captured node is computed by the slot graph or the prefix graph (passes.prefix_hoisting), but the slot's
    # write into the batch's embeddings and its index, and the size checks Dynamo leaves (nothing reads them).
    covered = {s for parts in (graph.parts, backend.captured_prefix.parts) for p in parts for s in p.sources}
    captured = {n.name: n for n in backend._gen_graph.gm.graph.nodes}
    write = next(n for n in captured.values() if n.op == "call_method" and n.target == "scatter")
    index = write.args[2]
    only_for_write = {write.name, *(n.name for n in _ancestors(index) if set(n.users) <= {*_ancestors(index), write})}
    sizes = {name for name, n in captured.items()
             if isinstance(n.meta.get("example_value"), (torch.SymInt, torch.SymBool, int, bool))}
    assert set(graph.captured_nodes) - covered == (only_for_write | sizes) & set(graph.captured_nodes)
    # the sampler's CFG pair shares its latents: the image features ran once for both (passes.cfg_shared_features)
    shared = [p.name for p in graph.parts
              if any(n.meta.get("derived_by") == "cfg_shared_features" for n in p.module.graph.nodes)]
    assert shared and set(shared) <= {"embed", "siglip.0", "siglip.1", "fuse"}  # before the trunk


def _ancestors(node) -> set:
    """``node`` and every node it is computed from (placeholders excluded)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen and n.op != "placeholder":
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def test_no_recompiles_across_images_and_prompt_contents(tiny_model) -> None:
    torch._dynamo.reset()
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    # The batch ends after its last slot, in multiples of max_seq_len / 16 = 3 positions: 24, 24, 21 and 36 of 48.
    for prompt in ([1, 2, 3], [9, 8, 7], [4], list(range(1, 18))):
        generate_images_compiled(gen, backend, [prompt], baseline_steps=3, guidance=3.0)
    # one capture (the length is a symbol); the distinct parts compiled once each, symbolic in the length from the
    # first (make_part_compiler(dynamic_lengths=True), told the symbolic inputs by compile_parts)
    assert backend.compiles == 1
    warm, built = dict(backend.piece_captures), backend.variant_builds
    assert set(warm) == {"part[embed]", "part[siglip.0]", "part[fuse]", "part[layer.0]", "part[head_in]",
                         "part[head_block.0]", "part[final]", "part[head_block.1]"}  # the prefix's last head block
    for prompt in (list(range(1, 11)), list(range(2, 15))):  # new lengths, 30 and 33: nothing compiles
        out = generate_images_compiled(gen, backend, [prompt], baseline_steps=3, guidance=3.0)
        assert rel_err(out, generate_images(tiny_model, [prompt], steps=3, guidance=3.0)) < 1e-6
    assert dict(backend.piece_captures) == warm
    assert backend.variant_builds == built > 0  # no pass reran for a new length: the variants serve every length
    # calls numbered s = 1.. as the plans (and the default executor's records) number them
    assert [(r.call, r.skip_set, r.head, r.trunk_ran) for r in backend.records] == [(1, (), "compute", True),
                                                                                 (2, (), "compute", True)]


def test_a_changed_forward_changes_the_compiled_result_as_it_changes_eager(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    scale_mlp(model, 1)
    out, backend = compiled_images(model, [[1, 2, 3]])
    eager = generate_images(model, [[1, 2, 3]], steps=4, guidance=4.0)
    assert rel_err(out, eager) < 1e-6
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) > 1e-3
    assert sum(backend.piece_captures.values()) == 8 + 6  # layer 1 is its own part now, in both graphs


def test_a_mask_that_lets_the_prompt_see_the_slot_runs_the_whole_batch(tiny_model) -> None:
    """The slot graph reads the prompt's keys once per image; a mask under which the prompt sees the slot (checked on
    the image's first call) turns hoisting off with a warning, and the call stays the eager forward's. (The slot
    graph reads every slot row of the mask, any mask:
    ``test_the_slot_mask_is_the_masks_slot_rows_with_foreign_prefix_columns_blocked``.)"""
    cfg = tiny_model.config
    batch = compiled_batch(cfg, build_gen_batch(cfg, [[5, 6, 7, 8]]))
    mask = batch.mask.clone()
    mask[0, 0, 1, int(batch.offsets[0])] = True  # a prompt position sees the slot
    mark_length_dynamic(batch.tokens, mask)
    latents = torch.randn(2, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.4)
    torch._dynamo.reset()
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    backend.begin_image(1, 4.0)
    with torch.no_grad():
        want = tiny_model(batch.tokens, latents, t, batch.offsets, mask, return_logits=False).velocity
        with pytest.warns(UserWarning, match="every call now runs the whole batch"), backend.step(0):
            got = gen(batch.tokens, latents, t, batch.offsets, mask, return_logits=False).velocity
    assert rel_err(got, want) < 1e-6
    assert not backend._gen_graph.hoisting


# Every generation technique acts on the tiny model within 30 grid points: 2 of 4 layers skipped (re-measured every
# 2 calls), a 200-of-256 FFN in the pruned phase, the head stored every 5 calls and reused in between.
TINY_GEN = FlashUConfig.for_task("gen", skip_ratio=0.5, skip_interval=2, ffn_width_multiple=8)


@settings(deadline=None, max_examples=3)
@given(prompt_len=st.integers(1, 12), seed=st.integers(0, 100))
def test_flashu_generation_as_passes_equals_eager_flashu(tiny_model, prompt_len: int, seed: int) -> None:
    model, layout = permuted_with_layout(tiny_model, TINY_GEN, seed)
    prompts = [[(5 * i + 2) % 200 for i in range(prompt_len)], [7, 8]]
    eager = generate_images_flashu(model, prompts, TINY_GEN, layout, baseline_steps=30, guidance=4.0, seed=seed)
    torch._dynamo.reset()
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, prompts, baseline_steps=30, guidance=4.0, seed=seed)
    assert rel_err(out, eager.latents) < 1e-5
    ours = [(r.skip_set, r.head, r.trunk_ran) for r in backend.records]
    assert ours == [(r.skipped, r.head, r.trunk) for r in eager.records]
    heads = {r.head for r in backend.records}
    assert heads == {"compute", "store", "reuse"} and any(r.skip_set for r in backend.records)
    assert any(not r.trunk_ran for r in backend.records)  # a plain reuse ran no trunk at all
    assert backend.compiles == 1
    graph = backend.captured  # the last call's variant: every node computes something Dynamo handed over
    inputs = {n.name for n in graph.root.graph.nodes if n.op == "placeholder"}
    assert set().union(*(p.sources for p in graph.parts)) <= set(graph.captured_nodes) | inputs


def test_merged_ffn_slices_equal_eager_flashu(tiny_model) -> None:
    """``merge_ffn_slices``: the pruned FFN's gate and up views (fed by the root, a range per layer) run as one
    batched matmul in every layer part that reads them; the same decisions and latents as eager FlashU."""
    from passes.merge_projections import gate_up_of_rows

    model, layout = permuted_with_layout(tiny_model, TINY_GEN, 4)
    prompts = [[3, 4, 5], [7, 8]]
    eager = generate_images_flashu(model, prompts, TINY_GEN, layout, baseline_steps=30, guidance=4.0, seed=4)
    torch._dynamo.reset()
    backend = flashu_backend("gen", TINY_GEN, layout, merge_ffn_slices=True)
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, prompts, baseline_steps=30,
                                   guidance=4.0, seed=4)
    assert rel_err(out, eager.latents) < 1e-5
    assert [(r.skip_set, r.head) for r in backend.records] == [(r.skipped, r.head) for r in eager.records]
    merged = {part.name for graph, *_ in backend._gen_graph._variants.values() for part in graph.parts
              if any(n.target is gate_up_of_rows for n in part.module.graph.nodes)}
    assert merged and all(name.startswith(("layer.", "importance.")) for name in merged)


def test_a_head_reuse_runs_no_trunk(tiny_model) -> None:
    model, layout = permuted_with_layout(tiny_model, TINY_GEN, 0)
    torch._dynamo.reset()
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    plans = backend.begin_image(20, 4.0)
    batch = build_gen_batch(model.config, [[5, 6]], guided=True)
    x = torch.randn(2, 16, 8, 8)
    for k, plan in enumerate(plans):
        with backend.step(k):
            gen(batch.tokens, x, torch.full((2,), 0.1 + k / 40), batch.offsets, batch.mask, return_logits=False)
        if plan.head == "reuse" and plan.layers != "measure":
            names = [p.name for p in backend.captured.parts]
            assert names == ["graph"]  # SigLIP, the trunk and the head blocks were dead code, removed
            break
    else:
        pytest.fail("no plain head-reuse call in 20 calls")


def test_merged_projections_are_a_pass_over_the_parts(tiny_model) -> None:
    import torch.nn.functional as F

    from flashu_fx.projection_layout import colocate_projections

    model = copy.deepcopy(tiny_model)
    assert colocate_projections(model)  # before the capture: the graph's weights share buffers
    out, backend = compiled_images(model, [[1, 2, 3]])
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) < 1e-6
    layer = next(p for p in backend.captured.parts if p.name == "layer.0").module
    linears = sum(n.op == "call_function" and n.target is F.linear for n in layer.graph.nodes)
    assert linears == 4  # q/k/v as one, o_proj, gate/up as one, down_proj (7 before the pass)


def test_inductor_parts_match_the_eager_pipeline_on_the_cpu(tiny_model, cpp_compiler) -> None:
    out, backend = compiled_images(tiny_model, [[1, 2, 3]], piece_backend="inductor")
    assert rel_err(out, generate_images(tiny_model, [[1, 2, 3]], steps=4, guidance=4.0)) < 1e-5
    assert sum(backend.piece_captures.values()) == 7 + 5  # and the prefix graph's


@pytest.mark.gpu
def test_flashu_generation_as_cuda_graphs_matches_eager_flashu_on_the_gpu(tiny_model) -> None:
    """Later images replay the captured graphs; each draws its own prompts (new words, the same lengths, so the
    same graphs replay): the prompt's keys and values must be this image's, never an earlier image's."""
    model, layout = permuted_with_layout(tiny_model, TINY_GEN, 2)
    model = model.cuda()
    torch._dynamo.reset()
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    images = [([[5, 6, 7], [7, 8]], 0), ([[9, 3, 1], [2, 4]], 1), ([[9, 3, 1], [2, 4]], 1)]  # 3: as 2, decisions too
    captures = []
    for prompts, seed in images:
        eager = generate_images_flashu(model, prompts, TINY_GEN, layout, baseline_steps=30, guidance=4.0, seed=seed)
        out = generate_images_compiled(gen, backend, prompts, baseline_steps=30, guidance=4.0, seed=seed)
        assert rel_err(out, eager.latents) < 1e-3
        assert [(r.skip_set, r.head) for r in backend.records] == [(r.skipped, r.head) for r in eager.records]
        captures.append(backend.cuda_graph_captures)
    assert backend.compiles == 1 and captures[0] > 0
    assert captures[1] == captures[2]  # the prefix's kept outputs keep their addresses: nothing new to capture


def test_compiled_batch_cuts_the_batch_after_the_last_slot(tiny_model) -> None:
    from flashu_fx.compiled import compiled_batch

    cfg = tiny_model.config
    batch = build_gen_batch(cfg, [[1, 2, 3]])
    cut = compiled_batch(cfg, batch)
    # slot 5 + 17 = 22 positions, rounded up to a multiple of 48 / 16 = 3; contiguous once, not per call
    assert cut.tokens.shape[1] == 24 and cut.tokens.is_contiguous() and cut.mask.is_contiguous()
    assert torch.equal(cut.tokens, batch.tokens[:, :24]) and torch.equal(cut.mask, batch.mask[:, :, :24, :24])
    assert torch.equal(cut.offsets, batch.offsets)


def test_the_cfg_pair_rewrite_runs_once_for_every_variant(tiny_model, monkeypatch) -> None:
    """The image features once per CFG pair is the same rewrite in every variant (and checks itself by propagating
    fake tensors through the whole graph): the executor runs it once, and each variant copies the result."""
    import flashu_fx.compiled.gen_graph as gen_graph

    runs = []
    real = gen_graph.share_cfg_features
    monkeypatch.setattr(gen_graph, "share_cfg_features", lambda gm: runs.append(real(gm)) or runs[-1])
    model, layout = permuted_with_layout(tiny_model, TINY_GEN, 1)
    eager = generate_images_flashu(model, [[3, 4]], TINY_GEN, layout, baseline_steps=30, guidance=4.0, seed=1)
    torch._dynamo.reset()
    backend = flashu_backend("gen", TINY_GEN, layout)
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, [[3, 4]], baseline_steps=30,
                                   guidance=4.0, seed=1)
    assert rel_err(out, eager.latents) < 1e-5
    assert backend.variant_builds > 3 and len(runs) == 1 and runs[0] > 0
