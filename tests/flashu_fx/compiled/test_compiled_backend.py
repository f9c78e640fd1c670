"""The compiled backend's protocol and guarantees against its eager twins: FlashU vs eager FlashU under inductor, on
random shapes, across a new skip set, replaced weights and a recapture within an image (identical decisions,
latents within fp32 tolerance); no recompiles across prompt lengths; clear errors. The equivalence properties over
prompts and seeds are in ``test_graph_executor.py``."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from compiled_oracles import rel_err
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flashu_fx import FlashUConfig, Showo2, generate_images, get_config, init_random_weights
from flashu_fx.compiled import backend_from_options, flashu_backend, generate_images_compiled, lean_guard_options
from flashu_fx.ffn_layout import build_ffn_layout, permute_ffn_weights, top_k_mask
from flashu_fx.flashu_gen import generate_images_flashu
from passes.merge_projections import adjacent

# Tiny-model FlashU settings under which every technique acts within a few calls: 2 of 4 layers skipped,
# re-measured every 3 calls, the head stored every 2nd call, widths in multiples of 8.
TINY_GEN = FlashUConfig.for_task("gen", skip_ratio=0.5, skip_interval=3, head_cache_interval=2, ffn_width_multiple=8)


def pruned_model(model, config: FlashUConfig, seed: int = 0):
    work = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(work.config.num_layers, work.config.intermediate_size, generator=gen)
    layout = build_ffn_layout({"gen": top_k_mask(scores, config.kept_ffn_width(work.config.intermediate_size))})
    permute_ffn_weights(work, layout.order)
    return work, layout


def test_compiled_sampler_uses_each_plans_guidance(tiny_model) -> None:
    """Guidance on its own phases (g in the last int(0.5 * 7) = 3 calls) with no hybrid phase: the compiled
    path's latents are eager FlashU's, and far from those of guidance tied to the (absent) hybrid phase."""
    torch._dynamo.reset()
    config = dataclasses.replace(TINY_GEN, hybrid_full_fraction=0.0, guidance_full_fraction=0.5)
    model, layout = pruned_model(tiny_model, config, 1)
    eager = generate_images_flashu(model, [[4, 5, 6]], config, layout, baseline_steps=12, guidance=5.0)
    assert [r.guidance for r in eager.records] == [3.75] * 4 + [5.0] * 3
    assert all(r.ffn_pruned for r in eager.records)
    backend = flashu_backend("gen", config, layout)
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, [[4, 5, 6]], baseline_steps=12,
                                   guidance=5.0)
    assert [r.skip_set for r in backend.records] == [r.skipped for r in eager.records]
    assert rel_err(out, eager.latents) < 1e-4
    tied = generate_images_flashu(model, [[4, 5, 6]], dataclasses.replace(config, guidance_full_fraction=0.0),
                                  layout, baseline_steps=12, guidance=5.0)
    assert rel_err(out, tied.latents) > 1e-3


def test_inductor_parts_match_eager_flashu_on_the_cpu(tiny_model, cpp_compiler) -> None:
    """The part compiler for real (inductor with eager numerics, merged projections, sliced FFN inputs), on the
    CPU: the same decisions and latents as eager FlashU."""
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_GEN, 2)
    eager = generate_images_flashu(model, [[4, 5, 6]], TINY_GEN, layout, baseline_steps=12, guidance=5.0)
    backend = flashu_backend("gen", TINY_GEN, layout, piece_backend="inductor")
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, [[4, 5, 6]], baseline_steps=12,
                                   guidance=5.0)
    assert [r.skip_set for r in backend.records] == [r.skipped for r in eager.records]
    assert any(r.skip_set for r in backend.records)
    assert rel_err(out, eager.latents) < 1e-4


def test_no_recompiles_across_prompt_lengths(tiny_model) -> None:
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    # one length compiles every part, symbolic in the length from the start (make_part_compiler, compile_parts)
    generate_images_compiled(gen, backend, [[1, 2, 3]], baseline_steps=3, guidance=3.0)
    warm = dict(backend.piece_captures)
    for n in (1, 5, 11, 17, 24):
        generate_images_compiled(gen, backend, [list(range(1, n + 1))], baseline_steps=3, guidance=3.0)
    assert backend.compiles == 1
    assert dict(backend.piece_captures) == warm


def test_new_skip_set_costs_no_compilation(tiny_model) -> None:
    """A skip set not met before builds a variant of the captured graph from parts already compiled. Random
    weights measure the same skip set for every prompt, so the second image runs other weights (same shapes, same
    layout: no new capture), whose measurement picks another set."""
    model, layout = pruned_model(tiny_model, TINY_GEN)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    generate_images_compiled(gen, backend, [[4, 5]], baseline_steps=12, guidance=5.0, seed=0)
    seen, warm, builds = {r.skip_set for r in backend.records}, dict(backend.piece_captures), backend.variant_builds
    other, _ = pruned_model(init_random_weights(copy.deepcopy(tiny_model), seed=1), TINY_GEN)
    model.load_state_dict(other.state_dict(), assign=True)
    out = generate_images_compiled(gen, backend, [[4, 5]], baseline_steps=12, guidance=5.0, seed=0)
    eager = generate_images_flashu(other, [[4, 5]], TINY_GEN, layout, baseline_steps=12, guidance=5.0, seed=0)
    assert [r.skip_set for r in backend.records] == [r.skipped for r in eager.records]
    assert {r.skip_set for r in backend.records} - seen, "the second weights must measure a new skip set"
    assert rel_err(out, eager.latents) < 1e-4
    assert dict(backend.piece_captures) == warm and backend.compiles == 1 and backend.variant_builds > builds


def test_call_outside_step_raises(tiny_model) -> None:
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    x = torch.randn(2, 16, 8, 8)
    from flashu_fx.layout import build_gen_batch

    b = build_gen_batch(tiny_model.config, [[1, 2]])
    with pytest.raises(RuntimeError, match="outside `with backend.step"):
        gen(b.tokens, x, torch.zeros(2), b.offsets, b.mask, return_logits=False)
    backend.begin_image(3, 2.0)
    with backend.step(0):
        gen(b.tokens, x, torch.zeros(2), b.offsets, b.mask, return_logits=False)
    with pytest.raises(RuntimeError, match="expected call 1"), backend.step(2):
        gen(b.tokens, x, torch.zeros(2), b.offsets, b.mask, return_logits=False)
    with pytest.raises(ValueError, match=r"step k=3 is invalid: allowed an integer in \[0, 3\)"), backend.step(3):
        pass


def test_begin_image_takes_the_callers_plans() -> None:
    from flashu_fx.schedule import StepPlan

    plans = [StepPlan(1, 2.0, False, "measure", "store"), StepPlan(2, 3.0, False, "skip", "reuse")]
    backend = flashu_backend("gen", dataclasses.replace(TINY_GEN, ffn_prune_ratio=0.0))
    assert backend.begin_image(2, 3.0, plans=plans) == plans
    assert backend.begin_image(2, 3.0) != plans  # the config's own schedule again
    with pytest.raises(ValueError, match="a 'skip' call needs an earlier 'measure' call"):
        backend.begin_image(2, 3.0, plans=[dataclasses.replace(plans[0], layers="all"), plans[1]])
    pruned = [dataclasses.replace(plans[0], ffn_pruned=True), plans[1]]
    with pytest.raises(ValueError, match="ffn_pruned=True are invalid for a backend without an FFN layout"):
        backend.begin_image(2, 3.0, plans=pruned)


def test_logits_request_is_refused(tiny_model) -> None:
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    from flashu_fx.layout import build_gen_batch

    b = build_gen_batch(tiny_model.config, [[1, 2]])
    backend.begin_image(1, 2.0)
    with pytest.raises(RuntimeError, match="return_logits=False"), backend.step(0):
        gen(b.tokens, torch.randn(2, 16, 8, 8), torch.zeros(2), b.offsets, b.mask)


def test_non_showo2_graph_falls_back_exactly() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(net, backend=flashu_backend("gen"))(x)
    assert any("not a Show-o2 forward" in str(w.message) for w in caught)
    torch.testing.assert_close(out, net(x))


def test_non_showo2_graph_and_steps() -> None:
    """Compiled during a step a graph must be a whole Show-o2 forward (a fragment would run without FlashU);
    one compiled unchanged outside any step may then run inside one."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    backend = flashu_backend("gen")
    backend.begin_image(1, 2.0)
    with pytest.raises(RuntimeError, match="not a whole Show-o2 forward"), backend.step(0):
        torch.compile(net, backend=backend)(x)
    torch._dynamo.reset()
    other = flashu_backend("gen")
    compiled = torch.compile(net, backend=other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)  # compiled unchanged, with the warning
    other.begin_image(1, 2.0)
    with other.step(0):  # no error at the block's end: the unchanged graph ran through the backend
        out = compiled(x)
    torch.testing.assert_close(out, net(x))


