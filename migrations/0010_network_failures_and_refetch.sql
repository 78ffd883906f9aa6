-- ccmail schema, version 10: a download that the network broke is not held against the
-- message, and a message stored as headers only because its download kept failing is tried
-- again later.
--
-- Why: a connection reset or timeout during RETR says nothing about the message; counting it
-- toward the give-up limit turned good messages into headers-only items on a flaky link,
-- never fetched again. `attempts` now counts the server's refusals of that message and the
-- connections that broke while it was the first download of a fresh session;
-- `connection_failures` counts the breaks after other downloads of the session had gone
-- through (not held against it; kept for the operator, and so that such a message is fetched
-- after the rest of the mailbox). `refetch_attempted_at` is
-- the last time a headers-only `fetch_failed` message was tried again (null: not since it was
-- stored); messages already in that state are tried again at the next poll.

alter table fetch_failures
    add column connection_failures integer not null default 0,
    drop constraint fetch_failures_attempts_positive,
    add constraint fetch_failures_counts check (
        attempts >= 0 and connection_failures >= 0 and attempts + connection_failures > 0
    );

alter table messages add column refetch_attempted_at timestamptz;
