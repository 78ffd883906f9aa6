//! The one rule for text that PostgreSQL must hold: NUL (U+0000) becomes U+FFFD.
//!
//! PostgreSQL `text` and `jsonb` reject U+0000, and mail can carry it anywhere. Replacing it
//! (rather than dropping it) keeps the reader aware that something was there, the same way
//! undecodable bytes already show as U+FFFD. The parser applies the rule while it builds a
//! [`crate::model::ParsedMail`]; the store applies it again to values built by hand, so a
//! NUL can never be a reason to lose a message.

use std::borrow::Cow;

/// What a NUL character becomes.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// `text` with every NUL replaced; borrowed when there is none.
pub fn nul_free(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `text` with every NUL replaced, moved when there is none.
pub fn into_nul_free(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Appends `text` to `out` with every NUL replaced.
pub fn push_nul_free(out: &mut String, text: &str) {
    let mut pieces = text.split('\0');
    if let Some(first) = pieces.next() {
        out.push_str(first);
    }
    for piece in pieces {
        out.push(NUL_REPLACEMENT);
        out.push_str(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character_everywhere() {
        assert_eq!(nul_free("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(matches!(nul_free("plain"), Cow::Borrowed("plain")));
        assert_eq!(into_nul_free("\0x".to_owned()), "\u{FFFD}x");
        let mut out = String::from(">");
        push_nul_free(&mut out, "\0a\0");
        assert_eq!(out, ">\u{FFFD}a\u{FFFD}");
    }
}
