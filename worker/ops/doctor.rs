//! `ccmail doctor`: the seed's POP3 test script done right, one verdict per step.
//!
//! The steps follow docs/exchange-online.md, in the order a login needs them: settings and
//! credential expiry → token request → TCP + TLS connect → greeting → CAPA (XOAUTH2 advertised) →
//! the two-step XOAUTH2 login → STAT / UIDL → optionally `RETR n` parsed (never deleted) → QUIT.
//! The first failing step ends the run; every failure names its cause and the fix, with the
//! PowerShell commands filled in with this app's ids and this mailbox. Each failure class has its
//! own process exit code ([`Failure::exit_code`]), so scripts can branch on it.
//!
//! Exchange answers a missing permission, too many sessions on the mailbox and a permission
//! still propagating with the same generic authentication failure, so that verdict names the
//! non-permission causes first (with the mailbox's last poll from the database) and doctor
//! logs in once more after a short pause to tell a momentary refusal from a persistent one.
//! A busy server and a token cut off as too long have verdicts of their own.
//!
//! Invariants: doctor never deletes mail (no `DELE`; `QUIT` without `DELE` removes nothing),
//! and never prints a secret or a token (only the token's length).

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ingest::parse;
use crate::oauth::{self, AppCredentials, Credential, OAuthError, TokenSource, TokenSourceOptions};
use crate::pop3::{self, Client, ServerSpec};

/// Tokens longer than this have been rejected by Exchange Online (docs/exchange-online.md, "How
/// Exchange Online's POP3 behaves").
pub const LONG_TOKEN: usize = 4000;
pub use super::admin::EXPIRY_WARNING_DAYS;
/// A maildrop with at least this many messages waiting gets a warning.
pub const LARGE_MAILDROP: u32 = 1000;
/// How long doctor waits for the greeting by default (the worker waits its command deadline).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before the second login that tells a momentary refusal from a persistent one.
pub const LOGIN_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// A poll this recent means a worker may hold a session on the mailbox right now.
const RECENT_POLL_MINUTES: i64 = 10;
/// Exchange Online can take this long to apply a permission change.
const PROPAGATION_MINUTES: i64 = 60;

/// How doctor logs in: the poller's own login type, built by the same resolver.
pub use crate::ingest::pilot::Login;
use crate::ingest::pilot::Pilot;

/// What to check.
#[derive(Debug, Clone)]
pub struct Target {
    /// The mailbox address (the XOAUTH2 `user=`).
    pub mailbox: String,
    pub server: ServerSpec,
    pub login: Login,
    /// Fetch and parse this message (1-based) without deleting it.
    pub retr: Option<u32>,
    /// Largest message `--retr` downloads.
    pub max_message_bytes: usize,
    /// Longest wait for the greeting (shorter than the command deadline to matter).
    pub greeting_timeout: Duration,
    /// After Exchange's generic authentication failure, log in once more after this pause
    /// (`None`: do not).
    pub login_retry_pause: Option<Duration>,
    /// What the database knows about this mailbox, for the authentication-failure verdict.
    pub known: Known,
}

/// What the database says that can explain a refused login.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The latest poll of this mailbox by a ccmail worker (any stored pilot on it), with the
    /// pilot's id and whether it is enabled.
    pub last_poll: Option<(DateTime<Utc>, i64, bool)>,
    /// When the app was added to ccmail (a permission granted around then may still be
    /// propagating).
    pub app_added: Option<DateTime<Utc>>,
}

impl Target {
    /// Checks `pilot` as resolved for the poller; `retr` as in [`Target::retr`].
    pub fn new(pilot: Pilot, retr: Option<u32>) -> Target {
        Target {
            mailbox: pilot.mailbox,
            server: pilot.server,
            login: pilot.auth,
            retr,
            max_message_bytes: pilot.max_message_bytes,
            greeting_timeout: GREETING_TIMEOUT,
            login_retry_pause: Some(LOGIN_RETRY_PAUSE),
            known: Known::default(),
        }
    }
}

/// A step's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One checked step.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short step name: `settings`, `token`, `connect`, `greeting`, `capabilities`, `login`,
    /// `mailbox`, `retr`, `read-receipts`, `quit`.
    pub step: &'static str,
    pub verdict: Verdict,
    /// One line: what was found.
    pub summary: String,
    /// What to do, in order (commands filled in).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fix: Vec<String>,
}

