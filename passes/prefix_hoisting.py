"""Pass: slot-only positions, with the prompt prefix's keys and values hoisted out of the per-call graphs.

Eager twin: ``Showo2.forward`` over the whole batch, which recomputes the prompt's keys and values in every call
although the omni mask keeps them independent of the latents.

Row m of a generation batch holds the prompt's text at positions [0, offset_m), the image slot (time token and image
tokens) at [offset_m, offset_m + S), and, in a row shorter than the batch, trailing positions. A call's result (the
velocity) is read from the slot alone, and under the omni mask the text attends to text alone (causal), so the
text's hidden states, and every attention's keys and values over it, are the same on every call of one image. The
captured forward is split into two graphs:

    prefix graph  (once per image and layer variant)   the forward over the first P = L - S positions, without the
                  slot's write; returns each masked attention's keys and values (M, kv_heads, P, d)
    slot graph    (every call)                          the forward over the S slot positions of each row

    captured forward (length L)                         slot graph (length S)
    x = embed(tokens).scatter(1, slot_index, slot)      x = slot                                    (M, S, H)
    q * cos, k * sin          (tables (L, d))           q * cos[positions], ...   positions = offsets + arange(S)
    sdpa(q, k, v, mask (M, 1, L, L))                    sdpa(q, cat(pk, k), cat(pv, v), slot_mask (M, 1, S, P + S))
    h.view(M, L, ...)                                   h.view(M, S, ...)
    where(in_slot (M, L, 1), a, b) + h                  where(...) read at positions + h
    v.gather(1, absolute index)                         v.gather(1, index - offsets)

Exact: each slot query sees the same keys under the same mask; the prefix buffer's columns at or past a row's own
offset (a shorter row's slot) are blocked, and a blocked key adds exp(-inf) = 0. The prefix's values equal the full
forward's only when no text position attends to its row's slot or beyond: ``prefix_is_causal`` checks a batch's mask
(the executor, once per image). The rewrite is structural: every value computed from the slot must be read at the
slot's positions, and a slot value may combine with a value of the batch length only through the rules above (a
per-position table, a per-row (M, L, ...) tensor, the mask, an absolute gather index); anything else, a graph without
the slot's write, or one whose fake-tensor propagation fails, is refused and stays exact, with a warning.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, fx

from passes.graph_utils import (
    DERIVED_BY,
    SOURCE,
    captured_value,
    mark_glue,
    output_node,
    placeholder,
    placeholders,
    propagate_fake,
)
from passes.head_cache import HEAD_CACHE_INPUT
from passes.layer_skipping import image_block_importance_of

TOKENS, OFFSETS, MASK = "l_tokens_", "l_offsets_", "l_mask_"
PREFIX_K, PREFIX_V = "prefix_k_", "prefix_v_"
PASS_NAME = "prefix_hoisting"
_SDPA = torch._C._nn.scaled_dot_product_attention
_SIZED_METHODS = ("view", "reshape", "expand")


# ---- what the rewritten graphs call (traced into the compiled parts) ------------------------------------------
def slot_positions(offsets: Tensor, slot_len: int) -> Tensor:
    """(M,) slot starts -> (M, S) int64: each row's slot positions in the batch."""
    return offsets[:, None] + torch.arange(slot_len, device=offsets.device)


