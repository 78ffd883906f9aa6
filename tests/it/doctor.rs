//! `ccmail doctor` diagnoses, one test per failure the issue lists, against the Entra and
//! Exchange simulators: each asserts the verdict, the failure class (exit code) and the hint.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use secrecy::SecretString;

use ccmail::oauth::{
    AppCredentials, AppKey, AssertionAlg, CertificateCredential, Credential, DEFAULT_SCOPE,
    TokenSourceOptions,
};
use ccmail::ops::doctor::{self, Failure, Login, Report, Target, Verdict};
use ccmail::pop3::{ServerSpec, Timeouts, TlsMode};
use ccmail_lab::sim::entra::{AppCertificate, SimApp, TokenFailure};
use ccmail_lab::sim::mailgen::MailGen;
use ccmail_lab::sim::pop3::{AUTH_FAILURE, Fault, SERVER_UNAVAILABLE};
use ccmail_lab::world::World;

const TENANT: &str = "8f2c1a9e-1111-4222-8333-944455556666";
const DOMAIN: &str = "contoso.example";
const CLIENT: &str = "0a1b2c3d-aaaa-4bbb-8ccc-ddddeeeeffff";
const SECRET: &str = "s3cr3t~value.for-doctor";
const MAILBOX: &str = "support@contoso.example";

/// The lab's [`World`] as the doctor's tenant ([`TENANT`], [`CLIENT`], [`SECRET`], [`MAILBOX`]).
struct Sims {
    world: World,
}

impl std::ops::Deref for Sims {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

async fn sims() -> Sims {
    let world = World::builder()
        .ca_name("doctor test CA")
        .tenant(TENANT)
        .domain(DOMAIN)
        .client_id(CLIENT)
        .client_secret(SECRET)
        .mailboxes([MAILBOX])
        .start()
        .await
        .unwrap();
    Sims { world }
}

impl Sims {
    fn app(&self, tenant: &str, client: &str, secret: &str) -> AppCredentials {
        AppCredentials::with_secret(
            AppKey {
                authority: self.entra.authority(),
                tenant: tenant.to_owned(),
                client_id: client.to_owned(),
                scope: DEFAULT_SCOPE.to_owned(),
            },
            SecretString::from(secret.to_owned()),
        )
    }

    fn server(&self, trust_ca: bool, timeouts: Timeouts) -> ServerSpec {
        let roots = if trust_ca {
            vec![self.ca.cert_der().clone()]
        } else {
            Vec::new()
        };
        let addr = self.pop.tls_addr();
        ServerSpec::new(
            addr.ip().to_string(),
            addr.port(),
            TlsMode::Implicit,
            &roots,
            timeouts,
        )
        .unwrap()
    }

    fn target(&self, mailbox: &str, app: AppCredentials) -> Target {
        Target {
            mailbox: mailbox.to_owned(),
            server: self.server(true, Timeouts::default()),
            login: Login::XOAuth2 {
                app,
                name: Some("support-app".to_owned()),
                expires_at: None,
            },
            retr: None,
            max_message_bytes: 10 * 1024 * 1024,
            greeting_timeout: doctor::GREETING_TIMEOUT,
            // Short: the second login only has to come after the first has ended.
            login_retry_pause: Some(Duration::from_millis(100)),
            known: doctor::Known::default(),
        }
    }

    fn token_options(&self) -> TokenSourceOptions {
        TokenSourceOptions {
            extra_roots: vec![self.ca.cert_der().clone()],
            ..TokenSourceOptions::default()
        }
    }

