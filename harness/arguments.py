"""Argument types shared by the harness commands: paths that must exist are checked while parsing, so a typo
gets one line from argparse instead of a traceback from the library that reads the path."""

from __future__ import annotations

import argparse
from pathlib import Path


def existing_directory(text: str) -> Path:
    """argparse ``type=``: the path, which must be a directory.

    >>> existing_directory("/no/such/dir")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: directory '/no/such/dir' does not exist
    """
    path = Path(text)
    if not path.is_dir():
        state = "is a file, not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"directory {text!r} {state}")
    return path