/// The class of the first failure; each has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// The pilot or app settings are unusable (tenant `common`, unreadable secret, …).
    Settings,
    /// Entra ID refused the token request (an AADSTS configuration code).
    TokenRefused,
    /// The token endpoint could not be reached or answered with a server error.
    TokenUnreachable,
    /// The POP3 server could not be reached (DNS, refused, no route).
    ServerUnreachable,
    /// TLS failed: untrusted or mismatched certificate, TLS version or handshake problem.
    Tls,
    /// The POP3 server did not answer in time.
    Timeout,
    /// The server does not speak POP3 as expected (bad greeting, no XOAUTH2, protocol error).
    Protocol,
    /// The login was refused (for XOAUTH2: Exchange's generic authentication failure).
    LoginRejected,
    /// The server refused the login for now: busy, throttled or its backend unavailable
    /// (`Server Unavailable. 21`, `[SYS/TEMP]`, `[IN-USE]`).
    ServerBusy,
    /// The server cut the login off after the token: longer than it accepts.
    TokenTooLong,
    /// Logged in, but STAT / UIDL / RETR failed.
    Mailbox,
}

impl Failure {
    /// The process exit code of this failure class (0 means every step passed).
    pub fn exit_code(self) -> u8 {
        match self {
            Failure::Settings => 3,
            Failure::TokenRefused => 10,
            Failure::TokenUnreachable => 11,
            Failure::ServerUnreachable => 20,
            Failure::Tls => 21,
            Failure::Timeout => 22,
            Failure::Protocol => 23,
            Failure::LoginRejected => 30,
            Failure::ServerBusy => 31,
            Failure::TokenTooLong => 32,
            Failure::Mailbox => 40,
        }
    }
}

/// The exit codes, for `ccmail doctor --help` and the README.
pub const EXIT_CODES: &str = "\
Exit codes:
   0  every step passed (warnings allowed)
   1  doctor itself could not run (database, unknown pilot or app)
   2  usage error
   3  settings: the pilot or app settings are unusable (tenant `common`, unreadable secret)
  10  token refused by Entra ID (AADSTS code; meaning and fix printed)
  11  token endpoint unreachable, timed out or failing (5xx)
  20  POP3 server unreachable (DNS, connection refused)
  21  TLS: untrusted or mismatched certificate, TLS version or handshake failure
  22  timeout: the POP3 server stopped answering
  23  protocol: bad greeting, XOAUTH2 not offered, unexpected answer
  30  login rejected (for XOAUTH2: other sessions, propagation, then the Exchange checklist)
  31  server busy / temporarily unavailable at login (Server Unavailable, [SYS/TEMP], [IN-USE])
  32  token rejected as too long (the server cut the login off after the token)
  40  mailbox: STAT, UIDL or RETR failed after login";

/// Everything doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mailbox: String,
    pub server: String,
    pub checks: Vec<Check>,
    /// The first failure, if any step failed.
    pub failure: Option<Failure>,
    /// Messages in the maildrop, when STAT ran.
    pub messages: Option<u32>,
}

impl Report {
    fn new(target: &Target) -> Report {
        Report {
            mailbox: target.mailbox.clone(),
            server: format!(
                "{}:{} ({})",
                target.server.host, target.server.port, target.server.tls
            ),
            checks: Vec::new(),
            failure: None,
            messages: None,
        }
    }

    fn push(&mut self, step: &'static str, verdict: Verdict, summary: impl Into<String>) {
        self.checks.push(Check {
            step,
            verdict,
            summary: summary.into(),
            fix: Vec::new(),
        });
    }

    fn push_fix(
        &mut self,
        step: &'static str,
        verdict: Verdict,
        summary: impl Into<String>,
        fix: Vec<String>,
    ) {
        self.checks.push(Check {
            step,
            verdict,
            summary: summary.into(),
            fix,
        });
    }

    fn fail(&mut self, step: &'static str, failure: Failure, summary: String, fix: Vec<String>) {
        self.push_fix(step, Verdict::Fail, summary, fix);
        self.failure = Some(failure);
    }

    /// 0 when nothing failed, else the failure's exit code.
    pub fn exit_code(&self) -> u8 {
        self.failure.map(Failure::exit_code).unwrap_or(0)
    }

    /// The check of `step`, if it ran.
    pub fn check(&self, step: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.step == step)
    }

    /// The report for people: one line per step, fixes indented below.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "doctor: {} on {}", self.mailbox, self.server);
        for check in &self.checks {
            let _ = writeln!(
                out,
                "[{}] {:<13} {}",
                check.verdict.label(),
                check.step,
                check.summary
            );
            for line in &check.fix {
                let _ = writeln!(out, "       {line}");
            }
        }
        match self.failure {
            None => {
                let _ = writeln!(out, "result: OK");
            }
            Some(f) => {
                let _ = writeln!(out, "result: FAILED ({f:?}, exit code {})", f.exit_code());
            }
        }
        out
    }
}

