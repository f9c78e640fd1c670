"""Eager understanding: image latents + question -> prefill with the omni mask -> greedy/sampled decoding.

``kv_cache=True`` prefills once into static per-layer caches and decodes one token per call;
``kv_cache=False`` is upstream's ``mmu_generate``: every new token re-runs the LLM over the whole sequence
and computes logits for every position (the comparison baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashu_fx.layout import MmuPrompt, build_mmu_prompt
from flashu_fx.masks import decode_mask, omni_mask, pad_mask_to
from flashu_fx.model import Showo2
from flashu_fx.qwen2 import KVCache
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer


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


def prompt_embeddings(model: Showo2, latents: Tensor, prompt: MmuPrompt) -> Tensor:
    """Embeddings (1, L0, H) of the prompt with the image slot filled; the image is clean (t = 1)."""
    device = latents.device
    c = model.time_embeds(torch.ones(1, device=device))
    offsets = torch.tensor([prompt.offset], device=device)
    return model.embed_inputs(prompt.tokens.to(device), offsets, model.image_embeds(latents), c)


def make_kv_caches(model: Showo2, batch: int, max_len: int, dtype: torch.dtype, device) -> list[KVCache]:
    cfg = model.config
    return [KVCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, device) for _ in range(cfg.num_layers)]


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
    """Answer ``question`` about one image given as VAE latents (1, C, h, w)."""
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, C, h, w) for one image, got {tuple(latents.shape)}")
    cfg = model.config
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question)
    x = prompt_embeddings(model, latents, prompt)
    gen = torch.Generator().manual_seed(seed)
    step = lambda logits: next_token(logits, temperature, top_k, gen)
    decode = decode_cached if kv_cache else decode_uncached
    ids = decode(model, x, prompt, max_new_tokens, step, stop_at_eos, progress)
    return Answer(ids, tok.decode(ids))


def decode_cached(model, x, prompt, max_new_tokens, step, stop_at_eos, progress) -> list[int]:
    cfg, device, n0 = model.config, x.device, x.shape[1]
    max_len = n0 + max_new_tokens
    caches = make_kv_caches(model, 1, max_len, x.dtype, device)
    cos_all, sin_all, _, _ = model.rope(max_len, x.dtype, device)
    pos = torch.arange(n0, device=device)
    mask = pad_mask_to(prompt.mask(cfg).to(device), max_len)
    hidden = model.showo(x, cos_all[:n0], sin_all[:n0], mask, caches, pos)
    ids = [step(model.showo.lm_head(hidden[0, -1]))]
    for i in tqdm(range(1, max_new_tokens), desc="decoding", disable=not progress, leave=False):
        if stop_at_eos and ids[-1] == cfg.specials.eos:
            break
        pos = torch.tensor([n0 + i - 1], device=device)
        emb = model.showo.model.embed_tokens(torch.tensor([[ids[-1]]], device=device))
        hidden = model.showo(emb, cos_all[pos], sin_all[pos], decode_mask(pos, max_len), caches, pos)
        ids.append(step(model.showo.lm_head(hidden[0, -1])))
    return ids


def decode_uncached(model, x, prompt, max_new_tokens, step, stop_at_eos, progress) -> list[int]:
    cfg, device = model.config, x.device
    block = torch.tensor([prompt.block_offset], device=device)
    ids: list[int] = []
    for _ in tqdm(range(max_new_tokens), desc="decoding", disable=not progress, leave=False):
        n = x.shape[1]
        cos, sin, _, _ = model.rope(n, x.dtype, device)
        # Upstream's growing mask equals the omni mask of the longer sequence (new rows are causal).
        hidden = model.showo(x, cos, sin, omni_mask(block, n, cfg.image_slot_len))
        ids.append(step(model.showo.lm_head(hidden)[0, -1]))  # logits of every position, as upstream
        if stop_at_eos and ids[-1] == cfg.specials.eos:
            break
        x = torch.cat([x, model.showo.model.embed_tokens(torch.tensor([[ids[-1]]], device=device))], dim=1)
    return ids
