"""Compile one piece: Dynamo captures it, our FX passes rewrite the graph, inductor (or nothing) compiles.

Each piece gets its own code object, so variants of one function (full / FFN-sliced) keep separate
Dynamo caches and never evict each other; weights are graph inputs (Dynamo lifts module parameters),
so every layer of a stack reuses one artifact.
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import fx

from passes.merge_projections import merge_projections

log = logging.getLogger(__name__)

# Inductor settings the piece compiler owns, and what to use instead.
_OWNED_INDUCTOR_OPTIONS = {
    "triton.cudagraphs": "the runtimes capture whole calls as CUDA graphs (cuda_graphs=...)",
    "emulate_precision_casts": "eager_numerics=...",
    "coordinate_descent_tuning": "tune_decode=... for the one-row pieces",
}


def check_inductor_options(options: Mapping[str, object] | None) -> dict[str, object]:
    """``options`` as a dict of inductor config patches; raises on a name inductor does not have (the error
    lists near names) or one the piece compiler sets itself."""
    import difflib

    import torch._inductor.config as inductor_config

    options = dict(options or {})
    known = inductor_config.get_config_copy()
    for key in options:
        if key in _OWNED_INDUCTOR_OPTIONS:
            raise ValueError(f"inductor option {key!r} is set by flashu_backend: use {_OWNED_INDUCTOR_OPTIONS[key]}")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            raise ValueError(f"unknown inductor option {key!r}" + (f"; did you mean {near}?" if near else ""))
    return options


def _checked_settings(backend: str, inductor_options: Mapping[str, object] | None) -> dict[str, object]:
    """The inductor patches of a compiler for ``backend``; raises on an unknown backend or option."""
    if backend not in ("inductor", "eager"):
        raise ValueError(f"piece backend must be 'inductor' or 'eager', got {backend!r}")
    return check_inductor_options(inductor_options)


def make_piece_compiler(backend: str = "inductor", captures: Counter | None = None,
                        merge: bool = True, eager_numerics: bool = True,
                        coordinate_descent: bool = False, merge_ffn_slices: bool = False,
                        inductor_options: Mapping[str, object] | None = None) -> Callable:
    """``backend``: "inductor" (GPU default), "eager" (run the rewritten FX graph as is: CPU tests).
    ``captures`` counts graph captures per piece name (a capture after warm-up is a recompile).
    ``merge``: finish every piece with ``passes.merge_projections`` (the caller colocates the weights);
    ``merge_ffn_slices``: there also run each FFN slice's gate and up as one batched matmul.
    ``eager_numerics``: fused kernels round every intermediate to the model dtype where eager does (inductor's
    ``emulate_precision_casts``), so bf16 results track the eager model's instead of drifting from it.
    ``coordinate_descent``: inductor's ``coordinate_descent_tuning``, which also lowers every one-row product
    (a GEMV) to a Triton reduction that it tunes, and can fuse with its neighbours, instead of a cuBLAS call
    (gpt-fast's decode setting). It benchmarks each kernel once at compile time: for one-row pieces only.
    ``inductor_options``: more inductor config patches for every piece (``check_inductor_options``)."""
    extra_patches = _checked_settings(backend, inductor_options)

    def compile_piece(fn: Callable, name: str, graph_passes: list[Callable[[fx.GraphModule], object]]) -> Callable:
        def piece_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
            if captures is not None:
                captures[name] += 1
            for graph_pass in graph_passes:
                result = graph_pass(gm)
                log.debug("piece %s: %s -> %s", name, getattr(graph_pass, "func", graph_pass).__name__, result)
            return compile_graph(gm, example_inputs, backend, merge, merge_ffn_slices, eager_numerics,
                                 coordinate_descent, extra_patches, name)

        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        fresh.__qualname__ = f"{fn.__qualname__}[{name}]"
        # dynamic=None: a second prefix bucket recompiles once with a symbolic prefix length, then never again.
        return torch.compile(fresh, backend=piece_backend, fullgraph=True, dynamic=None)

    return compile_piece


def compile_graph(gm: fx.GraphModule, example_inputs: list, backend: str, merge: bool, merge_ffn_slices: bool,
                  eager_numerics: bool, coordinate_descent: bool, patches: Mapping[str, object], name: str) -> Callable:
    """The shared last stage of every compiled graph: ``passes.merge_projections`` (when ``merge``), then
    inductor with this project's settings (or the graph as it is, for ``backend="eager"``)."""
    if merge:
        log.debug("%s: merge_projections -> %s", name, merge_projections(gm, ffn_slices=merge_ffn_slices))
    if backend == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    # No inductor CUDA graphs: the runtimes capture whole calls, pieces included.
    settings = {"triton.cudagraphs": False, "emulate_precision_casts": eager_numerics}
    if coordinate_descent:
        settings["coordinate_descent_tuning"] = True
    settings.update(patches)
    start = time.perf_counter()
    compiled = compile_fx(gm, example_inputs, config_patches=settings)
    log.info("%s: compiled in %.1f s", name, time.perf_counter() - start)
    return compiled


def make_part_compiler(backend: str = "inductor", captures: Counter | None = None, merge: bool = True,
                       eager_numerics: bool = True, inductor_options: Mapping[str, object] | None = None,
                       coordinate_descent: bool = False,
                       dynamic_lengths: bool = False) -> Callable[[fx.GraphModule, list], Callable]:
    """The compiler of the parts of a captured graph (``passes.partition.compile_parts``). ``captures`` counts
    compilations per part name; the other settings are ``make_piece_compiler``'s.

    A part's graph is already captured, so by default it goes straight to ``compile_graph``, specialised to its
    example inputs' shapes. ``dynamic_lengths=True`` (the understanding prefill and the generation calls, whose
    prompt length, and so the batch cut after the last slot, varies from request to request): Dynamo captures the
    part once more and compiles it on its first call, and a call with a second length recompiles it once with the
    length symbolic, as the runtime's pieces do, instead of compiling every part again for every prompt length.
    ``compile_parts`` then shares one artifact across lengths (``dynamic_lengths`` is set on the returned compiler)."""
    extra_patches = _checked_settings(backend, inductor_options)

    def compile_part(gm: fx.GraphModule, example_inputs: list) -> Callable:
        name = f"part[{gm.meta.get('part', '?')}]"  # compile_parts names the part it compiles

        def part_backend(captured: fx.GraphModule, inputs: list, merge_here: bool = merge) -> Callable:
            if captures is not None:
                captures[name] += 1
            return compile_graph(captured, list(inputs), backend, merge_here, False, eager_numerics,
                                 coordinate_descent, extra_patches, name)

        if not dynamic_lengths:
            return part_backend(gm, example_inputs)
        if merge:  # on the part itself, whose nodes keep their provenance (Dynamo's capture of it would not)
            log.debug("%s: merge_projections -> %s", name, merge_projections(gm))
        return torch.compile(gm, backend=functools.partial(part_backend, merge_here=False), fullgraph=True,
                             dynamic=None)

    compile_part.dynamic_lengths = dynamic_lengths  # type: ignore[attr-defined]
    return compile_part
