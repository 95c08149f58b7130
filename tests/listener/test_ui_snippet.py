"""The UI snippet of docs/listener.md, run with supabase-js against the local stack.

`tests/js/watch_run.mjs` holds the snippet verbatim (checked here) and runs it with
`createClient` the way a UI does: the member's token reaches Realtime through supabase-js's
`accessToken` callback, either from a signed-in session in the client's storage (Supabase Auth)
or from createClient's `accessToken` option (third-party auth). Both supabase-js installs of
tests/js/package-lock.json are used: the current release and the release built on the pinned
realtime-js. Under `CI=true` the newest supabase-js release is installed too (npm, into a temp
folder) and differences are reported, never failed on: the pins are what the tests prove.

Everything is real: PostgreSQL, the local Realtime server (restarted on its port for the
reconnect test), `planner listen`, the CP-SAT child process and Node.js.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devstack import keys
from devstack.seed import SeededOrganization
from devstack.settings import REPO_ROOT, DevSettings
from tests.listener.conftest import ListenerFactory
from tests.realtime.helpers import JS_DIR, Events
from tests.support.harness import TERMINAL, insert_run, wait_for_status
from tests.support.realtime import RealtimeServer
from tests.support.roles import acting_as

pytestmark = pytest.mark.timeout(300)

SCRIPT = JS_DIR / "watch_run.mjs"
DOCS = REPO_ROOT / "docs" / "listener.md"
CURRENT = "@supabase/supabase-js"
ON_PINNED_REALTIME = "supabase-js-on-pinned-realtime"
PINNED = [CURRENT, ON_PINNED_REALTIME]
AUTHS = ["session", "accessToken"]
NPM_TIMEOUT_S = 240


def snippet_of_script() -> str:
    text = SCRIPT.read_text()
    start = text.index("// ---- snippet (docs/listener.md)")
    start = text.index("\n", start) + 1
    return text[start:text.index("// ---- end of snippet")]


def test_the_docs_snippet_is_the_one_the_tests_run():
    """docs/listener.md shows exactly the code of watch_run.mjs between its markers."""
    blocks = re.findall(r"```js\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert snippet_of_script() in blocks, (
        "docs/listener.md's UI snippet and tests/js/watch_run.mjs differ: paste the code "
        "between the snippet markers of watch_run.mjs into the docs' ```js block"
    )


# -- plumbing --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def newest() -> Iterator[str | None]:
    """Under CI=true, the newest supabase-js release in a temp folder (None when not CI, or
    when npm cannot get it: reported, not failed)."""
    if os.environ.get("CI") != "true":
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="newest-supabase-js-"))
    try:
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(folder),
                 "@supabase/supabase-js@latest", "ws@8.18.3"],
                check=True, timeout=NPM_TIMEOUT_S, capture_output=True, text=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            report(f"newest supabase-js: not installed ({str(exc).splitlines()[0]}); not checked")
            yield None
            return
        yield str(folder / "node_modules" / "@supabase" / "supabase-js")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(message: str) -> None:
    """Say it in the test output and in pytest's warnings summary (seen with -q, in CI)."""
    print(message)
    warnings.warn(message, UserWarning, stacklevel=2)


