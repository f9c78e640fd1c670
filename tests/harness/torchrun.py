"""Running a harness command under torchrun from a test: N gloo processes on the CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(command: str, args: list[str], cwd: Path, processes: int = 2, timeout: int = 240
                 ) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node processes -m harness command args`` (one intra-op thread per process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
              str(free_port()), "-m", "harness", command, *args]
    return subprocess.run(launch, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
