"""What the harness commands share in their argument parsing: help that shows each option's default under the
command's full description, and paths that must exist checked while parsing, so a typo gets one line from
argparse instead of a traceback from the library that reads the path."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from flashu_fx.flashu_config import FlashUConfig

# FlashU settings that decide which FFN neurons a calibrated layout keeps: they come with the calibration.
LAYOUT_SETTINGS = ("task", "ffn_prune_ratio", "ffn_width_multiple", "calibration_samples")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its line breaks kept), and ``(default: ...)`` after each option's help,
    except where the help states its default itself (``default:``) or there is none to show (None: the help
    says what happens then; False: a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def description(doc: str | None) -> str:
    """A module docstring's first paragraph: the whole first sentence, not its first line."""
    return (doc or "").strip().split("\n\n")[0]


def command_parser(prog: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one harness command: ``prog``, its docstring's first paragraph, defaults shown."""
    return argparse.ArgumentParser(prog=prog, description=description(doc), epilog=epilog,
                                   formatter_class=HelpFormatter)


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


def display_path(path: str | Path) -> str:
    """``path`` as reports print and record it: relative to the working directory when it lies inside it (so a
    report names no machine's layout), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def flashu_setting(text: str) -> tuple[str, Any]:
    """argparse ``type=`` of ``--set KEY=VALUE``: a FlashUConfig field and its value, converted to the field's type.

    >>> flashu_setting("token_prune_ratio=0.25")
    ('token_prune_ratio', 0.25)
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    defaults = FlashUConfig()
    allowed = [f.name for f in dataclasses.fields(FlashUConfig) if f.name not in LAYOUT_SETTINGS]
    if not sep or key not in allowed:
        raise argparse.ArgumentTypeError(
            f"setting {text!r} is invalid: allowed KEY=VALUE with KEY one of {allowed} (the FFN pruning settings "
            f"{list(LAYOUT_SETTINGS)} come with the calibration and cannot change)")
    kind = type(getattr(defaults, key))
    try:
        return key, kind(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r} is invalid: {key} takes a {kind.__name__}, got "
                                         f"{raw.strip()!r}") from None
