-- Serves the per-poll check for stored messages that are no longer on the server although
-- they were never marked deleted (a QUIT whose reply was lost): only such rows are indexed,
-- so the check costs nothing once they are marked.
create index messages_undeleted on messages (pilot_id) where deleted_from_server_at is null and not headers_only;
