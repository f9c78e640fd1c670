"""compiled.cuda_graphs.CudaGraphs: a step that advances state in place advances it once per call, captured or
replayed; the least recently used graph is dropped beyond the limit; a bad limit is refused."""

from __future__ import annotations

import pytest
import torch

from flashu_fx.compiled.cuda_graphs import CudaGraphs, tensor_addresses


@pytest.mark.parametrize("max_graphs", [0, -3])
def test_a_bad_limit_is_refused(max_graphs: int) -> None:
    with pytest.raises(ValueError, match=f"max_graphs={max_graphs} is invalid"):
        CudaGraphs(max_graphs)


@pytest.mark.gpu
def test_state_advances_once_per_call_and_outputs_are_the_step_s() -> None:
    counter = torch.zeros(1, device="cuda")
    graphs = CudaGraphs(max_graphs=1)

    def step():
        counter.add_(1)
        return counter * 10

    results = [float(graphs.run("add", step, "add")[0]) for _ in range(4)]
    assert results == [10.0, 20.0, 30.0, 40.0] and float(counter) == 4  # captured once, replayed three times
    assert graphs.captures["add"] == 1 and len(graphs) == 1
    graphs.run("other", step, "other")  # the limit drops "add"
    assert list(graphs.graphs) == ["other"] and float(counter) == 5


@pytest.mark.gpu
def test_call_copies_the_per_call_arguments_and_reads_the_others_in_place() -> None:
    weight = torch.ones(3, device="cuda")
    graphs = CudaGraphs()

    def fn(x, w, n):
        return x * w + n

    for value in (1.0, 2.0, 3.0):
        out = graphs.call("f", fn, (torch.full((3,), value, device="cuda"), weight, 0), per_call=[0, 2])
        assert out.tolist() == [value] * 3
    weight.fill_(2.0)  # read in place: the replay sees the new values without a new capture
    assert graphs.call("f", fn, (torch.ones(3, device="cuda"), weight, 0), per_call=[0, 2]).tolist() == [2.0] * 3
    assert graphs.call("f", fn, (torch.ones(3, device="cuda"), weight, 5), per_call=[0, 2]).tolist() == [7.0] * 3
    assert graphs.captures["graph"] == 2  # a new size value is a new key, a new tensor value is not


def test_tensor_addresses_name_where_the_tensors_at_the_positions_live() -> None:
    a, b = torch.zeros(2), torch.zeros(3)
    assert tensor_addresses((a, 7, b), [0, 1, 2]) == (a.data_ptr(), b.data_ptr())
    assert tensor_addresses((a, 7, b), [2]) == (b.data_ptr(),)


def test_kept_outputs_are_the_key_s_own_tensors_refreshed_on_every_run() -> None:
    """``keep_outputs``' copy (CPU: the wrapper alone): the first run's outputs become the key's tensors, later runs
    copy into them, so every run returns the same tensors at the same addresses; None leaves stay None."""
    graphs, value = CudaGraphs(), torch.zeros(3)
    body = graphs._copied_out("prefix", lambda: ((value + 1, None), [value * 2]))
    first = body()
    value.fill_(5.0)
    second = body()
    assert second[0][0] is first[0][0] and second[1][0] is first[1][0] and second[0][1] is None
    assert first[0][0].tolist() == [6.0] * 3 and first[1][0].tolist() == [10.0] * 3
    other = graphs._copied_out("other", lambda: (value,))()
    assert other[0] is not value and other[0].data_ptr() != first[0][0].data_ptr()  # per key, never the body's own


@pytest.mark.gpu
def test_kept_outputs_outlive_the_replay_of_a_graph_captured_before() -> None:
    """A graph captured first frees its temporaries into the shared pool at the end of its capture; a later graph's
    outputs may be placed there, and every replay of the first graph then writes over them. Kept outputs live
    outside the pool and stay what their own graph computed."""
    n = 1 << 20
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    graphs = CudaGraphs()

    def scratch():  # temporaries of the outputs' size, freed when its capture ends
        return ((x * 2 + 1) * 3 - 4).sum()

    graphs.run("scratch", scratch)
    first = graphs.run("kept", lambda: y * 5, keep_outputs=True)
    for _ in range(3):
        kept = graphs.run("kept", lambda: y * 5, keep_outputs=True)
        assert kept.data_ptr() == first.data_ptr()  # the first (uncaptured) run already returns the kept tensor
        graphs.run("scratch", scratch)
        torch.testing.assert_close(kept, y * 5, rtol=0, atol=0)


@pytest.mark.parametrize("uses", [0, -1, 1.5, "2"])
def test_a_bad_capture_use_is_refused(uses) -> None:
    with pytest.raises(ValueError, match=f"capture_on_use={uses!r} is invalid: allowed an integer >= 1"):
        CudaGraphs().run("k", lambda: None, capture_on_use=uses)


def test_kept_outputs_cannot_wait_for_a_later_capture() -> None:
    with pytest.raises(ValueError, match="capture_on_use > 1 cannot keep outputs"):
        CudaGraphs().run("k", lambda: None, keep_outputs=True, capture_on_use=2)


@pytest.mark.parametrize("capture_on_use", [2, 3, 5])
def test_uses_before_the_capturing_one_run_the_body_as_it_is(capture_on_use: int) -> None:
    """Before its capturing use a key runs its body directly (no CUDA needed, nothing copied, its own outputs); a
    key's count is its own, and beyond the graphs' limit the least recently counted key is forgotten."""
    graphs, x = CudaGraphs(max_graphs=2), torch.arange(3.0)
    for _ in range(capture_on_use - 1):
        out = graphs.call("f", lambda v, n: v * n, (x, 2), per_call=[0, 1], capture_on_use=capture_on_use)
        assert out.tolist() == [0.0, 2.0, 4.0] and len(graphs) == 0 and not graphs.captures
    assert list(graphs._uses.values()) == [capture_on_use - 1]  # keyed by the sizes too: ("f", (2,))
    graphs.run("g", lambda: x, capture_on_use=capture_on_use)
    graphs.run("h", lambda: x, capture_on_use=capture_on_use)
    assert list(graphs._uses) == ["g", "h"]  # the limit (2) dropped the oldest count


@pytest.mark.gpu
def test_the_capturing_use_captures_and_later_uses_replay() -> None:
    """capture_on_use=2: the first use runs the body, the second captures it (one real run, one capture), later
    uses replay; state advanced in place advances once per use all along."""
    counter = torch.zeros(1, device="cuda")
    graphs, runs = CudaGraphs(), []

    def step():
        runs.append(1)  # host side: counts the body's Python runs (the first use, then the real run and the capture)
        counter.add_(1)
        return counter * 10

    results = [float(graphs.run("add", step, "add", capture_on_use=2)[0]) for _ in range(4)]
    assert results == [10.0, 20.0, 30.0, 40.0] and float(counter) == 4
    assert len(runs) == 3 and graphs.captures["add"] == 1 and not graphs._uses
