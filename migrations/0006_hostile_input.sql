-- ccmail schema, version 6: nothing a sender or a POP3 server writes can break an insert.
--
-- * `message_id` is the sender's text, of any length. A btree entry is limited to about a
--   third of a page (~2,700 bytes), so a long Message-ID made the whole batch fail, on every
--   poll. A hash index stores a 4-byte hash per row, serves the equality lookups threading
--   needs, and accepts any length.
-- * `identity` is the SHA-256 of the header fields that name one delivery (see
--   worker/ingest/identity.rs). Before deleting a message it did not download in this session,
--   the poller checks that the server still holds the message with this identity, so a server
--   that reuses a UIDL cannot make ccmail delete mail it never stored. NULL for rows stored
--   before this migration, and for messages whose header section names nothing.
-- * `fetch_failures.too_large`: the server sent far more than the size limit for a RETR (the
--   connection had to be dropped), so the next poll stores the headers at once (`TOP n 0`)
--   instead of downloading it again.
-- * `uidl` holds a server UIDL (1-70 printable characters, RFC 1939 §7) or a key derived from
--   the identity (`~ <64 hex digits>`) for a message whose UIDL cannot be trusted. The bound is
--   `not valid` so that older rows are not checked; new rows are.

drop index messages_message_id_idx;
create index messages_message_id_idx on messages using hash (message_id)
    where message_id is not null;

alter table messages add column identity bytea;
alter table messages add constraint messages_identity_length
    check (identity is null or octet_length(identity) = 32);
create index messages_pilot_identity_idx on messages (pilot_id, identity)
    where identity is not null;

alter table messages add constraint messages_uidl_length
    check (octet_length(uidl) between 1 and 200) not valid;
alter table fetch_failures add constraint fetch_failures_uidl_length
    check (octet_length(uidl) between 1 and 200) not valid;

alter table fetch_failures add column too_large boolean not null default false;
