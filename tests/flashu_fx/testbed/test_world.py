"""The testbed world: scene invariants, prompts and the scenes drawn for them, exact answers, rendering, streams."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.testbed.world import (
    CATEGORIES,
    CELL,
    COLORS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    PLURALS,
    QA_KINDS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    all_gen_prompts,
    askable_kinds,
    cell_name,
    heldout_gen_prompts,
    heldout_questions,
    make_gen_prompt,
    parse_caption,
    parse_question,
    render,
    render_batch,
    rng_for,
    sample_gen_prompt,
    sample_question,
    sample_scene,
    scene_for_prompt,
    training_batch_gen,
    training_batch_und,
    vocabulary,
)

seeds = st.integers(0, 2**63 - 1)


def check_scene(scene: Scene) -> None:
    """1-4 objects, one per grid cell, each box >= 1 px inside its cell, so boxes are >= 2 px apart."""
    assert 1 <= len(scene.objects) <= 4
    cells = [o.cell for o in scene.objects]
    assert len(set(cells)) == len(cells)
    for o in scene.objects:
        (left, top), (row, col) = o.box, o.cell
        assert col * CELL + 1 <= left and left + o.size <= (col + 1) * CELL - 1, o
        assert row * CELL + 1 <= top and top + o.size <= (row + 1) * CELL - 1, o
    for a, b in itertools.combinations(scene.objects, 2):
        (la, ta), (lb, tb) = a.box, b.box
        gap_x = max(lb - (la + a.size), la - (lb + b.size))  # background columns between the boxes (< 0: overlap)
        gap_y = max(tb - (ta + a.size), ta - (tb + b.size))
        assert max(gap_x, gap_y) >= 2, (a, b)


def pixel_sets(scene: Scene) -> list[set[tuple[int, int]]]:
    """Each object's rendered pixels as (row, column) sets, rendering it alone."""
    return [set(zip(*np.nonzero(render(Scene((o,))).any(-1)), strict=True)) for o in scene.objects]


# ---------------------------------------------------------------------------------------------------------------
# Streams


def test_rng_for_gives_deterministic_independent_streams():
    train = rng_for("train", 0).random(8)
    assert np.array_equal(train, rng_for("train", 0).random(8))
    assert not np.array_equal(train, rng_for("heldout", 0).random(8))
    assert not np.array_equal(train, rng_for("train", 1).random(8))


def test_rng_for_rejects_an_unknown_split():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'heldout'\), got 'test'"):
        rng_for("test", 0)


# ---------------------------------------------------------------------------------------------------------------
# Objects and scenes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_object_fills_its_box_and_its_centre_is_the_pixel_centroid(shape, size):
    obj = Obj.from_box(shape, "red", size, 17, 3)
    assert obj.box == (17, 3)
    ys, xs = np.nonzero(render(Scene((obj,))).any(-1))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (17, 17 + size - 1, 3, 3 + size - 1)
    assert xs.mean() == pytest.approx(obj.cx, abs=1e-9) and ys.mean() == pytest.approx(obj.cy, abs=1e-9)


