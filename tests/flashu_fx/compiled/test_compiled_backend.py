"""The compiled backend against its eager twins: exact-only vs the eager pipeline, FlashU vs eager FlashU
(identical decisions, latents within fp32 tolerance), no recompiles across prompt lengths, clear errors."""

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


@settings(deadline=None, max_examples=4)
@given(prompt_len=st.integers(1, 20), seed=st.integers(0, 100))
def test_exact_only_equals_eager_pipeline(tiny_model, prompt_len: int, seed: int) -> None:
    torch._dynamo.reset()
    prompt = [(7 * i + 3) % 200 for i in range(prompt_len)]
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    out = generate_images_compiled(gen, backend, [prompt], baseline_steps=5, guidance=4.0, seed=seed)
    ref = generate_images(tiny_model, [prompt], steps=5, guidance=4.0, seed=seed)
    assert rel_err(out, ref) < 1e-5


@settings(deadline=None, max_examples=3)
@given(seed=st.integers(0, 1000), prompt_len=st.integers(1, 20))
def test_flashu_compiled_matches_eager_flashu(tiny_model, seed: int, prompt_len: int) -> None:
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_GEN, seed)
    prompt = [(5 * i + seed) % 200 for i in range(prompt_len)]
    eager = generate_images_flashu(model, [prompt], TINY_GEN, layout, baseline_steps=12, guidance=5.0, seed=seed)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, [prompt], baseline_steps=12, guidance=5.0, seed=seed)
    records = next(iter(backend._runtimes.values())).records
    assert [r.head for r in records] == [r.head for r in eager.records]
    assert [r.trunk_ran for r in records] == [r.trunk for r in eager.records]
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert any(r.skip_set for r in records), "the configuration must make layer skipping act"
    assert rel_err(out, eager.latents) < 1e-4


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


def test_inductor_pieces_match_eager_flashu_on_the_cpu(tiny_model, cpp_compiler) -> None:
    """The piece compiler for real (inductor with eager numerics, merged projections, FFN slices merged),
    on the CPU: the same decisions and latents as eager FlashU."""
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_GEN, 2)
    eager = generate_images_flashu(model, [[4, 5, 6]], TINY_GEN, layout, baseline_steps=12, guidance=5.0)
    backend = flashu_backend("gen", TINY_GEN, layout, piece_backend="inductor", merge_ffn_slices=True)
    out = generate_images_compiled(torch.compile(model, backend=backend), backend, [[4, 5, 6]], baseline_steps=12,
                                   guidance=5.0)
    assert [r.skip_set for r in backend.records] == [r.skipped for r in eager.records]
    assert any(r.skip_set for r in backend.records)
    assert rel_err(out, eager.latents) < 1e-4


def test_merged_ffn_slices_match_eager_flashu(tiny_model, monkeypatch) -> None:
    import passes.merge_projections as merge_module

    merged_slices = []
    real = merge_module._merge_sliced_gate_up
    monkeypatch.setattr(merge_module, "_merge_sliced_gate_up",
                        lambda gm, gate, up: merged_slices.append(real(gm, gate, up)) or merged_slices[-1])
    torch._dynamo.reset()
    model, layout = pruned_model(tiny_model, TINY_GEN, 4)
    eager = generate_images_flashu(model, [[7, 8, 9]], TINY_GEN, layout, baseline_steps=12, guidance=5.0, seed=4)
    backend = flashu_backend("gen", TINY_GEN, layout, merge_ffn_slices=True)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, [[7, 8, 9]], baseline_steps=12, guidance=5.0, seed=4)
    records = next(iter(backend._runtimes.values())).records
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert merged_slices and all(merged_slices)  # every pruned piece ran its gate/up as one product
    assert rel_err(out, eager.latents) < 1e-4


def test_no_recompiles_across_prompt_lengths(tiny_model) -> None:
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    generate_images_compiled(gen, backend, [[1, 2, 3]], baseline_steps=3, guidance=3.0)
    warm = dict(backend.piece_captures)
    for n in (1, 5, 11, 17, 24):
        generate_images_compiled(gen, backend, [list(range(1, n + 1))], baseline_steps=3, guidance=3.0)
    assert backend.compiles == 1
    assert dict(backend.piece_captures) == warm
    assert all(count == 1 for count in warm.values())


def test_new_skip_set_costs_no_compilation(tiny_model) -> None:
    model, layout = pruned_model(tiny_model, TINY_GEN)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    generate_images_compiled(gen, backend, [[4, 5]], baseline_steps=12, guidance=5.0, seed=0)
    warm = dict(backend.piece_captures)
    generate_images_compiled(gen, backend, [[9, 9, 9, 9]], baseline_steps=12, guidance=5.0, seed=3)
    assert dict(backend.piece_captures) == warm


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
    with pytest.raises(ValueError, match="needs an FFN layout"):
        from flashu_fx.compiled.gen_runtime import GenRuntime
        from flashu_fx.compiled.piece_compiler import make_piece_compiler
        from flashu_fx.model import Showo2

        GenRuntime(Showo2(dataclasses.replace(get_config("tiny"), num_layers=1)), TINY_GEN, None,
                   make_piece_compiler("eager"))


