-- ccmail schema, version 14: several replicas on one database, one poller per mailbox.
--
-- `replicas`: every running `ccmail run` announces itself and renews its heartbeat; a replica
-- whose heartbeat is older than the lease TTL is dead to the others (they stop counting it
-- when they spread the pilots).
--
-- `pilot_leases`: the one replica allowed to poll a pilot, until `expires_at`. `fence` rises on
-- every change of holder (never on a renewal), so a replica that lost its lease while it was
-- frozen can tell, and its batch commit (which checks holder and fence in the same
-- transaction, locking the lease row) fails before any DELE.

create table replicas (
    id text primary key,
    hostname text not null,
    pid integer not null,
    version text not null,
    started_at timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    constraint replicas_id_form check (octet_length(id) between 1 and 200),
    constraint replicas_hostname_length check (octet_length(hostname) <= 255)
);

create index replicas_heartbeat_idx on replicas (heartbeat_at);

create table pilot_leases (
    pilot_id bigint primary key references pilots (id) on delete cascade,
    holder text not null,
    fence bigint not null,
    acquired_at timestamptz not null default now(),
    renewed_at timestamptz not null default now(),
    expires_at timestamptz not null,
    constraint pilot_leases_fence_positive check (fence > 0),
    constraint pilot_leases_holder_form check (octet_length(holder) between 1 and 200)
);

create index pilot_leases_holder_idx on pilot_leases (holder);
