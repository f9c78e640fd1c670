"""Dynamo's guards on the calls of a sampling or decoding loop that repeat the loop's first call.

Every call of ``torch.compile(model)`` first evaluates the guards of its captured graphs: at Show-o2 size several
thousand checks over the modules, ~500 parameters and the cache buffers (about 1 ms of host time per call on a
2-core CPU at 28 layers), paid per denoising call and per new token. Inside one image's Euler loop or one
answer's decode loop every call after the first passes the same model, the same buffers and inputs of the same
shapes, dtypes and strides; only values change, and guards never read values. So the first call of a loop runs
every guard, and the rest run only the guards that tell the captured graphs apart (prefill from decode step),
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` scoped to the call. A new model, cache or shape starts
a new loop, whose first call is fully guarded again.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def loop_call(index: int) -> AbstractContextManager:
    """The context of call ``index`` (0-based) of a loop over a compiled model; see the module docstring."""
    if index < 0:
        raise ValueError(f"index={index} is invalid: allowed an integer >= 0")
    return nullcontext() if index == 0 else torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def full_guards() -> AbstractContextManager:
    """Every guard evaluated again, whatever the caller's stance: around code that calls ``torch.compile``d
    functions of its own (the executors' parts compiled for varying lengths), whose first use may come on a
    repeated call and must compile rather than fail."""
    return torch.compiler.set_stance("default")
