//! Secrets as the CLI takes them: from standard input, a file or a named environment variable,
//! never from the command line; sealed for their row with the master key, or kept as a
//! reference.

use std::io::Read;

use anyhow::{Context, bail};
use secrecy::SecretString;

use super::SecretSource;
use crate::config::Config;
use crate::secrets::{CredentialPolicy, Owner};

/// What a [`SecretSource`] gave: a reference to keep as it is, or the secret itself.
pub(super) enum SecretInput {
    Reference(String),
    Value(SecretString),
}

/// Reads a [`SecretSource`]: refuses a secret on the command line, reads stdin or a file
/// (trailing newline dropped; never a special file such as `/proc/self/environ`, never more
/// than a secret's size), or names an environment variable that `policy` allows. `None` when
/// none was given.
pub(super) fn secret_input(
    source: &SecretSource,
    what: &str,
    policy: &CredentialPolicy,
) -> anyhow::Result<Option<SecretInput>> {
    if source.secret.is_some() {
        // A pilot's password has flags of its own name (`--password-stdin` …).
        let flag = if what.contains("password") {
            "password"
        } else {
            "secret"
        };
        bail!(
            "refusing a {what} on the command line (it would stay in shell history and process lists); \
             pass it with --{flag}-stdin, --{flag}-file PATH, or --{flag}-env NAME"
        );
    }
    if let Some(name) = &source.secret_env {
        policy.references.check_env(name)?;
        return Ok(Some(SecretInput::Reference(format!("env:{name}"))));
    }
    let secret = if source.secret_stdin {
        let mut line = String::new();
        std::io::stdin()
            .take(crate::secrets::MAX_SECRET_FILE_BYTES + 1)
            .read_to_string(&mut line)
            .context("reading the secret from standard input")?;
        if line.len() as u64 > crate::secrets::MAX_SECRET_FILE_BYTES {
            bail!(
                "the {what} on standard input is larger than {} KiB; a secret is a few KiB",
                crate::secrets::MAX_SECRET_FILE_BYTES / 1024
            );
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else if let Some(path) = &source.secret_file {
        crate::secrets::read_secret_file(path, None)?
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    } else {
        return Ok(None);
    };
    if secret.is_empty() {
        bail!("the {what} is empty");
    }
    Ok(Some(SecretInput::Value(SecretString::from(secret))))
}

/// Turns a [`SecretSource`] into what is stored for `owner`: sealed with the master key for
/// it, or a reference.
pub(super) fn stored_secret(
    config: &Config,
    source: &SecretSource,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<Option<String>> {
    match secret_input(source, what, &config.credential_policy())? {
        None => Ok(None),
        Some(input) => stored_input(config, input, what, owner).map(Some),
    }
}

/// What is stored for `input`: the reference as it is, or the secret sealed for `owner`.
pub(super) fn stored_input(
    config: &Config,
    input: SecretInput,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<String> {
    match input {
        SecretInput::Reference(reference) => Ok(reference),
        SecretInput::Value(secret) => seal_for(config, &secret, what, owner),
    }
}

/// `secret` sealed for `owner` with the configured master key.
pub(super) fn seal_for(
    config: &Config,
    secret: &SecretString,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<String> {
    let Some(key) = config.master_key() else {
        bail!(
            "no master key to seal the {what} with: create one with `ccmail key generate` and set \
             {} (or secrets.master_key_file), or pass --secret-env NAME to store a reference instead",
            crate::config::MASTER_KEY_ENV
        );
    };
    Ok(key.seal(secret, owner)?)
}

/// A secret for immediate use (doctor): read or resolved under `policy`, never stored.
pub(super) fn read_secret(
    source: &SecretSource,
    what: &str,
    policy: &CredentialPolicy,
) -> anyhow::Result<Option<SecretString>> {
    Ok(match secret_input(source, what, policy)? {
        None => None,
        Some(SecretInput::Reference(reference)) => Some(
            crate::secrets::SecretRef::parse(&reference)?.resolve_reference(&policy.references)?,
        ),
        Some(SecretInput::Value(secret)) => Some(secret),
    })
}
