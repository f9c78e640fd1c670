"""``python -m harness <command> [options]``: one entry point, each command's module imported only when run.

python -m harness generate --prompt "a photo of a red circle"   # pictures from a checkpoint (the testbed's default)
python -m harness answer --image scene.png --question "what color is the circle"
python -m harness demo                     # every row on the testbed (or a tiny random model): pictures and answers
python -m harness bench --task gen --preset showo2-1.5b
python -m harness kernels ...              # harness.kernels
python -m harness calibrate ...            # harness.calibrate_cli
python -m harness analyze ...              # harness.analyze_cli
python -m harness floors --preset showo2-7b # the floor of each path at the device's measured rates
python -m harness quality                  # FlashU's quality cost on the trained testbed (harness.quality)
python -m harness <command> --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.arguments import command_parser

# command -> (module, what it does); each module has main(argv).
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("harness.generate", "pictures from prompts: PNGs, a captioned grid, JSON (torchrun: data parallel)"),
    "answer": ("harness.answer", "answers to questions about an image file, printed and written as JSON"),
    "demo": ("harness.demo", "run t2i and understanding once per registered row, write a PNG"),
    "bench": ("harness.bench", "time the registered rows of a task at the real shapes, write JSON"),
    "bench-vae": ("harness.bench_vae", "time the Wan2.1 VAE decode and encode at Show-o2's shapes, write JSON"),
    "kernels": ("harness.kernels", "benchmark and check the Triton kernels"),
    "calibrate": ("harness.calibrate_cli", "calibrate FlashU (FFN pruning scores) and save the result"),
    "analyze": ("harness.analyze_cli", "analyse FlashU decisions and errors"),
    "floors": ("harness.floors", "the physical floor of each benchmarked path, from the shapes (no GPU)"),
    "train-testbed": ("harness.train_testbed", "train the nano Show-o2 on the synthetic world and save it"),
    "quality": ("harness.quality", "score every FlashU row on the trained testbed: accuracy, latency, fidelity"),
}


# Further tools, each run as its own module: python -m harness.<name> --help.
MODULES = ("check_recompiles", "check_equivalence", "guard_cost", "profile_gen", "profile_und", "products")


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    epilog = (f"commands:\n{commands}\n\n'python -m harness <command> --help' shows a command's options; also "
              f"'python -m harness.<module> --help' for {', '.join(MODULES)}")
    parser = command_parser("python -m harness", "flashu-fx harness: one command per run.", epilog)
    parser.add_argument("command", choices=list(COMMANDS), help="what to run (its options follow it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:  # no command: the usage and the commands, not an error about a missing argument
        parser.print_help(sys.stderr)
        return 2
    ns = parser.parse_args(argv[:1])  # the command's own parser sees everything after it
    module_name = COMMANDS[ns.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(
            f"error: 'python -m harness {ns.command}' needs {module_name}, which is not in this checkout yet",
            file=sys.stderr,
        )
        return 2
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
