-- ccmail schema, version 9: the problems the parser recovered from, stored with the message.
--
-- Why: the parser lists what it had to work around (an undecodable transfer encoding, a
-- multipart without its closing boundary, a limit that stopped parsing) so that an agent
-- can tell why a message looks odd; until now that list was computed and thrown away.
-- The parser keeps at most 21 entries (20 and a summary line); the store caps each at
-- 1,000 bytes, and the constraint holds the same numbers, because the database can be
-- written without ccmail. Rows stored before this migration have no defects recorded.

alter table messages
    add column defects text[] not null default '{}',
    add constraint messages_defects_limits check (
        cardinality(defects) <= 21
        and octet_length(array_to_string(defects, '')) <= 21 * 1000
    );
