"""The testbed scorer: exact on ground truth, tolerant of noise and blur, strict about corrupted images."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.testbed.scorer import (
    MIN_AREA,
    MISS_CAUSES,
    SHAPE_AREA,
    UNKNOWN,
    Detection,
    answer_summary,
    connected_components,
    describe,
    detect,
    geneval_summary,
    miss_cause,
    miss_causes,
    palette_labels,
    relation_holds,
    score_answer,
    score_prompt,
    shape_scores,
    wilson_interval,
)
from flashu_fx.testbed.world import (
    CATEGORIES,
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    GenPrompt,
    Obj,
    QAItem,
    Scene,
    cell_name,
    heldout_gen_prompts,
    heldout_questions,
    make_gen_prompt,
    render,
    render_batch,
    rng_for,
    sample_gen_prompt,
    sample_scene,
    scene_for_prompt,
    training_batch_gen,
)


def box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur, edges replicated: uint8 (H, W, 3) -> float (H, W, 3). A stand-in for a generator's soft edges."""
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255)


def recovered(scene: Scene, found: list[Detection], tol: float) -> bool:
    """Every object found once with its shape and colour, centroid within ``tol`` px, and nothing else."""
    if len(found) != len(scene.objects):
        return False
    return all(
        any(
            d.shape == o.shape and d.color == o.color and abs(d.cx - o.cx) <= tol and abs(d.cy - o.cy) <= tol
            for d in found
        )
        for o in scene.objects
    )


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = rng_for("heldout", 2)
    return [sample_scene(rng) for _ in range(500)]


# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def test_ground_truth_renders_of_heldout_prompts_score_correct():
    prompts = heldout_gen_prompts(600)
    rng = rng_for("heldout", 1)
    images = render_batch([scene_for_prompt(p, rng) for p in prompts])
    summary = geneval_summary(prompts, [score_prompt(p, im) for p, im in zip(prompts, images, strict=True)])
    assert set(summary["categories"]) == set(CATEGORIES)
    for category, stats in summary["categories"].items():
        assert stats["count"] == 100 and stats["accuracy"] >= 0.99, (category, stats)


def test_training_images_satisfy_their_prompts():
    prompts, images = training_batch_gen(rng_for("train", 11), 120)
    assert all(score_prompt(p, im) for p, im in zip(prompts, images, strict=True))


def test_detect_recovers_every_object(scenes):
    images = render_batch(scenes)
    assert np.mean([recovered(s, detect(im), tol=1.0) for s, im in zip(scenes, images, strict=True)]) >= 0.995
    for scene, image in zip(scenes[:50], images[:50], strict=True):  # on clean renders: exact
        found = sorted(detect(image), key=lambda d: (d.cy, d.cx))
        truth = sorted(scene.objects, key=lambda o: (o.cy, o.cx))
        assert [(d.shape, d.color, d.width, d.height) for d in found] == [
            (o.shape, o.color, o.size, o.size) for o in truth
        ]
        assert np.allclose([(d.cx, d.cy) for d in found], [(o.cx, o.cy) for o in truth])


