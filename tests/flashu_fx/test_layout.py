"""Token layouts (docs/SHOWO2.md §1.8 and §4.6-4.7): the generation rows and the understanding prompt."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.config import get_config
from flashu_fx.layout import build_gen_batch, build_mmu_prompt, gen_row
from flashu_fx.masks import omni_mask
from flashu_fx.tokenizer import ByteTokenizer

CFG = get_config("showo2-1.5b")
SP = CFG.specials


def documented_row(prompt: list[int]) -> list[int]:
    """docs/SHOWO2.md §1.8, index by index (432 numbers): bos, prompt, boi, 730 img_pad, eoi, eos, 290 - n pads."""
    n = len(prompt)
    row = [None] * 1024
    row[0] = 151644
    row[1 : n + 1] = prompt
    row[n + 1] = 151652
    row[n + 2 : n + 732] = [151655] * 730
    row[n + 732] = 151653
    row[n + 733] = 151645
    row[n + 734 : 1024] = [151665] * (290 - n)
    assert len(row) == 1024 and None not in row
    return row


@pytest.mark.parametrize("n", [0, 1, 17, 290])
def test_gen_row_matches_documented_layout(n):
    prompt = [(7 * i + 3) % 151643 for i in range(n)]
    assert gen_row(CFG, prompt) == documented_row(prompt)


def test_gen_batch_rows_offsets_and_mask():
    prompts = [[11, 12, 13], list(range(40, 80))]
    batch = build_gen_batch(CFG, prompts)
    assert batch.tokens.shape == (4, 1024) and batch.tokens.dtype == torch.int64
    assert batch.guided and batch.num_prompts == 2 and batch.prompt_lens == [3, 40]
    assert batch.tokens[0].tolist() == documented_row(prompts[0])
    assert batch.tokens[1].tolist() == documented_row(prompts[1])
    null = documented_row([])
    assert batch.tokens[2].tolist() == null and batch.tokens[3].tolist() == null
    assert batch.offsets.tolist() == [5, 42, 2, 2]  # n + 2 for cond rows, 2 for null rows
    for row, off in enumerate(batch.offsets.tolist()):  # the offset is the time token: right after boi
        assert int(batch.tokens[row, off - 1]) == SP.boi and int(batch.tokens[row, off + 730]) == SP.eoi
    assert torch.equal(batch.mask, omni_mask(batch.offsets, 1024, 730))


def test_unguided_batch_has_no_null_rows():
    batch = build_gen_batch(CFG, [[1, 2]], guided=False)
    assert batch.tokens.shape == (1, 1024) and not batch.guided and batch.offsets.tolist() == [4]


def test_prompt_at_max_text_len_fills_the_row():
    full = list(range(1000, 1290))
    batch = build_gen_batch(CFG, [full])
    assert batch.prompt_lens == [290]
    assert batch.tokens[0].tolist() == documented_row(full)
    assert int((batch.tokens[0] == SP.pad).sum()) == 0
    assert batch.offsets.tolist() == [292, 2]


def test_prompt_over_max_text_len_raises_instead_of_being_cut():
    with pytest.raises(ValueError, match=r"^prompts\[1\] has 291 tokens, more than the budget config.max_text_len=290"):
        build_gen_batch(CFG, [[5], list(range(1000, 1291))])
    with pytest.raises(ValueError, match="prompt has 400 tokens"):
        gen_row(CFG, list(range(1000, 1400)))


@pytest.mark.parametrize("bad", [-1, 151669, 10**9])
def test_out_of_vocab_ids_raise(bad):
    with pytest.raises(ValueError, match="151669"):
        build_gen_batch(CFG, [[5, bad, 6]])


def test_empty_prompt_list_raises():
    with pytest.raises(ValueError, match="at least one prompt"):
        build_gen_batch(CFG, [])


def test_gen_batch_to_device_keeps_everything():
    batch = build_gen_batch(CFG, [[1]]).to("cpu")
    assert batch.num_prompts == 1 and batch.prompt_lens == [1] and batch.mask.dtype == torch.bool


def test_tiny_row_uses_tiny_specials():
    cfg = get_config("tiny")
    row = gen_row(cfg, [1, 2])
    sp = cfg.specials
    assert len(row) == cfg.max_seq_len
    assert row[:4] == [sp.bos, 1, 2, sp.boi] and row[4 : 4 + cfg.image_slot_len] == [sp.img_pad] * 17
    assert row[21:23] == [sp.eoi, sp.eos] and set(row[23:]) == {sp.pad}


# ---- understanding prompt ----------------------------------------------------------------------------------
def test_mmu_prompt_layout_demo_and_training():
    tok = ByteTokenizer(CFG)  # bytes are ids below the specials, so the text is readable back
    enc = tok.encode
    head = [SP.bos, *enc("system\nYou are a helpful assistant."), SP.eos, *enc("\n"), SP.bos, *enc("user\n")]
    question = "What is in the image?"
    expected = [*head, SP.boi, *[SP.img_pad] * 730, SP.eoi, *enc(question), *enc("\n"), SP.bos, *enc("assistant\n")]

    demo = build_mmu_prompt(CFG, tok, question)
    assert demo.tokens.shape == (1, len(expected)) and demo.tokens[0].tolist() == expected
    assert demo.offset == len(head) + 1  # the time token, right after boi
    assert demo.block_offset == len(head) + 2  # upstream's demo: modality_positions = [[len(A) + 2, 730]]
    train = build_mmu_prompt(CFG, tok, question, training_layout=True)
    assert train.tokens[0].tolist() == expected and train.offset == train.block_offset == len(head) + 1
    assert build_mmu_prompt(CFG, tok, enc(question)).tokens[0].tolist() == expected  # ids accepted as well


def test_mmu_masks_demo_block_is_shifted_by_one():
    tok = ByteTokenizer(CFG)
    demo, train = build_mmu_prompt(CFG, tok, "Hi?"), build_mmu_prompt(CFG, tok, "Hi?", training_layout=True)
    off = demo.offset
    eoi = off + 730
    assert int(demo.tokens[0, eoi]) == SP.eoi
    m_demo, m_train = demo.mask(CFG)[0, 0], train.mask(CFG)[0, 0]
    assert m_demo.shape == (demo.tokens.shape[1],) * 2
    # demo: the time token sees no image token; image tokens see eoi
    assert not bool(m_demo[off, off + 1]) and bool(m_demo[off + 1, eoi])
    # training: the time token is in the block; eoi is not
    assert bool(m_train[off, off + 5]) and not bool(m_train[off + 1, eoi])
    assert torch.equal(m_demo, omni_mask(torch.tensor([off + 1]), demo.tokens.shape[1], 730)[0, 0])


@settings(deadline=None, max_examples=12)
@given(lens=st.lists(st.integers(1, 20), min_size=1, max_size=3), multiple=st.integers(1, 20), seed=st.integers(0, 99))
def test_cutting_the_batch_after_its_last_slot_keeps_the_velocity(tiny_model, lens, multiple, seed) -> None:
    """GenBatch.through_last_slot is exact: the positions after every slot are never attended by a slot row."""
    cfg = tiny_model.config
    batch = build_gen_batch(cfg, [[(7 * i + j + seed) % 200 for j in range(n)] for i, n in enumerate(lens)])
    cut = batch.through_last_slot(cfg.image_slot_len, multiple)
    length = cut.tokens.shape[1]
    assert int(batch.offsets.max()) + cfg.image_slot_len <= length <= cfg.max_seq_len
    assert length == cfg.max_seq_len or length % multiple == 0
    assert torch.equal(cut.mask, batch.mask[:, :, :length, :length])
    m = batch.tokens.shape[0]
    latents = torch.randn(m, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))
    t = torch.full((m,), 0.4)
    with torch.no_grad():
        full = tiny_model(batch.tokens, latents, t, batch.offsets, batch.mask, return_logits=False).velocity
        short = tiny_model(cut.tokens, latents, t, cut.offsets, cut.mask, return_logits=False).velocity
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_a_cut_multiple_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple=0"):
        build_gen_batch(CFG, [[1, 2]]).through_last_slot(CFG.image_slot_len, 0)
