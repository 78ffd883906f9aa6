//! TLS client configuration shared by every outbound connection (POP3S and the token endpoint).
//!
//! Invariants: certificates are always verified against the Mozilla roots (webpki-roots) plus
//! any extra CA bundle the operator names for a server; only TLS 1.2 and 1.3 are offered; host
//! names are checked by rustls. There is no switch that turns verification off.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA bundle {path}: {source}; check the path and its permissions")]
    ReadBundle {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "CA bundle {origin} holds no usable PEM certificate ({detail}); it must contain one or more `-----BEGIN CERTIFICATE-----` blocks"
    )]
    BadBundle { origin: String, detail: String },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent; call once at start-up
/// (tests call it too, any number of times).
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is exactly what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Parses PEM certificates; an empty or unreadable bundle is an error, never silently ignored.
pub fn parse_pem_bundle(
    pem: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsConfigError::BadBundle {
        origin: origin.to_owned(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsConfigError::BadBundle {
            origin: origin.to_owned(),
            detail: "no certificate found".to_owned(),
        });
    }
    Ok(certs)
}

/// Reads a PEM CA bundle from disk.
pub fn read_pem_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bytes = std::fs::read(path).map_err(|source| TlsConfigError::ReadBundle {
        path: path.display().to_string(),
        source,
    })?;
    parse_pem_bundle(&bytes, &path.display().to_string())
}

/// A verifying client configuration: Mozilla roots plus `extra_roots`, TLS 1.2 and 1.3 only.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    Ok(Arc::new(client_config_owned(extra_roots)?))
}

/// As [`client_config`], by value (reqwest takes the configuration itself).
pub fn client_config_owned(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
