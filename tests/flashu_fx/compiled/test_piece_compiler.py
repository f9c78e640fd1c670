"""The piece compiler: passes run on every capture, inductor gets the numerics and CUDA-graph settings."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._inductor.compile_fx as inductor_compile_fx
from torch import fx

from flashu_fx.compiled.piece_compiler import make_piece_compiler


def scale_and_shift(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s + 1


@pytest.mark.parametrize("eager_numerics", [True, False])
@pytest.mark.parametrize("coordinate_descent", [True, False])
def test_inductor_gets_the_numerics_setting(monkeypatch, eager_numerics: bool, coordinate_descent: bool) -> None:
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", fake_compile_fx)
    captures: Counter = Counter()
    compile_piece = make_piece_compiler("inductor", captures, merge=False, eager_numerics=eager_numerics,
                                        coordinate_descent=coordinate_descent)
    piece = compile_piece(scale_and_shift, "affine", [])
    x, s = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(piece(x, s), x * s + 1)
    expected = {"triton.cudagraphs": False, "emulate_precision_casts": eager_numerics}
    if coordinate_descent:
        expected["coordinate_descent_tuning"] = True
    assert seen["patches"] == expected
    assert captures == Counter({"affine": 1})


def test_passes_run_in_order_then_merge(monkeypatch) -> None:
    calls = []

    def first(gm: fx.GraphModule) -> int:
        calls.append("first")
        return 0

    import flashu_fx.compiled.piece_compiler as piece_compiler

    monkeypatch.setattr(piece_compiler, "merge_projections",
                        lambda gm, ffn_slices: calls.append(("merge", ffn_slices)) or 0)
    piece = make_piece_compiler("eager", merge=True)(scale_and_shift, "affine", [first])
    piece(torch.randn(2), torch.randn(2))
    assert calls == ["first", ("merge", False)]
    calls.clear()
    make_piece_compiler("eager", merge=True, merge_ffn_slices=True)(scale_and_shift, "affine1", [first])(
        torch.randn(2), torch.randn(2))
    assert calls == ["first", ("merge", True)]
    calls.clear()
    make_piece_compiler("eager", merge=False)(scale_and_shift, "affine2", [first])(torch.randn(2), torch.randn(2))
    assert calls == ["first"]


def test_unknown_piece_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="piece backend must be 'inductor' or 'eager'"):
        make_piece_compiler("tvm")


def test_numerics_apply_to_generation_pieces_only(monkeypatch, tiny_model) -> None:
    """Understanding pieces compile without emulated rounding: it would round every product of a one-row
    reduction (decode)."""
    import copy

    import flashu_fx.compiled.backend as backend_module
    from flashu_fx.compiled import flashu_backend, generate_images_compiled

    seen = []
    real = backend_module.make_piece_compiler

    def spy(*args, **kwargs):
        seen.append(kwargs.get("eager_numerics", args[3] if len(args) > 3 else True))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_module, "make_piece_compiler", spy)
    model = copy.deepcopy(tiny_model)
    gen_backend = flashu_backend("gen", eager_numerics=True)
    generate_images_compiled(torch.compile(model, backend=gen_backend), gen_backend, [[3]], baseline_steps=2,
                             guidance=2.0)
    und_backend = flashu_backend("und", eager_numerics=True)
    und_backend.und_runtime(torch.compile(model, backend=und_backend))
    assert seen == [True, False, False]  # gen; und's pieces and its one-row pieces


@pytest.mark.parametrize("tune_decode", [True, False])
def test_decode_tuning_reaches_the_one_row_pieces_only(monkeypatch, tiny_model, tune_decode: bool) -> None:
    import flashu_fx.compiled.backend as backend_module
    from flashu_fx.compiled import flashu_backend

    tuned: dict[str, bool] = {}
    real = backend_module.make_piece_compiler

    def spy(*args, **kwargs):
        compile_piece = real(*args, **kwargs)

        def recording(fn, name, graph_passes):
            tuned[name] = kwargs.get("coordinate_descent", False)
            return compile_piece(fn, name, graph_passes)

        return recording

    monkeypatch.setattr(backend_module, "make_piece_compiler", spy)
    backend = flashu_backend("und", tune_decode=tune_decode)
    backend.und_runtime(torch.compile(tiny_model, backend=backend))
    one_row = {"und_next_token", "und_decode_layer", "und_decode_layer_measured", "und_decode_finish"}
    assert one_row < set(tuned)
    assert {name for name, on in tuned.items() if on} == (one_row if tune_decode else set())


def test_inductor_options_reach_every_piece_and_are_checked(monkeypatch) -> None:
    from flashu_fx.compiled import flashu_backend
    from flashu_fx.compiled.piece_compiler import check_inductor_options

    seen = {}
    monkeypatch.setattr(inductor_compile_fx, "compile_fx",
                        lambda gm, example_inputs, config_patches=None: seen.update(config_patches) or gm.forward)
    piece = make_piece_compiler("inductor", merge=False, inductor_options={"max_autotune_gemm": True})(
        scale_and_shift, "affine_tuned", [])
    piece(torch.randn(2), torch.randn(2))
    assert seen["max_autotune_gemm"] is True and seen["triton.cudagraphs"] is False
    with pytest.raises(ValueError, match=r"option 'max_autotune_gem'; did you mean .*'max_autotune_gemm'"):
        check_inductor_options({"max_autotune_gem": True})
    with pytest.raises(ValueError, match="is set by flashu_backend: use eager_numerics"):
        check_inductor_options({"emulate_precision_casts": False})
    with pytest.raises(ValueError, match="triton.cudagraphs"):
        flashu_backend("gen", inductor_options={"triton.cudagraphs": True})  # refused when built, not at compile
