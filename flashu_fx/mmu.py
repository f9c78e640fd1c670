"""Eager understanding: image latents + question -> prefill with the omni mask -> greedy/sampled decoding.

``kv_cache=True`` prefills once into static per-layer caches and decodes one token per call;
``kv_cache=False`` is upstream's ``mmu_generate``: every new token re-runs the LLM over the whole sequence
and computes logits for every position (the comparison baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flashu_fx.config import Showo2Config
from flashu_fx.inputs import question_ids
from flashu_fx.layout import MmuPrompt, build_mmu_prompt, mark_length_dynamic
from flashu_fx.masks import additive_mask, omni_mask
from flashu_fx.model import Showo2
from flashu_fx.shapes import round_up
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer
from flashu_fx.und_cache import UndCache


@dataclass
class Answer:
    ids: list[int]  # generated ids, the stop token included when reached
    text: str


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """logits (V,): greedy when temperature == 0 (or top_k == 1), else top-k sampling."""
    if temperature == 0 or top_k == 1:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def check_image_latents(cfg: Showo2Config, latents: Tensor) -> None:
    """One image's VAE latents must be (1, C, h, w) with the model's channels and latent grid (its prompt holds
    exactly ``cfg.num_image_tokens`` image positions); raises naming both shapes."""
    expected = (1, cfg.latent_channels, *cfg.latent_size)
    if not isinstance(latents, Tensor) or tuple(latents.shape) != expected:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be {expected} for one image of this model ((1, C, h, w) with C = "
                         f"latent_channels and (h, w) = latent_size, the {cfg.image_grid} patch grid), got {got}")


def prompt_embeddings(model: Showo2, latents: Tensor, prompt: MmuPrompt) -> Tensor:
    """Embeddings (1, L0, H) of the prompt with the image slot filled; the image is clean (t = 1)."""
    device = latents.device
    return model.embed_prompt(prompt.tokens.to(device), torch.tensor([prompt.offset], device=device), latents)


def cache_length(positions: int) -> int:
    """Static cache length for ``positions`` tokens, rounded up to a multiple of 16 (the extra slots stay masked).

    The mask rows a decode step slices out of the (L, L) mask then start on 16-element boundaries: CUDA's
    memory-efficient attention read an unaligned bf16 mask row as a misaligned address (H200, a 181-slot cache).
    """
    return round_up(positions, 16)


@torch.no_grad()
def answer_question(
    model: Showo2,
    latents: Tensor,
    question: str | list[int],
    tokenizer: TextTokenizer | None = None,
    max_new_tokens: int = 300,
    kv_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = 1,
    seed: int = 0,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> Answer:
    """Answer ``question`` about one image given as VAE latents (1, C, h, w).

    ``model`` may be ``torch.compile(showo2, backend=flashu_backend("und"))``: with ``kv_cache`` every call is a
    model call (``Showo2.understand``), so the prefill and the decode step are what Dynamo captures.
    """
    check_image_latents(model.config, latents)
    cfg = model.config
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question_ids(cfg, question, tok))
    gen = torch.Generator().manual_seed(seed)
    step = lambda logits: next_token(logits, temperature, top_k, gen)
    if kv_cache:
        greedy = temperature == 0 or top_k == 1
        ids = decode_cached(model, latents, prompt, max_new_tokens, None if greedy else step, stop_at_eos, progress)
    else:
        x = prompt_embeddings(model, latents, prompt)
        ids = decode_uncached(model, x, prompt, max_new_tokens, step, stop_at_eos, progress)
    return Answer(ids, tok.decode(ids))


def all_position_logits(lm_head: nn.Linear, hidden: Tensor) -> Tensor:
    """lm_head over every position, (B, L, H) -> (B, L, V): what upstream's ``mmu_generate`` computes per token.

    On CUDA the vocabulary is split at the largest multiple of 16 (two products and one concatenation; the
    same logits for the same FLOPs). With Show-o2's V = 151669 one product over all rows has unaligned output
    rows and cuBLAS falls back to an sm75 kernel (9.98 ms per token at 7B, 780 positions; writing into
    16-aligned padded rows did not change its choice). The anchors cannot have paid that: their 27.8 ms per
    token at 7B is less than our other work per token (about 24.8 ms) plus 10 ms. The CPU keeps one product.
    """
    weight, vocab = lm_head.weight, lm_head.weight.shape[0]
    split = vocab // 16 * 16
    if hidden.device.type != "cuda" or lm_head.bias is not None or split in (0, vocab):
        return lm_head(hidden)
    return torch.cat([F.linear(hidden, weight[:split]), F.linear(hidden, weight[split:])], dim=-1)


def decode_cached(model, latents, prompt, max_new_tokens, step: Callable[[Tensor], int] | None, stop_at_eos,
                  progress, cache: UndCache | None = None,
                  decode_context: Callable[[int], AbstractContextManager] | None = None) -> list[int]:
    """The prefill into a static cache, then one model call per token (gpt-fast's loop; ``Showo2.understand``).

    ``step``: logits (V,) -> the next id; None: greedy, chosen on the device, and each id is read on the host while
    the next step already runs (``greedy_on_device``). ``cache``: an ``UndCache`` of capacity >= L0 +
    max_new_tokens to reuse (emptied first); None: a new one. ``decode_context``: decode step i (0-based) runs
    inside ``decode_context(i)`` (a compiled caller's ``flashu_fx.compiled.repeat_calls.loop_call``).
    """
    cfg, device, n0 = model.config, latents.device, prompt.tokens.shape[1]
    if cache is None:
        dtype = model.showo.model.embed_tokens.weight.dtype
        cache = UndCache.for_model(model, cache_length(n0 + max_new_tokens), dtype, device)
    elif cache.capacity < n0 + max_new_tokens:
        raise ValueError(f"cache capacity {cache.capacity} is invalid: the prompt ({n0}) and max_new_tokens="
                         f"{max_new_tokens} need at least {n0 + max_new_tokens} slots")
    cache.reset()
    offsets = torch.tensor([prompt.offset], device=device)
    tokens, mask = prompt.tokens.to(device), prompt.mask(cfg).to(device)
    mark_length_dynamic(tokens, mask)
    logits = model(tokens, latents, None, offsets, mask, cache=cache).logits

    def decode(token: Tensor, i: int) -> Tensor:
        with nullcontext() if decode_context is None else decode_context(i):
            return model(token, None, None, None, None, cache=cache).logits

    if step is None:
        return greedy_on_device(decode, logits, max_new_tokens, cfg.specials.eos if stop_at_eos else None, progress)
    ids = [step(logits[0, -1])]
    token = torch.empty(1, 1, dtype=torch.long, device=device)
    for i in tqdm(range(max_new_tokens - 1), desc="decoding", disable=not progress, leave=False):
        if stop_at_eos and ids[-1] == cfg.specials.eos:
            break
        ids.append(step(decode(token.fill_(ids[-1]), i)[0, -1]))
    return ids


def greedy_on_device(decode: Callable[[Tensor, int], Tensor], logits: Tensor, max_new_tokens: int, eos: int | None,
                     progress: bool) -> list[int]:
    """Greedy decoding with the host one step behind (``read_one_step_behind``): each new id is chosen on the
    device and fed to the next step there. Same ids as ``next_token``'s greedy loop.

    decode(token (1, 1), i) -> the logits (1, 1, V) of decode step i; logits: the prefill's (1, 1, V).
    """
    first = logits[0, -1].argmax().view(1, 1)
    return read_one_step_behind(lambda token, i: decode(token, i)[0, -1].argmax().view(1, 1), first, max_new_tokens,
                                eos, progress)


def read_one_step_behind(next_id: Callable[[Tensor, int], Tensor], first: Tensor, max_new_tokens: int,
                         eos: int | None, progress: bool) -> list[int]:
    """Run decode steps whose ids stay on the device, the host reading id i (for the stop check) while step i + 1
    already runs: the host's work per step (the call, a compiled model's guards, a graph launch) overlaps the
    device's instead of adding to it. Without a stop token nothing is read until the end. After a stop token one
    extra step has run; its id is dropped.

    next_id(id (1, 1) of step i, i) runs decode step i and returns its new id (1, 1), a tensor of its own (not a
    buffer the next step overwrites); first: the prefill's id (1, 1). -> the ids, the stop token included.
    """
    chosen = [first]
    pinned = first.is_cuda
    host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=pinned)
    read = torch.cuda.Event() if pinned else None  # marks where id i's copy to the host ends in the stream
    for i in tqdm(range(max_new_tokens - 1), desc="decoding", disable=not progress, leave=False):
        if eos is not None:
            host[i : i + 1].copy_(chosen[i].view(1), non_blocking=pinned)
            if read is not None:
                read.record()
        chosen.append(next_id(chosen[i], i))
        if eos is not None:
            if read is not None:
                read.synchronize()  # id i only: step i + 1 keeps the device busy meanwhile
            if int(host[i]) == eos:
                return host[: i + 1].tolist()
    return torch.cat(chosen).view(-1).tolist()


def decode_uncached(model, x, prompt, max_new_tokens, step, stop_at_eos, progress) -> list[int]:
    """Upstream's ``mmu_generate``: every token re-runs the whole LLM over the whole sequence and computes the
    logits of every position (only the last is used).

    Upstream's growing mask equals the omni mask of the longer sequence (the new rows are causal), so every
    step's mask is the top-left corner of one additive mask made once for the longest sequence; the RoPE tables
    likewise. Upstream grows its mask with a few concatenations per token; either is a few microseconds.
    """
    cfg, device, n0 = model.config, x.device, x.shape[1]
    n_max = n0 + max_new_tokens - 1  # the longest sequence a step runs over
    cos_all, sin_all, _, _ = model.rope(n_max, x.dtype, device)
    block = torch.tensor([prompt.block_offset], device=device)
    mask = additive_mask(omni_mask(block, n_max, cfg.image_slot_len), x.dtype)
    token = torch.empty(1, 1, dtype=torch.long, device=device)
    ids: list[int] = []
    for i in tqdm(range(max_new_tokens), desc="decoding", disable=not progress, leave=False):
        n = x.shape[1]
        hidden = model.showo(x, cos_all[:n], sin_all[:n], mask[:, :, :n, :n])
        ids.append(step(all_position_logits(model.showo.lm_head, hidden)[0, -1]))
        if (stop_at_eos and ids[-1] == cfg.specials.eos) or i + 1 == max_new_tokens:
            break
        x = torch.cat([x, model.showo.model.embed_tokens(token.fill_(ids[-1]))], dim=1)
    return ids
