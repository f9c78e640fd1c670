"""compiled.cuda_graphs.CudaGraphs: a step that advances state in place advances it once per call, captured or
replayed; the least recently used graph is dropped beyond the limit; a bad limit is refused."""

from __future__ import annotations

import pytest
import torch

from flashu_fx.compiled.cuda_graphs import CudaGraphs


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