    async fn diagnose(&self, target: &Target) -> Report {
        let report = doctor::diagnose(target, &self.token_options()).await;
        // What the admin sees; kept in the test output for failures.
        println!("{}", report.render());
        report
    }
}

fn failed(report: &Report, step: &str, class: Failure) -> (String, String) {
    assert_eq!(report.failure, Some(class), "{}", report.render());
    let check = report
        .check(step)
        .unwrap_or_else(|| panic!("no {step} step"));
    assert_eq!(check.verdict, Verdict::Fail, "{}", report.render());
    assert_eq!(
        report.checks.last().map(|c| c.step),
        Some(step),
        "the run stops at the failing step"
    );
    assert_eq!(report.exit_code(), class.exit_code());
    (check.summary.clone(), check.fix.join("\n"))
}

#[tokio::test]
async fn a_good_setup_passes_every_step_and_retr_leaves_the_message() {
    let s = sims().await;
    let mut mail = MailGen::new(7);
    s.pop.deliver(MAILBOX, mail.mixed(MAILBOX));
    s.pop.deliver(MAILBOX, mail.mixed(MAILBOX));
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    target.retr = Some(1);
    let report = s.diagnose(&target).await;
    assert_eq!(report.failure, None, "{}", report.render());
    assert_eq!(report.exit_code(), 0);
    for step in [
        "settings",
        "token",
        "connect",
        "greeting",
        "capabilities",
        "login",
        "mailbox",
        "retr",
        "quit",
    ] {
        assert_eq!(
            report.check(step).map(|c| c.verdict),
            Some(Verdict::Pass),
            "{step}: {}",
            report.render()
        );
    }
    assert!(
        report
            .check("capabilities")
            .unwrap()
            .summary
            .contains("XOAUTH2")
    );
    assert_eq!(report.messages, Some(2));
    assert!(
        report
            .check("retr")
            .unwrap()
            .summary
            .contains("left on the server")
    );
    // Nothing was deleted.
    assert_eq!(s.pop.messages(MAILBOX).len(), 2);
    let receipts = report.check("read-receipts").unwrap();
    assert_eq!(receipts.verdict, Verdict::Warn);
    assert!(receipts.fix[0].contains(&format!(
        "Set-CASMailbox -Identity {MAILBOX} -PopUseProtocolDefaults $false -PopSuppressReadReceipt $true"
    )));
    // The two-step login was used.
    let commands = s.pop.commands();
    assert!(commands.iter().any(|c| c == "AUTH XOAUTH2"), "{commands:?}");
    assert!(
        !commands.iter().any(|c| c.starts_with("DELE")),
        "{commands:?}"
    );
    // No secret and no token in what is printed.
    assert!(!report.render().contains(SECRET));
}

#[tokio::test]
async fn wrong_secret_is_aadsts7000215_with_the_value_not_the_id() {
    let s = sims().await;
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, "the-secret-id-guid")))
        .await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS7000215"), "{summary}");
    assert!(summary.contains("invalid client secret"), "{summary}");
    assert!(fix.contains("Value, not its Secret ID"), "{fix}");
    assert!(
        fix.contains("ccmail app rotate-secret support-app"),
        "{fix}"
    );
    assert_eq!(report.exit_code(), 10);
}

#[tokio::test]
async fn expired_secret_is_aadsts7000222_and_the_expiry_date_warns_first() {
    let s = sims().await;
    s.entra.register_app(SimApp {
        tenant: TENANT.to_owned(),
        tenant_domain: DOMAIN.to_owned(),
        client_id: CLIENT.to_owned(),
        client_secret: SECRET.to_owned(),
        secret_expired: true,
    });
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    if let Login::XOAuth2 { expires_at, .. } = &mut target.login {
        *expires_at = Some(Utc::now() - chrono::Duration::days(3));
    }
    let report = s.diagnose(&target).await;
    let settings = report.check("settings").unwrap();
    assert_eq!(settings.verdict, Verdict::Warn);
    assert!(settings.summary.contains("EXPIRED"), "{}", settings.summary);
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS7000222"), "{summary}");
    assert!(summary.contains("expired"), "{summary}");
    assert!(fix.contains("create a new secret"), "{fix}");
}

