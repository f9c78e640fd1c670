"""The testbed's world: flat-coloured shapes on black, GenEval-style prompts and VQA items, all with exact truth.

A scene is 1-4 objects, each inside its own cell of a 3x3 grid of 16-px cells (one object per cell), jittered
within the cell and at least 1 px from the cell's border, so two objects are always >= 2 px apart: connected
components stay clean and "which cell" answers "where". Shapes are drawn without anti-aliasing, so every object
pixel is exactly its palette colour. The palette is the seven non-black corners of the RGB cube: any two colours
(and black) are >= 255 apart, and nearest-colour labelling is a per-channel threshold at half intensity.

Captions follow GenEval's six categories; ``scene_for_prompt`` draws a scene that satisfies its prompt exactly,
which is what the generator is trained on. Everything is deterministic given a numpy Generator; ``rng_for``
gives independent train and held-out streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

IMAGE_SIZE = 48  # pixels, square RGB uint8
GRID = 3
CELL = IMAGE_SIZE // GRID  # 16 px
# Even sizes only: every shape then has a 2-px wide tip or apex, which survives a generator's blur (a 1-px diamond
# tip does not, and the blunted diamond reads as a circle).
SIZES = (10, 12, 14)
MAX_OBJECTS = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")  # index = count
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
QA_KINDS = ("color", "count", "exist", "where")
SPLIT_ID = {"train": 0, "heldout": 1}
COUNTING_RANGE = (2, 4)  # counting prompts ask for two..four objects

# Every word a caption, question or answer can use comes from these templates and the word lists above.
CAPTION_PREFIX = "a photo of"
CAPTION_JOIN = "and"
COLOR_QUESTION = "what color is the {shape}"
COUNT_QUESTION = "how many {plural} are there"
EXIST_QUESTION = "is there a {color} {shape}"
WHERE_QUESTION = "where is the {target}"
YES_NO = ("yes", "no")
ROW_WORDS = ("top", "", "bottom")
COL_WORDS = ("left", "", "right")

SHAPE_INDEX = {shape: i for i, shape in enumerate(SHAPES)}
COLOR_INDEX = {color: i for i, color in enumerate(COLORS)}
SIZE_INDEX = {size: i for i, size in enumerate(SIZES)}
_COLOR_NAMES = tuple(COLORS)
PALETTE = np.array(list(COLORS.values()), dtype=np.uint8)  # (num colours, 3), COLOR_INDEX order


def _shape_rule(shape: str, size: int, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Whether local pixel (ty, tx) (row, column from the box's top-left) lies in the shape. Same shapes -> bool.

    Integer arithmetic in doubled coordinates (u, v = twice the offset from the box centre), so the pixel set is
    exact: no float ties on the boundary. The triangle points up, its base the box's bottom row.
    """
    u, v = 2 * tx - (size - 1), 2 * ty - (size - 1)
    box = (tx >= 0) & (tx < size) & (ty >= 0) & (ty < size)
    if shape == "circle":
        inside = u * u + v * v <= size * size
    elif shape == "square":
        inside = np.ones_like(box)
    elif shape == "triangle":
        inside = np.abs(u) <= ty + 1
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= size
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return box & inside


@cache
def _template(shape: str, size: int) -> np.ndarray:
    """The shape's pixels in its (size, size) box -> bool (size, size). Read-only."""
    ty, tx = np.mgrid[0:size, 0:size]
    mask = _shape_rule(shape, size, ty, tx)
    mask.flags.writeable = False
    return mask


@cache
def _centroid_offset(shape: str, size: int) -> tuple[float, float]:
    """(x, y) of the shape's pixel centroid relative to its box's top-left pixel."""
    ys, xs = np.nonzero(_template(shape, size))
    return float(xs.mean()), float(ys.mean())


@cache
def _template_offsets(shape: str, size: int) -> np.ndarray:
    """The template's pixels as flat image offsets from its box's top-left pixel -> int64 (pixels,)."""
    ty, tx = np.nonzero(_template(shape, size))
    return ty * IMAGE_SIZE + tx