/// What an AADSTS code means: oauth's one AADSTS table (the fix is [`oauth::aadsts_fix`]).
pub use crate::oauth::aadsts_meaning;

/// Runs every step against `target`; `token_options` reach the token endpoint (extra CAs,
/// deadlines).
pub async fn diagnose(target: &Target, token_options: &TokenSourceOptions) -> Report {
    let mut report = Report::new(target);
    let token = match &target.login {
        Login::XOAuth2 {
            app,
            name,
            expires_at,
        } => {
            if !settings_step(&mut report, app, *expires_at) {
                return report;
            }
            match token_step(&mut report, app, name.as_deref(), token_options).await {
                Some(token) => Some(token),
                None => return report,
            }
        }
        Login::UserPass { .. } => None,
    };

    let client = match Client::connect_greeting_within(
        &target.server,
        Some(target.greeting_timeout),
    )
    .await
    {
        Ok(client) => client,
        Err(e) => {
            connect_failure(&mut report, target, &e);
            return report;
        }
    };
    report.push(
        "connect",
        Verdict::Pass,
        match target.server.tls {
            pop3::TlsMode::Implicit => format!(
                "TLS to {}:{} (implicit TLS, certificate verified)",
                target.server.host, target.server.port
            ),
            pop3::TlsMode::StartTls => format!(
                "{}:{} upgraded with STLS (certificate verified)",
                target.server.host, target.server.port
            ),
            pop3::TlsMode::DangerousPlaintext => format!(
                "{}:{} WITHOUT TLS (dangerous_plaintext: test servers only)",
                target.server.host, target.server.port
            ),
        },
    );
    report.push(
        "greeting",
        Verdict::Pass,
        format!("+OK {}", client.greeting().text),
    );
    let is_oauth = matches!(target.login, Login::XOAuth2 { .. });
    match client.capabilities() {
        None => report.push(
            "capabilities",
            Verdict::Warn,
            "the server did not answer CAPA; trying the login anyway",
        ),
        Some(caps) => {
            let list: Vec<String> = caps
                .entries
                .iter()
                .map(|(tag, args)| {
                    if args.is_empty() {
                        tag.clone()
                    } else {
                        format!("{tag} {}", args.join(" "))
                    }
                })
                .collect();
            if is_oauth && caps.advertises_sasl() && !caps.has_sasl("XOAUTH2") {
                report.fail(
                    "capabilities",
                    Failure::Protocol,
                    format!("SASL XOAUTH2 is not offered (CAPA: {})", list.join(", ")),
                    vec![
                        "Exchange Online offers XOAUTH2 on outlook.office365.com:995; check the host and port"
                            .to_owned(),
                        "an on-premises Exchange needs OAuth (hybrid modern authentication) enabled for POP"
                            .to_owned(),
                    ],
                );
                return report;
            }
            let what = if is_oauth {
                "SASL XOAUTH2 advertised"
            } else {
                "capabilities"
            };
            report.push(
                "capabilities",
                Verdict::Pass,
                format!("{what} ({})", list.join(", ")),
            );
        }
    }

    let login = match (&target.login, &token) {
        (Login::XOAuth2 { .. }, Some(token)) => {
            client.auth_xoauth2(&target.mailbox, token.secret()).await
        }
        (Login::UserPass { username, password }, _) => {
            client.auth_user_pass(username, password).await
        }
        (Login::XOAuth2 { .. }, None) => return report,
    };
    let accepted = match &target.login {
        Login::XOAuth2 { .. } => {
            format!("XOAUTH2 (two-step) accepted for user={}", target.mailbox)
        }
        Login::UserPass { username, .. } => format!("USER/PASS accepted for {username}"),
    };
    let mut session = match login {
        Ok(session) => {
            report.push("login", Verdict::Pass, accepted);
            session
        }
        Err(e) => {
            let generic = matches!(e, pop3::Error::AuthRejected { .. }) && !e.is_transient();
            let second = match (generic, target.login_retry_pause) {
                (true, Some(pause)) => {
                    Some((pause, login_again(target, token.as_ref(), pause).await))
                }
                _ => None,
            };
            match second {
                Some((pause, Ok(session))) => {
                    report.push_fix(
                        "login",
                        Verdict::Warn,
                        format!(
                            "{accepted}, but only at the second try: the first was refused ({e}); the same \
                             login {pause:?} later passed, so the refusal was momentary"
                        ),
                        vec![
                            "a momentary refusal is most often another session on this mailbox (another mail \
                             client or a ccmail worker) or a permission still reaching Exchange Online"
                                .to_owned(),
                        ],
                    );
                    session
                }
                Some((pause, Err(again))) => {
                    let note = format!(
                        "a second login {pause:?} later was refused too ({again}): the refusal is persistent"
                    );
                    login_failure(
                        &mut report,
                        target,
                        &e,
                        token.as_ref().map(|t| t.len()),
                        Some(note),
                    );
                    return report;
                }
                None => {
                    login_failure(
                        &mut report,
                        target,
                        &e,
                        token.as_ref().map(|t| t.len()),
                        None,
                    );
                    return report;
                }
            }
        }
    };

    let (count, octets) = match session.stat().await {
        Ok(stat) => stat,
        Err(e) => {
            mailbox_failure(&mut report, "mailbox", "STAT", &e);
            return report;
        }
    };
    let uidls = match session.uidl_all().await {
        Ok(u) => u.len(),
        Err(e) => {
            mailbox_failure(&mut report, "mailbox", "UIDL", &e);
            return report;
        }
    };
    report.messages = Some(count);
    let summary = format!(
        "{count} messages waiting ({octets} octets as the server estimates), {uidls} UIDLs"
    );
    if count >= LARGE_MAILDROP {
        report.push_fix(
            "mailbox",
            Verdict::Warn,
            summary,
            vec![format!(
                "thousands of messages are waiting: the first polls take a while (at most \
                 worker.max_messages_per_poll per poll); consider keeping only the Inbox mail \
                 that should become work items"
            )],
        );
    } else {
        report.push("mailbox", Verdict::Pass, summary);
    }

    if let Some(n) = target.retr {
        if n == 0 || n > count {
            report.fail(
                "retr",
                Failure::Mailbox,
                format!("message {n} does not exist (the maildrop has {count})"),
                vec!["pass --retr with a number between 1 and the message count".to_owned()],
            );
            return report;
        }
        match session.retr(n, target.max_message_bytes).await {
            Ok(raw) => {
                let parsed = parse::parse(&raw);
                let from = parsed
                    .from
                    .first()
                    .and_then(|a| a.email.clone())
                    .unwrap_or_else(|| "-".to_owned());
                let subject = parsed.subject.clone().unwrap_or_else(|| "-".to_owned());
                let summary = format!(
                    "message {n}: {} octets, from {from}, subject {subject:?}, {} attachments (left on the server)",
                    raw.len(),
                    parsed.attachments.len()
                );
                match parsed.parse_error {
                    Some(err) => report.push_fix(
                        "retr",
                        Verdict::Warn,
                        summary,
                        vec![format!("it does not parse ({err}); it would become a work item flagged parse_error")],
                    ),
                    None => report.push("retr", Verdict::Pass, summary),
                }
            }
            Err(e) => {
                mailbox_failure(&mut report, "retr", "RETR", &e);
                return report;
            }
        }
    }

    if is_oauth {
        report.push_fix(
            "read-receipts",
            Verdict::Warn,
            "POP downloads can send read receipts to senders unless PopSuppressReadReceipt is set",
            vec![format!(
                "Set-CASMailbox -Identity {} -PopUseProtocolDefaults $false -PopSuppressReadReceipt $true",
                target.mailbox
            )],
        );
    }
    // QUIT after no DELE removes nothing (RFC 1939 §6); it only ends the session politely.
    match session.quit().await {
        Ok(()) => report.push("quit", Verdict::Pass, "session closed; nothing was deleted"),
        Err(e) => report.push(
            "quit",
            Verdict::Warn,
            format!("QUIT failed ({e}); nothing was deleted"),
        ),
    }
    report
}