def test_prefix_buckets_stop_recompiling_after_the_second(tiny_model, monkeypatch) -> None:
    """A new prefix bucket recompiles the attention pieces once (symbolic prefix length), then never."""
    from flashu_fx.compiled import gen_runtime

    monkeypatch.setattr(gen_runtime, "PREFIX_BUCKET", 8)
    backend = flashu_backend("gen")
    gen = torch.compile(tiny_model, backend=backend)
    outputs = {}
    for n in (2, 9):  # prefix buckets 8 and 16: the warm-up
        outputs[n] = generate_images_compiled(gen, backend, [list(range(1, n + 1))], baseline_steps=3, guidance=3.0)
    warm = dict(backend.piece_captures)
    for n in (3, 12, 17, 20, 25, 1):  # buckets 8, 16, 24, 24, 31, 8
        out = generate_images_compiled(gen, backend, [list(range(1, n + 1))], baseline_steps=3, guidance=3.0)
        ref = generate_images(tiny_model, [list(range(1, n + 1))], steps=3, guidance=3.0)
        assert rel_err(out, ref) < 1e-5
    assert dict(backend.piece_captures) == warm


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
    and a second image with a new prompt length compiles nothing new."""
    model, layout = pruned_model(tiny_model, TINY_GEN)
    model = model.cuda()
    eager = generate_images_flashu(model, [[4, 5, 6]], TINY_GEN, layout, baseline_steps=12, guidance=5.0)
    backend = flashu_backend("gen", TINY_GEN, layout)
    gen = torch.compile(model, backend=backend)
    out = generate_images_compiled(gen, backend, [[4, 5, 6]], baseline_steps=12, guidance=5.0)
    records = next(iter(backend._runtimes.values())).records
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert rel_err(out, eager.latents) < 1e-3  # inductor's fp32 matmuls may use TF32-free but reordered sums
    warm = dict(backend.piece_captures)
    generate_images_compiled(gen, backend, [[7] * 9], baseline_steps=12, guidance=5.0, seed=1)
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
    records = next(iter(backend._runtimes.values())).records
    assert [r.skip_set for r in records] == [r.skipped for r in eager.records]
    assert [r.head for r in records] == [r.head for r in eager.records]
    assert rel_err(out, eager.latents) < 1e-4


def test_unknown_model_size_needs_model_config() -> None:
    from flashu_fx import Showo2, init_random_weights
    from flashu_fx.layout import build_gen_batch

    cfg = dataclasses.replace(get_config("tiny"), hidden_size=48, num_heads=3, num_kv_heads=1, head_dim=16)
    model = init_random_weights(Showo2(cfg)).eval()
    backend = flashu_backend("gen")
    gen = torch.compile(model, backend=backend)
    b = build_gen_batch(cfg, [[1, 2]])
    backend.begin_image(2, 3.0)
    with pytest.raises(ValueError, match="unsupported Show-o2 model: hidden_size=48"), backend.step(0):
        gen(b.tokens, torch.randn(2, 16, 8, 8), torch.zeros(2), b.offsets, b.mask, return_logits=False)


def test_merged_projections_colocate_the_users_weights_in_place(tiny_model) -> None:
    """The backend moves q/k/v and gate/up into shared buffers once: same Parameter objects, same values, one
    runtime across images; with merging off the weights are untouched and the latents agree."""
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
    assert len(backend._runtimes) == 1 and backend.compiles == 1

    torch._dynamo.reset()
    plain = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen", merge_projections=False)
    gen = torch.compile(plain, backend=backend)
    separate = generate_images_compiled(gen, backend, [[3, 4, 5]], baseline_steps=4, guidance=3.0)
    attn = plain.showo.model.layers[0].self_attn
    assert not adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert rel_err(merged, separate) < 1e-5


def test_lean_guards_are_safe_for_this_backend(tiny_model) -> None:
    """With Dynamo's nn-module guards filtered out (the cheap per-call path), swapped weights still take effect:
    the backend keys its runtime by the weights' addresses at every image start and never runs the traced graph."""
    model = copy.deepcopy(tiny_model)
    backend = flashu_backend("gen")
    gen = torch.compile(model, backend=backend, options=lean_guard_options())
    first = generate_images_compiled(gen, backend, [[3, 4]], baseline_steps=3, guidance=3.0)
    assert rel_err(first, generate_images(model, [[3, 4]], steps=3, guidance=3.0)) < 1e-5
    other = init_random_weights(copy.deepcopy(tiny_model), seed=7)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: new addresses
    second = generate_images_compiled(gen, backend, [[3, 4]], baseline_steps=3, guidance=3.0)
    assert rel_err(second, generate_images(other, [[3, 4]], steps=3, guidance=3.0)) < 1e-5
    assert rel_err(second, first) > 1e-3 and backend.compiles == 1 and len(backend._runtimes) == 2
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