@dataclass(frozen=True)
class Obj:
    """One shape. (cx, cy) is the centroid of its pixels in pixel-index coordinates (column, row of a pixel's
    centre; x to the right, y downward): for the triangle that is below its box centre. Build from a box with
    ``Obj.from_box``."""

    shape: str
    color: str
    size: int
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPE_INDEX:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLOR_INDEX:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.size not in SIZE_INDEX:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        left, top = self.box
        if not (0 <= left <= IMAGE_SIZE - self.size and 0 <= top <= IMAGE_SIZE - self.size):
            raise ValueError(f"object box at (left, top) = ({left}, {top}) with size {self.size} leaves the image")

    @classmethod
    def from_box(cls, shape: str, color: str, size: int, left: int, top: int) -> Obj:
        """The object whose (size x size) box has its top-left pixel at column ``left``, row ``top``."""
        ox, oy = _centroid_offset(shape, size) if shape in SHAPE_INDEX and size in SIZE_INDEX else (0.0, 0.0)
        return cls(shape, color, size, left + ox, top + oy)

    @property
    def box(self) -> tuple[int, int]:
        """(left, top): the column and row of the box's top-left pixel."""
        ox, oy = _centroid_offset(self.shape, self.size)
        return round(self.cx - ox), round(self.cy - oy)

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the 3x3 grid cell holding the centroid."""
        return min(int(self.cy // CELL), GRID - 1), min(int(self.cx // CELL), GRID - 1)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # 1-4 objects, each in its own grid cell


@dataclass(frozen=True)
class GenPrompt:
    """A generation prompt. ``objects`` holds (color or None, shape, count) per noun phrase, in caption order;
    ``relation`` (position only) relates objects[0] to objects[1]: "a circle left of a square" has the circle
    left of the square. Build with ``make_gen_prompt`` so the caption matches the fields."""

    category: str
    caption: str
    objects: tuple[tuple[str | None, str, int], ...]
    relation: str | None = None


@dataclass(frozen=True)
class QAItem:
    scene: Scene
    question: str
    answer: str
    kind: str  # one of QA_KINDS


def rng_for(split: str, seed: int) -> np.random.Generator:
    """The random stream of a split: train and heldout streams are independent for every seed."""
    if split not in SPLIT_ID:
        raise ValueError(f"split must be one of {tuple(SPLIT_ID)}, got {split!r}")
    return np.random.default_rng([SPLIT_ID[split], seed])


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def _below(rng: np.random.Generator, n: int) -> int:
    """Uniform in 0..n-1 from one float draw, ~3x cheaper than a scalar ``rng.integers`` (training samples
    millions of scenes)."""
    return int(rng.random() * n)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[_below(rng, len(items))]


def _distinct_pair(rng: np.random.Generator, items: Sequence[str]) -> tuple[str, str]:
    """Two different items, uniform over ordered pairs."""
    first = _below(rng, len(items))
    second = (first + 1 + _below(rng, len(items) - 1)) % len(items)  # uniform over the others
    return items[first], items[second]


def _random_objs(
    rng: np.random.Generator, specs: Sequence[tuple[str | None, str | None]], cells: Sequence[int]
) -> tuple[Obj, ...]:
    """One object per (color, shape) spec (None: random) in the matching grid cell (row-major 0..8): random size,
    its box >= 1 px inside the cell. All draws in one call, which is most of the sampling time."""
    draws = rng.random((len(specs), 5))  # shape, colour, size, x offset, y offset
    objects = []
    for (color, shape), cell, (u_shape, u_color, u_size, u_x, u_y) in zip(specs, cells, draws, strict=True):
        size = SIZES[int(u_size * len(SIZES))]
        slack = CELL - size - 1  # box offsets within the cell: 1 .. CELL - size - 1
        row, col = divmod(int(cell), GRID)
        objects.append(
            Obj.from_box(
                shape or SHAPES[int(u_shape * len(SHAPES))],
                color or _COLOR_NAMES[int(u_color * len(_COLOR_NAMES))],
                size,
                col * CELL + 1 + int(u_x * slack),
                row * CELL + 1 + int(u_y * slack),
            )
        )
    return tuple(objects)


def _cells(rng: np.random.Generator, count: int) -> list[int]:
    """``count`` distinct grid cells (row-major 0..8) in random order."""
    return rng.permutation(GRID * GRID)[:count].tolist()


def sample_scene(rng: np.random.Generator) -> Scene:
    """1-4 objects (count uniform), random shapes and colours, in distinct random cells."""
    count = 1 + _below(rng, MAX_OBJECTS)
    return Scene(_random_objs(rng, [(None, None)] * count, _cells(rng, count)))


# ---------------------------------------------------------------------------------------------------------------
# Generation prompts


def _phrase(color: str | None, shape: str, count: int) -> str:
    """'a red circle', 'a circle', 'three triangles' (all shape and colour words start with a consonant)."""
    noun = shape if count == 1 else PLURALS[shape]
    words = ["a" if count == 1 else NUMBER_WORDS[count], *([color] if color else []), noun]
    return " ".join(words)


def make_gen_prompt(
    category: str, objects: Sequence[tuple[str | None, str, int]], relation: str | None = None
) -> GenPrompt:
    """The prompt with these fields and its caption, checked against the category's structure."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    objects = tuple((color, shape, int(count)) for color, shape, count in objects)
    expected = {"single_object": 1, "colors": 1, "counting": 1}.get(category, 2)
    if len(objects) != expected:
        raise ValueError(f"a {category} prompt names {expected} object(s), got objects={objects}")
    for color, shape, count in objects:
        if shape not in SHAPE_INDEX:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r} in objects={objects}")
        if color is not None and color not in COLOR_INDEX:
            raise ValueError(f"color must be None or one of {tuple(COLORS)}, got {color!r} in objects={objects}")
        lo, hi = COUNTING_RANGE if category == "counting" else (1, 1)
        if not lo <= count <= hi:
            raise ValueError(f"a {category} prompt counts {lo}..{hi} per object, got {count} in objects={objects}")
    if (category in ("colors", "color_attr")) != all(color is not None for color, _, _ in objects):
        raise ValueError(f"only colors and color_attr prompts name (all) colours, got objects={objects}")
    if len(objects) == 2 and objects[0][1] == objects[1][1]:
        raise ValueError(f"two-object prompts name two different shapes, got objects={objects}")
    if (category == "position") != (relation is not None) or (relation is not None and relation not in RELATIONS):
        allowed = RELATIONS if category == "position" else (None,)
        raise ValueError(f"relation for a {category} prompt must be one of {allowed}, got {relation!r}")
    phrases = [_phrase(*obj) for obj in objects]
    middle = f" {relation} " if relation else f" {CAPTION_JOIN} "
    return GenPrompt(category, f"{CAPTION_PREFIX} {middle.join(phrases)}", objects, relation)


