"""The compiled path: ``flashu_backend`` for ``torch.compile`` and the runtime behind it."""

from flashu_fx.compiled.backend import FlashUBackend, flashu_backend
from flashu_fx.compiled.pipeline import generate_images_compiled, stepped_velocity

__all__ = ["FlashUBackend", "flashu_backend", "generate_images_compiled", "stepped_velocity"]