/// The login once more after `pause`, on a new connection (the first one is gone).
async fn login_again(
    target: &Target,
    token: Option<&oauth::AccessToken>,
    pause: Duration,
) -> Result<pop3::Session<pop3::Stream>, pop3::Error> {
    // A pause, not a poll: what is measured is whether the refusal lasts.
    tokio::time::sleep(pause).await;
    let client =
        Client::connect_greeting_within(&target.server, Some(target.greeting_timeout)).await?;
    match (&target.login, token) {
        (Login::XOAuth2 { .. }, Some(token)) => {
            client.auth_xoauth2(&target.mailbox, token.secret()).await
        }
        (Login::UserPass { username, password }, _) => {
            client.auth_user_pass(username, password).await
        }
        (Login::XOAuth2 { .. }, None) => Err(pop3::Error::InvalidRequest(
            "no token for the second login".to_owned(),
        )),
    }
}

/// A report for settings doctor cannot use at all (an unreadable secret, an invalid field):
/// the settings step fails with `error`, printed once.
pub fn unusable_settings(mailbox: &str, server: &str, error: &str) -> Report {
    let mut report = Report {
        mailbox: mailbox.to_owned(),
        server: server.to_owned(),
        checks: Vec::new(),
        failure: None,
        messages: None,
    };
    report.fail(
        "settings",
        Failure::Settings,
        error.to_owned(),
        vec![
            "fix the named setting (for an env: reference: set the variable in doctor's environment, \
             or store the secret with `ccmail app rotate-secret`), then run doctor again"
                .to_owned(),
        ],
    );
    report
}

