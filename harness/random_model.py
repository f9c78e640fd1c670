"""A Show-o2 at real shapes for timing: random weights drawn on the device, and requests of realistic length.

Weight values do not change the time of a dense step, so benchmarks build the model on the meta device and fill it
with random, non-degenerate values where it runs (seconds at 7B), and lay out prompts with a tokenizer that has
Qwen's rate of ids per byte but needs no vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from flashu_fx.config import Showo2Config, get_config  # noqa: F401  (get_config: the doctest)
from flashu_fx.layers import RMSNorm
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.model import Showo2
from flashu_fx.tokenizer import TextTokenizer

UND_QUESTION = "Describe this image in detail. "


@torch.no_grad()
def init_random_weights_fast(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Non-degenerate random weights drawn on each parameter's own device: no CPU generator and no host-to-device
    copies (``flashu_fx.init_random_weights`` draws every tensor on the CPU and copies it, slow at 7B).

    Norm scales (RMSNorm, LayerNorm) ~ N(1, 0.1), norm biases ~ N(0, 0.1), everything else ~ N(0, std):
    unlike upstream's training init nothing is zero, so every path (adaLN, FinalLayer) carries signal.
    """
    gens: dict[torch.device, torch.Generator] = {}

    def gen(p: torch.Tensor) -> torch.Generator:
        if p.device not in gens:
            gens[p.device] = torch.Generator(p.device).manual_seed(seed)
        return gens[p.device]

    norm_params = set()
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.normal_(1.0, 0.1, generator=gen(module.weight))
            norm_params.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, 0.1, generator=gen(module.bias))
                norm_params.add(id(module.bias))
    for p in model.parameters():  # tied parameters are yielded once
        if id(p) not in norm_params:
            p.normal_(0.0, std, generator=gen(p))
    return model


def build_random_model(cfg: Showo2Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Showo2:
    """Showo2 built on the meta device, materialised directly in ``dtype`` on ``device``, random weights.

    >>> build_random_model(get_config("tiny"), torch.device("cpu"), torch.float32).showo.lm_head.weight.shape
    torch.Size([256, 64])
    """
    with torch.device("meta"):
        model = Showo2(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty re-creates the parameters, which unties them
        model.showo.lm_head.weight = model.showo.model.embed_tokens.weight
    model.reset_rope_buffers()  # fp32 tables on the device (to_empty left them uninitialised, in dtype)
    return init_random_weights_fast(model, seed).eval()


class ChunkTokenizer:
    """One id per 4 UTF-8 bytes (about Qwen's rate on English text), folded below the special-token ids.

    Random weights need no vocabulary, but the layouts should have realistic lengths: the understanding
    template takes 22 positions here (Qwen: about 20), where one id per byte would take 60.
    """

    def __init__(self, config: Showo2Config, chunk: int = 4) -> None:
        self.modulus, self.chunk = min(vars(config.specials).values()), chunk

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        return [
            int.from_bytes(data[i : i + self.chunk], "little") % self.modulus for i in range(0, len(data), self.chunk)
        ]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def und_question_ids(cfg: Showo2Config, tok: TextTokenizer, prompt_len: int) -> list[int]:
    """Question ids padded (by repeating ``UND_QUESTION``) so the whole prompt has ``prompt_len`` positions."""
    base = build_mmu_prompt(cfg, tok, []).tokens.shape[1]
    n = max(1, prompt_len - base)
    unit = tok.encode(UND_QUESTION)
    return (unit * (n // len(unit) + 1))[:n]
