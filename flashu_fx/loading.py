"""Build a Show-o2 model from a local checkpoint directory, strictly. Nothing touches the network.

An official directory holds ``config.json`` (the constructor arguments of upstream's ``Showo2Qwen2_5``)
and ``pytorch_model.bin`` (or ``*.safetensors``). Every key must be present with its shape; one error
lists everything that is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from flashu_fx.config import PRESETS, Showo2Config
from flashu_fx.model import Showo2
from flashu_fx.shapes import round_up


class CheckpointMismatchError(ValueError):
    """The state dict does not match the model: lists missing, unexpected and mis-shaped keys."""


def config_from_upstream(upstream: dict, vocab_size: int | None = None) -> Showo2Config:
    """Map an upstream ``config.json`` to our config: the LLM from its hidden size, the grid and depth from it."""
    hidden = upstream.get("hidden_size")
    base = {p.hidden_size: p for p in PRESETS.values() if p.name.startswith("showo2-")}.get(hidden)
    if base is None:
        raise ValueError(f"unsupported Show-o2 model: hidden_size={hidden}; supported: 1536 (1.5B), 3584 (7B)")
    changes = {}
    if "image_latent_height" in upstream:
        grid = changes["image_grid"] = (int(upstream["image_latent_height"]), int(upstream["image_latent_width"]))
        # The token budget lives in the demo YAML, not config.json. Slot + 4 specials + 251 text tokens rounded up to
        # a multiple of 128 reproduces all three documented budgets: 27x27 -> 1024, 32x32 -> 1280, 64x64 -> 4352.
        changes["max_seq_len"] = round_up(grid[0] * grid[1] + 1 + 4 + 251, 128)
    if "num_diffusion_layers" in upstream:
        changes["head_num_layers"] = int(upstream["num_diffusion_layers"])
    if vocab_size or upstream.get("llm_vocab_size"):
        changes["vocab_size"] = int(vocab_size or upstream["llm_vocab_size"])
    return dataclasses.replace(base, **changes)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: its weight shards (``model*.safetensors``, Hugging Face's names, or
    else every ``*.safetensors``) if present, else ``pytorch_model.bin``. Preferring the weight names keeps other
    safetensors files beside the weights (a testbed's ``calibration_gen.safetensors``) out of the state dict."""
    shards = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    bin_file = path / "pytorch_model.bin"
    if not bin_file.exists():
        raise FileNotFoundError(f"{path} has neither *.safetensors nor pytorch_model.bin")
    return torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)


def check_state_dict(model: Showo2, state: dict[str, Tensor]) -> None:
    """Raise one CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                lines.append(f"  {len(items)} {title} key(s):\n    {shown}")
        raise CheckpointMismatchError(f"checkpoint does not match {model.config.name}:\n" + "\n".join(lines))


def load_state_dict_strict(model: Showo2, state: dict[str, Tensor]) -> Showo2:
    """Check every key and shape, then load (assign=True, so a meta-device model takes the tensors)."""
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:  # assign=True breaks the tie; the checkpoint stores both copies
        model.showo.lm_head.weight = model.showo.model.embed_tokens.weight
    model.reset_rope_buffers()  # non-persistent: they stayed on the meta device
    return model


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Showo2:
    """Load an official Show-o2 checkpoint directory.

    >>> model = from_pretrained("checkpoints/show-o2-1.5B", dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: a Show-o2 checkpoint directory holds config.json")
    state = read_state_dict(path)
    embed = state.get("showo.model.embed_tokens.weight")
    raw = json.loads(config_file.read_text())
    if "flashu_config" in raw:  # written by save_pretrained: our own config, any preset (tests use tiny ones)
        cfg = Showo2Config.from_dict(raw["flashu_config"])
    else:
        cfg = config_from_upstream(raw, None if embed is None else embed.shape[0])
    with torch.device("meta"):
        model = Showo2(cfg)
    load_state_dict_strict(model, state)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: Showo2, path: str | Path, safe: bool = True, max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and the weights (safetensors, or pytorch_model.bin) so ``from_pretrained`` reads them.

    ``max_shard_bytes``: split the safetensors weights into ``model-0000i-of-0000n.safetensors`` files of at most
    this size each (a single tensor larger than it gets a shard of its own).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"flashu_config": model.config.to_dict()}, indent=1))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # tied weights: two copies
    if safe:
        from safetensors.torch import save_file

        shards = _shards(state, max_shard_bytes)
        for old in path.glob("model*.safetensors"):  # a re-save must not leave shards of another split behind
            old.unlink()
        for i, shard in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name))
    else:
        torch.save(state, path / "pytorch_model.bin")
    return path


def _shards(state: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    """Consecutive groups of ``state``'s tensors of at most ``max_bytes`` each (one group when None)."""
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_bytes}")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
