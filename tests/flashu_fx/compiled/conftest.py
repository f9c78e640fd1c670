"""Shared by the compiled-path tests: a fresh Dynamo per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles anew: Dynamo's per-code cache holds 8 entries, then silently runs eager."""
    torch._dynamo.reset()
    yield
