"""The part compiler: merge_projections on every part, inductor gets the numerics and CUDA-graph settings, parts
compiled for varying lengths are symbolic in it from the first compilation (or recompile once, untold), and the
backend hands each kind of part its settings."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch._inductor.compile_fx as inductor_compile_fx
from torch import fx

import flashu_fx.compiled.backend as backend_module
import flashu_fx.compiled.part_compiler as part_compiler
from flashu_fx.compiled import answer_question_compiled, flashu_backend, generate_images_compiled
from flashu_fx.compiled.part_compiler import (
    PartSettings,
    check_inductor_options,
    make_part_compiler,
    named_dynamic_sources,
)


def scale_and_shift(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s + 1


def affine_part(name: str = "affine") -> fx.GraphModule:
    """A traced graph named as ``compile_parts`` names the parts it compiles."""
    gm = fx.symbolic_trace(scale_and_shift)
    gm.meta["part"] = name
    return gm


@pytest.mark.parametrize("eager_numerics", [True, False])
@pytest.mark.parametrize("coordinate_descent", [True, False])
def test_inductor_gets_the_numerics_setting(monkeypatch, eager_numerics: bool, coordinate_descent: bool) -> None:
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", fake_compile_fx)
    captures: Counter = Counter()
    settings = PartSettings(merge=False, eager_numerics=eager_numerics, coordinate_descent=coordinate_descent)
    compile_part = make_part_compiler(settings, captures)
    x, s = torch.randn(3), torch.randn(3)
    part = compile_part(affine_part(), [x, s])
    torch.testing.assert_close(part(x, s), x * s + 1)
    expected = {"triton.cudagraphs": False, "emulate_precision_casts": eager_numerics}
    if coordinate_descent:
        expected["coordinate_descent_tuning"] = True
    assert seen["patches"] == expected
    assert captures == Counter({"part[affine]": 1})


@pytest.mark.parametrize("dynamic_lengths", [True, False])
def test_merge_projections_runs_on_every_part_when_asked(monkeypatch, dynamic_lengths: bool) -> None:
    merged = []
    monkeypatch.setattr(part_compiler, "merge_projections",
                        lambda gm, ffn_slices: merged.append((gm.meta["part"], ffn_slices)) or 0)
    x, s = torch.randn(2), torch.randn(2)
    for name, merge, ffn_slices in (("a", True, False), ("b", False, False), ("c", True, True)):
        settings = PartSettings("eager", merge=merge, merge_ffn_slices=ffn_slices, dynamic_lengths=dynamic_lengths)
        make_part_compiler(settings)(affine_part(name), [x, s])(x, s)
    assert merged == [("a", False), ("c", True)]


def test_a_part_for_varying_lengths_recompiles_once_then_serves_every_length() -> None:
    captures: Counter = Counter()
    compile_part = make_part_compiler(PartSettings("eager", merge=False, dynamic_lengths=True), captures)
    assert compile_part.dynamic_lengths
    part = compile_part(affine_part("lengths"), [torch.randn(3), torch.randn(3)])
    for n in (3, 5, 7, 11):
        x, s = torch.randn(n), torch.randn(n)
        torch.testing.assert_close(part(x, s), x * s + 1)
    assert captures == Counter({"part[lengths]": 2})  # the first length, then the length as a symbol


def column_of(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(n, 1) * 2 + 1


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_part_told_its_symbolic_inputs_compiles_once_for_every_length(backend: str, request) -> None:
    """``compile_parts`` names the inputs that carry the length (``meta["symbolic_inputs"]``: a tensor's sizes, a
    size input): the first compilation is already symbolic in it, so no length recompiles, the size input's value
    included (a constant there would tie the tensor's size to it)."""
    if backend == "inductor":
        request.getfixturevalue("cpp_compiler")  # skips without one
    captures: Counter = Counter()
    compile_part = make_part_compiler(PartSettings(backend, merge=False, dynamic_lengths=True), captures)
    gm = fx.symbolic_trace(column_of)
    gm.meta.update(part="column", symbolic_inputs=[(True,), True])
    part = compile_part(gm, [torch.randn(3), 3])
    for n in (3, 5, 7, 11):
        x = torch.randn(n)
        torch.testing.assert_close(part(x, n), x[:, None] * 2 + 1)
    assert captures == Counter({"part[column]": 1})
    told_nothing: Counter = Counter()
    plain = make_part_compiler(PartSettings(backend, merge=False, dynamic_lengths=True), told_nothing)(
        fx.symbolic_trace(column_of), [torch.randn(3), 3])
    for n in (3, 5, 7):
        plain(torch.randn(n), n)
    assert sum(told_nothing.values()) == 2  # the first length, then the length as a symbol


def test_symbolic_inputs_must_name_every_input() -> None:
    gm = fx.symbolic_trace(column_of)
    gm.meta.update(part="column", symbolic_inputs=[(True,)])
    with pytest.raises(ValueError, match="symbolic_inputs has 1 entries for the 2 inputs"):
        make_part_compiler(PartSettings("eager", merge=False, dynamic_lengths=True))(gm, [torch.randn(3), 3])


def test_unknown_piece_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="piece backend must be 'inductor' or 'eager'"):
        PartSettings("tvm")