/// Tenant, scope and credential expiry. False when the settings cannot work at all.
fn settings_step(
    report: &mut Report,
    app: &AppCredentials,
    expires_at: Option<DateTime<Utc>>,
) -> bool {
    if let Err(e) = super::admin::validate_tenant(&app.key.tenant) {
        report.fail("settings", Failure::Settings, e.to_string(), Vec::new());
        return false;
    }
    let what = match &app.credential {
        Credential::Secret(_) => "client secret",
        Credential::Certificate(_) => "certificate",
    };
    let mut summary = format!(
        "tenant {}, client id {}, scope {}, {what}",
        app.key.tenant, app.key.client_id, app.key.scope
    );
    if let Credential::Certificate(cert) = &app.credential {
        let _ = write!(
            summary,
            " ({}, thumbprint {})",
            cert.alg(),
            cert.portal_thumbprint()
        );
    }
    let Some(expires) = expires_at else {
        report.push("settings", Verdict::Pass, summary);
        return true;
    };
    let days = (expires - Utc::now()).num_days();
    let date = expires.date_naive();
    if expires <= Utc::now() {
        report.push_fix(
            "settings",
            Verdict::Warn,
            format!("{summary}; the {what} EXPIRED on {date}"),
            vec![format!(
                "create a new {what} for app {} in the Azure portal (Certificates & secrets) and store it with `ccmail app rotate-secret`",
                app.key.client_id
            )],
        );
    } else if days < EXPIRY_WARNING_DAYS {
        report.push_fix(
            "settings",
            Verdict::Warn,
            format!("{summary}; the {what} expires in {days} days ({date})"),
            vec![format!(
                "create a new {what} for app {} now and store it with `ccmail app rotate-secret`",
                app.key.client_id
            )],
        );
    } else {
        let _ = write!(summary, ", expires {date}");
        report.push("settings", Verdict::Pass, summary);
    }
    true
}

async fn token_step(
    report: &mut Report,
    app: &AppCredentials,
    name: Option<&str>,
    options: &TokenSourceOptions,
) -> Option<oauth::AccessToken> {
    let source = match TokenSource::new(options.clone()) {
        Ok(s) => s,
        Err(e) => {
            report.fail("token", Failure::Settings, e.to_string(), Vec::new());
            return None;
        }
    };
    match source.request(app).await {
        Ok(token) => {
            let minutes = token
                .expires_at
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs()
                / 60;
            let summary = format!(
                "token obtained from {} ({} characters, valid {minutes} min)",
                app.key.token_url(),
                token.len()
            );
            if token.len() > LONG_TOKEN {
                report.push_fix(
                    "token",
                    Verdict::Warn,
                    summary,
                    vec![format!(
                        "the token is longer than {LONG_TOKEN} characters; Exchange Online has rejected such tokens: \
                         remove unneeded API permissions or group claims from the app"
                    )],
                );
            } else {
                report.push("token", Verdict::Pass, summary);
            }
            Some(token)
        }
        Err(e) => {
            token_failure(report, app, name, &e);
            None
        }
    }
}

fn token_failure(report: &mut Report, app: &AppCredentials, name: Option<&str>, e: &OAuthError) {
    let class = if e.is_transient() {
        Failure::TokenUnreachable
    } else {
        Failure::TokenRefused
    };
    let mut summary = e.to_string();
    let mut fix = Vec::new();
    if let Some(code) = e.aadsts() {
        summary = format!(
            "AADSTS{code}: {} — {summary}",
            aadsts_meaning(code).unwrap_or("see https://login.microsoftonline.com/error")
        );
    }
    if let Some(f) = e.fix() {
        fix.push(f.to_owned());
    }
    let app_ref = name.unwrap_or("<app name>");
    match e.aadsts() {
        Some(7000215) | Some(7000222) | Some(7000218) => fix.push(format!(
            "then: ccmail app rotate-secret {app_ref} --secret-stdin --secret-expires YYYY-MM-DD"
        )),
        Some(700016) => fix.push(format!(
            "the client id in use is {} and the tenant is {}: compare with the app registration's Overview page",
            app.key.client_id, app.key.tenant
        )),
        Some(90002) | Some(900023) | Some(90038) => fix.push(format!(
            "the tenant in use is {} at {}: fix it with `ccmail app update {app_ref} --tenant <tenant id>` (or --cloud)",
            app.key.tenant, app.key.authority
        )),
        Some(500011) => fix.push(resource_not_found_fix(app, app_ref)),
        Some(70011) | Some(1002012) | Some(700022) => fix.push(format!(
            "the scope in use is {:?}: fix it with `ccmail app update {app_ref} --scope {}`",
            app.key.scope,
            oauth::DEFAULT_SCOPE
        )),
        Some(700027) | Some(50012) => {
            if let Credential::Certificate(cert) = &app.credential {
                fix.push(format!(
                    "the certificate in use has thumbprint {} (x5t {}); it must be listed under Certificates & secrets of app {}",
                    cert.portal_thumbprint(),
                    cert.x5t(),
                    app.key.client_id
                ));
            }
        }
        _ => {}
    }
    report.fail("token", class, summary, fix);
}

