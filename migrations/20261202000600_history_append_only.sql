-- History is append-only for planners; members join by invitation (issue 14, finding 2).
--
-- * job_lines_history and planner_execution_logs lose their foreign keys to allocation_runs
--   and allocation_planner_runs (which cascaded their deletion): they keep the ids, a trigger
--   makes the tenant check the keys made, the organisation stays a key; log lines get
--   allocation_run_id (filled in from the run) for the explicit purge,
--   planner_private.purge_history (service role only; `planner history purge`).
-- * Deleting an allocation run or a term snapshots the plan first (BEFORE DELETE triggers),
--   and is for admins only (the planners_delete policies become admins_delete).
-- * An organisation keeps at least one admin (PL030).
-- * Members are no longer inserted by admins: organization_invitations, public.invite_member,
--   public.accept_invitation; admins may update only a member's role.
-- migrations/schema/*.sql hold the resulting definitions (10_tables, 20_rules, 40_access).

-- -- history and logs keep their ids ----------------------------------------------------------
alter table public.job_lines_history
  drop constraint job_lines_history_allocation_run_id_organization_id_fkey,
  drop constraint job_lines_history_planner_run_id_allocation_run_id_organiz_fkey,
  add constraint job_lines_history_organization_id_fkey
    foreign key (organization_id) references public.organizations (id) on delete cascade;

alter table public.planner_execution_logs
  drop constraint planner_execution_logs_planner_run_id_organization_id_fkey,
  add column allocation_run_id uuid;
update public.planner_execution_logs l
   set allocation_run_id = r.allocation_run_id
  from public.allocation_planner_runs r
 where r.id = l.planner_run_id;
alter table public.planner_execution_logs
  alter column allocation_run_id set not null,
  add constraint planner_execution_logs_organization_id_fkey
    foreign key (organization_id) references public.organizations (id) on delete cascade;
create index planner_execution_logs_alloc_idx
  on public.planner_execution_logs (allocation_run_id);

-- -- invitations ------------------------------------------------------------------------------
-- Invitations (issue 14): the only way a user becomes a member of an organisation they are
-- not in yet. An admin invites an e-mail address (public.invite_member), the user holding
-- that address accepts (public.accept_invitation). Nobody learns from it whether an address
-- or a user id has an account: invite_member never looks at auth.users.
create table public.organization_invitations (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id) on delete cascade,
  email text not null check (email = lower(btrim(email)) and email ~ '^[^@[:space:]]+@[^@[:space:]]+$'),
  role text not null check (role in ('admin', 'planner', 'viewer')),
  invited_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null default now() + interval '14 days',
  accepted_at timestamptz,
  accepted_by uuid references auth.users (id) on delete set null,
  constraint accepted_together check ((accepted_at is null) = (accepted_by is null))
);
-- One open invitation per address and organisation (inviting again updates it).
create unique index organization_invitations_open_idx
  on public.organization_invitations (organization_id, email) where accepted_at is null;
create index organization_invitations_email_idx on public.organization_invitations (email);

-- -- triggers and functions -------------------------------------------------------------------
-- job_lines_history and planner_execution_logs keep no foreign key to the allocation run or
-- the planner run (10_tables.sql), so deleting those removes neither and their ids stay. What
-- the composite keys checked, these triggers check: a snapshot names an allocation run (and a
-- run) of its own organisation, a log line a run of its own organisation. SECURITY DEFINER:
-- the writer (the engine's functions, the service role) need not read the parents itself.
create function planner_private.history_belongs_to_its_run()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from public.allocation_runs a
                  where a.id = new.allocation_run_id and a.organization_id = new.organization_id)
     or (new.planner_run_id is not null and not exists (
           select 1 from public.allocation_planner_runs r
            where r.id = new.planner_run_id and r.allocation_run_id = new.allocation_run_id
              and r.organization_id = new.organization_id)) then
    raise exception using errcode = 'PL002',
      message = format('snapshot of allocation run %s / planner run %s does not belong to '
                       'organisation %s', new.allocation_run_id, new.planner_run_id,
                       new.organization_id),
      hint = 'a snapshot names an existing allocation run (and run) of its own organisation';
  end if;
  return new;
end
$$;

create trigger job_lines_history_belongs_to_its_run
  before insert or update of organization_id, allocation_run_id, planner_run_id
  on public.job_lines_history
  for each row execute function planner_private.history_belongs_to_its_run();

-- Also fills allocation_run_id from the run, so the writers (write_log, write_logs,
-- claim_run, the sweeper) need not know it and cannot get it wrong.
create function planner_private.log_belongs_to_its_run()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_allocation_run_id uuid;
begin
  select r.allocation_run_id into v_allocation_run_id
    from public.allocation_planner_runs r
   where r.id = new.planner_run_id and r.organization_id = new.organization_id;
  if not found then
    raise exception using errcode = 'PL002',
      message = format('planner run %s does not belong to organisation %s',
                       new.planner_run_id, new.organization_id);
  end if;
  new.allocation_run_id := v_allocation_run_id;
  return new;
end
$$;

create trigger planner_execution_logs_belongs_to_its_run
  before insert or update of planner_run_id, organization_id, allocation_run_id
  on public.planner_execution_logs
  for each row execute function planner_private.log_belongs_to_its_run();

-- Any change that removes rotations of a plan snapshots the plan first: deleting an
-- allocation run (its lines go) or a term (its rotations go). A row-level BEFORE DELETE
-- trigger, because the cascades run after the deleted row is gone and a BEFORE statement
-- trigger does not know the rows. Deleting several terms of one allocation run in one
-- transaction keeps one snapshot, of the plan before the first deletion: later ones see a
-- plan already missing the deleted terms and are skipped while a delete snapshot of this
-- allocation run written by this transaction exists (xmin) and no commit or restore of this
-- transaction came after it. Deleting a whole organisation (an operator's act) keeps nothing:
-- its history goes with it.
create function planner_private.snapshot_before_delete()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_allocation_run_id uuid;
  v_old jsonb;
  v_xid xid := pg_catalog.pg_current_xact_id()::xid;
begin
  if tg_table_name = 'allocation_runs' then
    v_allocation_run_id := old.id;
  else
    v_allocation_run_id := old.allocation_run_id;
  end if;
  if not exists (select 1 from public.organizations o where o.id = old.organization_id) then
    return old;
  end if;
  if exists (select 1 from public.job_lines_history h
              where h.allocation_run_id = v_allocation_run_id and h.xmin = v_xid
                and h.planner_run_id is null and h.restored_snapshot_id is null)
     and not exists (select 1 from public.job_lines_history h
                      where h.allocation_run_id = v_allocation_run_id and h.xmin = v_xid
                        and (h.planner_run_id is not null or h.restored_snapshot_id is not null))
  then
    return old;
  end if;
  v_old := planner_private.current_plan(v_allocation_run_id, true);
  if v_old is not null then
    insert into public.job_lines_history
      (organization_id, allocation_run_id, taken_by, n_lines, plan)
    values (old.organization_id, v_allocation_run_id, auth.uid(),
            jsonb_array_length(v_old -> 'lines'), v_old);
  end if;
  return old;
end
$$;

create trigger allocation_runs_snapshot_before_delete
  before delete on public.allocation_runs
  for each row execute function planner_private.snapshot_before_delete();
create trigger terms_snapshot_before_delete
  before delete on public.terms
  for each row execute function planner_private.snapshot_before_delete();

-- The operator's explicit purge (`planner history purge --allocation-run ID`, listener/ops.py):
-- the snapshots and log lines of an allocation run that has been deleted. Executable by the
-- service role only (40_access.sql), and it checks the database role again itself. A live
-- allocation run's history is refused (PL033): delete the allocation run first.
create function planner_private.purge_history(p_allocation_run_id uuid)
returns jsonb
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_snapshots bigint;
  v_logs bigint;
begin
  if not planner_private.caller_is_privileged() then
    raise exception using errcode = '42501',
      message = 'only the service role may purge history';
  end if;
  if exists (select 1 from public.allocation_runs a where a.id = p_allocation_run_id) then
    raise exception using errcode = 'PL033',
      message = format('allocation run %s still exists; its history is kept while it does',
                       p_allocation_run_id),
      hint = 'delete the allocation run first (as an admin of its organisation), then purge';
  end if;
  delete from public.planner_execution_logs l where l.allocation_run_id = p_allocation_run_id;
  get diagnostics v_logs = row_count;
  delete from public.job_lines_history h where h.allocation_run_id = p_allocation_run_id;
  get diagnostics v_snapshots = row_count;
  return jsonb_build_object('snapshots', v_snapshots, 'logs', v_logs);
end
$$;

-- -- membership (issue 14) --------------------------------------------------------------------
-- An organisation always keeps an admin: after a member's change or removal the organisation
-- must still have one, or PL030. The organisation row is locked first, so two admins demoting
-- each other at the same time cannot both succeed (the second sees the first's commit).
-- Removing the members together with their organisation (an operator deleting it) passes.
-- Deleting the auth user of a last admin is refused too: appoint another admin first.
create function planner_private.keep_one_admin()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  perform 1 from public.organizations o where o.id = old.organization_id for no key update;
  if not found then
    return null;
  end if;
  if not exists (select 1 from public.organization_members m
                  where m.organization_id = old.organization_id and m.role = 'admin') then
    raise exception using errcode = 'PL030',
      message = format('organisation %s would be left without an admin', old.organization_id),
      hint = 'make another member an admin first (invite one if needed), then change or '
             'remove this one';
  end if;
  return null;
end
$$;

create trigger organization_members_keep_one_admin
  after update or delete on public.organization_members
  for each row when (old.role = 'admin')
  execute function planner_private.keep_one_admin();

-- The caller's own e-mail address (lower case), for the invitations' read policy: the
-- invited user sees their invitations. Returns nothing about anybody else.
create function planner_private.caller_email()
returns text
language sql stable security definer set search_path = ''
as $$
  select lower(u.email) from auth.users u where u.id = (select auth.uid())
$$;

-- An admin (or the service role) invites an address with a role; inviting the same address
-- again while the invitation is open updates it. The answer is an invitation id whether or
-- not the address has an account: nothing here reads auth.users.
create function public.invite_member(p_organization_id uuid, p_email text, p_role text)
returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_email text := lower(btrim(coalesce(p_email, '')));
  v_id uuid;
begin
  if not (planner_private.has_role(p_organization_id, array['admin'])
          or planner_private.caller_is_privileged()) then
    raise exception using errcode = 'PL031',
      message = 'only admins of the organisation can invite members',
      hint = 'ask an admin of the organisation to invite them';
  end if;
  if p_role is null or p_role not in ('admin', 'planner', 'viewer') then
    raise exception using errcode = '22023',
      message = format('unknown role %s', coalesce(p_role, 'NULL')),
      hint = 'admin, planner or viewer';
  end if;
  if v_email !~ '^[^@[:space:]]+@[^@[:space:]]+$' then
    raise exception using errcode = '22023',
      message = format('%s is not an e-mail address', p_email);
  end if;
  insert into public.organization_invitations (organization_id, email, role, invited_by)
  values (p_organization_id, v_email, p_role, auth.uid())
  on conflict (organization_id, email) where accepted_at is null
  do update set role = excluded.role, invited_by = excluded.invited_by,
                created_at = now(), expires_at = excluded.expires_at
  returning id into v_id;
  return v_id;
end
$$;

-- The invited user accepts: the invitation must be open, unexpired and addressed to the
-- caller's own (confirmed, where auth.users records confirmation) e-mail address. One error
-- for every failure, so an invitation id of somebody else is not confirmed. A user who is
-- already a member keeps their role (an admin changes roles with UPDATE).
create function public.accept_invitation(p_invitation_id uuid)
returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_uid uuid := auth.uid();
  v_inv public.organization_invitations;
begin
  select i.* into v_inv
    from public.organization_invitations i
    join auth.users u on u.id = v_uid and lower(u.email) = i.email
   where i.id = p_invitation_id and i.accepted_at is null and i.expires_at > now()
     and (not (to_jsonb(u) ? 'email_confirmed_at')
          or to_jsonb(u) ->> 'email_confirmed_at' is not null)
     for update of i;
  if not found then
    raise exception using errcode = 'PL032',
      message = format('invitation %s not found, expired, already accepted or not addressed '
                       'to you', p_invitation_id),
      hint = 'ask an admin of the organisation for a new invitation to your e-mail address';
  end if;
  insert into public.organization_members (organization_id, user_id, role)
  values (v_inv.organization_id, v_uid, v_inv.role)
  on conflict (organization_id, user_id) do nothing;
  update public.organization_invitations
     set accepted_at = now(), accepted_by = v_uid
   where id = v_inv.id;
  return v_inv.organization_id;
end
$$;

-- -- privileges and policies -----------------------------------------------------------------
revoke all on public.organization_invitations from public, anon, authenticated, planner_engine;
grant all on public.organization_invitations to service_role;
grant select, delete on public.organization_invitations to authenticated;
revoke all on function planner_private.history_belongs_to_its_run(),
  planner_private.log_belongs_to_its_run(), planner_private.snapshot_before_delete(),
  planner_private.purge_history(uuid), planner_private.keep_one_admin(),
  planner_private.caller_email()
  from public, anon, authenticated;

revoke insert, update on public.organization_members from authenticated;
grant update (role) on public.organization_members to authenticated;
drop policy admins_insert on public.organization_members;

drop policy planners_delete on public.allocation_runs;
drop policy planners_delete on public.terms;
create policy admins_delete on public.allocation_runs for delete to authenticated
  using (planner_private.has_role(organization_id, array['admin']));
create policy admins_delete on public.terms for delete to authenticated
  using (planner_private.has_role(organization_id, array['admin']));

alter table public.organization_invitations enable row level security;
create policy admins_and_invitee_read on public.organization_invitations
  for select to authenticated
  using (planner_private.has_role(organization_id, array['admin'])
         or email = (select planner_private.caller_email()));
create policy admins_delete on public.organization_invitations
  for delete to authenticated
  using (planner_private.has_role(organization_id, array['admin']));

revoke all on function public.invite_member(uuid, text, text),
  public.accept_invitation(uuid)
  from public, anon, authenticated;
grant execute on function public.invite_member(uuid, text, text) to authenticated, service_role;
grant execute on function public.accept_invitation(uuid) to authenticated;
-- The invitations' read policy asks for the caller's own address.
grant execute on function planner_private.caller_email() to authenticated;
-- `planner history purge` (listener/ops.py), as the service role; nobody else.
grant execute on function planner_private.purge_history(uuid) to service_role;
