"""Training rows of the testbed, in exactly the layouts the pipelines use at inference.

Generation row (one caption):  the ``build_gen_batch`` row: bos, caption, boi, [time, image], eoi, eos, pad ...
Understanding row (one QA):     the ``build_mmu_prompt`` prompt (the demo layout, block one after the time token),
                                then the answer words and eos, then pad; loss on the answer words and eos only.
Both are ``max_seq_len`` long, so one batch holds both kinds and one forward trains both tasks (Show-o2's joint
objective). A pool renders and tokenizes ``size`` examples once; batches are random draws from it on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashu_fx.config import Showo2Config
from flashu_fx.layout import build_mmu_prompt, gen_row
from flashu_fx.testbed import world
from flashu_fx.testbed.tokenizer import WordTokenizer

IGNORE = -100  # cross-entropy ignore index for positions without an answer target


@dataclass
class GenPool:
    """images: uint8 (N, S, S, 3); tokens: (N, L); offsets: (N,) slot starts; null_tokens: (L,) the CFG row."""

    images: Tensor
    tokens: Tensor
    offsets: Tensor
    null_tokens: Tensor


@dataclass
class UndPool:
    """images: uint8 (N, S, S, 3); tokens: (N, L); targets: (N, L) next-token ids or IGNORE; offsets: (N,) the
    time token; block_offsets: (N,) the start of the bidirectional block."""

    images: Tensor
    tokens: Tensor
    targets: Tensor
    offsets: Tensor
    block_offsets: Tensor


def _pad(row: list[int], cfg: Showo2Config, what: str) -> list[int]:
    if len(row) > cfg.max_seq_len:
        raise ValueError(f"a {what} row has {len(row)} tokens, more than max_seq_len={cfg.max_seq_len}")
    return row + [cfg.specials.pad] * (cfg.max_seq_len - len(row))


def build_gen_pool(cfg: Showo2Config, tok: WordTokenizer, rng: np.random.Generator, size: int,
                   chunk: int = 4096, progress: bool = True,
                   category_weights: Sequence[float] | None = None) -> GenPool:
    """``size`` captions with a scene that satisfies each, rendered and tokenized. ``category_weights``: how
    often each of ``world.CATEGORIES`` is drawn (None: uniform)."""
    images, tokens, offsets = [], [], []
    for start in tqdm(range(0, size, chunk), desc="rendering gen pool", disable=not progress, leave=False):
        prompts, imgs = world.training_batch_gen(rng, min(chunk, size - start), category_weights)
        images.append(torch.from_numpy(imgs))
        for p in prompts:
            ids = tok.encode(p.caption)
            if len(ids) > cfg.max_text_len:
                raise ValueError(f"caption {p.caption!r} has {len(ids)} tokens, budget {cfg.max_text_len}")
            tokens.append(gen_row(cfg, ids))
            offsets.append(len(ids) + 2)
    return GenPool(torch.cat(images), torch.tensor(tokens), torch.tensor(offsets), torch.tensor(gen_row(cfg, [])))


def build_und_pool(cfg: Showo2Config, tok: WordTokenizer, rng: np.random.Generator, size: int,
                   chunk: int = 4096, progress: bool = True) -> UndPool:
    """``size`` random scenes with one question each, the prompt + answer + eos as one row."""
    images, tokens, targets, offsets, blocks = [], [], [], [], []
    prompts: dict[str, tuple[list[int], int, int]] = {}  # question -> (prompt ids, offset, block offset)
    for start in tqdm(range(0, size, chunk), desc="rendering und pool", disable=not progress, leave=False):
        items, imgs = world.training_batch_und(rng, min(chunk, size - start))
        images.append(torch.from_numpy(imgs))
        for item in items:
            if item.question not in prompts:
                p = build_mmu_prompt(cfg, tok, item.question)
                prompts[item.question] = (p.tokens[0].tolist(), p.offset, p.block_offset)
            ids, offset, block = prompts[item.question]
            answer = [*tok.encode(item.answer), cfg.specials.eos]
            row = _pad(ids + answer, cfg, "understanding")
            target = [IGNORE] * len(row)
            for j, a in enumerate(answer):  # logits at position p predict the token at p + 1
                target[len(ids) - 1 + j] = a
            tokens.append(row)
            targets.append(target)
            offsets.append(offset)
            blocks.append(block)
    return UndPool(torch.cat(images), torch.tensor(tokens), torch.tensor(targets), torch.tensor(offsets),
                   torch.tensor(blocks))


def pool_to(pool, device) -> GenPool | UndPool:
    """The same pool with every tensor on ``device``."""
    return type(pool)(**{k: v.to(device) for k, v in vars(pool).items()})