/// AADSTS500011 (resource principal not found), for the scope actually requested: a wrong
/// scope is fixed by the right one; with the right one already in use the cause is the tenant.
fn resource_not_found_fix(app: &AppCredentials, app_ref: &str) -> String {
    if app.key.scope.eq_ignore_ascii_case(oauth::DEFAULT_SCOPE) {
        format!(
            "the scope in use is already {}, so the resource missing is the tenant's: tenant {} has no \
             Office 365 Exchange Online service principal (appId 00000002-0000-0ff1-ce00-000000000000; \
             no Exchange Online subscription), or the tenant id names another tenant, or the tenant is in \
             another cloud than {} (fix with `ccmail app update {app_ref} --tenant <tenant id>` or --cloud)",
            app.key.scope, app.key.tenant, app.key.authority
        )
    } else {
        format!(
            "the scope in use is {:?}: Exchange Online's POP resource is {}; fix it with `ccmail app update \
             {app_ref} --scope {}` (or --cloud for a national cloud)",
            app.key.scope,
            oauth::DEFAULT_SCOPE,
            oauth::DEFAULT_SCOPE
        )
    }
}

fn connect_failure(report: &mut Report, target: &Target, e: &pop3::Error) {
    let place = format!("{}:{}", target.server.host, target.server.port);
    let (class, summary, mut fix) = match e {
        pop3::Error::Connect { source, .. } => (
            Failure::ServerUnreachable,
            format!("cannot connect to {place}: {source}"),
            vec![format!(
                "check the host and port (Exchange Online: {}:{}) and that outbound TCP to it is allowed",
                crate::store::DEFAULT_HOST,
                crate::store::DEFAULT_PORT
            )],
        ),
        pop3::Error::Timeout {
            during: "greeting",
            after,
        } => (
            Failure::Timeout,
            match target.server.tls {
                pop3::TlsMode::Implicit => format!(
                    "{place} accepted the TCP connection and the TLS handshake but never sent the POP3 greeting (waited {after:?})"
                ),
                _ => format!(
                    "{place} accepted the TCP connection but never sent the POP3 greeting (waited {after:?})"
                ),
            },
            vec![
                "the server (or a proxy or load balancer in front of it) takes connections but no POP3 service answers: check that this host and port are the mailbox's POP3 server, and the server's POP3 service".to_owned(),
                format!("to wait longer, pass --greeting-timeout SECS (now {}s)", target.greeting_timeout.as_secs()),
            ],
        ),
        pop3::Error::Timeout { during, after } => (
            Failure::Timeout,
            format!("{place} did not answer within {after:?} ({during})"),
            vec![
                "check that the port speaks POP3 (995 implicit TLS, 110 with starttls) and that no firewall silently drops the traffic".to_owned(),
            ],
        ),
        pop3::Error::TlsCertificate { reason, hint, .. } => (
            Failure::Tls,
            format!("the TLS certificate of {place} is not trusted: {reason}"),
            vec![(*hint).to_owned()],
        ),
        pop3::Error::TlsHandshake { source, .. } => {
            let reason = source.to_string();
            let lower = reason.to_ascii_lowercase();
            let fix = if lower.contains("version") || lower.contains("protocol") {
                "the server offers no TLS version ccmail accepts (1.2 or 1.3); Exchange Online requires TLS 1.2+: upgrade the server's TLS settings"
            } else if lower.contains("corrupt") || lower.contains("invalid") || lower.contains("message") {
                "the port does not speak TLS: use --tls starttls for port 110, or implicit TLS on port 995"
            } else {
                "check that the port speaks TLS (995) and that nothing intercepts the connection"
            };
            (
                Failure::Tls,
                format!("TLS handshake with {place} failed: {reason}"),
                vec![fix.to_owned()],
            )
        }
        pop3::Error::NotSupported { what, hint } => (
            Failure::Protocol,
            format!("{place} does not offer {what}"),
            vec![(*hint).to_owned()],
        ),
        other => (
            if other.is_transient() {
                Failure::ServerUnreachable
            } else {
                Failure::Protocol
            },
            format!("{place}: {other}"),
            Vec::new(),
        ),
    };
    if fix.is_empty()
        && let Some(h) = e.hint()
    {
        fix.push(h.to_owned());
    }
    report.fail("connect", class, summary, fix);
}

