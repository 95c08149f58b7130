"""Realistic synthetic instances (for `planner generate-instance`, tests and the benchmark).

Feasibility by construction: we first draw a *witness* set of lines that satisfies every
selected rule set (checked with the independent validator's per-line check), then derive each
(team, term) demand from how many witness lines use it, with a little slack either side. The
solver may find a different, fairer plan, but it can never be told "infeasible" on a default
instance.

Tight mode (`tight=True`, issue 12): the witness lines are a *planted* plan, and every (team,
term) cell the plan uses gets `min` = its planted count and `max` = that count or one more. Every
term's minimums then add up to the number of lines, so a plan without unfilled positions must
sit exactly on every minimum (an exact cover): the instances where the search, not the greedy
construction, has to do the work. Cells the planted plan does not use keep the default mode's
small optional rows. `site_subspecialties=True` makes a subspecialty distinct per site
("cardiology @ MMC"), which multiplies the classes of interchangeable teams. Both are
deterministic by seed like the default mode.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from solver.problem import LEAVE, NIGHTS, RELIEF, Demand, Options, Problem, Team, Term
from solver.rules import SPECS, TERMS_REQUIRED
from solver.validate import check_spec


@dataclass(frozen=True)
class _Unit:
    code: str
    name: str
    specialty: str
    subspecialty: str
    experiences: tuple[str, ...]
    kind: str = "clinical"
    tags: tuple[str, ...] = ()


# Specialty -> subspecialty catalogue, with AMC clinical experiences (A undifferentiated,
# B chronic, C acute & critical, D peri-operative/procedural).
_CLINICAL = [
    _Unit("GMED", "General Medicine", "medicine", "general medicine", ("A", "B")),
    _Unit("EMED", "Emergency Medicine", "emergency", "emergency medicine", ("A", "C")),
    _Unit("GSUR", "General Surgery", "surgery", "general surgery", ("C", "D")),
    _Unit("CARD", "Cardiology", "medicine", "cardiology", ("B", "C")),
    _Unit("ORTH", "Orthopaedics", "surgery", "orthopaedics", ("D",)),
    _Unit("PSYC", "Adult Psychiatry", "psychiatry", "adult psychiatry", ("A", "B")),
    _Unit("GERI", "Geriatric Medicine", "medicine", "geriatrics", ("B",)),
    _Unit("UROL", "Urology", "surgery", "urology", ("D",)),
    _Unit("PAED", "Paediatrics", "paediatrics", "general paediatrics", ("A", "B")),
    _Unit("ICU", "Intensive Care", "critical care", "intensive care", ("C",)),
    _Unit("RESP", "Respiratory", "medicine", "respiratory", ("B",)),
    _Unit("VASC", "Vascular Surgery", "surgery", "vascular surgery", ("C", "D")),
    _Unit("OBGY", "Obstetrics & Gynaecology", "obstetrics", "obstetrics", ("A", "D")),
    _Unit("PEM", "Paediatric Emergency", "emergency", "paediatric emergency", ("A", "C")),
    _Unit("RENL", "Renal", "medicine", "nephrology", ("B",)),
    _Unit("ANAE", "Anaesthetics", "anaesthetics", "anaesthetics", ("C", "D")),
    _Unit("COLO", "Colorectal Surgery", "surgery", "colorectal", ("D",)),
    _Unit("NEUR", "Neurology", "medicine", "neurology", ("B", "C")),
    _Unit("PALL", "Palliative Care", "palliative care", "palliative care", ("B",)),
    _Unit("REHB", "Rehabilitation", "rehabilitation", "rehabilitation", ("B",)),
    _Unit("GP", "General Practice", "general practice", "general practice", ("A", "B")),
    _Unit("ONCO", "Oncology", "medicine", "oncology", ("B",)),
    _Unit("PLAS", "Plastic Surgery", "surgery", "plastics", ("D",)),
    _Unit("GAST", "Gastroenterology", "medicine", "gastroenterology", ("B",)),
]
_SERVICE = [
    _Unit("RELIEF", "Relief", "service", "relief", (), "service", (RELIEF,)),
    _Unit("NIGHTS", "Night Medicine", "service", "nights", ("C",), "service", (NIGHTS,)),
    _Unit("LEAVE", "Leave Cover", "service", "leave", (), "service", (LEAVE,)),
]
_NON_CLINICAL = [
    _Unit("RSCH", "Research", "research", "research", (), "non_clinical"),
    _Unit("MEDU", "Medical Education", "medical education", "medical education", (),
          "non_clinical"),
]
_SITES = ["MMC", "DANDENONG", "CASEY"]
_RURAL_SITES = ["BAIRNSDALE", "WARRAGUL"]


def term_weeks(n_terms: int) -> list[int]:
    """Split a 52-week year as evenly as possible, longer terms first."""
    base, extra = divmod(52, n_terms)
    return [base + (1 if i < extra else 0) for i in range(n_terms)]


def make_teams(
    n_teams: int, rng: random.Random, *, non_clinical: bool, site_subspecialties: bool = False
) -> list[Team]:
    """About 10 % service teams (relief, nights, leave), ~10 % rural, the rest clinical units."""
    n_service = max(3, n_teams // 10)
    n_nonclin = 2 if non_clinical else 0
    n_clinical = max(1, n_teams - n_service - n_nonclin)
    teams: list[Team] = []

    def add(unit: _Unit, copy: int, rural: bool) -> None:
        suffix = chr(ord("A") + copy)
        site = rng.choice(_RURAL_SITES if rural else _SITES)
        sub = f"{unit.subspecialty} @ {site}" if site_subspecialties else unit.subspecialty
        teams.append(Team(
            id=f"{unit.code}-{suffix}", name=f"{unit.name} {suffix}", specialty=unit.specialty,
            subspecialty=sub, kind=unit.kind,  # type: ignore[arg-type]
            experiences=list(unit.experiences), site=site, rural=rural, tags=list(unit.tags),
        ))

    for i in range(n_clinical):
        unit = _CLINICAL[i % len(_CLINICAL)]
        copy = i // len(_CLINICAL)
        add(unit, copy, rural=rng.random() < 0.12)
    for i in range(n_service):
        add(_SERVICE[i % len(_SERVICE)], i // len(_SERVICE), rural=False)
    for i in range(n_nonclin):
        add(_NON_CLINICAL[i], 0, rural=False)
    return teams[:n_teams] if len(teams) > n_teams else teams


def _witness_line(
    terms: list[Term], teams: list[Team], rule_sets: list[str], load: Counter[tuple[int, int]],
    rng: random.Random, probe: Problem, tries: int = 4000,
) -> list[int] | None:
    """A random valid line, biased towards (team, term) cells used least so far."""
    specs = [(c, SPECS[c]) for c in rule_sets]
    for _ in range(tries):
        chosen: list[int] = []
        for t in range(len(terms)):
            options = [k for k in range(len(teams)) if k not in chosen]
            weights = [1.0 / (1 + load[k, t]) ** 2 for k in options]
            chosen.append(rng.choices(options, weights)[0])
        rotations = {terms[t].id: teams[k].id for t, k in enumerate(chosen)}
        if all(not check_spec(probe, c, s, rotations) for c, s in specs):
            return chosen
    return None


def generate(
    *, lines: int, terms: int, teams: int, rule_sets: list[str], seed: int = 0,
    time_limit_seconds: float = 30.0, tight: bool = False, site_subspecialties: bool = False,
) -> Problem:
    """A feasible, realistic problem (see module docstring for `tight`)."""
    problem, _planted = generate_planted(
        lines=lines, terms=terms, teams=teams, rule_sets=rule_sets, seed=seed,
        time_limit_seconds=time_limit_seconds, tight=tight,
        site_subspecialties=site_subspecialties)
    return problem


def generate_planted(
    *, lines: int, terms: int, teams: int, rule_sets: list[str], seed: int = 0,
    time_limit_seconds: float = 30.0, tight: bool = False, site_subspecialties: bool = False,
) -> tuple[Problem, list[dict[str, str]]]:
    """The problem and the planted (witness) lines it was derived from, as rotations."""
    for code in rule_sets:
        if code not in SPECS:
            raise ValueError(f"unknown rule set {code!r}")
        if code in TERMS_REQUIRED and TERMS_REQUIRED[code] != terms:
            raise ValueError(f"rule set {code} needs {TERMS_REQUIRED[code]} terms, not {terms}")
    rng = random.Random(seed)
    term_list = [Term(id=f"T{i + 1}", name=f"Term {i + 1}", weeks=w)
                 for i, w in enumerate(term_weeks(terms))]
    needs_nonclinical = any(SPECS[c].max_non_clinical_terms is not None for c in rule_sets)
    team_list = make_teams(teams, rng, non_clinical=needs_nonclinical,
                           site_subspecialties=site_subspecialties)
    # A probe problem with every team in every term lets the validator's per-line rule check
    # run on candidate witness lines.
    probe = Problem(
        terms=term_list, teams=team_list, n_job_lines=lines, rule_sets=rule_sets,
        demand=[Demand(team=tm.id, term=tr.id, min=0, max=lines)
                for tm in team_list for tr in term_list],
    )
    load: Counter[tuple[int, int]] = Counter()
    planted: list[dict[str, str]] = []
    for _ in range(lines):
        chosen = _witness_line(term_list, team_list, rule_sets, load, rng, probe)
        if chosen is None:
            raise ValueError("could not draw a valid line: too few or too uniform teams for "
                             f"{rule_sets}; try more teams")
        for t, k in enumerate(chosen):
            load[k, t] += 1
        planted.append({term_list[t].id: team_list[k].id for t, k in enumerate(chosen)})
    demand: list[Demand] = []
    for t, term in enumerate(term_list):
        for k, team in enumerate(team_list):
            c = load[k, t]
            if c == 0:
                if team.has_tag(NIGHTS) or rng.random() < 0.15:
                    demand.append(Demand(team=team.id, term=term.id, min=0, max=rng.randint(1, 2)))
                continue
            if tight:
                low, high = c, c + rng.choice((0, 1))
            else:
                low = c - (1 if c >= 3 and rng.random() < 0.5 else 0)
                high = c + rng.choice((0, 1, 1, 2))
            demand.append(Demand(team=team.id, term=term.id, min=low, max=high))
    problem = Problem(
        terms=term_list, teams=team_list, demand=demand, n_job_lines=lines, rule_sets=rule_sets,
        options=Options(time_limit_seconds=time_limit_seconds, seed=seed),
    )
    return problem, planted
