"""Host time per compiled generation call spent in Dynamo's guards, at Show-o2's module depths.

    python -m harness.guard_cost --preset showo2-1.5b

The model has the preset's depths (LLM layers, SigLIP layers, head blocks: what sets the number of guards)
and the tiny preset's widths (so it builds in a second on a CPU). The compiled call runs a backend that returns a
do-nothing callable for the captured forward (the guards depend on the traced graph, not on the backend), so what
is timed is the compiled call's host path: Dynamo's guards plus the dispatch.
Rows: every guard, ``lean_guard_options()`` (module guards dropped except layer counts), and every module
guard dropped (torch's ``skip_guard_on_all_nn_modules_unsafe``, for comparison).
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from flashu_fx import Showo2, get_config, init_random_weights
from flashu_fx.compiled import lean_guard_options
from flashu_fx.layout import build_gen_batch
from harness.arguments import command_parser

VARIANTS = {
    "all guards": dict,
    "lean_guard_options()": lean_guard_options,
    "no module guards": lambda: {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
}


@torch.no_grad()
def guard_cost_us(preset: str, calls: int) -> dict[str, float]:
    """Microseconds per call for each of ``VARIANTS``, on the CPU."""
    depths, tiny = get_config(preset), get_config("tiny")
    cfg = dataclasses.replace(tiny, num_layers=depths.num_layers, und_num_layers=depths.und_num_layers,
                              head_num_layers=depths.head_num_layers)
    model = init_random_weights(Showo2(cfg)).eval()
    batch = build_gen_batch(cfg, [[3, 4]], guided=True)
    x, t = torch.randn(2, cfg.latent_channels, *cfg.latent_size), torch.full((2,), 0.5)
    velocity = torch.zeros_like(x)

    def do_nothing_backend(gm, example_inputs):  # stands in for the executor: only the host path remains
        return lambda *args: (velocity,)

    result = {}
    for name, options in VARIANTS.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=do_nothing_backend, options=options())
        for _ in range(3):
            compiled(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False)
        start = time.perf_counter()
        for _ in range(calls):
            compiled(batch.tokens, x, t, batch.offsets, batch.mask, return_logits=False)
        result[name] = 1e6 * (time.perf_counter() - start) / calls
    torch._dynamo.reset()
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = command_parser("python -m harness.guard_cost", __doc__)
    parser.add_argument("--preset", default="showo2-1.5b", help="whose depths to use")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per variant")
    args = parser.parse_args(argv)
    result = guard_cost_us(args.preset, args.calls)
    for name, us in result.items():
        print(f"{name:<22} {us:7.0f} us per call")
    print(json.dumps({"preset": args.preset, "us_per_call": result}))
    return result


if __name__ == "__main__":
    main()
