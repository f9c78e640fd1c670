"""GenEval-style scoring for the testbed's world, without a model: a pixel-rule detector, GenEval's prompt rules,
exact-match answers, and summaries with 95% confidence intervals.

The detector labels each pixel by its nearest palette colour, black included (for the RGB-cube palette a pixel
is background exactly when every channel is below half intensity, so a generator's dark noise stays background),
groups non-background pixels into 4-connected components, gives each its majority colour (a blurred edge's
off-colour pixels do not split an object), and names its shape by template matching: the ideal shape (continuous
circle, square, upright or inverted triangle, diamond) with the component's area, centred on its centroid, that
overlaps it best (IoU). Every pixel votes, so a few stray pixels move the answer little, unlike features of the
bounding box. On the world's renders the right template matches exactly (IoU 1) and the runner-up at <= 0.87;
under a 3x3 box blur plus Gaussian noise of sigma 30 the right one still wins for > 99% of objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flashu_fx.testbed.world import CATEGORIES, COLORS, QA_KINDS, RELATIONS, GenPrompt, QAItem

# The smallest object renders 60 px (10-px triangle or diamond); specks and edge fringes of generated images are
# a few px. A third of the smallest object keeps every real one with room for erosion and drops the debris.
MIN_AREA = 20
# A component whose second colour holds >= this share (and >= MIN_AREA px) is two touching objects, not one
# object with an off-colour fringe: it is split by colour.
SPLIT_SHARE = 0.25
# Area of each ideal shape with a side (box) of 1: the template for an area-n component has side sqrt(n / this).
SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
# Below this best IoU a component is no world shape (two same-colour objects merged, a smear): UNKNOWN, which
# scoring ignores. Midway between two touching same-colour objects (<= 0.62) and objects under a 3x3 blur plus
# noise of sigma 40 (>= 0.74).
MIN_IOU = 0.68
UNKNOWN = "unknown"
# GenEval's POSITION_THRESHOLD: centroid offsets shrink by this fraction of the two objects' summed box sides
# before the direction test, so touching or overlapping objects have no relation.
POSITION_MARGIN = 0.1
Z95 = 1.959963984540054

_COLOR_NAMES = tuple(COLORS)
_PALETTE_WITH_BLACK = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)  # row 0: background


@dataclass(frozen=True)
class Detection:
    """One detected object: (cx, cy) its pixel centroid (column, row), area in pixels, width and height of its
    bounding box."""

    shape: str  # one of SHAPES or UNKNOWN
    color: str
    cx: float
    cy: float
    area: int
    width: int = 0
    height: int = 0


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Nearest palette colour of every pixel: (H, W, 3) on the 0..255 scale -> int64 (H, W), the index into
    COLORS, or -1 where black (background) is nearest."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3) with values 0..255, got shape {image.shape}")
    dist = ((image.astype(np.float32)[:, :, None, :] - _PALETTE_WITH_BLACK) ** 2).sum(-1)  # (H, W, 8)
    return dist.argmin(-1) - 1


def connected_components(key: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative ``key``: int (H, W) -> int64 (H, W), components numbered
    0..K-1 in raster order of their first pixel, -1 where key < 0.

    Min-label propagation with pointer jumping: every pixel holds the flat index of a pixel of its component and
    takes the smallest held by itself, its equal-key neighbours and the pixel it points to, until nothing changes;
    then each component holds its first pixel's index.
    """
    h, w = key.shape
    fg = key >= 0
    none = h * w  # larger than every index
    lab = np.where(fg, np.arange(h * w).reshape(h, w), none)
    join_x = fg[:, 1:] & fg[:, :-1] & (key[:, 1:] == key[:, :-1])  # pixel joined to its right neighbour
    join_y = fg[1:] & fg[:-1] & (key[1:] == key[:-1])  # pixel joined to the one below
    flat_fg = np.flatnonzero(fg)
    while True:
        new = lab.copy()
        np.minimum(new[:, :-1], np.where(join_x, lab[:, 1:], none), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(join_x, lab[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:-1], np.where(join_y, lab[1:], none), out=new[:-1])
        np.minimum(new[1:], np.where(join_y, lab[:-1], none), out=new[1:])
        flat = new.reshape(-1)
        flat[flat_fg] = np.minimum(flat[flat_fg], flat[flat[flat_fg]])  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.full((h, w), -1, dtype=np.int64)
    out[fg] = np.unique(lab[fg], return_inverse=True)[1].reshape(-1)
    return out


def _ideal(shape: str, side: float, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Pixels whose centres, at offsets (dy, dx) from the shape's centroid, lie in the ideal shape of this side.
    The triangle points up: apex 2/3 of its height above the centroid, base 1/3 below."""
    half = side / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    depth = dy + 2 * side / 3  # below the apex
    return (depth >= 0) & (depth <= side) & (np.abs(dx) <= depth / 2)


def shape_scores(ys: np.ndarray, xs: np.ndarray) -> dict[str, float]:
    """IoU of a pixel set (row and column indices, (n,) each) with each shape's ideal of the same area centred on
    its centroid; the triangle's score is the better of upright and inverted."""
    n, cy, cx = len(ys), ys.mean(), xs.mean()
    reach = np.sqrt(n / min(SHAPE_AREA.values()))  # no template extends further than its side from the centroid
    y0, x0 = int(min(ys.min(), np.floor(cy - reach))), int(min(xs.min(), np.floor(cx - reach)))
    y1, x1 = int(max(ys.max(), np.ceil(cy + reach))), int(max(xs.max(), np.ceil(cx + reach)))
    member = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
    member[ys - y0, xs - x0] = True
    dy, dx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    dy, dx = dy - cy, dx - cx
    scores = {}
    for shape, area in SHAPE_AREA.items():
        side = np.sqrt(n / area)
        ious = [
            (member & t).sum() / (member | t).sum()
            for t in [_ideal(shape, side, dy, dx)] + ([_ideal(shape, side, -dy, dx)] if shape == "triangle" else [])
        ]
        scores[shape] = float(max(ious))
    return scores


def classify_shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """Shape of a pixel set (row and column indices, (n,) each): the best-matching template, or UNKNOWN when no
    template reaches MIN_IOU."""
    scores = shape_scores(ys, xs)
    best = max(scores, key=scores.get)
    return best if scores[best] >= MIN_IOU else UNKNOWN


def _detection(mask: np.ndarray, color: int) -> Detection | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < MIN_AREA:
        return None
    shape = classify_shape(ys, xs)
    return Detection(
        shape,
        _COLOR_NAMES[color],
        float(xs.mean()),
        float(ys.mean()),
        len(ys),
        int(np.ptp(xs)) + 1,
        int(np.ptp(ys)) + 1,
    )


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in an image (H, W, 3), values on the 0..255 scale (uint8 or float), in raster order of their
    first pixel. Components below MIN_AREA are dropped; one whose second colour is substantial (SPLIT_SHARE) is
    split into its same-colour components."""
    colors = palette_labels(image)
    components = connected_components(np.where(colors >= 0, 0, -1))
    found = []
    for k in range(components.max() + 1):
        member = components == k
        hist = np.bincount(colors[member], minlength=len(COLORS))
        first, second = np.argsort(-hist, kind="stable")[:2]
        if hist[second] >= max(MIN_AREA, SPLIT_SHARE * member.sum()):
            parts = connected_components(np.where(member, colors, -1))
            found += [_detection(parts == j, colors[parts == j][0]) for j in range(parts.max() + 1)]
        else:
            found.append(_detection(member, first))
    return [d for d in found if d is not None]


def describe(found: Sequence[Detection]) -> str:
    """What a person reads of the detector's findings: "2 red circles, a blue square" (first-seen order;
    "nothing" for none; an unnamed shape as "a red blob")."""
    counts: dict[tuple[str, str], int] = {}
    for d in found:
        key = (d.color, "blob" if d.shape == UNKNOWN else d.shape)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"a {color} {shape}" if n == 1 else f"{n} {color} {shape}s"
                     for (color, shape), n in counts.items()) or "nothing"


def judge_picture(prompt: GenPrompt | None, image: np.ndarray) -> dict:
    """A picture (H, W, 3) as a person reads the scorer on it: {"right": GenEval's verdict for ``prompt`` (None: no
    prompt to judge it by), "found": ``describe`` of what the detector saw}."""
    found = detect(image)
    return dict(right=None if prompt is None else score_detections(prompt, found), found=describe(found))


def judgement_line(judged: dict) -> str:
    """One line of ``judge_picture``'s result for under a picture: "right: a red circle", "wrong: nothing"."""
    verdict = {True: "right", False: "wrong", None: "not scored"}[judged["right"]]
    return f"{verdict}: {judged['found']}"


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``: GenEval's rule on centroids.
    The offset a - b shrinks by POSITION_MARGIN of the summed box sides per axis; the relation holds when the
    shrunk offset's component along it, over the unshrunk offset's length, exceeds 0.5 (within ~60 degrees)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    offset = np.array([a.cx - b.cx, a.cy - b.cy])
    dims = np.array([a.width + b.width, a.height + b.height], dtype=np.float64)
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
    norm = float(np.hypot(*offset))
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / norm
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def score_prompt(prompt: GenPrompt, image: np.ndarray) -> bool:
    """GenEval's verdict on ``image`` (H, W, 3) for ``prompt``. Objects of other shapes never count against it.
    single_object / two_object: each named shape detected; colors / color_attr: each named shape detected in its
    colour (any one object suffices); counting: exactly N objects of the shape; position: some object of the
    first shape stands in the relation to some object of the second (``relation_holds``)."""
    return score_detections(prompt, detect(image))


