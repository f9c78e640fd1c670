"""Recognise a Dynamo-captured Show-o2 forward and map its graph inputs back to checkpoint keys.

Dynamo lifts every parameter to a placeholder named after its module path
(``l_self_modules_showo_modules_model_modules_layers_modules_0_..._parameters_weight_``). Normalising
both that name and a state-dict key (drop the scaffolding words and separators, lower-case) pairs them.
A graph that is not a Show-o2 forward yields ``None`` with the reason, so the backend can fall back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

USER_INPUTS = ("tokens", "latents", "t", "offsets", "mask")


def _normalise_placeholder(name: str) -> str:
    name = re.sub(r"^l_(self_)?", "", name)
    name = re.sub(r"(modules|parameters|buffers)_", "", name)
    return name.replace("_", "").lower()


def normalise_key(key: str) -> str:
    """A state-dict key in the placeholder-comparable form."""
    return re.sub(r"[._]", "", key).lower()


@dataclass
class Showo2GraphMatch:
    param_inputs: dict[str, int]  # state-dict key -> graph input index
    user_inputs: dict[str, int]  # "tokens", "latents", ... -> graph input index
    num_outputs: int


def match_showo2_graph(gm: fx.GraphModule, expected_keys: list[str]) -> tuple[Showo2GraphMatch | None, str]:
    """Pair the graph's placeholders with ``expected_keys`` and the forward's user inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_norm = {_normalise_placeholder(n.name): i for i, n in enumerate(placeholders)}
    user = {}
    for name in USER_INPUTS:
        idx = by_norm.get(name)
        if idx is None:
            return None, f"graph has no input named {name!r} (not a Show-o2 generation forward)"
        user[name] = idx
    params, missing = {}, []
    for key in expected_keys:
        idx = by_norm.get(normalise_key(key))
        if idx is None:
            missing.append(key)
        else:
            params[key] = idx
    # The tied 1.5B lm_head is the embedding: Dynamo lifts one tensor once.
    if missing == ["showo.lm_head.weight"] and "showo.model.embed_tokens.weight" in params:
        params["showo.lm_head.weight"] = params["showo.model.embed_tokens.weight"]
        missing = []
    needed = [k for k in missing if not k.startswith("showo.lm_head")]
    if needed:
        shown = ", ".join(needed[:5]) + (f" (+{len(needed) - 5} more)" if len(needed) > 5 else "")
        return None, f"graph lacks Show-o2 parameters: {shown}"
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    return Showo2GraphMatch(params, user, len(outs) if isinstance(outs, (tuple, list)) else 1), ""