def sample_gen_prompt(rng: np.random.Generator, category: str | None = None) -> GenPrompt:
    """A random prompt of ``category`` (None: uniform over CATEGORIES). Two-object prompts use two different
    shapes; color_attr uses two different colours, so getting the binding right matters."""
    if category is None:
        category = _pick(rng, CATEGORIES)
    elif category not in CATEGORIES:
        raise ValueError(f"category must be None or one of {CATEGORIES}, got {category!r}")
    s1, s2 = _distinct_pair(rng, SHAPES)
    c1, c2 = _distinct_pair(rng, _COLOR_NAMES)
    if category == "single_object":
        return make_gen_prompt(category, [(None, s1, 1)])
    if category == "two_object":
        return make_gen_prompt(category, [(None, s1, 1), (None, s2, 1)])
    if category == "counting":
        lo, hi = COUNTING_RANGE
        return make_gen_prompt(category, [(None, s1, lo + _below(rng, hi - lo + 1))])
    if category == "colors":
        return make_gen_prompt(category, [(c1, s1, 1)])
    if category == "position":
        relation = _pick(rng, RELATIONS)
        return make_gen_prompt(category, [(None, s1, 1), (None, s2, 1)], relation)
    return make_gen_prompt(category, [(c1, s1, 1), (c2, s2, 1)])


def all_gen_prompts() -> tuple[GenPrompt, ...]:
    """Every prompt ``make_gen_prompt`` accepts (its caption unique to it), category by category (CATEGORIES
    order): 4 single-object, 12 two-object, 12 counting, 28 colour, 48 position and 588 colour-attribution prompts."""
    return tuple(_caption_table().values())


