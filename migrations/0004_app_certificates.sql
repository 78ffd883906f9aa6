-- ccmail schema, version 4: certificate credentials for OAuth apps, and a clear refusal when a
-- pilot with stored mail is removed.
--
-- An app authenticates either with a client secret (`credential` holds the sealed secret or a
-- reference) or with a certificate: then `credential` holds the sealed (or referenced) PEM
-- private key, `certificate_pem` the public certificate uploaded to the app registration, and
-- `assertion_alg` the client-assertion signature (RS256 with x5t, PS256 with x5t#S256).

alter table oauth_apps
    add column certificate_pem text,
    add column assertion_alg text,
    add constraint oauth_apps_certificate_consistent check (
        (certificate_pem is null and assertion_alg is null)
        or (certificate_pem is not null and assertion_alg in ('RS256', 'PS256'))
    );