def test_answers_agree_with_detections():
    for item in heldout_questions(400):
        found = detect(render(item.scene))
        words = item.question.split()
        if item.kind == "color":
            (hit,) = [d for d in found if d.shape == words[-1]]
            expected = hit.color
        elif item.kind == "count":
            expected = ("zero", "one", "two", "three", "four")[sum(d.shape + "s" == words[2] for d in found)]
        elif item.kind == "exist":
            expected = "yes" if any((d.color, d.shape) == (words[3], words[4]) for d in found) else "no"
        else:
            (hit,) = [d for d in found if d.shape == words[-1] and (len(words) == 4 or d.color == words[3])]
            expected = cell_name((int(hit.cy // CELL), int(hit.cx // CELL)))
        assert expected == item.answer, item


# ---------------------------------------------------------------------------------------------------------------
# Robustness


def test_detection_is_robust_to_noise(scenes):
    rng = np.random.default_rng(0)
    images = render_batch(scenes[:300])
    noisy = [recovered(s, detect(add_noise(im, 20, rng)), tol=1.0) for s, im in zip(scenes, images, strict=False)]
    assert np.mean(noisy) >= 0.97


def test_detection_is_robust_to_blur_and_noise(scenes):
    rng = np.random.default_rng(1)
    images = render_batch(scenes[:300])
    blurred = [recovered(s, detect(box_blur(im)), tol=1.0) for s, im in zip(scenes, images, strict=False)]
    assert np.mean(blurred) >= 0.99
    both = [recovered(s, detect(add_noise(box_blur(im), 30, rng)), 1.5) for s, im in zip(scenes, images, strict=False)]
    assert np.mean(both) >= 0.95


def test_dark_noise_and_specks_are_background():
    rng = np.random.default_rng(2)
    assert detect(rng.uniform(0, 110, (IMAGE_SIZE, IMAGE_SIZE, 3))) == []
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[5:9, 5:9] = COLORS["red"]  # 16 px < MIN_AREA
    assert MIN_AREA > 16 and detect(image) == []
    image[30:35, 30:35] = COLORS["blue"]  # 25 px: kept, whatever it looks like
    assert [d.color for d in detect(image)] == ["blue"]


def test_every_world_shape_has_a_template_that_matches_it_exactly():
    assert set(SHAPE_AREA) == set(SHAPES)
    for shape in SHAPES:
        for size in SIZES:
            ys, xs = np.nonzero(render(Scene((Obj.from_box(shape, "red", size, 5, 5),))).any(-1))
            scores = shape_scores(ys, xs)
            assert scores[shape] == 1.0 and max(v for k, v in scores.items() if k != shape) < 0.87, (shape, size)


def test_upside_down_triangle_is_a_triangle():
    image = render(Scene((Obj.from_box("triangle", "green", 12, 18, 18),)))
    (found,) = detect(image[::-1])
    assert found.shape == "triangle"


def test_touching_objects():
    """Two colours touching: split into both objects. Same colour touching: one blob that is no shape."""
    red, blue = Obj.from_box("square", "red", 10, 10, 10), Obj.from_box("square", "blue", 10, 20, 10)
    image = np.maximum(render(Scene((red,))), render(Scene((blue,))))
    assert sorted((d.shape, d.color) for d in detect(image)) == [("square", "blue"), ("square", "red")]
    same = np.maximum(render(Scene((red,))), render(Scene((dataclasses.replace(blue, color="red"),))))
    assert [d.shape for d in detect(same)] == [UNKNOWN]
    assert not score_prompt(make_gen_prompt("counting", [(None, "square", 2)]), same)


# ---------------------------------------------------------------------------------------------------------------
# Corrupted images fail


def free_cell(scene: Scene) -> int:
    used = {row * GRID + col for row, col in (o.cell for o in scene.objects)}
    return min(set(range(GRID * GRID)) - used)


def in_cell(shape: str, color: str, cell: int) -> Obj:
    row, col = divmod(cell, GRID)
    return Obj.from_box(shape, color, 10, col * CELL + 3, row * CELL + 3)


def mirrored(scene: Scene, relation: str) -> Scene:
    """Every object reflected across the image's vertical (left/right) or horizontal (above/below) midline."""
    objects = []
    for o in scene.objects:
        left, top = o.box
        if relation in ("left of", "right of"):
            left = IMAGE_SIZE - left - o.size
        else:
            top = IMAGE_SIZE - top - o.size
        objects.append(Obj.from_box(o.shape, o.color, o.size, left, top))
    return Scene(tuple(objects))


def other(options, value: str) -> str:
    return next(v for v in options if v != value)


def corruptions(prompt: GenPrompt, scene: Scene) -> dict[str, Scene]:
    """Scenes that break ``prompt``: its last named object deleted, reshaped or recoloured; one more for counting;
    the whole scene mirrored for position."""
    objects = list(scene.objects)
    color, shape, _ = prompt.objects[-1]
    i = next(i for i, o in enumerate(objects) if o.shape == shape)
    target = objects[i]

    def with_target(new: Obj) -> Scene:
        return Scene((*objects[:i], new, *objects[i + 1 :]))

    broken = {
        "deleted": Scene((*objects[:i], *objects[i + 1 :])),
        "reshaped": with_target(Obj.from_box(other(SHAPES, shape), target.color, target.size, *target.box)),
    }
    if color is not None:
        broken["recoloured"] = with_target(dataclasses.replace(target, color=other(COLORS, color)))
    if prompt.category == "counting":
        broken["one more"] = Scene((*objects, in_cell(shape, "white", free_cell(scene))))
    if prompt.category == "position":
        broken["mirrored"] = mirrored(scene, prompt.relation)
    return broken


@pytest.mark.parametrize("category", CATEGORIES)
def test_corruptions_fail(category):
    rng = rng_for("heldout", 3)
    for _ in range(10):
        prompt = sample_gen_prompt(rng, category)
        scene = scene_for_prompt(prompt, rng)
        image = render(scene)
        assert score_prompt(prompt, image)
        for name, corrupted in corruptions(prompt, scene).items():
            assert not score_prompt(prompt, render(corrupted)), (name, prompt.caption, corrupted)
        # in the image itself: blank one named object's pixels
        _, shape, _ = prompt.objects[-1]
        target = next(o for o in scene.objects if o.shape == shape)
        image[render(Scene((target,))).any(-1)] = 0
        assert not score_prompt(prompt, image), prompt.caption


EXPECTED_CAUSE = {"deleted": "a named shape missing", "reshaped": "a named shape missing", "one more": "too many",
                  "mirrored": "relation reversed"}


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_corruption_is_told_apart_by_its_cause(category):
    """miss_cause is "right" exactly when the scorer says yes, and names how a known corruption broke the picture."""
    rng = rng_for("heldout", 4)
    expected = {**EXPECTED_CAUSE, "recoloured": "other colours" if category == "color_attr" else "another colour"}
    if category == "counting":
        expected.update(deleted="too few", reshaped="too few")
    for _ in range(10):
        prompt = sample_gen_prompt(rng, category)
        scene = scene_for_prompt(prompt, rng)
        assert miss_cause(prompt, detect(render(scene))) == "right"
        broken = corruptions(prompt, scene)
        if category == "color_attr":  # each named object in the other's colour
            (c1, s1, _), (c2, s2, _) = prompt.objects
            swap = {s1: c2, s2: c1}
            broken["exchanged"] = Scene(tuple(dataclasses.replace(o, color=swap.get(o.shape, o.color))
                                              for o in scene.objects))
            expected["exchanged"] = "colours exchanged"
        for name, corrupted in broken.items():
            found = detect(render(corrupted))
            cause = miss_cause(prompt, found)
            assert cause in MISS_CAUSES[category] and (cause == "right") == score_prompt(prompt, render(corrupted))
            assert cause == expected[name], (name, prompt.caption, describe(found))


def test_miss_causes_tallies_every_cause_of_the_categories_present():
    rng = rng_for("heldout", 5)
    prompts = [sample_gen_prompt(rng, c) for c in ("position", "position", "counting")]
    scenes = [scene_for_prompt(p, rng) for p in prompts]
    found = [detect(render(scenes[0])), detect(render(mirrored(scenes[1], prompts[1].relation))),
             detect(render(Scene(())))]
    tally = miss_causes(prompts, found)
    assert tally == {"counting": {"right": 0, "too few": 1, "too many": 0},
                     "position": {"right": 1, "a named shape missing": 0, "relation reversed": 1, "neither way": 0}}
    with pytest.raises(ValueError, match="equally long"):
        miss_causes(prompts, found[:2])


def test_unnamed_objects_do_not_count_against_a_prompt():
    prompt = make_gen_prompt("colors", [("red", "circle", 1)])
    scene = Scene((in_cell("circle", "red", 0), in_cell("square", "blue", 4), in_cell("circle", "green", 8)))
    assert score_prompt(prompt, render(scene))
    assert score_prompt(
        make_gen_prompt("counting", [(None, "square", 2)]),
        render(Scene((in_cell("square", "red", 0), in_cell("square", "red", 2), in_cell("diamond", "red", 4)))),
    )


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def bfs_components(key: np.ndarray) -> np.ndarray:
    """Reference labelling: breadth-first search, components numbered in raster order of their first pixel."""
    h, w = key.shape
    out = np.full((h, w), -1, dtype=np.int64)
    count = 0
    for y in range(h):
        for x in range(w):
            if key[y, x] < 0 or out[y, x] >= 0:
                continue
            out[y, x], queue = count, deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and key[ny, nx] == key[cy, cx]:
                        out[ny, nx] = count
                        queue.append((ny, nx))
            count += 1
    return out


@settings(max_examples=150, deadline=None)
@given(
    key=st.integers(1, 16).flatmap(
        lambda h: st.integers(1, 16).flatmap(
            lambda w: st.lists(st.integers(-1, 2), min_size=h * w, max_size=h * w).map(
                lambda v: np.array(v).reshape(h, w)
            )
        )
    )
)
def test_connected_components_equals_bfs(key):
    assert np.array_equal(connected_components(key), bfs_components(key))


def test_connected_components_follows_a_snake():
    """One path winding over the whole grid: propagation must run to convergence, not a fixed number of sweeps."""
    key = np.full((31, 31), -1)
    key[::2] = 0
    key[1::4, -1] = 0
    key[3::4, 0] = 0
    labels = connected_components(key)
    assert labels.max() == 0 and np.array_equal(labels, bfs_components(key))


def test_palette_labels():
    image = np.array([[COLORS[c] for c in COLORS] + [(0, 0, 0), (100, 90, 110), (200, 30, 40), (140, 150, 230)]])
    assert palette_labels(image).tolist() == [[*range(len(COLORS)), -1, -1, 0, 6]]  # 6: white
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\).*got shape \(48, 48\)"):
        palette_labels(np.zeros((48, 48)))


def det(cx: float, cy: float, size: int = 10) -> Detection:
    return Detection("circle", "red", cx, cy, 80, size, size)


def test_relation_holds_is_genevals_rule():
    a, b = det(10, 24), det(38, 24)
    assert relation_holds(a, b, "left of") and relation_holds(b, a, "right of")
    assert (
        not relation_holds(a, b, "right of") and not relation_holds(a, b, "above") and not relation_holds(a, b, "below")
    )
    diagonal = det(30, 4)  # 45 degrees up-right of a: both relations hold (|dx| / norm > 0.5 after the margin)
    assert relation_holds(diagonal, a, "right of") and relation_holds(diagonal, a, "above")
    steep = det(14, 0)  # 80 degrees: above only
    assert relation_holds(steep, a, "above") and not relation_holds(steep, a, "right of")
    assert not relation_holds(det(11, 24), a, "right of")  # within the margin: no relation
    assert not relation_holds(a, a, "left of")
    with pytest.raises(ValueError, match="relation must be one of .* got 'behind'"):
        relation_holds(a, b, "behind")


@pytest.mark.parametrize(
    ("predicted", "ok"),
    [("top left", True), ("  Top   Left? ", True), ("top left.", True), ("top", False), ("top left please", False)],
)
def test_score_answer_normalizes(predicted, ok):
    item = QAItem(Scene(()), "where is the red circle", "top left", "where")
    assert score_answer(predicted, item) is ok


def test_wilson_interval_matches_reference_values():
    assert wilson_interval(15, 30) == pytest.approx((0.3315, 0.6685), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4) and wilson_interval(400, 400)[1] == 1.0
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    with pytest.raises(ValueError, match="successes=3, n=2"):
        wilson_interval(3, 2)


def test_geneval_summary_averages_categories():
    single = make_gen_prompt("single_object", [(None, "circle", 1)])
    counting = make_gen_prompt("counting", [(None, "square", 2)])
    prompts = [single] * 10 + [counting] * 30
    correct = [True] * 10 + [True] * 15 + [False] * 15
    summary = geneval_summary(prompts, correct)
    assert summary["categories"]["single_object"] == {"accuracy": 1.0, "count": 10, "ci95": wilson_interval(10, 10)}
    assert summary["categories"]["counting"]["accuracy"] == 0.5 and set(summary["categories"]) == {
        "single_object",
        "counting",
    }
    overall = summary["overall"]
    assert overall["accuracy"] == 0.75 and overall["count"] == 40  # the mean of categories, not pooled (0.625)
    (lo, hi), se = (
        overall["ci95"],
        np.hypot(*(np.diff(wilson_interval(k, n))[0] / 3.92 for k, n in ((10, 10), (15, 30)))) / 2,
    )
    assert lo == pytest.approx(0.75 - 1.96 * se, abs=1e-3) and hi == pytest.approx(0.75 + 1.96 * se, abs=1e-3)
    with pytest.raises(ValueError, match="prompts and correct must be non-empty and equally long, got 40 and 39"):
        geneval_summary(prompts, correct[:-1])
    with pytest.raises(ValueError, match="groups must be among"):
        geneval_summary([dataclasses.replace(single, category="spelling")], [True])


def test_answer_summary_pools_items():
    scene = Scene(())
    items = [QAItem(scene, "q", "a", "color")] * 4 + [QAItem(scene, "q", "a", "count")] * 6
    summary = answer_summary(items, [True] * 4 + [True, False, False, False, False, False])
    assert summary["overall"] == {"accuracy": 0.5, "count": 10, "ci95": wilson_interval(5, 10)}
    assert summary["kinds"]["color"]["accuracy"] == 1.0 and summary["kinds"]["count"]["count"] == 6
    assert set(summary["kinds"]) == {"color", "count"}


def test_describe_counts_what_was_found_in_first_seen_order():
    def found(color, shape):
        return Detection(shape, color, 0.0, 0.0, 60)

    assert describe([]) == "nothing"
    assert describe([found("red", "circle"), found("blue", "square"), found("red", "circle"),
                     found("green", UNKNOWN)]) == "2 red circles, a blue square, a green blob"
    scene = Scene((Obj.from_box("triangle", "white", 12, 2, 2), Obj.from_box("diamond", "cyan", 10, 19, 34)))
    assert describe(detect(render(scene))) == "a white triangle, a cyan diamond"  # raster order
