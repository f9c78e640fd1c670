"""Eager FlashU understanding: the executable specification of the prefill and of every decode step.

Prefill (step d = 0) over the prompt of L0 positions, p = config.token_prune_layer:

    layers 0..p:   all L0 positions (their KV caches hold all of them)
    at layer p:    v = v_proj(input_layernorm(h)) of the 729 image tokens (the same V layer p computes);
                   keep the config.kept_tokens(729) tokens of SMALLEST ||v|| (all KV heads, fp32; vnorm_topk)
    after layer p: h = h[:, kept]  with kept = every non-image position (time token included) + kept image
                   tokens, in order; RoPE positions stay the ORIGINAL ones; the mask is the omni mask
                   restricted to kept rows/cols; caches of layers p+1.. hold only the kept positions.

Decode step d = 1, 2, ... feeds the previous token at RoPE position L0 + d - 1 in every layer; layer group
"<= p" writes cache slot L0 + d - 1, group "> p" slot K0 + d - 1 (K0 = kept positions). Every call runs the
"und" pruned FFN. Layer skipping: step d measures when d % T_LS == 0 (prefill included: skip nothing,
importance_l = 1 - cos(in_l, out_l) at the LAST input token, new skip set from step d + 1 on), else skips
the current set. A skipped layer writes no K/V: each layer keeps a validity mask over its cache slots and
later tokens attend only to the slots that layer actually computed.

>>> from flashu_fx import FlashUConfig, Showo2, get_config, init_random_weights
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> cfg = FlashUConfig.for_task("und", ffn_prune_ratio=0.0, skip_ratio=0.5, skip_interval=2)
>>> ans = answer_question_flashu(model, torch.randn(1, 16, 8, 8), "what is it?", cfg, None, max_new_tokens=4)
>>> len(ans.kept_positions), [s.layers for s in ans.steps]
(8, ['measure', 'skip', 'measure', 'skip'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashu_fx.ffn_layout import FFNLayout
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import choose_skip_set, ffn_ranges_per_layer, layer_importance
from flashu_fx.inputs import question_ids
from flashu_fx.layout import MmuPrompt, build_mmu_prompt
from flashu_fx.masks import pad_mask_to
from flashu_fx.mmu import Answer, cache_length, check_image_latents, next_token, prompt_embeddings
from flashu_fx.model import Showo2
from flashu_fx.qwen2 import KVCache
from flashu_fx.schedule import LayerMode, und_step_layers
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer
from triton_kernels import vnorm_topk


@dataclass(frozen=True)
class UndStepRecord:
    """What the prefill (step 0) or one decode step did; ``FlashUAnswer.ids[d]`` comes from step d's logits."""

    step: int  # d: 0 = prefill, 1.. = decode steps
    position: int  # RoPE position of the step's last input token: L0 - 1 for the prefill, L0 + d - 1 after
    layers: LayerMode  # "measure" (all layers, re-measure), "skip" (skip set), "all" (skipping off)
    skipped: tuple[int, ...]  # layers run as identity (no K/V written) in this step
    importance: tuple[float, ...] | None  # importance_l, l = 0..L-1, measured in this step
    skip_set: tuple[int, ...]  # the skip set after this step


@dataclass
class FlashUAnswer(Answer):
    """``Answer`` (ids, text: the generated ids, the stop token included when reached) plus the decisions."""

    kept_positions: tuple[int, ...] | None  # absolute prompt positions of the kept image tokens; None = no pruning
    steps: list[UndStepRecord]  # steps[d] produced ids[d]
    prompt_len: int  # L0
    # The selection's evidence (eager decoder only; None without pruning): the first image position and the image
    # tokens' value vectors at the pruning layer (num_image, KV * d), a view on the device: no work is added to the
    # answer; a caller that wants the norms the selection ranked takes image_values.float().norm(dim=-1).
    image_start: int | None = None
    image_values: Tensor | None = None


def pruning_values(layer: torch.nn.Module, h: Tensor) -> Tensor:
    """The value vectors the pruning layer attends with: v_proj(input_layernorm(h)), (1, L0, KV * d)."""
    return layer.self_attn.v_proj(layer.input_layernorm(h))


