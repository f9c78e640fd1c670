"""HFTokenizer on a small local tokenizer shaped like Qwen2.5's: 256 byte-level tokens, then Qwen's 22 added
special tokens in Qwen's order, so every Qwen id maps to id - 151387 here (<|im_start|> 257, [PAD] 278)."""

from __future__ import annotations

import dataclasses

import pytest

from flashu_fx.config import QWEN_SPECIALS, SpecialTokens, get_config
from flashu_fx.layout import build_gen_batch, build_mmu_prompt
from flashu_fx.tokenizer import HFTokenizer, get_tokenizer

QWEN_ADDED = [  # Qwen2.5's added tokens, ids 151643-151664
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
SHIFT = 151643 - 256  # Qwen's first added id -> ours
SPECIALS = SpecialTokens(**{k: v - SHIFT for k, v in vars(QWEN_SPECIALS).items()})
CONFIG = dataclasses.replace(get_config("tiny"), name="tiny-bytes", vocab_size=151669 - SHIFT, specials=SPECIALS)
UPSTREAM_TEMPLATE = (  # upstream's understanding prompt, the image slot written as [image]
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>[image]<|vision_end|>{question}\n<|im_start|>assistant\n"
)


def byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizes to), as token -> id = the byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def save_tokenizer(path, added: list[str]):
    """A byte-level BPE (no merges: token id = UTF-8 byte) with ``added`` special tokens, saved to ``path``."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=byte_level_vocab(), merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(added)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("qwen-bytes"), QWEN_ADDED)


@pytest.fixture(scope="module")
def tok(tok_dir) -> HFTokenizer:
    return HFTokenizer(tok_dir, CONFIG)


def test_round_trip(tok):
    text = "A red fox in the snow, héllo 🦊\nsecond line"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode([SPECIALS.bos, *ids, SPECIALS.eos, SPECIALS.pad]) == text  # roles are skipped


def test_show_o2_tokens_are_added_after_qwens(tok, tmp_path):
    vocab = tok.tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "<image>", "<|vid_start|>", "<|vid_end|>")] == [278, 279, 280, 281]
    assert tok.tok.pad_token == "[PAD]" and tok.tok.pad_token_id == SPECIALS.pad and len(tok.tok) == 282
    assert tok.encode("a<image>b") == [ord("a"), 279, ord("b")]  # one token, not its characters
    tok.tok.save_pretrained(tmp_path)  # a directory saved after adding loads to the same ids, nothing added twice
    again = HFTokenizer(tmp_path, CONFIG)
    assert again.tok.get_vocab() == vocab and again.tok.pad_token == "[PAD]"
    with_pad = HFTokenizer(save_tokenizer(tmp_path / "with-pad", [*QWEN_ADDED, "[PAD]"]), CONFIG)
    assert with_pad.tok.pad_token == "[PAD]" and len(with_pad.tok) == 282  # [PAD] present: made the pad token


def test_understanding_prompt_is_upstreams_template(tok):
    question = "What is in the image?"
    prompt = build_mmu_prompt(CONFIG, tok, question)
    ids = prompt.tokens[0].tolist()
    slot = [SPECIALS.img_pad] * CONFIG.image_slot_len
    start = ids.index(SPECIALS.img_pad)
    assert ids[start : start + len(slot)] == slot and start == prompt.offset
    text = tok.tok.decode(ids[:start] + tok.encode("[image]") + ids[start + len(slot) :], skip_special_tokens=False)
    assert text == UPSTREAM_TEMPLATE.format(question=question)


def test_generation_row_reads_as_upstreams(tok):
    batch = build_gen_batch(CONFIG, [tok.encode("a fox")], guided=False)
    row = batch.tokens[0].tolist()
    text = tok.tok.decode(row, skip_special_tokens=False)
    slot = "<|image_pad|>" * CONFIG.image_slot_len
    pads = "[PAD]" * (CONFIG.max_seq_len - len("a fox") - CONFIG.image_slot_len - 4)
    assert text == f"<|im_start|>a fox<|vision_start|>{slot}<|vision_end|><|im_end|>{pads}"


def test_ids_that_differ_from_the_config_are_named(tok_dir, tmp_path):
    wrong = dataclasses.replace(CONFIG, specials=dataclasses.replace(SPECIALS, eos=300, pad=7))
    with pytest.raises(ValueError, match="does not match") as err:
        HFTokenizer(tok_dir, wrong)
    message = str(err.value)
    assert "'<|im_end|>' has id 258 in the tokenizer but 300 in config.specials.eos" in message
    assert "'[PAD]' has id 278 in the tokenizer but 7 in config.specials.pad" in message
    assert "<|im_start|>" not in message  # only the tokens that differ
    with pytest.raises(ValueError, match="the tokenizer has 282 tokens, more than config.vocab_size = 281"):
        HFTokenizer(tok_dir, dataclasses.replace(CONFIG, vocab_size=281))
    with pytest.raises(ValueError, match=r"'<\|im_start\|>' has id 257 in the tokenizer but 151644"):
        HFTokenizer(tok_dir)  # the default config is the real Qwen vocabulary
    renamed = [t if t != "<|image_pad|>" else "<|other|>" for t in QWEN_ADDED]
    missing = save_tokenizer(tmp_path / "no-image-pad", renamed)
    with pytest.raises(ValueError, match=r"'<\|image_pad\|>' is not in the tokenizer \(config.specials.img_pad = 268"):
        HFTokenizer(missing, CONFIG)


def test_missing_directory_or_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*absent does not exist"):
        HFTokenizer(tmp_path / "absent", CONFIG)
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .* holds none of \['tokenizer.json'"):
        HFTokenizer(tmp_path, CONFIG)
    with pytest.raises(FileNotFoundError, match="absent"):
        get_tokenizer(CONFIG, tmp_path / "absent")


def test_get_tokenizer_checks_against_the_model_config(tok_dir):
    assert isinstance(get_tokenizer(CONFIG, tok_dir), HFTokenizer)
    with pytest.raises(ValueError, match="config.specials.bos"):
        get_tokenizer(get_config("tiny"), tok_dir)
