"""``python -m harness <command> [options]``: one entry point, each command's module imported only when run.

python -m harness generate --prompt "a photo of a red circle"   # pictures from a checkpoint (the testbed's default)
python -m harness answer --image scene.png --question "what color is the circle"
python -m harness demo                     # every row on the testbed (or a tiny random model): pictures and answers
python -m harness bench --task gen --preset showo2-1.5b
python -m harness kernels ...              # harness.kernels
python -m harness calibrate ...            # harness.calibrate_cli
python -m harness analyze ...              # harness.analyze_cli
python -m harness floors --preset showo2-7b # the floor of each path at the device's measured rates
python -m harness <command> --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, what it does); each module has main(argv).
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("harness.generate", "pictures from prompts: PNGs, a captioned grid, JSON (torchrun: data parallel)"),
    "answer": ("harness.answer", "answers to questions about an image file, printed and written as JSON"),
    "demo": ("harness.demo", "run t2i and understanding once per registered row, write a PNG"),
    "bench": ("harness.bench", "time the registered rows of a task at the real shapes, write JSON"),
    "kernels": ("harness.kernels", "benchmark and check the Triton kernels"),
    "calibrate": ("harness.calibrate_cli", "calibrate FlashU (FFN pruning scores) and save the result"),
    "analyze": ("harness.analyze_cli", "analyse FlashU decisions and errors"),
    "floors": ("harness.floors", "the physical floor of each benchmarked path, from the shapes (no GPU)"),
    "train-testbed": ("harness.train_testbed", "train the nano Show-o2 on the synthetic world and save it"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="flashu-fx harness",
        epilog="\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), help="what to run; '<command> --help' for its options")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
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
