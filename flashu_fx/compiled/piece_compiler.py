"""Compile one piece: Dynamo captures it, our FX passes rewrite the graph, inductor (or nothing) compiles.

Each piece gets its own code object, so variants of one function (full / FFN-sliced) keep separate
Dynamo caches and never evict each other; weights are graph inputs (Dynamo lifts module parameters),
so every layer of a stack reuses one artifact.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx

from passes.merge_projections import merge_projections

log = logging.getLogger(__name__)


def make_piece_compiler(backend: str = "inductor", captures: Counter | None = None,
                        merge: bool = True, eager_numerics: bool = True,
                        coordinate_descent: bool = False, merge_ffn_slices: bool = False) -> Callable:
    """``backend``: "inductor" (GPU default), "eager" (run the rewritten FX graph as is: CPU tests).
    ``captures`` counts graph captures per piece name (a capture after warm-up is a recompile).
    ``merge``: finish every piece with ``passes.merge_projections`` (the caller colocates the weights);
    ``merge_ffn_slices``: there also run each FFN slice's gate and up as one batched matmul.
    ``eager_numerics``: fused kernels round every intermediate to the model dtype where eager does (inductor's
    ``emulate_precision_casts``), so bf16 results track the eager model's instead of drifting from it.
    ``coordinate_descent``: inductor's ``coordinate_descent_tuning``, which also lowers every one-row product
    (a GEMV) to a Triton reduction that it tunes, and can fuse with its neighbours, instead of a cuBLAS call
    (gpt-fast's decode setting). It benchmarks each kernel once at compile time: for one-row pieces only."""
    if backend not in ("inductor", "eager"):
        raise ValueError(f"piece backend must be 'inductor' or 'eager', got {backend!r}")

    def compile_piece(fn: Callable, name: str, graph_passes: list[Callable[[fx.GraphModule], object]]) -> Callable:
        def piece_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
            if captures is not None:
                captures[name] += 1
            for graph_pass in graph_passes:
                result = graph_pass(gm)
                log.debug("piece %s: %s -> %s", name, getattr(graph_pass, "func", graph_pass).__name__, result)
            if merge:
                log.debug("piece %s: merge_projections -> %s", name,
                          merge_projections(gm, ffn_slices=merge_ffn_slices))
            if backend == "eager":
                return gm.forward
            from torch._inductor.compile_fx import compile_fx

            # No inductor CUDA graphs: the runtimes capture whole calls, pieces included.
            patches = {"triton.cudagraphs": False, "emulate_precision_casts": eager_numerics}
            if coordinate_descent:
                patches["coordinate_descent_tuning"] = True
            return compile_fx(gm, example_inputs, config_patches=patches)

        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        fresh.__qualname__ = f"{fn.__qualname__}[{name}]"
        # dynamic=None: a second prefix bucket recompiles once with a symbolic prefix length, then never again.
        return torch.compile(fresh, backend=piece_backend, fullgraph=True, dynamic=None)

    return compile_piece