def _shape_finder(found: Sequence[Detection]) -> Callable[[str], list[Detection]]:
    """shape -> the detections of that shape, in ``found``'s order."""
    return lambda shape: [d for d in found if d.shape == shape]


def score_detections(prompt: GenPrompt, found: Sequence[Detection]) -> bool:
    """``score_prompt`` on what ``detect`` found in a picture (for a caller that reads the detections too)."""
    if prompt.category not in CATEGORIES:
        raise ValueError(f"prompt.category must be one of {CATEGORIES}, got {prompt.category!r}")
    of_shape = _shape_finder(found)

    if prompt.category == "counting":
        ((_, shape, count),) = prompt.objects
        return len(of_shape(shape)) == count
    if prompt.category == "position":
        (_, shape_a, _), (_, shape_b, _) = prompt.objects
        return any(relation_holds(a, b, prompt.relation) for a in of_shape(shape_a) for b in of_shape(shape_b))
    return all(any(color in (None, d.color) for d in of_shape(shape)) for color, shape, _ in prompt.objects)


# The ways a picture misses its prompt, per category (``miss_cause``), "right" first.
MISS_CAUSES: dict[str, tuple[str, ...]] = {
    "single_object": ("right", "a named shape missing"),
    "two_object": ("right", "a named shape missing"),
    "counting": ("right", "too few", "too many"),
    "colors": ("right", "a named shape missing", "another colour"),
    "position": ("right", "a named shape missing", "relation reversed", "neither way"),
    "color_attr": ("right", "a named shape missing", "colours exchanged", "other colours"),
}
LAYOUT_CATEGORIES = ("position", "color_attr")  # the categories whose misses say which binding is missing
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}  # each relation reversed


