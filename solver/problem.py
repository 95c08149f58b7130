"""The solver's data contract: the problem it is asked, the plan it answers, its progress.

Every payload that crosses a boundary (CLI file, listener, child process) goes through these
pydantic models, so a malformed request is refused with a readable message before any model is
built. Cross-field checks (unknown team in a demand row, a VIC rule set with the wrong number of
terms, a pin on a term the previous line does not have ...) are model validators, so they also
surface as `pydantic.ValidationError`.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from solver.rules import RULE_SETS, TERMS_REQUIRED

TeamKind = Literal["clinical", "service", "non_clinical"]
Status = Literal["OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN", "INVALID"]
#: The solver's models (Options.model; `planner solve --model`).
ModelName = Literal["lines", "patterns"]

#: Tags with a meaning for the rules; other tags are carried along untouched.
LEAVE = "LEAVE"
RELIEF = "RELIEF"
NIGHTS = "NIGHTS"


class _Strict(BaseModel):
    """Base for input models: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Term(_Strict):
    id: str = Field(min_length=1)
    weeks: int = Field(gt=0, le=52, description="Length of the term in weeks (> 0).")
    name: str | None = None

    @property
    def label(self) -> str:
        """Human-readable name used in explanations (the listener passes UUIDs as ids)."""
        return self.name or f"Term {self.id}"


class Team(_Strict):
    id: str = Field(min_length=1)
    specialty: str = Field(min_length=1)
    subspecialty: str = Field(min_length=1)
    kind: TeamKind = "clinical"
    experiences: list[str] = Field(default_factory=list)
    site: str | None = None
    rural: bool = False
    tags: list[str] = Field(default_factory=list)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.id

    def has_tag(self, tag: str) -> bool:
        return tag.upper() in (t.upper() for t in self.tags)


class Demand(_Strict):
    team: str
    term: str
    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> Demand:
        if self.min > self.max:
            raise ValueError(
                f"demand for team {self.team!r} in term {self.term!r}: "
                f"min ({self.min}) is greater than max ({self.max})"
            )
        return self


class PreviousLine(_Strict):
    line: int = Field(ge=1)
    rotations: dict[str, str] = Field(default_factory=dict)
    pinned: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _pins_have_rotation(self) -> PreviousLine:
        missing = [t for t in self.pinned if t not in self.rotations]
        if missing:
            raise ValueError(
                f"previous line {self.line}: pinned term(s) {missing} have no rotation to keep"
            )
        return self


class PreviousPlan(_Strict):
    lines: list[PreviousLine] = Field(default_factory=list)


class Options(_Strict):
    time_limit_seconds: float = Field(default=30.0, gt=0)
    seed: int = Field(default=0, ge=0)
    keep_pinned: bool = True
    #: off: ignore the previous plan (except pins); prefer: fewest changes after fairness;
    #: strict: fewest changes before fairness (right after unfilled positions).
    stability: Literal["off", "prefer", "strict"] = "prefer"
    strict_minimum: bool = False
    #: one worker, fixed seed: the same problem always gives the same plan, whatever the
    #: machine load (tests, audits).
    deterministic: bool = False
    #: how line interchangeability is broken; "first_term" measured fastest (docs/solver.md).
    symmetry: Literal["lex", "first_term", "none"] = "first_term"
    #: greedy construction: "full" = complete hint, and a plan scoring 0 is returned as
    #: optimal without search; "hint_only" = always search (benchmarks of the model itself);
    #: "off" = no construction.
    construction: Literal["full", "hint_only", "off"] = "full"
    #: weight the fairness tier (spread of service, nights and rural terms across lines).
    fairness: bool = True
    #: "lines": one Boolean per line x term x team (`solver.model`), the baseline;
    #: "patterns": column generation over classes of interchangeable teams
    #: (`solver.patterns`, docs/solver.md), for large and tight allocations.
    model: ModelName = "lines"


