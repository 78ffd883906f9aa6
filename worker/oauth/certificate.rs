//! Certificate credentials: the client assertion (private_key_jwt) an app sends instead of a
//! client secret (docs/exchange-online.md, "Certificate credentials").
//!
//! The assertion is a JWT signed with the certificate's RSA private key, either RS256 with
//! `x5t` = base64url SHA-1 thumbprint of the DER certificate, or PS256 with `x5t#S256` =
//! base64url SHA-256 thumbprint (never a SHA-256 digest in `x5t`: Entra looks the key up by it).
//! Claims: `aud` = the token URL, `iss` = `sub` = client id, a unique `jti`, `nbf` = `iat` = now,
//! `exp` five minutes later (Entra accepts at most ten).
//!
//! Invariants: the private key never appears in `Debug` output or errors; a key that does not
//! belong to the certificate is refused when the credential is loaded, not at the first token
//! request.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use super::OAuthError;
pub use crate::model::AssertionAlg;

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: well inside Entra's ten-minute limit, long enough for a
/// slow request.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// Why a certificate credential could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error(
        "the certificate is not PEM ({0}); pass the `-----BEGIN CERTIFICATE-----` file uploaded to the app registration"
    )]
    CertificatePem(String),
    #[error(
        "the private key is not PEM ({0}); pass the `-----BEGIN PRIVATE KEY-----` (PKCS#8) or `-----BEGIN RSA PRIVATE KEY-----` file"
    )]
    KeyPem(String),
    #[error(
        "the private key is not an RSA key Entra accepts ({0}); use an RSA key of 2048 bits or more"
    )]
    KeyRejected(String),
    #[error(
        "the private key does not belong to the certificate; pass the key the certificate was made from"
    )]
    Mismatch,
}

/// A certificate registered on an app registration and its private key.
pub struct CertificateCredential {
    key: RsaKeyPair,
    alg: AssertionAlg,
    certificate: CertificateDer<'static>,
    x5t: String,
    x5t_s256: String,
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("alg", &self.alg)
            .field("x5t", &self.x5t)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Base64url (no padding) of the SHA-1 digest of `der`: the `x5t` header value.
pub fn thumbprint_sha1(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der))
}

/// Base64url (no padding) of the SHA-256 digest of `der`: the `x5t#S256` header value.
pub fn thumbprint_sha256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der))
}

impl CertificateCredential {
    /// Loads a certificate (PEM) and its RSA private key (PEM, PKCS#8 or PKCS#1), checking
    /// that the key signs what the certificate's public key verifies.
    pub fn from_pem(
        certificate_pem: &str,
        key_pem: &SecretString,
        alg: AssertionAlg,
    ) -> Result<CertificateCredential, CertificateError> {
        let certificate = CertificateDer::from_pem_slice(certificate_pem.as_bytes())
            .map_err(|e| CertificateError::CertificatePem(e.to_string()))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.expose_secret().as_bytes())
            .map_err(|e| CertificateError::KeyPem(pem_error_text(&e)))?;
        let key = match &key_der {
            PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            _ => {
                return Err(CertificateError::KeyRejected(
                    "an elliptic-curve key".to_owned(),
                ));
            }
        }
        .map_err(|e| CertificateError::KeyRejected(e.to_string()))?;
        let credential = CertificateCredential {
            x5t: thumbprint_sha1(&certificate),
            x5t_s256: thumbprint_sha256(&certificate),
            key,
            alg,
            certificate,
        };
        credential.check_pair()?;
        Ok(credential)
    }

    /// Signs a probe and verifies it with the certificate's public key.
    fn check_pair(&self) -> Result<(), CertificateError> {
        let cert = webpki::EndEntityCert::try_from(&self.certificate)
            .map_err(|e| CertificateError::CertificatePem(format!("unreadable X.509: {e:?}")))?;
        let probe = b"ccmail key check";
        let signature = self
            .sign(probe)
            .map_err(|_| CertificateError::KeyRejected("it cannot sign".to_owned()))?;
        let verifier = match self.alg {
            AssertionAlg::Rs256 => webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            AssertionAlg::Ps256 => webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        };
        cert.verify_signature(verifier, probe, &signature)
            .map_err(|_| CertificateError::Mismatch)
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
        let padding: &'static dyn signature::RsaEncoding = match self.alg {
            AssertionAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
            AssertionAlg::Ps256 => &signature::RSA_PSS_SHA256,
        };
        let mut out = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(padding, &SystemRandom::new(), message, &mut out)?;
        Ok(out)
    }

    /// The signature algorithm.
    pub fn alg(&self) -> AssertionAlg {
        self.alg
    }

    /// Base64url SHA-1 thumbprint of the certificate (`x5t`).
    pub fn x5t(&self) -> &str {
        &self.x5t
    }

    /// Base64url SHA-256 thumbprint of the certificate (`x5t#S256`).
    pub fn x5t_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// The thumbprint as the Azure portal shows it: upper-case hex SHA-1.
    pub fn portal_thumbprint(&self) -> String {
        hex::encode_upper(digest::digest(
            &digest::SHA1_FOR_LEGACY_USE_ONLY,
            &self.certificate,
        ))
    }

    /// The DER certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// A signed client assertion for `client_id` at `token_url`, valid for five minutes.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<SecretString, OAuthError> {
        let header = match self.alg {
            AssertionAlg::Rs256 => {
                serde_json::json!({ "alg": self.alg.as_str(), "typ": "JWT", "x5t": self.x5t })
            }
            AssertionAlg::Ps256 => {
                serde_json::json!({ "alg": self.alg.as_str(), "typ": "JWT", "x5t#S256": self.x5t_s256 })
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .map_err(|_| OAuthError::Config("the system clock is before 1970".to_owned()))?;
        let jti: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let claims = serde_json::json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": hex::encode(jti),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.sign(signing_input.as_bytes()).map_err(|_| {
            OAuthError::Config("the certificate's private key failed to sign".to_owned())
        })?;
        Ok(SecretString::from(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

/// pki-types' PEM errors never contain key material, but keep only the kind to be sure.
fn pem_error_text(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no private key block found".to_owned(),
        other => format!("{other:?}")
            .split('(')
            .next()
            .unwrap_or("malformed")
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn thumbprints_are_base64url_of_the_digests() {
        // SHA-1("abc") = a9993e36..., SHA-256("abc") = ba7816bf...
        assert_eq!(thumbprint_sha1(b"abc"), "qZk-NkcGgWq6PiVxeFDCbJzQ2J0");
        assert_eq!(
            thumbprint_sha256(b"abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }

    #[test]
    fn algorithms_round_trip() {
        for alg in [AssertionAlg::Rs256, AssertionAlg::Ps256] {
            assert_eq!(AssertionAlg::parse(alg.as_str()), Some(alg));
        }
        assert_eq!(AssertionAlg::parse("ps256"), Some(AssertionAlg::Ps256));
        assert_eq!(AssertionAlg::parse("ES256"), None);
    }

    #[test]
    fn garbage_is_refused_with_a_fix() {
        let err = CertificateCredential::from_pem(
            "not pem",
            &SecretString::from("nope"),
            AssertionAlg::Rs256,
        )
        .unwrap_err();
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
    }
}
