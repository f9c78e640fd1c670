"""Physically sliced FFNs for both tasks from ONE permuted copy of the weights (zero extra memory).

Per layer, with G the neurons generation keeps and U the ones understanding keeps, the intermediate axis
is permuted to

    [ G \\ U | G & U | U \\ G | neither ]
    |<---- gen: width g ---->|
             |<--- und: width u --->|

so each task's pruned FFN is ONE contiguous range of a uniform width (g or u in every layer; only the
start of und's range varies by layer). SwiGLU is a sum over neurons, so permuting gate/up rows and down
columns together leaves the full FFN unchanged, and a range is a dense matmul on a view of the storage.
The eager twin of a range is the FFN with the other neurons' activations masked to zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flashu_fx.model import Showo2
from flashu_fx.qwen2 import NeuronRanges


@dataclass(frozen=True)
class FFNLayout:
    """order: (layers, I) int64 permutation (new position -> old neuron); ranges[task][layer] = (lo, hi).

    ``signature``: probes of the permuted weights (``weight_signature``), set by ``prepare_pruned_model`` so that
    a model that was not permuted this way (another copy, reloaded weights) is refused instead of pruned at the
    wrong neurons; None skips the check."""

    order: Tensor
    ranges: dict[str, tuple[tuple[int, int], ...]]
    signature: Tensor | None = None
    # Weights already found to match, by (address, version) of each W_down: checks run per request.
    _verified: set = field(default_factory=set, init=False, repr=False, compare=False)

    def task_ranges(self, task: str, layer: int) -> NeuronRanges | None:
        """The neuron ranges of ``task`` at ``layer`` for Qwen2MLP.forward; None when the task is unpruned."""
        if task not in self.ranges:
            return None
        return (self.ranges[task][layer],)


def top_k_mask(scores: Tensor, keep: int) -> Tensor:
    """bool (layers, I): the ``keep`` highest scores per layer (ties to the lower index)."""
    idx = torch.sort(-scores.float(), dim=-1, stable=True).indices[:, :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def build_ffn_layout(keep: dict[str, Tensor]) -> FFNLayout:
    """keep: task -> bool (layers, I) kept neurons (one or two tasks; each task keeps the same count per layer)."""
    if not 1 <= len(keep) <= 2:
        raise ValueError(f"build_ffn_layout takes one or two tasks, got {sorted(keep)}")
    tasks = sorted(keep)  # "gen" < "und": gen's range starts at 0
    masks = [keep[t] for t in tasks]
    shape = masks[0].shape
    for t, m in zip(tasks, masks, strict=True):
        if m.shape != shape or m.dtype != torch.bool:
            raise ValueError(f"keep[{t!r}] must be bool {tuple(shape)}, got {m.dtype} {tuple(m.shape)}")
        counts = m.sum(-1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"keep[{t!r}] keeps different neuron counts per layer: {counts.tolist()}")
    a = masks[0]
    b = masks[1] if len(masks) == 2 else torch.zeros_like(a)
    # Sort key per neuron: 0 = a only, 1 = both, 2 = b only, 3 = neither; stable keeps the old order inside.
    group = torch.where(a & ~b, 0, torch.where(a & b, 1, torch.where(b, 2, 3)))
    order = torch.sort(group, dim=-1, stable=True).indices
    a_only, both = (group == 0).sum(-1), (group == 1).sum(-1)
    ranges = {tasks[0]: tuple((0, int(x)) for x in a_only + both)}
    if len(tasks) == 2:
        width = int(masks[1][0].sum())
        ranges[tasks[1]] = tuple((int(lo), int(lo) + width) for lo in a_only)
    return FFNLayout(order, ranges)


@torch.no_grad()
def permute_ffn_weights(model: Showo2, order: Tensor) -> None:
    """Reorder every LLM FFN's neurons in place (exact: the full FFN computes the same function)."""
    for layer, perm in zip(model.showo.model.layers, order, strict=True):
        mlp = perm.to(layer.mlp.gate_proj.weight.device)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight.copy_(lin.weight[mlp])
        layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, mlp])


SIGNATURE_ROWS = 4  # rows of W_down probed per layer


def down_weights(model: Showo2) -> list[Tensor]:
    """Every LLM layer's W_down (H, I), in layer order: what ``weight_signature`` probes (``model``: a Show-o2,
    or the module torch.compile made of one)."""
    return [layer.mlp.down_proj.weight for layer in model.showo.model.layers]


@torch.no_grad()
def weight_signature(model: Showo2 | Sequence[Tensor], layout: FFNLayout) -> Tensor:
    """(layers, SIGNATURE_ROWS, 2) fp64 on the CPU: per layer, for the first rows of W_down over the layout's
    first task range, a fixed +-1 combination of the entries and the row's L2 norm. The combination depends on
    which neuron sits in which column, so another order moves it by about the norm; a dtype change moves it by
    ~2^-9 of it. ``model``: a Show-o2, or its W_down per layer (``down_weights``; a captured graph's inputs)."""
    weights = down_weights(model) if isinstance(model, torch.nn.Module) else list(model)
    probes = []
    for weight, (lo, hi) in zip(weights, layout.ranges[sorted(layout.ranges)[0]], strict=True):
        rows = weight[:SIGNATURE_ROWS, lo:hi].double()
        signs = torch.randint(0, 2, (hi - lo,), generator=torch.Generator().manual_seed(hi - lo)) * 2 - 1
        probes.append(torch.stack([rows @ signs.to(rows), rows.norm(dim=-1)], dim=-1))
    return torch.stack(probes).cpu()


def check_layout_matches(model: Showo2 | Sequence[Tensor], layout: FFNLayout) -> None:
    """Raise if ``model``'s FFN weights (a Show-o2, or its W_down per layer) are not the ones
    ``prepare_pruned_model`` permuted for ``layout``. Weights checked once are not probed again until they move or
    change in place (their version counter)."""
    if layout.signature is None or not layout.ranges:
        return
    weights = down_weights(model) if isinstance(model, torch.nn.Module) else list(model)
    try:
        key = tuple((w.data_ptr(), w._version) for w in weights)
    except RuntimeError:  # inference-mode tensors keep no version counter: check every time
        key = None
    if key is not None and key in layout._verified:
        return
    now = weight_signature(weights, layout)
    if now.shape != layout.signature.shape or bool(
        ((now[..., 0] - layout.signature[..., 0]).abs() > 0.05 * now[..., 1].clamp_min(1e-30)).any()
    ):
        raise ValueError(
            "the FFN layout does not match this model's weights: its FFN neurons are not in the layout's order. "
            "Call prepare_pruned_model on the model you run (it permutes that model in place), after loading "
            "its weights, and use the layout it returns"
        )
    if key is not None:
        layout._verified.add(key)
