-- Supabase scaffolding for the LOCAL database only.
--
-- A hosted Supabase project already has every object below; this file recreates just enough
-- of them, only where absent, so that the files in migrations/ apply unchanged both here and
-- to a real project (`planner migrate --database-url ...` or `supabase db push`).
-- It is applied by `planner dev up` and by the test fixtures, never by `planner migrate`.

-- Roles (cluster-wide). Attributes mirror Supabase's: only service_role bypasses RLS.
do $$
begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticator') then
    -- PostgREST's login role: it switches to anon/authenticated/service_role per request.
    create role authenticator login noinherit;
  end if;
end
$$;

grant anon, authenticated, service_role to authenticator;

-- What a hosted project grants in `public`: tables are reachable by the API roles and RLS
-- decides which rows. Migrations therefore must enable RLS on every table they create.
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

-- auth: the helpers RLS policies call. Same definitions as Supabase's (claims come from the
-- `request.jwt.claims` setting that PostgREST and Realtime set per request).
create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

create table if not exists auth.users (
  id uuid primary key,
  aud text default 'authenticated',
  role text default 'authenticated',
  email text unique,
  raw_app_meta_data jsonb default '{}'::jsonb,
  raw_user_meta_data jsonb default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;

-- Realtime: the publication postgres_changes reads, and the table whose RLS policies
-- authorise private channels (Realtime Authorization).
do $$
begin
  if not exists (select from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
end
$$;

create schema if not exists realtime;
grant usage on schema realtime to anon, authenticated, service_role;

-- Hosted Supabase partitions this table by day; locally one plain table is enough.
create table if not exists realtime.messages (
  id uuid not null default gen_random_uuid(),
  topic text not null,
  extension text not null,
  payload jsonb,
  event text,
  private boolean default false,
  updated_at timestamp not null default now(),
  inserted_at timestamp not null default now(),
  primary key (id, inserted_at)
);
alter table realtime.messages enable row level security;
grant select, insert, update on realtime.messages to anon, authenticated, service_role;

create or replace function realtime.topic() returns text
language sql stable
as $$
  select nullif(current_setting('realtime.topic', true), '')::text
$$;
grant execute on function realtime.topic() to anon, authenticated, service_role;

-- Broadcast from the database, with hosted's contract (supabase/realtime's tenant migrations):
-- a message row in realtime.messages, which Realtime streams out of the WAL to the topic's
-- subscribers (private topics: those whose join the read policies admitted). The caller's
-- privileges and RLS decide whether the row may be written, with `realtime.topic` set as in a
-- private channel's probes; any failure is a WARNING and nothing is sent, as on hosted (the
-- caller's transaction carries on). Like hosted: a payload without an `id` key gets the
-- message's id, and EXECUTE is left to PUBLIC.
create or replace function realtime.send(
  payload jsonb, event text, topic text, private boolean default true
) returns void
language plpgsql
as $$
declare
  v_id uuid := gen_random_uuid();
begin
  begin
    perform set_config('realtime.topic', topic, true);
    insert into realtime.messages (id, payload, event, topic, private, extension)
    values (v_id,
            case when payload ? 'id' then payload else payload || jsonb_build_object('id', v_id) end,
            event, topic, private, 'broadcast');
  exception when others then
    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
  end;
end
$$;

-- pg_cron can only live in the database named by cron.database_name (as on Supabase,
-- where that is `postgres`). Other local databases (test clones) go without it.
do $$
begin
  if current_database() = current_setting('cron.database_name', true) then
    create extension if not exists pg_cron;
  end if;
end
$$;