#[tokio::test]
async fn a_secret_expiring_within_30_days_warns_but_passes() {
    let s = sims().await;
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    if let Login::XOAuth2 { expires_at, .. } = &mut target.login {
        *expires_at = Some(Utc::now() + chrono::Duration::days(12) + chrono::Duration::hours(1));
    }
    let report = s.diagnose(&target).await;
    assert_eq!(report.failure, None, "{}", report.render());
    let settings = report.check("settings").unwrap();
    assert_eq!(settings.verdict, Verdict::Warn);
    assert!(
        settings.summary.contains("expires in 12 days"),
        "{}",
        settings.summary
    );
    assert!(settings.fix[0].contains("ccmail app rotate-secret"));
}

#[tokio::test]
async fn unknown_app_is_aadsts700016() {
    let s = sims().await;
    let other = "11111111-2222-4333-8444-555555555555";
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, other, SECRET)))
        .await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS700016"), "{summary}");
    assert!(summary.contains("not found in the tenant"), "{summary}");
    assert!(fix.contains("check the client id and the tenant"), "{fix}");
    assert!(fix.contains(other) && fix.contains(TENANT), "{fix}");
}

#[tokio::test]
async fn unknown_tenant_is_aadsts90002() {
    let s = sims().await;
    let report = s
        .diagnose(&s.target(MAILBOX, s.app("fabrikam.example", CLIENT, SECRET)))
        .await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS90002"), "{summary}");
    assert!(fix.contains("check the tenant id"), "{fix}");
    assert!(
        fix.contains("ccmail app update support-app --tenant"),
        "{fix}"
    );
}

#[tokio::test]
async fn a_scope_without_default_is_aadsts1002012() {
    let s = sims().await;
    let mut app = s.app(TENANT, CLIENT, SECRET);
    app.key.scope = "https://outlook.office365.com/POP.AccessAsApp".to_owned();
    let report = s.diagnose(&s.target(MAILBOX, app)).await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS1002012"), "{summary}");
    assert!(
        fix.contains("use exactly https://outlook.office365.com/.default"),
        "{fix}"
    );
}

