-- ccmail schema, version 16: "Poll now".
--
-- `pilots.poll_requested_at`: set by an operator (console or CLI) to ask for a poll before the
-- pilot's interval is up. The update notifies `ccmail_config` like any other change of the row
-- (this column is not in the trigger's ignore list), so every replica reads the pilots again;
-- the one replica that holds the pilot's lease polls it at once when the request is newer than
-- the last one it served. Nothing else polls: a request never opens a second session.
alter table pilots add column poll_requested_at timestamptz;