def test_a_step_that_never_reaches_the_backend_raises(tiny_model) -> None:
    """Past Dynamo's recompile limit torch.compile silently runs the model eagerly: the step says so."""
    from flashu_fx.layout import build_gen_batch

    batch = build_gen_batch(tiny_model.config, [[1, 2]])
    x = torch.randn(2, 16, 8, 8)
    backend = flashu_backend("gen")
    backend.begin_image(1, 2.0)
    with pytest.raises(RuntimeError, match=r"step\(0\):` never reached the backend"), backend.step(0):
        tiny_model(batch.tokens, x, torch.zeros(2), batch.offsets, batch.mask, return_logits=False)  # uncompiled

    torch._dynamo.reset()
    # torch's own scoped patch: restores the setting on exit (monkeypatch's undo deletes it on newer pytest).
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            first = flashu_backend("gen")
            generate_images_compiled(torch.compile(tiny_model, backend=first), first, [[3]], baseline_steps=2,
                                     guidance=2.0)
            second = flashu_backend("gen")  # a second backend on the same forward: over the limit, runs eagerly
            with pytest.raises(RuntimeError, match="recompile limit"):
                generate_images_compiled(torch.compile(tiny_model, backend=second), second, [[3]],
                                         baseline_steps=2, guidance=2.0)
            assert second.compiles == 0
    finally:
        torch._dynamo.reset()


