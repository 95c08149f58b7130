"""The listener's wake-up channel is private, authorised by RLS on `realtime.messages`.

A hosted project with public channels disabled refuses public joins ("PrivateOnly: This project
only allows private channels"), so `RealtimeLink` joins `planner-engine-runs` with
`config.private`. The local server authorises a private join the way hosted Realtime does: it
inserts probe rows into `realtime.messages` and reads them back as the token's role. These tests
drive the real `RealtimeLink` (realtime-py) against the real local server and database:

* with the service-role key it subscribes and still wakes on an inserted run;
* a key whose role no policy admits is refused, which a public join never is: the join really
  is private;
* policy `planner_engine_runs_listener_read` is what admits a role without BYPASSRLS, and the
  service role does not depend on it (BYPASSRLS), both checked by dropping the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from devstack import keys
from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from listener.realtime_link import CHANNEL, CHANNEL_OPTIONS, RealtimeLink
from tests.realtime.helpers import PyClient
from tests.support.harness import insert_run, until
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(120)

POLICY = "planner_engine_runs_listener_read"
POLICY_SQL = (
    f"create policy {POLICY} on realtime.messages for select to service_role"
    " using (extension = 'broadcast' and (select realtime.topic()) = 'planner-engine-runs')"
)


#: the instance seed of this module's organisation (tests/listener/conftest.py `org`)
ORG_SEED = 5


class Running:
    """A `RealtimeLink` supervised in a task, with the run hints it reported."""

    def __init__(self, rt: RealtimeServer, key: str) -> None:
        self.hints: list[uuid.UUID] = []
        self.subscriptions = 0
        self.link = RealtimeLink(rt.url, key, self._hint, self._subscribed, stale_after_s=60)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.link.run(self.stop))

    def _hint(self, run_id: uuid.UUID, _created: datetime) -> None:
        self.hints.append(run_id)

    def _subscribed(self) -> None:
        self.subscriptions += 1

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)

    async def state(self, wanted: str) -> None:
        await until(lambda: True if self.link.state == wanted else None, 20,
                    lambda: f"link state {self.link.state!r}, waiting for {wanted!r}")


@contextlib.asynccontextmanager
async def running(rt: RealtimeServer, key: str) -> AsyncIterator[Running]:
    r = Running(rt, key)
    try:
        yield r
    finally:
        await r.close()


@contextlib.asynccontextmanager
async def probe_role(db: asyncpg.Connection) -> AsyncIterator[str]:
    """A role like service_role but WITHOUT BYPASSRLS (unique name: roles are cluster-wide)."""
    role = f"rt_listener_probe_{uuid.uuid4().hex[:10]}"
    await db.execute(f"create role {role} nologin noinherit")
    await db.execute(f"grant usage on schema realtime to {role}")
    await db.execute(f"grant select, insert on realtime.messages to {role}")
    await db.execute(f"grant execute on function realtime.topic() to {role}")
    try:
        yield role
    finally:
        await db.execute(f"drop owned by {role}")
        await db.execute(f"drop role {role}")


async def test_the_listener_joins_privately_and_still_wakes(
    db_url: str, rt_server: RealtimeServer, dev_settings: DevSettings, org: SeededOrganization,
):
    assert CHANNEL_OPTIONS["config"]["private"] is True
    service = keys.api_key("service_role", dev_settings.jwt_secret)
    db = await asyncpg.connect(db_url)
    try:
        async with running(rt_server, service) as r:
            await until(lambda: True if r.link.changes_flowing else None, 30,
                        lambda: f"changes never flowed (state {r.link.state})")
            channels = r.link._client.realtime.get_channels() if r.link._client else []
            assert [(c.topic, c.params["config"]["private"]) for c in channels] == [
                (f"realtime:{CHANNEL}", True)
            ]
            run_id = await insert_run(
                db, user_id=org.planner.id, organization_id=org.id,
                allocation_run_id=org.allocation_run_id, n_job_lines=org.suggested_n_job_lines,
                constraints=list(org.suggested_constraints), options={"time_limit_seconds": 1},
            )
            await until(lambda: True if uuid.UUID(run_id) in r.hints else None, 20,
                        lambda: f"no wake-up for {run_id}: hints {r.hints}")
    finally:
        await db.close()


@pytest.mark.parametrize("who", ["anon", "member"])
async def test_a_role_no_policy_admits_is_refused(
    rt_server: RealtimeServer, dev_settings: DevSettings, org: SeededOrganization, who: str,
):
    """A public channel admits any valid key; the listener's channel refuses the anon key and
    a signed-in user (who therefore cannot inject wake-ups on it either)."""
    key = (keys.api_key("anon", dev_settings.jwt_secret) if who == "anon"
           else org.planner.access_token)
    async with running(rt_server, key) as r:
        await r.state("CHANNEL_ERROR")
        assert not r.link.subscribed and r.subscriptions == 0


async def test_the_policy_admits_the_listener_role_and_only_the_policy_does(
    db_url: str, rt_server: RealtimeServer, dev_settings: DevSettings,
):
    """Run against a role without BYPASSRLS named in the policy: joins with the policy,
    refused without it. The service role joins either way (BYPASSRLS), as on hosted Supabase."""
    db = await asyncpg.connect(db_url)
    try:
        async with probe_role(db) as role:
            token = keys.api_key(role, dev_settings.jwt_secret)
            service = keys.api_key("service_role", dev_settings.jwt_secret)
            await db.execute(f"alter policy {POLICY} on realtime.messages to service_role, {role}")
            try:
                async with running(rt_server, token) as r:
                    await r.state("SUBSCRIBED")
                await db.execute(f"drop policy {POLICY} on realtime.messages")
                async with running(rt_server, token) as r:
                    await r.state("CHANNEL_ERROR")
                    assert r.subscriptions == 0
                async with running(rt_server, service) as r:
                    await r.state("SUBSCRIBED")
            finally:
                await db.execute(f"drop policy if exists {POLICY} on realtime.messages")
                await db.execute(POLICY_SQL)
    finally:
        await db.close()


async def test_the_listener_works_on_a_private_only_project(
    db_url: str, dev_settings: DevSettings, db_name: str, org: SeededOrganization,
):
    """A Realtime server that refuses public joins (`--private-only`, like a hosted project
    with public access disabled): a public join gets hosted's PrivateOnly refusal, the
    listener's channel subscribes and wakes on an inserted run."""
    service = keys.api_key("service_role", dev_settings.jwt_secret)
    with RealtimeServer(dev_settings, db_name, extra_args=("--private-only",)) as rt:
        public = PyClient(rt.url, service)
        try:
            assert await public.subscribe(public.channel(CHANNEL)) == "CHANNEL_ERROR"
            assert "PrivateOnly: This project only allows private channels" in \
                public.last_status["err"]
        finally:
            await public.close()
        db = await asyncpg.connect(db_url)
        try:
            # The module's earlier test left its run PENDING (no listener solves it here).
            await db.execute("update allocation_planner_runs set status = 'CANCELLED',"
                             " finished_at = now() where allocation_run_id = $1"
                             " and status = 'PENDING'", org.allocation_run_id)
            async with running(rt, service) as r:
                await until(lambda: True if r.link.changes_flowing else None, 30,
                            lambda: f"changes never flowed (state {r.link.state})")
                run_id = await insert_run(
                    db, user_id=org.planner.id, organization_id=org.id,
                    allocation_run_id=org.allocation_run_id,
                    n_job_lines=org.suggested_n_job_lines,
                    constraints=list(org.suggested_constraints),
                    options={"time_limit_seconds": 1},
                )
                await until(lambda: True if uuid.UUID(run_id) in r.hints else None, 20,
                            lambda: f"no wake-up for {run_id}: hints {r.hints}")
        finally:
            await db.close()