@cache
def _caption_table() -> dict[str, GenPrompt]:
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    lo, hi = COUNTING_RANGE
    fields = {
        "single_object": [([(None, s, 1)], None) for s in SHAPES],
        "two_object": [([(None, a, 1), (None, b, 1)], None) for a, b in pairs],
        "counting": [([(None, s, n)], None) for s in SHAPES for n in range(lo, hi + 1)],
        "colors": [([(c, s, 1)], None) for c in COLORS for s in SHAPES],
        "position": [([(None, a, 1), (None, b, 1)], r) for r in RELATIONS for a, b in pairs],
        "color_attr": [([(c1, a, 1), (c2, b, 1)], None) for c1 in COLORS for c2 in COLORS for a, b in pairs],
    }
    prompts = [make_gen_prompt(category, objects, relation) for category in CATEGORIES
               for objects, relation in fields[category]]
    return {prompt.caption: prompt for prompt in prompts}


def _as_worded(text: str, marks: str) -> str:
    """``text`` lower-cased, single-spaced, one final mark of ``marks`` dropped: how the world writes a text."""
    text = text.strip()
    if text[-1:] and text[-1] in marks:
        text = text[:-1]
    return " ".join(text.lower().split())


def parse_caption(text: str) -> GenPrompt | None:
    """The prompt whose caption ``text`` is (letter case, spacing and one final full stop ignored), or None where the
    world has no such caption: ``parse_caption("A photo of two circles.")`` is the counting prompt of two circles."""
    return _caption_table().get(_as_worded(text, "."))


@cache
def _relation_cells(relation: str) -> tuple[tuple[int, int], ...]:
    """(cell of A, cell of B) pairs with "A <relation> B" by a clear margin: at least one cell apart along the
    relation's axis and strictly less apart across it. Whatever the jitter, the centroids then differ by >= 10.6 px
    along the axis and A lies within 39 degrees of it (GenEval's rule accepts up to 60)."""
    axis, sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[relation]
    pairs = []
    for a in range(GRID * GRID):
        for b in range(GRID * GRID):
            delta = np.subtract(divmod(a, GRID), divmod(b, GRID))  # (row, column) of A minus B
            along, across = sign * delta[axis], abs(delta[1 - axis])
            if along >= 1 and across <= along - 1:
                pairs.append((a, b))
    return tuple(pairs)


