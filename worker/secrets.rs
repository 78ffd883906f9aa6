//! Secrets at rest: how client secrets and passwords are stored in PostgreSQL.
//!
//! A stored credential is one of these forms, and never plaintext:
//! - `enc:v2:<key id>:<base64 of nonce || ciphertext>`: AES-256-GCM under the operator's
//!   [`MasterKey`], with a random 96-bit nonce per seal. The associated data binds the
//!   `enc:v2:<key id>` header and the [`Owner`] of the row: for an app its authority, tenant,
//!   client id and credential kind; for a USER/PASS pilot the host, port, TLS mode and
//!   username its password is sent with. A value copied into another row, or left in a row
//!   whose binding fields changed without sealing it again, does not open
//!   ([`SecretError::SealedForAnother`]), so nothing is sent;
//! - `enc:v1:<key id>:<data>`: the older form, bound only to its header. It still opens, so
//!   upgrading loses nothing, but the worker never sends it: it seals every v1 value again as
//!   v2 for the row it is in ([`upgrade`]) before it reads the rows, and refuses one it could
//!   not upgrade (a value held by several rows is a copy, and is never upgraded);
//! - `env:NAME`: the secret is read from environment variable `NAME` when needed;
//! - `file:PATH`: the secret is read from the file at `PATH` when needed.
//!
//! Whoever may write an app or a pilot (through the CLI or straight into the database) does
//! not necessarily hold the master key, so a reference must not be able to name it. A
//! [`ReferencePolicy`] decides what references may name, and a [`CredentialPolicy`] adds where
//! a resolved credential may be sent; both come from the settings and are passed to every
//! resolver:
//! - `env:` never names ccmail's own namespace (`CCMAIL_*`: the settings and the master key)
//!   nor the database login (`DATABASE_URL`, libpq's `PG*`); `secrets.env_prefix` can narrow
//!   the allowed names further. That prefix must lie outside the reserved names: `CCMAIL_*`
//!   stays entirely ccmail's, so no future setting can ever be read as a secret;
//! - `file:` resolves (symlinks followed) to a regular file of at most
//!   [`MAX_SECRET_FILE_BYTES`] under `secrets.dir`; without that setting it is refused, and
//!   `/proc`, `/sys` and `/dev` are refused everywhere;
//! - an OAuth credential goes only to an authority in `oauth.allowed_authorities`, a token
//!   only to a POP3 host in `pop3.allowed_xoauth2_hosts`, and a POP3 login goes unencrypted
//!   (`dangerous_plaintext`) only to a loopback host unless the settings file sets
//!   `pop3.dangerous_allow_plaintext_to_remote_hosts`.
//!
//! References are not bound to their row: any row may name a variable or file the policy
//! allows. Keep one secret per variable or file and narrow the policy, or seal the secret.
//!
//! Invariants: no error message and no `Debug` output contains a secret, a key, or a stored
//! ciphertext; resolved secrets only ever exist as [`SecretString`]; no reference is resolved
//! without a policy, and no sealed value is opened without the owner it must belong to.
//! Randomness (keys, nonces) comes from the operating system's CSPRNG.

use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

/// Prefix of a sealed credential bound to its owner, before the key id.
const SEALED_V2: &str = "enc:v2:";
/// Prefix of the older sealed form, bound only to its header.
const SEALED_V1: &str = "enc:v1:";
/// Length of an AES-GCM nonce in bytes (96 bits).
const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag in bytes.
const TAG_LEN: usize = 16;
/// Length of a master key in bytes (AES-256).
pub const MASTER_KEY_LEN: usize = 32;
/// Largest secret file read: a client secret, or a PEM private key with its certificate
/// chain, is a few KiB.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Environment-variable prefixes no reference may name: ccmail's own settings and master key
/// (`CCMAIL_`), and libpq's connection settings and password (`PG`).
pub const RESERVED_ENV_PREFIXES: [&str; 2] = ["CCMAIL_", "PG"];
/// Environment variables no reference may name: the database URL with its password.
pub const RESERVED_ENV_NAMES: [&str; 1] = ["DATABASE_URL"];
/// File systems that describe processes, the kernel and devices: never a secret file.
const SPECIAL_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];
/// The token authorities of the Microsoft clouds that `ccmail app add --cloud` knows: global,
/// US Government (GCC High / DoD) and the one operated by 21Vianet.
pub const MICROSOFT_AUTHORITIES: [&str; 3] = [
    "https://login.microsoftonline.com",
    "https://login.microsoftonline.us",
    "https://login.partner.microsoftonline.cn",
];
/// The POP3 hosts of the same clouds: where an access token may be sent unless
/// `pop3.allowed_xoauth2_hosts` says otherwise.
pub const MICROSOFT_POP_HOSTS: [&str; 3] = [
    "outlook.office365.com",
    "outlook.office365.us",
    "partner.outlook.cn",
];

/// Why a secret could not be sealed, parsed or resolved. Messages name what is wrong and how
/// to fix it, and never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "master key is invalid: {reason}; a master key is 32 random bytes, given as base64 \
         (generate one with `ccmail key generate`)"
    )]
    InvalidKey { reason: String },
    #[error("cannot read master key file {path}: {source}; check the path and its permissions")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "stored credential is not in a recognised form; it must be `enc:v2:<key id>:<data>` \
         (sealed with the master key), `env:NAME` (read from an environment variable) or \
         `file:PATH` (read from a file). Plaintext secrets are refused: seal the secret or \
         store a reference instead"
    )]
    UnrecognisedForm,
    #[error("sealed credential is malformed: {reason}; seal the secret again")]
    MalformedSealed { reason: &'static str },
    #[error(
        "credential is sealed with master key {key_id} but no master key is configured; \
         configure the master key whose id is {key_id}"
    )]
    NoMasterKey { key_id: String },
    #[error(
        "credential is sealed with master key {expected} but the configured master key is \
         {configured}; configure the key with id {expected}, or rotate: re-seal every \
         credential from the old key to the new one, then switch keys"
    )]
    WrongKey {
        expected: String,
        configured: String,
    },
    #[error(
        "sealed credential (key {key_id}) failed authentication: it was altered or corrupted \
         in storage; seal the secret again"
    )]
    Tampered { key_id: String },
    #[error(
        "sealed credential (key {key_id}) does not open for this {owner}: it was sealed for \
         another {owner}, or for this one before its {fields} changed, or it was altered in \
         storage; nothing was sent. Store the secret again for this {owner}"
    )]
    SealedForAnother {
        key_id: String,
        owner: &'static str,
        fields: &'static str,
    },
    #[error(
        "credential sealed with key {key_id} is in the old form enc:v1, which is not bound to \
         its {owner}, and the worker could not seal it again as enc:v2 (its log says why; most \
         often the same sealed value is held by several rows, so all but one are copies); \
         nothing was sent. Store the secret again for this {owner}"
    )]
    UnboundSealed { key_id: String, owner: &'static str },
    #[error("sealed credential (key {key_id}) does not decrypt to UTF-8 text; seal it again")]
    NotUtf8 { key_id: String },
    #[error(
        "environment variable {name} named by the credential `env:{name}` is not set \
         (or is not valid UTF-8); set it in the worker's environment"
    )]
    EnvMissing { name: String },
    #[error(
        "cannot read secret file {path} named by the credential: {source}; check the path and its permissions"
    )]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is not valid UTF-8 text")]
    FileNotUtf8 { path: PathBuf },
    #[error("{origin} is empty; a secret cannot be empty")]
    Empty { origin: String },
    #[error(
        "`env:{name}` is refused: CCMAIL_* variables are ccmail's own settings and master key, \
         and DATABASE_URL and PG* hold the database login; keep the secret in a variable of its \
         own (for example SUPPORT_APP_SECRET) and name that one"
    )]
    EnvReserved { name: String },
    #[error(
        "`env:{name}` is refused: secrets.env_prefix allows only variables starting with {prefix}"
    )]
    EnvOutsidePrefix { name: String, prefix: String },
    #[error(
        "`file:{path}` is refused: no secrets directory is configured; set secrets.dir \
         (CCMAIL_SECRETS_DIR) to the directory that holds ccmail's secret files, or seal the \
         secret into the database instead"
    )]
    FileNoDir { path: PathBuf },
    #[error(
        "`file:{path}` is refused: it is not inside the secrets directory {dir} (symlinks are \
         followed); move the file there or change secrets.dir"
    )]
    FileOutsideDir { path: PathBuf, dir: PathBuf },
    #[error(
        "reading a secret from {path} is refused: files under /proc, /sys and /dev describe \
         processes and devices, never secrets"
    )]
    FileSpecial { path: PathBuf },
    #[error("secret file {path} is not a regular file")]
    FileNotRegular { path: PathBuf },
    #[error(
        "secret file {path} is larger than {} KiB; a secret or a PEM key is a few KiB",
        MAX_SECRET_FILE_BYTES / 1024
    )]
    FileTooLarge { path: PathBuf },
    #[error(
        "token authority {authority:?} is not in oauth.allowed_authorities ({allowed}); \
         credentials are sent only to an allowed authority: add it there (or to \
         CCMAIL_OAUTH_ALLOWED_AUTHORITIES) if it is your identity provider"
    )]
    AuthorityNotAllowed { authority: String, allowed: String },
    #[error(
        "token authority {authority:?} is not a plain https:// origin ({reason}); use a URL \
         like https://login.microsoftonline.com"
    )]
    BadAuthority {
        authority: String,
        reason: &'static str,
    },
    #[error(
        "plaintext POP3 (dangerous_plaintext) to {host} is refused: it sends the password or \
         token unencrypted, so it is allowed only to loopback hosts (127.0.0.1, ::1, \
         localhost) unless the settings file sets \
         pop3.dangerous_allow_plaintext_to_remote_hosts = true"
    )]
    PlaintextToRemoteHost { host: String },
    #[error(
        "XOAUTH2 to POP3 host {host:?} is refused: the tenant's access token opens every \
         mailbox the app may read, so it is sent only to a host in pop3.allowed_xoauth2_hosts \
         ({allowed}); add the host there (or to CCMAIL_POP3_ALLOWED_XOAUTH2_HOSTS) if it is \
         your Exchange server"
    )]
    XOAuth2HostNotAllowed { host: String, allowed: String },
    #[error("encryption failed; this is a bug in ccmail's use of AES-GCM")]
    SealFailed,
}

impl SecretError {
    /// The retry decision (see [`crate::model::retry`]): [`Retry::Slowly`] when the secret's file
    /// or variable may appear or become readable without a settings change (a missing or
    /// unreadable file, one that is not text, an empty value, an unset variable); [`Retry::Never`] for everything
    /// else: a wrong or missing key, a value sealed for another row, a policy refusal, which
    /// only new settings or a secret stored again fix.
    ///
    /// [`Retry::Slowly`]: crate::model::retry::Retry::Slowly
    /// [`Retry::Never`]: crate::model::retry::Retry::Never
    pub fn retry(&self) -> crate::model::retry::Retry {
        use crate::model::retry::Retry;
        match self {
            SecretError::KeyFile { .. }
            | SecretError::EnvMissing { .. }
            | SecretError::FileUnreadable { .. }
            | SecretError::FileNotUtf8 { .. }
            | SecretError::Empty { .. } => Retry::Slowly,
            SecretError::InvalidKey { .. }
            | SecretError::UnrecognisedForm
            | SecretError::MalformedSealed { .. }
            | SecretError::NoMasterKey { .. }
            | SecretError::WrongKey { .. }
            | SecretError::Tampered { .. }
            | SecretError::SealedForAnother { .. }
            | SecretError::UnboundSealed { .. }
            | SecretError::NotUtf8 { .. }
            | SecretError::EnvReserved { .. }
            | SecretError::EnvOutsidePrefix { .. }
            | SecretError::FileNoDir { .. }
            | SecretError::FileOutsideDir { .. }
            | SecretError::FileSpecial { .. }
            | SecretError::FileNotRegular { .. }
            | SecretError::FileTooLarge { .. }
            | SecretError::AuthorityNotAllowed { .. }
            | SecretError::BadAuthority { .. }
            | SecretError::PlaintextToRemoteHost { .. }
            | SecretError::XOAuth2HostNotAllowed { .. }
            | SecretError::SealFailed => Retry::Never,
        }
    }

    /// Whether a policy refused the reference or destination, or a sealed value does not
    /// belong to its row (as opposed to a key or a missing file being wrong): the fix is to
    /// store the credential again, or to change the settings the error names.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SecretError::EnvReserved { .. }
                | SecretError::EnvOutsidePrefix { .. }
                | SecretError::FileNoDir { .. }
                | SecretError::FileOutsideDir { .. }
                | SecretError::FileSpecial { .. }
                | SecretError::FileNotRegular { .. }
                | SecretError::FileTooLarge { .. }
                | SecretError::AuthorityNotAllowed { .. }
                | SecretError::BadAuthority { .. }
                | SecretError::PlaintextToRemoteHost { .. }
                | SecretError::XOAuth2HostNotAllowed { .. }
                | SecretError::SealedForAnother { .. }
                | SecretError::UnboundSealed { .. }
        )
    }
}

/// The operator's key that seals credentials at rest (AES-256-GCM).
///
/// `Debug` prints only the key id, never the key.
pub struct MasterKey {
    key: SecretBox<[u8; MASTER_KEY_LEN]>,
    id: String,
}

impl MasterKey {
    /// Builds a key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> MasterKey {
        let id = hex::encode(Sha256::digest(bytes))[..8].to_owned();
        MasterKey {
            key: SecretBox::new(Box::new(bytes)),
            id,
        }
    }

    /// Parses standard base64 text (surrounding whitespace ignored) of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<MasterKey, SecretError> {
        // The decoding error is not forwarded: it may quote the offending key characters.
        let decoded = BASE64
            .decode(text.trim())
            .map_err(|_| SecretError::InvalidKey {
                reason: "it is not valid base64".to_owned(),
            })?;
        let bytes: [u8; MASTER_KEY_LEN] =
            decoded
                .as_slice()
                .try_into()
                .map_err(|_| SecretError::InvalidKey {
                    reason: format!(
                        "it decodes to {} bytes, expected {MASTER_KEY_LEN}",
                        decoded.len()
                    ),
                })?;
        Ok(MasterKey::from_bytes(bytes))
    }

    /// Reads a key file: either exactly 32 raw bytes, or base64 text of 32 bytes.
    ///
    /// Base64 of 32 bytes is 44 characters, so the two forms cannot be confused.
    pub fn from_file(path: &Path) -> Result<MasterKey, SecretError> {
        let contents = std::fs::read(path).map_err(|source| SecretError::KeyFile {
            path: path.to_owned(),
            source,
        })?;
        if let Ok(raw) = <[u8; MASTER_KEY_LEN]>::try_from(contents.as_slice()) {
            return Ok(MasterKey::from_bytes(raw));
        }
        let text = std::str::from_utf8(&contents).map_err(|_| SecretError::InvalidKey {
            reason: format!(
                "file {} holds neither 32 raw bytes nor base64 text",
                path.display()
            ),
        })?;
        MasterKey::from_base64(text).map_err(|err| match err {
            SecretError::InvalidKey { reason } => SecretError::InvalidKey {
                reason: format!("file {}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Generates a fresh random key from the operating system's CSPRNG.
    pub fn generate() -> MasterKey {
        let key = Aes256Gcm::generate_key(OsRng);
        let mut bytes = [0u8; MASTER_KEY_LEN];
        bytes.copy_from_slice(&key);
        MasterKey::from_bytes(bytes)
    }

    /// The key's public identifier: the first 8 hex characters of SHA-256 of the key.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// The key as base64 text, for writing a freshly generated key to a file. Handle with care.
    pub fn to_base64(&self) -> SecretString {
        SecretString::from(BASE64.encode(self.key.expose_secret()))
    }

    fn cipher(&self) -> Aes256Gcm {
        let key: Key<Aes256Gcm> = (*self.key.expose_secret()).into();
        Aes256Gcm::new(&key)
    }

    /// Seals `plaintext` for `owner` as `enc:v2:<key id>:<base64 nonce||ciphertext>` with a
    /// fresh random nonce, so sealing the same secret twice gives different text. It opens
    /// only for an owner with the same binding ([`Owner`]).
    pub fn seal(&self, plaintext: &SecretString, owner: &Owner) -> Result<String, SecretError> {
        let header = format!("{SEALED_V2}{}", self.id);
        self.seal_with(&header, &owner.associated_data(&header), plaintext)
    }

    /// The older form, bound to its header only: what ccmail wrote before `enc:v2`. Kept so
    /// the upgrade from it can be tested (tests/it/store.rs); not for product code.
    #[doc(hidden)]
    pub fn seal_v1(&self, plaintext: &SecretString) -> Result<String, SecretError> {
        let header = format!("{SEALED_V1}{}", self.id);
        self.seal_with(&header, header.as_bytes(), plaintext)
    }

    fn seal_with(
        &self,
        header: &str,
        aad: &[u8],
        plaintext: &SecretString,
    ) -> Result<String, SecretError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad,
                },
            )
            .map_err(|_| SecretError::SealFailed)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        Ok(format!("{header}:{}", BASE64.encode(blob)))
    }

    /// Opens a sealed value; `owner` is the row it must belong to (v2 only: v1 values are
    /// bound to their header alone).
    fn open(
        &self,
        form: SealedForm,
        key_id: &str,
        blob: &[u8],
        owner: &Owner,
    ) -> Result<SecretString, SecretError> {
        if key_id != self.id {
            return Err(SecretError::WrongKey {
                expected: key_id.to_owned(),
                configured: self.id.clone(),
            });
        }
        // `SecretRef::Sealed` can be built by hand, so the length is checked here as well.
        let (nonce, ciphertext) =
            blob.split_at_checked(NONCE_LEN)
                .ok_or(SecretError::MalformedSealed {
                    reason: "the data is too short to hold a nonce and a tag",
                })?;
        let nonce: [u8; NONCE_LEN] =
            nonce.try_into().map_err(|_| SecretError::MalformedSealed {
                reason: "the data is too short to hold a nonce and a tag",
            })?;
        let header = format!("{}{key_id}", form.prefix());
        let aad = match form {
            SealedForm::V1 => header.as_bytes().to_vec(),
            SealedForm::V2 => owner.associated_data(&header),
        };
        let plain = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| match form {
                // Authentication binds the owner: failing it means "not this row as it is".
                SealedForm::V2 => SecretError::SealedForAnother {
                    key_id: key_id.to_owned(),
                    owner: owner.kind(),
                    fields: owner.bound_fields(),
                },
                SealedForm::V1 => SecretError::Tampered {
                    key_id: key_id.to_owned(),
                },
            })?;
        let text = String::from_utf8(plain).map_err(|_| SecretError::NotUtf8 {
            key_id: key_id.to_owned(),
        })?;
        Ok(SecretString::from(text))
    }
}

impl Clone for MasterKey {
    fn clone(&self) -> MasterKey {
        MasterKey {
            key: SecretBox::new(Box::new(*self.key.expose_secret())),
            id: self.id.clone(),
        }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// Which sealed form a value is in (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedForm {
    /// `enc:v1:`: bound to its header only.
    V1,
    /// `enc:v2:`: bound to its header and its [`Owner`].
    V2,
}

impl SealedForm {
    fn prefix(self) -> &'static str {
        match self {
            SealedForm::V1 => SEALED_V1,
            SealedForm::V2 => SEALED_V2,
        }
    }
}

/// The row a sealed credential belongs to, reduced to what decides where the credential is
/// sent: for an app, its token authority, tenant, client id and whether the credential is a
/// client secret or a certificate's private key; for a USER/PASS pilot, the host, port, TLS
/// mode and username its password goes with. An `enc:v2` value opens only for an owner equal
/// to the one it was sealed for. Fields are compared as the worker uses them: an authority as
/// its https origin, tenant and client id and host without regard to case (a host also
/// without a trailing dot or IPv6 brackets), the username exactly.
///
/// An app's row id is not part of it on purpose: two rows with the same authority, tenant and
/// client id are the same app registration, holding the same secret, and a database restored
/// elsewhere keeps working. A pilot's CA bundle is not either: it is a path whose file can
/// change without the row changing.
#[derive(Clone, PartialEq, Eq)]
pub struct Owner(OwnerKind);

#[derive(Clone, PartialEq, Eq)]
enum OwnerKind {
    App {
        authority: String,
        tenant: String,
        client_id: String,
        certificate: bool,
    },
    Pilot {
        host: String,
        port: u16,
        tls: crate::model::TlsMode,
        username: String,
    },
}

impl Owner {
    /// An OAuth app's client secret (`certificate` false) or certificate private key.
    pub fn app(authority: &str, tenant: &str, client_id: &str, certificate: bool) -> Owner {
        Owner(OwnerKind::App {
            authority: normalise_authority(authority)
                .unwrap_or_else(|_| authority.trim().to_ascii_lowercase()),
            tenant: tenant.trim().to_ascii_lowercase(),
            client_id: client_id.trim().to_ascii_lowercase(),
            certificate,
        })
    }

    /// A USER/PASS pilot's password.
    pub fn pilot(host: &str, port: u16, tls: crate::model::TlsMode, username: &str) -> Owner {
        Owner(OwnerKind::Pilot {
            host: normalise_host(host),
            port,
            tls,
            username: username.to_owned(),
        })
    }

    /// `app` or `pilot`, for messages.
    pub fn kind(&self) -> &'static str {
        match self.0 {
            OwnerKind::App { .. } => "app",
            OwnerKind::Pilot { .. } => "pilot",
        }
    }

    /// The fields a sealed value is bound to, in words.
    pub fn bound_fields(&self) -> &'static str {
        match self.0 {
            OwnerKind::App { .. } => "authority, tenant, client id or credential kind",
            OwnerKind::Pilot { .. } => "host, port, TLS mode or username",
        }
    }

    /// The associated data of an `enc:v2` value: its header, then each field with its length
    /// in front, so no two owners give the same bytes.
    fn associated_data(&self, header: &str) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, value: &[u8]) {
            let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(value);
        }
        let mut out = Vec::with_capacity(header.len() + 128);
        field(&mut out, header.as_bytes());
        match &self.0 {
            OwnerKind::App {
                authority,
                tenant,
                client_id,
                certificate,
            } => {
                field(&mut out, b"app");
                let kind: &[u8] = if *certificate {
                    b"certificate-private-key"
                } else {
                    b"client-secret"
                };
                field(&mut out, kind);
                field(&mut out, authority.as_bytes());
                field(&mut out, tenant.as_bytes());
                field(&mut out, client_id.as_bytes());
            }
            OwnerKind::Pilot {
                host,
                port,
                tls,
                username,
            } => {
                field(&mut out, b"pilot-password");
                field(&mut out, host.as_bytes());
                field(&mut out, &port.to_be_bytes());
                field(&mut out, tls.as_str().as_bytes());
                field(&mut out, username.as_bytes());
            }
        }
        out
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            OwnerKind::App {
                authority,
                tenant,
                client_id,
                certificate,
            } => f
                .debug_struct("App")
                .field("authority", authority)
                .field("tenant", tenant)
                .field("client_id", client_id)
                .field("certificate", certificate)
                .finish(),
            OwnerKind::Pilot {
                host,
                port,
                tls,
                username,
            } => f
                .debug_struct("Pilot")
                .field("host", host)
                .field("port", port)
                .field("tls", tls)
                .field("username", username)
                .finish(),
        }
    }
}

/// A host name as it is compared: trimmed, lower-case, without a trailing dot or the
/// brackets of an IPv6 literal.
pub fn normalise_host(host: &str) -> String {
    let host = host.trim().trim_end_matches('.');
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.to_ascii_lowercase()
}

/// A stored credential, parsed but not yet resolved.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// Sealed with the master key `key_id` in `form`; `blob` is nonce || ciphertext.
    Sealed {
        form: SealedForm,
        key_id: String,
        blob: Vec<u8>,
    },
    /// Read from the named environment variable.
    Env(String),
    /// Read from the file at this path.
    File(PathBuf),
}

impl SecretRef {
    /// Parses a stored credential. Anything that is not one of the recognised forms is
    /// refused, which is what keeps plaintext secrets out of the database.
    pub fn parse(stored: &str) -> Result<SecretRef, SecretError> {
        let sealed = [SealedForm::V2, SealedForm::V1]
            .into_iter()
            .find_map(|form| stored.strip_prefix(form.prefix()).map(|rest| (form, rest)));
        if let Some((form, rest)) = sealed {
            let (key_id, data) = rest.split_once(':').ok_or(SecretError::MalformedSealed {
                reason: "the key id is not followed by `:`",
            })?;
            if key_id.len() != 8 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(SecretError::MalformedSealed {
                    reason: "the key id is not 8 hex characters",
                });
            }
            let blob = BASE64
                .decode(data)
                .map_err(|_| SecretError::MalformedSealed {
                    reason: "the data is not valid base64",
                })?;
            if blob.len() < NONCE_LEN + TAG_LEN {
                return Err(SecretError::MalformedSealed {
                    reason: "the data is too short to hold a nonce and a tag",
                });
            }
            return Ok(SecretRef::Sealed {
                form,
                key_id: key_id.to_ascii_lowercase(),
                blob,
            });
        }
        if let Some(name) = stored.strip_prefix("env:") {
            let valid = name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if valid {
                return Ok(SecretRef::Env(name.to_owned()));
            }
            return Err(SecretError::UnrecognisedForm);
        }
        if let Some(path) = stored.strip_prefix("file:")
            && !path.is_empty()
        {
            return Ok(SecretRef::File(PathBuf::from(path)));
        }
        Err(SecretError::UnrecognisedForm)
    }

    /// Resolves the credential of `owner` to its secret, if `policy` allows it. `key` is
    /// needed only for sealed credentials, and an `enc:v2` value opens only for the owner it
    /// was sealed for. A single trailing newline (`\n` or `\r\n`) of an environment variable
    /// or file is removed, because editors and `echo` add one.
    pub fn resolve(
        &self,
        key: Option<&MasterKey>,
        policy: &ReferencePolicy,
        owner: &Owner,
    ) -> Result<SecretString, SecretError> {
        let SecretRef::Sealed { form, key_id, blob } = self else {
            return self.resolve_reference(policy);
        };
        let key = key.ok_or_else(|| SecretError::NoMasterKey {
            key_id: key_id.clone(),
        })?;
        non_empty(key.open(*form, key_id, blob, owner)?, || {
            format!("credential sealed with key {key_id}")
        })
    }

    /// Resolves an `env:` or `file:` reference, if `policy` allows it (a sealed value needs
    /// its owner: [`SecretRef::resolve`]).
    pub fn resolve_reference(&self, policy: &ReferencePolicy) -> Result<SecretString, SecretError> {
        policy.check(self)?;
        let secret = match self {
            SecretRef::Sealed { .. } => {
                return Err(SecretError::MalformedSealed {
                    reason: "a sealed credential opens only for the row it belongs to",
                });
            }
            SecretRef::Env(name) => {
                let value = std::env::var(name)
                    .map_err(|_| SecretError::EnvMissing { name: name.clone() })?;
                (trim_newline(value), format!("environment variable {name}"))
            }
            SecretRef::File(path) => {
                let dir = policy
                    .dir
                    .as_deref()
                    .ok_or_else(|| SecretError::FileNoDir { path: path.clone() })?;
                (
                    trim_newline(read_secret_file(path, Some(dir))?),
                    format!("secret file {}", path.display()),
                )
            }
        };
        non_empty(SecretString::from(secret.0), || secret.1)
    }

    /// Whether this is a sealed value (which needs the master key to open or move).
    pub fn is_sealed(&self) -> bool {
        matches!(self, SecretRef::Sealed { .. })
    }

    /// A description safe for logs and `Debug`: the form and key id / variable / path,
    /// never the data.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Sealed { form, key_id, .. } => {
                format!("{}{key_id}:<sealed>", form.prefix())
            }
            SecretRef::Env(name) => format!("env:{name}"),
            SecretRef::File(path) => format!("file:{}", path.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({})", self.describe())
    }
}

fn trim_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

fn non_empty(
    secret: SecretString,
    origin: impl FnOnce() -> String,
) -> Result<SecretString, SecretError> {
    if secret.expose_secret().is_empty() {
        return Err(SecretError::Empty { origin: origin() });
    }
    Ok(secret)
}

/// Resolves the stored credential of `owner` (see [`SecretRef`]) to the secret it stands
/// for, if `policy` allows the reference. Both sealed forms open; the worker resolves through
/// [`CredentialPolicy::resolve`], which can refuse `enc:v1`.
pub fn resolve(
    stored: &str,
    key: Option<&MasterKey>,
    policy: &ReferencePolicy,
    owner: &Owner,
) -> Result<SecretString, SecretError> {
    SecretRef::parse(stored)?.resolve(key, policy, owner)
}

/// Whether `name` is reserved: ccmail's own settings and master key, or the database login.
/// Compared without regard to case, so no spelling of a reserved name slips through.
pub fn is_reserved_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    RESERVED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
        || RESERVED_ENV_NAMES.iter().any(|n| upper == *n)
}

fn is_special(path: &Path) -> bool {
    SPECIAL_ROOTS.iter().any(|root| path.starts_with(root))
}

/// Reads a secret file, refusing what cannot be one: anything under `/proc`, `/sys` or `/dev`
/// (before and after resolving symlinks), anything outside `dir` when one is given (a relative
/// path is taken relative to it), anything that is not a regular file, and anything larger
/// than [`MAX_SECRET_FILE_BYTES`]. Used for `file:` references and for the CLI's
/// `--secret-file`, which seals what it reads.
pub fn read_secret_file(path: &Path, dir: Option<&Path>) -> Result<String, SecretError> {
    let unreadable = |source| SecretError::FileUnreadable {
        path: path.to_owned(),
        source,
    };
    let candidate = match dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    };
    if is_special(&candidate) {
        return Err(SecretError::FileSpecial {
            path: path.to_owned(),
        });
    }
    let real = std::fs::canonicalize(&candidate).map_err(unreadable)?;
    if is_special(&real) {
        return Err(SecretError::FileSpecial {
            path: path.to_owned(),
        });
    }
    if let Some(dir) = dir {
        let real_dir =
            std::fs::canonicalize(dir).map_err(|source| SecretError::FileUnreadable {
                path: dir.to_owned(),
                source,
            })?;
        if !real.starts_with(&real_dir) {
            return Err(SecretError::FileOutsideDir {
                path: path.to_owned(),
                dir: dir.to_owned(),
            });
        }
    }
    // Non-blocking, so a FIFO cannot hold the open (and the thread) until someone writes to
    // it; no symlink at the last step, so one swapped in after the checks fails instead. The
    // type and size are then checked on the opened file itself.
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(&real)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(SecretError::FileNotRegular {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    String::from_utf8(bytes).map_err(|_| SecretError::FileNotUtf8 {
        path: path.to_owned(),
    })
}

/// What a stored reference may name (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReferencePolicy {
    /// `file:` references must resolve to a regular file under this directory; without it,
    /// `file:` is refused.
    pub dir: Option<PathBuf>,
    /// When set, `env:` names must also start with this prefix.
    pub env_prefix: Option<String>,
}

impl ReferencePolicy {
    /// Whether `reference` may be resolved. Sealed credentials always may; `file:` is fully
    /// checked (symlinks, type, size) only when it is read.
    pub fn check(&self, reference: &SecretRef) -> Result<(), SecretError> {
        match reference {
            SecretRef::Sealed { .. } => Ok(()),
            SecretRef::Env(name) => self.check_env(name),
            SecretRef::File(path) => {
                let Some(dir) = &self.dir else {
                    return Err(SecretError::FileNoDir { path: path.clone() });
                };
                let candidate = if path.is_relative() {
                    dir.join(path)
                } else {
                    path.clone()
                };
                if is_special(&candidate) {
                    return Err(SecretError::FileSpecial { path: path.clone() });
                }
                Ok(())
            }
        }
    }

    /// Whether an `env:` reference may name `name`.
    pub fn check_env(&self, name: &str) -> Result<(), SecretError> {
        if is_reserved_env(name) {
            return Err(SecretError::EnvReserved {
                name: name.to_owned(),
            });
        }
        match &self.env_prefix {
            Some(prefix) if !name.starts_with(prefix.as_str()) => {
                Err(SecretError::EnvOutsidePrefix {
                    name: name.to_owned(),
                    prefix: prefix.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Where credentials may come from ([`ReferencePolicy`]) and where they may be sent: the token
/// authorities, the POP3 hosts an access token may go to, and whether a POP3 login may travel
/// unencrypted to a host that is not loopback. Built from the settings
/// ([`crate::config::Config::credential_policy`]) and passed to every resolver; the database
/// cannot change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPolicy {
    pub references: ReferencePolicy,
    /// Normalised origins (`https://host[:port]`) of the allowed token authorities.
    allowed_authorities: Vec<String>,
    /// Normalised ([`normalise_host`]) POP3 hosts an XOAUTH2 pilot may log in to.
    allowed_xoauth2_hosts: Vec<String>,
    /// `pop3.dangerous_allow_plaintext_to_remote_hosts`.
    pub plaintext_to_remote_hosts: bool,
    /// Whether `enc:v1` values (bound to no row) may be opened. The CLI and `ccmail doctor`
    /// open them, run by an operator who holds the key; the worker upgrades them to `enc:v2`
    /// first and then sets this to false, so it never sends one it could not upgrade.
    pub open_unbound_v1: bool,
}

impl Default for CredentialPolicy {
    /// Nothing configured: the Microsoft authorities and POP hosts, no secrets directory, no
    /// prefix, plaintext to loopback only.
    fn default() -> Self {
        CredentialPolicy {
            references: ReferencePolicy::default(),
            allowed_authorities: MICROSOFT_AUTHORITIES
                .iter()
                .map(|a| (*a).to_owned())
                .collect(),
            allowed_xoauth2_hosts: MICROSOFT_POP_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            plaintext_to_remote_hosts: false,
            open_unbound_v1: true,
        }
    }
}

impl CredentialPolicy {
    /// A policy allowing exactly these authorities (each checked and normalised), and the
    /// default XOAUTH2 hosts ([`CredentialPolicy::set_xoauth2_hosts`] changes them).
    pub fn with_authorities<I, S>(
        references: ReferencePolicy,
        authorities: I,
        plaintext_to_remote_hosts: bool,
    ) -> Result<CredentialPolicy, SecretError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let allowed_authorities = authorities
            .into_iter()
            .map(|a| normalise_authority(a.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CredentialPolicy {
            references,
            allowed_authorities,
            plaintext_to_remote_hosts,
            ..CredentialPolicy::default()
        })
    }

    /// Allows one more authority (a test's or the demo's simulator).
    pub fn allow_authority(&mut self, authority: &str) -> Result<(), SecretError> {
        let origin = normalise_authority(authority)?;
        if !self.allowed_authorities.contains(&origin) {
            self.allowed_authorities.push(origin);
        }
        Ok(())
    }

    /// The allowed authorities, normalised.
    pub fn allowed_authorities(&self) -> &[String] {
        &self.allowed_authorities
    }

    /// Allows exactly these POP3 hosts for XOAUTH2 (none: no XOAUTH2 pilot may log in).
    pub fn set_xoauth2_hosts<I, S>(&mut self, hosts: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.allowed_xoauth2_hosts = hosts
            .into_iter()
            .map(|h| normalise_host(h.as_ref()))
            .collect();
    }

    /// Allows one more POP3 host for XOAUTH2 (a test's or the demo's simulator).
    pub fn allow_xoauth2_host(&mut self, host: &str) {
        let host = normalise_host(host);
        if !self.allowed_xoauth2_hosts.contains(&host) {
            self.allowed_xoauth2_hosts.push(host);
        }
    }

    /// The POP3 hosts an access token may be sent to, normalised.
    pub fn allowed_xoauth2_hosts(&self) -> &[String] {
        &self.allowed_xoauth2_hosts
    }

    /// Whether a credential may be sent to the token endpoint under `authority`.
    pub fn check_authority(&self, authority: &str) -> Result<(), SecretError> {
        let refused = || SecretError::AuthorityNotAllowed {
            authority: authority.to_owned(),
            allowed: self.allowed_authorities.join(", "),
        };
        let origin = normalise_authority(authority).map_err(|_| refused())?;
        if self.allowed_authorities.contains(&origin) {
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// Whether an access token may be sent to the POP3 host `host` (compared as
    /// [`normalise_host`] gives it; names are not resolved).
    pub fn check_xoauth2_host(&self, host: &str) -> Result<(), SecretError> {
        if self.allowed_xoauth2_hosts.contains(&normalise_host(host)) {
            return Ok(());
        }
        Err(SecretError::XOAuth2HostNotAllowed {
            host: host.to_owned(),
            allowed: if self.allowed_xoauth2_hosts.is_empty() {
                "none".to_owned()
            } else {
                self.allowed_xoauth2_hosts.join(", ")
            },
        })
    }

    /// Whether a POP3 login may go to `host` in `tls` mode (only `dangerous_plaintext` is
    /// restricted).
    pub fn check_pop3_host(
        &self,
        host: &str,
        tls: crate::model::TlsMode,
    ) -> Result<(), SecretError> {
        if tls != crate::model::TlsMode::DangerousPlaintext
            || self.plaintext_to_remote_hosts
            || is_loopback_host(host)
        {
            return Ok(());
        }
        Err(SecretError::PlaintextToRemoteHost {
            host: host.to_owned(),
        })
    }

    /// Resolves the credential `stored` of `owner` under this policy's reference rules,
    /// refusing `enc:v1` unless [`CredentialPolicy::open_unbound_v1`] allows it.
    pub fn resolve(
        &self,
        stored: &str,
        key: Option<&MasterKey>,
        owner: &Owner,
    ) -> Result<SecretString, SecretError> {
        let parsed = SecretRef::parse(stored)?;
        if let SecretRef::Sealed {
            form: SealedForm::V1,
            key_id,
            ..
        } = &parsed
            && !self.open_unbound_v1
        {
            return Err(SecretError::UnboundSealed {
                key_id: key_id.clone(),
                owner: owner.kind(),
            });
        }
        parsed.resolve(key, &self.references, owner)
    }
}

/// `127.0.0.0/8`, `::1` (bracketed or not) and `localhost`: hosts whose traffic never leaves
/// the machine. Names are not resolved, so a DNS name pointing at loopback does not count.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `https://host[:port]` of an authority URL, lower-case, the default port left out; refused
/// when it is not a bare https origin (user info, query, fragment or a path beyond `/`).
pub fn normalise_authority(authority: &str) -> Result<String, SecretError> {
    let bad = |reason| SecretError::BadAuthority {
        authority: authority.to_owned(),
        reason,
    };
    let text = authority.trim();
    // Checked on the text as given too: URL parsing would quietly resolve `/x/../`.
    let rest = text
        .get(..8)
        .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
        .map(|_| text[8..].trim_end_matches('/'))
        .ok_or_else(|| bad("the scheme must be https"))?;
    if rest.contains(['/', '?', '#', '@', '\\']) {
        return Err(bad("it has a path, query, fragment or user information"));
    }
    let url = reqwest::Url::parse(text).map_err(|_| bad("it is not a URL"))?;
    if url.scheme() != "https" {
        return Err(bad("the scheme must be https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it carries user information"));
    }
    if url.query().is_some() || url.fragment().is_some() || !matches!(url.path(), "" | "/") {
        return Err(bad("it has a path, query or fragment"));
    }
    let host = url.host_str().ok_or_else(|| bad("it has no host"))?;
    Ok(match url.port() {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    })
}

/// Describes a stored credential for logs and `Debug` output without revealing it: the form
/// and key id, variable name or path. Text in no recognised form is described as such and
/// never echoed, since it may be a plaintext secret.
pub fn describe_stored(stored: &str) -> String {
    match SecretRef::parse(stored) {
        Ok(parsed) => parsed.describe(),
        Err(_) => "<unrecognised credential, hidden>".to_owned(),
    }
}

/// Key rotation: seals the credential of `owner` sealed with `old` again under `new`, as
/// `enc:v2` for `owner` (an `enc:v1` value is upgraded on the way, also one already under
/// `new`, so rotating to the current key upgrades every value). References (`env:`, `file:`)
/// and `enc:v2` values already under `new` are returned unchanged, so an interrupted rotation
/// can be run again.
pub fn reseal(
    stored: &str,
    old: &MasterKey,
    new: &MasterKey,
    owner: &Owner,
) -> Result<String, SecretError> {
    match SecretRef::parse(stored)? {
        SecretRef::Sealed {
            form: SealedForm::V2,
            key_id,
            ..
        } if key_id == new.key_id() => Ok(stored.to_owned()),
        sealed @ SecretRef::Sealed {
            form: SealedForm::V1,
            ..
        } if sealed_with(&sealed, new) => new.seal(&open_sealed(&sealed, new, owner)?, owner),
        sealed @ SecretRef::Sealed { .. } => new.seal(&open_sealed(&sealed, old, owner)?, owner),
        SecretRef::Env(_) | SecretRef::File(_) => Ok(stored.to_owned()),
    }
}

/// The upgrade of an `enc:v1` value sealed with `key` to `enc:v2` bound to `owner`, the row it
/// is in; `None` for anything else (a v2 value, a reference). A v1 value of another key is an
/// error naming that key.
pub fn upgrade(
    stored: &str,
    key: &MasterKey,
    owner: &Owner,
) -> Result<Option<String>, SecretError> {
    match SecretRef::parse(stored)? {
        sealed @ SecretRef::Sealed {
            form: SealedForm::V1,
            ..
        } => Ok(Some(key.seal(&open_sealed(&sealed, key, owner)?, owner)?)),
        _ => Ok(None),
    }
}

/// A sealed credential of `from` sealed again for `to` (an admin changed the row's bound
/// fields); references are returned unchanged, since they carry no ciphertext. Opening checks
/// that the value really belongs to `from`.
pub fn rebind(
    stored: &str,
    key: &MasterKey,
    from: &Owner,
    to: &Owner,
) -> Result<String, SecretError> {
    let parsed = SecretRef::parse(stored)?;
    if !parsed.is_sealed() {
        return Ok(stored.to_owned());
    }
    key.seal(&open_sealed(&parsed, key, from)?, to)
}

fn sealed_with(sealed: &SecretRef, key: &MasterKey) -> bool {
    matches!(sealed, SecretRef::Sealed { key_id, .. } if key_id == key.key_id())
}

fn open_sealed(
    sealed: &SecretRef,
    key: &MasterKey,
    owner: &Owner,
) -> Result<SecretString, SecretError> {
    sealed.resolve(Some(key), &ReferencePolicy::default(), owner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::io::Write;

    const SECRET: &str = "Qx8~very-secret-client-value_123";

    fn secret() -> SecretString {
        SecretString::from(SECRET.to_owned())
    }

    /// The pilot the tests' secrets belong to.
    fn owner() -> Owner {
        Owner::pilot(
            "pop.contoso.com",
            995,
            crate::model::TlsMode::Implicit,
            "support",
        )
    }

    /// Resolves as the credential of [`owner`].
    fn resolve(
        stored: &str,
        key: Option<&MasterKey>,
        policy: &ReferencePolicy,
    ) -> Result<SecretString, SecretError> {
        super::resolve(stored, key, policy, &owner())
    }

    /// Resolves `stored` as the credential of `owner`.
    fn resolve_for(
        stored: &str,
        key: &MasterKey,
        policy: &ReferencePolicy,
        owner: &Owner,
    ) -> Result<SecretString, SecretError> {
        super::resolve(stored, Some(key), policy, owner)
    }

    /// Resolves under the policy of an unconfigured worker.
    fn open(stored: &str, key: Option<&MasterKey>) -> Result<SecretString, SecretError> {
        resolve(stored, key, &ReferencePolicy::default())
    }

    fn in_dir(dir: &Path) -> ReferencePolicy {
        ReferencePolicy {
            dir: Some(dir.to_owned()),
            env_prefix: None,
        }
    }

    /// Asserts that neither Debug nor Display of `err` reveals the secret or the key.
    fn assert_clean(err: &SecretError, key: &MasterKey) {
        let key_b64 = key.to_base64().expose_secret().to_owned();
        for text in [format!("{err}"), format!("{err:?}")] {
            assert!(!text.contains(SECRET), "secret leaked: {text}");
            assert!(!text.contains(&key_b64), "key leaked: {text}");
        }
    }

    #[test]
    fn seal_then_resolve_round_trips_with_fresh_nonces() {
        let key = MasterKey::generate();
        let a = key.seal(&secret(), &owner()).unwrap();
        let b = key.seal(&secret(), &owner()).unwrap();
        assert!(a.starts_with(&format!("enc:v2:{}:", key.key_id())));
        assert_ne!(a, b, "each seal must use a fresh nonce");
        assert!(!a.contains(SECRET));
        assert_eq!(open(&a, Some(&key)).unwrap().expose_secret(), SECRET);
        assert_eq!(open(&b, Some(&key)).unwrap().expose_secret(), SECRET);
    }

    #[test]
    fn key_id_is_sha256_prefix_and_debug_shows_only_it() {
        let key = MasterKey::from_bytes([7u8; 32]);
        let expected = hex::encode(Sha256::digest([7u8; 32]));
        assert_eq!(key.key_id(), &expected[..8]);
        assert_eq!(format!("{key:?}"), format!("MasterKey({})", &expected[..8]));
        let b64 = key.to_base64().expose_secret().to_owned();
        assert!(!format!("{key:?}").contains(&b64));
    }

    #[test]
    fn from_base64_accepts_32_bytes_only() {
        let key = MasterKey::generate();
        let b64 = key.to_base64().expose_secret().to_owned();
        let again = MasterKey::from_base64(&format!("  {b64}\n")).unwrap();
        assert_eq!(again.key_id(), key.key_id());

        let short = BASE64.encode([1u8; 16]);
        let err = MasterKey::from_base64(&short).unwrap_err();
        assert!(err.to_string().contains("16 bytes, expected 32"), "{err}");
        assert!(!err.to_string().contains(&short));

        let err = MasterKey::from_base64("not base64 at all!").unwrap_err();
        assert!(matches!(err, SecretError::InvalidKey { .. }));
        // The command that makes one exists under this name.
        assert!(err.to_string().contains("`ccmail key generate`"), "{err}");
        assert!(!err.to_string().contains("not base64 at all"));
    }

    #[test]
    fn from_file_reads_raw_bytes_and_base64_text() {
        let dir = tempfile::tempdir().unwrap();
        let raw_path = dir.path().join("raw.key");
        std::fs::write(&raw_path, [9u8; 32]).unwrap();
        assert_eq!(
            MasterKey::from_file(&raw_path).unwrap().key_id(),
            MasterKey::from_bytes([9u8; 32]).key_id()
        );

        let text_path = dir.path().join("text.key");
        let mut file = std::fs::File::create(&text_path).unwrap();
        writeln!(file, "{}", BASE64.encode([9u8; 32])).unwrap();
        assert_eq!(
            MasterKey::from_file(&text_path).unwrap().key_id(),
            MasterKey::from_bytes([9u8; 32]).key_id()
        );

        let bad_path = dir.path().join("bad.key");
        std::fs::write(&bad_path, b"too short").unwrap();
        let err = MasterKey::from_file(&bad_path).unwrap_err();
        assert!(err.to_string().contains("bad.key"), "{err}");

        let missing = dir.path().join("missing.key");
        let err = MasterKey::from_file(&missing).unwrap_err();
        assert!(matches!(err, SecretError::KeyFile { .. }));
        assert!(err.to_string().contains("missing.key"), "{err}");
    }

    #[test]
    fn wrong_key_names_the_expected_key_id_and_rotation() {
        let key = MasterKey::generate();
        let other = MasterKey::generate();
        let sealed = key.seal(&secret(), &owner()).unwrap();
        let err = open(&sealed, Some(&other)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(key.key_id()), "{text}");
        assert!(text.contains(other.key_id()), "{text}");
        assert!(text.contains("rotate"), "{text}");
        assert_clean(&err, &key);

        let err = open(&sealed, None).unwrap_err();
        assert!(matches!(err, SecretError::NoMasterKey { .. }));
        assert!(err.to_string().contains(key.key_id()));
        assert_clean(&err, &key);
    }

    #[test]
    fn tampered_ciphertext_and_header_are_detected() {
        let key = MasterKey::generate();
        // A bound value that fails authentication does not belong to this row as it is: the
        // error says so, and names tampering as one cause; the old form says "altered".
        for (sealed, tampered_error) in [
            (
                key.seal(&secret(), &owner()).unwrap(),
                "SealedForAnother" as &str,
            ),
            (key.seal_v1(&secret()).unwrap(), "Tampered"),
        ] {
            let (head, data) = sealed.rsplit_once(':').unwrap();
            let mut blob = BASE64.decode(data).unwrap();
            let last = blob.len() - 1;
            blob[last] ^= 0x01;
            let tampered = format!("{head}:{}", BASE64.encode(&blob));
            let err = open(&tampered, Some(&key)).unwrap_err();
            assert!(format!("{err:?}").starts_with(tampered_error), "{err:?}");
            assert!(err.to_string().contains("altered"), "{err}");
            assert_clean(&err, &key);

            // Flip a nonce byte too: the nonce is authenticated through the tag.
            let mut blob = BASE64.decode(data).unwrap();
            blob[0] ^= 0x80;
            let tampered = format!("{head}:{}", BASE64.encode(&blob));
            let err = open(&tampered, Some(&key)).unwrap_err();
            assert!(format!("{err:?}").starts_with(tampered_error), "{err:?}");

            // The form is authenticated too: a v1 value relabelled v2 (or back) does not open.
            let other = if head.starts_with("enc:v2:") {
                sealed.replacen("enc:v2:", "enc:v1:", 1)
            } else {
                sealed.replacen("enc:v1:", "enc:v2:", 1)
            };
            assert!(open(&other, Some(&key)).is_err());
        }
        let sealed = key.seal(&secret(), &owner()).unwrap();
        let (head, _) = sealed.rsplit_once(':').unwrap();

        let err = open(&format!("{head}:AAAA"), Some(&key)).unwrap_err();
        assert!(
            matches!(err, SecretError::MalformedSealed { .. }),
            "{err:?}"
        );
        let err = open(&format!("{head}:@@@"), Some(&key)).unwrap_err();
        assert!(
            matches!(err, SecretError::MalformedSealed { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn plaintext_and_unknown_forms_are_refused_without_echo() {
        let key = MasterKey::generate();
        for stored in [
            SECRET,
            "",
            "env:",
            "env:1BAD",
            "env:HAS SPACE",
            "file:",
            "enc:v3:abcd",
            "plain:secret",
        ] {
            let err = SecretRef::parse(stored).unwrap_err();
            let text = err.to_string();
            // "env:" and "file:" are part of the help text itself.
            if !["", "env:", "file:"].contains(&stored) {
                assert!(!text.contains(stored), "echoed {stored:?}: {text}");
            }
            {
                assert!(matches!(err, SecretError::UnrecognisedForm), "{stored:?}");
                assert!(text.contains("env:NAME") && text.contains("file:PATH"));
                assert!(text.contains("Plaintext secrets are refused"));
            }
            assert_clean(&err, &key);
        }
        assert!(matches!(
            SecretRef::parse("enc:v1:zzzzzzzz:AAAA"),
            Err(SecretError::MalformedSealed { .. })
        ));
        assert!(matches!(
            SecretRef::parse("enc:v1:nocolon"),
            Err(SecretError::MalformedSealed { .. })
        ));
        assert_eq!(describe_stored(SECRET), "<unrecognised credential, hidden>");
    }

    #[test]
    fn env_reference_resolves_trims_newline_and_names_missing_variable() {
        // `set_var` is unsafe in edition 2024 and the crate forbids unsafe code, so the test
        // uses a variable that is certainly absent and one that is certainly present.
        let name = format!("ITEST_SECRET_{}", std::process::id());
        let err = open(&format!("env:{name}_MISSING"), None).unwrap_err();
        assert!(matches!(err, SecretError::EnvMissing { .. }));
        assert!(err.to_string().contains(&format!("{name}_MISSING")));

        // PATH is set in every test environment; it proves the lookup, and a trailing
        // newline is never part of PATH.
        let path_value = std::env::var("PATH").unwrap();
        assert_eq!(open("env:PATH", None).unwrap().expose_secret(), path_value);
        assert_eq!(trim_newline(format!("{SECRET}\n")), SECRET);
        assert_eq!(trim_newline(format!("{SECRET}\r\n")), SECRET);
        assert_eq!(trim_newline(format!("{SECRET}\n\n")), format!("{SECRET}\n"));
    }

    #[test]
    fn file_reference_resolves_trims_newline_and_names_unreadable_path() {
        let dir = tempfile::tempdir().unwrap();
        let policy = in_dir(dir.path());
        let path = dir.path().join("client-secret");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        let stored = format!("file:{}", path.display());
        assert_eq!(
            resolve(&stored, None, &policy).unwrap().expose_secret(),
            SECRET
        );
        // Relative paths are inside the secrets directory.
        assert_eq!(
            resolve("file:client-secret", None, &policy)
                .unwrap()
                .expose_secret(),
            SECRET
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = resolve(&format!("file:{}", empty.display()), None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }), "{err:?}");

        let missing = dir.path().join("nope");
        let err = resolve(&format!("file:{}", missing.display()), None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileUnreadable { .. }));
        assert!(err.to_string().contains(&missing.display().to_string()));

        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let err = resolve(&format!("file:{}", binary.display()), None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileNotUtf8 { .. }));
    }

    #[test]
    fn file_references_stay_inside_the_secrets_dir_and_never_read_special_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("secrets");
        std::fs::create_dir(&dir).unwrap();
        let outside = root.path().join("elsewhere");
        std::fs::write(&outside, SECRET).unwrap();
        let policy = in_dir(&dir);

        // No directory configured: refused before the file system is touched, with the fix.
        let err = open(&format!("file:{}", outside.display()), None).unwrap_err();
        assert!(matches!(err, SecretError::FileNoDir { .. }), "{err:?}");
        assert!(err.to_string().contains("secrets.dir"), "{err}");

        for stored in [
            format!("file:{}", outside.display()),
            format!("file:{}/../elsewhere", dir.display()),
            "file:../elsewhere".to_owned(),
        ] {
            let err = resolve(&stored, None, &policy).unwrap_err();
            assert!(
                matches!(err, SecretError::FileOutsideDir { .. }),
                "{stored}: {err:?}"
            );
            assert!(err.is_refusal());
        }
        // A symlink inside the directory is followed before the check.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = resolve("file:link", None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileOutsideDir { .. }), "{err:?}");
        std::os::unix::fs::symlink("/proc/self/environ", dir.join("environ")).unwrap();
        let err = resolve("file:environ", None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileSpecial { .. }), "{err:?}");

        // /proc, /sys and /dev are refused even if the directory were one of them.
        let everywhere = in_dir(Path::new("/"));
        for path in [
            "/proc/self/environ",
            "/proc/1/environ",
            "/sys/kernel/hostname",
            "/dev/zero",
        ] {
            let err = resolve(&format!("file:{path}"), None, &everywhere).unwrap_err();
            assert!(
                matches!(err, SecretError::FileSpecial { .. }),
                "{path}: {err:?}"
            );
        }
        let err = read_secret_file(Path::new("/proc/self/environ"), None).unwrap_err();
        assert!(matches!(err, SecretError::FileSpecial { .. }), "{err:?}");

        // Only a regular file, and only a small one.
        std::fs::create_dir(dir.join("sub")).unwrap();
        let err = resolve("file:sub", None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileNotRegular { .. }), "{err:?}");
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = resolve("file:fifo", None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileNotRegular { .. }), "{err:?}");
        std::fs::write(
            dir.join("big"),
            vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1],
        )
        .unwrap();
        let err = resolve("file:big", None, &policy).unwrap_err();
        assert!(matches!(err, SecretError::FileTooLarge { .. }), "{err:?}");
        std::fs::write(dir.join("ok"), format!("{SECRET}\n")).unwrap();
        assert_eq!(
            resolve("file:ok", None, &policy).unwrap().expose_secret(),
            SECRET
        );
    }

    #[test]
    fn env_references_never_name_ccmail_settings_or_the_database_login() {
        let policy = ReferencePolicy::default();
        for name in [
            "CCMAIL_MASTER_KEY",
            "CCMAIL_SECRETS_MASTER_KEY_FILE",
            "ccmail_master_key",
            "DATABASE_URL",
            "PGPASSWORD",
            "PGPASSFILE",
        ] {
            let err = resolve(&format!("env:{name}"), None, &policy).unwrap_err();
            assert!(matches!(err, SecretError::EnvReserved { .. }), "{name}");
            assert!(err.is_refusal());
            assert!(err.to_string().contains(&format!("env:{name}")), "{err}");
        }
        let narrowed = ReferencePolicy {
            dir: None,
            env_prefix: Some("MAILSECRET_".to_owned()),
        };
        let err = resolve("env:PATH", None, &narrowed).unwrap_err();
        assert!(
            matches!(err, SecretError::EnvOutsidePrefix { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("MAILSECRET_"), "{err}");
        // The prefix narrows; it never reopens a reserved name.
        let reopening = ReferencePolicy {
            dir: None,
            env_prefix: Some("CCMAIL_".to_owned()),
        };
        let err = resolve("env:CCMAIL_MASTER_KEY", None, &reopening).unwrap_err();
        assert!(matches!(err, SecretError::EnvReserved { .. }), "{err:?}");
    }

    #[test]
    fn credentials_go_only_to_allowed_authorities_and_plaintext_only_to_loopback() {
        use crate::model::TlsMode;
        let policy = CredentialPolicy::default();
        for ok in [
            "https://login.microsoftonline.com",
            "https://login.microsoftonline.com/",
            "https://LOGIN.microsoftonline.com:443",
            "https://login.microsoftonline.us",
            "https://login.partner.microsoftonline.cn",
        ] {
            assert!(policy.check_authority(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://login.attacker.example",
            "https://login.microsoftonline.com.attacker.example",
            "https://login.microsoftonline.com@attacker.example",
            "https://user:pw@login.microsoftonline.com",
            "https://login.microsoftonline.com:8443",
            "https://login.microsoftonline.com/x/../../",
            "https://login.microsoftonline.com?x=1",
            "http://login.microsoftonline.com",
            "login.microsoftonline.com",
        ] {
            let err = policy.check_authority(bad).unwrap_err();
            assert!(
                matches!(err, SecretError::AuthorityNotAllowed { .. }),
                "{bad}"
            );
            assert!(
                err.to_string().contains("oauth.allowed_authorities"),
                "{err}"
            );
        }
        let mut sim = policy.clone();
        sim.allow_authority("https://127.0.0.1:4431").unwrap();
        assert!(sim.check_authority("https://127.0.0.1:4431/").is_ok());
        assert!(sim.check_authority("https://127.0.0.1:4432").is_err());
        assert!(normalise_authority("https://h/path").is_err());

        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST.",
        ] {
            assert!(
                policy
                    .check_pop3_host(host, TlsMode::DangerousPlaintext)
                    .is_ok(),
                "{host}"
            );
        }
        for host in [
            "pop.contoso.com",
            "10.0.0.1",
            "localhost.attacker.example",
            "::2",
        ] {
            let err = policy
                .check_pop3_host(host, TlsMode::DangerousPlaintext)
                .unwrap_err();
            assert!(
                matches!(err, SecretError::PlaintextToRemoteHost { .. }),
                "{host}"
            );
            assert!(policy.check_pop3_host(host, TlsMode::Implicit).is_ok());
            assert!(policy.check_pop3_host(host, TlsMode::StartTls).is_ok());
        }
        let open_policy = CredentialPolicy {
            plaintext_to_remote_hosts: true,
            ..CredentialPolicy::default()
        };
        assert!(
            open_policy
                .check_pop3_host("pop.contoso.com", TlsMode::DangerousPlaintext)
                .is_ok()
        );
    }

    #[test]
    fn reseal_moves_a_credential_to_the_new_key_bound_to_its_owner() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let sealed = old.seal(&secret(), &owner()).unwrap();
        let moved = reseal(&sealed, &old, &new, &owner()).unwrap();
        assert!(moved.starts_with(&format!("enc:v2:{}:", new.key_id())));
        assert_eq!(open(&moved, Some(&new)).unwrap().expose_secret(), SECRET);
        assert!(matches!(
            open(&moved, Some(&old)),
            Err(SecretError::WrongKey { .. })
        ));
        // Idempotent: already under the new key, unchanged.
        assert_eq!(reseal(&moved, &old, &new, &owner()).unwrap(), moved);
        // References carry no ciphertext.
        assert_eq!(reseal("env:X", &old, &new, &owner()).unwrap(), "env:X");
        assert_eq!(reseal("file:/x", &old, &new, &owner()).unwrap(), "file:/x");
        // Sealed with a third key: error names that key.
        let third = MasterKey::generate();
        let foreign = third.seal(&secret(), &owner()).unwrap();
        let err = reseal(&foreign, &old, &new, &owner()).unwrap_err();
        assert!(err.to_string().contains(third.key_id()));
        // A value copied from another row does not move: it does not open for this owner.
        let elsewhere = Owner::pilot(
            "pop.attacker.example",
            995,
            crate::model::TlsMode::Implicit,
            "support",
        );
        let copied = old.seal(&secret(), &elsewhere).unwrap();
        let err = reseal(&copied, &old, &new, &owner()).unwrap_err();
        assert!(
            matches!(err, SecretError::SealedForAnother { .. }),
            "{err:?}"
        );

        // The old form comes out bound, under the new key and under the same one.
        let v1 = old.seal_v1(&secret()).unwrap();
        for (to, key) in [(&new, &new), (&old, &old)] {
            let upgraded = reseal(&v1, &old, to, &owner()).unwrap();
            assert!(upgraded.starts_with(&format!("enc:v2:{}:", key.key_id())));
            assert_eq!(open(&upgraded, Some(key)).unwrap().expose_secret(), SECRET);
            assert!(
                super::resolve(
                    &upgraded,
                    Some(key),
                    &ReferencePolicy::default(),
                    &elsewhere
                )
                .is_err()
            );
        }
    }

    #[test]
    fn sealed_values_open_only_for_the_owner_they_were_sealed_for() {
        use crate::model::TlsMode;
        let key = MasterKey::generate();
        let policy = ReferencePolicy::default();
        let opens = |sealed: &str, owner: &Owner| resolve_for(sealed, &key, &policy, owner);

        let pilot = Owner::pilot("pop.contoso.com", 995, TlsMode::Implicit, "support");
        let sealed = key.seal(&secret(), &pilot).unwrap();
        assert_eq!(opens(&sealed, &pilot).unwrap().expose_secret(), SECRET);
        // Spelled differently, the same destination.
        for same in [
            Owner::pilot("POP.Contoso.com.", 995, TlsMode::Implicit, "support"),
            Owner::pilot(" pop.contoso.com", 995, TlsMode::Implicit, "support"),
        ] {
            assert_eq!(same, pilot);
            assert_eq!(opens(&sealed, &same).unwrap().expose_secret(), SECRET);
        }
        // Any bound field changed: another destination, refused with the fix.
        for other in [
            Owner::pilot("pop.attacker.example", 995, TlsMode::Implicit, "support"),
            Owner::pilot("pop.contoso.com", 1995, TlsMode::Implicit, "support"),
            Owner::pilot("pop.contoso.com", 995, TlsMode::StartTls, "support"),
            Owner::pilot("pop.contoso.com", 995, TlsMode::Implicit, "Support"),
            Owner::app(
                "https://login.microsoftonline.com",
                "pop.contoso.com",
                "support",
                false,
            ),
        ] {
            assert_ne!(other, pilot);
            let err = opens(&sealed, &other).unwrap_err();
            assert!(
                matches!(err, SecretError::SealedForAnother { .. }),
                "{other:?}: {err:?}"
            );
            assert!(err.is_refusal());
            let text = err.to_string();
            assert!(
                text.contains(&format!("sealed for another {}", other.kind()))
                    && text.contains("Store the secret again"),
                "{text}"
            );
            assert_clean(&err, &key);
        }

        let app = Owner::app(
            "https://login.microsoftonline.com",
            "Contoso.com",
            "CID",
            false,
        );
        let sealed = key.seal(&secret(), &app).unwrap();
        for same in [
            Owner::app(
                "https://LOGIN.microsoftonline.com/",
                "contoso.com",
                "cid",
                false,
            ),
            Owner::app(
                "https://login.microsoftonline.com:443",
                "contoso.com ",
                "cid",
                false,
            ),
        ] {
            assert_eq!(opens(&sealed, &same).unwrap().expose_secret(), SECRET);
        }
        for other in [
            Owner::app(
                "https://login.microsoftonline.us",
                "contoso.com",
                "cid",
                false,
            ),
            Owner::app(
                "https://login.microsoftonline.com",
                "fabrikam.com",
                "cid",
                false,
            ),
            Owner::app(
                "https://login.microsoftonline.com",
                "contoso.com",
                "cid-2",
                false,
            ),
            // A certificate's private key is never sent as a client secret, nor the reverse.
            Owner::app(
                "https://login.microsoftonline.com",
                "contoso.com",
                "cid",
                true,
            ),
        ] {
            let err = opens(&sealed, &other).unwrap_err();
            assert!(
                err.to_string().contains("sealed for another app"),
                "{other:?}: {err}"
            );
        }
        // Length-prefixed fields: moving text between fields gives another owner.
        assert_ne!(
            Owner::app("https://h", "ab", "c", false).associated_data("x"),
            Owner::app("https://h", "a", "bc", false).associated_data("x")
        );
    }

    #[test]
    fn the_old_form_opens_and_is_upgraded_but_the_worker_policy_never_sends_it() {
        use crate::model::TlsMode;
        let key = MasterKey::generate();
        let pilot = Owner::pilot("pop.contoso.com", 995, TlsMode::Implicit, "support");
        let elsewhere = Owner::pilot("pop.attacker.example", 995, TlsMode::Implicit, "support");
        let v1 = key.seal_v1(&secret()).unwrap();
        assert!(v1.starts_with(&format!("enc:v1:{}:", key.key_id())));
        assert_eq!(
            describe_stored(&v1),
            format!("enc:v1:{}:<sealed>", key.key_id())
        );
        // Unbound: it opens for any owner (what the upgrade is for).
        let references = ReferencePolicy::default();
        for owner in [&pilot, &elsewhere] {
            let opened = resolve_for(&v1, &key, &references, owner).unwrap();
            assert_eq!(opened.expose_secret(), SECRET);
        }
        // The worker's policy refuses it, naming the fix; the CLI's (the default) opens it.
        let worker = CredentialPolicy {
            open_unbound_v1: false,
            ..CredentialPolicy::default()
        };
        let err = worker.resolve(&v1, Some(&key), &pilot).unwrap_err();
        assert!(matches!(err, SecretError::UnboundSealed { .. }), "{err:?}");
        assert!(err.is_refusal());
        assert!(err.to_string().contains("Store the secret again"), "{err}");
        assert_clean(&err, &key);
        assert!(
            CredentialPolicy::default()
                .resolve(&v1, Some(&key), &pilot)
                .is_ok()
        );

        // The upgrade binds it to the row it is in; v2 values and references are left alone.
        let upgraded = upgrade(&v1, &key, &pilot).unwrap().unwrap();
        assert!(upgraded.starts_with(&format!("enc:v2:{}:", key.key_id())));
        let opened = worker.resolve(&upgraded, Some(&key), &pilot).unwrap();
        assert_eq!(opened.expose_secret(), SECRET);
        assert!(matches!(
            worker.resolve(&upgraded, Some(&key), &elsewhere),
            Err(SecretError::SealedForAnother { .. })
        ));
        assert_eq!(upgrade(&upgraded, &key, &pilot).unwrap(), None);
        assert_eq!(upgrade("env:SUPPORT_PASSWORD", &key, &pilot).unwrap(), None);
        // Sealed with another key: the error names it, nothing is written.
        let other = MasterKey::generate();
        let err = upgrade(&other.seal_v1(&secret()).unwrap(), &key, &pilot).unwrap_err();
        assert!(err.to_string().contains(other.key_id()), "{err}");

        // Moving a value to changed fields opens it for the old ones first: a copy from
        // another row cannot be laundered by an update.
        let moved = rebind(&upgraded, &key, &pilot, &elsewhere).unwrap();
        assert!(resolve_for(&moved, &key, &references, &elsewhere).is_ok());
        assert!(resolve_for(&moved, &key, &references, &pilot).is_err());
        let err = rebind(&moved, &key, &pilot, &elsewhere).unwrap_err();
        assert!(
            matches!(err, SecretError::SealedForAnother { .. }),
            "{err:?}"
        );
        assert_eq!(
            rebind("env:SUPPORT_PASSWORD", &key, &pilot, &elsewhere).unwrap(),
            "env:SUPPORT_PASSWORD"
        );
    }

    #[test]
    fn tokens_go_only_to_the_allowed_pop3_hosts() {
        let mut policy = CredentialPolicy::default();
        for host in [
            "outlook.office365.com",
            "OUTLOOK.office365.com.",
            "outlook.office365.us",
            "partner.outlook.cn",
        ] {
            assert!(policy.check_xoauth2_host(host).is_ok(), "{host}");
        }
        for host in [
            "127.0.0.1",
            "outlook.office365.com.attacker.example",
            "pop.contoso.com",
            "outlook.office365.co",
        ] {
            let err = policy.check_xoauth2_host(host).unwrap_err();
            assert!(
                matches!(err, SecretError::XOAuth2HostNotAllowed { .. }),
                "{host}"
            );
            assert!(err.is_refusal());
            let text = err.to_string();
            assert!(
                text.contains("pop3.allowed_xoauth2_hosts") && text.contains(host),
                "{text}"
            );
        }
        policy.allow_xoauth2_host("[::1]");
        assert!(policy.check_xoauth2_host("::1").is_ok());
        policy.set_xoauth2_hosts(["pop.contoso.com"]);
        assert!(policy.check_xoauth2_host("pop.contoso.com").is_ok());
        assert!(policy.check_xoauth2_host("outlook.office365.com").is_err());
        policy.set_xoauth2_hosts(Vec::<String>::new());
        let err = policy.check_xoauth2_host("pop.contoso.com").unwrap_err();
        assert!(err.to_string().contains("(none)"), "{err}");
    }

    #[test]
    fn debug_of_refs_never_shows_ciphertext() {
        let key = MasterKey::generate();
        let sealed = key.seal(&secret(), &owner()).unwrap();
        let data = sealed.rsplit_once(':').unwrap().1;
        let parsed = SecretRef::parse(&sealed).unwrap();
        let debug = format!("{parsed:?}");
        assert!(!debug.contains(data), "{debug}");
        assert!(debug.contains(key.key_id()));
        assert_eq!(
            describe_stored(&sealed),
            format!("enc:v2:{}:<sealed>", key.key_id())
        );
        assert_eq!(describe_stored("env:CLIENT_SECRET"), "env:CLIENT_SECRET");
    }

    #[test]
    fn every_error_variant_is_free_of_secret_material() {
        let key = MasterKey::generate();
        let errors = vec![
            SecretError::InvalidKey { reason: "x".into() },
            SecretError::KeyFile {
                path: "/k".into(),
                source: std::io::Error::other("denied"),
            },
            SecretError::UnrecognisedForm,
            SecretError::MalformedSealed { reason: "r" },
            SecretError::NoMasterKey {
                key_id: key.key_id().into(),
            },
            SecretError::WrongKey {
                expected: "00000000".into(),
                configured: key.key_id().into(),
            },
            SecretError::Tampered {
                key_id: key.key_id().into(),
            },
            SecretError::NotUtf8 {
                key_id: key.key_id().into(),
            },
            SecretError::EnvMissing { name: "N".into() },
            SecretError::FileUnreadable {
                path: "/p".into(),
                source: std::io::Error::other("gone"),
            },
            SecretError::FileNotUtf8 { path: "/p".into() },
            SecretError::Empty { origin: "o".into() },
            SecretError::EnvReserved { name: "N".into() },
            SecretError::FileOutsideDir {
                path: "/p".into(),
                dir: "/d".into(),
            },
            SecretError::SealedForAnother {
                key_id: key.key_id().into(),
                owner: "pilot",
                fields: "host",
            },
            SecretError::UnboundSealed {
                key_id: key.key_id().into(),
                owner: "app",
            },
            SecretError::XOAuth2HostNotAllowed {
                host: "h".into(),
                allowed: "a".into(),
            },
            SecretError::SealFailed,
        ];
        for err in &errors {
            assert_clean(err, &key);
        }
    }
}
