"""Rule sets as data.

Each rule set code maps to a `RuleSpec`: a handful of numbers and flags, not code. The CP-SAT
model (`solver.model`) compiles the *combined* spec of all selected rule sets into constraints;
the validator (`solver.validate`) checks each rule set's spec on its own with plain arithmetic,
so the two never share constraint code.

`RULE_SETS` is the catalogue the database's `planner_rule_sets` table must mirror (a test
compares both directions).

Percentages are of a line's total weeks (the sum of all term weeks), in integer arithmetic:
"≤ 25 %" means `100 * weeks ≤ 25 * total`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RULE_SETS: dict[str, str] = {
    "AMC_PGY1": "AMC PGY1: subspecialty ≤25 %, specialty ≤50 %, service ≤20 %, clinical ≥50 %, "
    "experiences A-D, ≥4 terms of ≥10 weeks",
    "AMC_PGY2": "AMC PGY2: subspecialty ≤25 %, service ≤25 %, clinical ≥50 %, ≤1 non-clinical "
    "term, experiences A-C, ≥3 terms of ≥10 weeks",
    "VIC_PGY1": "Victorian PGY1: AMC_PGY1 for a 5-term year",
    "VIC_PGY2": "Victorian PGY2: AMC_PGY2 for a 4-term year",
    "LEGACY_INTERN": "Pre-2024 intern: ≥8 weeks emergency, ≥10 weeks medicine, ≥10 weeks surgery",
    "NO_NIGHTS": "No term in a team tagged NIGHTS",
    "MAX_ONE_RURAL": "At most one term at a rural team",
    "NO_CONSECUTIVE_SERVICE": "No two service terms in consecutive terms",
}

#: Rule sets tied to a fixed number of terms per year.
TERMS_REQUIRED: dict[str, int] = {"VIC_PGY1": 5, "VIC_PGY2": 4}

#: A term counts as a "long term" when it lasts at least this many weeks.
LONG_TERM_WEEKS = 10


@dataclass(frozen=True)
class RuleSpec:
    """What one rule set demands of every line. `None` / empty means "no such rule"."""

    max_subspecialty_pct: int | None = None
    max_specialty_pct: int | None = None
    max_service_pct: int | None = None
    min_clinical_pct: int | None = None
    max_non_clinical_terms: int | None = None
    experiences: tuple[str, ...] = ()
    min_long_terms: int | None = None
    #: specialty (lower case) -> minimum weeks per line
    min_specialty_weeks: dict[str, int] = field(default_factory=dict)
    forbid_nights: bool = False
    max_rural_terms: int | None = None
    no_consecutive_service: bool = False


_AMC_PGY1 = RuleSpec(
    max_subspecialty_pct=25,
    max_specialty_pct=50,
    max_service_pct=20,
    min_clinical_pct=50,
    experiences=("A", "B", "C", "D"),
    min_long_terms=4,
)
_AMC_PGY2 = RuleSpec(
    max_subspecialty_pct=25,
    max_service_pct=25,
    min_clinical_pct=50,
    max_non_clinical_terms=1,
    experiences=("A", "B", "C"),
    min_long_terms=3,
)

SPECS: dict[str, RuleSpec] = {
    "AMC_PGY1": _AMC_PGY1,
    "AMC_PGY2": _AMC_PGY2,
    "VIC_PGY1": _AMC_PGY1,
    "VIC_PGY2": _AMC_PGY2,
    "LEGACY_INTERN": RuleSpec(
        min_specialty_weeks={"emergency": 8, "medicine": 10, "surgery": 10}
    ),
    "NO_NIGHTS": RuleSpec(forbid_nights=True),
    "MAX_ONE_RURAL": RuleSpec(max_rural_terms=1),
    "NO_CONSECUTIVE_SERVICE": RuleSpec(no_consecutive_service=True),
}
assert SPECS.keys() == RULE_SETS.keys()


def _tightest(values: list[int | None], lowest: bool) -> int | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if lowest else max(present)


def combine(codes: list[str]) -> RuleSpec:
    """The strictest spec that satisfies every listed rule set (used by the model only)."""
    specs = [SPECS[c] for c in codes]
    weeks: dict[str, int] = {}
    for s in specs:
        for spec_name, w in s.min_specialty_weeks.items():
            weeks[spec_name] = max(w, weeks.get(spec_name, 0))
    return RuleSpec(
        max_subspecialty_pct=_tightest([s.max_subspecialty_pct for s in specs], lowest=True),
        max_specialty_pct=_tightest([s.max_specialty_pct for s in specs], lowest=True),
        max_service_pct=_tightest([s.max_service_pct for s in specs], lowest=True),
        min_clinical_pct=_tightest([s.min_clinical_pct for s in specs], lowest=False),
        max_non_clinical_terms=_tightest([s.max_non_clinical_terms for s in specs], lowest=True),
        experiences=tuple(sorted({e for s in specs for e in s.experiences})),
        min_long_terms=_tightest([s.min_long_terms for s in specs], lowest=False),
        min_specialty_weeks=weeks,
        forbid_nights=any(s.forbid_nights for s in specs),
        max_rural_terms=_tightest([s.max_rural_terms for s in specs], lowest=True),
        no_consecutive_service=any(s.no_consecutive_service for s in specs),
    )


def owners(codes: list[str], attr: str) -> list[str]:
    """Which of the selected rule sets carry a given rule (for explanations)."""
    out = []
    for c in codes:
        v = getattr(SPECS[c], attr)
        if v not in (None, (), {}, False):
            out.append(c)
    return out


def pct_cap(total_weeks: int, pct: int) -> int:
    """Largest whole number of weeks that is ≤ pct % of total (integer arithmetic)."""
    return (total_weeks * pct) // 100


def pct_floor(total_weeks: int, pct: int) -> int:
    """Smallest whole number of weeks that is ≥ pct % of total."""
    return -((-total_weeks * pct) // 100)