class Watcher:
    """`node watch_run.mjs <package> <auth> <pattern> ...`: one UI, its printed events."""

    def __init__(self, package: str, auth: str, pattern: str = "snippet") -> None:
        self.package, self.auth, self.pattern = package, auth, pattern
        self.events = Events()
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""
        self._reader: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.package} ({self.auth}, {self.pattern})"

    async def start(self, rt: RealtimeServer, anon: str, token: str, run_id: str) -> Watcher:
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(SCRIPT), self.package, self.auth, self.pattern, rt.url, anon, token,
            run_id, cwd=str(JS_DIR), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout and self.proc.stderr
        while line := await self.proc.stdout.readline():
            try:
                self.events.add(json.loads(line))
            except ValueError:
                self.events.add({"type": "stdout", "payload": line.decode(errors="replace")})
        self.stderr = await self.proc.stderr.read()

    def seen(self, kind: str) -> list[Any]:
        return [e["payload"] for e in self.events.items if e["type"] == kind]

    async def wait(self, kind: str, count: int = 1, wait_s: float = 30) -> None:
        """Until `count` events of `kind` were printed (nothing consumed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(self.seen(kind)) < count:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(
                    f"{self.name}: {count} x {kind} not seen within {wait_s}s; saw "
                    f"{self.events.items}; stderr {self.stderr.decode(errors='replace')[-2000:]}"
                )
            self.events._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events._changed.wait(), left)

    async def finished(self, wait_s: float = 120) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), wait_s)
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    def outcome(self) -> dict[str, Any]:
        """What a UI author would notice, comparable between releases."""
        done = self.seen("done")
        return {
            "subscribed": len(self.seen("subscribed")) > 0,
            "progress": len(self.seen("progress")) > 0,
            "rows": sorted({r["status"] for r in self.seen("row")}),
            "done": done[0]["status"] if done else None,
            "problems": [p["status"] for p in self.seen("problem")],
        }


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:
        await w.close()


async def new_run(db: asyncpg.Connection, org: SeededOrganization) -> str:
    return await insert_run(
        db, user_id=org.planner.id, organization_id=org.id,
        allocation_run_id=org.allocation_run_id, n_job_lines=org.suggested_n_job_lines,
        constraints=list(org.suggested_constraints),
        options={"time_limit_seconds": 2, "deterministic": True},
    )


def assert_followed(w: Watcher, run_id: str) -> None:
    """Everything the snippet's UI shows for a completed run, received as the member."""
    versions = w.seen("versions")
    assert versions, f"{w.name}: {w.events.items}"
    out = w.outcome()
    assert out["done"] == "COMPLETED", (w.name, versions, w.events.items)
    assert out["progress"], (w.name, versions, "no progress broadcast")
    assert "COMPLETED" in out["rows"], (w.name, versions, "no postgres_changes UPDATE")
    assert all(r["id"] == run_id for r in w.seen("row")), w.events.items
    assert {"phase": "solving", "position": None} in w.seen("status"), w.events.items


# -- the snippet follows a run, on every install --------------------------------------------
async def test_the_snippet_follows_a_run_with_every_supabase_js(
    db: asyncpg.Connection, org: SeededOrganization, listeners: ListenerFactory,
    rt_server: RealtimeServer, dev_settings: DevSettings, watchers: list[Watcher],
    newest: str | None,
):
    run_id = await new_run(db, org)
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    kinds = [(p, a) for p in PINNED for a in AUTHS] + (
        [(newest, a) for a in AUTHS] if newest else [])
    for package, auth in kinds:
        watchers.append(await Watcher(package, auth).start(
            rt_server, anon, org.planner.access_token, run_id))
    for w in watchers:
        await w.wait("subscribed")
    listeners("L1")
    for w in watchers:
        assert await w.finished() == 0, (w.name, w.events.items, w.stderr[-2000:])
    pinned = [w for w in watchers if w.package in PINNED]
    for w in pinned:
        assert_followed(w, run_id)
    assert {w.package: w.seen("versions")[0] for w in pinned} == {
        CURRENT: {"supabase_js": "2.119.1", "realtime_js": "2.119.1"},
        ON_PINNED_REALTIME: {"supabase_js": "2.109.0", "realtime_js": "2.109.0"},
    }, "tests/js/package-lock.json pins these; update this test and docs/listener.md with it"
    for w in watchers:
        if w.package in PINNED:
            continue
        reference = next(p for p in pinned if p.auth == w.auth and p.package == CURRENT)
        compare_newest(w, reference)


def compare_newest(w: Watcher, reference: Watcher) -> None:
    version = (w.seen("versions") or [{}])[0]
    if w.outcome() == reference.outcome():
        print(f"newest supabase-js {version}: same as the pinned release ({w.auth})")
    else:
        report(f"newest supabase-js {version} behaves differently from the pinned "
               f"{reference.seen('versions')[0]} ({w.auth}): {w.outcome()} instead of "
               f"{reference.outcome()}; events {w.events.items}")


# -- a forced reconnect ------------------------------------------------------------------------
async def test_the_snippet_still_receives_as_the_member_after_a_realtime_restart(
    db: asyncpg.Connection, org: SeededOrganization, listeners: ListenerFactory,
    rt_server: RealtimeServer, dev_settings: DevSettings, watchers: list[Watcher],
):
    """The Realtime server restarts on its port: every client reconnects and rejoins, and the
    run's broadcasts (members only, by policy) and rows (RLS) still reach it afterwards."""
    run_id = await new_run(db, org)
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    for package in PINNED:
        for auth in AUTHS:
            watchers.append(await Watcher(package, auth).start(
                rt_server, anon, org.planner.access_token, run_id))
    for w in watchers:
        await w.wait("subscribed")
    rt_server.stop()
    rt_server.start()
    for w in watchers:  # rejoined on the new server: SUBSCRIBED again (refetchRun)
        await w.wait("subscribed", count=2, wait_s=60)
    listeners("L1")
    for w in watchers:
        assert await w.finished() == 0, (w.name, w.events.items, w.stderr[-2000:])
        assert_followed(w, run_id)