def scene_for_prompt(prompt: GenPrompt, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies ``prompt`` exactly: the named objects and nothing else (``count`` of each),
    unnamed colours random, and for position prompts the relation holding with a clear margin."""
    if prompt.relation is not None:
        pairs = _relation_cells(prompt.relation)
        cells = _pick(rng, pairs)
    else:
        cells = _cells(rng, sum(count for _, _, count in prompt.objects))
    specs = [(color, shape) for color, shape, count in prompt.objects for _ in range(count)]
    return Scene(_random_objs(rng, specs, cells))


# ---------------------------------------------------------------------------------------------------------------
# Questions


def cell_name(cell: tuple[int, int]) -> str:
    """(row, column) -> 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    row, col = cell
    return " ".join(w for w in (ROW_WORDS[row], COL_WORDS[col]) if w) or "center"


def _unique_shapes(scene: Scene) -> list[Obj]:
    shapes = [o.shape for o in scene.objects]
    return [o for o in scene.objects if shapes.count(o.shape) == 1]


def _identifiable(scene: Scene) -> list[Obj]:
    """Objects no other object shares both colour and shape with: 'the red circle' names exactly one."""
    keys = [(o.color, o.shape) for o in scene.objects]
    return [o for o in scene.objects if keys.count((o.color, o.shape)) == 1]


def askable_kinds(scene: Scene) -> tuple[str, ...]:
    """The question kinds with a well-defined answer for this scene: "color" needs an object whose shape is
    unique, "where" an object whose colour and shape together are unique; "count" and "exist" always work."""
    ok = {"count": True, "exist": True, "color": bool(_unique_shapes(scene)), "where": bool(_identifiable(scene))}
    return tuple(kind for kind in QA_KINDS if ok[kind])


def sample_question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> QAItem:
    """One question about ``scene`` and its exact answer. kind None: uniform over ``askable_kinds(scene)``.

    "exist" answers yes and no equally often; half the no's name a shape that is in the scene in another colour.
    "count" asks about a shape in the scene 3 times in 4, else about any shape (answers zero..four).
    """
    askable = askable_kinds(scene)
    if kind is None:
        kind = _pick(rng, askable)
    elif kind not in QA_KINDS:
        raise ValueError(f"kind must be None or one of {QA_KINDS}, got {kind!r}")
    elif kind not in askable:
        raise ValueError(f"kind {kind!r} has no well-defined answer for this scene (askable: {askable}): {scene}")
    if kind == "color":
        obj = _pick(rng, _unique_shapes(scene))
        return QAItem(scene, COLOR_QUESTION.format(shape=obj.shape), obj.color, kind)
    if kind == "count":
        present = sorted({o.shape for o in scene.objects}, key=SHAPE_INDEX.get)
        shape = _pick(rng, present) if rng.random() < 0.75 else _pick(rng, SHAPES)
        count = sum(o.shape == shape for o in scene.objects)
        return QAItem(scene, COUNT_QUESTION.format(plural=PLURALS[shape]), NUMBER_WORDS[count], kind)
    if kind == "exist":
        present_pairs = {(o.color, o.shape) for o in scene.objects}
        if rng.random() < 0.5:
            color, shape = _pick(rng, sorted(present_pairs))
            answer = "yes"
        else:
            absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present_pairs]
            shapes_here = {s for _, s in present_pairs}
            hard = [(c, s) for c, s in absent if s in shapes_here]
            color, shape = _pick(rng, hard if hard and rng.random() < 0.5 else absent)
            answer = "no"
        return QAItem(scene, EXIST_QUESTION.format(color=color, shape=shape), answer, kind)
    obj = _pick(rng, _identifiable(scene))
    short = obj in _unique_shapes(scene) and rng.random() < 0.5
    target = obj.shape if short else f"{obj.color} {obj.shape}"
    return QAItem(scene, WHERE_QUESTION.format(target=target), cell_name(obj.cell), kind)


@cache
def _question_table() -> dict[str, str]:
    """Every question the world asks -> its kind: 4 colour, 4 count, 28 exist and 32 where questions."""
    table = {COLOR_QUESTION.format(shape=s): "color" for s in SHAPES}
    table |= {COUNT_QUESTION.format(plural=PLURALS[s]): "count" for s in SHAPES}
    table |= {EXIST_QUESTION.format(color=c, shape=s): "exist" for c in COLORS for s in SHAPES}
    targets = [*SHAPES, *(f"{c} {s}" for c in COLORS for s in SHAPES)]
    return table | {WHERE_QUESTION.format(target=t): "where" for t in targets}


def parse_question(text: str) -> tuple[str, str] | None:
    """(the world's wording, kind) of the question ``text`` is (letter case, spacing and one final "?" or "."
    ignored), or None where the world asks no such question: ``parse_question("What color is the circle?")`` is
    ("what color is the circle", "color")."""
    question = _as_worded(text, "?.")
    kind = _question_table().get(question)
    return None if kind is None else (question, kind)


