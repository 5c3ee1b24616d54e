"""A plain-words verdict from the measured geometry: heuristics, each with the figures it rests on.

The thresholds are rules of thumb, not measurements of a merged model: the last line always points to
`merge sweep`, which scores the methods on your tasks instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from .analyse import Inspection

#: max |cos| and span overlap below which adapters count as near-orthogonal
ORTHOGONAL_COS, ORTHOGONAL_OVERLAP = 0.1, 0.2
#: span overlap from which subspaces count as overlapping
OVERLAP = 0.3
#: a cosine at or below this means two adapters pull against each other
OPPOSED_COS = -0.2
#: conflict rate (positions kept by ≥ 2 adapters holding both signs) from which sign conflicts are "many"
CONFLICTS = 0.25
#: ‖τᵢ‖/‖W‖ from which a task vector is large (LoRA fine-tunes of large models are usually a few percent)
LARGE_RELATIVE = 0.2
#: ratio of the largest to the smallest ‖τᵢ‖ from which one adapter dominates a sum
DOMINANT_RATIO = 3.0


@dataclass(frozen=True)
class Finding:
    """One line of the verdict: a key for tools, the sentence, and the numbers it rests on."""

    key: str
    text: str
    figures: dict[str, float | str | None] = field(default_factory=dict)


def density_text(densities: list[float]) -> str:
    """d=0.5, or the per-adapter densities when they differ."""
    unique = sorted(set(densities))
    return f"d={unique[0]:g}" if len(unique) == 1 else "d=" + "/".join(f"{d:g}" for d in densities)


def verdict(result: Inspection) -> list[Finding]:
    """The findings, most important first, ending with the pointer to `merge sweep`."""
    n = len(result.labels)
    findings: list[Finding] = []
    norms = [result.square_norm(i) ** 0.5 for i in range(n)]
    relative = [result.relative_norm(i) for i in range(n)]
    known = [(r, i) for i, r in enumerate(relative) if r is not None]
    large = bool(known) and max(known)[0] >= LARGE_RELATIVE
    if n >= 2:
        findings += _alignment(result, large)
        counts = result.conflicts()
        if counts.rate is not None:
            figures = {"conflict_rate": counts.rate, "independent_rate": counts.independent_rate,
                       "density": density_text(result.densities),
                       "dropped_share": counts.dropped_share}
            sampled = ", sampled" if result.sampled else ""
            if counts.rate >= CONFLICTS:
                findings.append(Finding("sign_conflicts", (
                    f"many large-magnitude sign conflicts ({counts.rate:.0%} of the entries kept by two or more adapters "
                    f"at {density_text(result.densities)}{sampled}, independent signs would give "
                    f"{counts.independent_rate or 0:.0%}; TIES' election would drop "
                    f"{counts.dropped_share or 0:.0%} of the kept entries): a plain sum lets them cancel, "
                    "try ties / dare_ties"), figures))
            else:
                findings.append(Finding("few_sign_conflicts", (
                    f"few sign conflicts ({counts.rate:.0%} at {density_text(result.densities)}{sampled}): "
                    "TIES' sign election changes little over a sum"), figures))
        positive = [x for x in norms if x > 0]
        if len(positive) == n and max(norms) / min(norms) >= DOMINANT_RATIO:
            big, small = norms.index(max(norms)), norms.index(min(norms))
            findings.append(Finding("dominant_adapter", (
                f"one adapter dominates (‖τ‖ of '{result.labels[big]}' is {max(norms) / min(norms):.1f}x that of "
                f"'{result.labels[small]}'): its task wins any sum; balance them with the weights"),
                {"norm_ratio": max(norms) / min(norms)}))
    if large:
        value, index = max(known)
        advice = (f"the sum of {n} such changes moves the base far, so task_arithmetic at λ=1 tends to overshoot: "
                  "try λ around 0.5, or a method that averages (linear, ties)") if n >= 2 else \
            "merging it alone reproduces the adapter exactly; interference needs a second adapter"
        findings.append(Finding("large_task_vectors", (
            f"large task vectors (‖τ‖/‖W‖ up to {value:.2f}, '{result.labels[index]}'): {advice}"),
            {"max_relative_norm": value}))
    if n == 1:
        findings.append(Finding("single_adapter", "one adapter: nothing to interfere with"))
    findings.append(Finding("measure", (
        "these are heuristics from the task vectors alone, not scores of a merged model: `merge sweep` "
        "measures the methods on your tasks instead of guessing")))
    return findings


def _alignment(result: Inspection, large: bool) -> list[Finding]:
    """Near-orthogonal, overlapping or in between; and any pair that pulls against the other."""
    n = len(result.labels)
    pairs = list(combinations(range(n), 2))
    cosines = {(i, j): result.cosine(i, j) for i, j in pairs}
    overlaps = {}
    for i, j in pairs:
        values = [v for v in (result.overlap(i, j, "column"), result.overlap(i, j, "row")) if v is not None]
        overlaps[(i, j)] = sum(values) / len(values) if values else None
    known_cos = [abs(c) for c in cosines.values() if c is not None]
    known_overlap = [o for o in overlaps.values() if o is not None]
    if not known_cos:
        return [Finding("no_shared_tensors", "the adapters change no tensor in common: they cannot interfere")]
    max_cos = max(known_cos)
    max_overlap = max(known_overlap) if known_overlap else None
    figures = {"max_abs_cosine": max_cos, "max_overlap": max_overlap}
    overlap_text = f", overlap {max_overlap:.2f}" if max_overlap is not None else ""
    findings = []
    if max_cos < ORTHOGONAL_COS and (max_overlap is None or max_overlap < ORTHOGONAL_OVERLAP):
        consequence = ("in weight space they barely overlap, but with task vectors this large (below) the network "
                       "still mixes them, so that alone does not make a plain sum safe") if large else \
            "linear and task_arithmetic lose little to interference"
        findings.append(Finding("near_orthogonal", (
            f"near-orthogonal adapters (max |cos| {max_cos:.2f}{overlap_text}): {consequence}"), figures))
    elif max_overlap is not None and max_overlap >= OVERLAP:
        findings.append(Finding("overlapping_subspaces", (
            f"overlapping subspaces (max overlap {max_overlap:.2f}, max |cos| {max_cos:.2f}): shared directions add "
            "up in a sum; try iso_cts / tsv_m"), figures))
    else:
        findings.append(Finding("partly_aligned", (
            f"partly aligned adapters (max |cos| {max_cos:.2f}{overlap_text}): some shared directions; a sum "
            "over-weights them a little"), figures))
    opposed = [(c, i, j) for (i, j), c in cosines.items() if c is not None and c <= OPPOSED_COS]
    if opposed:
        value, i, j = min(opposed)
        findings.append(Finding("opposed_adapters", (
            f"adapters pull against each other (cos {value:.2f} between '{result.labels[i]}' and "
            f"'{result.labels[j]}'): a sum cancels them; ties / dare_ties elect one sign per entry"),
            {"min_cosine": value}))
    return findings


def interference_lines(block: dict | None, adapters: int) -> list[str]:
    """The measured verdict's sentences (inspect.json's `interference.verdict`); without calibration data, one line
    saying what it would add (nothing for a single adapter)."""
    if block is None:
        from .interference import no_calibration_line

        return [no_calibration_line()] if adapters >= 2 else []
    return [finding["text"] for finding in block["verdict"]]