def miss_cause(prompt: GenPrompt, found: Sequence[Detection]) -> str:
    """Why ``score_detections`` judges ``found`` as it does, one of ``MISS_CAUSES[prompt.category]``: "right" exactly
    when it says yes. Position: both shapes drawn but the reversed relation holds ("relation reversed") or neither
    does ("neither way"); colour attribution: each shape drawn only in the other's colour ("colours exchanged") or
    otherwise wrongly coloured ("other colours")."""
    if score_detections(prompt, found):
        return "right"
    of_shape = _shape_finder(found)

    if prompt.category == "counting":
        ((_, shape, count),) = prompt.objects
        return "too few" if len(of_shape(shape)) < count else "too many"
    drawn = [of_shape(shape) for _, shape, _ in prompt.objects]
    if not all(drawn):
        return "a named shape missing"
    if prompt.category == "position":
        a, b = drawn
        reversed_holds = any(relation_holds(x, y, OPPOSITE[prompt.relation]) for x in a for y in b)
        return "relation reversed" if reversed_holds else "neither way"
    if prompt.category == "color_attr":
        (c1, _, _), (c2, _, _) = prompt.objects
        a, b = drawn
        exchanged = any(d.color == c2 for d in a) and any(d.color == c1 for d in b)
        return "colours exchanged" if exchanged else "other colours"
    return "another colour"  # colors: the shape is there, not in its colour (the shapes-only categories never get here)


