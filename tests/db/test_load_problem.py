"""`planner_engine.load_problem` returns exactly the solver's Problem JSON.

The listener hands the document to `solver.Problem.model_validate` as it comes (the models
refuse unknown keys): no adapter in between. "Exactly" is checked as a round trip: the model
accepts the document and dumping what it parsed gives the same document back, so no value was
coerced, defaulted or dropped on the way.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from devstack.seed import seed_organization
from devstack.settings import DevSettings
from solver.problem import Problem
from tests.db.conftest import World, claim, expect_sqlstate, insert_run, new_allocation_run
from tests.support.databases import GENEROUS_LIMITS_SQL


async def load(su: asyncpg.Connection, engine: asyncpg.Connection, org_id: str,
               allocation_run_id: str, **fields: Any) -> dict[str, Any]:
    """Request, claim and load a run; the run is failed afterwards (it is only read)."""
    run = await insert_run(su, org_id, allocation_run_id, **fields)
    c = await claim(engine, run)
    assert c is not None
    raw = json.loads(await engine.fetchval(
        "select planner_engine.load_problem($1, $2)::text", run, c["lease"]))
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED')", run, c["lease"])
    return dict(raw)


def assert_exact(raw: dict[str, Any]) -> Problem:
    problem = Problem.model_validate(raw)
    assert problem.model_dump(mode="json", exclude_unset=True) == raw
    assert set(raw) == set(Problem.model_fields)
    return problem


async def add_team(su: asyncpg.Connection, org_id: str, allocation_run_id: str, terms: list[str],
                   name: str, site: str | None) -> str:
    team = str(await su.fetchval(
        "insert into teams (organization_id, name, specialty, subspecialty, site)"
        " values ($1, $2, 'medicine', 'general medicine', $3) returning id::text",
        org_id, name, site))
    for term in terms:
        await su.execute(
            "insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
            " min_lines, max_lines) values ($1, $2, $3, $4, 0, 5)",
            org_id, allocation_run_id, team, term)
    return team


async def test_seeded_organisation_loads_as_the_solvers_problem(
    dev_settings: DevSettings, su: asyncpg.Connection, engine: asyncpg.Connection
):
    """The demo data (`planner dev seed`), with two more teams: one whose site is '' and one
    without a site. Both come out as "site": null."""
    org = await seed_organization(su, dev_settings, "Contract Health", instance_seed=3,
                                  lines=20, terms=5, teams=12)
    terms = [r[0] for r in await su.fetch(
        "select id::text from terms where allocation_run_id = $1 order by ordinal",
        org.allocation_run_id)]
    blank = await add_team(su, org.id, org.allocation_run_id, terms, "Blank site", "")
    none = await add_team(su, org.id, org.allocation_run_id, terms, "No site", None)
    await su.execute(GENEROUS_LIMITS_SQL, org.id, 1000)

    raw = await load(su, engine, org.id, org.allocation_run_id, n_job_lines=20,
                     constraints=["VIC_PGY1", "NO_NIGHTS"],
                     options=json.dumps({"time_limit_seconds": 5, "stability": "strict"}))
    problem = assert_exact(raw)
    sites = {t.id: t.site for t in problem.teams}
    assert sites[blank] is None and sites[none] is None
    assert all(site for team, site in sites.items() if team not in (blank, none))
    assert problem.rule_sets == ["VIC_PGY1", "NO_NIGHTS"]  # the column `constraints`, renamed
    assert problem.options.time_limit_seconds == 5 and problem.options.stability == "strict"
    assert raw["previous_plan"] is None and len(problem.teams) == 14


async def test_previous_plan_keeps_only_lines_within_the_request(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await new_allocation_run(su, a.id, n_terms=2, teams=a.teams)
    run = await insert_run(su, a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    plan = {"lines": [{"line": n, "rotations": {t: a.teams[n % 5] for t in terms},
                       "pinned": [terms[0]]} for n in (2, 3, 4)]}
    await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         run, c["lease"], a.id, json.dumps(plan))

    raw = await load(su, engine, a.id, ar, n_job_lines=3)
    assert_exact(raw)
    assert raw["previous_plan"] == {"lines": plan["lines"][:2]}  # lines 2 and 3, pins kept
    assert raw["options"] == {} and raw["rule_sets"] == []
    raw = await load(su, engine, a.id, ar, n_job_lines=1)  # no line left: null, not []
    assert_exact(raw)
    assert raw["previous_plan"] is None


@pytest.mark.parametrize(("column", "value", "sqlstate"), [
    ("subspecialty", None, "23502"),
    ("subspecialty", "", "23514"),
    ("subspecialty", "  ", "23514"),
])
async def test_teams_always_have_the_subspecialty_the_solver_needs(
    su: asyncpg.Connection, world: World, column: str, value: str | None, sqlstate: str
):
    """The solver's Team needs a non-empty subspecialty (the 25 % rule groups by it). The table
    refuses a team without one, so load_problem never has to make one up."""
    async with expect_sqlstate(sqlstate):
        await su.execute(
            f"insert into teams (organization_id, name, specialty, {column})"
            " values ($1, 'x', 'medicine', $2)", world.a.id, value)


@pytest.mark.parametrize(("options", "sqlstate"), [(None, "23502"), ("[]", "23514"),
                                                   ('"fast"', "23514")])
async def test_run_options_are_always_an_object(
    su: asyncpg.Connection, world: World, options: str | None, sqlstate: str
):
    """Options is NOT NULL and a JSON object ('{}' by default), so "options" is never null."""
    ar, _ = await new_allocation_run(su, world.a.id, n_terms=1, teams=world.a.teams)
    async with expect_sqlstate(sqlstate):
        await insert_run(su, world.a.id, ar, options=options)
