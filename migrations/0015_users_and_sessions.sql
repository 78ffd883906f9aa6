-- ccmail schema, version 15: people log in to the web console.
--
-- `users`: an account per person, with a role (admin, supervisor, agent) and, for agents,
-- the queues they work. The password is stored only as its argon2id PHC string.
-- `web_sessions`: a logged-in browser, known by the SHA-256 of its cookie (the cookie itself,
-- 256 random bits, is never stored), with the CSRF token its forms must carry.
-- `audit_log`: every change made through the console or the CLI: who, what, when.

create table users (
    id bigint generated always as identity primary key,
    name text not null,
    role text not null,
    queues text[] not null default '{}',
    password_hash text not null,
    created_at timestamptz not null default now(),
    disabled_at timestamptz,
    constraint users_name_key unique (name),
    constraint users_role check (role in ('agent', 'supervisor', 'admin')),
    constraint users_name_form check (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    constraint users_agent_queues check (role <> 'agent' or cardinality(queues) > 0),
    constraint users_password_is_argon2id check (password_hash like '$argon2id$%')
);

create table web_sessions (
    token_hash bytea primary key,
    user_id bigint not null references users (id) on delete cascade,
    csrf_token text not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    constraint web_sessions_hash_length check (octet_length(token_hash) = 32)
);

create index web_sessions_expiry_idx on web_sessions (expires_at);

create table audit_log (
    id bigint generated always as identity primary key,
    at timestamptz not null default now(),
    actor text not null,
    action text not null,
    target text,
    detail jsonb not null default '{}',
    constraint audit_log_actor_length check (octet_length(actor) between 1 and 200)
);
