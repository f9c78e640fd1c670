"""Inputs that no pipeline can answer as asked raise one clear error, the same on the eager, eager FlashU and
compiled paths (``flashu_fx/inputs.py``), before any model call."""

from __future__ import annotations

import re

import pytest
import torch

from flashu_fx import FlashUConfig, answer_question, generate_images
from flashu_fx.compiled import answer_question_compiled, flashu_backend, generate_images_compiled
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.flashu_und import answer_question_flashu
from flashu_fx.tokenizer import get_tokenizer

GEN_FLASHU = FlashUConfig.for_task("gen", ffn_prune_ratio=0.0)  # no layout needed; the 0.7 grid stays
UND_FLASHU = FlashUConfig.for_task("und", ffn_prune_ratio=0.0)
BUDGET = 27  # the tiny preset's config.max_text_len


def eager_gen(model, prompts, guidance=5.0, steps=4):
    return generate_images(model, prompts, steps=steps, guidance=guidance)


def flashu_gen(model, prompts, guidance=5.0, steps=4):
    return generate_images_flashu(model, prompts, GEN_FLASHU, None, baseline_steps=steps, guidance=guidance)


def compiled_gen(model, prompts, guidance=5.0, steps=4, config=GEN_FLASHU):
    backend = flashu_backend("gen", config)
    return generate_images_compiled(torch.compile(model, backend=backend), backend, prompts, baseline_steps=steps,
                                    guidance=guidance)


def compiled_exact_gen(model, prompts, guidance=5.0, steps=4):
    return compiled_gen(model, prompts, guidance, steps, config=None)


def latents() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def eager_und(model, question):
    return answer_question(model, latents(), question, max_new_tokens=2)


def flashu_und(model, question):
    return answer_question_flashu(model, latents(), question, UND_FLASHU, None, max_new_tokens=2)


def compiled_und(model, question):
    backend = flashu_backend("und", UND_FLASHU)
    return answer_question_compiled(torch.compile(model, backend=backend), backend, latents(), question,
                                    max_new_tokens=2)


GEN_PATHS = {"eager": eager_gen, "flashu": flashu_gen, "compiled": compiled_gen}
UND_PATHS = {"eager": eager_und, "flashu": flashu_und, "compiled": compiled_und}


def exactly(message: str) -> str:
    """A ``match`` pattern for this whole message and nothing else."""
    return f"^{re.escape(message)}$"


# ---- prompts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GEN_PATHS)
def test_a_bare_string_is_not_a_list_of_prompts(tiny_model, path: str) -> None:
    message = ("prompts='a red cube' is a single string: allowed a list of prompts (strings or token-id lists), "
               "e.g. ['a red cube']")
    with pytest.raises(TypeError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, "a red cube")


@pytest.mark.parametrize("path", GEN_PATHS)
def test_one_prompt_of_ids_must_be_nested(tiny_model, path: str) -> None:
    with pytest.raises(TypeError, match=r"^prompts\[0\]=5 is invalid: allowed a string or a list of token ids"):
        GEN_PATHS[path](tiny_model, [5, 6, 7])


@pytest.mark.parametrize("path", GEN_PATHS)
@pytest.mark.parametrize(("prompt", "message"), [
    ("", "prompts[1]='' is empty: allowed a non-empty string or token-id list"),
    ("  ", "prompts[1]='  ' is empty: allowed a non-empty string or token-id list"),
    ([], f"prompts[1] is empty (0 tokens): allowed 1..{BUDGET} tokens"),
])
def test_an_empty_prompt_is_refused(tiny_model, path: str, prompt, message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, ["a cube", prompt])


@pytest.mark.parametrize("path", GEN_PATHS)
@pytest.mark.parametrize("prompt", [[5] * (BUDGET + 1), "x" * (BUDGET + 1)])  # ids, and bytes of the fallback
def test_a_prompt_over_the_budget_is_refused_not_cut(tiny_model, path: str, prompt) -> None:
    message = (f"prompts[1] has {BUDGET + 1} tokens, more than the budget config.max_text_len={BUDGET} (the "
               "model's text positions): shorten it")
    with pytest.raises(ValueError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, [[7], prompt])


@pytest.mark.parametrize("path", GEN_PATHS)
def test_a_prompt_at_the_budget_is_accepted(tiny_model, path: str) -> None:
    if path == "compiled":
        torch._dynamo.reset()
    out = GEN_PATHS[path](tiny_model, [[5] * BUDGET], steps=3)
    latents = out.latents if path == "flashu" else out
    assert latents.shape == (1, 16, 8, 8) and torch.isfinite(latents).all()


