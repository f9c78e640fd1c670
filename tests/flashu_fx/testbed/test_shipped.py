"""The shipped trained testbed: it loads, it draws what held-out prompts ask for, it answers held-out questions,
and compiled FlashU scores as eager FlashU does on the same prompts (CPU, fp32, a few items).

The thresholds sit well below what the testbed scored on 200 held-out items (docs/QUALITY.md, run 11: single
objects 1.00, colours 1.00, every answer kind 1.00), so they fail when the weights,
the codec, the tokenizer or a pipeline break, not by chance.
"""

from __future__ import annotations

import pytest
import torch

from flashu_fx.calibration import prepare_pruned_model
from flashu_fx.compiled import flashu_backend, generate_images_compiled
from flashu_fx.flashu_gen import generate_images_flashu
from flashu_fx.mmu import answer_question
from flashu_fx.t2i import generate_images
from flashu_fx.testbed import codec, scorer, world
from flashu_fx.testbed.checkpoint import SHIPPED_DIR, flashu_config, load_testbed

STEPS = 20  # fewer grid points than the testbed's 50 keep the test short; the easy categories survive it


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def easy_prompts(n: int) -> list[world.GenPrompt]:
    """Held-out single-object and colour prompts (the categories the baseline gets right almost always)."""
    prompts = world.heldout_gen_prompts(6 * n, seed=3)
    return [p for p in prompts if p.category in ("single_object", "colors")][:n]


def test_the_shipped_checkpoint_is_complete(testbed) -> None:
    assert testbed.path == SHIPPED_DIR and testbed.model.config.name == "testbed-nano"
    assert testbed.record["steps_done"] > 0 and "command" in testbed.record
    for task in ("gen", "und"):
        calib = testbed.calibration(task)  # checked against the weights' fingerprint
        assert calib.task == task and calib.scores.shape == (12, 512)
    total = sum(p.stat().st_size for p in SHIPPED_DIR.iterdir())
    assert total < 20 * 2**20  # the testbed ships in the repository


def test_baseline_draws_and_answers_held_out_items(testbed) -> None:
    prompts = easy_prompts(6)
    with torch.no_grad():
        latents = generate_images(testbed.model, [p.caption for p in prompts], testbed.tokenizer, steps=STEPS,
                                  guidance=testbed.guidance, seeds=list(range(len(prompts))))
    images = codec.decode(latents).numpy()
    correct = [scorer.score_prompt(p, im) for p, im in zip(prompts, images, strict=True)]
    assert sum(correct) >= 4, [p.caption for p, ok in zip(prompts, correct, strict=True) if not ok]

    items = [it for it in world.heldout_questions(24, seed=3) if it.kind in ("where", "exist")][:8]
    lat = codec.encode(torch.from_numpy(world.render_batch([it.scene for it in items])))
    answers = [answer_question(testbed.model, lat[i : i + 1], it.question, testbed.tokenizer, max_new_tokens=4).text
               for i, it in enumerate(items)]
    right = [scorer.score_answer(a, it) for a, it in zip(answers, items, strict=True)]
    assert sum(right) >= 5, list(zip([it.question for it in items], answers, strict=True))


def test_compiled_flashu_scores_as_eager_flashu_does() -> None:
    """On its own copy: prepare_pruned_model permutes the FFN neurons in place."""
    torch._dynamo.reset()
    tb = load_testbed()
    configs = {"gen": flashu_config("gen"), "und": flashu_config("und")}
    layout = prepare_pruned_model(tb.model, {t: tb.calibration(t) for t in configs}, configs)
    prompts = easy_prompts(4)
    captions, seeds = [p.caption for p in prompts], list(range(len(prompts)))
    with torch.no_grad():
        eager = generate_images_flashu(tb.model, captions, configs["gen"], layout, tb.tokenizer, baseline_steps=STEPS,
                                       guidance=tb.guidance, seeds=seeds).latents
    backend = flashu_backend("gen", configs["gen"], layout)
    try:
        compiled = generate_images_compiled(torch.compile(tb.model, backend=backend), backend, captions,
                                            tb.tokenizer, baseline_steps=STEPS, guidance=tb.guidance, seeds=seeds)
    finally:
        torch._dynamo.reset()
    scores = [[scorer.score_prompt(p, im) for p, im in zip(prompts, codec.decode(x).numpy(), strict=True)]
              for x in (eager, compiled)]
    assert scores[0] == scores[1]
    cos = torch.nn.functional.cosine_similarity(eager.flatten(1), compiled.flatten(1))
    assert cos.min() > 0.999, cos
