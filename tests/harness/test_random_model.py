"""The benchmarks' random model at real shapes and their request tokenizer."""

from __future__ import annotations

import torch

from flashu_fx.config import get_config
from harness import rows
from harness.random_model import ChunkTokenizer, build_random_model, und_question_ids


def test_random_model_is_tied_and_non_degenerate():
    model = build_random_model(get_config("tiny-tied"), torch.device("cpu"), torch.float32)
    assert model.showo.lm_head.weight is model.showo.model.embed_tokens.weight
    assert model.llm_inv_freq.dtype == torch.float32 and torch.isfinite(model.llm_inv_freq).all()
    assert all(p.std() > 0 for p in model.parameters() if p.numel() > 1)
    tok = ChunkTokenizer(model.config)
    ctx = rows.GenContext(model, [tok.encode("a cube")], steps=3, guidance=5.0)
    with torch.no_grad():
        out = rows.eager_gen(ctx).run()
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_question_ids_fill_the_prompt_to_the_asked_length():
    cfg = get_config("tiny")
    tok = ChunkTokenizer(cfg)
    from flashu_fx.layout import build_mmu_prompt

    for length in (40, 57):
        ids = und_question_ids(cfg, tok, length)
        assert build_mmu_prompt(cfg, tok, ids).tokens.shape[1] == length
        assert all(0 <= i < min(vars(cfg.specials).values()) for i in ids)  # no special token by accident
