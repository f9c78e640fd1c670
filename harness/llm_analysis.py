"""The paper's per-layer analyses on a trained model, for both tasks (the numbers behind ``analyze``'s charts).

Generation (the eager sampler, every denoising call, CFG rows included):
  cosine[c][l]       cos(input, output) of layer l over the image slot (time token + image tokens) of every row in
                     denoising call c: the quantity FlashU's layer skipping measures (paper Fig. 2);
  image_share[c][l]  the share of attention the image tokens of the conditional rows pay to image-slot keys (the
                     rest goes to the text prefix), mean over heads and image queries.
Understanding (per question):
  cosine[s][l]       cos(input, output) of layer l at the token step s feeds: s = 0 the prefill's last prompt
                     position (where FlashU measures), s >= 1 each decode token (paper Fig. 4); mean over questions;
  image_share[q][l]  in the prefill, the share of attention the text after the image (question, assistant header)
                     pays to the image tokens;
  V-norm / attention (paper Fig. 5): at every layer, each image token's ||V|| (all KV heads, the vector V-norm
                     pruning ranks) and the attention it receives from the text after the image; the correlation
                     per layer and every point at ``vnorm_layer`` (FlashU prunes at its token_prune_layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import image_block
from flashu_fx.layout import build_gen_batch, build_mmu_prompt
from flashu_fx.mmu import answer_question, prompt_embeddings
from flashu_fx.model import Showo2
from flashu_fx.t2i import encode_prompts, generate_images
from flashu_fx.tokenizer import TextTokenizer
from harness.llm_probes import AttentionProbe, LayerCosineProbe, pearson, spearman


@dataclass
class GenAnalysis:
    cosine: np.ndarray  # (calls, layers)
    image_share: np.ndarray  # (calls, layers)


@dataclass
class UndAnalysis:
    cosine: np.ndarray  # (steps, layers), mean over questions; step 0 = prefill
    image_share: np.ndarray  # (questions, layers)
    vnorm: np.ndarray  # (questions * image tokens,) at vnorm_layer
    attention: np.ndarray  # (questions * image tokens,) received at vnorm_layer
    vnorm_layer: int
    pearson: list[float]  # per layer: correlation of ||V|| and attention received
    spearman: list[float]


def pruning_losses(vnorm: np.ndarray, attention: np.ndarray, objects: np.ndarray, ratio: float) -> dict[str, float]:
    """What V-norm pruning at ``ratio`` removes, per question then averaged: the share of the object tokens and of
    the attention the text pays to the image that fall on the dropped tokens (the largest ``ratio`` of V-norms,
    ``FlashUConfig.kept_tokens``'s count), beside the share of tokens dropped (what a random choice would lose).

    vnorm, attention: (questions, image tokens); objects: bool (questions, image tokens), True where the token
    shows any object pixel.
    """
    q, n = vnorm.shape
    dropped_count = n - FlashUConfig.for_task("und", token_prune_ratio=ratio).kept_tokens(n)
    order = np.argsort(vnorm, axis=1, kind="stable")  # ascending: kept first, as vnorm_topk breaks ties
    dropped = np.zeros((q, n), dtype=bool)
    np.put_along_axis(dropped, order[:, n - dropped_count :], True, axis=1)
    with np.errstate(invalid="ignore"):
        object_share = (dropped & objects).sum(1) / objects.sum(1)
    attention_share = (attention * dropped).sum(1) / attention.sum(1)
    return {"ratio": ratio, "tokens_dropped": dropped_count / n,
            "object_tokens_dropped": float(np.nanmean(object_share)),
            "attention_dropped": float(attention_share.mean())}


@torch.no_grad()
def analyze_generation(model: Showo2, tokenizer: TextTokenizer, captions: Sequence[str], steps: int, guidance: float,
                       seed: int = 0, progress: bool = True) -> GenAnalysis:
    """One guided generation of ``captions`` with both probes on (see the module docstring)."""
    cfg, device = model.config, next(model.parameters()).device
    ids = encode_prompts(model, captions, tokenizer)
    batch = build_gen_batch(cfg, ids, guided=True).to(device)  # the batch generate_images builds
    slot = cfg.image_slot_len
    cond = len(ids)
    image_pos = batch.offsets[:cond, None] + torch.arange(slot, device=device)  # (B, slot) of the cond rows
    shares: list[list[float]] = []

    def on_layer(index: int, probs: Tensor, v: Tensor) -> None:
        if index == 0:
            shares.append([])
        p = probs[:cond].mean(1)  # (B, L, L), mean over heads
        queries = p.gather(1, image_pos[..., None].expand(-1, -1, p.shape[-1]))  # (B, slot, L)
        on_image = queries.gather(2, image_pos[:, None, :].expand(-1, slot, -1)).sum(-1)  # (B, slot)
        shares[-1].append(float(on_image[:, 1:].mean()))  # image-token queries (the time token left out)

    positions = lambda h: image_block(h, batch.offsets, slot)
    with LayerCosineProbe(model, positions) as cosine, AttentionProbe(model, on_layer):
        generate_images(model, ids, steps=steps, guidance=guidance, seed=seed, progress=progress)
    return GenAnalysis(np.array(cosine.calls), np.array(shares))


@torch.no_grad()
def analyze_understanding(model: Showo2, tokenizer: TextTokenizer, latents: Tensor, questions: Sequence[str],
                          new_tokens: int, vnorm_layer: int, progress: bool = True) -> UndAnalysis:
    """Per question: a greedy answer of exactly ``new_tokens`` tokens under the cosine probe, and one cache-free
    prefill under the attention probe. ``latents``: (N, C, h, w), one image per question."""
    cfg = model.config
    if not 0 <= vnorm_layer < cfg.num_layers:
        raise ValueError(f"vnorm_layer={vnorm_layer} is invalid: allowed 0..{cfg.num_layers - 1}")
    cosines, shares, points = [], [], [[] for _ in range(cfg.num_layers)]
    for i, question in enumerate(tqdm(questions, desc="und analysis", disable=not progress, leave=False)):
        image = latents[i : i + 1]
        with LayerCosineProbe(model, lambda h: h[:, -1]) as probe:  # the prefill's last position, then each token
            answer_question(model, image, question, tokenizer, max_new_tokens=new_tokens, stop_at_eos=False)
        cosines.append(probe.calls)
        layers = prefill_attention(model, tokenizer, image, question)
        shares.append([share for share, _, _ in layers])
        for index, (_, vnorm, received) in enumerate(layers):
            points[index].append((vnorm, received))
    per_layer = [(torch.cat([p[0] for p in layer]), torch.cat([p[1] for p in layer])) for layer in points]
    vnorm, attention = per_layer[vnorm_layer]
    return UndAnalysis(
        np.array(cosines).mean(0), np.array(shares), vnorm.numpy(), attention.numpy(), vnorm_layer,
        [pearson(v, a) for v, a in per_layer], [spearman(v, a) for v, a in per_layer])


def prefill_attention(model: Showo2, tokenizer: TextTokenizer, image: Tensor,
                      question: str) -> list[tuple[float, Tensor, Tensor]]:
    """One cache-free prefill; per layer: the share of attention the text after the image pays to the image tokens,
    and per image token its ||V|| and the attention it receives from that text (mean over heads and queries)."""
    cfg, device = model.config, image.device
    prompt = build_mmu_prompt(cfg, tokenizer, question)
    start = prompt.offset + 1  # the time token sits at prompt.offset, the image tokens follow
    after = start + cfg.num_image_tokens  # eoi, the question and the assistant header: the text that reads the image
    layers: list[tuple[float, Tensor, Tensor]] = []

    def on_layer(index: int, probs: Tensor, v: Tensor) -> None:
        text = probs[0, :, after:].mean(0)  # (text queries, L), mean over heads
        received = text[:, start:after].mean(0)  # (image tokens,)
        vnorm = v[0, :, start:after].transpose(0, 1).flatten(1).float().norm(dim=-1)  # over every KV head
        layers.append((float(text[:, start:after].sum(-1).mean()), vnorm.cpu(), received.cpu()))

    x = prompt_embeddings(model, image, prompt)
    cos, sin, _, _ = model.rope(x.shape[1], x.dtype, device)
    with AttentionProbe(model, on_layer):
        model.showo(x, cos, sin, prompt.mask(cfg).to(device))
    return layers