def test_bad_backend_arguments() -> None:
    with pytest.raises(ValueError, match="task must be"):
        flashu_backend("video")
    with pytest.raises(ValueError, match="does not match the backend task"):
        flashu_backend("gen", FlashUConfig.for_task("und"))
    with pytest.raises(ValueError, match="piece_backend='tvm' is invalid"):
        flashu_backend("gen", piece_backend="tvm")
    with pytest.raises(ValueError, match="decode_attention='flash' is invalid: allowed 'sdpa', 'reductions'"):
        flashu_backend("und", decode_attention="flash")
    with pytest.raises(ValueError, match=r"num_calls=0 is invalid"):
        flashu_backend("gen").begin_image(0, 3.0)
    with pytest.raises(ValueError, match=r"ffn_prune_ratio=0.2 needs an FFNLayout with 'gen' ranges, got None"):
        flashu_backend("gen", TINY_GEN)  # FFN pruning on, but no layout of the kept neurons


def test_registered_backend_name_with_options(tiny_model) -> None:
    """The installed package declares "flashu" as a torch_dynamo_backends entry point; torch resolves it by name."""
    from importlib.metadata import entry_points

    from flashu_fx.compiled import flashu_compiler

    declared = entry_points(group="torch_dynamo_backends")
    if "flashu" not in declared.names:
        pytest.skip("the package is not installed (a bare checkout on PYTHONPATH): no entry points to resolve")
    assert declared["flashu"].load() is flashu_compiler
    opts = {"task": "gen"}
    gen = torch.compile(tiny_model, backend="flashu", options=opts)
    backend = backend_from_options(opts)
    out = generate_images_compiled(gen, backend, [[3, 4]], baseline_steps=4, guidance=4.0)
    ref = generate_images(tiny_model, [[3, 4]], steps=4, guidance=4.0)
    assert rel_err(out, ref) < 1e-5 and backend.compiles == 1
    with pytest.raises(ValueError, match="unknown flashu options"):
        backend_from_options({"task": "gen", "speed": "max"})


@pytest.mark.gpu
def test_cuda_graphs_and_inductor_match_eager_flashu_on_gpu(tiny_model) -> None:
    """On the GPU: inductor pieces replayed as CUDA graphs give eager FlashU's decisions and latents (fp32),
    and once a second prompt length made the parts symbolic in it, a third length compiles nothing new."""
    model, layout = pruned_model(tiny_model, TINY_GEN)
    model = model.cuda()
    eager = generate_images_flashu(model, [[4, 5, 6]], TINY_GEN, layout, baseline_steps=12, guidance=5.0)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, [[4, 5, 6]], baseline_steps=12, guidance=5.0)
    records = backend.records
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert rel_err(out, eager.latents) < 1e-3  # inductor's fp32 matmuls may use TF32-free but reordered sums
    generate_images_compiled(gen, backend, [[7] * 9], baseline_steps=12, guidance=5.0, seed=1)  # length now symbolic
    warm = dict(backend.piece_captures)
    generate_images_compiled(gen, backend, [[2] * 14], baseline_steps=12, guidance=5.0, seed=2)
    assert dict(backend.piece_captures) == warm


