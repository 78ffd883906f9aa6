//! Secrets at rest: how client secrets and passwords are stored in PostgreSQL.
//!
//! A stored credential is one of three forms, and never plaintext:
//! - `enc:v1:<key id>:<base64 of nonce || ciphertext>`: AES-256-GCM under the operator's
//!   [`MasterKey`], with a random 96-bit nonce per seal; the `enc:v1:<key id>` prefix is bound
//!   as associated data, so editing the header is detected like editing the ciphertext;
//! - `env:NAME`: the secret is read from environment variable `NAME` when needed;
//! - `file:PATH`: the secret is read from the file at `PATH` when needed.
//!
//! Invariants: no error message and no `Debug` output contains a secret, a key, or a stored
//! ciphertext; resolved secrets only ever exist as [`SecretString`]. Randomness (keys, nonces)
//! comes from the operating system's CSPRNG.

use std::fmt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

/// Prefix of a sealed credential, before the key id.
const SEALED_PREFIX: &str = "enc:v1:";
/// Length of an AES-GCM nonce in bytes (96 bits).
const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag in bytes.
const TAG_LEN: usize = 16;
/// Length of a master key in bytes (AES-256).
pub const MASTER_KEY_LEN: usize = 32;

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
        "stored credential is not in a recognised form; it must be `enc:v1:<key id>:<data>` \
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
    #[error("encryption failed; this is a bug in ccmail's use of AES-GCM")]
    SealFailed,
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

    /// Seals `plaintext` as `enc:v1:<key id>:<base64 nonce||ciphertext>` with a fresh random
    /// nonce, so sealing the same secret twice gives different text.
    pub fn seal(&self, plaintext: &SecretString) -> Result<String, SecretError> {
        let header = format!("{SEALED_PREFIX}{}", self.id);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad: header.as_bytes(),
                },
            )
            .map_err(|_| SecretError::SealFailed)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        Ok(format!("{header}:{}", BASE64.encode(blob)))
    }

    fn open(&self, key_id: &str, blob: &[u8]) -> Result<SecretString, SecretError> {
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
        let header = format!("{SEALED_PREFIX}{key_id}");
        let plain = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: header.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Tampered {
                key_id: key_id.to_owned(),
            })?;
        let text = String::from_utf8(plain).map_err(|_| SecretError::NotUtf8 {
            key_id: key_id.to_owned(),
        })?;
        Ok(SecretString::from(text))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// A stored credential, parsed but not yet resolved.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// Sealed with the master key `key_id`; `blob` is nonce || ciphertext.
    Sealed { key_id: String, blob: Vec<u8> },
    /// Read from the named environment variable.
    Env(String),
    /// Read from the file at this path.
    File(PathBuf),
}

impl SecretRef {
    /// Parses a stored credential. Anything that is not one of the three forms is refused,
    /// which is what keeps plaintext secrets out of the database.
    pub fn parse(stored: &str) -> Result<SecretRef, SecretError> {
        if let Some(rest) = stored.strip_prefix(SEALED_PREFIX) {
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

    /// Resolves the reference to the secret. `key` is needed only for sealed credentials.
    /// A single trailing newline (`\n` or `\r\n`) of an environment variable or file is
    /// removed, because editors and `echo` add one.
    pub fn resolve(&self, key: Option<&MasterKey>) -> Result<SecretString, SecretError> {
        let secret = match self {
            SecretRef::Sealed { key_id, blob } => {
                let key = key.ok_or_else(|| SecretError::NoMasterKey {
                    key_id: key_id.clone(),
                })?;
                return non_empty(key.open(key_id, blob)?, || {
                    format!("credential sealed with key {key_id}")
                });
            }
            SecretRef::Env(name) => {
                let value = std::env::var(name)
                    .map_err(|_| SecretError::EnvMissing { name: name.clone() })?;
                (trim_newline(value), format!("environment variable {name}"))
            }
            SecretRef::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| SecretError::FileUnreadable {
                    path: path.clone(),
                    source,
                })?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| SecretError::FileNotUtf8 { path: path.clone() })?;
                (
                    trim_newline(text),
                    format!("secret file {}", path.display()),
                )
            }
        };
        non_empty(SecretString::from(secret.0), || secret.1)
    }

    /// A description safe for logs and `Debug`: the form and key id / variable / path,
    /// never the data.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Sealed { key_id, .. } => format!("{SEALED_PREFIX}{key_id}:<sealed>"),
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

