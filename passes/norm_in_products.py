"""Pass: an RMSNorm's statistic inside each product that reads the normalised row (one-row parts).

Eager twin: ``flashu_fx.layers.rms_norm`` followed by ``F.linear`` (q/k/v, gate/up, the lm_head).

    before:  f = x.float();  r = rsqrt(mean(f ** 2, -1, keepdim=True) + eps)
             y = linear(w * (f * r).to(dtype), W)                                  # W: (N, K)
    after:   a = w * f.to(dtype)
             ss = mean(expand((f ** 2)[..., None, :], (..., N, K)), -1)            # (..., N): one value, N times
             y = (linear(a, W) * rsqrt(ss + eps)).to(dtype)                        # ss shared by products of one N

Why: in a decode step the product is a one-row GEMV that inductor lowers to a reduction over K for each of the N
outputs, and the statistic is a second reduction over K with one output, so it runs as its own kernel before the
product (two such kernels a layer: 2.7 us at 7B on an H100, plus their launch gaps; BENCHMARKS.md). Written over the
same (N, K) space as the product, inductor fuses the two reductions into one kernel: each program sums the squares
of the row it already reads. The extra multiply-adds are free in a bandwidth-bound kernel.

Not bit-identical: the scale is applied after the product instead of to the row before it (one rounding fewer in
fp32, a different one in bf16). So it is a backend option for the decode parts (``flashu_backend(
norm_in_products=True)``), decided by a GPU A/B and tested against the twin within rounding. It runs after
``merge_projections`` (a merged q/k/v product is one product of N = q + k + v rows). Only the exact pattern above is
rewritten, for products whose weight is a graph input or an ``as_strided`` view of one (N read off it); a norm whose
row also feeds anything else is left as it is, with a warning. Run as plain FX (the "eager" piece backend of the CPU
tests) the expanded squares are materialised, N x K floats per product: the rewrite is for inductor.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from passes.graph_utils import captured_value, inherit_provenance, linear_args

log = logging.getLogger(__name__)

PASS_NAME = "norm_in_products"


def _method(node: object, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _function(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _norm_parts(rsqrt: fx.Node) -> tuple[fx.Node, fx.Node, float, fx.Node, fx.Node] | None:
    """(f = x.float(), f ** 2, eps, the normalised row w * (f * r).to(dtype), its dtype cast) when ``rsqrt`` is the
    one of ``rms_norm``'s pattern, else None."""
    add = rsqrt.args[0]
    if not _function(add, operator.add, torch.add) or not isinstance(add.args[1], float):
        return None
    mean, eps = add.args[0], add.args[1]
    if not _method(mean, "mean") or tuple(mean.args[1:]) != (-1,) or mean.kwargs != {"keepdim": True}:
        return None
    square = mean.args[0]
    if not _method(square, "pow") or square.args[1] != 2:
        return None
    f = square.args[0]
    if not _method(f, "float") or len(rsqrt.users) != 1:
        return None
    scaled = next(iter(rsqrt.users))
    if not _function(scaled, operator.mul, torch.mul) or set(scaled.args) != {f, rsqrt} or len(scaled.users) != 1:
        return None
    cast = next(iter(scaled.users))
    if not _method(cast, "to") or len(cast.args) != 2 or not isinstance(cast.args[1], torch.dtype):
        return None
    if len(cast.users) != 1:
        return None
    row = next(iter(cast.users))
    if not _function(row, operator.mul, torch.mul) or cast not in row.args:
        return None
    return f, square, eps, row, cast


def _out_features(weight: object) -> int | None:
    """N of a product's weight: a graph input's example value, or the size an ``as_strided`` view of one gives."""
    if _function(weight, torch.as_strided) and isinstance(weight.args[1], (tuple, list)):
        size = weight.args[1]
        return int(size[0]) if len(size) == 2 and isinstance(size[0], int) else None
    value = captured_value(weight)
    return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() == 2 else None


def _products(row: fx.Node) -> list[fx.Node] | None:
    """The ``F.linear`` calls reading ``row`` as their input, when every user of ``row`` is one (else None)."""
    users = list(row.users)
    if not users or any(not _function(u, F.linear) or u.args[0] is not row or row in u.args[1:] for u in users):
        return None
    return users


def _lead_dims(*nodes: fx.Node) -> int | None:
    """How many axes come before the hidden one, from the first of ``nodes`` with an example value."""
    for node in nodes:
        value = captured_value(node)
        if isinstance(value, Tensor):
            return value.dim() - 1
    return None


def _between(first: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """The nodes from ``first`` up to, not including, ``stop``: what a pass just inserted before ``stop``."""
    nodes, node = [], first
    while node is not stop:
        nodes.append(node)
        node = node.next
    return nodes


def fold_norm_into_products(gm: fx.GraphModule) -> int:
    """Rewrite every ``rms_norm`` whose normalised row only feeds products (as the module docstring shows), in place;
    returns how many products now compute the statistic themselves."""
    graph, rewritten, norms = gm.graph, 0, 0
    for rsqrt in [n for n in graph.nodes if _function(n, torch.rsqrt)]:
        parts = _norm_parts(rsqrt)
        if parts is None:
            continue
        f, square, eps, row, cast = parts
        if not any(_function(u, F.linear) for u in row.users):  # e.g. the final norm, whose row is sliced first
            log.debug("norm_in_products: the norm at %s feeds no product directly; left as it is", row.name)
            continue
        products = _products(row)
        sizes = None if products is None else [_out_features(p.args[1]) for p in products]
        lead = _lead_dims(row, f)
        if products is None or any(n is None for n in sizes) or lead is None:
            log.warning("norm_in_products: the norm at %s also feeds something other than products of known size; "
                        "left as it is", row.name)
            continue
        norms += 1
        chain = [row, cast, cast.args[0], rsqrt, rsqrt.args[0], rsqrt.args[0].args[0]]  # the norm's own nodes
        weight = row.args[0] if row.args[1] is cast else row.args[1]
        dtype = cast.args[1]
        with graph.inserting_before(row):
            x = graph.call_method("to", (f, dtype))  # x itself: f is x.float()
            a = graph.call_function(operator.mul, (weight, x))
            inv = {}  # per product width N: rsqrt of the mean of squares over (..., N, K), shared by equal widths
            for n in dict.fromkeys(sizes):
                grid = graph.call_method("expand", (graph.call_method("unsqueeze", (square, -2)), *[-1] * lead, n, -1))
                inv[n] = graph.call_function(torch.rsqrt, (graph.call_function(
                    operator.add, (graph.call_method("mean", (grid, -1)), eps)),))
        inherit_provenance(_between(x, row), [row], PASS_NAME)
        for product, n in zip(products, sizes, strict=True):
            bias = linear_args(product)[2]
            with graph.inserting_before(product):
                plain = graph.call_function(F.linear, (a, product.args[1]))
                out = graph.call_method("to", (graph.call_function(operator.mul, (plain, inv[n])), dtype))
                if bias is not None:
                    out = graph.call_function(operator.add, (out, bias))
            inherit_provenance(_between(plain, product), [product], PASS_NAME)
            product.replace_all_uses_with(out)
            graph.erase_node(product)
            rewritten += 1
        for dead in chain:
            if not dead.users:
                graph.erase_node(dead)
    if not norms:  # a part without such a norm (the embedding, the final norm): nothing to do, nothing failed
        log.debug("norm_in_products: no rms_norm feeding products; the graph is unchanged")
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten
