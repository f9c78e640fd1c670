"""Fidelity of a compiled row to its eager twin (the issue's acceptance check).

"Compiled FlashU vs eager FlashU on the testbed in bf16: identical decisions on at least 95% of prompts, latent
cosine at least 0.999 on the median prompt, and the same score within the interval. Compiled exact against the
eager baseline the same way."

Generation decisions are made per batch (a skip set is measured over every row of the batch), so they are compared
per batch: with ``--batch 1`` that is per prompt. Latent cosines and scorer agreement are per prompt. The score
check asks whether the compiled row's overall score lies inside the eager twin's 95% interval. Understanding is
per question: the same kept image tokens, the same skipped layers at every step, the same answer text.

Kept tokens are also compared up to ties: two selections that differ only in tokens whose V-norm (the eager
twin's, at the pruning layer) lies within the dtype's rounding of the selection threshold made the same choice
at that precision (the threshold is halfway between the largest kept and the smallest dropped norm). On the
testbed the plain background tokens have V-norms that equal to bf16 resolution, so a bf16 prefill and its
compiled twin may swap them; the report gives both shares and each differing question's largest gap.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from harness.quality_eval import GenRowResult, UndRowResult, overall_score
from harness.quality_rows import TWINS

MIN_IDENTICAL_DECISIONS = 0.95  # share of prompts (batches) with the eager twin's decisions
MIN_MEDIAN_COSINE = 0.999  # latent cosine of the median prompt


def latent_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per prompt: cosine of the flattened fp32 latents (N, C, h, w) x 2 -> N values."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).tolist()


def share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def score_check(candidate: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The overall score difference and whether the candidate lies inside the reference's 95% interval."""
    cand, ref = overall_score(candidate), overall_score(reference)
    within = ref.interval[0] <= cand.accuracy <= ref.interval[1]
    return {"score_difference": cand.accuracy - ref.accuracy, "reference_interval": ref.interval,
            "within_interval": within}


def gen_fidelity(candidate: GenRowResult, reference: GenRowResult) -> dict[str, Any]:
    """How closely ``candidate`` (a compiled row) reproduces ``reference`` (its eager twin) on the same prompts."""
    same_batches = [a == b for a, b in zip(candidate.decisions, reference.decisions, strict=True)]
    cosines = latent_cosines(candidate.latents, reference.latents)
    agree = [a == b for a, b in zip(candidate.correct, reference.correct, strict=True)]
    result = {
        "candidate": candidate.spec.name, "reference": reference.spec.name,
        "decision_unit": "prompt" if set(candidate.batch_sizes) == {1} else "batch",
        "batches": len(same_batches), "identical_decisions": share(same_batches),
        "differing_batches": [i for i, same in enumerate(same_batches) if not same],
        "latent_cosine": {"median": statistics.median(cosines), "min": min(cosines), "per_prompt": cosines},
        "scorer_agreement": share(agree), **score_check(candidate.summary, reference.summary),
    }
    result["passes"] = {
        "decisions": result["identical_decisions"] >= MIN_IDENTICAL_DECISIONS,
        "latent_cosine": result["latent_cosine"]["median"] >= MIN_MEDIAN_COSINE,
        "score": result["within_interval"],
    }
    return result


def swap_gap(candidate: tuple[int, ...], reference: tuple[int, ...], evidence: tuple[int, list[float]]) -> float:
    """The largest relative distance to the selection threshold among the tokens kept by one selection and not
    the other; 0.0 when the selections agree. ``evidence``: (first image position, the reference's V-norms).

    >>> swap_gap((10, 12), (10, 11), (10, [1.0, 2.0, 2.01, 5.0]))  # threshold (2.0 + 2.01) / 2
    0.0025
    """
    swapped = set(candidate) ^ set(reference)
    if not swapped:
        return 0.0
    start, norms = evidence
    kept = {p - start for p in reference}
    largest_kept = max(norms[i] for i in kept)
    smallest_dropped = min((n for i, n in enumerate(norms) if i not in kept), default=largest_kept)
    threshold = (largest_kept + smallest_dropped) / 2
    return round(max(abs(norms[p - start] - threshold) for p in swapped) / threshold, 12)


def und_fidelity(candidate: UndRowResult, reference: UndRowResult) -> dict[str, Any]:
    """Per question: kept image tokens, skipped layers per step and answer text of ``candidate`` vs ``reference``."""
    pairs = list(zip(candidate.kept_positions, reference.kept_positions, strict=True))
    same_kept = [a == b for a, b in pairs]
    same_skips = [a == b for a, b in zip(candidate.skipped, reference.skipped, strict=True)]
    gaps: dict[int, float] = {}  # differing question -> largest swap gap (where the reference kept its evidence)
    for i, ((a, b), evidence) in enumerate(zip(pairs, reference.image_vnorms or [None] * len(pairs), strict=True)):
        if a != b and a is not None and b is not None and evidence is not None:
            gaps[i] = swap_gap(a, b, evidence)
    tolerance = max(candidate.value_rounding, reference.value_rounding)
    kept_up_to_ties = [same or gaps.get(i, float("inf")) <= tolerance for i, same in enumerate(same_kept)]
    same_text = [a == b for a, b in zip(candidate.answers, reference.answers, strict=True)]
    agree = [a == b for a, b in zip(candidate.correct, reference.correct, strict=True)]
    identical = [k and s for k, s in zip(same_kept, same_skips, strict=True)]
    result = {
        "candidate": candidate.spec.name, "reference": reference.spec.name, "questions": len(identical),
        "identical_decisions": share(identical), "same_kept_tokens": share(same_kept),
        "same_kept_tokens_up_to_ties": share(kept_up_to_ties), "tie_tolerance": tolerance,
        "identical_decisions_up_to_ties": share([k and s for k, s in zip(kept_up_to_ties, same_skips, strict=True)]),
        "swap_gaps": {str(i): g for i, g in gaps.items()},
        "same_skip_decisions": share(same_skips), "same_answer_text": share(same_text),
        "differing_questions": [i for i, same in enumerate(identical) if not same],
        "scorer_agreement": share(agree), **score_check(candidate.summary, reference.summary),
    }
    result["passes"] = {
        "decisions": result["identical_decisions"] >= MIN_IDENTICAL_DECISIONS,
        "decisions_up_to_ties": result["identical_decisions_up_to_ties"] >= MIN_IDENTICAL_DECISIONS,
        "answers": result["same_answer_text"] >= MIN_IDENTICAL_DECISIONS,
        "score": result["within_interval"],
    }
    return result


def twin_fidelity(task: str, results: dict[str, GenRowResult | UndRowResult]) -> dict[str, Any]:
    """Every (compiled row, eager twin) pair of ``TWINS`` that ran, compared."""
    compare = gen_fidelity if task == "gen" else und_fidelity
    return {f"{cand} vs {ref}": compare(results[cand], results[ref])
            for cand, ref in TWINS if cand in results and ref in results}
