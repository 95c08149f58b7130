"""The objective's tiers on their own scales, in words (issue 12).

Why: the weighted objective folds the tiers into one number whose weights depend on the
instance (number of terms, fairness categories, previous cells), so the same plan was reported
as objective 2.0 in one run and 1252.0 in the next. Here every figure is read from the plan's
tier counts (`Plan.penalties`, recomputed from the plan's lines in plain Python by
`search.evaluate`), never from the weighted objective; only the *bound* comes from the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from solver.problem import Plan


@dataclass(frozen=True)
class Tier:
    """One tier of a plan: its value, a proven lower bound where known, and whether proven."""

    name: str
    value: int
    bound: int | None
    proven: bool

    def words(self) -> str:
        if self.name == "unfilled":
            what = f"{self.value} unfilled position{'s' if self.value != 1 else ''}"
        elif self.name == "changed_cells":
            what = f"{self.value} changed cell{'s' if self.value != 1 else ''}"
        else:
            what = f"{self.name.removeprefix('fairness_')} spread {self.value}"
        if self.proven:
            return f"{what} (proven)"
        if self.bound is not None and self.bound > 0:
            return f"{what} (best found, at least {self.bound})"
        return f"{what} (best found)"


def tiers_of(plan: Plan) -> list[Tier]:
    """The tiers in their lexicographic order (unfilled first), from the plan's own counts.

    The unfilled tier's bound follows from the weighted bound B: every tier below weighs less
    than one unfilled position, so the fewest unfilled positions possible is >= floor(B / w).
    """
    if not plan.lines:
        return []
    p = plan.penalties
    optimal = plan.status == "OPTIMAL"
    unfilled = int(p.get("unfilled_positions", sum(u.missing for u in plan.unfilled)))
    bound: int | None = None
    weight = p.get("weight_unfilled")
    if optimal:
        bound = unfilled
    elif plan.best_bound is not None and weight:
        bound = min(unfilled, math.floor(plan.best_bound / weight + 1e-9))
    fairness = [Tier(key.removesuffix("_spread"), int(v), int(v) if optimal else None, optimal)
                for key, v in sorted(p.items())
                if key.startswith("fairness_") and key.endswith("_spread")]
    changed = int(p.get("changed_cells_beyond_pins", 0))
    kept = []
    if changed:  # only a replan with a previous plan changes cells
        kept = [Tier("changed_cells", changed, changed if optimal else None, optimal)]
    # stability "strict" puts changed cells above fairness (solver.model.tier_weights)
    strict = p.get("weight_changed_cells", 0) > p.get("weight_fairness", 0)
    lower = kept + fairness if strict else fairness + kept
    return [Tier("unfilled", unfilled, bound, bound is not None and bound >= unfilled), *lower]


def tiers_in_words(plan: Plan) -> str:
    """E.g. "0 unfilled positions (proven); service spread 1 (best found); 0 changed cells
    (best found)". Empty for a plan without lines."""
    return "; ".join(t.words() for t in tiers_of(plan))
