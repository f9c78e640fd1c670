"""flashu_fx.mmu's answer loops: the greedy loop that reads each id one step behind equals the synchronous one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.mmu import answer_question, greedy_on_device

VOCAB, EOS = 16, 3


def one_hot(token: int) -> torch.Tensor:
    logits = torch.zeros(1, 1, VOCAB)
    logits[0, 0, token] = 1.0
    return logits


def synchronous(script: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """The loop with a host read per step (``decode_cached`` with a ``step``), on scripted logits."""
    ids = [script[0]]
    for i in range(max_new_tokens - 1):
        if eos is not None and ids[-1] == eos:
            break
        ids.append(script[i + 1])
    return ids


@settings(deadline=None, max_examples=60)
@given(script=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), stop=st.booleans())
def test_reading_one_step_behind_gives_the_synchronous_ids(script: list[int], stop: bool) -> None:
    calls: list[int] = []

    def decode(token: torch.Tensor, i: int) -> torch.Tensor:
        assert token.shape == (1, 1) and int(token) == script[i]  # fed the id it chose, on the device
        calls.append(i)
        return one_hot(script[i + 1])

    eos = EOS if stop else None
    got = greedy_on_device(decode, one_hot(script[0]), len(script), eos, progress=False)
    want = synchronous(script, len(script), eos)
    assert got == want
    # a stop token costs at most one step more than the synchronous loop ran
    assert len(want) - 1 <= len(calls) <= len(want)


def test_greedy_answers_equal_the_host_greedy_step(tiny_model) -> None:
    """answer_question's greedy path (on the device) against sampling at a vanishing temperature (a host step)."""
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    for stop in (False, True):
        greedy = answer_question(tiny_model, latents, [5, 6, 7, 8], max_new_tokens=10, stop_at_eos=stop)
        host = answer_question(tiny_model, latents, [5, 6, 7, 8], max_new_tokens=10, stop_at_eos=stop,
                               temperature=1e-9, top_k=None)
        assert greedy.ids == host.ids


@pytest.mark.gpu
def test_reading_one_step_behind_on_the_gpu() -> None:
    """The pinned-memory read and its event: the stop token is found while later steps are queued."""
    script = [7, 2, 9, EOS, 5, 6]
    steps = []

    def decode(token: torch.Tensor, i: int) -> torch.Tensor:
        assert token.is_cuda
        steps.append(i)
        return one_hot(script[i + 1]).cuda() + 0 * token.float()  # depends on the fed token, as a model does

    assert greedy_on_device(decode, one_hot(script[0]).cuda(), len(script), EOS, progress=False) == script[:4]
    assert steps == [0, 1, 2, 3]  # one step past the stop token, its id dropped
    assert greedy_on_device(decode, one_hot(script[0]).cuda(), 4, None, progress=False) == script[:4]