def select_kept_positions(layer: torch.nn.Module, h: Tensor, image_start: int, num_image: int, keep: int,
                          values: Tensor | None = None) -> Tensor:
    """V-norm token pruning at one decoder layer: h (1, L0, H) is that layer's input (``values``: its
    ``pruning_values``, when the caller has them).

    Returns int64 (K0,), K0 = L0 - num_image + keep: every position outside [image_start, image_start +
    num_image) plus the ``keep`` image tokens whose value vectors v_proj(input_layernorm(h)) have the smallest
    L2 norm over all KV heads (ties -> lower position), ascending.
    """
    v = pruning_values(layer, h) if values is None else values
    kept = vnorm_topk(v, image_start, num_image, keep)[0]
    seq = torch.arange(h.shape[1], device=h.device)
    return torch.cat([seq[:image_start], kept.to(h.device), seq[image_start + num_image :]])


def check_token_prune_layer(config: FlashUConfig, num_layers: int) -> None:
    """Raise unless token pruning is off or its layer is one of the model's ``num_layers``."""
    if config.token_prune_ratio > 0 and config.token_prune_layer >= num_layers:
        raise ValueError(
            f"FlashUConfig.token_prune_layer={config.token_prune_layer} is invalid: the model has "
            f"{num_layers} layers (allowed 0..{num_layers - 1})"
        )


class FlashUUndDecoder:
    """Stateful FlashU decoding of one prompt: ``prefill(x)`` once, then ``step(token)`` per new token.

    caches[l]: static KV buffers (1, KV, cap_l, d), cap_l = cache_length(base[l] + max_new_tokens), base[l] = L0 for
    l <= p (or without pruning), K0 after; valid[l]: bool (cap_l,) slots layer l has written.
    """

    def __init__(
        self, model: Showo2, config: FlashUConfig, layout: FFNLayout | None, prompt: MmuPrompt, max_new_tokens: int
    ) -> None:
        cfg = model.config
        if config.task != "und":
            raise ValueError(f"FlashUConfig.task={config.task!r} is invalid here: understanding needs 'und'")
        check_token_prune_layer(config, cfg.num_layers)
        self.model, self.config, self.prompt = model, config, prompt
        self.ffn_ranges = ffn_ranges_per_layer(model, config, layout, "und")
        self.skipping = config.skip_ratio > 0 and config.skip_interval > 0
        self.num_skipped = config.num_skipped_layers(cfg.num_layers)
        self.prune = config.token_prune_ratio > 0
        self.prune_layer = config.token_prune_layer
        self.image_start = prompt.offset + 1  # the time token at prompt.offset is never dropped
        self.keep = config.kept_tokens(cfg.num_image_tokens)
        self.prompt_len = prompt.tokens.shape[1]
        kept_len = self.prompt_len - cfg.num_image_tokens + self.keep
        self.base = [
            kept_len if self.prune and i > self.prune_layer else self.prompt_len for i in range(cfg.num_layers)
        ]
        self.max_new_tokens = max_new_tokens
        self.kept_positions: tuple[int, ...] | None = None
        self.image_values: Tensor | None = None
        self.skip_set: tuple[int, ...] = ()
        self.steps: list[UndStepRecord] = []

    def _allocate(self, x: Tensor) -> None:
        """Caches, validity masks, slot indices and RoPE tables for the whole answer (static shapes)."""
        model, n = self.model, self.max_new_tokens
        kv, head_dim = model.config.num_kv_heads, model.config.head_dim
        caps = [cache_length(b + n) for b in self.base]  # aligned mask rows (see cache_length)
        self.caches = [KVCache(1, kv, cap, head_dim, x.dtype, x.device) for cap in caps]
        self.valid = [torch.zeros(cap, dtype=torch.bool, device=x.device) for cap in caps]
        self.slot_ids = torch.arange(self.prompt_len + n, device=x.device)  # views of it index the caches
        self.cos, self.sin, _, _ = model.rope(self.prompt_len + n, x.dtype, x.device)

    def _finish(self, h: Tensor, d: int, layers: LayerMode, skipped: tuple[int, ...], importance: list) -> Tensor:
        """Record step d, update the skip set on a measuring step; h (1, n, H) -> logits (V,) of the last row."""
        measured = None
        if layers == "measure":
            measured = tuple(torch.stack(importance).tolist())  # the one host read of a measuring step
            self.skip_set = choose_skip_set(measured, self.num_skipped)
        position = self.prompt_len - 1 + d
        self.steps.append(UndStepRecord(d, position, layers, skipped, measured, self.skip_set))
        return self.model.showo.lm_head(self.model.showo.model.norm(h)[0, -1])

    def prefill(self, x: Tensor) -> Tensor:
        """x: prompt embeddings (1, L0, H) -> logits (V,) of the last prompt position (step 0)."""
        if self.steps:
            raise RuntimeError("prefill() runs once per FlashUUndDecoder")
        self._allocate(x)
        model, cfg = self.model, self.model.config
        layers = und_step_layers(self.config, 0)
        pos = torch.arange(self.prompt_len, device=x.device)  # RoPE positions of the rows of h
        mask = self.prompt.mask(cfg).to(x.device)  # bool (1, 1, n, n) over the rows of h
        h, importance = x, []
        for i, layer in enumerate(model.showo.model.layers):
            prune_here = self.prune and i == self.prune_layer
            if prune_here:
                v = pruning_values(layer, h)
                kept = select_kept_positions(layer, h, self.image_start, cfg.num_image_tokens, self.keep, v)
                self.image_values = v[0, self.image_start : self.image_start + cfg.num_image_tokens]
            slots = self.slot_ids[: h.shape[1]]
            layer_mask = pad_mask_to(mask, self.valid[i].numel())
            out = layer(h, self.cos[pos], self.sin[pos], layer_mask, self.caches[i], slots, self.ffn_ranges[i])
            self.valid[i][: h.shape[1]] = True
            if layers == "measure":
                importance.append(layer_importance(h[:, -1], out[:, -1]))
            h = out
            if prune_here:  # later layers see only the kept rows, at their original positions
                h, pos, mask = h[:, kept], pos[kept], mask[:, :, kept][:, :, :, kept]
                self.kept_positions = tuple(kept[self.image_start : self.image_start + self.keep].tolist())
        return self._finish(h, 0, layers, (), importance)

    def step(self, token: int) -> Tensor:
        """Decode step d = len(steps): feed ``token`` at RoPE position L0 + d - 1 -> logits (V,)."""
        d = len(self.steps)
        if d == 0 or d >= self.max_new_tokens:
            raise RuntimeError(f"step() needs a prefill first and at most {self.max_new_tokens - 1} steps (d={d})")
        model, device = self.model, self.valid[0].device
        layers = und_step_layers(self.config, d)
        skipped = self.skip_set if layers == "skip" else ()
        pos = torch.tensor([self.prompt_len + d - 1], device=device)
        cos, sin = self.cos[pos], self.sin[pos]  # (1, head_dim): the same position in every layer
        h = model.showo.model.embed_tokens(torch.tensor([[token]], device=device))
        importance = []
        for i, layer in enumerate(model.showo.model.layers):
            if i in skipped:  # identity: no K/V for this token in this layer, its slot stays invalid
                continue
            slot = self.base[i] + d - 1
            self.valid[i][slot] = True
            mask = self.valid[i][None, None, None, :]  # every slot this layer computed, this token's included
            out = layer(h, cos, sin, mask, self.caches[i], self.slot_ids[slot : slot + 1], self.ffn_ranges[i])
            if layers == "measure":
                importance.append(layer_importance(h[:, -1], out[:, -1]))
            h = out
        return self._finish(h, d, layers, skipped, importance)