#[tokio::test]
async fn the_tenant_common_is_refused_before_any_request() {
    let s = sims().await;
    let report = s
        .diagnose(&s.target(MAILBOX, s.app("common", CLIENT, SECRET)))
        .await;
    let (summary, _) = failed(&report, "settings", Failure::Settings);
    assert!(summary.contains("AADSTS9001023"), "{summary}");
    assert_eq!(s.entra.token_requests(), 0);
    assert_eq!(report.exit_code(), 3);
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_its_own_class() {
    let s = sims().await;
    s.entra.fail_next(1, TokenFailure::Status(503));
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    let (summary, fix) = failed(&report, "token", Failure::TokenUnreachable);
    assert!(summary.contains("503"), "{summary}");
    assert!(fix.contains("proxy"), "{fix}");
    assert_eq!(report.exit_code(), 11);
}

#[tokio::test]
async fn auth_rejected_at_pop_prints_the_checklist_with_this_apps_ids() {
    let s = sims().await;
    // A mailbox the app has no access to: Exchange's one generic failure line.
    let outsider = "sales@fabrikam.example";
    s.pop.add_mailbox(outsider);
    let report = s
        .diagnose(&s.target(outsider, s.app(TENANT, CLIENT, SECRET)))
        .await;
    let (summary, fix) = failed(&report, "login", Failure::LoginRejected);
    assert!(
        summary.contains("Authentication failure: unknown user name or bad password"),
        "{summary}"
    );
    assert!(summary.contains("token length"), "{summary}");
    // The ordered checklist, filled in.
    let order = [
        "POP.AccessAsApp",
        &format!("New-ServicePrincipal -AppId {CLIENT} -ObjectId $sp.Id"),
        &format!(
            "Add-MailboxPermission -Identity {outsider} -User $sp.Id -AccessRights FullAccess"
        ),
        &format!("user={outsider}"),
        "https://outlook.office365.com/.default",
        &format!("Get-CASMailbox -Identity {outsider} | Format-List PopEnabled"),
    ];
    let mut at = 0;
    for needle in order {
        let found = fix[at..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing or out of order in:\n{fix}"));
        at += found;
    }
    assert!(
        fix.contains(&format!("Connect-MgGraph -TenantId {TENANT}")),
        "{fix}"
    );
    assert!(fix.contains("Enterprise Application's object id"), "{fix}");
    assert_eq!(report.exit_code(), 30);
}

#[tokio::test]
async fn an_untrusted_certificate_is_named() {
    let s = sims().await;
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    target.server = s.server(false, Timeouts::default());
    let report = s.diagnose(&target).await;
    let (summary, fix) = failed(&report, "connect", Failure::Tls);
    assert!(summary.contains("not trusted"), "{summary}");
    assert!(summary.to_lowercase().contains("issuer"), "{summary}");
    assert!(fix.contains("not signed by a trusted CA"), "{fix}");
    assert!(fix.contains("ca_bundle"), "{fix}");
    assert_eq!(report.exit_code(), 21);
}

#[tokio::test]
async fn a_server_that_stops_answering_is_a_timeout() {
    let s = sims().await;
    s.pop.set_fault(Some(Fault::Hang {
        command: "CAPA".to_owned(),
    }));
    let short = Duration::from_millis(700);
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    target.server = s.server(
        true,
        Timeouts {
            connect: short,
            tls: short,
            command: short,
            idle: short,
            ..Timeouts::DEFAULT
        },
    );
    let report = s.diagnose(&target).await;
    let (summary, fix) = failed(&report, "connect", Failure::Timeout);
    assert!(summary.contains("did not answer within"), "{summary}");
    assert!(fix.contains("firewall"), "{fix}");
    assert_eq!(report.exit_code(), 22);
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let s = sims().await;
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    // Bind and drop: a loopback port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    target.server = ServerSpec::new(
        "127.0.0.1",
        port,
        TlsMode::Implicit,
        &[],
        Timeouts::default(),
    )
    .unwrap();
    let report = s.diagnose(&target).await;
    let (summary, fix) = failed(&report, "connect", Failure::ServerUnreachable);
    assert!(summary.contains("cannot connect"), "{summary}");
    assert!(fix.contains("outlook.office365.com:995"), "{fix}");
}

#[tokio::test]
async fn thousands_of_waiting_messages_warn() {
    let s = sims().await;
    for i in 0..doctor::LARGE_MAILDROP {
        s.pop.deliver(
            MAILBOX,
            format!("Subject: m{i}\r\nFrom: a@b.example\r\n\r\nbody\r\n").into_bytes(),
        );
    }
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    assert_eq!(report.failure, None, "{}", report.render());
    let mailbox = report.check("mailbox").unwrap();
    assert_eq!(mailbox.verdict, Verdict::Warn);
    assert!(
        mailbox.summary.starts_with("1000 messages waiting"),
        "{}",
        mailbox.summary
    );
    assert!(mailbox.fix[0].contains("thousands"), "{:?}", mailbox.fix);
}

#[tokio::test]
async fn a_token_over_4000_characters_warns_but_passes() {
    let s = sims().await;
    s.entra.set_token_length(doctor::LONG_TOKEN + 200);
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    assert_eq!(report.failure, None, "{}", report.render());
    let token = report.check("token").unwrap();
    assert_eq!(token.verdict, Verdict::Warn, "{}", report.render());
    assert!(
        token.fix[0].contains("longer than 4000 characters"),
        "{:?}",
        token.fix
    );
    // A normal token passes without the warning.
    s.entra.set_token_length(1200);
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    assert_eq!(report.check("token").unwrap().verdict, Verdict::Pass);
}

fn certificate_app(s: &Sims, cert: &AppCertificate, alg: AssertionAlg) -> AppCredentials {
    let loaded = CertificateCredential::from_pem(
        &cert.cert_pem,
        &SecretString::from(cert.key_pem.clone()),
        alg,
    )
    .unwrap();
    AppCredentials {
        key: s.app(TENANT, CLIENT, "").key,
        credential: Credential::Certificate(Arc::new(loaded)),
    }
}

#[tokio::test]
async fn certificate_assertions_rs256_and_ps256_are_accepted_by_the_verifying_sim() {
    let s = sims().await;
    let cert = AppCertificate::generate("ccmail-doctor").unwrap();
    s.entra.register_certificate(CLIENT, cert.der.clone());
    for alg in [AssertionAlg::Rs256, AssertionAlg::Ps256] {
        let report = s
            .diagnose(&s.target(MAILBOX, certificate_app(&s, &cert, alg)))
            .await;
        assert_eq!(report.failure, None, "{alg}: {}", report.render());
        let settings = report.check("settings").unwrap();
        assert!(
            settings.summary.contains(alg.as_str()),
            "{}",
            settings.summary
        );
        assert_eq!(report.check("login").unwrap().verdict, Verdict::Pass);
    }
}

#[tokio::test]
async fn an_unregistered_certificate_is_aadsts700027_with_its_thumbprint() {
    let s = sims().await;
    let registered = AppCertificate::generate("registered").unwrap();
    let other = AppCertificate::generate("not registered").unwrap();
    s.entra.register_certificate(CLIENT, registered.der.clone());
    let app = certificate_app(&s, &other, AssertionAlg::Rs256);
    let Credential::Certificate(loaded) = &app.credential else {
        unreachable!()
    };
    let thumbprint = loaded.portal_thumbprint();
    let report = s.diagnose(&s.target(MAILBOX, app.clone())).await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS700027"), "{summary}");
    assert!(fix.contains("x5t must be the SHA-1 thumbprint"), "{fix}");
    assert!(fix.contains(&thumbprint), "{fix}");
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_is_refused_when_loaded() {
    let a = AppCertificate::generate("a").unwrap();
    let b = AppCertificate::generate("b").unwrap();
    let err = CertificateCredential::from_pem(
        &a.cert_pem,
        &SecretString::from(b.key_pem.clone()),
        AssertionAlg::Rs256,
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY-----\n"), "{err}");
}

/// A session of the app on `mailbox`, logged in and held open (as another client would).
async fn hold_session(s: &Sims, mailbox: &str) -> ccmail::pop3::Session<ccmail::pop3::Stream> {
    let source = ccmail::oauth::TokenSource::new(s.token_options()).unwrap();
    let token = source
        .request(&s.app(TENANT, CLIENT, SECRET))
        .await
        .unwrap();
    let client = ccmail::pop3::Client::connect(&s.server(true, Timeouts::default()))
        .await
        .unwrap();
    client.auth_xoauth2(mailbox, token.secret()).await.unwrap()
}

/// The position of each needle in `text`, in order; panics when one is missing or out of order.
fn in_order(text: &str, needles: &[&str]) {
    let mut at = 0;
    for needle in needles {
        let found = text[at..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing or out of order in:\n{text}"));
        at += found;
    }
}

#[tokio::test]
async fn over_the_session_limit_names_the_other_session_before_the_checklist() {
    let s = sims().await;
    s.pop.set_session_limit(Some(1), AUTH_FAILURE);
    // Another client holds the mailbox for the whole run.
    let held = hold_session(&s, MAILBOX).await;
    assert_eq!(s.pop.active_sessions(MAILBOX), 1);
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    // The database's view: a worker polled this mailbox (pilot 7) two minutes ago.
    target.known.last_poll = Some((Utc::now() - chrono::Duration::minutes(2), 7, true));
    target.known.app_added = Some(Utc::now() - chrono::Duration::minutes(20));
    let report = s.diagnose(&target).await;
    let (summary, fix) = failed(&report, "login", Failure::LoginRejected);
    assert!(
        summary.contains("generic authentication failure"),
        "{summary}"
    );
    in_order(
        &fix,
        &[
            &format!("Another session on {MAILBOX}"),
            "pilot 7 (enabled) was polled by a ccmail worker 2 min ago",
            "ccmail pilot disable 7",
            "a second login 100ms later was refused too",
            "persistent",
            "less than 60 minutes ago",
            "this app was added to ccmail 20 min ago",
            "POP.AccessAsApp",
            "Add-MailboxPermission",
        ],
    );
    // Both logins were refused by the limit, not by the credentials.
    assert_eq!(s.pop.auth_failures(), 2);
    assert_eq!(report.exit_code(), 30);
    drop(held);

    // Without a recent poll in the database, doctor says so.
    let target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    let held = hold_session(&s, MAILBOX).await;
    let report = s.diagnose(&target).await;
    let (_, fix) = failed(&report, "login", Failure::LoginRejected);
    assert!(
        fix.contains("no ccmail pilot in this database has polled this mailbox"),
        "{fix}"
    );
    drop(held);
}

#[tokio::test]
async fn a_token_longer_than_the_server_accepts_is_its_own_verdict() {
    let s = sims().await;
    s.entra.set_token_length(6000);
    // The server cuts off an XOAUTH2 response over 5000 octets.
    s.pop.set_token_limit(Some(5000));
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    let token = report.check("token").unwrap().summary.clone();
    let length: usize = token
        .split(" characters")
        .next()
        .and_then(|t| t.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no length in {token:?}"));
    assert!(length > 4000, "{token}");
    let (summary, fix) = failed(&report, "login", Failure::TokenTooLong);
    assert!(summary.contains("token rejected as too long"), "{summary}");
    assert!(
        summary.contains(&format!("token of {length} characters")),
        "{summary}"
    );
    assert!(
        !summary.contains("generic authentication failure"),
        "{summary}"
    );
    assert!(fix.contains("group and role claims"), "{fix}");
    assert!(!fix.contains("POP.AccessAsApp"), "{fix}");
    assert_eq!(report.exit_code(), 32);
}

#[tokio::test]
async fn a_busy_server_at_login_is_its_own_class_with_advice() {
    let s = sims().await;
    // Exchange's answer while the mailbox is held beyond its session limit.
    s.pop.set_session_limit(Some(1), SERVER_UNAVAILABLE);
    let held = hold_session(&s, MAILBOX).await;
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    for step in ["connect", "greeting", "capabilities"] {
        assert_eq!(report.check(step).unwrap().verdict, Verdict::Pass, "{step}");
    }
    let (summary, fix) = failed(&report, "login", Failure::ServerBusy);
    assert!(
        summary.contains("server busy / temporarily unavailable"),
        "{summary}"
    );
    assert!(summary.contains("Server Unavailable. 21"), "{summary}");
    in_order(&fix, &["wait", "no other session", "throttling"]);
    assert_eq!(report.exit_code(), 31);
    drop(held);
    s.pop.set_session_limit(None, AUTH_FAILURE);

    // The RFC 2449 codes at login are the same class.
    for line in [
        "-ERR [SYS/TEMP] try again later",
        "-ERR [IN-USE] mailbox locked",
    ] {
        s.pop.set_fault(Some(Fault::Err {
            command: "AUTH".to_owned(),
            line: line.to_owned(),
        }));
        let report = s
            .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
            .await;
        let (summary, _) = failed(&report, "login", Failure::ServerBusy);
        assert!(summary.contains(&line[5..]), "{summary}");
    }
}

#[tokio::test]
async fn an_unreadable_env_secret_is_a_settings_failure_printed_once() {
    let db = ccmail_lab::testdb::TestDb::new().await.unwrap();
    let cli = crate::admin::Cli::new(&db);
    cli.ok(
        &[
            "app",
            "add",
            "--name",
            "a",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret-env",
            "DOCTOR_APP_SECRET",
        ],
        None,
    );
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            MAILBOX,
            "--app",
            "a",
        ],
        None,
    );
    // DOCTOR_APP_SECRET is not set in doctor's environment.
    let out = cli.run(&["doctor", "--pilot", MAILBOX], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("[FAIL] settings"), "{stdout}");
    let all = format!("{stdout}{stderr}");
    // The message once (it names the variable and the reference), not once per cause.
    assert_eq!(
        all.matches("environment variable DOCTOR_APP_SECRET")
            .count(),
        1,
        "printed once:\n{all}"
    );
    assert!(all.contains("is not set"), "{all}");
    assert!(stdout.contains("exit code 3"), "{stdout}");
}

#[tokio::test]
async fn aadsts500011_fix_depends_on_the_scope_in_use() {
    let s = sims().await;
    let refuse = || {
        s.entra.fail_next(
            1,
            TokenFailure::Aadsts {
                status: 400,
                error: "invalid_resource".to_owned(),
                code: 500011,
            },
        )
    };
    // The right scope already: the cause is the tenant, not the scope.
    refuse();
    let report = s
        .diagnose(&s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET)))
        .await;
    let (summary, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(summary.contains("AADSTS500011"), "{summary}");
    assert!(
        fix.contains("already https://outlook.office365.com/.default"),
        "{fix}"
    );
    assert!(
        fix.contains("Office 365 Exchange Online service principal"),
        "{fix}"
    );
    assert!(fix.contains(&format!("tenant {TENANT}")), "{fix}");
    assert!(
        !fix.contains("--scope"),
        "no advice to set the scope in use: {fix}"
    );

    // Another scope: set the right one.
    refuse();
    let mut app = s.app(TENANT, CLIENT, SECRET);
    app.key.scope = "https://graph.microsoft.com/.default".to_owned();
    let report = s.diagnose(&s.target(MAILBOX, app)).await;
    let (_, fix) = failed(&report, "token", Failure::TokenRefused);
    assert!(
        fix.contains("--scope https://outlook.office365.com/.default"),
        "{fix}"
    );
    assert!(
        fix.contains("https://graph.microsoft.com/.default"),
        "{fix}"
    );
}

#[tokio::test]
async fn tls_without_a_greeting_fails_fast_and_says_so() {
    let s = sims().await;
    s.pop.set_fault(Some(Fault::NoGreeting));
    let mut target = s.target(MAILBOX, s.app(TENANT, CLIENT, SECRET));
    // The command deadline stays long (60 s); the greeting's own deadline is what counts.
    assert!(target.server.timeouts.command >= Duration::from_secs(60));
    target.greeting_timeout = Duration::from_secs(1);
    // A generous bound: far below the 60 s doctor used to wait.
    let report = tokio::time::timeout(Duration::from_secs(30), s.diagnose(&target))
        .await
        .expect("doctor waited for the command deadline, not the greeting's");
    let (summary, fix) = failed(&report, "connect", Failure::Timeout);
    assert!(
        summary.contains(
            "accepted the TCP connection and the TLS handshake but never sent the POP3 greeting"
        ),
        "{summary}"
    );
    assert!(fix.contains("--greeting-timeout"), "{fix}");
    assert_eq!(report.exit_code(), 22);
}

#[test]
fn doctor_help_shows_only_the_flags_it_uses_each_with_help() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ccmail"))
        .args(["doctor", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    // Pilot settings doctor never uses.
    for unused in ["--poll-interval", "--keep-on-server", "--queue"] {
        assert!(!help.contains(unused), "{unused} shown:\n{help}");
    }
    for used in [
        "--greeting-timeout",
        "--login-retry-pause",
        "--retr",
        "--json",
        "--client-id",
    ] {
        assert!(help.contains(used), "{used} missing:\n{help}");
    }
    // `--help` puts each flag's description on the line below it.
    let lines: Vec<&str> = help.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("--") {
            let text = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
            assert!(!text.is_empty(), "no help text: {line}");
        }
    }
    // Doctor stores nothing: no wording from the commands that do.
    for stored in ["Store a reference", "sealed into the database"] {
        assert!(!help.contains(stored), "{stored:?} shown:\n{help}");
    }
}
