"""Checks of the user-facing inputs, shared by every pipeline (eager, eager FlashU, compiled).

Each check lives here once, so a bad value raises the same error on every path, naming the argument, its
value and what is allowed, before any model call (on the compiled path: before anything is traced).

>>> from flashu_fx.config import get_config
>>> prompt_ids(get_config("tiny"), "a red cube", None)
Traceback (most recent call last):
...
TypeError: prompts='a red cube' is a single string: allowed a list of prompts (strings or token-id lists), \
e.g. ['a red cube']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from flashu_fx.config import Showo2Config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer

REPR_LIMIT = 60  # characters of a value shown in a message


def shown(value: Any) -> str:
    """``repr(value)``, cut to ``REPR_LIMIT`` characters: a long prompt must not flood the message."""
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


# ---- generation --------------------------------------------------------------------------------------
def check_prompts(prompts: Any) -> None:
    """``prompts`` must be a list (or tuple) of prompts, each a non-empty string or a non-empty token-id list."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts={shown(prompts)} is a single string: allowed a list of prompts (strings or "
                        f"token-id lists), e.g. [{shown(prompts)}]")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts={shown(prompts)} is invalid: allowed a list of prompts (strings or token-id lists)")
    if len(prompts) == 0:
        raise ValueError("prompts=[] is invalid: allowed a list of at least one prompt")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompts[{i}]={shown(prompt)} is empty: allowed a non-empty string or token-id list")
        elif not isinstance(prompt, Sequence) or not all(is_int(t) for t in prompt):
            raise TypeError(f"prompts[{i}]={shown(prompt)} is invalid: allowed a string or a list of token ids "
                            "(one prompt given as ids is [[5, 6, 7]], not [5, 6, 7])")


def check_prompt_ids(cfg: Showo2Config, ids: Sequence[Sequence[int]], allow_empty: bool = False) -> None:
    """Every prompt's ids: 1..``cfg.max_text_len`` of them (0 too with ``allow_empty``), each in [0, vocab)."""
    for i, prompt in enumerate(ids):
        if not prompt and not allow_empty:
            raise ValueError(f"prompts[{i}] is empty (0 tokens): allowed 1..{cfg.max_text_len} tokens")
        if len(prompt) > cfg.max_text_len:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens, more than the budget config.max_text_len="
                             f"{cfg.max_text_len} (the model's text positions): shorten it")
        if prompt and not 0 <= min(prompt) <= max(prompt) < cfg.vocab_size:
            raise ValueError(f"prompts[{i}] ids must lie in [0, {cfg.vocab_size}), got {min(prompt)}..{max(prompt)}")


def prompt_ids(cfg: Showo2Config, prompts: Any, tokenizer: TextTokenizer | None) -> list[list[int]]:
    """Checked token ids of every prompt (strings encoded with ``tokenizer``, or the byte fallback)."""
    check_prompts(prompts)
    tok = tokenizer or get_tokenizer(cfg)
    ids = [tok.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    check_prompt_ids(cfg, ids)
    return ids


def check_guidance_scale(name: str, value: Any) -> None:
    """One classifier-free guidance scale: a finite number >= 0 (0 = no guidance)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name}={shown(value)} is invalid: allowed a finite number >= 0 (0 = no guidance)")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: allowed a finite number >= 0 (0 = no guidance)")


def check_guidance(guidance: Any, per_call: bool) -> None:
    """``guidance``: one scale, or with ``per_call`` one scale per model call; every scale finite and >= 0.

    Each value of a sequence is checked first, so a NaN in it reads the same on every path; then a path that
    plans its own per-call scales (FlashU: ``FlashUConfig.guidance_schedule``) refuses the sequence."""
    if isinstance(guidance, Sequence) and not isinstance(guidance, str):
        for i, value in enumerate(guidance):
            check_guidance_scale(f"guidance[{i}]", value)
        if not per_call:
            raise TypeError(f"guidance={shown(guidance)} is invalid here: allowed one number; this path sets each "
                            "call's scale from it (FlashUConfig.guidance_schedule)")
        return
    check_guidance_scale("guidance", guidance)


def check_baseline_steps(steps: Any, config: FlashUConfig | None, name: str = "baseline_steps") -> None:
    """Grid points of the plain sampler: at least 2 (one model call); with a FlashU ``config`` enough that its
    shorter grid, ``config.num_points(steps)``, still has 2 points."""
    minimum = 2 if config is None else config.min_baseline_points()
    if is_int(steps) and steps >= minimum:
        return
    why = "grid points; model calls = points - 1" if config is None else (
        f"baseline grid points; FlashU runs round({config.step_fraction} * {name}) of them, at least 2")
    raise ValueError(f"{name}={shown(steps)} is invalid: allowed an integer >= {minimum} ({why})")


# ---- understanding -----------------------------------------------------------------------------------
def question_ids(cfg: Showo2Config, question: Any, tokenizer: TextTokenizer) -> list[int]:
    """Checked token ids of a question: a non-empty string or a non-empty token-id list, ids in [0, vocab)."""
    if isinstance(question, str):
        ids = tokenizer.encode(question) if question.strip() else []
    elif isinstance(question, Sequence) and all(is_int(t) for t in question):
        ids = [int(t) for t in question]
    else:
        raise TypeError(f"question={shown(question)} is invalid: allowed a string or a list of token ids")
    if not ids:
        raise ValueError(f"question={shown(question)} is empty: allowed a non-empty string or token-id list")
    if not 0 <= min(ids) <= max(ids) < cfg.vocab_size:
        raise ValueError(f"question ids must lie in [0, {cfg.vocab_size}), got {min(ids)}..{max(ids)}")
    return ids