def _question_of_kind(rng: np.random.Generator, kind: str) -> QAItem:
    """A random scene on which ``kind`` is askable (rejection; > 80% of scenes qualify) and its question."""
    while True:
        scene = sample_scene(rng)
        if kind in askable_kinds(scene):
            return sample_question(scene, rng, kind)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene) -> np.ndarray:
    """The scene's image -> uint8 (IMAGE_SIZE, IMAGE_SIZE, 3): black background, exact palette colours.
    The per-object reference that ``render_batch`` is checked against."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for obj in scene.objects:
        left, top = obj.box
        image[_shape_rule(obj.shape, obj.size, ys - top, xs - left)] = COLORS[obj.color]
    return image


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Images of ``scenes`` -> uint8 (N, IMAGE_SIZE, IMAGE_SIZE, 3), equal to stacking ``render``.

    Objects are grouped by (shape, size): one broadcast scatter per group writes (objects, template pixels, 3)
    at once, so the Python work is reading each object's fields. Measured on one core (CPU time, 2.5 objects per
    scene): ~150,000 scenes/s in batches of 64-256; one call for 100,000 scenes takes ~2.5 s, mostly faulting in
    its 690 MB output. Sampling a scene (~30 us) costs more than drawing it.
    """
    out = np.zeros((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    rows = [
        (i, SHAPE_INDEX[o.shape], SIZE_INDEX[o.size], COLOR_INDEX[o.color], *o.box)
        for i, scene in enumerate(scenes)
        for o in scene.objects
    ]
    if not rows:
        return out
    scene_i, shape_i, size_i, color_i, left, top = np.array(rows, dtype=np.int64).T
    base = (scene_i * IMAGE_SIZE + top) * IMAGE_SIZE + left  # flat pixel index of each box's top-left
    group = shape_i * len(SIZES) + size_i
    flat_out = out.reshape(-1, 3)
    for g in np.unique(group):
        sel = group == g
        offsets = _template_offsets(SHAPES[g // len(SIZES)], SIZES[g % len(SIZES)])
        flat_out[base[sel, None] + offsets] = PALETTE[color_i[sel], None]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data sets


def heldout_gen_prompts(n: int, seed: int = 0) -> list[GenPrompt]:
    """n held-out prompts, categories round-robin (prompt i has CATEGORIES[i % 6]), from rng_for("heldout", seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = rng_for("heldout", seed)
    return [sample_gen_prompt(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]


def heldout_questions(n: int, seed: int = 0) -> list[QAItem]:
    """n held-out questions on fresh scenes, kinds round-robin (item i has QA_KINDS[i % 4])."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = rng_for("heldout", seed)
    return [_question_of_kind(rng, QA_KINDS[i % len(QA_KINDS)]) for i in range(n)]


def training_batch_gen(rng: np.random.Generator, n: int, category_weights: Sequence[float] | None = None
                       ) -> tuple[list[GenPrompt], np.ndarray]:
    """n prompts and renders of scenes satisfying them -> (prompts, uint8 (n, S, S, 3)).

    ``category_weights``: relative frequency of each of CATEGORIES (in that order); None: uniform.
    """
    if category_weights is None:
        prompts = [sample_gen_prompt(rng) for _ in range(n)]
    else:
        share = np.asarray(check_category_weights(category_weights), dtype=float)
        picks = rng.choice(len(CATEGORIES), size=n, p=share / share.sum())
        prompts = [sample_gen_prompt(rng, CATEGORIES[i]) for i in picks]
    return prompts, render_batch([scene_for_prompt(p, rng) for p in prompts])


def check_category_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """``weights`` as a tuple of one finite, non-negative weight per category (CATEGORIES order), not all zero."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(CATEGORIES) or not all(np.isfinite(w) and w >= 0 for w in weights) or not sum(weights):
        raise ValueError(f"category_weights={weights} is invalid: allowed {len(CATEGORIES)} finite weights >= 0, "
                         f"not all 0, one per category in the order {CATEGORIES}")
    return weights


def training_batch_und(rng: np.random.Generator, n: int) -> tuple[list[QAItem], np.ndarray]:
    """n random scenes with one question each (kinds uniform) and their renders -> (items, uint8 (n, S, S, 3))."""
    items = [_question_of_kind(rng, _pick(rng, QA_KINDS)) for _ in range(n)]
    return items, render_batch([item.scene for item in items])


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can contain, sorted."""
    texts = [
        CAPTION_PREFIX,
        CAPTION_JOIN,
        *RELATIONS,
        *NUMBER_WORDS,
        *YES_NO,
        *ROW_WORDS,
        *COL_WORDS,
        "center",
        *SHAPES,
        *PLURALS.values(),
        *COLORS,
        *(t.format(shape="", plural="", color="", target="") for t in (COLOR_QUESTION, COUNT_QUESTION)),
        *(t.format(shape="", color="", target="") for t in (EXIST_QUESTION, WHERE_QUESTION)),
    ]
    return sorted({word for text in texts for word in text.split()})
