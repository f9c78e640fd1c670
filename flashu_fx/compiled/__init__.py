"""The compiled path: ``flashu_backend`` for ``torch.compile`` and the runtime behind it."""

from flashu_fx.compiled.backend import FlashUBackend, flashu_backend
from flashu_fx.compiled.pipeline import generate_images_compiled, stepped_velocity
from flashu_fx.compiled.und_pipeline import answer_question_compiled

__all__ = [
    "FlashUBackend", "answer_question_compiled", "flashu_backend", "generate_images_compiled", "stepped_velocity"
]