@torch.no_grad()
def answer_question_flashu(
    model: Showo2,
    latents: Tensor,
    question: str | list[int],
    config: FlashUConfig,
    layout: FFNLayout | None,
    tokenizer: TextTokenizer | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = 1,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> FlashUAnswer:
    """Answer ``question`` about one image given as VAE latents (1, C, h, w), with FlashU understanding.

    Same prompt, sampling and stopping rule as ``answer_question(kv_cache=True)``; ``max_new_tokens`` defaults
    to ``config.max_new_tokens``. ``layout`` (with "und" ranges) is required when ``config.ffn_prune_ratio > 0``.
    """
    check_image_latents(model.config, latents)
    cfg = model.config
    tok = tokenizer or get_tokenizer(cfg)
    prompt = build_mmu_prompt(cfg, tok, question_ids(cfg, question, tok))
    budget = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
    decoder = FlashUUndDecoder(model, config, layout, prompt, budget)
    gen = torch.Generator().manual_seed(seed)
    ids = [next_token(decoder.prefill(prompt_embeddings(model, latents, prompt)), temperature, top_k, gen)]
    for _ in range(1, budget):
        if stop_at_eos and ids[-1] == cfg.specials.eos:
            break
        ids.append(next_token(decoder.step(ids[-1]), temperature, top_k, gen))
    return FlashUAnswer(ids, tok.decode(ids), decoder.kept_positions, decoder.steps, decoder.prompt_len,
                        decoder.image_start if decoder.prune else None, decoder.image_values)
