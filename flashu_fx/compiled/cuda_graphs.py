"""One CUDA-graph helper for the compiled paths: capture a step over static buffers once per key, then replay it.

    graphs = CudaGraphs(max_graphs=64)
    outputs = graphs.run(key, body)   # body() reads and writes only static buffers; returns its static outputs
    outputs = graphs.call(key, fn, args, per_call)   # fn(*args), the per-call tensors copied to fixed addresses
    outputs = graphs.run(key, body, keep_outputs=True)   # outputs that outlive other graphs' replays
    outputs = graphs.call(key, fn, args, per_call, capture_on_use=2)   # the key's first use runs fn as it is

On first use of a key, ``body`` runs for real on a side stream (compiling or warming whatever it calls), then the
same body is captured; capturing executes nothing, so a body that advances state in place (a K/V cache append)
advances it exactly once, and the first call returns the real run's outputs. Later uses replay the graph and return
the captured outputs (static tensors). Graphs share one memory pool, which is safe because they never run
concurrently, with one consequence for callers: an output is valid until the next replay of ANY graph of the
helper (a graph captured earlier may have freed the memory a later graph's outputs live in, and its replay writes
there), so a caller that keeps an output past the next call copies it. ``keep_outputs=True`` does that copy inside
the graph, into tensors allocated outside the shared pool on the key's first (real) run: the outputs then stay
valid until the same key runs again, at the same addresses from the first call on (what a prefix's keys and values,
read by every later call of an image, need). Beyond ``max_graphs`` the least recently used graph is dropped.

``capture_on_use=n`` captures a key on its n-th use; the uses before run the body as it is (no graph, no copies, the
outputs ordinary tensors). A capture costs a real run plus the capture, so for a key most callers meet once (an
understanding prompt's length: a prefill runs once per answer) capturing on the first use costs more than it saves.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch.utils import _pytree as pytree

from flashu_fx.inputs import is_int

T = TypeVar("T")
UNCAPTURED_KEYS = 1024  # keys counted towards ``capture_on_use`` when the graphs themselves are unbounded


class CudaGraphs:
    """CUDA graphs by key, captured on first use (see the module docstring)."""

    def __init__(self, max_graphs: int | None = None) -> None:
        if max_graphs is not None and max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} is invalid: allowed None or an integer >= 1")
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = OrderedDict()
        self.captures: Counter = Counter()  # per label: captures (a capture is not a compilation)
        self._inputs: dict[Hashable, list] = {}  # call(): each key's inputs at fixed addresses
        self._kept: dict[Hashable, list] = {}  # keep_outputs: each key's outputs, outside the shared pool
        self._uses: OrderedDict[Hashable, int] = OrderedDict()  # capture_on_use: uses of keys not captured yet
        self._stream: torch.cuda.Stream | None = None
        self._pool = None

    def run(self, key: Hashable, body: Callable[[], T], label: str = "graph", keep_outputs: bool = False,
            capture_on_use: int = 1) -> T:
        """Replay ``key``'s graph (capturing ``body`` first if it has none); returns ``body``'s outputs.
        ``keep_outputs``: they outlive other graphs' replays; ``capture_on_use``: the use of the key that captures
        it, the earlier ones run ``body`` as it is (see the module docstring)."""
        if self._runs_uncaptured(key, capture_on_use, keep_outputs):
            return body()
        if keep_outputs:
            body = self._copied_out(key, body)
        entry = self.graphs.pop(key, None)
        if entry is not None:
            self.graphs[key] = entry  # most recently used last
            entry[0].replay()
            return entry[1]  # type: ignore[return-value]
        if self._stream is None:
            self._stream, self._pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            first = body()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            outputs = body()
        torch.cuda.current_stream().wait_stream(self._stream)
        if self.max_graphs is not None and len(self.graphs) >= self.max_graphs:
            dropped, _ = self.graphs.popitem(last=False)
            self._inputs.pop(dropped, None)  # its fixed-address inputs and kept outputs go with it
            self._kept.pop(dropped, None)
        self.graphs[key] = (graph, outputs)
        self.captures[label] += 1
        return first

    def _runs_uncaptured(self, key: Hashable, capture_on_use: int, keep_outputs: bool) -> bool:
        """Whether this use of ``key`` comes before its capturing one (``capture_on_use``); counts it."""
        if capture_on_use == 1 and is_int(capture_on_use):  # every replay passes here: the common case first
            return False
        if not is_int(capture_on_use) or capture_on_use < 1:
            raise ValueError(f"capture_on_use={capture_on_use!r} is invalid: allowed an integer >= 1")
        if key in self.graphs:
            return False
        if keep_outputs:  # kept outputs live at the same addresses from the first use on: that use must capture
            raise ValueError("capture_on_use > 1 cannot keep outputs (keep_outputs=True): kept outputs live at "
                             "fixed addresses from a key's first use on")
        uses = self._uses.pop(key, 0) + 1
        if uses >= capture_on_use:
            return False
        self._uses[key] = uses  # most recently used last; bounded as the graphs are
        while len(self._uses) > (self.max_graphs or UNCAPTURED_KEYS):
            self._uses.popitem(last=False)
        return True

    def _copied_out(self, key: Hashable, body: Callable[[], T]) -> Callable[[], T]:
        """``body`` with its tensor outputs copied into the key's own tensors (made by the first, uncaptured run)."""

        def copied() -> T:
            leaves, spec = pytree.tree_flatten(body())
            kept = self._kept.get(key)
            if kept is None:  # the real run before the capture: these come from the ordinary allocator
                kept = self._kept[key] = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            else:
                for mine, x in zip(kept, leaves, strict=True):
                    if isinstance(x, torch.Tensor):
                        mine.copy_(x)
            return pytree.tree_unflatten(kept, spec)

        return copied

    def call(self, key: Hashable, fn: Callable[..., T], args: Sequence[object], per_call: Sequence[int],
             label: str = "graph", keep_outputs: bool = False, capture_on_use: int = 1) -> T:
        """``fn(*args)`` as a CUDA graph. ``per_call``: the positions of the arguments that change from call to
        call: their tensors are copied into inputs at fixed addresses first, their other values (sizes) join the
        key. Every other argument (weights, caches) is read in place, so ``key`` must tell apart the addresses they
        live at: a caller folds in ``tensor_addresses`` of them, taken once per image or answer rather than per
        call (a model's weights are hundreds of arguments, and the call's own work is a replay). ``keep_outputs``
        and ``capture_on_use``: as ``run``'s."""
        key = (key, tuple(args[i] for i in per_call if not isinstance(args[i], torch.Tensor)))
        if self._runs_uncaptured(key, capture_on_use, keep_outputs):
            return fn(*args)
        inputs = self._inputs.get(key)
        if inputs is None:
            inputs = self._inputs[key] = list(args)
            for i in per_call:
                if isinstance(args[i], torch.Tensor):
                    inputs[i] = args[i].clone()
        else:
            for i in per_call:
                if isinstance(args[i], torch.Tensor):
                    inputs[i].copy_(args[i])
        return self.run(key, lambda: fn(*inputs), label, keep_outputs)

    def __len__(self) -> int:
        return len(self.graphs)