@st.composite
def tiny_configs(draw):
    """Random small Show-o2 shapes: GQA groups, head sizes, depths and FFN widths vary."""
    base = get_config("tiny")
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16]))
    assume(heads * head_dim != base.head_hidden_size)  # Show-o2 needs H != D (diff_proj, time_embed_proj)
    return dataclasses.replace(
        base,
        name="tiny-random",
        hidden_size=heads * head_dim,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        num_layers=draw(st.integers(2, 5)),
        intermediate_size=8 * draw(st.integers(4, 24)),
        head_num_layers=draw(st.integers(1, 3)),
    )


@settings(deadline=None, max_examples=3)
@given(cfg=tiny_configs(), seed=st.integers(0, 100))
def test_backend_matches_eager_flashu_on_random_configs(cfg, seed: int) -> None:
    from flashu_fx import Showo2, init_random_weights

    torch._dynamo.reset()
    model = init_random_weights(Showo2(cfg), seed=seed).eval()
    config = dataclasses.replace(TINY_GEN, skip_ratio=0.4)
    model, layout = pruned_model(model, config, seed)
    prompt = [(3 * i + seed) % 200 for i in range(1 + seed % 20)]
    eager = generate_images_flashu(model, [prompt], config, layout, baseline_steps=12, guidance=5.0, seed=seed)
    backend = flashu_backend("gen", config, layout, model_config=cfg)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, [prompt], baseline_steps=12, guidance=5.0, seed=seed)
    records = backend.records
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert [r.head for r in records] == [r.head for r in eager.records]
    assert rel_err(out, eager.latents) < 1e-4


def test_a_width_of_no_preset_compiles_from_the_graph_alone() -> None:
    """The executor reads widths from the captured graph: a Show-o2 of no preset's hidden size needs no config."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(get_config("tiny"), hidden_size=48, num_heads=3, num_kv_heads=1, head_dim=16)
    model = init_random_weights(Showo2(cfg)).eval()
    backend = flashu_backend("gen")
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, [[1, 2]], baseline_steps=3,
                                   guidance=3.0)
    assert rel_err(out, generate_images(model, [[1, 2]], steps=3, guidance=3.0)) < 1e-5


def test_merged_projections_colocate_the_users_weights_in_place(tiny_model) -> None:
    """The backend moves q/k/v and gate/up into shared buffers once: same Parameter objects, same values, one
    capture across images; with merging off the weights are untouched and the latents agree."""
    model = copy.deepcopy(tiny_model)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    backend = flashu_backend("gen")
    gen = torch.compile(model, backend=backend)
    merged = generate_images_compiled(gen, backend, [[3, 4, 5]], baseline_steps=4, guidance=3.0)
    generate_images_compiled(gen, backend, [[6, 7]], baseline_steps=4, guidance=3.0)
    attn, mlp = model.showo.model.layers[0].self_attn, model.diffusion_head_a[1].mlp
    assert adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    assert all(model.get_parameter(k) is p for k, p in params.items())
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    assert backend.compiles == 1

    torch._dynamo.reset()
    plain = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen", merge_projections=False)
    gen = torch.compile(plain, backend=backend)
    separate = generate_images_compiled(gen, backend, [[3, 4, 5]], baseline_steps=4, guidance=3.0)
    attn = plain.showo.model.layers[0].self_attn
    assert not adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert rel_err(merged, separate) < 1e-5


def test_gemm_autotuning_leaves_the_users_weights_where_they_are(tiny_model, caplog) -> None:
    """No part merges under GEMM autotuning (``part_compiler.merge_off_for_autotuning``), so the backend does not
    move the q/k/v and gate/up weights into shared buffers either; it says so once, and the latents are as without
    merging."""
    model = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen", piece_backend="eager", inductor_options={"max_autotune_gemm": True})
    gen = torch.compile(model, backend=backend)
    try:
        with caplog.at_level("WARNING", logger="flashu_fx.compiled.part_compiler"):
            tuned = generate_images_compiled(gen, backend, [[3, 4, 5]], baseline_steps=4, guidance=3.0)
            generate_images_compiled(gen, backend, [[6, 7]], baseline_steps=4, guidance=3.0)
    finally:
        torch._dynamo.reset()
    attn, mlp = model.showo.model.layers[0].self_attn, model.diffusion_head_a[1].mlp
    assert not adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert not adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    assert caplog.text.count("merge_projections is off with inductor's GEMM autotuning") == backend.compiles == 1
    plain = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen", piece_backend="eager", merge_projections=False)
    try:
        separate = generate_images_compiled(torch.compile(plain, backend=backend), backend, [[3, 4, 5]],
                                            baseline_steps=4, guidance=3.0)
    finally:
        torch._dynamo.reset()
    assert rel_err(tuned, separate) < 1e-6


def test_lean_guards_are_safe_for_this_backend(tiny_model) -> None:
    """With Dynamo's nn-module guards filtered out (the cheap per-call path), swapped weights still take effect:
    the weights are inputs of the captured graph, and new tensors are laid out for the merged projections before
    the first image that reads them."""
    model = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen")
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    first = generate_images_compiled(gen, backend, [[3, 4]], baseline_steps=3, guidance=3.0)
    assert rel_err(first, generate_images(model, [[3, 4]], steps=3, guidance=3.0)) < 1e-5
    other = init_random_weights(copy.deepcopy(tiny_model), seed=7)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: new addresses
    second = generate_images_compiled(gen, backend, [[3, 4]], baseline_steps=3, guidance=3.0)
    assert rel_err(second, generate_images(other, [[3, 4]], steps=3, guidance=3.0)) < 1e-5
    assert rel_err(second, first) > 1e-3 and backend.compiles == 1
    attn = model.showo.model.layers[1].self_attn
    assert adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # laid out again
    deeper = init_random_weights(Showo2(dataclasses.replace(tiny_model.config, num_layers=6)), seed=3).eval()
    third = generate_images_compiled(torch.compile(deeper, backend=backend, options=lean_guard_options()), backend,
                                     [[3, 4]], baseline_steps=3, guidance=3.0)  # same backend, another depth
    assert rel_err(third, generate_images(deeper, [[3, 4]], steps=3, guidance=3.0)) < 1e-5
    assert backend.compiles == 2  # the kept layer-count guards made Dynamo retrace for the deeper stack
    opts = {"task": "gen", **lean_guard_options()}  # the string backend: torch.compile's own key is not ours
    assert backend_from_options(opts).task == "gen"


def test_per_prompt_seeds_reach_the_compiled_pipeline(tiny_model) -> None:
    """``seeds``: prompt i's noise from its own generator, as in the eager pipeline."""
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    prompts = [[5, 6, 7], [8, 9]]
    out = generate_images_compiled(gen, backend, prompts, baseline_steps=3, guidance=4.0, seeds=[3, 11])
    ref = generate_images(tiny_model, prompts, steps=3, guidance=4.0, seeds=[3, 11])
    assert rel_err(out, ref) < 1e-5
    alone = generate_images(tiny_model, prompts[1:], steps=3, guidance=4.0, seed=11)
    assert rel_err(out[1:], alone) < 1e-5