# -- the broken pattern ------------------------------------------------------------------------
async def test_subscribing_in_the_same_tick_joins_without_the_members_token(
    db: asyncpg.Connection, org: SeededOrganization, rt_server: RealtimeServer,
    dev_settings: DevSettings, watchers: list[Watcher],
):
    """The pattern docs/listener.md warns about, on both pinned installs and both auth paths:
    the private channel's first join carries no user token and is refused (the UI sees
    CHANNEL_ERROR; realtime-js rejoins later with the token), and a public channel joins as
    anon and stays anon: the member's run rows never reach it."""
    run_id = await new_run(db, org)
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    try:
        for package in PINNED:
            for auth in AUTHS:
                watchers.append(await Watcher(package, auth, "same-tick").start(
                    rt_server, anon, org.planner.access_token, run_id))
        for w in watchers:
            await w.wait("public_subscribe")
            await w.wait("subscribe")
            first = w.seen("subscribe")[0]
            assert first["status"] == "CHANNEL_ERROR", (w.name, w.events.items)
            assert "Unauthorized" in first["error"], (w.name, first)
            await w.wait("subscribed")  # the rejoin, with the token resolved meanwhile
            # Changes flow to the private channel ("Subscribed to PostgreSQL"); the public one,
            # as anon, is refused its subscription filtered on `id` (anon may not read that
            # column; hosted's subscription_check_filters refuses the same way).
            await w.wait("system")
            await w.wait("public_system")
            assert w.seen("system")[0]["status"] == "ok", (w.name, w.events.items)
            refused = w.seen("public_system")[0]
            assert refused["status"] == "error", (w.name, w.events.items)
            assert "invalid column for filter id" in json.dumps(refused), (w.name, refused)
        # Two updates of the member's run. The private channel (now the member's) gets both;
        # the public channel on the same socket would have had the first before the second.
        for n in (1, 2):
            await db.execute(
                "update allocation_planner_runs set options = options || jsonb_build_object("
                "'touch', $2::int) where id = $1", run_id, n)
            for w in watchers:
                await w.wait("row", count=n)
        for w in watchers:
            leaked = [r for r in w.seen("public_row") if r["status"] is not None]
            assert leaked == [], (w.name, "the public channel got the member's rows", leaked)
            if w.seen("public_row"):
                print(f"{w.name}: public channel got rows without data: {w.seen('public_row')}")
    finally:
        async with acting_as(db, "authenticated", sub=org.planner.id) as c:
            await c.execute("select public.request_cancel($1)", run_id)
        await wait_for_status(db, run_id, TERMINAL, 10)


async def test_the_old_setauth_advice_rejoins_as_anon_after_a_reconnect_on_current_releases(
    db: asyncpg.Connection, org: SeededOrganization, rt_server: RealtimeServer,
    dev_settings: DevSettings, watchers: list[Watcher],
):
    """What docs/listener.md advised before: no session, `realtime.setAuth(jwt)`, subscribe.
    Up to supabase-js 2.112.0 (here 2.109.0) a reconnect rejoins as the member; from 2.112.1
    (here the current release) supabase-js's callback answers the anon key on reconnect and the
    rejoin of the private channel is refused."""
    run_id = await new_run(db, org)
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    try:
        old, current = [
            await Watcher(package, "none", "old-advice").start(
                rt_server, anon, org.planner.access_token, run_id)
            for package in (ON_PINNED_REALTIME, CURRENT)
        ]
        watchers.extend([old, current])
        for w in watchers:
            await w.wait("subscribed")  # the first join carries the member's token
        rt_server.stop()
        rt_server.start()
        await old.wait("subscribed", count=2, wait_s=60)
        await current.events.after(
            lambda e: e["type"] == "subscribe" and "Unauthorized" in (e["payload"]["error"] or ""),
            wait_s=60)
        assert len(current.seen("subscribed")) == 1, current.events.items
    finally:
        async with acting_as(db, "authenticated", sub=org.planner.id) as c:
            await c.execute("select public.request_cancel($1)", run_id)
        await wait_for_status(db, run_id, TERMINAL, 10)
