-- ccmail schema, version 13: an attachment is stored once.
--
-- A base64 attachment of the message is already in `messages.raw`, encoded. Storing its
-- decoded bytes as well wrote most of a large message twice (heap, TOAST and WAL). Such an
-- attachment now keeps `bytes` null and names the range of `raw` that holds its base64 body
-- (`raw_start` inclusive, `raw_end` exclusive, offsets in octets); reading it decodes that
-- range, which the ingest checked gives exactly the bytes it parsed. Every other attachment
-- (quoted-printable, text, nested messages, repaired or truncated mail) keeps its bytes.

alter table attachments alter column bytes drop not null;

alter table attachments
    add column raw_start bigint,
    add column raw_end bigint;

alter table attachments add constraint attachments_bytes_or_range check (
    (bytes is not null and raw_start is null and raw_end is null)
    or (bytes is null and raw_start is not null and raw_end is not null
        and 0 <= raw_start and raw_start <= raw_end)
);
