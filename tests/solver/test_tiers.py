"""Issue 12: tiers reported on their own scales; the same plan always reports the same numbers."""

from __future__ import annotations

from solver.search import _Progress, plan_from_rows, solve
from solver.tiers import tiers_in_words, tiers_of
from tests.solver.helpers import small_generated


def test_same_plan_same_words_under_two_weightings() -> None:
    """Two instances' weightings (the issue's 2.0 vs 1252.0) give the same tier figures."""
    problem = small_generated(["VIC_PGY1"])
    plan = solve(problem)
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    index = {t.id: k for k, t in enumerate(problem.teams)}
    rows = [[index[pl.rotations[t.id]] for t in problem.terms] for pl in plan.lines]
    cats = [k.removeprefix("fairness_").removesuffix("_spread") for k in plan.penalties
            if k.startswith("fairness_")]
    a = plan_from_rows(problem, rows, status="FEASIBLE", categories=cats,
                       weights={"unfilled": 4, "fairness": 2, "changed_cells": 1},
                       callback=_Progress(None, 1.0), started=0.0, bound=0.0)
    b = plan_from_rows(problem, rows, status="FEASIBLE", categories=cats,
                       weights={"unfilled": 1252, "fairness": 25, "changed_cells": 1},
                       callback=_Progress(None, 1.0), started=0.0, bound=0.0)
    assert a.objective != b.objective or a.objective == 0
    assert [(t.name, t.value) for t in tiers_of(a)] == [(t.name, t.value) for t in tiers_of(b)]
    assert tiers_in_words(a) == tiers_in_words(b)


def test_words_proven_and_best_found() -> None:
    problem = small_generated(["VIC_PGY1"])
    plan = solve(problem)
    words = tiers_in_words(plan)
    unfilled = sum(u.missing for u in plan.unfilled)
    assert words.startswith(f"{unfilled} unfilled position")
    if plan.status == "OPTIMAL":
        assert "(proven)" in words and "best found" not in words
    feasible = plan.model_copy(update={"status": "FEASIBLE", "best_bound": 0.0})
    fw = tiers_in_words(feasible)
    if unfilled == 0:
        assert fw.startswith("0 unfilled positions (proven)")
    for tier in tiers_of(feasible)[1:]:
        assert f"spread {tier.value} (best found)" in fw


def test_unfilled_bound_from_the_weighted_bound() -> None:
    problem = small_generated(["VIC_PGY1"])
    plan = solve(problem)
    w = int(plan.penalties["weight_unfilled"])
    fake = plan.model_copy(update={"status": "FEASIBLE", "best_bound": float(w * 2 + w - 1),
                                   "penalties": {**plan.penalties, "unfilled_positions": 3}})
    tier = tiers_of(fake)[0]
    assert (tier.value, tier.bound, tier.proven) == (3, 2, False)
    assert tier.words() == "3 unfilled positions (best found, at least 2)"


def test_tier_order_follows_the_stability_setting() -> None:
    from solver.problem import Plan, PlanLine

    lines = [PlanLine(line=1, rotations={"T1": "a"})]
    counts = {"unfilled_positions": 0, "fairness_service_spread": 2,
              "changed_cells_beyond_pins": 3}
    prefer = Plan(status="FEASIBLE", lines=lines, best_bound=0.0, penalties={
        **counts, "weight_unfilled": 100, "weight_fairness": 4, "weight_changed_cells": 1})
    strict = Plan(status="FEASIBLE", lines=lines, best_bound=0.0, penalties={
        **counts, "weight_unfilled": 100, "weight_fairness": 1, "weight_changed_cells": 9})
    assert [t.name for t in tiers_of(prefer)] == ["unfilled", "fairness_service",
                                                   "changed_cells"]
    assert [t.name for t in tiers_of(strict)] == ["unfilled", "changed_cells",
                                                   "fairness_service"]
    assert tiers_in_words(strict) == ("0 unfilled positions (proven); 3 changed cells (best "
                                      "found); service spread 2 (best found)")