fn login_failure(
    report: &mut Report,
    target: &Target,
    e: &pop3::Error,
    token_len: Option<usize>,
    second_try: Option<String>,
) {
    match (e, &target.login) {
        (pop3::Error::ServerBusy { .. }, _) => report.fail(
            "login",
            Failure::ServerBusy,
            format!("server busy / temporarily unavailable: {e} (TCP, TLS, greeting and CAPA passed)"),
            vec![
                "wait a few minutes and run doctor again: this answer is about the server's state, not the credentials".to_owned(),
                format!("check that no other session holds {} (another mail client, or a ccmail worker polling it)", target.mailbox),
                "if it lasts: Exchange Online is throttling this mailbox or has a backend problem (Microsoft 365 admin center > Health > Service health)".to_owned(),
            ],
        ),
        (pop3::Error::TokenTooLong { length, .. }, _) => report.fail(
            "login",
            Failure::TokenTooLong,
            format!("token rejected as too long: the server cut the login off after a token of {length} characters ({e})"),
            vec![
                format!("Exchange Online refuses tokens much over {LONG_TOKEN} characters; this one has {length}"),
                "make the token smaller: remove API permissions the app does not need (API permissions), and the group and role claims (Token configuration; groupMembershipClaims \"None\" in the manifest)".to_owned(),
                "then run doctor again: the token step prints the new length".to_owned(),
            ],
        ),
        (pop3::Error::Timeout { during, after }, _) => report.fail(
            "login",
            Failure::Timeout,
            format!("the server did not answer the login within {after:?} ({during})"),
            vec!["retry; if it persists the server is overloaded or a proxy holds the connection".to_owned()],
        ),
        (pop3::Error::AuthRejected { .. }, Login::XOAuth2 { app, .. }) if !e.is_transient() => {
            let mut summary = format!("generic authentication failure: {e}");
            if let Some(len) = token_len {
                let _ = write!(summary, " [token length {len}]");
            }
            let mut fix = other_causes(target, second_try);
            fix.extend(exchange_checklist(&target.mailbox, app));
            report.fail("login", Failure::LoginRejected, summary, fix);
        }
        (pop3::Error::AuthRejected { .. }, Login::UserPass { username, .. }) if !e.is_transient() => {
            report.fail(
                "login",
                Failure::LoginRejected,
                e.to_string(),
                vec![format!("check the password of {username}; store it again with `ccmail pilot update <id> --secret-stdin`")],
            )
        }
        (pop3::Error::PlaintextAuthRefused, _) => report.fail(
            "login",
            Failure::Tls,
            e.to_string(),
            vec!["use --tls implicit (port 995) or --tls starttls".to_owned()],
        ),
        (other, _) => {
            let class = if other.is_transient() {
                Failure::ServerUnreachable
            } else {
                Failure::Protocol
            };
            report.fail(
                "login",
                class,
                other.to_string(),
                other.hint().map(|h| vec![h.to_owned()]).unwrap_or_default(),
            );
        }
    }
}

/// The causes of Exchange's generic authentication failure that are not a missing permission,
/// first, with what doctor saw of them.
fn other_causes(target: &Target, second_try: Option<String>) -> Vec<String> {
    let now = Utc::now();
    let mut out = vec![
        "Exchange gives this same answer for several causes; the ones that are not a missing permission first:".to_owned(),
        format!(
            "A. Another session on {}: too many sessions on one mailbox (another mail client, or a ccmail worker polling it) are refused like a bad login.",
            target.mailbox
        ),
    ];
    match target.known.last_poll {
        Some((at, pilot, enabled)) if (now - at).num_minutes() < RECENT_POLL_MINUTES => out.push(format!(
            "     the database shows pilot {pilot} ({}) was polled by a ccmail worker {} min ago ({at}): a worker may hold the mailbox; stop it with `ccmail pilot disable {pilot}` while checking, or wait for its poll to end",
            if enabled { "enabled" } else { "disabled" },
            (now - at).num_minutes()
        )),
        Some((at, pilot, _)) => out.push(format!(
            "     the database shows pilot {pilot} last polled at {at}, not recently; look for other mail clients on the mailbox"
        )),
        None => out.push("     no ccmail pilot in this database has polled this mailbox; look for other mail clients on it".to_owned()),
    }
    if let Some(note) = second_try {
        out.push(format!("     {note}"));
    }
    out.push(format!(
        "B. A permission granted less than {PROPAGATION_MINUTES} minutes ago: Exchange Online can take up to an hour to apply it; wait and run doctor again."
    ));
    if let Some(added) = target.known.app_added {
        let minutes = (now - added).num_minutes();
        if minutes < PROPAGATION_MINUTES {
            out.push(format!(
                "     this app was added to ccmail {minutes} min ago: if its permissions were granted then, they may still be propagating"
            ));
        }
    }
    out
}