class Problem(_Strict):
    terms: list[Term] = Field(min_length=1)
    teams: list[Team] = Field(min_length=1)
    demand: list[Demand] = Field(default_factory=list)
    n_job_lines: int = Field(ge=1, le=5000)
    rule_sets: list[str] = Field(default_factory=list)
    previous_plan: PreviousPlan | None = None
    options: Options = Field(default_factory=Options)

    @model_validator(mode="after")
    def _cross_checks(self) -> Problem:
        errors: list[str] = []
        term_ids = [t.id for t in self.terms]
        team_ids = [t.id for t in self.teams]
        for kind, ids in (("term", term_ids), ("team", team_ids)):
            # Counted once, not ids.count() per id: a tenant can send 40,000 teams, and the
            # quadratic check took minutes (issue 13).
            dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
            if dupes:
                errors.append(f"duplicate {kind} id(s): {dupes}")
        terms, teams = set(term_ids), set(team_ids)
        seen: set[tuple[str, str]] = set()
        for d in self.demand:
            if d.team not in teams:
                errors.append(f"demand names unknown team {d.team!r}")
            if d.term not in terms:
                errors.append(f"demand names unknown term {d.term!r}")
            if (d.team, d.term) in seen:
                errors.append(f"duplicate demand for team {d.team!r} in term {d.term!r}")
            seen.add((d.team, d.term))
        for code in self.rule_sets:
            if code not in RULE_SETS:
                errors.append(f"unknown rule set {code!r} (known: {', '.join(sorted(RULE_SETS))})")
            elif code in TERMS_REQUIRED and TERMS_REQUIRED[code] != len(self.terms):
                errors.append(
                    f"rule set {code} is for a {TERMS_REQUIRED[code]}-term year, "
                    f"but the problem has {len(self.terms)} term(s)"
                )
        if len(set(self.rule_sets)) != len(self.rule_sets):
            errors.append("a rule set is listed twice")
        if self.previous_plan is not None:
            lines = [p.line for p in self.previous_plan.lines]
            if len(set(lines)) != len(lines):
                errors.append("previous plan lists a line number twice")
            for p in self.previous_plan.lines:
                if p.line > self.n_job_lines:
                    errors.append(
                        f"previous plan line {p.line} is beyond n_job_lines ({self.n_job_lines})"
                    )
                for term, team in p.rotations.items():
                    if term not in terms:
                        errors.append(f"previous plan line {p.line} names unknown term {term!r}")
                    if team not in teams:
                        errors.append(f"previous plan line {p.line} names unknown team {team!r}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # Convenience look-ups used by the model, the validator and the explanations.
    def term(self, term_id: str) -> Term:
        return self._term_by_id[term_id]

    def team(self, team_id: str) -> Team:
        return self._team_by_id[team_id]

    # Built once per (frozen) problem: the validator and the generator look teams up per cell,
    # and a linear scan made generating a 1,000-line instance take minutes.
    @cached_property
    def _term_by_id(self) -> dict[str, Term]:
        return {t.id: t for t in self.terms}

    @cached_property
    def _team_by_id(self) -> dict[str, Team]:
        return {t.id: t for t in self.teams}

    @property
    def total_weeks(self) -> int:
        return sum(t.weeks for t in self.terms)

    def demand_map(self) -> dict[tuple[str, str], Demand]:
        """(team, term) -> demand row."""
        return {(d.team, d.term): d for d in self.demand}

    def kept_pins(self, line: int, rotations: dict[str, str]) -> list[str]:
        """The previous plan's pins on `line` that `rotations` keeps (none if pins are off)."""
        if self.previous_plan is None or not self.options.keep_pinned:
            return []
        prev = next((p for p in self.previous_plan.lines if p.line == line), None)
        if prev is None:
            return []
        return [t for t in prev.pinned if rotations.get(t) == prev.rotations[t]]


class PlanLine(BaseModel):
    line: int
    rotations: dict[str, str]
    #: terms whose rotation is a pin kept from the previous plan, so the next replan keeps
    #: them too (`commit_plan` stores them on the rotations).
    pinned: list[str] = Field(default_factory=list)


class Unfilled(BaseModel):
    team: str
    term: str
    missing: int


class Plan(BaseModel):
    status: Status
    lines: list[PlanLine] = Field(default_factory=list)
    objective: float | None = None
    best_bound: float | None = None
    gap: float | None = None
    solve_seconds: float = 0.0
    unfilled: list[Unfilled] = Field(default_factory=list)
    changed_cells: int = 0
    penalties: dict[str, float | int] = Field(default_factory=dict)
    explanation: list[str] | None = None
    solutions: int = 0
    #: peak resident memory of the solving process, when it ran in a child (start_solve).
    peak_memory_mb: float | None = None


class Progress(BaseModel):
    solutions: int
    objective: float | None = None
    best_bound: float | None = None
    gap: float | None = None
    elapsed_ms: int
    time_limit_ms: int