# ---- guidance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GEN_PATHS)
@pytest.mark.parametrize("guidance", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_guidance_must_be_finite_and_not_negative(tiny_model, path: str, guidance: float) -> None:
    message = f"guidance={guidance!r} is invalid: allowed a finite number >= 0 (0 = no guidance)"
    with pytest.raises(ValueError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, [[5, 6]], guidance=guidance)


@pytest.mark.parametrize("path", GEN_PATHS)
@pytest.mark.parametrize("bad", [float("nan"), -2.0])
def test_every_per_call_guidance_is_checked(tiny_model, path: str, bad: float) -> None:
    message = f"guidance[1]={bad!r} is invalid: allowed a finite number >= 0 (0 = no guidance)"
    with pytest.raises(ValueError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, [[5, 6]], guidance=[5.0, bad, 5.0])


@pytest.mark.parametrize("path", ["flashu", "compiled"])
def test_flashu_paths_take_one_guidance_scale(tiny_model, path: str) -> None:
    with pytest.raises(TypeError, match=r"^guidance=\[5.0, 5.0\] is invalid here: allowed one number"):
        GEN_PATHS[path](tiny_model, [[5, 6]], guidance=[5.0, 5.0], steps=4)


def test_eager_takes_a_valid_per_call_guidance(tiny_model) -> None:
    out = eager_gen(tiny_model, [[5, 6]], guidance=[5.0, 0.0, 2.5])
    assert torch.isfinite(out).all()


# ---- grid points ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["flashu", "compiled"])
@pytest.mark.parametrize("steps", [0, 1, 2, 2.5])
def test_flashu_grids_need_two_points_after_shortening(tiny_model, path: str, steps) -> None:
    message = (f"baseline_steps={steps!r} is invalid: allowed an integer >= 3 (baseline grid points; FlashU runs "
               "round(0.7 * baseline_steps) of them, at least 2)")
    with pytest.raises(ValueError, match=exactly(message)):
        GEN_PATHS[path](tiny_model, [[5, 6]], steps=steps)


@pytest.mark.parametrize(("path", "name"), [("eager", "steps"), ("compiled-exact", "baseline_steps")])
@pytest.mark.parametrize("steps", [0, 1])
def test_plain_grids_need_two_points(tiny_model, path: str, name: str, steps: int) -> None:
    run = {"eager": eager_gen, "compiled-exact": compiled_exact_gen}[path]
    message = f"{name}={steps} is invalid: allowed an integer >= 2 (grid points; model calls = points - 1)"
    with pytest.raises(ValueError, match=exactly(message)):
        run(tiny_model, [[5, 6]], steps=steps)


def test_num_points_refuses_a_grid_without_a_call() -> None:
    config = FlashUConfig.for_task("gen")
    assert (config.num_points(3), config.num_points(50), config.min_baseline_points()) == (2, 35, 3)
    with pytest.raises(ValueError, match=r"baseline_points=2 is invalid: .* allowed >= 3"):
        config.num_points(2)
    assert FlashUConfig.for_task("gen", step_fraction=0.25).min_baseline_points() == 6  # round(1.5) = 2


# ---- questions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", UND_PATHS)
@pytest.mark.parametrize("question", ["", " \n", []])
def test_an_empty_question_is_refused(tiny_model, path: str, question) -> None:
    message = f"question={question!r} is empty: allowed a non-empty string or token-id list"
    with pytest.raises(ValueError, match=exactly(message)):
        UND_PATHS[path](tiny_model, question)


@pytest.mark.parametrize("path", UND_PATHS)
def test_a_question_of_the_wrong_type_is_refused(tiny_model, path: str) -> None:
    with pytest.raises(TypeError, match=r"^question=\[\[1, 2\]\] is invalid: allowed a string or a list of token"):
        UND_PATHS[path](tiny_model, [[1, 2]])


# ---- tokenizer --------------------------------------------------------------------------------------
def test_a_missing_tokenizer_directory_is_named(tiny_model, tmp_path) -> None:
    missing = tmp_path / "qwen-tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer directory {str(missing)!r} does not exist")):
        get_tokenizer(tiny_model.config, missing)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match="a-file"):
        get_tokenizer(tiny_model.config, tmp_path / "a-file")
