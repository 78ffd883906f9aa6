-- ccmail schema, version 8: credentials sealed bound to their row (`enc:v2`).
--
-- `enc:v2:<key id>:<base64>` is AES-256-GCM like `enc:v1`, with the owning row's identity in
-- the associated data (an app's authority, tenant, client id and credential kind; a USER/PASS
-- pilot's host, port, TLS mode and username), so a sealed value copied into another row does
-- not open there. Both forms stay accepted: `enc:v1` values are sealed again as `enc:v2` by
-- the worker (or by `ccmail key rotate`), which needs the master key the database never sees.
--
-- The "never plaintext" rule is otherwise unchanged: sealed, or a reference (`env:NAME`,
-- `file:PATH`).

alter table oauth_apps
    drop constraint oauth_apps_credential_not_plaintext,
    add constraint oauth_apps_credential_not_plaintext check (
        credential ~ '^enc:v[12]:[0-9a-f]{8}:[A-Za-z0-9+/]+={0,2}$'
        or credential ~ '^env:[A-Za-z_][A-Za-z0-9_]*$'
        or credential ~ '^file:.+$'
    );

alter table pilots
    drop constraint pilots_password_not_plaintext,
    add constraint pilots_password_not_plaintext check (
        password_credential is null
        or password_credential ~ '^enc:v[12]:[0-9a-f]{8}:[A-Za-z0-9+/]+={0,2}$'
        or password_credential ~ '^env:[A-Za-z_][A-Za-z0-9_]*$'
        or password_credential ~ '^file:.+$'
    );
