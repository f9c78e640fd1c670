"""Compile one part of a captured graph: ``passes.merge_projections``, then inductor (or the graph as it is).

The executors split each captured graph into parts (``passes.partition``) whose weights are inputs, so every layer
of a stack reuses one compiled artifact; ``make_part_compiler`` is the compiler they hand each distinct part to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx

from passes.merge_projections import merge_projections
from passes.norm_in_products import fold_norm_into_products

log = logging.getLogger(__name__)

# Inductor settings the piece compiler owns, and what to use instead.
_OWNED_INDUCTOR_OPTIONS = {
    "triton.cudagraphs": "the executors capture whole calls as CUDA graphs (cuda_graphs=...)",
    "emulate_precision_casts": "eager_numerics=...",
    "coordinate_descent_tuning": "tune_decode=... for the one-row parts",
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


_GEMM_AUTOTUNE = ("max_autotune", "max_autotune_gemm")


def autotunes_gemms(patches: Mapping[str, object]) -> bool:
    """True when the inductor patches turn on its GEMM autotuning (which merged projections cannot go through)."""
    return any(bool(patches.get(key)) for key in _GEMM_AUTOTUNE)


def merge_off_for_autotuning(patches: Mapping[str, object]) -> bool:
    """True, with a warning, when ``patches`` turn on GEMM autotuning: merged projections must then stay off."""
    if not autotunes_gemms(patches):
        return False
    log.warning("merge_projections is off with inductor's GEMM autotuning (%s): a merged product reads its group's "
                "buffer past the first weight's end, and the autotuner benchmarks each choice on an input rebuilt at "
                "that weight's own size", sorted(k for k in _GEMM_AUTOTUNE if patches.get(k)))
    return True


@dataclasses.dataclass(frozen=True)
class PartSettings:
    """How the parts of a captured graph compile: one record that the backend builds from its options and varies
    per kind of part (``dataclasses.replace``: the generation calls, the understanding prefill, its one-row parts).

    ``backend``: "inductor" (GPU default) or "eager" (the rewritten FX graph as it is: CPU tests). ``merge``:
    ``passes.merge_projections`` (the caller colocates the weights); ``merge_ffn_slices``: with ``merge``, a pruned
    FFN's gate and up slices too, as one batched matmul each (a candidate: measured before it becomes a default);
    ``norm_in_products``: then ``passes.norm_in_products`` (each RMSNorm's statistic inside the products that read
    its row; for one-row parts, a candidate too). ``eager_numerics``: fused kernels round every intermediate to the
    model dtype where eager does (inductor's ``emulate_precision_casts``), so bf16 results track the eager model's
    instead of drifting from it. ``coordinate_descent``: inductor's ``coordinate_descent_tuning``, which also lowers
    every one-row product (a GEMV) to a Triton reduction that it tunes, and can fuse with its neighbours, instead of
    a cuBLAS call (gpt-fast's decode setting); it benchmarks each kernel once at compile time: for one-row parts only.
    ``dynamic_lengths``: the parts serve every prompt length (``make_part_compiler``). ``inductor_options``: more
    inductor config patches for every part (``check_inductor_options``); one that turns on GEMM autotuning
    (``max_autotune``, ``max_autotune_gemm``) turns ``merge`` off, with a warning (``autotunes_gemms``)."""

    backend: str = "inductor"
    merge: bool = True
    merge_ffn_slices: bool = False
    norm_in_products: bool = False
    eager_numerics: bool = True
    coordinate_descent: bool = False
    dynamic_lengths: bool = False
    inductor_options: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in ("inductor", "eager"):
            raise ValueError(f"piece backend must be 'inductor' or 'eager', got {self.backend!r}")
        object.__setattr__(self, "inductor_options", check_inductor_options(self.inductor_options))


def compile_graph(gm: fx.GraphModule, example_inputs: list, settings: PartSettings, name: str) -> Callable:
    """The shared last stage of every compiled graph: ``passes.merge_projections`` and ``passes.norm_in_products``
    (when ``settings`` ask for them), then inductor with this project's settings (or the graph as it is, for the
    "eager" backend)."""
    if settings.merge:
        log.debug("%s: merge_projections -> %s", name, merge_projections(gm, ffn_slices=settings.merge_ffn_slices))
    if settings.norm_in_products:  # after the merge: a merged q/k/v is one product, and its statistic one reduction
        log.debug("%s: norm_in_products -> %s", name, fold_norm_into_products(gm))
    if settings.backend == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    # No inductor CUDA graphs: the executors capture whole calls, parts included.
    patches = {"triton.cudagraphs": False, "emulate_precision_casts": settings.eager_numerics}
    if settings.coordinate_descent:
        patches["coordinate_descent_tuning"] = True
    patches.update(settings.inductor_options)
    start = time.perf_counter()
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    log.info("%s: compiled in %.1f s", name, time.perf_counter() - start)
    return compiled


def make_part_compiler(settings: PartSettings, captures: Counter | None = None,
                       seconds: Counter | None = None) -> Callable[[fx.GraphModule, list], Callable]:
    """The compiler of the parts of a captured graph (``passes.partition.compile_parts``), each part compiled as
    ``settings`` say (``compile_graph``).

    ``captures`` counts compilations per part name (a compilation after warm-up is a recompile); ``seconds`` adds up
    their wall time per part name (the last stage, ``compile_graph``: where a cold first compile spends most of its
    time).

    A part's graph is already captured, so by default it goes straight to ``compile_graph``, specialised to its
    example inputs' shapes. ``settings.dynamic_lengths`` (the understanding prefill and the generation calls, whose
    prompt length, and so the batch cut after the last slot, varies from request to request): Dynamo captures the
    part once more and compiles it on its first call with the length symbolic, where ``compile_parts`` names the
    inputs that carry it (``gm.meta["symbolic_inputs"]``: ``symbolic_part_inputs``), so one compilation serves every
    prompt length. Without that record, a call with a second length recompiles the part once, the length then
    symbolic (Dynamo's automatic dynamic shapes). ``compile_parts`` shares one artifact across lengths
    (``dynamic_lengths`` is set on the returned compiler)."""
    if settings.merge and settings.backend == "inductor" and merge_off_for_autotuning(settings.inductor_options):
        settings = dataclasses.replace(settings, merge=False)

    def compile_part(gm: fx.GraphModule, example_inputs: list) -> Callable:
        name = f"part[{gm.meta.get('part', '?')}]"  # compile_parts names the part it compiles

        def part_backend(captured: fx.GraphModule, inputs: list, settings: PartSettings = settings) -> Callable:
            if captures is not None:
                captures[name] += 1
            start = time.perf_counter()
            compiled = compile_graph(captured, list(inputs), settings, name)
            if seconds is not None:
                seconds[name] += time.perf_counter() - start
            return compiled

        if not settings.dynamic_lengths:
            return part_backend(gm, example_inputs)
        if settings.merge:  # on the part itself, whose nodes keep their provenance (Dynamo's capture of it would not)
            log.debug("%s: merge_projections -> %s", name,
                      merge_projections(gm, ffn_slices=settings.merge_ffn_slices))
        # merged already: Dynamo's capture of the part goes straight to inductor
        unmerged = functools.partial(part_backend, settings=dataclasses.replace(settings, merge=False))
        compiled = torch.compile(gm, backend=unmerged, fullgraph=True, dynamic=None)
        symbolic = gm.meta.get("symbolic_inputs")
        return compiled if not symbolic or not any(symbolic) else symbolic_from_the_start(gm, compiled, symbolic)

    compile_part.dynamic_lengths = settings.dynamic_lengths  # type: ignore[attr-defined]
    return compile_part


def symbolic_from_the_start(gm: fx.GraphModule, compiled: Callable,
                            symbolic: Sequence[tuple[bool, ...] | bool]) -> Callable:
    """``compiled`` (``torch.compile`` of ``gm``) whose first call, the one Dynamo captures, sees the length as a
    symbol: ``symbolic`` gives, per input of ``gm``, which sizes of a tensor are the length (hinted dynamic on the
    call's tensors, ``maybe_mark_dynamic``) and whether a size input is it (named a dynamic source for that call,
    ``torch.compiler.config.dynamic_sources``; a size left constant would tie the tensors' symbol to its value).
    Later calls go straight to the compiled part."""
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    if len(names) != len(symbolic):
        raise ValueError(f"symbolic_inputs has {len(symbolic)} entries for the {len(names)} inputs of {gm.meta}")
    sizes = ",".join(f"L['{name}']" for name, sym in zip(names, symbolic, strict=True) if sym is True)
    if sizes and not hasattr(torch.compiler.config, "dynamic_sources"):
        log.debug("%s: this torch names no dynamic sources; the part recompiles once at a second length", gm.meta)
        return compiled
    first = True

    def run(*args):
        nonlocal first
        if not first:
            return compiled(*args)
        for arg, sym in zip(args, symbolic, strict=True):
            if isinstance(arg, torch.Tensor) and isinstance(sym, tuple):
                for dim in (d for d, is_symbol in enumerate(sym) if is_symbol):
                    torch._dynamo.maybe_mark_dynamic(arg, dim)
        with named_dynamic_sources(sizes):
            out = compiled(*args)
        first = False
        return out

    return run


def named_dynamic_sources(sources: str) -> contextlib.AbstractContextManager:
    """Dynamo's ``dynamic_sources`` with ``sources`` added (comma-separated), for the calls inside; the user's own
    (``TORCH_COMPILE_DYNAMIC_SOURCES``) stay. Nothing to add: no patch."""
    if not sources:
        return contextlib.nullcontext()
    already = torch.compiler.config.dynamic_sources
    return torch.compiler.config.patch(dynamic_sources=",".join(filter(None, (already, sources))))