def rows_at(x: Tensor, positions: Tensor) -> Tensor:
    """(M, L, *rest) -> (M, S, *rest): each row's values at its own ``positions`` (M, S)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


def table_at(table: Tensor, positions: Tensor) -> Tensor:
    """A per-position table (L, d) (RoPE's cos or sin) -> (M, 1, S, d), broadcasting over the heads."""
    return table[positions].unsqueeze(1)


def slot_mask(mask: Tensor, positions: Tensor, offsets: Tensor) -> Tensor:
    """bool (M, 1, L, L) -> (M, 1, S, P + S): the slot rows of ``mask`` over the prefix buffer's P = L - S columns
    (those at or past the row's own offset blocked) and over the row's slot."""
    m, s = positions.shape
    length = mask.shape[-1]
    rows = mask.gather(2, positions[:, None, :, None].expand(m, 1, s, length))
    own_text = torch.arange(length - s, device=mask.device)[None, :] < offsets[:, None]  # (M, P)
    prefix = rows[..., : length - s] & own_text[:, None, None, :]
    return torch.cat([prefix, rows.gather(3, positions[:, None, None, :].expand(m, 1, s, s))], dim=-1)


def relative_index(index: Tensor, offsets: Tensor) -> Tensor:
    """Batch positions (M, ...) -> the same positions counted from each row's slot start."""
    return index - offsets.view(-1, *([1] * (index.dim() - 1)))


def with_prefix(prefix: Tensor, slot: Tensor) -> Tensor:
    """Keys or values (M, kv_heads, P, d) of the prefix, then the slot's (M, kv_heads, S, d)."""
    return torch.cat([prefix, slot], dim=2)


def prefix_is_causal(mask: Tensor, offsets: Tensor) -> bool:
    """Whether no position before its row's slot attends to the slot or past it (the prefix graph's premise).
    mask: bool (M, 1, L, L); offsets (M,)."""
    pos = torch.arange(mask.shape[-1], device=mask.device)
    text = pos[None, :] < offsets[:, None]  # (M, L)
    return not bool((mask[:, 0] & text[:, :, None] & ~text[:, None, :]).any())


# ---- the passes --------------------------------------------------------------------------------------------------
def attention_name(node: fx.Node) -> str:
    """A masked attention's name: the captured node it computes (stable across the variants of one graph)."""
    source = node.meta.get(SOURCE)
    return source if isinstance(source, str) else node.name


def hoist_prefix_kv(gm: fx.GraphModule) -> list[str]:
    """Make ``gm`` the prefix graph: the slot's write removed, and its outputs the keys and values of every masked
    attention, (k, v) per attention in graph order. Call it with the batch cut to the prefix (tokens (M, P), mask
    (M, 1, P, P), the length P). Returns the attentions' names ([]: unchanged, with a warning)."""
    write = _slot_write(gm)
    attentions = _masked_attentions(gm)
    if write is None or not attentions:
        _refuse("no slot write (embeddings.scatter(1, index, slot)) or no attention under the mask")
        return []
    write.replace_all_uses_with(write.args[0])
    outputs = []
    for node in attentions:
        for value in node.args[1:3]:
            # contiguous: one layout for every attention's buffers, so the slot graph's parts that read them (every
            # decoder layer, every head block) share one compiled artifact whatever part produced them
            with gm.graph.inserting_after(value):
                outputs.append(_glue(gm.graph.call_method("contiguous", (value,)), node))
    output_node(gm.graph).args = (tuple(outputs),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return [attention_name(node) for node in attentions]


def attend_slots_only(gm: fx.GraphModule, slot_len: int) -> list[str] | None:
    """Make ``gm`` the slot graph (see the module docstring): its inputs gain, after the others, the prefix keys and
    values of each masked attention (``prefix_k_<name>``, ``prefix_v_<name>``, (M, kv_heads, P, d), P = L - S); a
    head output it stores or reads is (M, S, D). Returns the attentions' names in input order ([] for a graph
    without attention, e.g. a head-cache reuse), or None when refused (``gm`` unchanged, with a warning)."""
    work = copy.deepcopy(gm)
    try:
        names = _rewrite(work, slot_len)
        _propagate(work)
    except _Refused as why:
        _refuse(str(why))
        return None
    gm.graph = work.graph
    gm.recompile()
    return names


class _Refused(Exception):
    pass


def _slot_write(gm: fx.GraphModule) -> fx.Node | None:
    """``embeddings.scatter(1, index, slot)``: where the forward writes the slot into the token embeddings."""
    writes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "scatter" and len(n.args) == 4
              and n.args[1] == 1 and isinstance(n.args[3], fx.Node)]
    return writes[0] if len(writes) == 1 else None


def _masked_attentions(gm: fx.GraphModule) -> list[fx.Node]:
    mask = placeholder(gm, MASK)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA and mask is not None
            and n.kwargs.get("attn_mask") is mask and len(n.args) == 3]


