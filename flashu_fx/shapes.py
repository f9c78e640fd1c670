"""Shape arithmetic shared by the batch cut, the caches and the configs."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is >= ``n`` (``n`` itself when it is one)."""
    if multiple < 1:
        raise ValueError(f"multiple={multiple} is invalid: allowed an integer >= 1")
    return -(-n // multiple) * multiple
