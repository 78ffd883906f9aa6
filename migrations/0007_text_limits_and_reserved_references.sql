-- ccmail schema, version 7: limits on every admin-set text that is indexed or shown, and
-- credential references that may never name ccmail's own settings or the database login.
--
-- Why: a btree index refuses a row over about 2,700 bytes, so one over-long queue, mailbox or
-- host (the CLI used to accept a 10 KB queue name) broke every insert that touched it; and
-- control characters in a value reach every terminal that lists it. The numbers match
-- `store::limits`; "control characters" are C0, DEL, C1 and the bidirectional embedding,
-- override and isolate characters (`display::is_unsafe`).
--
-- An `env:` credential must not name CCMAIL_* (ccmail's settings and the master key),
-- DATABASE_URL or PG* (libpq's connection settings and password): whoever may write a row
-- must not be able to make the worker send one of those as a password or client secret. The
-- worker refuses such references when it resolves them too (rows written before this
-- migration, or with these constraints dropped).
--
-- The constraints are added `not valid`: rows that already break a limit stay readable and
-- are reported by the worker (that pilot does not start, with the reason in its log) until an
-- admin fixes them; new rows and every update are checked. Once the rows are fixed:
--   alter table pilots validate constraint pilots_queue_limits;   -- and so on for each.

alter table pilots
    add constraint pilots_queue_limits check (
        char_length(queue) <= 100
        and queue !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint pilots_mailbox_limits check (
        char_length(mailbox) <= 320
        and mailbox !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint pilots_host_limits check (
        char_length(host) <= 253
        and host !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint pilots_username_limits check (
        username is null
        or (char_length(username) <= 320
            and username !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]')
    ) not valid,
    add constraint pilots_ca_bundle_limits check (
        ca_bundle is null
        or (char_length(ca_bundle) <= 4096
            and ca_bundle !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]')
    ) not valid,
    add constraint pilots_password_env_not_reserved check (
        password_credential is null
        or password_credential !~* '^env:(CCMAIL_|PG|DATABASE_URL$)'
    ) not valid;

alter table oauth_apps
    add constraint oauth_apps_name_limits check (
        char_length(name) <= 100
        and name !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint oauth_apps_tenant_limits check (
        char_length(tenant) <= 253
        and tenant !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint oauth_apps_client_id_limits check (
        char_length(client_id) <= 100
        and client_id !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint oauth_apps_authority_limits check (
        char_length(authority) <= 200
        and authority !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint oauth_apps_scope_limits check (
        char_length(scope) <= 200
        and scope !~ '[\x01-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]'
    ) not valid,
    add constraint oauth_apps_credential_env_not_reserved check (
        credential !~* '^env:(CCMAIL_|PG|DATABASE_URL$)'
    ) not valid;
