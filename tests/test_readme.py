"""The README's quickstart and own-loop example, run as written on a tiny checkpoint (path, device, dtype swapped)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from flashu_fx import save_pretrained

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_quickstart_and_own_loop_run_on_a_tiny_checkpoint(tiny_model, tmp_path) -> None:
    checkpoint = save_pretrained(tiny_model, tmp_path / "show-o2-tiny")
    blocks = python_blocks()
    assert len(blocks) == 2, "README.md: the quickstart, then the user's own sampling loop"
    code = "\n".join(blocks)
    swaps = {'"checkpoints/show-o2-1.5B"': repr(str(checkpoint)),
             'device, dtype = "cuda", torch.bfloat16': 'device, dtype = "cpu", torch.float32'}
    for old, new in swaps.items():
        assert old in code, f"the README quickstart no longer contains {old}: update this test"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    cfg = tiny_model.config
    assert namespace["latents"].shape == (1, cfg.latent_channels, *cfg.latent_size)
    assert torch.isfinite(namespace["latents"]).all()
    answer = namespace["answer"]
    assert answer.ids and answer.kept_positions is not None  # V-norm pruning ran
    assert set(namespace["layout"].ranges) == {"gen", "und"}
    mine = namespace["my_latents"]
    assert mine.shape == namespace["latents"].shape and torch.isfinite(mine).all()
    backend = namespace["backend"]
    assert len(backend.records) == namespace["calls"] == len(namespace["plans"])  # one record per planned call
