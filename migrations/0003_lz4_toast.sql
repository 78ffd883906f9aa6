-- Message bytes and bodies are large; PostgreSQL's default TOAST compression (pglz) costs
-- about 4 ms per 100 KB on the ingest path, lz4 about a sixth of that. Servers built without
-- lz4 keep pglz (the statement fails with feature_not_supported and is skipped).
do $$
begin
    alter table messages alter column raw set compression lz4;
    alter table messages alter column text_body set compression lz4;
    alter table messages alter column html_body set compression lz4;
    alter table messages alter column html_sanitized set compression lz4;
    alter table attachments alter column bytes set compression lz4;
exception when feature_not_supported then
    raise notice 'lz4 is not available on this server; keeping pglz';
end
$$;
