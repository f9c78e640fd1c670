"""Text to token ids: a local Qwen2.5 tokenizer directory, or a deterministic byte fallback.

The fallback keeps both pipelines runnable end to end without any tokenizer files: each UTF-8 byte b
becomes id ``b % n`` where ``n`` is the smallest special-token id of the config (so no byte collides
with a role token). It is not Qwen's vocabulary: with real weights, pass a tokenizer directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from flashu_fx.config import Showo2Config


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


class HFTokenizer:
    """A local Qwen2.5-Instruct tokenizer directory with Show-o2's added tokens (facts doc 1.8)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if "[PAD]" not in self.tok.get_vocab():
            self.tok.add_special_tokens({"pad_token": "[PAD]"})
            self.tok.add_tokens(["<image>", "<|vid_start|>", "<|vid_end|>"])

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def get_tokenizer(config: Showo2Config, path: str | Path | None = None) -> TextTokenizer:
    """The tokenizer in directory ``path`` if given, else the byte fallback.

    A missing directory raises FileNotFoundError naming it, before transformers is asked (which would read the
    path as a model-hub repo id and fail with an unrelated message)."""
    if path is None:
        return ByteTokenizer(config)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist (or is not a directory): "
                                "allowed a local Qwen2.5-Instruct tokenizer directory, or None for the byte fallback")
    return HFTokenizer(path)
