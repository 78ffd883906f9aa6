//! A message's identity: a fingerprint of the header fields that name one delivery, computed
//! the same way from a whole message (`RETR`) and from its header section alone (`TOP n 0`).
//!
//! Why it exists: the POP3 server decides what a UIDL stands for, and a broken or hostile server
//! may list one UIDL for two messages, or give a stored message's UIDL to a new one. Before
//! ccmail deletes a message it did not download in this session, it checks that the message on
//! the server is the one it stored, by this fingerprint; a message whose UIDL cannot be trusted
//! is stored and deleted by its identity instead (RELIABILITY.md, "Guarantees").
//!
//! Which fields: `Message-ID`, `Date`, `From`, `Sender`, `To`, `Cc`, `Subject` and every
//! `Received` trace field, as written (unfolded, runs of white space collapsed; names
//! case-folded). MIME fields (`Content-Type` with its boundary) and server-added `X-` fields are
//! left out on purpose: a server that renders MIME on download (Exchange Online does) may write
//! them differently each time, while the fields above are carried over as they arrived.
//!
//! A message with none of `Message-ID`, `Received` and (`Date` and `From`) has no identity
//! ([`identity`] returns `None`): its header section says too little to tell two such messages
//! apart, and callers compare the whole bytes instead.
//!
//! Bounded: only the first [`MAX_HEADER_BYTES`] of the header section are read, in one pass.

use sha2::{Digest, Sha256};

/// How much of the header section is read; the same prefix is read from `RETR` and from `TOP`.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// The header fields an identity is made of (lowercase).
const FIELDS: [&str; 8] = [
    "message-id",
    "date",
    "from",
    "sender",
    "to",
    "cc",
    "subject",
    "received",
];

/// A SHA-256 over the identity fields of a message (see the module documentation).
pub type Identity = [u8; 32];

/// The identity of a message, from its bytes or from its header section alone. `None` when the
/// header section does not identify the message (see the module documentation).
pub fn identity(raw: &[u8]) -> Option<Identity> {
    let mut hash = Sha256::new();
    hash.update(b"ccmail-identity-v1\n");
    let (mut message_id, mut received, mut date, mut from) = (false, false, false, false);
    for (name, value) in header_fields(&raw[..raw.len().min(MAX_HEADER_BYTES)]) {
        let Some(field) = FIELDS
            .iter()
            .find(|f| name.eq_ignore_ascii_case(f.as_bytes()))
        else {
            continue;
        };
        match *field {
            "message-id" => message_id = true,
            "received" => received = true,
            "date" => date = true,
            "from" => from = true,
            _ => {}
        }
        hash.update(field.as_bytes());
        hash.update(b":");
        let mut pending_space = false;
        for &b in value.iter().skip_while(|b| b.is_ascii_whitespace()) {
            if b.is_ascii_whitespace() {
                pending_space = true;
                continue;
            }
            if pending_space {
                hash.update(b" ");
                pending_space = false;
            }
            hash.update([b]);
        }
        hash.update(b"\n");
    }
    (message_id || received || (date && from)).then(|| hash.finalize().into())
}

/// The key under which a message whose UIDL cannot be trusted is stored: a space cannot occur
/// in a UIDL (RFC 1939 §7 allows 0x21–0x7E only), so these keys never collide with a server's.
pub fn derived_key(fingerprint: &[u8; 32]) -> String {
    format!("~ {}", hex::encode(fingerprint))
}

/// Whether `key` was made by [`derived_key`] rather than listed by the server.
pub fn is_derived_key(key: &str) -> bool {
    key.starts_with("~ ")
}

/// RFC 5322 §2.2: header fields are `name: value` lines, a line starting with white space
/// continues the previous field (§2.2.3 unfolding), and the section ends at the first empty
/// line. Yields (name, unfolded value) with CR and LF removed; lines that are not fields are
/// skipped.
fn header_fields(head: &[u8]) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    let mut lines = head.split_inclusive(|&b| b == b'\n').peekable();
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            let line = trim_eol(line);
            if line.is_empty() {
                // The empty line ends the header section.
                while lines.next().is_some() {}
                return None;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                continue;
            }
            let mut value = line[colon + 1..].to_vec();
            while let Some(next) = lines.peek() {
                if !matches!(next.first(), Some(b' ') | Some(b'\t')) {
                    break;
                }
                value.push(b' ');
                value.extend_from_slice(trim_eol(next));
                lines.next();
            }
            return Some((name, value));
        }
    })
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIL: &[u8] = b"Received: from mx.example.net by mx.contoso.com; Tue, 3 Nov 2026 10:00:00 +0000\r\n\
Message-ID: <a1@example.net>\r\nDate: Tue, 3 Nov 2026 09:59:58 +0000\r\nFrom: Ann <ann@example.net>\r\n\
To: support@contoso.com\r\nSubject: Order\r\n  42 is late\r\nContent-Type: multipart/mixed; boundary=\"x1\"\r\n\
\r\n--x1\r\nContent-Type: text/plain\r\n\r\nWhere is it?\r\n--x1--\r\n";

    #[test]
    fn whole_message_and_header_section_have_the_same_identity() {
        let head_end = MAIL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let top = &MAIL[..head_end];
        assert_eq!(identity(MAIL), identity(top));
        assert!(identity(MAIL).is_some());
    }

    #[test]
    fn mime_fields_and_folding_do_not_change_the_identity_but_identity_fields_do() {
        let rerendered = String::from_utf8_lossy(MAIL)
            .replace("boundary=\"x1\"", "boundary=\"other\"")
            .replace("--x1", "--other")
            .replace(
                "Subject: Order\r\n  42 is late",
                "Subject: Order 42\r\n\tis   late",
            )
            .replace("Message-ID:", "message-id:");
        assert_eq!(identity(MAIL), identity(rerendered.as_bytes()));
        let other = String::from_utf8_lossy(MAIL).replace("<a1@example.net>", "<a2@example.net>");
        assert_ne!(identity(MAIL), identity(other.as_bytes()));
        let other_hop = String::from_utf8_lossy(MAIL).replace("10:00:00", "10:00:01");
        assert_ne!(identity(MAIL), identity(other_hop.as_bytes()));
    }

    #[test]
    fn a_header_section_that_names_nothing_has_no_identity() {
        assert_eq!(identity(b"Subject: hello\r\n\r\nbody\r\n"), None);
        assert_eq!(identity(b"garbage without any header"), None);
        assert_eq!(identity(b""), None);
        assert!(identity(b"Date: Tue, 3 Nov 2026 09:59:58 +0000\r\nFrom: a@b\r\n\r\n").is_some());
        // Fields after the header section do not count.
        assert_eq!(
            identity(b"Subject: x\r\n\r\nMessage-ID: <in-body@x>\r\n"),
            None
        );
    }

    #[test]
    fn derived_keys_are_never_valid_uidls() {
        let key = derived_key(&[7; 32]);
        assert!(is_derived_key(&key));
        assert!(!crate::pop3::codec::valid_uidl(&key));
        assert!(!is_derived_key("AAQkADk2"));
    }

    #[test]
    fn a_huge_header_section_is_read_only_up_to_the_bound() {
        let mut raw = b"Message-ID: <x@y>\r\n".to_vec();
        while raw.len() < 3 * MAX_HEADER_BYTES {
            raw.extend_from_slice(b"Received: from hop by hop\r\n");
        }
        let mut longer = raw.clone();
        longer.extend_from_slice(b"Received: one more\r\n\r\n");
        assert_eq!(identity(&raw), identity(&longer));
    }
}
