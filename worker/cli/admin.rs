//! Handlers of `ccmail app …`, `ccmail pilot …` and `ccmail doctor`: they read what the
//! user typed, then call the validation, views and diagnosis of [`crate::ops`] and the store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::SecretString;

use crate::config::Config;
use crate::ingest::pilot;
use crate::oauth::{self, AppCredentials, AppKey, Credential};
use crate::ops::admin::{self, AppView, Cloud, PilotView, key_values, or_dash, table};
use crate::ops::doctor::{self, Login, Target};
use crate::pop3::TlsMode;
use crate::secrets::{self, CredentialPolicy, Owner, SecretRef};
use crate::store;

use super::{
    AppCommand, CertificateSource, CloudArgs, DoctorArgs, ExitWith, PilotCommand, PilotSettings,
    SecretSource, init_logs, read_secret, seal_for, secret_input, stored_input, stored_secret,
};

/// Opens the database (logging is set up once by each command's handler).
async fn open(config: &Config) -> anyhow::Result<store::Db> {
    let pool = store::connect(&config.database.url, 2).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn midnight(date: Option<chrono::NaiveDate>) -> Option<chrono::DateTime<chrono::Utc>> {
    date.and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

/// Authority and scope from `--cloud` / `--authority` / `--scope` over `current`; the
/// authority must be one `policy` sends credentials to.
fn resolve_cloud(
    args: &CloudArgs,
    current: (&str, &str),
    policy: &CredentialPolicy,
) -> anyhow::Result<(String, String)> {
    let preset = args.cloud.map(Cloud::preset);
    let authority = args
        .authority
        .clone()
        .or(preset.map(|p| p.authority.to_owned()))
        .unwrap_or_else(|| current.0.to_owned());
    let scope = args
        .scope
        .clone()
        .or(preset.map(|p| p.scope.to_owned()))
        .unwrap_or_else(|| current.1.to_owned());
    admin::validate_authority(&authority)?;
    admin::validate_scope(&scope)?;
    policy.check_authority(&authority)?;
    Ok((authority, scope))
}

/// A certificate credential read and checked: its private key (to be sealed for the app), the
/// certificate's public half, and the loaded credential.
type CheckedCertificate = (
    SecretString,
    store::StoredCertificate,
    Arc<oauth::CertificateCredential>,
);

/// Reads and checks a certificate credential (the key must belong to the certificate).
fn certificate_credential(
    source: &CertificateSource,
) -> anyhow::Result<Option<CheckedCertificate>> {
    let Some((pem, key)) = read_certificate_files(source)? else {
        return Ok(None);
    };
    let loaded = oauth::CertificateCredential::from_pem(&pem, &key, source.alg)?;
    Ok(Some((
        key,
        store::StoredCertificate {
            pem,
            alg: source.alg,
        },
        Arc::new(loaded),
    )))
}

/// The certificate and private key files of `source`, read like secret files (regular files of
/// a few KiB, never under /proc, /sys or /dev).
fn read_certificate_files(
    source: &CertificateSource,
) -> anyhow::Result<Option<(String, SecretString)>> {
    let (Some(cert_path), Some(key_path)) = (&source.certificate, &source.private_key_file) else {
        return Ok(None);
    };
    let pem = crate::secrets::read_secret_file(cert_path, None)
        .with_context(|| format!("reading the certificate {}", cert_path.display()))?;
    let key = SecretString::from(
        crate::secrets::read_secret_file(key_path, None)
            .with_context(|| format!("reading the private key {}", key_path.display()))?,
    );
    Ok(Some((pem, key)))
}

fn has_secret(source: &SecretSource) -> bool {
    source.secret_stdin
        || source.secret_file.is_some()
        || source.secret_env.is_some()
        || source.secret.is_some()
}

async fn find_app(conn: &mut store::Conn, key: &str) -> anyhow::Result<store::AppRow> {
    match store::get_app_by_name(conn, key).await {
        Ok(app) => Ok(app),
        Err(store::StoreError::NotFound { .. }) if key.parse::<i64>().is_ok() => {
            Ok(store::get_app(conn, key.parse()?).await?)
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn find_pilot(
    conn: &mut store::Conn,
    key: &str,
) -> anyhow::Result<store::PilotRow> {
    if let Ok(id) = key.parse::<i64>() {
        return Ok(store::get_pilot(conn, id).await?);
    }
    let mut found = store::find_pilots_by_mailbox(conn, key).await?;
    match found.len() {
        0 => bail!("no pilot for mailbox {key}; `ccmail pilot list` shows them"),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "mailbox {key} has pilots on several hosts ({}); name one by id",
            found
                .iter()
                .map(|p| format!("{} on {}", p.id, p.host))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub(crate) async fn app_command(config: &Config, cmd: AppCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let pool = open(config).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        AppCommand::Add {
            name,
            tenant,
            client_id,
            cloud,
            secret_expires,
            secret,
            certificate,
        } => {
            admin::validate_app_name(&name)?;
            admin::validate_tenant(&tenant)?;
            admin::validate_client_id(&client_id)?;
            let (authority, scope) = resolve_cloud(
                &cloud,
                (oauth::DEFAULT_AUTHORITY, oauth::DEFAULT_SCOPE),
                &config.credential_policy(),
            )?;
            if has_secret(&secret) && certificate.certificate.is_some() {
                bail!("pass either a client secret or --certificate, not both");
            }
            let mut app = store::NewApp::new(&name, &tenant, &client_id, String::new());
            app.authority = authority;
            app.scope = scope;
            app.secret_expires_at = midnight(secret_expires);
            // Sealed once the app's identity is complete: the value opens only for it.
            if let Some((key, cert, loaded)) = certificate_credential(&certificate)? {
                app.certificate = Some(cert);
                app.credential = seal_for(config, &key, "private key", &app.credential_owner())?;
                eprintln!(
                    "certificate thumbprint {} ({}): it must be listed under Certificates & secrets of the app",
                    loaded.portal_thumbprint(),
                    loaded.alg()
                );
            } else {
                let Some(credential) =
                    stored_secret(config, &secret, "client secret", &app.credential_owner())?
                else {
                    bail!(
                        "the app needs a credential: a client secret with --secret-stdin, --secret-file PATH or --secret-env NAME, \
                         or a certificate with --certificate PEM --private-key-file PEM"
                    );
                };
                app.credential = credential;
            }
            let row = store::insert_app(&mut conn, &app).await?;
            println!("app {} added (id {})", row.name, row.id);
            warn_expiry(&row);
            Ok(())
        }
        AppCommand::List { json } => {
            let apps = store::list_apps(&mut conn).await?;
            let pilots = store::list_pilots(&mut conn).await?;
            let views: Vec<AppView> = apps.iter().map(|a| AppView::new(a, &pilots)).collect();
            if json {
                return print_json(&views);
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|v| {
                    vec![
                        v.id.to_string(),
                        v.name.clone(),
                        v.tenant.clone(),
                        v.client_id.clone(),
                        v.cloud.clone(),
                        v.credential.clone(),
                        or_dash(v.expires_at.map(|d| d.date_naive())),
                        v.expiry_status.clone(),
                        v.pilots.len().to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "id",
                        "name",
                        "tenant",
                        "client id",
                        "cloud",
                        "credential",
                        "expires",
                        "status",
                        "pilots"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        AppCommand::Show { app, json } => {
            let row = find_app(&mut conn, &app).await?;
            let pilots = store::list_pilots(&mut conn).await?;
            let v = AppView::new(&row, &pilots);
            if json {
                return print_json(&v);
            }
            print!(
                "{}",
                key_values(&[
                    ("id", v.id.to_string()),
                    ("name", v.name.clone()),
                    ("tenant", v.tenant.clone()),
                    ("client id", v.client_id.clone()),
                    ("cloud", v.cloud.clone()),
                    ("authority", v.authority.clone()),
                    ("scope", v.scope.clone()),
                    ("credential", v.credential.clone()),
                    ("stored as", v.stored_as.clone()),
                    ("expires", or_dash(v.expires_at.map(|d| d.date_naive()))),
                    ("expiry", v.expiry_status.clone()),
                    ("pilots", v.pilots.join(", ")),
                    ("updated", v.updated_at.to_rfc3339()),
                ])
            );
            Ok(())
        }
        AppCommand::Update {
            app,
            name,
            tenant,
            client_id,
            cloud,
            secret_expires,
        } => {
            let row = find_app(&mut conn, &app).await?;
            let mut new = store::NewApp::new(
                &row.name,
                &row.tenant,
                &row.client_id,
                row.credential.clone(),
            );
            if let Some(n) = name {
                admin::validate_app_name(&n)?;
                new.name = n;
            }
            if let Some(t) = tenant {
                admin::validate_tenant(&t)?;
                new.tenant = t;
            }
            if let Some(c) = client_id {
                admin::validate_client_id(&c)?;
                new.client_id = c;
            }
            let (authority, scope) = resolve_cloud(
                &cloud,
                (&row.authority, &row.scope),
                &config.credential_policy(),
            )?;
            new.authority = authority;
            new.scope = scope;
            new.secret_expires_at = midnight(secret_expires).or(row.secret_expires_at);
            new.certificate = row.certificate()?;
            let updated = if needs_rebinding(
                &row.credential,
                &row.credential_owner(),
                &new.credential_owner(),
            ) {
                let Some(key) = config.master_key() else {
                    bail!(
                        "the credential of app {} is sealed for its current authority, tenant and client id, \
                         and opens for nothing else; changing them needs the master key to seal it again: \
                         configure {} (or secrets.master_key_file) and run the command again, or first store \
                         the credential as a reference with `ccmail app rotate-secret {} --secret-env NAME`",
                        row.name,
                        crate::config::MASTER_KEY_ENV,
                        row.name
                    );
                };
                new.credential = secrets::rebind(
                    &row.credential,
                    &key,
                    &row.credential_owner(),
                    &new.credential_owner(),
                )
                .with_context(|| format!("sealing the credential of app {} again", row.name))?;
                store::update_app_resealed(&mut conn, row.id, &new, &row.credential).await?
            } else {
                store::update_app(&mut conn, row.id, &new).await?
            };
            println!(
                "app {} updated (id {}); running workers restart its pilots",
                updated.name, updated.id
            );
            Ok(())
        }
        AppCommand::RotateSecret {
            app,
            secret_expires,
            secret,
            certificate,
        } => {
            let row = find_app(&mut conn, &app).await?;
            let expires = midnight(secret_expires);
            if has_secret(&secret) && certificate.certificate.is_some() {
                bail!("pass either a client secret or --certificate, not both");
            }
            if let Some((key, cert, loaded)) = certificate_credential(&certificate)? {
                let owner = Owner::app(&row.authority, &row.tenant, &row.client_id, true);
                let key = seal_for(config, &key, "private key", &owner)?;
                store::set_app_certificate(&mut conn, row.id, &key, &cert, expires).await?;
                println!(
                    "app {}: now uses certificate {} ({})",
                    row.name,
                    loaded.portal_thumbprint(),
                    loaded.alg()
                );
            } else {
                let owner = Owner::app(&row.authority, &row.tenant, &row.client_id, false);
                let Some(credential) = stored_secret(config, &secret, "client secret", &owner)?
                else {
                    bail!(
                        "pass the new client secret with --secret-stdin, --secret-file PATH or --secret-env NAME, \
                         or a certificate with --certificate PEM --private-key-file PEM"
                    );
                };
                store::set_app_credential(&mut conn, row.id, &credential, expires).await?;
                println!("app {}: client secret replaced", row.name);
            }
            if expires.is_none() {
                eprintln!(
                    "warning: no --secret-expires given; expiry warnings need the date Entra shows"
                );
            }
            Ok(())
        }
        AppCommand::Remove { app } => {
            let row = find_app(&mut conn, &app).await?;
            store::delete_app(&mut conn, row.id).await?;
            println!("app {} removed", row.name);
            Ok(())
        }
    }
}

fn warn_expiry(app: &store::AppRow) {
    let status = admin::expiry_status(app.secret_expires_at, chrono::Utc::now());
    if status == "expired" || status.starts_with("expires in") {
        eprintln!(
            "warning: the credential of app {} {status}; rotate it with `ccmail app rotate-secret`",
            app.name
        );
    }
}

/// Applies `settings` over `pilot`.
fn apply_settings(pilot: &mut store::NewPilot, settings: &PilotSettings) -> anyhow::Result<()> {
    if let Some(host) = &settings.host {
        admin::validate_host(host)?;
        pilot.host = host.clone();
    }
    if let Some(port) = settings.port {
        pilot.port = port;
    }
    if let Some(tls) = settings.tls {
        pilot.tls = tls;
    }
    if let Some(path) = &settings.ca_bundle {
        admin::validate_text(store::limits::CA_BUNDLE, &path.display().to_string())?;
        crate::tls::read_pem_bundle(path)?;
        pilot.ca_bundle = Some(path.display().to_string());
    }
    if let Some(secs) = settings.poll_interval {
        pilot.poll_interval = Duration::from_secs(secs);
    }
    if let Some(keep) = settings.keep_on_server {
        pilot.keep_on_server = keep;
    }
    if let Some(max) = settings.max_message_bytes {
        pilot.max_message_bytes = max;
    }
    Ok(())
}

/// Whether a credential moving from `from` to `to` must be sealed again: it is sealed and
/// the fields it is bound to change.
fn needs_rebinding(stored: &str, from: &Owner, to: &Owner) -> bool {
    from != to && SecretRef::parse(stored).is_ok_and(|r| r.is_sealed())
}

/// Refuses a pilot whose login may not go where it points under `policy`: plaintext to a
/// remote host, an access token to a host outside `pop3.allowed_xoauth2_hosts`.
fn check_destination(policy: &CredentialPolicy, pilot: &store::NewPilot) -> anyhow::Result<()> {
    policy.check_pop3_host(&pilot.host, pilot.tls)?;
    if matches!(pilot.auth, store::PilotAuth::XOAuth2 { .. }) {
        policy.check_xoauth2_host(&pilot.host)?;
    }
    Ok(())
}

/// [`check_destination`], then says loudly what plaintext means when it is allowed.
fn check_saved_destination(
    policy: &CredentialPolicy,
    pilot: &store::NewPilot,
) -> anyhow::Result<()> {
    check_destination(policy, pilot)?;
    if pilot.tls == TlsMode::DangerousPlaintext {
        eprintln!(
            "WARNING: pilot {} on {}:{} logs in without TLS (dangerous_plaintext): its password \
             or token crosses the network unencrypted and the server is not authenticated. \
             Use it for test servers only.",
            pilot.mailbox, pilot.host, pilot.port
        );
    }
    Ok(())
}

fn new_pilot_from_row(row: &store::PilotRow) -> store::NewPilot {
    row.settings()
}

pub(crate) async fn pilot_command(config: &Config, cmd: PilotCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let pool = open(config).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        PilotCommand::Add {
            queue,
            mailbox,
            app,
            username,
            settings,
            secret,
            check,
            disabled,
            json,
        } => {
            let secret = SecretSource::from(secret);
            admin::validate_queue(&queue)?;
            admin::validate_mailbox(&mailbox)?;
            if let Some(username) = &username {
                admin::validate_text(store::limits::USERNAME, username)?;
            }
            let mut app_row = None;
            let mut password = None;
            let auth = match &app {
                Some(name) => {
                    if has_secret(&secret) {
                        bail!("an XOAUTH2 pilot takes no password: the app's credential is used");
                    }
                    let row = find_app(&mut conn, name).await.with_context(|| {
                        format!("the app {name:?} must exist: add it with `ccmail app add` first")
                    })?;
                    let auth = store::PilotAuth::XOAuth2 { app_id: row.id };
                    app_row = Some(row);
                    auth
                }
                None => {
                    let Some(input) =
                        secret_input(&secret, "password", &config.credential_policy())?
                    else {
                        bail!(
                            "a pilot without --app logs in with USER/PASS and needs a password: \
                             --secret-stdin, --secret-file PATH or --secret-env NAME"
                        );
                    };
                    password = Some(input);
                    store::PilotAuth::UserPass {
                        username: username.clone().unwrap_or_else(|| mailbox.clone()),
                        credential: String::new(),
                    }
                }
            };
            let mut pilot = store::NewPilot::new(&queue, &mailbox, auth);
            // The app's cloud decides the default POP host (US Gov, China).
            if let Some(cloud) = app_row
                .as_ref()
                .and_then(|a| Cloud::of_authority(&a.authority))
            {
                pilot.host = cloud.preset().pop_host.to_owned();
            }
            apply_settings(&mut pilot, &settings)?;
            check_saved_destination(&config.credential_policy(), &pilot)?;
            pilot.enabled = !disabled;
            // Sealed once host, port and TLS mode are final: the value opens only for them.
            if let (Some(input), Some(owner)) = (password, pilot.credential_owner())
                && let store::PilotAuth::UserPass { credential, .. } = &mut pilot.auth
            {
                *credential = stored_input(config, input, "password", &owner)?;
            }
            let existing = store::find_pilots_by_mailbox(&mut conn, &mailbox).await?;
            if let Some(dup) = existing
                .iter()
                .find(|p| p.host.eq_ignore_ascii_case(&pilot.host))
            {
                bail!(
                    "pilot {} already polls {} on {}; change it with `ccmail pilot update {}`",
                    dup.id,
                    dup.mailbox,
                    dup.host,
                    dup.id
                );
            }
            if check {
                let target = pilot_target(config, &pilot, app_row.as_ref(), None, None)?;
                let report = doctor::diagnose(
                    &target,
                    &crate::oauth::TokenSourceOptions::from_config(&config.oauth)?,
                )
                .await;
                print!("{}", crate::display::escape_lines(&report.render()));
                if report.failure.is_some() {
                    eprintln!("pilot not saved: fix the failing step and run the command again");
                    return Err(ExitWith(report.exit_code()).into());
                }
            }
            let row = store::insert_pilot(&mut conn, &pilot).await?;
            if json {
                let apps = store::list_apps(&mut conn).await?;
                return print_json(&PilotView::new(&row, &apps));
            }
            println!(
                "pilot {} added (id {}): {}:{} -> queue {}{}",
                row.mailbox,
                row.id,
                row.host,
                row.port,
                row.queue,
                if row.enabled { "" } else { " (disabled)" }
            );
            Ok(())
        }
        PilotCommand::List { json } => {
            let pilots = store::list_pilots(&mut conn).await?;
            let apps = store::list_apps(&mut conn).await?;
            let holders: std::collections::HashMap<i64, String> =
                store::leases::lease_holders(&mut conn)
                    .await?
                    .into_iter()
                    .filter(|l| l.live)
                    .map(|l| (l.pilot_id, l.holder))
                    .collect();
            let views: Vec<PilotView> = pilots
                .iter()
                .map(|p| PilotView {
                    lease_holder: holders.get(&p.id).cloned(),
                    ..PilotView::new(p, &apps)
                })
                .collect();
            if json {
                return print_json(&views);
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|v| {
                    vec![
                        v.id.to_string(),
                        v.queue.clone(),
                        v.mailbox.clone(),
                        format!("{}:{}", v.host, v.port),
                        v.app.clone().or(v.username.clone()).unwrap_or_default(),
                        if v.enabled { "yes" } else { "no" }.to_owned(),
                        v.last_success_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "never".to_owned()),
                        v.lease_holder.clone().unwrap_or_else(|| "-".to_owned()),
                        v.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "id",
                        "queue",
                        "mailbox",
                        "server",
                        "login",
                        "enabled",
                        "last success",
                        "polled by",
                        "last error"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        PilotCommand::Show { pilot, json } => {
            let row = find_pilot(&mut conn, &pilot).await?;
            let apps = store::list_apps(&mut conn).await?;
            let v = PilotView::new(&row, &apps);
            if json {
                return print_json(&v);
            }
            print!(
                "{}",
                key_values(&[
                    ("id", v.id.to_string()),
                    ("queue", v.queue.clone()),
                    ("mailbox", v.mailbox.clone()),
                    ("server", format!("{}:{} ({})", v.host, v.port, v.tls)),
                    ("auth", v.auth.clone()),
                    ("app", or_dash(v.app.clone())),
                    ("username", or_dash(v.username.clone())),
                    ("ca bundle", or_dash(v.ca_bundle.clone())),
                    ("poll interval", format!("{} s", v.poll_interval_secs)),
                    ("keep on server", v.keep_on_server.to_string()),
                    ("max message", format!("{} octets", v.max_message_bytes)),
                    ("enabled", v.enabled.to_string()),
                    (
                        "last success",
                        or_dash(v.last_success_at.map(|t| t.to_rfc3339()))
                    ),
                    ("last error", or_dash(v.last_error.clone())),
                    ("fix", or_dash(v.last_error_hint.clone())),
                ])
            );
            Ok(())
        }
        PilotCommand::Update {
            pilot,
            queue,
            mailbox,
            app,
            no_ca_bundle,
            settings,
            secret,
        } => {
            let secret = SecretSource::from(secret);
            let row = find_pilot(&mut conn, &pilot).await?;
            let mut new = new_pilot_from_row(&row);
            if let Some(q) = queue {
                admin::validate_queue(&q)?;
                new.queue = q;
            }
            if let Some(m) = mailbox {
                admin::validate_mailbox(&m)?;
                new.mailbox = m;
            }
            if let Some(name) = app {
                let app = find_app(&mut conn, &name).await?;
                if !matches!(row.auth, store::PilotAuth::XOAuth2 { .. }) {
                    bail!(
                        "pilot {} logs in with USER/PASS; --app applies to XOAUTH2 pilots",
                        row.id
                    );
                }
                new.auth = store::PilotAuth::XOAuth2 { app_id: app.id };
            }
            if no_ca_bundle {
                new.ca_bundle = None;
            }
            apply_settings(&mut new, &settings)?;
            check_saved_destination(&config.credential_policy(), &new)?;
            if has_secret(&secret) {
                let (store::PilotAuth::UserPass { username, .. }, Some(owner)) =
                    (&new.auth, new.credential_owner())
                else {
                    bail!(
                        "pilot {} logs in with XOAUTH2; rotate the app's secret with `ccmail app rotate-secret`",
                        row.id
                    );
                };
                let username = username.clone();
                if let Some(credential) = stored_secret(config, &secret, "password", &owner)? {
                    new.auth = store::PilotAuth::UserPass {
                        username,
                        credential,
                    };
                }
            } else if let (
                Some(from),
                Some(to),
                store::PilotAuth::UserPass {
                    username,
                    credential,
                },
            ) = (row.credential_owner(), new.credential_owner(), &new.auth)
                && needs_rebinding(credential, &from, &to)
            {
                let Some(key) = config.master_key() else {
                    bail!(
                        "the password of pilot {} is sealed for its current host, port and TLS mode, \
                         and opens for nothing else; changing them needs the master key to seal it \
                         again: configure {} (or secrets.master_key_file) and run the command again, \
                         or give the password in the same command (--secret-stdin, --secret-file PATH \
                         or --secret-env NAME)",
                        row.id,
                        crate::config::MASTER_KEY_ENV
                    );
                };
                let credential = secrets::rebind(credential, &key, &from, &to)
                    .with_context(|| format!("sealing the password of pilot {} again", row.id))?;
                new.auth = store::PilotAuth::UserPass {
                    username: username.clone(),
                    credential,
                };
            }
            let read_password = match &row.auth {
                store::PilotAuth::UserPass { credential, .. } => Some(credential.as_str()),
                store::PilotAuth::XOAuth2 { .. } => None,
            };
            let updated = store::update_pilot(&mut conn, row.id, &new, read_password).await?;
            println!(
                "pilot {} updated: {}:{} -> queue {}; a running worker picks it up within seconds",
                updated.id, updated.host, updated.port, updated.queue
            );
            Ok(())
        }
        PilotCommand::Enable { pilot } => set_enabled(&mut conn, &pilot, true).await,
        PilotCommand::Disable { pilot } => set_enabled(&mut conn, &pilot, false).await,
        PilotCommand::Remove { pilot } => {
            let row = find_pilot(&mut conn, &pilot).await?;
            store::delete_pilot(&mut conn, row.id).await?;
            println!("pilot {} ({}) removed", row.id, row.mailbox);
            Ok(())
        }
    }
}

async fn set_enabled(conn: &mut store::Conn, key: &str, enabled: bool) -> anyhow::Result<()> {
    let row = find_pilot(conn, key).await?;
    store::set_pilot_enabled(conn, row.id, enabled).await?;
    println!(
        "pilot {} ({}) {}",
        row.id,
        row.mailbox,
        if enabled {
            "enabled"
        } else {
            "disabled; its stored mail stays"
        }
    );
    Ok(())
}

/// The doctor target of a (possibly unsaved) pilot.
fn pilot_target(
    config: &Config,
    pilot: &store::NewPilot,
    app: Option<&store::AppRow>,
    retr: Option<u32>,
    timeout: Option<u64>,
) -> anyhow::Result<Target> {
    let master = config.master_key();
    let policy = config.credential_policy();
    // The CLI's own messages first; the resolver checks the same again.
    check_destination(&policy, pilot)?;
    if let (store::PilotAuth::XOAuth2 { app_id }, None) = (&pilot.auth, app) {
        bail!("app id {app_id} not found");
    }
    let timeouts = doctor_timeouts(config, timeout);
    // The poller's own resolver: doctor checks the pilot exactly as the worker will run it.
    let resolved = pilot::resolve(0, pilot, app, master.as_ref(), &policy, timeouts)?;
    Ok(Target::new(resolved, retr))
}

/// The configured POP3 deadlines, each replaced by `--timeout` when given.
fn doctor_timeouts(config: &Config, timeout: Option<u64>) -> crate::pop3::Timeouts {
    let mut timeouts = crate::pop3::Timeouts::from(&config.pop3);
    if let Some(secs) = timeout {
        let t = Duration::from_secs(secs);
        timeouts.connect = t;
        timeouts.tls = t;
        timeouts.command = t;
        timeouts.idle = t;
    }
    timeouts
}

pub(crate) async fn doctor_command(config: &Config, args: DoctorArgs) -> anyhow::Result<()> {
    init_logs(config, true);
    let report = match doctor_target(config, &args).await {
        Ok(mut target) => {
            if let Some(secs) = args.greeting_timeout {
                target.greeting_timeout = Duration::from_secs(secs);
            }
            if let Some(secs) = args.login_retry_pause {
                target.login_retry_pause = (secs > 0).then(|| Duration::from_secs(secs));
            }
            doctor::diagnose(
                &target,
                &crate::oauth::TokenSourceOptions::from_config(&config.oauth)?,
            )
            .await
        }
        // Settings doctor cannot use (an unreadable secret, an invalid field): the settings
        // step fails, and the message is printed once, in the report.
        Err(e) => match settings_error(&e) {
            Some(message) => doctor::unusable_settings(
                args.mailbox
                    .as_deref()
                    .or(args.pilot.as_deref())
                    .unwrap_or("-"),
                "-",
                &message,
            ),
            None => return Err(e),
        },
    };
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", crate::display::escape_lines(&report.render()));
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(ExitWith(code).into()),
    }
}

/// The message of `e` when it says the stored settings or the given secret cannot be used
/// (an unreadable secret or reference, an invalid field): doctor's settings failure. Refusals
/// of the credential policy stay errors of the command.
fn settings_error(e: &anyhow::Error) -> Option<String> {
    use crate::secrets::SecretError as S;
    e.chain().find_map(|cause| {
        if let Some(r) = cause.downcast_ref::<pilot::ResolveError>() {
            return matches!(
                r,
                pilot::ResolveError::Secret { .. }
                    | pilot::ResolveError::Invalid { .. }
                    | pilot::ResolveError::Certificate { .. }
                    | pilot::ResolveError::CaBundle { .. }
            )
            .then(|| r.to_string());
        }
        cause.downcast_ref::<S>().and_then(|s| {
            matches!(
                s,
                S::EnvMissing { .. }
                    | S::FileUnreadable { .. }
                    | S::FileNotUtf8 { .. }
                    | S::Empty { .. }
            )
            .then(|| s.to_string())
        })
    })
}

/// What the database knows about the mailbox that can explain a refused login.
async fn known_about(
    conn: &mut store::Conn,
    mailbox: &str,
    app: Option<&store::AppRow>,
) -> anyhow::Result<doctor::Known> {
    let pilots = store::find_pilots_by_mailbox(conn, mailbox).await?;
    let last_poll = pilots
        .iter()
        .filter_map(|p| {
            let at = p.last_success_at.max(p.last_error_at)?;
            Some((at, p.id, p.enabled))
        })
        .max_by_key(|(at, _, _)| *at);
    Ok(doctor::Known {
        last_poll,
        app_added: app.map(|a| a.created_at),
    })
}

async fn doctor_target(config: &Config, args: &DoctorArgs) -> anyhow::Result<Target> {
    if let Some(key) = &args.pilot {
        let pool = open(config).await?;
        let mut conn = pool.acquire().await?;
        let row = find_pilot(&mut conn, key).await?;
        let app = match row.auth {
            store::PilotAuth::XOAuth2 { app_id } => Some(store::get_app(&mut conn, app_id).await?),
            store::PilotAuth::UserPass { .. } => None,
        };
        let mut pilot = new_pilot_from_row(&row);
        apply_settings(&mut pilot, &args.server.settings())?;
        if let (Some(from), Some(to), store::PilotAuth::UserPass { credential, .. }) =
            (row.credential_owner(), pilot.credential_owner(), &row.auth)
            && needs_rebinding(credential, &from, &to)
        {
            bail!(
                "the stored password of pilot {} opens only for the pilot's own host, port and TLS \
                 mode; check another server with `ccmail doctor --mailbox MAILBOX --username NAME \
                 --secret-stdin` and the server flags, or change the pilot with `ccmail pilot update` first",
                row.id
            );
        }
        let known = known_about(&mut conn, &row.mailbox, app.as_ref()).await?;
        let mut target = pilot_target(config, &pilot, app.as_ref(), args.retr, args.timeout)?;
        target.known = known;
        return Ok(target);
    }
    let Some(mailbox) = &args.mailbox else {
        bail!(
            "name what to check: --pilot ID|MAILBOX, or --mailbox with --app NAME or --tenant/--client-id and a credential"
        );
    };
    admin::validate_mailbox(mailbox)?;
    let mut app_row = None;
    let mut known = doctor::Known::default();
    let (auth, login) = if let Some(name) = &args.app {
        let pool = open(config).await?;
        let mut conn = pool.acquire().await?;
        let row = find_app(&mut conn, name).await?;
        let auth = store::PilotAuth::XOAuth2 { app_id: row.id };
        known = known_about(&mut conn, mailbox, Some(&row)).await?;
        app_row = Some(row);
        (auth, None)
    } else if let (Some(tenant), Some(client_id)) = (&args.tenant, &args.client_id) {
        let (authority, scope) = resolve_cloud(
            &args.cloud,
            (oauth::DEFAULT_AUTHORITY, oauth::DEFAULT_SCOPE),
            &config.credential_policy(),
        )?;
        let credential = match certificate_source_loaded(&args.certificate.source())? {
            Some(cert) => Credential::Certificate(cert),
            None => Credential::Secret(read_secret(&args.secret.source(), "client secret", &config.credential_policy())?.context(
                "pass the client secret with --secret-stdin, --secret-file PATH or --secret-env NAME, or --certificate and --private-key-file",
            )?),
        };
        let app = AppCredentials {
            key: AppKey {
                authority,
                tenant: tenant.clone(),
                client_id: client_id.clone(),
                scope,
            },
            credential,
        };
        (
            store::PilotAuth::XOAuth2 { app_id: 0 },
            Some(Login::XOAuth2 {
                app,
                name: None,
                expires_at: None,
            }),
        )
    } else if let Some(username) = &args.username {
        let password = read_secret(
            &args.secret.source(),
            "password",
            &config.credential_policy(),
        )?
        .context(
            "USER/PASS needs the password: --secret-stdin, --secret-file PATH or --secret-env NAME",
        )?;
        (
            store::PilotAuth::UserPass {
                username: username.clone(),
                credential: String::new(),
            },
            Some(Login::UserPass {
                username: username.clone(),
                password,
            }),
        )
    } else {
        bail!(
            "name the login: --app NAME, --tenant and --client-id with a credential, or --username with a password"
        );
    };
    let mut pilot = store::NewPilot::new("doctor", mailbox, auth);
    if let Some(cloud) = args.cloud.cloud {
        pilot.host = cloud.preset().pop_host.to_owned();
    } else if let Some(cloud) = app_row
        .as_ref()
        .and_then(|a| Cloud::of_authority(&a.authority))
    {
        pilot.host = cloud.preset().pop_host.to_owned();
    }
    apply_settings(&mut pilot, &args.server.settings())?;
    match login {
        None => {
            let mut target =
                pilot_target(config, &pilot, app_row.as_ref(), args.retr, args.timeout)?;
            target.known = known;
            Ok(target)
        }
        Some(login) => {
            // Explicit credentials: build the target around them (nothing stored is read).
            check_destination(&config.credential_policy(), &pilot)?;
            let timeouts = doctor_timeouts(config, args.timeout);
            Ok(Target {
                mailbox: pilot.mailbox.clone(),
                server: pilot::server(0, &pilot, timeouts)?,
                login,
                retr: args.retr,
                max_message_bytes: usize::try_from(pilot.max_message_bytes).unwrap_or(usize::MAX),
                greeting_timeout: doctor::GREETING_TIMEOUT,
                login_retry_pause: Some(doctor::LOGIN_RETRY_PAUSE),
                known,
            })
        }
    }
}

fn certificate_source_loaded(
    source: &CertificateSource,
) -> anyhow::Result<Option<Arc<oauth::CertificateCredential>>> {
    let Some((pem, key)) = read_certificate_files(source)? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(oauth::CertificateCredential::from_pem(
        &pem, &key, source.alg,
    )?)))
}
