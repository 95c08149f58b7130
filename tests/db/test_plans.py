"""commit_plan, set-based since issue 11, does what the function before it did.

The pre-issue-11 definitions are kept in bench/sql/commit_plan_before.sql (schema
`bench_before`, for the benchmark); installed into this module's database they are the
reference: the same malformed plans get the same SQLSTATE and message, and the same sequence
of commits leaves the same plans and the same snapshots. What changed on purpose is also
tested: a commit rewrites only the rotations that differ.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.db.conftest import World, claim, current_plan, insert_run, new_allocation_run

BEFORE_SQL = Path(__file__).resolve().parents[2] / "bench" / "sql" / "commit_plan_before.sql"
FUNCTIONS = {"before": "bench_before.commit_plan", "after": "planner_engine.commit_plan"}


@pytest.fixture(scope="module")
async def reference(su: asyncpg.Connection) -> AsyncIterator[None]:
    await su.execute(BEFORE_SQL.read_text())
    await su.execute("grant usage on schema bench_before to planner_engine;"
                     " grant execute on function bench_before.commit_plan("
                     "uuid, uuid, uuid, jsonb, jsonb) to planner_engine")
    yield


async def commit(su: asyncpg.Connection, engine: asyncpg.Connection, function: str, org: str,
                 allocation_run_id: str, plan: Any) -> tuple[str, str | None]:
    """One run requested, claimed and committed with `function`; (run id, snapshot id)."""
    run = await insert_run(su, org, allocation_run_id)
    c = await claim(engine, run)
    assert c is not None
    snap = await engine.fetchval(f"select {function}($1, $2, $3, $4::jsonb, '{{}}')", run,
                                 c["lease"], org, plan if isinstance(plan, str) else
                                 json.dumps(plan))
    return run, None if snap is None else str(snap)


async def error_of(su: asyncpg.Connection, engine: asyncpg.Connection, function: str,
                   org: str, allocation_run_id: str, plan: str | None) -> tuple[str, str]:
    run = await insert_run(su, org, allocation_run_id)
    c = await claim(engine, run)
    assert c is not None
    try:
        await engine.execute(f"select {function}($1, $2, $3, $4::jsonb, '{{}}')",
                             run, c["lease"], org, plan)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate), str(exc)
    else:
        raise AssertionError(f"{function} accepted {plan}")
    finally:
        await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED')",
                             run, c["lease"])


def malformed(terms: list[str], teams: list[str], other_term: str,
              other_team: str) -> dict[str, str | None]:
    """Plans that must be refused, one defect each, keyed by what is wrong."""
    def line(n: int, **changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"line": n, "rotations": {t: teams[i] for i, t in enumerate(terms)},
                                "pinned": []}
        return {**base, **changes}

    def plan(*lines: Any) -> str:
        return json.dumps({"lines": list(lines)})

    rot = line(1)["rotations"]
    return {
        "no plan": None,
        "no lines": "{}",
        "lines not an array": '{"lines": {}}',
        "line not an object": plan(line(1), 7),
        "line number zero": plan(line(0)),
        "line number a word": plan(line(1), line("two")),
        "no rotations": plan({"line": 1}),
        "pinned not an array": plan(line(1, pinned="x")),
        "line twice": plan(line(1), line(2), line(2)),
        "term not a uuid": plan(line(1, rotations={**rot, "T1": teams[0]})),
        "team not a uuid": plan(line(1), line(2, rotations={**rot, terms[0]: "team-a"})),
        "team a number": plan(line(1, rotations={**rot, terms[1]: 7})),
        "team null": plan(line(1, rotations={**rot, terms[1]: None})),
        "pin not a string": plan(line(1, pinned=[1])),
        "pin without rotation": plan(line(1), line(2, pinned=[other_term])),
        "term of another allocation run": plan(line(1, rotations={**rot, other_term: teams[0]})),
        "team of another organisation": plan(line(1), line(2, rotations={**rot,
                                                                        terms[2]: other_team})),
        "a term missing": plan(line(1), line(2, rotations={t: teams[0] for t in terms[:2]})),
        "a term in capitals": plan(line(1, rotations={**{t: teams[0] for t in terms[1:]},
                                                      terms[0].upper(): teams[0]})),
    }


async def test_malformed_plans_get_the_same_answer_as_before(
    reference: None, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a, b = world.a, world.b
    ar, terms = await new_allocation_run(su, a.id, n_terms=3, teams=a.teams)
    _, other_terms = await new_allocation_run(su, a.id, n_terms=1, teams=a.teams)
    cases = malformed(terms, a.teams, other_terms[0], b.teams[0])
    for what, plan in cases.items():
        before = await error_of(su, engine, FUNCTIONS["before"], a.id, ar, plan)
        after = await error_of(su, engine, FUNCTIONS["after"], a.id, ar, plan)
        assert after == before, what
        assert after[0] == ("PL002" if "another" in what else "PL004"), (what, after)
    assert await current_plan(su, ar) is None  # nothing was written by any of them


Shape = list[tuple[int, list[int], list[int]]]  # (line, team index per term, pinned term indexes)

STEPS: list[tuple[str, Shape]] = [
    ("first plan", [(1, [0, 1, 2], []), (2, [1, 2, 3], [0]), (3, [2, 3, 4], []),
                    (4, [3, 4, 0], [1, 2])]),
    ("one cell and one pin change", [(1, [0, 1, 2], []), (2, [1, 4, 3], [0]),
                                     (3, [2, 3, 4], [2]), (4, [3, 4, 0], [1, 2])]),
    ("fewer lines", [(1, [0, 1, 2], []), (2, [1, 4, 3], [])]),
    ("more lines, gaps", [(1, [0, 1, 2], []), (3, [4, 4, 4], [0]), (7, [2, 2, 2], [1])]),
    ("the same plan again", [(1, [0, 1, 2], []), (3, [4, 4, 4], [0]), (7, [2, 2, 2], [1])]),
    ("a term added", [(1, [0, 1, 2, 3], [3]), (3, [4, 4, 4, 4], [0]), (7, [2, 2, 2, 2], [])]),
    ("no lines", []),
    ("a plan after none", [(1, [1, 1, 1, 1], [])]),
]


def document(shape: Shape, terms: list[str], teams: list[str]) -> dict[str, Any]:
    return {"lines": [{"line": n, "rotations": {terms[t]: teams[i] for t, i in enumerate(cells)},
                       "pinned": [terms[t] for t in pins]} for n, cells, pins in shape]}


def by_position(value: Any, names: dict[str, str]) -> Any:
    """`value` with every id replaced by its name, so two allocation runs compare."""
    if isinstance(value, dict):
        return {names.get(k, k): by_position(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [by_position(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


async def test_a_sequence_of_commits_leaves_the_same_plans_and_snapshots_as_before(
    reference: None, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    runs: dict[str, tuple[str, list[str]]] = {
        key: await new_allocation_run(su, a.id, n_terms=3, teams=a.teams) for key in FUNCTIONS}
    names = {team: f"team{i}" for i, team in enumerate(a.teams)}
    for _, terms in runs.values():
        names.update({term: f"term{i}" for i, term in enumerate(terms)})
    for step, shape in STEPS:
        if step == "a term added":
            for ar, terms in runs.values():
                terms.append(await su.fetchval(
                    "insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
                    " values ($1, $2, 4, 'Term 4', 10) returning id::text", a.id, ar))
                names[terms[-1]] = "term3"
        seen: dict[str, Any] = {}
        for key, function in FUNCTIONS.items():
            ar, terms = runs[key]
            plan = document(shape, terms, a.teams)
            run, snap = await commit(su, engine, function, a.id, ar, plan)
            names[run] = f"run of step {step!r}"
            assert await current_plan(su, ar) == (plan if shape else None), (step, key)
            history = None if snap is None else await su.fetchrow(
                "select n_lines, plan::text, planner_run_id::text from job_lines_history"
                " where id = $1", snap)
            seen[key] = by_position(None if history is None else {
                "n_lines": history["n_lines"], "plan": json.loads(history["plan"]),
                "planner_run_id": history["planner_run_id"]}, names)
            lines = await su.fetch("select distinct planner_run_id::text from job_lines"
                                   " where allocation_run_id = $1", ar)
            assert [r[0] for r in lines] == ([run] if shape else []), (step, key)
        assert seen["after"] == seen["before"], step


async def test_a_commit_rewrites_only_the_rotations_that_change(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    """Kept lines and unchanged rotations keep their rows (ids, updated_at); a changed
    rotation is updated in place; every kept line now names the committing run."""
    a = world.a
    ar, terms = await new_allocation_run(su, a.id, n_terms=3, teams=a.teams)
    first = document([(1, [0, 1, 2], []), (2, [1, 2, 3], [])], terms, a.teams)
    await commit(su, engine, FUNCTIONS["after"], a.id, ar, first)

    async def rows() -> dict[tuple[int, str], asyncpg.Record]:
        found = await su.fetch(
            "select l.line_number, ro.term_id::text as term, ro.id, ro.team_id::text as team,"
            " ro.updated_at, l.id as line_id from rotations ro"
            " join job_lines l on l.id = ro.job_line_id where l.allocation_run_id = $1", ar)
        return {(r["line_number"], r["term"]): r for r in found}

    old = await rows()
    second = document([(1, [0, 1, 2], []), (2, [1, 4, 3], [0])], terms, a.teams)
    run, _ = await commit(su, engine, FUNCTIONS["after"], a.id, ar, second)
    new = await rows()
    assert set(new) == set(old)
    changed = {(2, terms[0]), (2, terms[1])}  # the pin on term 0, the team of term 1
    for cell, row in new.items():
        assert row["id"] == old[cell]["id"] and row["line_id"] == old[cell]["line_id"]
        assert (row["updated_at"] > old[cell]["updated_at"]) == (cell in changed), cell
    assert new[(2, terms[1])]["team"] == a.teams[4]
    assert await su.fetchval("select count(*) from job_lines where allocation_run_id = $1"
                             " and planner_run_id = $2", ar, run) == 2
