"""The compiled path: ``flashu_backend`` for ``torch.compile``, the executors behind it, and the loops that drive it."""

from flashu_fx.compiled.backend import (
    BACKEND_OPTIONS,
    FlashUBackend,
    backend_from_options,
    flashu_backend,
    flashu_compiler,
    lean_guard_options,
    register_flashu_backend,
)
from flashu_fx.compiled.pipeline import compiled_batch, generate_images_compiled, stepped_velocity
from flashu_fx.compiled.und_pipeline import answer_question_compiled

# torch.compile(model, backend="flashu", options={...}) finds ``flashu_compiler`` through the package's
# "torch_dynamo_backends" entry point (setup.py); a checkout used without installing calls register_flashu_backend().

__all__ = [
    "BACKEND_OPTIONS",
    "backend_from_options",
    "flashu_compiler",
    "lean_guard_options",
    "register_flashu_backend",
    "FlashUBackend",
    "answer_question_compiled",
    "compiled_batch",
    "flashu_backend",
    "generate_images_compiled",
    "stepped_velocity",
]
