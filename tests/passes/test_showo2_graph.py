"""passes.showo2_graph: a captured Show-o2 forward maps back to its checkpoint keys; other graphs do not."""

from __future__ import annotations

import torch

from flashu_fx import Showo2, get_config, init_random_weights
from flashu_fx.layout import build_gen_batch
from passes.showo2_graph import match_showo2_graph


def capture(model, *args, **kwargs):
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    return seen["gm"], seen["inputs"]


def test_every_parameter_maps_to_its_graph_input() -> None:
    model = init_random_weights(Showo2(get_config("tiny-tied"))).eval()
    b = build_gen_batch(model.config, [[3, 4, 5]])
    gm, inputs = capture(model, b.tokens, torch.randn(2, 16, 8, 8), torch.rand(2), b.offsets, b.mask,
                         return_logits=False)
    state = model.state_dict()
    match, why = match_showo2_graph(gm, list(state))
    assert match is not None, why
    assert set(match.param_inputs) == set(state)
    for key, idx in match.param_inputs.items():
        assert inputs[idx].data_ptr() == state[key].data_ptr(), key
    assert inputs[match.user_inputs["tokens"]] is b.tokens
    assert match.num_outputs == 1


def test_foreign_graph_is_rejected_with_a_reason() -> None:
    gm, _ = capture(torch.nn.Linear(3, 3), torch.randn(2, 3))
    match, why = match_showo2_graph(gm, ["showo.model.embed_tokens.weight"])
    assert match is None and "tokens" in why
