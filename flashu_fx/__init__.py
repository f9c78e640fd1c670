"""flashu-fx: FlashU (training-free, task-aware acceleration) for Show-o2, eager and as a torch.compile backend."""

from flashu_fx.calibration import Calibration, calibrate, prepare_pruned_model
from flashu_fx.compiled import flashu_backend, generate_images_compiled
from flashu_fx.config import PRESETS, Showo2Config, get_config
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.loading import CheckpointMismatchError, from_pretrained, save_pretrained
from flashu_fx.mmu import Answer, answer_question
from flashu_fx.model import Showo2, init_random_weights
from flashu_fx.schedule import StepPlan, gen_schedule
from flashu_fx.t2i import generate_images

__all__ = [
    "Calibration",
    "answer_question_flashu",
    "calibrate",
    "flashu_backend",
    "generate_images_compiled",
    "generate_images_flashu",
    "prepare_pruned_model",
    "PRESETS",
    "Answer",
    "CheckpointMismatchError",
    "FlashUConfig",
    "Showo2",
    "Showo2Config",
    "StepPlan",
    "answer_question",
    "from_pretrained",
    "gen_schedule",
    "generate_images",
    "get_config",
    "init_random_weights",
    "save_pretrained",
]
