"""`planner doctor`: is this deployment what the engine needs? One line per check.

Two groups, each run when its settings are given:

- with an operator connection (`--database-url` / `DATABASE_URL`): the schema is at the latest
  migration; pg_cron is there and the sweeper's job is scheduled for this database and has run
  within two periods (once one period has passed since it was scheduled); the runs table is in
  the `supabase_realtime` publication with the replica identity the migrations set; the engine
  role `planner_engine` is no superuser (nor anything alike) and has exactly the grants the
  migrations give it.
  The database can broadcast the UI's events (realtime.send exists and the owner of
  planner_engine.broadcast may write realtime.messages).
- with the listener's Realtime settings (`SUPABASE_URL` and its key): the key is of the kind the
  listener needs for its subscription (a JWT whose role is `service_role`, or an `sb_secret_`
  key: the anon or publishable key connects fine but hears no run under RLS), Realtime
  answers, and a private channel can be joined (a project may refuse public ones, and the
  listener's and the UI's channels are private).

What the migrations set (published tables, replica identities, the engine's grants) is read
from migrations/schema/*.sql, the single source of truth, so a schema change cannot leave the
doctor checking an old copy. Every check catches its own failure: a broken deployment yields
failing lines, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import typer
from pydantic import BaseModel

from listener import apikeys, migrate
from listener.sqltext import normalised, split_statements, statements_match

ENGINE_ROLE = "planner_engine"
PUBLICATION = "supabase_realtime"
SCHEMA_DIR = migrate.MIGRATIONS_DIR / "schema"
KEY_VARIABLE = " or ".join(apikeys.KEY_VARIABLES)


class Check(BaseModel):
    """One line of the report."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def passed(name: str, detail: str) -> Check:
    return Check(name=name, ok=True, detail=detail)


def failed(name: str, detail: str) -> Check:
    return Check(name=name, ok=False, detail=detail)


# -- what the migrations set, read from the schema files -----------------------------------------

@dataclass
class Expected:
    """The access and Realtime setup the schema files define."""

    #: (kind, object, privilege) granted to the engine role; kind is schema/table/function.
    grants: set[tuple[str, str, str]] = field(default_factory=set)
    #: Tables added to the Realtime publication.
    published: set[str] = field(default_factory=set)
    #: Table -> replica identity (`full`, `default`, `nothing`, or `using index <name>`).
    identities: dict[str, str] = field(default_factory=dict)


_GRANT = re.compile(r"(?P<verb>grant|revoke) (?P<privs>.+?) on (?P<objs>.+?) "
                    r"(?:to|from) (?P<roles>[\w, ]+)", re.IGNORECASE | re.DOTALL)
_IDENTITY = re.compile(r"alter table (?:only )?(?P<table>[\w.]+) replica identity (?P<id>.+)",
                       re.IGNORECASE)
# Searched in the whole text: the schema adds a table inside a DO block (only when absent).
_PUBLISH = re.compile(rf"alter\s+publication\s+{PUBLICATION}\s+add\s+table\s+"
                      r"(?P<tables>[\w.]+(?:\s*,\s*[\w.]+)*)", re.IGNORECASE)


