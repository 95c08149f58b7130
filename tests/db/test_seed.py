"""`planner dev seed`: realistic, feasible-by-construction demo tenants, wired for RLS."""

from __future__ import annotations

import json

import asyncpg
from typer.testing import CliRunner

from devstack.cli import app
from devstack.seed import as_json, seed_async
from devstack.settings import DevSettings
from tests.db.conftest import as_user
from tests.support.roles import acting_as


async def test_seed_creates_two_isolated_organisations_ready_to_plan(
    dev_settings: DevSettings, db_name: str, pg: asyncpg.Connection
):
    from solver.problem import Problem

    orgs = await seed_async(dev_settings, database=db_name)
    assert len(orgs) == 2 and orgs[0].id != orgs[1].id
    doc = json.loads(json.dumps(as_json(orgs)))
    assert {"id", "allocation_run_id", "planner", "viewer"} <= set(doc["organizations"][0])

    for org, other in (orgs, orgs[::-1]):
        assert (org.n_terms, org.n_teams) == (5, 50)
        weeks = await pg.fetchval("select sum(weeks) from terms where allocation_run_id = $1",
                                  org.allocation_run_id)
        assert 50 <= weeks <= 52
        kinds = await pg.fetchval(
            "select array_agg(distinct kind order by kind) from teams where organization_id = $1",
            org.id)
        assert "clinical" in kinds and "service" in kinds
        tags = await pg.fetchval("select array_agg(distinct t) from teams, unnest(tags) t"
                                 " where organization_id = $1", org.id)
        assert {"NIGHTS", "RELIEF", "LEAVE"} <= set(tags)
        assert await pg.fetchval("select bool_or(rural) from teams where organization_id = $1",
                                 org.id)
        # every term can staff the suggested number of lines
        rows = await pg.fetch("select term_id, sum(min_lines) lo, sum(max_lines) hi"
                              " from team_demand where allocation_run_id = $1 group by term_id",
                              org.allocation_run_id)
        assert len(rows) == 5
        assert all(r["lo"] <= org.suggested_n_job_lines <= r["hi"] for r in rows)

        # the viewer sees its organisation only; the planner can request the suggested run
        seen = await as_user(pg, org.viewer.id, "select id::text from organizations")
        assert [r[0] for r in seen] == [org.id]
        rows = await as_user(
            pg, org.planner.id,
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines, constraints) values ($1, $2, $3, $4) returning id::text",
            org.id, org.allocation_run_id, org.suggested_n_job_lines, org.suggested_constraints)
        run = rows[0][0]
        async with acting_as(pg, "authenticated", sub=other.planner.id) as c:
            assert await c.fetchval("select count(*) from allocation_planner_runs"
                                    " where id = $1", run) == 0

        claimed = await pg.fetchrow("select * from planner_engine.claim_run('seed-test', $1)", run)
        problem = json.loads(await pg.fetchval(
            "select planner_engine.load_problem($1, $2)::text", run, claimed["lease"]))
        Problem.model_validate(problem)
        assert problem["n_job_lines"] == 125 and len(problem["teams"]) == 50


def test_cli_has_seed_command():
    result = CliRunner().invoke(app, ["seed", "--help"])
    assert result.exit_code == 0 and "--json" in result.output