/// Resolves a stored credential (see [`SecretRef`]) to the secret it stands for.
pub fn resolve(stored: &str, key: Option<&MasterKey>) -> Result<SecretString, SecretError> {
    SecretRef::parse(stored)?.resolve(key)
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

/// Key rotation: re-seals a credential sealed with `old` under `new`. Credentials that are
/// references (`env:`, `file:`) or already sealed with `new` are returned unchanged.
pub fn reseal(stored: &str, old: &MasterKey, new: &MasterKey) -> Result<String, SecretError> {
    match SecretRef::parse(stored)? {
        SecretRef::Sealed { key_id, .. } if key_id == new.key_id() => Ok(stored.to_owned()),
        sealed @ SecretRef::Sealed { .. } => new.seal(&sealed.resolve(Some(old))?),
        SecretRef::Env(_) | SecretRef::File(_) => Ok(stored.to_owned()),
    }
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
        let a = key.seal(&secret()).unwrap();
        let b = key.seal(&secret()).unwrap();
        assert!(a.starts_with(&format!("enc:v1:{}:", key.key_id())));
        assert_ne!(a, b, "each seal must use a fresh nonce");
        assert!(!a.contains(SECRET));
        assert_eq!(resolve(&a, Some(&key)).unwrap().expose_secret(), SECRET);
        assert_eq!(resolve(&b, Some(&key)).unwrap().expose_secret(), SECRET);
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
        let sealed = key.seal(&secret()).unwrap();
        let err = resolve(&sealed, Some(&other)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(key.key_id()), "{text}");
        assert!(text.contains(other.key_id()), "{text}");
        assert!(text.contains("rotate"), "{text}");
        assert_clean(&err, &key);

        let err = resolve(&sealed, None).unwrap_err();
        assert!(matches!(err, SecretError::NoMasterKey { .. }));
        assert!(err.to_string().contains(key.key_id()));
        assert_clean(&err, &key);
    }

    #[test]
    fn tampered_ciphertext_and_header_are_detected() {
        let key = MasterKey::generate();
        let sealed = key.seal(&secret()).unwrap();
        let (head, data) = sealed.rsplit_once(':').unwrap();
        let mut blob = BASE64.decode(data).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0x01;
        let tampered = format!("{head}:{}", BASE64.encode(&blob));
        let err = resolve(&tampered, Some(&key)).unwrap_err();
        assert!(matches!(err, SecretError::Tampered { .. }), "{err:?}");
        assert_clean(&err, &key);

        // Flip a nonce byte too: the nonce is authenticated through the tag.
        let mut blob = BASE64.decode(data).unwrap();
        blob[0] ^= 0x80;
        let tampered = format!("{head}:{}", BASE64.encode(&blob));
        assert!(matches!(
            resolve(&tampered, Some(&key)),
            Err(SecretError::Tampered { .. })
        ));

        let err = resolve(&format!("{head}:AAAA"), Some(&key)).unwrap_err();
        assert!(
            matches!(err, SecretError::MalformedSealed { .. }),
            "{err:?}"
        );
        let err = resolve(&format!("{head}:@@@"), Some(&key)).unwrap_err();
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
            "enc:v2:abcd",
            "plain:secret",
        ] {
            let err = SecretRef::parse(stored).unwrap_err();
            let text = err.to_string();
            // "env:" and "file:" are part of the help text itself.
            if !["", "env:", "file:"].contains(&stored) {
                assert!(!text.contains(stored), "echoed {stored:?}: {text}");
            }
            if stored != "enc:v2:abcd" {
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
        let name = format!("CCMAIL_TEST_SECRET_{}", std::process::id());
        let err = resolve(&format!("env:{name}_MISSING"), None).unwrap_err();
        assert!(matches!(err, SecretError::EnvMissing { .. }));
        assert!(err.to_string().contains(&format!("{name}_MISSING")));

        // PATH is set in every test environment; it proves the lookup, and a trailing
        // newline is never part of PATH.
        let path_value = std::env::var("PATH").unwrap();
        assert_eq!(
            resolve("env:PATH", None).unwrap().expose_secret(),
            path_value
        );
        assert_eq!(trim_newline(format!("{SECRET}\n")), SECRET);
        assert_eq!(trim_newline(format!("{SECRET}\r\n")), SECRET);
        assert_eq!(trim_newline(format!("{SECRET}\n\n")), format!("{SECRET}\n"));
    }

    #[test]
    fn file_reference_resolves_trims_newline_and_names_unreadable_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client-secret");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        let stored = format!("file:{}", path.display());
        assert_eq!(resolve(&stored, None).unwrap().expose_secret(), SECRET);

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = resolve(&format!("file:{}", empty.display()), None).unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }), "{err:?}");

        let missing = dir.path().join("nope");
        let err = resolve(&format!("file:{}", missing.display()), None).unwrap_err();
        assert!(matches!(err, SecretError::FileUnreadable { .. }));
        assert!(err.to_string().contains(&missing.display().to_string()));

        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let err = resolve(&format!("file:{}", binary.display()), None).unwrap_err();
        assert!(matches!(err, SecretError::FileNotUtf8 { .. }));
    }

    #[test]
    fn reseal_moves_a_credential_to_the_new_key() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let sealed = old.seal(&secret()).unwrap();
        let moved = reseal(&sealed, &old, &new).unwrap();
        assert!(moved.starts_with(&format!("enc:v1:{}:", new.key_id())));
        assert_eq!(resolve(&moved, Some(&new)).unwrap().expose_secret(), SECRET);
        assert!(matches!(
            resolve(&moved, Some(&old)),
            Err(SecretError::WrongKey { .. })
        ));
        // Idempotent: already under the new key, unchanged.
        assert_eq!(reseal(&moved, &old, &new).unwrap(), moved);
        // References carry no ciphertext.
        assert_eq!(reseal("env:X", &old, &new).unwrap(), "env:X");
        assert_eq!(reseal("file:/x", &old, &new).unwrap(), "file:/x");
        // Sealed with a third key: error names that key.
        let third = MasterKey::generate();
        let foreign = third.seal(&secret()).unwrap();
        let err = reseal(&foreign, &old, &new).unwrap_err();
        assert!(err.to_string().contains(third.key_id()));
    }

    #[test]
    fn debug_of_refs_never_shows_ciphertext() {
        let key = MasterKey::generate();
        let sealed = key.seal(&secret()).unwrap();
        let data = sealed.rsplit_once(':').unwrap().1;
        let parsed = SecretRef::parse(&sealed).unwrap();
        let debug = format!("{parsed:?}");
        assert!(!debug.contains(data), "{debug}");
        assert!(debug.contains(key.key_id()));
        assert_eq!(
            describe_stored(&sealed),
            format!("enc:v1:{}:<sealed>", key.key_id())
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
            SecretError::SealFailed,
        ];
        for err in &errors {
            assert_clean(err, &key);
        }
    }
}
