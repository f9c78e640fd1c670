"""Helpers shared by the passes: where a node comes from (its module path)."""

from __future__ import annotations

import re

from torch import fx

_SELF_PREFIX = re.compile(r"^L\['self'\]\.?|^L__self__\.?")


def module_path(node: fx.Node) -> str | None:
    """The innermost module that created ``node``, as a dotted path below the compiled root ("a.b.0.c")."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = _SELF_PREFIX.sub("", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules", "")

