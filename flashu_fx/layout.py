"""Sequence layouts of the two tasks (docs/SHOWO2.md §1.8 and §4.6), as token ids with an image slot.

Generation, one row:  bos, prompt (n), boi, [time, 729 image], eoi, eos, pad ... (L = max_seq_len)
Null row (CFG):       the same with n = 0. Rows: [cond ..., null ...]; slot offset = n + 2.
Understanding:        A = bos "system\\nYou are a helpful assistant." eos "\\n" bos "user\\n", then boi,
                      [time, 729 image], eoi, question, "\\n" bos "assistant\\n".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashu_fx.config import Showo2Config
from flashu_fx.inputs import check_prompt_ids
from flashu_fx.masks import omni_mask
from flashu_fx.shapes import round_up
from flashu_fx.tokenizer import TextTokenizer


@dataclass
class GenBatch:
    """The model batch of one group of prompts: rows [cond ..., null ...] when guided.

    tokens: (M, L) int64; offsets: (M,) slot start (time token); mask: bool (M, 1, L, L)
    """

    tokens: Tensor
    offsets: Tensor
    mask: Tensor
    num_prompts: int
    prompt_lens: list[int]

    @property
    def guided(self) -> bool:
        return self.tokens.shape[0] == 2 * self.num_prompts

    def through_last_slot(self, image_slot_len: int, multiple: int) -> GenBatch:
        """The batch cut after the latest-ending image slot, rounded up to ``multiple`` positions (at most L).

        Exact: the positions after every row's slot (eoi, eos, padding) come after the slot in the causal omni
        mask, so no slot row attends to them, and RoPE positions and the mask are a top-left corner of the full
        ones: the slot rows, and so the velocity, are the same. At Show-o2's 1024 positions a short prompt leaves
        about a quarter of them after the slot."""
        length = self.tokens.shape[1]
        keep = min(length, round_up(int(self.offsets.max()) + image_slot_len, multiple))
        return GenBatch(self.tokens[:, :keep], self.offsets, self.mask[:, :, :keep, :keep], self.num_prompts,
                        self.prompt_lens)

    def to(self, device) -> GenBatch:
        return GenBatch(
            self.tokens.to(device), self.offsets.to(device), self.mask.to(device), self.num_prompts, self.prompt_lens
        )


def gen_row(cfg: Showo2Config, prompt: list[int]) -> list[int]:
    """One generation row of exactly ``max_seq_len`` ids; a prompt longer than ``cfg.max_text_len`` raises
    (cutting it would generate an image of a different prompt)."""
    sp = cfg.specials
    if len(prompt) > cfg.max_text_len:
        raise ValueError(f"prompt has {len(prompt)} tokens, more than the budget config.max_text_len="
                         f"{cfg.max_text_len}")
    row = [sp.bos, *prompt, sp.boi, *([sp.img_pad] * cfg.image_slot_len), sp.eoi, sp.eos]
    return row + [sp.pad] * (cfg.max_seq_len - len(row))


def build_gen_batch(cfg: Showo2Config, prompts: list[list[int]], guided: bool = True) -> GenBatch:
    """Token ids of B prompts -> the (2B or B)-row batch with offsets and the omni mask.

    An empty prompt is allowed here (its row equals the null row); the pipelines refuse it."""
    if not prompts:
        raise ValueError("build_gen_batch needs at least one prompt")
    check_prompt_ids(cfg, prompts, allow_empty=True)
    lens = [len(p) for p in prompts]
    rows = [gen_row(cfg, p) for p in prompts]
    offsets = [n + 2 for n in lens]
    if guided:
        rows += [gen_row(cfg, [])] * len(prompts)
        offsets += [2] * len(prompts)
    off = torch.tensor(offsets)
    return GenBatch(torch.tensor(rows), off, omni_mask(off, cfg.max_seq_len, cfg.image_slot_len), len(prompts), lens)


def mark_length_dynamic(tokens: Tensor, mask: Tensor) -> None:
    """Give a batch's sequence length a symbol under torch.compile (no effect in eager): one capture then serves
    every length (an understanding prompt's, a generation batch cut after its last slot), and a pass that changes
    the row count after a layer (V-norm token pruning) finds the count later layers size their views with as that
    symbol. tokens: (M, L); mask: (M, 1, L, L).

    ``maybe_mark_dynamic``, not ``mark_dynamic``: the executors hand these same tensors to compiled parts that see
    the length as a specialised size on their first call (``make_part_compiler(dynamic_lengths=True)``), where a
    hard mark would be an error rather than a hint."""
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    torch._dynamo.maybe_mark_dynamic(mask, 2)
    torch._dynamo.maybe_mark_dynamic(mask, 3)

@dataclass
class MmuPrompt:
    """One understanding prompt. tokens: (1, L0); ``offset`` = the time token; ``block_offset`` = where the
    bidirectional block starts (upstream's demo puts it one later than training: docs/SHOWO2.md §4.7)."""

    tokens: Tensor
    offset: int
    block_offset: int

    def mask(self, cfg: Showo2Config) -> Tensor:
        """bool (1, 1, L0, L0) omni mask of the prompt."""
        return omni_mask(torch.tensor([self.block_offset]), self.tokens.shape[1], cfg.image_slot_len)


def build_mmu_prompt(
    cfg: Showo2Config, tokenizer: TextTokenizer, question: str | list[int], training_layout: bool = False
) -> MmuPrompt:
    """Upstream's ``inference_mmu.py`` prompt; ``training_layout=True`` puts the block on the time token."""
    sp, enc = cfg.specials, tokenizer.encode
    head = [sp.bos, *enc("system\nYou are a helpful assistant."), sp.eos, *enc("\n"), sp.bos, *enc("user\n")]
    q = enc(question) if isinstance(question, str) else list(question)
    if q and not 0 <= min(q) <= max(q) < cfg.vocab_size:
        raise ValueError(f"question ids must lie in [0, {cfg.vocab_size}), got {min(q)}..{max(q)}")
    ids = [*head, sp.boi, *([sp.img_pad] * cfg.image_slot_len), sp.eoi, *q, *enc("\n"), sp.bos, *enc("assistant\n")]
    offset = len(head) + 1
    return MmuPrompt(torch.tensor([ids]), offset, offset if training_layout else offset + 1)
