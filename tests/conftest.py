"""Shared fixtures: a tiny fp32 Show-o2 with random weights, a ``device`` axis, and the ``gpu`` skip."""

from __future__ import annotations

import shutil

import pytest
import torch

from flashu_fx import Showo2, get_config, init_random_weights


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is absent (CI, the 2-core CPU box)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread():
    """One intra-op CPU thread for the session, restored after. The test models are tiny: a second thread buys
    nothing, and on a busy 2-core box OpenMP's spinning made the suite >10x slower (measured 2m30s vs 13s)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Dynamo's caches emptied after every test: code compiled by one test (and its cache entries, which count
    towards the recompile limit and take part in guard checks) must not decide how the next one compiles. Measured:
    the README's own loop, which runs under ``skip_guard_eval_unsafe`` after its warm-up, recompiled and failed
    when it ran after a harness test that had compiled the model in the same process."""
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Every test taking ``device`` runs on the CPU and, where there is one, on the GPU."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_model() -> Showo2:
    """The ``tiny`` preset in fp32, every weight random (seed 0). Shared: tests must not modify it."""
    return init_random_weights(Showo2(get_config("tiny")), seed=0).eval()


@pytest.fixture
def cpp_compiler() -> None:
    """Skips the test where inductor's CPU backend has no C++ compiler to build its kernels with."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler")