def miss_causes(prompts: Sequence[GenPrompt], found: Sequence[Sequence[Detection]]) -> dict[str, dict[str, int]]:
    """{category: {cause: prompts}} over the categories present, every cause of ``MISS_CAUSES`` listed (0 too)."""
    _check_lengths("prompts", prompts, found)
    tally = {c: dict.fromkeys(MISS_CAUSES[c], 0) for c in CATEGORIES if any(p.category == c for p in prompts)}
    for prompt, detections in zip(prompts, found, strict=True):
        tally[prompt.category][miss_cause(prompt, detections)] += 1
    return tally


def normalize_answer(text: str) -> str:
    """Lowercase, one space between words, a trailing '.' or '?' dropped: ' Top  Left? ' -> 'top left'."""
    return " ".join(text.lower().strip().rstrip(".?").split())


def score_answer(predicted: str, item: QAItem) -> bool:
    """Exact match of the normalized prediction and answer."""
    return normalize_answer(predicted) == normalize_answer(item.answer)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%): sensible at 0 and n successes too."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = float(centre - half), float(centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)  # exact bounds, not rounding


def _group_stats(groups: Sequence[str], correct: Sequence[bool], order: Sequence[str]) -> dict[str, dict]:
    """Accuracy, count and Wilson 95% interval per group present, in ``order``."""
    unknown = sorted(set(groups) - set(order))
    if unknown:
        raise ValueError(f"groups must be among {tuple(order)}, got {unknown}")
    stats = {}
    for name in order:
        hits = [bool(c) for g, c in zip(groups, correct, strict=True) if g == name]
        if hits:
            stats[name] = {
                "accuracy": sum(hits) / len(hits),
                "count": len(hits),
                "ci95": wilson_interval(sum(hits), len(hits)),
            }
    return stats


def _check_lengths(what: str, items: Sequence, correct: Sequence[bool]) -> None:
    if len(items) != len(correct) or not items:
        raise ValueError(f"{what} and correct must be non-empty and equally long, got {len(items)} and {len(correct)}")


def geneval_summary(prompts: Sequence[GenPrompt], correct: Sequence[bool]) -> dict:
    """{"categories": {category: {"accuracy", "count", "ci95"}}, "overall": {"accuracy", "count", "ci95"}}.

    Category intervals are Wilson 95%. Overall is GenEval's: the mean of the category accuracies (categories
    present), its interval normal-approximate from the category standard errors, each taken as its Wilson
    half-width / z (never zero, unlike sqrt(p (1 - p) / n) at p = 0 or 1).
    """
    _check_lengths("prompts", prompts, correct)
    categories = _group_stats([p.category for p in prompts], correct, CATEGORIES)
    accuracy = float(np.mean([s["accuracy"] for s in categories.values()]))
    se = float(np.sqrt(sum(((hi - lo) / (2 * Z95)) ** 2 for lo, hi in (s["ci95"] for s in categories.values()))))
    se /= len(categories)
    overall = {
        "accuracy": accuracy,
        "count": len(prompts),
        "ci95": (max(0.0, accuracy - Z95 * se), min(1.0, accuracy + Z95 * se)),
    }
    return {"categories": categories, "overall": overall}


def answer_summary(items: Sequence[QAItem], correct: Sequence[bool]) -> dict:
    """{"kinds": {kind: {"accuracy", "count", "ci95"}}, "overall": {...}}: overall pools all items (VQA-style);
    every interval is Wilson 95%."""
    _check_lengths("items", items, correct)
    hits = sum(bool(c) for c in correct)
    overall = {"accuracy": hits / len(items), "count": len(items), "ci95": wilson_interval(hits, len(items))}
    return {"kinds": _group_stats([item.kind for item in items], correct, QA_KINDS), "overall": overall}
