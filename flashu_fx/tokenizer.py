"""Text to token ids: a local Qwen2.5 tokenizer directory, or a deterministic byte fallback.

The fallback keeps both pipelines runnable end to end without any tokenizer files: each UTF-8 byte b
becomes id ``b % n`` where ``n`` is the smallest special-token id of the config (so no byte collides
with a role token). It is not Qwen's vocabulary: with real weights, pass a tokenizer directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from flashu_fx.config import Showo2Config, get_config


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Deterministic fallback: UTF-8 bytes folded below the special-token ids."""

    def __init__(self, config: Showo2Config) -> None:
        self.specials = config.specials
        self.modulus = min(vars(config.specials).values())

    def encode(self, text: str) -> list[int]:
        return [b % self.modulus for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        special = set(vars(self.specials).values())
        return bytes(i for i in ids if i < min(self.modulus, 256) and i not in special).decode("utf-8", "replace")


# Token text of each SpecialTokens field (Qwen2.5's chat and vision tokens, and Show-o2's added pad).
SPECIAL_TOKEN_TEXT = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "boi": "<|vision_start|>",
    "eoi": "<|vision_end|>",
    "img_pad": "<|image_pad|>",
    "pad": "[PAD]",
}
SHOWO2_ADDED_TOKENS = ("<image>", "<|vid_start|>", "<|vid_end|>")  # after "[PAD]", in this order (ids 151666-8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class HFTokenizer:
    """A local Qwen2.5-Instruct tokenizer directory with Show-o2's added tokens (docs/SHOWO2.md §1.8).

    Show-o2 adds the pad token "[PAD]", then "<image>", "<|vid_start|>", "<|vid_end|>" (each only when missing, so
    a directory saved after adding loads to the same ids). The ids of the role tokens must then equal
    ``config.specials``, and every id must fit ``config.vocab_size``; else ValueError. ``config`` defaults to the
    official presets' Qwen vocabulary. Nothing is downloaded (``local_files_only=True``).
    """

    def __init__(self, path: str | Path, config: Showo2Config | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist (a local Qwen2.5-Instruct tokenizer "
                                    "directory; nothing is downloaded)")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer directory {path} holds none of {list(TOKENIZER_FILES)}")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError("a tokenizer directory needs transformers: pip install 'flashu-fx[tokenizer]'") from err

        config = config or get_config("showo2-1.5b")  # both official presets share Qwen's vocabulary
        self.path = path
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vocab = self.tok.get_vocab()
        if "[PAD]" not in vocab:
            self.tok.add_special_tokens({"pad_token": "[PAD]"})
        else:
            self.tok.pad_token = "[PAD]"
        self.tok.add_tokens([t for t in SHOWO2_ADDED_TOKENS if t not in vocab])
        self.check_ids(config)

    def check_ids(self, config: Showo2Config) -> None:
        """Raises ValueError naming every role token whose id differs from ``config.specials`` (or is absent),
        and a tokenizer larger than the model's vocabulary."""
        vocab = self.tok.get_vocab()
        problems = []
        for field, text in SPECIAL_TOKEN_TEXT.items():
            want, got = getattr(config.specials, field), vocab.get(text)
            if got is None:
                problems.append(f"{text!r} is not in the tokenizer (config.specials.{field} = {want})")
            elif got != want:
                problems.append(f"{text!r} has id {got} in the tokenizer but {want} in config.specials.{field}")
        if len(self.tok) > config.vocab_size:
            problems.append(f"the tokenizer has {len(self.tok)} tokens, more than config.vocab_size = "
                            f"{config.vocab_size}")
        if problems:
            raise ValueError(f"tokenizer {self.path} does not match the model config {config.name!r}: "
                             + "; ".join(problems))

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def get_tokenizer(config: Showo2Config, path: str | Path | None = None) -> TextTokenizer:
    """The tokenizer in ``path`` (its ids checked against ``config``) if given, else the byte fallback."""
    return HFTokenizer(path, config) if path is not None else ByteTokenizer(config)