def test_shapes_have_their_expected_fill():
    """Pixel count over box area, size 12: square full, circle ~pi/4, triangle and diamond about half."""
    fill = {s: render(Scene((Obj.from_box(s, "red", 12, 2, 2),))).any(-1).sum() / 144 for s in SHAPES}
    assert fill["square"] == 1.0
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert 0.5 <= fill["triangle"] <= 0.62 and 0.5 <= fill["diamond"] <= 0.62
    tri = render(Scene((Obj.from_box("triangle", "red", 12, 2, 2),))).any(-1)
    assert tri[2].sum() == 2 and tri[13].sum() == 12  # apex up, base down


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "hexagon"}, "shape must be one of .* got 'hexagon'"),
        ({"color": "orange"}, "color must be one of .* got 'orange'"),
        ({"size": 11}, r"size must be one of \(10, 12, 14\), got 11"),
        ({"left": 40}, r"\(left, top\) = \(40, 0\) with size 10 leaves the image"),
    ],
)
def test_obj_rejects_invalid_fields(kwargs, message):
    args = {"shape": "circle", "color": "red", "size": 10, "left": 0, "top": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        Obj.from_box(**args)


@settings(max_examples=200, deadline=None)
@given(seed=seeds)
def test_sample_scene_invariants(seed):
    scene = sample_scene(np.random.default_rng(seed))
    check_scene(scene)
    pixels = pixel_sets(scene)
    assert sum(map(len, pixels)) == len(set().union(*pixels))  # no two objects share a pixel


def test_sample_scene_uses_every_count_shape_colour_and_size():
    rng = rng_for("train", 3)
    scenes = [sample_scene(rng) for _ in range(400)]
    objects = [o for s in scenes for o in s.objects]
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4}
    assert {o.shape for o in objects} == set(SHAPES) and {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == set(SIZES)
    assert len({o.cell for o in objects}) == 9


# ---------------------------------------------------------------------------------------------------------------
# Generation prompts


@pytest.mark.parametrize(
    ("category", "objects", "relation", "caption"),
    [
        ("single_object", [(None, "circle", 1)], None, "a photo of a circle"),
        ("two_object", [(None, "circle", 1), (None, "square", 1)], None, "a photo of a circle and a square"),
        ("counting", [(None, "triangle", 3)], None, "a photo of three triangles"),
        ("colors", [("red", "square", 1)], None, "a photo of a red square"),
        ("position", [(None, "circle", 1), (None, "square", 1)], "left of", "a photo of a circle left of a square"),
        (
            "color_attr",
            [("red", "circle", 1), ("blue", "triangle", 1)],
            None,
            "a photo of a red circle and a blue triangle",
        ),
    ],
)
def test_captions_follow_geneval_templates(category, objects, relation, caption):
    assert make_gen_prompt(category, objects, relation).caption == caption


@pytest.mark.parametrize(
    ("category", "objects", "relation", "message"),
    [
        ("counting_things", [(None, "circle", 1)], None, "category must be one of"),
        ("single_object", [(None, "circle", 1), (None, "square", 1)], None, "names 1 object"),
        ("two_object", [(None, "circle", 1), (None, "circle", 1)], None, "two different shapes"),
        ("counting", [(None, "circle", 5)], None, "counts 2..4"),
        ("counting", [(None, "circle", 1)], None, "counts 2..4"),
        ("single_object", [("red", "circle", 1)], None, "only colors and color_attr"),
        ("color_attr", [("red", "circle", 1), (None, "square", 1)], None, "only colors and color_attr"),
        ("colors", [("mauve", "circle", 1)], None, "color must be None or one of"),
        ("single_object", [(None, "star", 1)], None, "shape must be one of"),
        ("position", [(None, "circle", 1), (None, "square", 1)], None, "relation for a position prompt"),
        ("position", [(None, "circle", 1), (None, "square", 1)], "behind", "relation for a position prompt"),
        ("two_object", [(None, "circle", 1), (None, "square", 1)], "above", "relation for a two_object prompt"),
    ],
)
def test_make_gen_prompt_rejects_malformed_prompts(category, objects, relation, message):
    with pytest.raises(ValueError, match=message):
        make_gen_prompt(category, objects, relation)


@settings(max_examples=300, deadline=None)
@given(seed=seeds, category=st.sampled_from((*CATEGORIES, None)))
def test_sampled_prompts_are_well_formed(seed, category):
    prompt = sample_gen_prompt(np.random.default_rng(seed), category)
    assert category in (None, prompt.category)
    assert re.fullmatch(r"a photo of [a-z]+( [a-z]+)*", prompt.caption) and len(prompt.caption.split()) <= 12
    assert make_gen_prompt(prompt.category, prompt.objects, prompt.relation) == prompt  # caption matches fields
    colors = [c for c, _, _ in prompt.objects]
    if prompt.category == "color_attr":
        assert colors[0] != colors[1]


def test_sample_gen_prompt_categories_are_uniform_and_validated():
    rng = rng_for("train", 0)
    counts = Counter(sample_gen_prompt(rng).category for _ in range(1200))
    assert set(counts) == set(CATEGORIES) and all(150 <= c <= 250 for c in counts.values())
    with pytest.raises(ValueError, match="category must be None or one of .* got 'colour'"):
        sample_gen_prompt(rng, "colour")


@settings(max_examples=300, deadline=None)
@given(seed=seeds, category=st.sampled_from(CATEGORIES))
def test_scene_for_prompt_satisfies_the_prompt_exactly(seed, category):
    rng = np.random.default_rng(seed)
    prompt = sample_gen_prompt(rng, category)
    scene = scene_for_prompt(prompt, rng)
    check_scene(scene)
    assert Counter(o.shape for o in scene.objects) == Counter({shape: n for _, shape, n in prompt.objects})
    for color, shape, _ in prompt.objects:
        assert color in (None, *(o.color for o in scene.objects if o.shape == shape))
    if prompt.relation is not None:
        (_, shape_a, _), (_, shape_b, _) = prompt.objects
        (a,), (b,) = ([o for o in scene.objects if o.shape == s] for s in (shape_a, shape_b))
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[prompt.relation]
        offset = np.array([a.cx - b.cx, a.cy - b.cy])
        along, across = sign * offset[axis], abs(offset[1 - axis])
        assert along >= 10.6 and across <= 0.81 * along, (prompt.caption, scene)  # within 39 degrees


# ---------------------------------------------------------------------------------------------------------------
# Questions


def true_answer(scene: Scene, question: str) -> str:
    """The answer, worked out from the question's words (the description must name exactly one object)."""
    words = question.split()
    if question.startswith("what color is the "):
        (obj,) = [o for o in scene.objects if o.shape == words[-1]]
        return obj.color
    if question.startswith("how many "):
        shape = {plural: shape for shape, plural in PLURALS.items()}[words[2]]
        return NUMBER_WORDS[sum(o.shape == shape for o in scene.objects)]
    if question.startswith("is there a "):
        return "yes" if any((o.color, o.shape) == (words[3], words[4]) for o in scene.objects) else "no"
    assert question.startswith("where is the ")
    (obj,) = [o for o in scene.objects if o.shape == words[-1] and (len(words) == 4 or o.color == words[3])]
    return cell_name(obj.cell)


@settings(max_examples=300, deadline=None)
@given(seed=seeds, kind=st.sampled_from((*QA_KINDS, None)))
def test_sampled_answers_are_true(seed, kind):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    if kind is not None and kind not in askable_kinds(scene):
        with pytest.raises(ValueError, match=f"kind '{kind}' has no well-defined answer"):
            sample_question(scene, rng, kind)
        return
    item = sample_question(scene, rng, kind)
    assert item.scene == scene and kind in (None, item.kind)
    assert item.answer == true_answer(scene, item.question)


def test_questions_need_a_unique_description():
    twins = Scene((Obj.from_box("circle", "red", 10, 1, 1), Obj.from_box("circle", "red", 10, 17, 1)))
    assert askable_kinds(twins) == ("count", "exist")
    rng = rng_for("train", 0)
    for kind in ("color", "where"):
        with pytest.raises(ValueError, match=f"kind '{kind}' has no well-defined answer"):
            sample_question(twins, rng, kind)
    with pytest.raises(ValueError, match="kind must be None or one of .* got 'size'"):
        sample_question(twins, rng, "size")
    pair = Scene((Obj.from_box("circle", "red", 10, 1, 1), Obj.from_box("circle", "blue", 10, 33, 33)))
    assert askable_kinds(pair) == ("count", "exist", "where")  # "the red circle" is unique, "the circle" is not
    assert sample_question(pair, rng, "where").question in ("where is the red circle", "where is the blue circle")


def test_answer_distributions():
    rng = rng_for("train", 1)
    answers, hard_no = {kind: Counter() for kind in QA_KINDS}, 0
    for _ in range(2000):
        item = sample_question(sample_scene(rng), rng)
        answers[item.kind][item.answer] += 1
        shape = item.question.split()[-1]
        hard_no += item.kind == "exist" and item.answer == "no" and any(o.shape == shape for o in item.scene.objects)
    assert 0.44 <= answers["exist"]["yes"] / answers["exist"].total() <= 0.56
    assert hard_no >= 0.6 * answers["exist"]["no"]  # ~0.72: half pick a present shape (uniform picks give ~0.43)
    assert set(answers["where"]) == {cell_name((r, c)) for r in range(3) for c in range(3)}
    assert set(answers["color"]) == set(COLORS)
    assert {"zero", "one", "two", "three"} <= set(answers["count"]) <= set(NUMBER_WORDS)


def test_cell_names():
    names = [cell_name((r, c)) for r in range(3) for c in range(3)]
    assert names == ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_is_black_with_exact_palette_colours():
    scene = sample_scene(rng_for("train", 4))
    image = render(scene)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    for obj, pixels in zip(scene.objects, pixel_sets(scene), strict=True):
        assert all(tuple(image[y, x]) == COLORS[obj.color] for y, x in pixels)
    covered = set().union(*pixel_sets(scene))
    background = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    background[tuple(np.array(sorted(covered)).T)] = False
    assert not image[background].any()


def test_render_batch_equals_render():
    rng = rng_for("train", 5)
    scenes = [sample_scene(rng) for _ in range(150)]
    scenes += [scene_for_prompt(sample_gen_prompt(rng), rng) for _ in range(150)]
    scenes.insert(7, Scene(()))
    assert np.array_equal(render_batch(scenes), np.stack([render(s) for s in scenes]))
    assert render_batch([]).shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert not render_batch([Scene(())]).any()


# ---------------------------------------------------------------------------------------------------------------
# Data sets


def test_heldout_sets_are_round_robin_and_deterministic():
    prompts = heldout_gen_prompts(12)
    assert [p.category for p in prompts] == list(CATEGORIES) * 2
    assert prompts == heldout_gen_prompts(12) and prompts != heldout_gen_prompts(12, seed=1)
    items = heldout_questions(8)
    assert [i.kind for i in items] == list(QA_KINDS) * 2
    assert items == heldout_questions(8) and items != heldout_questions(8, seed=1)
    for item in items:
        assert item.answer == true_answer(item.scene, item.question)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        heldout_gen_prompts(-1)
    with pytest.raises(ValueError, match="n must be >= 0, got -2"):
        heldout_questions(-2)


def test_heldout_and_train_streams_differ():
    heldout = heldout_gen_prompts(60)
    train_rng = rng_for("train", 0)
    train = [sample_gen_prompt(train_rng, p.category) for p in heldout]
    assert sum(h == t for h, t in zip(heldout, train, strict=True)) < 30
    train_scenes = {i.scene for i in training_batch_und(rng_for("train", 0), 40)[0]}
    assert not train_scenes & {i.scene for i in heldout_questions(40)}


def test_training_batches():
    prompts, images = training_batch_gen(rng_for("train", 7), 96)
    assert len(prompts) == 96 and images.shape == (96, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert set(p.category for p in prompts) == set(CATEGORIES)
    assert images.reshape(96, -1).any(1).all()
    again_prompts, again_images = training_batch_gen(rng_for("train", 7), 96)
    assert again_prompts == prompts and np.array_equal(again_images, images)
    # the images are renders of scenes satisfying the prompts: replay the stream
    rng = rng_for("train", 7)
    replay = [sample_gen_prompt(rng) for _ in range(96)]
    assert np.array_equal(render_batch([scene_for_prompt(p, rng) for p in replay]), images)

    items, images = training_batch_und(rng_for("train", 8), 80)
    assert images.shape == (80, IMAGE_SIZE, IMAGE_SIZE, 3) and set(i.kind for i in items) == set(QA_KINDS)
    assert np.array_equal(images, render_batch([i.scene for i in items]))
    assert all(i.answer == true_answer(i.scene, i.question) for i in items)


@given(weights=st.lists(st.integers(0, 4), min_size=len(CATEGORIES), max_size=len(CATEGORIES)).filter(any),
       seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_category_weights_set_the_mix(weights, seed):
    prompts, _ = training_batch_gen(rng_for("train", seed), 300, weights)
    counts = np.array([sum(p.category == c for p in prompts) for c in CATEGORIES])
    assert (counts[np.array(weights) == 0] == 0).all()  # a zero weight never draws its category
    expected = 300 * np.array(weights) / sum(weights)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected + 1))  # within 5 sigma of its share


@pytest.mark.parametrize("weights", [(1, 1), (0,) * 6, (1, 1, 1, 1, 1, float("nan")), (1, 1, 1, 1, 1, -1)])
def test_bad_category_weights_are_refused(weights):
    with pytest.raises(ValueError, match="category_weights"):
        training_batch_gen(rng_for("train", 0), 4, weights)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_is_exactly_the_words_in_use():
    rng = rng_for("train", 9)
    texts = [sample_gen_prompt(rng).caption for _ in range(2000)]
    for item in training_batch_und(rng, 2000)[0]:
        texts += [item.question, item.answer]
    used = {w for t in texts for w in t.split()}
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(re.fullmatch("[a-z]+", w) for w in vocab)
    assert used == set(vocab)
    assert max(len(t.split()) for t in texts) <= 12


def test_every_prompt_of_the_world_is_listed_once_and_parses_back():
    prompts = all_gen_prompts()
    assert Counter(p.category for p in prompts) == dict(single_object=4, two_object=12, counting=12, colors=28,
                                                         position=48, color_attr=588)
    assert len({p.caption for p in prompts}) == len(prompts)
    assert all(parse_caption(p.caption) == p for p in prompts)


@given(seed=seeds, category=st.sampled_from(CATEGORIES), upper=st.booleans(), spaces=st.integers(1, 3),
       stop=st.booleans())
def test_parse_caption_reads_sampled_captions_whatever_the_case_spacing_and_full_stop(seed, category, upper, spaces,
                                                                                       stop):
    prompt = sample_gen_prompt(rng_for("train", seed), category)
    text = (" " * spaces).join(prompt.caption.split()) + ("." if stop else "")
    assert parse_caption(f" {text.upper() if upper else text} ") == prompt


@pytest.mark.parametrize("text", [
    "a red circle",  # no template
    "a photo of a circle and a circle",  # two-object prompts name two shapes
    "a photo of a red circle left of a blue square",  # position prompts name no colours
    "a photo of one circle",  # counting is 2..4
    "a photo of a circle..",
    "",
])
def test_parse_caption_refuses_what_the_world_never_says(text):
    assert parse_caption(text) is None


@given(seed=seeds, upper=st.booleans(), mark=st.sampled_from(["", "?", "."]))
def test_parse_question_reads_sampled_questions_whatever_the_case_and_final_mark(seed, upper, mark):
    for item in heldout_questions(len(QA_KINDS), seed):  # one of each kind
        text = item.question.upper() if upper else item.question
        assert parse_question(f"{text}{mark}") == (item.question, item.kind)


@pytest.mark.parametrize("text", ["what is the color of the circle", "how many circle are there",
                                  "is there a circle", "where is the red", "what color is the circle??", ""])
def test_parse_question_refuses_what_the_world_never_asks(text):
    assert parse_question(text) is None