def spy_on_part_compilers(monkeypatch) -> list[PartSettings]:
    """The settings of every part compiler the backend makes, in order."""
    made = []
    real = backend_module.make_part_compiler

    def spy(settings: PartSettings, *args, **kwargs):
        made.append(settings)
        return real(settings, *args, **kwargs)

    monkeypatch.setattr(backend_module, "make_part_compiler", spy)
    return made


@pytest.mark.parametrize("prefill_eager_numerics", [False, True])
def test_numerics_reach_the_parts_they_name(monkeypatch, tiny_model, prefill_eager_numerics: bool) -> None:
    """Generation's parts round as eager; understanding's prefill never, but with ``prefill_eager_numerics`` the
    parts the kept-token choice reads get a compiler of their own that does, with unmerged projections (each the
    GEMM eager runs); its one-row decode parts never: emulated rounding would round every product of a one-row
    reduction."""
    torch._dynamo.reset()
    made = spy_on_part_compilers(monkeypatch)
    model = copy.deepcopy(tiny_model)
    gen_backend = flashu_backend("gen", eager_numerics=True)
    generate_images_compiled(torch.compile(model, backend=gen_backend), gen_backend, [[3]], baseline_steps=2,
                             guidance=2.0)
    und_backend = flashu_backend("und", eager_numerics=True, prefill_eager_numerics=prefill_eager_numerics)
    answer_question_compiled(torch.compile(model, backend=und_backend), und_backend, torch.randn(1, 16, 8, 8),
                             [4, 5], max_new_tokens=2)
    # gen; (the token choice's parts); und's prefill; its one-row parts
    decision = [(True, False)] if prefill_eager_numerics else []
    assert [(m.eager_numerics, m.merge) for m in made] == [(True, True), *decision, (False, True), (False, True)]


@pytest.mark.parametrize("tune_decode", [True, False])
def test_decode_tuning_reaches_the_one_row_parts_only(monkeypatch, tiny_model, tune_decode: bool) -> None:
    torch._dynamo.reset()
    made = spy_on_part_compilers(monkeypatch)
    backend = flashu_backend("und", tune_decode=tune_decode)
    answer_question_compiled(torch.compile(tiny_model, backend=backend), backend, torch.randn(1, 16, 8, 8), [4, 5],
                             max_new_tokens=2)
    # the prefill's parts serve every prompt length (the token choice's, with prefill_eager_numerics on by default,
    # and the rest); the decode step's run one row, tuned when asked, each RMSNorm folded into its products
    assert [(m.coordinate_descent, m.dynamic_lengths, m.norm_in_products) for m in made] == [
        (False, True, False), (False, True, False), (tune_decode, False, True)]


def test_inductor_options_reach_every_part_and_are_checked(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(inductor_compile_fx, "compile_fx",
                        lambda gm, example_inputs, config_patches=None: seen.update(config_patches) or gm.forward)
    x, s = torch.randn(2), torch.randn(2)
    make_part_compiler(PartSettings(merge=False, inductor_options={"max_autotune_gemm": True}))(affine_part(), [x, s])
    assert seen["max_autotune_gemm"] is True and seen["triton.cudagraphs"] is False
    with pytest.raises(ValueError, match=r"option 'max_autotune_gem'; did you mean .*'max_autotune_gemm'"):
        check_inductor_options({"max_autotune_gem": True})
    with pytest.raises(ValueError, match="is set by flashu_backend: use eager_numerics"):
        check_inductor_options({"emulate_precision_casts": False})
    with pytest.raises(ValueError, match="triton.cudagraphs"):
        flashu_backend("gen", inductor_options={"triton.cudagraphs": True})  # refused when built, not at compile


def test_named_dynamic_sources_add_to_the_user_s_and_restore_them() -> None:
    with torch.compiler.config.patch(dynamic_sources="L['user']"):
        with named_dynamic_sources("L['n']"):
            assert torch.compiler.config.dynamic_sources == "L['user'],L['n']"
        assert torch.compiler.config.dynamic_sources == "L['user']"
        with named_dynamic_sources(""):
            assert torch.compiler.config.dynamic_sources == "L['user']"


@pytest.mark.parametrize("options", [{"max_autotune_gemm": True}, {"max_autotune": True},
                                     {"max_autotune_gemm": False}, {}])
def test_gemm_autotuning_turns_merged_projections_off_with_a_warning(monkeypatch, caplog, options: dict) -> None:
    merged = []
    monkeypatch.setattr(part_compiler, "merge_projections", lambda gm, ffn_slices: merged.append(gm) or 0)
    monkeypatch.setattr(inductor_compile_fx, "compile_fx", lambda gm, example_inputs, config_patches=None: gm.forward)
    x, s = torch.randn(2), torch.randn(2)
    with caplog.at_level("WARNING", logger=part_compiler.__name__):
        make_part_compiler(PartSettings(merge=True, inductor_options=options))(affine_part(), [x, s])
    autotuned = part_compiler.autotunes_gemms(options)
    assert autotuned == any(options.values())
    assert bool(merged) != autotuned
    assert ("merge_projections is off with inductor's GEMM autotuning" in caplog.text) == autotuned