/// docs/exchange-online.md's ordered checklist ("The generic authentication failure") for `-ERR
/// Authentication failure`, with the commands filled in for this app and mailbox.
pub fn exchange_checklist(mailbox: &str, app: &AppCredentials) -> Vec<String> {
    let client = &app.key.client_id;
    let tenant = &app.key.tenant;
    let mut scope_line = format!(
        "5. Token scope: this token was requested for {:?}",
        app.key.scope
    );
    if app.key.scope.eq_ignore_ascii_case(oauth::DEFAULT_SCOPE) {
        scope_line.push_str(" (correct for the global cloud).");
    } else {
        let _ = write!(
            scope_line,
            "; Exchange Online needs {} (or the sovereign cloud's POP resource).",
            oauth::DEFAULT_SCOPE
        );
    }
    vec![
        "Then the permissions, in order:".to_owned(),
        format!(
            "1. API permission: Azure portal > App registrations > {client} > API permissions: \
             Office 365 Exchange Online > Application permission POP.AccessAsApp (not delegated), \
             then 'Grant admin consent for' tenant {tenant}."
        ),
        format!(
            "2. Exchange service principal, with the Enterprise Application's object id (not the App Registration's):"
        ),
        format!("     Connect-MgGraph -TenantId {tenant}; $sp = Get-MgServicePrincipal -Filter \"appId eq '{client}'\""),
        format!("     Connect-ExchangeOnline -Organization {tenant}"),
        format!("     New-ServicePrincipal -AppId {client} -ObjectId $sp.Id"),
        format!("     check: Get-ServicePrincipal | Where-Object AppId -eq '{client}'"),
        format!("3. Mailbox permission:"),
        format!("     Add-MailboxPermission -Identity {mailbox} -User $sp.Id -AccessRights FullAccess"),
        format!("     check: Get-MailboxPermission -Identity {mailbox} | Format-Table User,AccessRights"),
        format!("4. Login user: ccmail logged in as user={mailbox}; it must be the mailbox granted in step 3 (its primary SMTP address)."),
        scope_line,
        format!("6. POP enabled on the mailbox:"),
        format!("     Get-CASMailbox -Identity {mailbox} | Format-List PopEnabled"),
        format!("     Set-CASMailbox -Identity {mailbox} -PopEnabled $true"),
        "Permission changes can take up to an hour to reach Exchange Online; run doctor again afterwards.".to_owned(),
    ]
}

fn mailbox_failure(report: &mut Report, step: &'static str, command: &str, e: &pop3::Error) {
    let class = match e {
        pop3::Error::Timeout { .. } => Failure::Timeout,
        _ => Failure::Mailbox,
    };
    report.fail(
        step,
        class,
        format!("{command} failed: {e}"),
        e.hint().map(|h| vec![h.to_owned()]).unwrap_or_default(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let all = [
            Failure::Settings,
            Failure::TokenRefused,
            Failure::TokenUnreachable,
            Failure::ServerUnreachable,
            Failure::Tls,
            Failure::Timeout,
            Failure::Protocol,
            Failure::LoginRejected,
            Failure::ServerBusy,
            Failure::TokenTooLong,
            Failure::Mailbox,
        ];
        let mut codes: Vec<u8> = all.iter().map(|f| f.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        for code in codes {
            assert!(
                EXIT_CODES.contains(&format!("\n  {code:>2}  ")),
                "exit code {code} is not documented"
            );
        }
    }

    #[test]
    fn every_aadsts_code_with_a_fix_has_a_meaning() {
        for code in [
            7000215u32, 7000222, 7000218, 700016, 90002, 900023, 90038, 9001023, 70011, 1002012,
            700022, 500011, 700027, 50012, 7000112, 53003, 50196, 90055,
        ] {
            assert!(aadsts_meaning(code).is_some(), "{code}");
            assert!(oauth::aadsts_fix(code).is_some(), "{code}");
        }
    }
}