def _rewrite(gm: fx.GraphModule, slot_len: int) -> list[str]:
    graph = gm.graph
    offsets, mask, tokens = (placeholder(gm, name) for name in (OFFSETS, MASK, TOKENS))
    cache = placeholder(gm, HEAD_CACHE_INPUT)
    write = _slot_write(gm)
    if offsets is None or tokens is None or (write is None and cache is None):
        raise _Refused("no offsets or tokens input, or no slot (neither the slot's write nor a head-cache input)")
    length = captured_value(tokens).shape[1]
    if not _is_symbol(length):
        raise _Refused(f"the batch length {length} is not a symbol of the capture (mark it dynamic)")
    symbols = length.node.expr.free_symbols
    if len(symbols) != 1:
        raise _Refused(f"the batch length {length} is not one symbol of the capture (a pass tied it to a value)")
    symbol = next(iter(symbols))

    def has_symbol(sizes: tuple) -> bool:
        return any(_is_symbol(s) and symbol in s.node.expr.free_symbols for s in sizes)

    def has_length(node: object) -> bool:
        value = captured_value(node)
        return has_symbol(tuple(value.shape) if isinstance(value, Tensor) else (value,))

    with graph.inserting_after(placeholders(gm)[-1]):
        positions = _glue(graph.call_function(slot_positions, (offsets, slot_len)))
    with graph.inserting_after(positions):
        zero_offsets = _glue(graph.call_function(torch.zeros_like, (offsets,)))
    slot: set[fx.Node] = set() if cache is None else {cache}
    if write is not None:
        write.replace_all_uses_with(write.args[3])
        slot.add(write.args[3])
    converted: dict[fx.Node, fx.Node] = {}
    new_mask: fx.Node | None = None
    attentions: list[fx.Node] = []

    def convert(arg: fx.Node, user: fx.Node) -> fx.Node:
        """``arg`` (of the batch length) as ``user``'s slot computation reads it."""
        if arg in converted:
            return converted[arg]
        shape = tuple(captured_value(arg).shape)
        batch = captured_value(user).shape[0] if isinstance(captured_value(user), Tensor) else None
        if len(shape) == 2 and has_length(arg) and _is_length(shape[0], symbol) and not has_symbol(shape[1:]):
            fn = table_at  # a per-position table, read by a (M, heads, S, d) value
            if captured_value(user).dim() != 4:
                raise _Refused(f"node {user.name} reads the per-position table {arg.name} outside attention heads")
        elif len(shape) >= 2 and shape[0] == batch and _is_length(shape[1], symbol) and not has_symbol(shape[2:]):
            fn = rows_at
        else:
            raise _Refused(f"node {user.name} reads {arg.name} of shape {shape} with the batch length")
        with graph.inserting_after(arg):
            converted[arg] = _glue(graph.call_function(fn, (arg, positions)), arg)
        return converted[arg]

    for node in list(graph.nodes):
        if node.op in ("placeholder", "output") or node in converted.values() or node in (positions, zero_offsets):
            continue
        if not any(a in slot for a in node.all_input_nodes):
            continue
        slot.add(node)
        if node.op == "call_function" and node.target is _SDPA and node.kwargs.get("attn_mask") is mask \
                and mask is not None:
            if new_mask is None:
                with graph.inserting_after(zero_offsets):
                    new_mask = _glue(graph.call_function(slot_mask, (mask, positions, offsets)))
            q, k, v = node.args
            name = attention_name(node)
            keys = []
            for prefix, value in ((PREFIX_K, k), (PREFIX_V, v)):
                with graph.inserting_after(placeholders(gm)[-1]):
                    buffer = graph.placeholder(f"{prefix}{name}")
                buffer.meta[DERIVED_BY] = PASS_NAME
                buffer.meta["example_value"] = _prefix_value(captured_value(value), slot_len)
                with graph.inserting_before(node):
                    keys.append(_glue(graph.call_function(with_prefix, (buffer, value)), node))
            node.args = (q, *keys)
            node.kwargs = {**node.kwargs, "attn_mask": new_mask}
            attentions.append(node)
            continue
        if node.op == "call_method" and node.target == "gather" and node.args[0] in slot:
            with graph.inserting_before(node):
                index = _glue(graph.call_function(relative_index, (node.args[2], offsets)), node)
            node.args = (node.args[0], node.args[1], index)
            continue
        if node.op == "call_function" and node.target is image_block_importance_of:
            node.args = (node.args[0], node.args[1], zero_offsets, *node.args[3:])
            continue
        if node.op == "call_method" and node.target in _SIZED_METHODS:
            node.args = tuple(slot_len if isinstance(a, fx.Node) and a not in slot and has_length(a)
                              and not isinstance(captured_value(a), Tensor) else a for a in node.args)
        for arg in node.all_input_nodes:
            if arg not in slot and has_length(arg):
                if not isinstance(captured_value(arg), Tensor):
                    raise _Refused(f"node {node.name} reads the batch length {arg.name}")
                node.replace_input_with(arg, convert(arg, node))
    results = output_node(graph).all_input_nodes
    stray = [n.name for n in results if n not in slot and has_length(n)]
    if stray:
        raise _Refused(f"outputs {stray} keep the batch length")
    if cache is not None:
        value = captured_value(cache)
        cache.meta["example_value"] = value.new_empty((value.shape[0], slot_len, *value.shape[2:]))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return [attention_name(n) for n in attentions]


def _is_symbol(size: object) -> bool:
    return isinstance(size, torch.SymInt) and not size.node.is_constant()


def _is_length(size: object, symbol: object) -> bool:
    return _is_symbol(size) and size.node.expr == symbol


def _prefix_value(value: Tensor, slot_len: int) -> Tensor:
    """A fake (M, kv_heads, P, d) for keys of fake shape (M, kv_heads, L, d): P = L - S."""
    return value.narrow(2, 0, value.shape[2] - slot_len).clone()


def _glue(node: fx.Node, neighbour: fx.Node | None = None) -> fx.Node:
    return mark_glue(node, PASS_NAME, neighbour)


def _propagate(gm: fx.GraphModule) -> None:
    """Run the rewritten graph on its fake inputs; every node's example value becomes the new one."""
    try:
        propagate_fake(gm)
    except LookupError as error:
        raise _Refused(str(error)) from error
    except Exception as error:  # noqa: BLE001 - any failure means the slot graph does not hold together
        raise _Refused(f"the slot graph does not run ({type(error).__name__}: {error})") from error
    for node in gm.graph.nodes:
        if node.op != "placeholder" and "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def _refuse(why: str) -> None:
    warnings.warn(f"prefix_hoisting: {why}; the graph stays exact", stacklevel=3)

