"""The compiled path: ``flashu_backend`` for ``torch.compile`` and the runtime behind it."""

from flashu_fx.compiled.backend import (
    BACKEND_OPTIONS,
    FlashUBackend,
    backend_from_options,
    flashu_backend,
    lean_guard_options,
    register_flashu_backend,
)
from flashu_fx.compiled.pipeline import generate_images_compiled, stepped_velocity
from flashu_fx.compiled.und_pipeline import answer_question_compiled

# torch.compile(model, backend="flashu", options={...}) works once flashu_fx.compiled is imported.
register_flashu_backend()

__all__ = [
    "BACKEND_OPTIONS",
    "backend_from_options",
    "lean_guard_options",
    "register_flashu_backend",
    "FlashUBackend", "answer_question_compiled", "flashu_backend", "generate_images_compiled", "stepped_velocity"
]
