"""RLS attack matrix: every table and function, attacked from outside organisation A.

Attackers: `anon` (the public API key), B's viewer, B's planner and B's admin (members of
another organisation, signed in), and `planner_engine` (the listener's own login role; a
stolen listener credential). Operations: SELECT / INSERT / UPDATE / DELETE on each table,
aimed at organisation A's rows, and each callable function with A's objects as arguments.

Every cell has an expected outcome, written out in `EXPECTED` below; docs/reliability.md
prints the same table (`python -m tests.db.test_attack_matrix` regenerates it from
`EXPECTED`, so the document cannot drift from what is tested). Outcomes:

* `denied`  - PostgreSQL refuses with 42501 (no privilege, or the row-level-security WITH CHECK)
* `none`    - allowed to ask, but RLS shows/affects 0 of A's rows
* `PLxxx` / `23503` - refused by the named product SQLSTATE / composite foreign key
* `visible` - rows of A are readable *by design* (the engine solves every organisation's runs;
              the rule-set catalogue is global, not tenant data)
* `ok`      - the call succeeds *by design* and changes nothing of A's (see the row's note)

Each cell runs in a transaction that is rolled back, so cells never influence each other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tests.db.conftest import World, claim, insert_run, new_allocation_run, plan_json

ACTORS = ["anon", "viewer_B", "planner_B", "admin_B", "engine"]
OPS = ["select", "insert", "update", "delete"]

D, N, V = "denied", "none", "visible"
#: table -> {op: (anon, viewer_B, planner_B, admin_B, engine)}
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "organizations": {"select": (D, N, N, N, V), "insert": (D, D, D, D, D),
                      "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "organization_members": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                             "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "planner_rule_sets": {"select": (D, V, V, V, V), "insert": (D, D, D, D, D),
                          "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "allocation_runs": {"select": (D, N, N, N, V), "insert": (D, D, D, D, D),
                        "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "terms": {"select": (D, N, N, N, V), "insert": (D, D, D, D, D),
              "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "teams": {"select": (D, N, N, N, V), "insert": (D, D, D, D, D),
              "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "team_demand": {"select": (D, N, N, N, V), "insert": (D, D, D, D, D),
                    "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "allocation_planner_runs": {"select": (D, N, N, N, V),
                                "insert": (D, "PL012", "PL012", "PL012", D),
                                "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "job_lines": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                  "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "rotations": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                  "update": (D, N, N, N, D), "delete": (D, D, D, D, D)},
    "job_lines_history": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                          "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_execution_logs": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                               "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_engine.settings": {"select": (D, D, D, D, D), "insert": (D, D, D, D, D),
                                "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
}

#: function call (with A's objects) -> (anon, viewer_B, planner_B, admin_B, engine)
EXPECTED_RPC: dict[str, tuple[str, ...]] = {
    "public.request_cancel(A's pending run)": (D, "PL012", "PL012", "PL012", D),
    "public.restore_job_lines(A's snapshot)": (D, "PL012", "PL012", "PL012", D),
    "planner_engine.claim_run(A's pending run)": (D, D, D, D, "ok"),
    "planner_engine.heartbeat(A's run, forged lease)": (D, D, D, D, "ok"),
    "planner_engine.load_problem(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.commit_plan(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.commit_plan(A's run, own lease, B's org)": (D, D, D, D, "PL002"),
    "planner_engine.commit_plan(own B run, A's teams)": (D, D, D, D, "PL002"),
    "planner_engine.finish_run(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.write_log(A's run, B's org)": (D, D, D, D, "PL002"),
    "planner_engine.write_logs([A's run, B's org])": (D, D, D, D, "ok"),
    "planner_engine.sweep_stale_runs()": (D, D, D, D, "ok"),
    "planner_engine.self_check()": (D, D, D, D, "ok"),
}
#: Why an `ok` cell is harmless (checked in the test, not only stated).
RPC_NOTES = {
    "planner_engine.claim_run(A's pending run)":
        "the engine serves every organisation: it may claim A's run (that is its job); the run "
        "stays A's and every later write is fenced on the new lease and A's organisation",
    "planner_engine.heartbeat(A's run, forged lease)":
        "answers lease_held = false and writes nothing",
    "planner_engine.write_logs([A's run, B's org])": "the record is skipped: 0 rows written",
    "planner_engine.sweep_stale_runs()":
        "the engine may run the sweeper; it only touches runs past the TTL",
    "planner_engine.self_check()":
        "reports the login's own grants and the newest migration's version: no tenant data, "
        "writes nothing",
}


@dataclass
class Fixture:
    w: World
    pending_run: str  # A, PENDING
    gen_run: str  # A, GENERATING (lease known only to the superuser)
    gen_lease: str
    snapshot: str  # A's snapshot
    b_gen_run: str  # B, GENERATING, lease known
    b_gen_lease: str
    b_terms: list[str]


@pytest.fixture(scope="module")
async def fx(su: asyncpg.Connection, world: World) -> Fixture:
    a, b = world.a, world.b
    for offset in (0, 1):  # two commits: lines, rotations and one snapshot
        run = await insert_run(su, a.id, a.allocation_run_id)
        c = await claim(su, run)
        assert c is not None
        snap = await su.fetchval("select planner_engine.commit_plan($1, $2, $3, $4, '{}')::text",
                                 run, c["lease"], a.id, plan_json(a, a.terms, offset=offset))
        await su.execute("select planner_engine.write_log($1, $2, 'INFO', 'hello')", run, a.id)
    pending = await insert_run(su, a.id, a.allocation_run_id)
    ar2, _ = await new_allocation_run(su, a.id, teams=a.teams)
    gen = await insert_run(su, a.id, ar2)
    cg = await claim(su, gen)
    assert cg is not None
    b_run = await insert_run(su, b.id, b.allocation_run_id)
    cb = await claim(su, b_run)
    assert cb is not None
    return Fixture(world, pending, gen, str(cg["lease"]), str(snap), b_run, str(cb["lease"]),
                   b.terms)


def _a_filter(table: str) -> str:
    if table == "organizations":
        return "id = $1"
    if table in ("planner_rule_sets", "planner_engine.settings"):
        return "$1::uuid is not null"
    return "organization_id = $1"


def _insert_sql(table: str, f: Fixture) -> tuple[str, list[Any]]:
    a, b = f.w.a, f.w.b
    ar, t0, tm0 = a.allocation_run_id, a.terms[0], a.teams[0]
    return {
        "organizations": ("insert into organizations (name) values ('x')", []),
        "organization_members": ("insert into organization_members values ($1, $2, 'admin')",
                                 [a.id, b.planner]),
        "planner_rule_sets": ("insert into planner_rule_sets (code, description)"
                              " values ('EVIL', 'x')", []),
        "allocation_runs": ("insert into allocation_runs (organization_id, name)"
                            " values ($1, 'x')", [a.id]),
        "terms": ("insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
                  " values ($1, $2, 99, 'x', 5)", [a.id, ar]),
        "teams": ("insert into teams (organization_id, name, specialty, subspecialty)"
                  " values ($1, 'x', 'x', 'x')", [a.id]),
        "team_demand": ("insert into team_demand (organization_id, allocation_run_id, team_id,"
                        " term_id, max_lines) values ($1, $2, $3, $4, 1)",
                        [a.id, ar, tm0, t0]),
        "allocation_planner_runs": (
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines) values ($1, $2, 1)", [a.id, a.allocation_run_id]),
        "job_lines": ("insert into job_lines (organization_id, allocation_run_id, line_number)"
                      " values ($1, $2, 999)", [a.id, ar]),
        "rotations": ("insert into rotations (organization_id, allocation_run_id, job_line_id,"
                      " term_id, team_id) values ($1, $2, $3, $4, $5)",
                      [a.id, ar, str(uuid.uuid4()), t0, tm0]),
        "job_lines_history": (
            "insert into job_lines_history (organization_id, allocation_run_id, n_lines, plan)"
            " values ($1, $2, 0, '{\"lines\": []}')", [a.id, ar]),
        "planner_execution_logs": (
            "insert into planner_execution_logs (planner_run_id, organization_id, level,"
            " message) values ($1, $2, 'INFO', 'x')", [f.pending_run, a.id]),
        "planner_engine.settings": ("insert into planner_engine.settings default values", []),
    }[table]


_SET = {"organizations": "name = name", "organization_members": "role = role",
        "planner_rule_sets": "description = description", "rotations": "pinned = pinned",
        "allocation_planner_runs": "n_job_lines = n_job_lines",
        "planner_engine.settings": "max_attempts = max_attempts"}


async def _as_actor(
    actor: str, f: Fixture, pg: asyncpg.Connection, engine: asyncpg.Connection,
    op: Callable[[asyncpg.Connection], Awaitable[str]],
) -> str:
    """Run `op` as the actor inside a transaction that is always rolled back."""
    conn = engine if actor == "engine" else pg
    tx = conn.transaction()
    await tx.start()
    try:
        if actor != "engine":
            role = "anon" if actor == "anon" else "authenticated"
            b = f.w.b
            sub = {"viewer_B": b.viewer, "planner_B": b.planner, "admin_B": b.admin}.get(actor)
            claims = {"role": role, **({"sub": sub} if sub else {})}
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true),"
                " set_config('request.jwt.claim.sub', $2, true),"
                " set_config('request.jwt.claim.role', $3, true)",
                json.dumps(claims), sub or "", role)
            await conn.execute(f"set local role {role}")
        try:
            return await op(conn)
        except asyncpg.PostgresError as exc:
            return "denied" if exc.sqlstate == "42501" else str(exc.sqlstate)
    finally:
        await tx.rollback()


def _table_op(table: str, op: str, f: Fixture) -> Callable[[asyncpg.Connection], Awaitable[str]]:
    a_id = f.w.a.id
    filt = _a_filter(table)

    async def run(conn: asyncpg.Connection) -> str:
        if op == "select":
            n = await conn.fetchval(f"select count(*) from {table} where {filt}", a_id)
            return "visible" if n else "none"
        if op == "insert":
            sql, args = _insert_sql(table, f)
            await conn.execute(sql, *args)
            return "ok"
        sql = (f"update {table} set {_SET.get(table, 'organization_id = organization_id')}"
               if op == "update" else f"delete from {table}")
        status = await conn.execute(f"{sql} where {filt}", a_id)
        return "none" if status.endswith(" 0") else f"changed ({status})"

    return run


CELLS = [(t, op, actor) for t in EXPECTED for op in OPS for actor in ACTORS]


@pytest.mark.parametrize(("table", "op", "actor"), CELLS,
                         ids=[f"{t}-{op}-{a}" for t, op, a in CELLS])
async def test_table_cell(pg: asyncpg.Connection, engine: asyncpg.Connection, fx: Fixture,
                          table: str, op: str, actor: str) -> None:
    expected = EXPECTED[table][op][ACTORS.index(actor)]
    got = await _as_actor(actor, fx, pg, engine, _table_op(table, op, fx))
    assert got == expected, f"{actor} {op} on {table}: expected {expected}, got {got}"


def _rpc(name: str, f: Fixture) -> Callable[[asyncpg.Connection], Awaitable[str]]:
    a, b = f.w.a, f.w.b
    forged = str(uuid.uuid4())

    async def run(conn: asyncpg.Connection) -> str:
        if name.startswith("public.request_cancel"):
            await conn.execute("select public.request_cancel($1)", f.pending_run)
        elif name.startswith("public.restore_job_lines"):
            await conn.execute("select public.restore_job_lines($1)", f.snapshot)
        elif name.startswith("planner_engine.claim_run"):
            rows = await conn.fetch("select * from planner_engine.claim_run('evil', $1)",
                                    f.pending_run)
            assert [str(r["organization_id"]) for r in rows] == [a.id]  # still A's run
        elif name.startswith("planner_engine.heartbeat"):
            row = await conn.fetchrow("select * from planner_engine.heartbeat($1, $2)",
                                      f.gen_run, forged)
            assert row is not None and row["lease_held"] is False
        elif name.startswith("planner_engine.load_problem"):
            await conn.fetchval("select planner_engine.load_problem($1, $2)", f.gen_run, forged)
        elif name == "planner_engine.commit_plan(A's run, forged lease)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.gen_run, forged, a.id, plan_json(a, a.terms))
        elif name == "planner_engine.commit_plan(A's run, own lease, B's org)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.gen_run, f.gen_lease, b.id, plan_json(b, f.b_terms))
        elif name == "planner_engine.commit_plan(own B run, A's teams)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.b_gen_run, f.b_gen_lease, b.id,
                               plan_json(a, f.b_terms))  # B's terms, A's teams
        elif name.startswith("planner_engine.finish_run"):
            await conn.execute("select planner_engine.finish_run($1, $2, 'FAILED')",
                               f.gen_run, forged)
        elif name.startswith("planner_engine.write_logs"):
            n = await conn.fetchval(
                "select planner_engine.write_logs($1::jsonb)",
                json.dumps([{"planner_run_id": f.gen_run, "organization_id": b.id,
                             "level": "INFO", "message": "forged"}]))
            assert n == 0
        elif name.startswith("planner_engine.write_log"):
            await conn.execute("select planner_engine.write_log($1, $2, 'INFO', 'forged')",
                               f.gen_run, b.id)
        elif name.startswith("planner_engine.sweep_stale_runs"):
            await conn.fetchval("select planner_engine.sweep_stale_runs()")
        elif name.startswith("planner_engine.self_check"):
            rows = await conn.fetch("select * from planner_engine.self_check(null)")
            text = json.dumps([dict(r) for r in rows])
            assert a.id not in text and b.id not in text and str(f.gen_run) not in text
        else:
            raise AssertionError(name)
        return "ok"

    return run


RPC_CELLS = [(name, actor) for name in EXPECTED_RPC for actor in ACTORS]


@pytest.mark.parametrize(("call", "actor"), RPC_CELLS,
                         ids=[f"{c.split('(')[0]}-{i}-{a}" for i, (c, a) in enumerate(RPC_CELLS)])
async def test_function_cell(pg: asyncpg.Connection, engine: asyncpg.Connection, fx: Fixture,
                             su: asyncpg.Connection, call: str, actor: str) -> None:
    before = await su.fetch("select id, status, lease, attempts, heartbeat_at"
                            " from allocation_planner_runs order by id")
    expected = EXPECTED_RPC[call][ACTORS.index(actor)]
    got = await _as_actor(actor, fx, pg, engine, _rpc(call, fx))
    assert got == expected, f"{actor} calling {call}: expected {expected}, got {got}"
    # Rolled back or refused: no run changed (the cell's transaction never commits).
    after = await su.fetch("select id, status, lease, attempts, heartbeat_at"
                           " from allocation_planner_runs order by id")
    assert before == after


async def test_matrix_is_complete_and_not_vacuous(su: asyncpg.Connection, fx: Fixture) -> None:
    """Every public table with RLS appears in the matrix, and A's rows really exist (so a
    `none` cell means hidden, not empty)."""
    rls_tables = {r[0] for r in await su.fetch(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'public' and c.relkind = 'r' and c.relrowsecurity")}
    assert rls_tables <= set(EXPECTED), rls_tables - set(EXPECTED)
    for table in EXPECTED:
        if table in ("planner_rule_sets", "planner_engine.settings"):
            continue
        n = await su.fetchval(f"select count(*) from {table} where {_a_filter(table)}", fx.w.a.id)
        assert n > 0, f"organisation A has no row in {table}: the matrix would be vacuous"
    functions = {r[0] for r in await su.fetch(
        "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'planner_engine'")}
    covered = {c.split("(")[0].split(".")[1] for c in EXPECTED_RPC if c.startswith("planner_")}
    assert functions <= covered, functions - covered


def markdown() -> str:
    """The matrix as it is tested, for docs/reliability.md."""
    head = "| table | op | " + " | ".join(ACTORS) + " |"
    out = [head, "|---|---|" + "---|" * len(ACTORS)]
    for table, ops in EXPECTED.items():
        for op in OPS:
            out.append(f"| `{table}` | {op} | " + " | ".join(ops[op]) + " |")
    out += ["", "| function (A's objects) | " + " | ".join(ACTORS) + " |",
            "|---|" + "---|" * len(ACTORS)]
    for call, cells in EXPECTED_RPC.items():
        out.append(f"| `{call}` | " + " | ".join(cells) + " |")
    out += ["", "Why each `ok` is harmless:", ""]
    out += [f"- `{k}`: {v}" for k, v in RPC_NOTES.items()]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
