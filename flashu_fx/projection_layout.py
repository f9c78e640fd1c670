"""Zero-copy weight layout that lets sibling projections run as one matmul.

Per attention module the q/k/v weights (and biases) are moved into one buffer, in that order; per
SwiGLU, gate then up:

    qkv buffer:     [ W_q (Nq, H) | W_k (Nk, H) | W_v (Nv, H) ]    -> one (Nq + Nk + Nv, H) matrix
    gate_up buffer: [ W_gate (I, H) | W_up (I, H) ]                 -> one (2I, H) matrix

Every parameter keeps its shape, strides and values (it becomes a view of the shared buffer) and its
old storage is freed, so no weight memory is added and eager code is unaffected. ``passes.merge_projections``
then rewrites the sibling linears of a compiled graph into one linear over the spanning view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from passes.merge_projections import PROJECTION_GROUPS, adjacent  # the pass defines what it can merge


@torch.no_grad()
def colocate(params: Sequence[Tensor]) -> bool:
    """Move ``params`` into one new buffer, in order (values, shapes and strides unchanged).
    Returns False (and changes nothing) when they are already adjacent or cannot share a buffer."""
    first = params[0]
    if adjacent(params) or any(p.dtype != first.dtype or p.device != first.device for p in params):
        return False  # mixed dtypes or devices cannot share a buffer: left as they are
    buffer = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        view = buffer[offset : offset + p.numel()].view(p.shape)
        view.copy_(p)
        p.data = view  # the Parameter object stays: modules, optimizers and state dicts keep pointing at it
        offset += p.numel()
    return True


def projection_groups(named: Mapping[str, Tensor]) -> list[list[Tensor]]:
    """Groups of sibling tensors to colocate, from state-dict style names: for each module path holding all
    of a group's projections, the weights, and (separately) the biases when every sibling has one."""
    groups: list[list[Tensor]] = []
    for leaves in PROJECTION_GROUPS:
        suffix = f".{leaves[0]}.weight"
        for key in named:
            if not key.endswith(suffix):
                continue
            parent = key[: -len(suffix)]
            for kind in ("weight", "bias"):
                members = [named.get(f"{parent}.{leaf}.{kind}") for leaf in leaves]
                if all(m is not None for m in members):
                    groups.append(members)
    return groups


def colocate_projections(named: Mapping[str, Tensor] | nn.Module) -> bool:
    """Lay out every q/k/v and gate/up group of a model (or of a name -> Parameter mapping) in shared
    buffers, in place (idempotent). Returns True when every group is adjacent afterwards: only then may one
    merged artifact serve all layers (``passes.merge_projections`` checks the layer it traces)."""
    if isinstance(named, nn.Module):
        named = dict(named.named_parameters(remove_duplicate=False))
    groups = projection_groups(named)
    for group in groups:
        colocate(group)
    return all(adjacent(group) for group in groups)
