"""A word-level tokenizer for the testbed world: one id per word, Show-o2's role tokens at the top of the vocabulary.

Text splits into words, single punctuation marks and newlines (``"system\\nYou are"`` -> ``system``, ``\\n``,
``you``, ``are``; lower-cased), so the understanding chat template of ``flashu_fx.layout.build_mmu_prompt`` tokenizes
as it does with Qwen2.5, one piece per word. A word outside the vocabulary raises: the testbed cannot draw or read
what its world does not hold, and a silent unknown-token id would hide that.

>>> tok = WordTokenizer(["a", "red", "circle"], SpecialTokens(bos=10, eos=11, boi=12, eoi=13, img_pad=14, pad=15))
>>> tok.decode(tok.encode("a red circle"))
'a red circle'
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from flashu_fx.config import SpecialTokens

# The pieces of the understanding chat template (layout.build_mmu_prompt): always in the vocabulary.
CHAT_WORDS = ("system", "you", "are", "a", "helpful", "assistant", ".", "user", "\n")
_PIECES = re.compile(r"\n|\w+|[^\w\s]")
FILE_NAME = "tokenizer_words.json"


class WordTokenizer:
    """Words ``vocab[i]`` -> id ``i``; the specials' ids must lie above the words."""

    def __init__(self, vocab: Sequence[str], specials: SpecialTokens) -> None:
        words = list(dict.fromkeys([*vocab, *CHAT_WORDS]))  # keep order, drop repeats
        if len(words) > min(vars(specials).values()):
            raise ValueError(f"{len(words)} words do not fit below the special-token ids {vars(specials)}")
        self.words, self.specials = words, specials
        self.ids = {w: i for i, w in enumerate(words)}

    def encode(self, text: str) -> list[int]:
        pieces = _PIECES.findall(text.lower())
        unknown = sorted({p for p in pieces if p not in self.ids})
        if unknown:
            raise ValueError(f"text {text!r} has words outside the testbed vocabulary: {unknown}; "
                             f"known words: {' '.join(w for w in self.words if w != chr(10))}")
        return [self.ids[p] for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by spaces; role tokens and ids outside the vocabulary are dropped."""
        return " ".join(self.words[i] for i in ids if 0 <= i < len(self.words))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        path.write_text(json.dumps({"words": self.words, "specials": vars(self.specials)}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> WordTokenizer:
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: a testbed checkpoint directory holds {FILE_NAME}")
        data = json.loads(path.read_text())
        return cls(data["words"], SpecialTokens(**data["specials"]))
