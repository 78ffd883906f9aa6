//! SASL mechanisms ccmail speaks: XOAUTH2 (Google/Microsoft) and PLAIN (RFC 4616).
//!
//! The encoded responses carry credentials, so they are returned as [`SecretString`] and never
//! formatted into logs or errors.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};

/// The XOAUTH2 client response: base64 of `user={user}\x01auth=Bearer {token}\x01\x01`.
pub fn xoauth2_response(user: &str, token: &SecretString) -> SecretString {
    let raw = format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose_secret()
    );
    SecretString::from(STANDARD.encode(raw.as_bytes()))
}

/// The PLAIN client response (RFC 4616): base64 of `\0{user}\0{password}` (no authzid).
pub fn plain_response(user: &str, password: &SecretString) -> SecretString {
    let raw = format!("\0{user}\0{}", password.expose_secret());
    SecretString::from(STANDARD.encode(raw.as_bytes()))
}

/// Most characters of a decoded challenge kept for diagnostics (before escaping).
pub const MAX_CHALLENGE_CHARS: usize = 512;

/// Decodes a server challenge for diagnostics (Dovecot and Gmail send a JSON error object
/// after a rejected bearer token). Returns `None` when it is not base64 of UTF-8 text. The
/// text is cut to [`MAX_CHALLENGE_CHARS`] characters and escaped
/// ([`escape_controls`](super::codec::escape_controls)): it ends up in errors people read.
pub fn decode_challenge(challenge: &str) -> Option<String> {
    let bytes = STANDARD.decode(challenge.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let text: String = text.chars().take(MAX_CHALLENGE_CHARS).collect();
    Some(super::codec::escape_controls(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's documented example ("Authenticate an IMAP, POP or SMTP connection using
    /// OAuth"), as docs/exchange-online.md describes the login.
    #[test]
    fn microsoft_documented_xoauth2_vector() {
        let token = SecretString::from("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA");
        let blob = xoauth2_response("test@contoso.onmicrosoft.com", &token);
        assert_eq!(
            blob.expose_secret(),
            "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
        );
    }

    #[test]
    fn plain_vector() {
        let blob = plain_response("tim", &SecretString::from("tanstaaftanstaaf"));
        // RFC 4616 §4 example without authzid: "\0tim\0tanstaaftanstaaf".
        assert_eq!(blob.expose_secret(), "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
    }

    #[test]
    fn challenge_decoding() {
        assert_eq!(
            decode_challenge("eyJzdGF0dXMiOiI0MDEifQ==").as_deref(),
            Some(r#"{"status":"401"}"#)
        );
        assert_eq!(decode_challenge("%%%"), None);
        // Base64 of `{"e":"\x1b[2J\u{202e}"}`: escaped, not dropped and not raw.
        let hostile = STANDARD.encode("{\"e\":\"\u{1b}[2J\u{202e}\"}");
        assert_eq!(
            decode_challenge(&hostile).as_deref(),
            Some(r#"{"e":"\x1b[2J\u{202e}"}"#)
        );
    }
}
