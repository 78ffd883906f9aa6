-- ccmail schema, version 11: agents take work. A work item lives
-- queued → offered → accepted → done, can go back (offered → queued: rejected or the offer
-- expired; accepted → queued: released, or the lease expired and the agent is taken as lost),
-- can be cancelled (the mail stays stored), held for a supervisor (never offered) or
-- transferred to another queue.
--
-- Fencing: every claim draws a fresh `claim_token`; every later step names it and the state it
-- expects, so an agent whose offer or lease has passed to someone else changes nothing. The
-- columns that belong to a claim exist exactly when the item is offered or accepted (checked).
--
-- Order: an item that goes back keeps its place. Claims take the highest priority first, then
-- the item that entered the queue first (`enqueued_at` is never moved).
--
-- `assigned` items (no agent could hold one before this version: nothing handed them out)
-- go back to `queued` with an event saying so.

alter table work_items drop constraint work_items_status;

alter table work_items
    add column claim_token text,
    add column agent text,
    add column offered_at timestamptz,
    add column offer_expires_at timestamptz,
    add column accepted_at timestamptz,
    add column lease_expires_at timestamptz,
    add column first_offered_at timestamptz,
    add column first_accepted_at timestamptz,
    add column done_at timestamptz,
    add column done_by text,
    add column offers integer not null default 0,
    add column held_reason text,
    add column cancel_reason text,
    add column updated_at timestamptz not null default now();

create table work_item_events (
    id bigint generated always as identity primary key,
    work_item_id bigint not null references work_items (id) on delete cascade,
    at timestamptz not null default now(),
    -- Who: an API key's name, `system` (the rescue step, ingest) or `cli:<os user>`.
    actor text not null,
    action text not null,
    from_status text,
    to_status text not null,
    claim_token text,
    reason text,
    from_queue text,
    to_queue text,
    constraint work_item_events_actor_length check (octet_length(actor) between 1 and 200),
    constraint work_item_events_reason_length check (reason is null or octet_length(reason) <= 1000)
);

create index work_item_events_item_idx on work_item_events (work_item_id, id);

insert into work_item_events (work_item_id, actor, action, from_status, to_status, reason)
select id, 'system', 'requeued', 'assigned', 'queued',
       'schema version 11: assigned items had no agent holding them'
from work_items where status = 'assigned';

update work_items set status = 'queued' where status = 'assigned';

-- When an item was done was not kept before this version: the migration's time stands in.
update work_items set done_at = now() where status = 'done';

alter table work_items
    add constraint work_items_status
        check (status in ('queued', 'offered', 'accepted', 'done', 'cancelled', 'held')),
    add constraint work_items_claim_shape check (
        ((status in ('offered', 'accepted')) = (claim_token is not null and agent is not null))
        and (status <> 'offered' or offer_expires_at is not null)
        and (status <> 'accepted' or lease_expires_at is not null)
        and ((status = 'held') = (held_reason is not null))
        and ((status = 'cancelled') = (cancel_reason is not null))
        and ((status = 'done') = (done_at is not null))
    ),
    add constraint work_items_offers_nonnegative check (offers >= 0),
    add constraint work_items_reason_length check (
        octet_length(coalesce(held_reason, '')) <= 1000
        and octet_length(coalesce(cancel_reason, '')) <= 1000
    );

-- A transfer names a queue; rows from before this version are not re-checked.
alter table work_items
    add constraint work_items_queue_length check (octet_length(queue) between 1 and 200) not valid;

-- Serves the claim: the first queued item of a queue in claim order, skipping locked rows.
create index work_items_claim_idx on work_items (queue, priority desc, enqueued_at, id)
    where status = 'queued';

-- Serve the rescue step: offers and leases past their expiry.
create index work_items_offer_expiry_idx on work_items (offer_expires_at) where status = 'offered';
create index work_items_lease_expiry_idx on work_items (lease_expires_at) where status = 'accepted';

-- Wakes long-poll claims: a row that becomes (or is created) queued notifies its queue's
-- name. NOTIFY is delivered at commit and folded per transaction, so a batch of one queue
-- sends one notification.
create function work_items_notify_queued() returns trigger language plpgsql as $$
begin
    perform pg_notify('ccmail_work_queued', new.queue);
    return null;
end;
$$;

create trigger work_items_queued_insert after insert on work_items
    for each row when (new.status = 'queued') execute function work_items_notify_queued();
create trigger work_items_queued_update after update of status, queue on work_items
    for each row when (new.status = 'queued') execute function work_items_notify_queued();

create table api_keys (
    id bigint generated always as identity primary key,
    -- Never reused, so an event's actor names one key for ever.
    name text not null,
    role text not null,
    -- The queues an agent key may act on; empty for supervisor and admin keys means all.
    queues text[] not null default '{}',
    -- SHA-256 of the key; the key itself (256 random bits) is shown once and never stored.
    key_hash bytea not null,
    -- The first characters of the key, for telling keys apart in a listing.
    key_prefix text not null,
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    last_used_at timestamptz,
    constraint api_keys_name_key unique (name),
    constraint api_keys_hash_key unique (key_hash),
    constraint api_keys_role check (role in ('agent', 'supervisor', 'admin')),
    constraint api_keys_name_form check (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    constraint api_keys_agent_queues check (role <> 'agent' or cardinality(queues) > 0)
);

-- A POST's first answer, replayed for the same key and the same request.
create table idempotency_keys (
    api_key_id bigint not null references api_keys (id) on delete cascade,
    key text not null,
    request_hash bytea not null,
    status_code smallint not null,
    response jsonb not null,
    created_at timestamptz not null default now(),
    primary key (api_key_id, key),
    constraint idempotency_keys_key_length check (octet_length(key) between 1 and 200)
);

create index idempotency_keys_created_idx on idempotency_keys (created_at);