def test_a_capture_within_an_image_goes_on_with_the_image(tiny_model) -> None:
    """Latents that require grad from call 1 on make Dynamo capture the forward again mid-image: the new capture
    goes on with the image (skip set, stored head output, records), and the result is still eager FlashU's."""
    from flashu_fx.layout import build_gen_batch
    from flashu_fx.sampler import initial_noise, time_grid

    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_GEN, 6)
    eager = generate_images_flashu(model, [[4, 5, 6]], TINY_GEN, layout, baseline_steps=12, guidance=5.0, seed=6)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    cfg = model.config
    plans = backend.begin_image(TINY_GEN.num_points(12) - 1, 5.0)
    batch = build_gen_batch(cfg, [[4, 5, 6]], guided=True)
    grid = time_grid(len(plans) + 1, 3.0)
    x = initial_noise((1, cfg.latent_channels, *cfg.latent_size), 6, None).repeat(2, 1, 1, 1)
    for k, plan in enumerate(plans):
        with backend.step(k, cfg_shared_latents=True):
            latents = x.detach().requires_grad_(k > 0)
            v = gen(batch.tokens, latents, grid[k].expand(2), batch.offsets, batch.mask, return_logits=False).velocity
        cond, null = v.float().chunk(2)
        x = x + (grid[k + 1] - grid[k]) * (null + plan.guidance * (cond - null)).repeat(2, 1, 1, 1)
    assert backend.compiles == 2 and not v.requires_grad
    assert [r.call for r in backend.records] == list(range(1, len(plans) + 1))
    assert [r.skip_set for r in backend.records] == [r.skipped for r in eager.records]
    assert rel_err(x[:1], eager.latents) < 1e-4
