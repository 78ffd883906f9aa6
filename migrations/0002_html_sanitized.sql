-- The HTML body sanitised for display to agents; html_body keeps the HTML as received.
alter table messages add column html_sanitized text;
