"""Fixtures for the Realtime conformance tests.

Each test module gets its own cloned database (`db_name`), its own tables with RLS keyed
on a membership table and `auth.uid()`, and its own server process from
`tests.support.realtime.RealtimeServer` on a free port. The planner schema is not used.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from devstack import keys
from devstack.settings import DevSettings
from tests.support.realtime import RealtimeServer

SCHEMA_SQL = """
create table public.rt_memberships (
  user_id uuid not null,
  organization_id uuid not null,
  primary key (user_id, organization_id)
);
alter table public.rt_memberships enable row level security;
create policy rt_memberships_self on public.rt_memberships
  for select to authenticated using (user_id = auth.uid());

create table public.rt_items (
  id bigserial primary key,
  organization_id uuid not null,
  name text,
  qty int,
  price numeric,
  tags text[],
  data jsonb,
  due timestamptz,
  ext_id uuid not null default gen_random_uuid()
);
alter table public.rt_items enable row level security;
create policy rt_items_members on public.rt_items for select to authenticated using (
  exists (select 1 from public.rt_memberships m
          where m.organization_id = rt_items.organization_id and m.user_id = auth.uid()));

-- No RLS and REPLICA IDENTITY FULL: full old_record on UPDATE and DELETE.
create table public.rt_plain (id int primary key, label text, n int);
alter table public.rt_plain replica identity full;

-- Not in the publication: subscriptions to it must fail like on Supabase.
create table public.rt_unpublished (id int primary key);

alter publication supabase_realtime add table public.rt_items, public.rt_plain;
grant select, insert, update, delete on public.rt_items, public.rt_plain, public.rt_memberships
  to anon, authenticated, service_role;

-- Realtime Authorization: members of an organisation may read and write topic rt-org:<id>.
create policy rt_org_read on realtime.messages for select to authenticated using (
  exists (select 1 from public.rt_memberships m
          where m.user_id = auth.uid() and realtime.topic() = 'rt-org:' || m.organization_id));
create policy rt_org_write on realtime.messages for insert to authenticated with check (
  exists (select 1 from public.rt_memberships m
          where m.user_id = auth.uid() and realtime.topic() = 'rt-org:' || m.organization_id));
"""


@dataclass
class World:
    """Two organisations with one member each, and the keys to act as anyone."""

    secret: str
    org_a: uuid.UUID
    org_b: uuid.UUID
    alice: uuid.UUID  # member of A
    bob: uuid.UUID  # member of B

    @property
    def service_key(self) -> str:
        return keys.api_key("service_role", self.secret)

    @property
    def anon_key(self) -> str:
        return keys.api_key("anon", self.secret)

    def token(self, user: uuid.UUID, lifetime_s: int = 3600) -> str:
        return keys.user_token(str(user), self.secret, lifetime_s=lifetime_s)


@pytest.fixture(scope="module")
async def world(dev_settings: DevSettings, db_url: str) -> AsyncIterator[World]:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(SCHEMA_SQL)
        w = World(dev_settings.jwt_secret, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
        await conn.executemany(
            "insert into public.rt_memberships (user_id, organization_id) values ($1, $2)",
            [(w.alice, w.org_a), (w.bob, w.org_b)],
        )
        yield w
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def rt_server(dev_settings: DevSettings, db_name: str, world: World) -> Iterator[RealtimeServer]:
    """The local Realtime server for this module's database."""
    with RealtimeServer(dev_settings, db_name) as server:
        yield server