def _split_top_level(text: str) -> list[str]:
    """`text` cut at the commas outside parentheses (function signatures keep theirs)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _grant_objects(objs: str) -> tuple[str, list[str]]:
    """`on ...` of a GRANT: its kind and objects. Forms the engine's grants do not use (`all
    tables in schema`, column lists) raise, so a new form is noticed rather than ignored."""
    words = objs.split(" ", 1)
    head = words[0].lower()
    if head in ("schema", "function") and len(words) == 2:
        return head, _split_top_level(words[1])
    if head == "all":
        raise ValueError(f"cannot derive the grants of `on {objs}`")
    if head == "table" and len(words) == 2:
        objs = words[1]
    return "table", _split_top_level(objs)


def _apply_grant(expected: Expected, stmt: str, role: str) -> None:
    m = _GRANT.fullmatch(stmt)
    if m is None:
        return
    roles = {r.strip().lower() for r in m["roles"].split(",")}
    if role not in roles:
        return
    try:
        kind, objects = _grant_objects(m["objs"])
    except ValueError:
        if m["verb"].lower() == "revoke":
            return  # a blanket revoke never adds anything
        raise
    privs = [p.strip().lower() for p in m["privs"].split(",")]
    if any("(" in p for p in privs):
        raise ValueError(f"cannot derive column grants: {stmt[:80]}")
    for obj in objects:
        for priv in privs:
            if m["verb"].lower() == "grant":
                expected.grants.add((kind, obj, priv))
            elif priv in ("all", "all privileges"):
                expected.grants = {g for g in expected.grants if (g[0], g[1]) != (kind, obj)}
            else:
                expected.grants.discard((kind, obj, priv))


def expected_setup(schema_dir: Path = SCHEMA_DIR, role: str = ENGINE_ROLE) -> Expected:
    """Read the schema files' GRANT/REVOKE, publication and replica identity statements."""
    expected = Expected()
    for path in sorted(schema_dir.glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        for raw in split_statements(text):
            stmt = normalised(raw)
            _apply_grant(expected, stmt, role)
            if (m := _IDENTITY.fullmatch(stmt)) is not None:
                expected.identities[m["table"]] = m["id"].lower()
        for m in _PUBLISH.finditer(normalised(text)):
            expected.published.update(_split_top_level(m["tables"]))
    return expected


# -- database checks -------------------------------------------------------------------------

async def check_schema(conn: asyncpg.Connection) -> Check:
    name = "schema"
    files = migrate.discover()
    latest = files[-1].version
    if not await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations')"
                               " is not null"):
        return failed(name, "not migrated (no supabase_migrations.schema_migrations): run "
                            "`planner migrate`")
    done = await migrate.applied(conn)
    missing = [m.version for m in files if m.version not in done]
    unknown = sorted(set(done) - {m.version for m in files})
    if missing:
        at = max(done) if done else "nothing"
        return failed(name, f"{len(missing)} migration(s) not applied (database at {at}, "
                            f"latest {latest}): run `planner migrate`")
    if unknown:
        return failed(name, f"the database records migration(s) this engine does not have "
                            f"({', '.join(unknown[:3])}): deploy the engine version that "
                            "migrated it")
    changed = [m.path.name for m in files
               if not statements_match(done[m.version] or [], m.sql)]
    if changed:
        return failed(name, f"{changed[0]} differs from what was applied: restore the file")
    return passed(name, f"at the latest migration {latest} ({len(files)} applied)")


@dataclass
class CronPlace:
    """Where the sweeper's job lives: the connection to the database pg_cron runs in."""

    conn: asyncpg.Connection | None
    detail: str


async def _cron_version(conn: asyncpg.Connection) -> str | None:
    version: str | None = await conn.fetchval(
        "select extversion from pg_extension where extname = 'pg_cron'")
    return version


def _period_s(schedule: str) -> float | None:
    """Seconds between runs of a pg_cron schedule, for the forms the sweeper uses."""
    text = schedule.strip()
    if text == "* * * * *":
        return 60.0
    if m := re.fullmatch(r"\*/(\d+) \* \* \* \*", text):
        return 60.0 * int(m[1])
    if m := re.fullmatch(r"(\d+) seconds?", text):
        return float(m[1])
    return None


async def _scheduled_age_s(conn: asyncpg.Connection) -> float | None:
    """Seconds since the sweeper was last scheduled (planner_engine.settings), if recorded."""
    if not await conn.fetchval(
        "select exists (select from pg_attribute where attrelid ="
        " to_regclass('planner_engine.settings') and attname = 'sweeper_scheduled_at')"
    ):
        return None
    age: float | None = await conn.fetchval(
        "select extract(epoch from now() - sweeper_scheduled_at)::float8"
        " from planner_engine.settings")
    return age


async def check_sweeper(cron: asyncpg.Connection, conn: asyncpg.Connection) -> Check:
    """The job exists for this database, is active, and ran recently enough."""
    name = "sweeper"
    here = await conn.fetchval("select current_database()")
    job = await cron.fetchrow(
        "select jobid, jobname, schedule, active from cron.job where database = $1"
        " and command ~ 'planner_engine\\.sweep_stale_runs\\(' order by jobid limit 1", here)
    if job is None:
        return failed(name, f"no pg_cron job runs planner_engine.sweep_stale_runs() in "
                            f"database {here}: run `planner migrate`")
    if not job["active"]:
        return failed(name, f"job {job['jobname']} is inactive: "
                            f"`select cron.alter_job({job['jobid']}, active => true)`")
    period = _period_s(job["schedule"])
    if period is None:
        return passed(name, f"job {job['jobname']} scheduled ({job['schedule']!r}; its "
                            "period is not one this check knows, runs not checked)")
    age = await _scheduled_age_s(conn)
    last = await cron.fetchrow(
        "select status, return_message, extract(epoch from now() - start_time)::float8 as ago"
        " from cron.job_run_details where jobid = $1 order by start_time desc limit 1",
        job["jobid"])
    if age is not None and age < period and (last is None or last["ago"] > age):
        return passed(name, f"job {job['jobname']} scheduled {age:.0f} s ago; first run due "
                            f"within {period:.0f} s")
    if last is None:
        return failed(name, f"job {job['jobname']} has never run: is pg_cron's background "
                            "worker running, and cron.log_run on?")
    if last["ago"] > 2 * period:
        return failed(name, f"job {job['jobname']} last ran {last['ago']:.0f} s ago, more "
                            f"than two periods ({2 * period:.0f} s): is pg_cron running?")
    if last["status"] == "failed":
        return failed(name, f"job {job['jobname']}'s last run failed: "
                            f"{(last['return_message'] or '').strip()}")
    return passed(name, f"job {job['jobname']} ({job['schedule']}) last ran "
                        f"{last['ago']:.0f} s ago: {last['status']}")


async def check_publication(conn: asyncpg.Connection, expected: Expected) -> Check:
    name = "realtime publication"
    if not await conn.fetchval("select exists (select from pg_publication where pubname = $1)",
                               PUBLICATION):
        return failed(name, f"no publication {PUBLICATION}: the project's Realtime is not set "
                            "up (hosted projects have it)")
    problems: list[str] = []
    for table in sorted(expected.published):
        schema, _, rel = table.rpartition(".")
        if not await conn.fetchval(
            "select exists (select from pg_publication_tables where pubname = $1"
            " and schemaname = $2 and tablename = $3)", PUBLICATION, schema or "public", rel):
            problems.append(f"{table} is not in {PUBLICATION}")
    for table, identity in sorted(expected.identities.items()):
        actual = await conn.fetchval(
            "select case c.relreplident when 'f' then 'full' when 'd' then 'default'"
            " when 'n' then 'nothing' else 'using index ' || coalesce("
            "(select i.indexrelid::regclass::text from pg_index i"
            " where i.indrelid = c.oid and i.indisreplident), '?') end"
            " from pg_class c where c.oid = to_regclass($1)", table)
        if actual is None:
            problems.append(f"{table} does not exist")
        elif actual != identity and not (identity.startswith("using index")
                                         and actual.endswith(identity.rsplit(" ", 1)[1])):
            problems.append(f"{table} has replica identity {actual}, the migrations set "
                            f"{identity}")
    if problems:
        return failed(name, "; ".join(problems) + ": run `planner migrate`")
    return passed(name, f"{', '.join(sorted(expected.published))} published, replica identity "
                        + ", ".join(f"{t} {i}" for t, i in sorted(expected.identities.items())))


_ACTUAL_GRANTS = """
select 'table' as kind, c.oid, c.oid::regclass::text as object, a.privilege_type
  from pg_class c, aclexplode(c.relacl) a where a.grantee = $1
union all
select 'column', c.oid, c.oid::regclass::text || '.' || at.attname, a.privilege_type
  from pg_attribute at join pg_class c on c.oid = at.attrelid, aclexplode(at.attacl) a
 where a.grantee = $1
union all
select 'function', p.oid, p.oid::regprocedure::text, a.privilege_type
  from pg_proc p, aclexplode(p.proacl) a where a.grantee = $1
union all
select 'schema', n.oid, n.nspname::text, a.privilege_type
  from pg_namespace n, aclexplode(n.nspacl) a where a.grantee = $1
"""
_RESOLVE = {"table": "to_regclass($1)::oid", "function": "to_regprocedure($1)::oid",
            "schema": "to_regnamespace($1)::oid"}
#: Role attributes that would give the engine more than its grants.
_POWERS = ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb", "rolreplication")


async def check_engine_role(
    conn: asyncpg.Connection, expected: Expected, role: str = ENGINE_ROLE
) -> Check:
    """Not a superuser nor alike, member of no role, and exactly the expected grants (the
    objects resolved by name in this database, compared by oid)."""
    name = "engine role"
    attrs = await conn.fetchrow(f"select oid, {', '.join(_POWERS)} from pg_roles"
                                " where rolname = $1", role)
    if attrs is None:
        return failed(name, f"role {role} does not exist: run `planner migrate`")
    powers = [p.removeprefix("rol") for p in _POWERS if attrs[p]]
    if powers:
        return failed(name, f"{role} is {' and '.join(powers)}: the listener must run with "
                            f"least privilege (`alter role {role} no{' no'.join(powers)}`)")
    member_of = [r[0] for r in await conn.fetch(
        "select b.rolname from pg_auth_members m join pg_roles b on b.oid = m.roleid"
        " where m.member = $1", attrs["oid"])]
    if member_of:
        return failed(name, f"{role} is a member of {', '.join(member_of)} and inherits its "
                            f"rights: `revoke {member_of[0]} from {role}`")
    want: dict[tuple[str, int, str], str] = {}
    unresolved: list[str] = []
    for kind, obj, priv in sorted(expected.grants):
        oid = await conn.fetchval(f"select {_RESOLVE[kind]}", obj)
        if oid is None:
            unresolved.append(f"{kind} {obj}")
        else:
            want[(kind, oid, priv.upper())] = f"{priv.upper()} on {kind} {obj}"
    have = {(r["kind"], r["oid"], r["privilege_type"]): f"{r['privilege_type']} on "
            f"{r['kind']} {r['object']}" for r in await conn.fetch(_ACTUAL_GRANTS, attrs["oid"])}
    if unresolved:
        return failed(name, f"missing object(s) {', '.join(unresolved[:3])}: run "
                            "`planner migrate`")
    extra = [have[k] for k in sorted(set(have) - set(want))]
    lacking = [want[k] for k in sorted(set(want) - set(have))]
    if extra or lacking:
        parts = ([f"extra grant(s): {'; '.join(extra[:3])}"] if extra else []) + (
            [f"missing grant(s): {'; '.join(lacking[:3])}"] if lacking else [])
        return failed(name, f"{role} differs from the migrations: {', '.join(parts)}")
    return passed(name, f"{role}: no superuser, exactly its {len(want)} grants")


#: The function whose owner writes the UI's messages (planner_engine.broadcast and
#: announce_queued call realtime.send as that owner, the migration runner).
BROADCAST_FN = "planner_engine.broadcast(uuid,uuid,text,jsonb)"
BROADCAST_SQL = """
select r.rolname as owner, r.rolsuper or r.rolbypassrls as bypass,
       pg_catalog.to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null as send,
       pg_catalog.to_regclass('realtime.messages') is not null
         and pg_catalog.has_table_privilege(r.oid, 'realtime.messages', 'insert') as can_insert,
       exists (select 1 from pg_catalog.pg_policies p
                where p.schemaname = 'realtime' and p.tablename = 'messages'
                  and p.policyname = 'planner_run_engine_send'
                  and r.rolname = any(p.roles)) as policy
  from pg_catalog.pg_proc f join pg_catalog.pg_roles r on r.oid = f.proowner
 where f.oid = pg_catalog.to_regprocedure($1)
"""


async def check_database_broadcast(conn: asyncpg.Connection) -> Check:
    """Can the database send the UI's events? realtime.send turns every failure into a
    WARNING, so a missing privilege would drop every progress event without an error."""
    name = "broadcast from the database"
    row = await conn.fetchrow(BROADCAST_SQL, BROADCAST_FN)
    if row is None:
        return failed(name, f"{BROADCAST_FN} is missing: run `planner migrate`")
    if not row["send"]:
        return failed(name, "realtime.send is missing: the project's Realtime schema is older "
                            "than broadcast from the database (hosted projects have it)")
    if not row["can_insert"] or not (row["bypass"] or row["policy"]):
        return failed(name, f"{row['owner']}, the owner of {BROADCAST_FN}, may not insert into "
                            "realtime.messages (INSERT privilege, and BYPASSRLS or policy "
                            "planner_run_engine_send): run `planner migrate` as that role")
    how = "bypasses RLS" if row["bypass"] else "policy planner_run_engine_send"
    return passed(name, f"realtime.send as {row['owner']} ({how})")


async def _guard(name: str, check: Awaitable[Check]) -> Check:
    """A check that raised is a failing line naming the error, not a traceback."""
    try:
        return await check
    except (asyncpg.PostgresError, OSError, ValueError) as exc:
        return failed(name, f"{type(exc).__name__}: {exc}")


async def database_checks(
    dsn: str, *, cron_database: str | None = None, engine_role: str = ENGINE_ROLE,
    schema_dir: Path = SCHEMA_DIR,
) -> list[Check]:
    """The operator-connection checks, in order."""
    try:
        conn = await asyncpg.connect(dsn, timeout=15)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return [failed("database", f"cannot connect: {type(exc).__name__}: {exc}")]
    try:
        here = await conn.fetchval("select current_database()")
        version = await conn.fetchval("show server_version")
        checks = [passed("database", f"connected to {here} (PostgreSQL {version})")]
        checks.append(await _guard("schema", check_schema(conn)))
        checks.extend(await _cron_checks(conn, dsn, cron_database))
        try:
            # The grants the migrations give planner_engine, whichever role is checked.
            expected = expected_setup(schema_dir)
        except ValueError as exc:
            checks.append(failed("migrations", str(exc)))
            return checks
        checks.append(await _guard("realtime publication", check_publication(conn, expected)))
        checks.append(await _guard("engine role", check_engine_role(conn, expected, engine_role)))
        checks.append(await _guard("broadcast from the database",
                                   check_database_broadcast(conn)))
        return checks
    finally:
        await conn.close()


async def _cron_checks(
    conn: asyncpg.Connection, dsn: str, cron_database: str | None
) -> list[Check]:
    version = await _cron_version(conn)
    if version is not None:
        return [passed("pg_cron", f"pg_cron {version} in this database"),
                await _guard("sweeper", check_sweeper(conn, conn))]
    if not cron_database:
        here = await conn.fetchval("select current_database()")
        return [failed("pg_cron", f"pg_cron is not installed in database {here}, so the "
                                  "sweeper never runs: `planner migrate` enables it (hosted: or "
                                  "Database > Extensions > pg_cron)")]
    try:
        cron = await asyncpg.connect(migrate.with_database(dsn, cron_database), timeout=15)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return [failed("pg_cron", f"cannot connect to the cron database {cron_database}: "
                                  f"{exc}")]
    try:
        version = await _cron_version(cron)
        if version is None:
            return [failed("pg_cron", f"pg_cron is not installed in the cron database "
                                      f"{cron_database} either")]
        return [passed("pg_cron", f"pg_cron {version} in the cron database {cron_database}"),
                await _guard("sweeper", check_sweeper(cron, conn))]
    finally:
        await cron.close()


# -- the listener's Realtime settings ------------------------------------------------------

def check_key(key: str, variable: str) -> Check:
    """The kind of key the listener needs: its subscription hears every run insert."""
    name = "realtime key"
    info = apikeys.classify(key)  # the listener's own classification (start-up check)
    if info.kind == "secret":
        return passed(name, f"{variable} is a secret key (sb_secret_)")
    if info.kind == "publishable":
        return failed(name, f"{variable} holds a publishable key (sb_publishable_): the "
                            "listener needs the secret key (sb_secret_) or the service_role key")
    role = info.role if info.kind == "jwt" else None
    if role == "service_role":
        return passed(name, f"{variable} is a service_role JWT")
    if role is None:
        return failed(name, f"{variable} is neither a JWT nor an sb_secret_ key: copy the "
                            "service_role (or secret) key from the project's API settings")
    return failed(name, f"{variable} holds a key with role {role}: the listener needs the "
                        "service_role key (or an sb_secret_ key); with this one it hears no run")


async def realtime_checks(url: str, key: str, variable: str, timeout_s: float = 10) -> list[Check]:
    """Key kind, then connect and join a private channel with the official client."""
    from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
    from realtime.types import RealtimeChannelOptions

    checks = [check_key(key, variable)]
    client = AsyncRealtimeClient(f"{url.rstrip('/')}/realtime/v1", token=key,
                                 auto_reconnect=False, max_retries=1)
    try:
        await asyncio.wait_for(client.connect(), timeout_s)
    except Exception as exc:  # whatever the client raises for an unreachable server
        checks.append(failed("realtime reachable", f"{url}/realtime/v1: {type(exc).__name__}: "
                                                   f"{exc}"))
        return checks
    try:
        checks.append(passed("realtime reachable", f"{url}/realtime/v1 connected"))
        states: list[tuple[Any, Exception | None]] = []
        options: RealtimeChannelOptions = {"config": {
            "private": True, "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": False}}}
        channel = client.channel(f"planner_doctor:{uuid.uuid4()}", options)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.subscribe(lambda s, e: states.append((s, e))),
                                   timeout_s)
        status, err = states[-1] if states else (None, None)
        if status == RealtimeSubscribeStates.SUBSCRIBED:
            checks.append(passed("private channels", "joined a private channel"))
        else:
            checks.append(failed("private channels", f"joining a private channel gave "
                                                     f"{getattr(status, 'value', status)}: "
                                                     f"{err or 'no reply'}"))
    finally:
        # Closing a half-broken socket: nothing left to report.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 3)
    return checks


# -- the command -----------------------------------------------------------------------------

async def run(
    database_url: str | None, supabase_url: str | None, key: tuple[str, str] | None,
    cron_database: str | None = None,
) -> list[Check]:
    checks: list[Check] = []
    if database_url:
        checks += await database_checks(database_url, cron_database=cron_database)
    if supabase_url and key:
        checks += await realtime_checks(supabase_url, key[1], key[0])
    elif supabase_url or key:
        checks.append(failed("realtime", f"set both SUPABASE_URL and {KEY_VARIABLE} (the "
                                         "listener's settings) to check Realtime"))
    return checks


def report(checks: Iterable[Check], as_json: bool, echo: Callable[[str], None]) -> bool:
    """Print the checks; True when all passed."""
    checks = list(checks)
    if as_json:
        echo(json.dumps({"ok": all(c.ok for c in checks),
                         "checks": [c.model_dump() for c in checks]}, indent=2))
    else:
        for c in checks:
            echo(c.line())
    return all(c.ok for c in checks)


def command(
    database_url: str | None = typer.Option(
        None, "--database-url", envvar="DATABASE_URL",
        help="Operator connection (the one `planner migrate` uses) for the database checks.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    cron_database: str | None = typer.Option(
        None, "--cron-database", envvar="PLANNER_CRON_DATABASE",
        help="As for `planner migrate`: the database pg_cron runs in, when not this one.",
    ),
) -> None:
    """Check a deployment: schema, pg_cron sweeper, Realtime publication, engine role
    (with --database-url), and the listener's Realtime settings (SUPABASE_URL and
    SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY from the environment). One line per
    check; exit 1 when one fails."""
    supabase_url = os.environ.get("SUPABASE_URL") or None
    key = apikeys.key_variable(dict(os.environ))
    if not (database_url or supabase_url or key):
        typer.secho(f"error: nothing to check: pass --database-url (or set DATABASE_URL) and/or "
                    f"set SUPABASE_URL and {KEY_VARIABLE}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    checks = asyncio.run(run(database_url, supabase_url, key,
                             cron_database=cron_database or None))
    ok = report(checks, as_json, typer.echo)
    raise typer.Exit(0 if ok else 1)
