"""Test-only changes of the model's forward, to check that compiled paths follow the model they are handed."""

from __future__ import annotations

from flashu_fx.qwen2 import Qwen2MLP


class ScaledMLP(Qwen2MLP):
    """The FFN output scaled by 1.5."""

    def forward(self, x, ranges=None):
        return 1.5 * super().forward(x, ranges)


def scale_mlp(model, layer: int) -> None:
    """Replace decoder layer ``layer``'s MLP of ``model`` (in place) with a ``ScaledMLP`` holding its weights."""
    old = model.showo.model.layers[layer].mlp
    new = ScaledMLP(old.gate_proj.in_features, old.gate_proj.out_features)
    new.load_state_dict(old.state_dict())
    model.showo.model.layers[layer].mlp = new