def run_maybe_graphed(graphs: CudaGraphs | None, key: Hashable, fn: Callable[..., T], args: Sequence[object],
                      per_call: Sequence[int], label: str = "graph", keep_outputs: bool = False,
                      capture_on_use: int = 1) -> T:
    """``fn(*args)``: through ``graphs.call`` when there are graphs and the first tensor argument is on CUDA."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if graphs is None or first is None or not first.is_cuda:
        return fn(*args)
    return graphs.call(key, fn, args, per_call, label, keep_outputs, capture_on_use)


def tensor_addresses(args: Sequence[object], positions: Sequence[int]) -> tuple[int, ...]:
    """Where the tensors at ``positions`` live: a ``CudaGraphs.call`` key part for the arguments read in place."""
    return tuple(args[i].data_ptr() for i in positions if isinstance(args[i], torch.Tensor))


def contiguous_per_call(args: Sequence[object], per_call: Sequence[int]) -> tuple:
    """``args`` with the tensors at the ``per_call`` positions (the caller's own inputs, not the weights or caches)
    made contiguous: compiled parts are specialised to their inputs' strides, a caller's tensors arrive with any
    (an expanded t, latents sliced from a batch), and a graph's input copy would not keep them. Only those positions
    are visited: the weights are hundreds of arguments on every call."""
    out = list(args)
    for i in per_call:
        if isinstance(out[i], torch.Tensor):
            out[i] = out[i].contiguous()
    return tuple(out)
