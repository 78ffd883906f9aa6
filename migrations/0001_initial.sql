-- ccmail schema, version 1.
--
-- Invariants the database enforces (not just the code):
--   * a stored credential is never plaintext: it is sealed (`enc:v1:<key id>:<base64>`) or a
--     reference (`env:NAME`, `file:PATH`);
--   * a mailbox pilot's auth columns agree with its auth kind;
--   * one message per (pilot, uidl), one work item per message: duplicates are impossible
--     even if two pollers overlap.

create table oauth_apps (
    id bigint generated always as identity primary key,
    name text not null,
    tenant text not null,
    client_id text not null,
    authority text not null default 'https://login.microsoftonline.com',
    scope text not null default 'https://outlook.office365.com/.default',
    credential text not null,
    secret_expires_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint oauth_apps_name_key unique (name),
    constraint oauth_apps_identity_key unique (authority, tenant, client_id, scope),
    constraint oauth_apps_name_not_blank check (btrim(name) <> ''),
    constraint oauth_apps_tenant_not_blank check (btrim(tenant) <> ''),
    constraint oauth_apps_client_id_not_blank check (btrim(client_id) <> ''),
    constraint oauth_apps_credential_not_plaintext check (
        credential ~ '^enc:v1:[0-9a-f]{8}:[A-Za-z0-9+/]+={0,2}$'
        or credential ~ '^env:[A-Za-z_][A-Za-z0-9_]*$'
        or credential ~ '^file:.+$'
    )
);

create table pilots (
    id bigint generated always as identity primary key,
    queue text not null,
    mailbox text not null,
    host text not null default 'outlook.office365.com',
    port integer not null default 995,
    tls text not null default 'implicit',
    auth text not null default 'xoauth2',
    app_id bigint references oauth_apps (id) on delete restrict,
    username text,
    password_credential text,
    ca_bundle text,
    poll_interval_secs integer not null default 60,
    keep_on_server boolean not null default false,
    max_message_bytes bigint not null default 52428800,
    enabled boolean not null default true,
    last_success_at timestamptz,
    last_error text,
    last_error_hint text,
    last_error_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint pilots_queue_not_blank check (btrim(queue) <> ''),
    constraint pilots_mailbox_not_blank check (btrim(mailbox) <> ''),
    constraint pilots_host_not_blank check (btrim(host) <> ''),
    constraint pilots_port_range check (port between 1 and 65535),
    constraint pilots_tls_mode check (tls in ('implicit', 'starttls', 'dangerous_plaintext')),
    constraint pilots_auth_kind check (auth in ('xoauth2', 'user_pass')),
    constraint pilots_auth_consistent check (
        (auth = 'xoauth2' and app_id is not null and username is null and password_credential is null)
        or (auth = 'user_pass' and app_id is null and username is not null and password_credential is not null)
    ),
    constraint pilots_password_not_plaintext check (
        password_credential is null
        or password_credential ~ '^enc:v1:[0-9a-f]{8}:[A-Za-z0-9+/]+={0,2}$'
        or password_credential ~ '^env:[A-Za-z_][A-Za-z0-9_]*$'
        or password_credential ~ '^file:.+$'
    ),
    constraint pilots_poll_interval_positive check (poll_interval_secs > 0),
    constraint pilots_max_message_bytes_positive check (max_message_bytes > 0)
);

-- Mailbox addresses and host names are case-insensitive: Support@ and support@ are one pilot.
create unique index pilots_mailbox_host_key on pilots (lower(mailbox), lower(host));
create index pilots_app_id_idx on pilots (app_id);

-- Running workers LISTEN on this channel as a wake-up hint (the periodic re-read stays the
-- truth). Status columns that pollers write on every poll are ignored, so a poll does not wake
-- every worker.
create function ccmail_config_notify() returns trigger
language plpgsql as $$
declare
    row_id bigint;
begin
    if tg_op = 'UPDATE'
        and (to_jsonb(old) - array['last_success_at', 'last_error', 'last_error_hint', 'last_error_at', 'updated_at'])
          = (to_jsonb(new) - array['last_success_at', 'last_error', 'last_error_hint', 'last_error_at', 'updated_at'])
    then
        return null;
    end if;
    if tg_op = 'DELETE' then
        row_id := old.id;
    else
        row_id := new.id;
    end if;
    perform pg_notify(
        'ccmail_config',
        json_build_object('table', tg_table_name, 'op', lower(tg_op), 'id', row_id)::text
    );
    return null;
end;
$$;

create trigger oauth_apps_notify after insert or update or delete on oauth_apps
    for each row execute function ccmail_config_notify();
create trigger pilots_notify after insert or update or delete on pilots
    for each row execute function ccmail_config_notify();

create table messages (
    id bigint generated always as identity primary key,
    pilot_id bigint not null references pilots (id) on delete restrict,
    uidl text not null,
    raw bytea not null,
    sha256 bytea not null,
    message_id text,
    subject text,
    from_addrs jsonb not null default '[]',
    to_addrs jsonb not null default '[]',
    cc_addrs jsonb not null default '[]',
    reply_to_addrs jsonb not null default '[]',
    sent_at timestamptz,
    in_reply_to text[] not null default '{}',
    "references" text[] not null default '{}',
    text_body text,
    html_body text,
    parse_error text,
    size bigint not null,
    headers_only boolean not null default false,
    fetched_at timestamptz not null default now(),
    deleted_from_server_at timestamptz,
    constraint messages_pilot_uidl_key unique (pilot_id, uidl),
    constraint messages_sha256_length check (octet_length(sha256) = 32),
    constraint messages_size_nonnegative check (size >= 0),
    constraint messages_addrs_are_arrays check (
        jsonb_typeof(from_addrs) = 'array' and jsonb_typeof(to_addrs) = 'array'
        and jsonb_typeof(cc_addrs) = 'array' and jsonb_typeof(reply_to_addrs) = 'array'
    )
);

-- Threading: find the conversation a reply belongs to.
create index messages_message_id_idx on messages (message_id) where message_id is not null;

create table attachments (
    id bigint generated always as identity primary key,
    message_id bigint not null references messages (id) on delete cascade,
    ordinal integer not null,
    filename text,
    content_type text not null,
    size bigint not null,
    content_id text,
    inline boolean not null default false,
    bytes bytea not null,
    constraint attachments_message_ordinal_key unique (message_id, ordinal),
    constraint attachments_size_matches check (size = octet_length(bytes))
);

create table work_items (
    id bigint generated always as identity primary key,
    message_id bigint not null references messages (id) on delete cascade,
    queue text not null,
    status text not null default 'queued',
    priority smallint not null default 0,
    flags text[] not null default '{}',
    enqueued_at timestamptz not null default now(),
    constraint work_items_message_key unique (message_id),
    constraint work_items_status check (status in ('queued', 'assigned', 'done'))
);

-- Serves "oldest queued item of queue Q" (routing and the queue-age metric).
create index work_items_queued_idx on work_items (queue, enqueued_at) where status = 'queued';

create table fetch_failures (
    pilot_id bigint not null references pilots (id) on delete cascade,
    uidl text not null,
    attempts integer not null default 1,
    last_error text not null,
    first_failed_at timestamptz not null default now(),
    last_failed_at timestamptz not null default now(),
    primary key (pilot_id, uidl),
    constraint fetch_failures_attempts_positive check (attempts > 0)
);
