//! Coverage-guided fuzzing of the sans-IO POP3 codec: whatever a server sends, every decoder
//! returns a value or a typed error, never panics, never reports more consumed than it was
//! given, keeps its output within its bounds, gives the same result however the bytes are cut,
//! and never lets a raw control or bidi character through into text people read.
//!
//! Input layout: four parameter octets (status-line limit, chunk size, entry cap, kept limit),
//! then the server's bytes. `fuzz/seeds/pop3_codec/` holds a few real-looking answers.
//!
//! Runs on stable Rust without a sanitizer (the codec forbids `unsafe`, so the asserts and
//! panics are what is hunted), from the repository root:
//!
//! ```text
//! cargo fuzz run pop3_codec --sanitizer none fuzz/corpus/pop3_codec fuzz/seeds/pop3_codec \
//!     -- -max_total_time=60        # CI: one minute
//! cargo fuzz run pop3_codec --sanitizer none fuzz/corpus/pop3_codec fuzz/seeds/pop3_codec \
//!     -- -max_total_time=3600 -jobs=2 -workers=2    # the long run
//! ```
//!
//! A crash leaves its input in `fuzz/artifacts/pop3_codec/`; replay it with
//! `cargo fuzz run pop3_codec --sanitizer none fuzz/artifacts/pop3_codec/<file>`.

#![no_main]

use ccmail::pop3::codec::{
    self, AuthReply, Capabilities, CodecError, Decode, LineDecoder, ListedUidl, Listing,
    ListingDecoder, MultiLine,
};
use libfuzzer_sys::fuzz_target;

/// Characters that must never reach a terminal or a log raw.
fn is_dangerous(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

fn assert_shown_safely(text: &str) {
    assert!(!text.chars().any(is_dangerous), "raw control in {text:?}");
}

fn status_lines(input: &[u8], limit: usize) {
    match codec::decode_status(input, limit) {
        Ok(Decode::Complete { frame, consumed }) => {
            assert!(consumed <= input.len() && consumed <= limit);
            assert_shown_safely(&frame.text);
            if let Some(code) = &frame.code {
                assert_shown_safely(code);
            }
        }
        Ok(Decode::Incomplete) => assert!(input.len() < limit),
        Err(CodecError::NotAStatus { excerpt }) => assert_shown_safely(&excerpt),
        Err(_) => {}
    }
    match codec::decode_auth_reply(input, limit) {
        Ok(Decode::Complete { frame, consumed }) => {
            assert!(consumed <= input.len() && consumed <= limit);
            match frame {
                AuthReply::Continue(challenge) => {
                    assert_shown_safely(&challenge);
                    if let Some(detail) = ccmail::pop3::sasl::decode_challenge(&challenge) {
                        assert_shown_safely(&detail);
                        assert!(
                            detail.chars().count() <= 10 * ccmail::pop3::sasl::MAX_CHALLENGE_CHARS
                        );
                    }
                }
                AuthReply::Done(status) => assert_shown_safely(&status.text),
            }
        }
        Ok(Decode::Incomplete) => assert!(input.len() < limit),
        Err(_) => {}
    }
}

/// Feeds `input` in `chunk`-sized pieces; returns (decoded or error, wire octets consumed).
fn multiline_chunked(
    input: &[u8],
    chunk: usize,
    keep: usize,
    wire_limit: u64,
) -> (Result<Result<Vec<u8>, u64>, CodecError>, usize) {
    let mut decoder = MultiLine::with_wire_limit(keep, wire_limit);
    let mut consumed = 0;
    for piece in input.chunks(chunk) {
        match decoder.decode(piece) {
            Ok(p) => {
                assert!(p.consumed <= piece.len());
                consumed += p.consumed;
                assert!(consumed as u64 <= wire_limit);
                if p.done {
                    break;
                }
                assert_eq!(
                    p.consumed,
                    piece.len(),
                    "an unfinished body takes everything"
                );
            }
            Err(e) => return (Err(e), consumed),
        }
    }
    (Ok(decoder.finish()), consumed)
}

fn multiline(input: &[u8], chunk: usize, keep: usize) {
    let wire_limit = (input.len() as u64 / 2).max(1);
    let (whole, whole_consumed) = multiline_chunked(input, input.len().max(1), keep, wire_limit);
    let (cut, cut_consumed) = multiline_chunked(input, chunk, keep, wire_limit);
    assert_eq!(whole, cut, "chunking changed the body");
    if whole.is_ok() {
        assert_eq!(whole_consumed, cut_consumed);
    }
    if let Ok(Ok(body)) = &whole {
        assert!(body.len() <= keep);
    }
}

fn listing_chunked(input: &[u8], chunk: usize, max_entries: usize) -> (Listing, usize, bool) {
    let mut decoder = ListingDecoder::new(max_entries, codec::MAX_LISTING_BYTES);
    let mut consumed = 0;
    let mut done = false;
    for piece in input.chunks(chunk) {
        let p = decoder
            .decode(piece)
            .unwrap_or_else(|e| panic!("a short listing hit its wire limit: {e}"));
        assert!(p.consumed <= piece.len());
        consumed += p.consumed;
        if p.done {
            done = true;
            break;
        }
    }
    (decoder.finish(), consumed, done)
}

fn listing(input: &[u8], chunk: usize, max_entries: usize) {
    let whole = listing_chunked(input, input.len().max(1), max_entries);
    let cut = listing_chunked(input, chunk, max_entries);
    assert_eq!(whole, cut, "chunking changed the listing");
    let (listing, consumed, _) = whole;
    assert!(consumed <= input.len());
    assert!(listing.entries.len() <= max_entries);
    let lines = input[..consumed].iter().filter(|&&b| b == b'\n').count();
    assert!(listing.entries.len() + listing.unreadable_lines <= lines);
    for entry in &listing.entries {
        assert!(entry.number > 0);
        match &entry.uidl {
            ListedUidl::Unique(u) | ListedUidl::Shared(u) => assert!(codec::valid_uidl(u)),
            ListedUidl::Invalid { excerpt, .. } => {
                assert_shown_safely(excerpt);
                assert!(excerpt.chars().count() <= 10 * 64 + 1);
            }
        }
    }
}

fn lines(input: &[u8], chunk: usize, line_limit: usize) {
    let mut decoder = LineDecoder::new(line_limit, codec::MAX_LISTING_BYTES);
    let mut total = 0u64;
    for piece in input.chunks(chunk) {
        let Ok(p) = decoder.decode(piece, |line, octets| {
            assert!(line.len() <= line_limit);
            assert!(octets >= line.len() as u64);
            total += octets;
        }) else {
            panic!("a short body hit its wire limit");
        };
        assert!(p.consumed <= piece.len());
        if p.done {
            break;
        }
    }
    assert!(total <= input.len() as u64);
}

fn text(input: &[u8]) {
    let lossy = String::from_utf8_lossy(input);
    assert_shown_safely(&codec::escape_controls(&lossy));
    for (tag, args) in Capabilities::parse(input).entries {
        assert_shown_safely(&tag);
        args.iter().for_each(|a| assert_shown_safely(a));
    }
    let _ = codec::parse_stat(&lossy);
    let _ = codec::parse_listing_line(&lossy);
    if let Ok((number, uidl)) = codec::parse_uidl_answer(&lossy) {
        assert!(number > 0 && codec::valid_uidl(uidl));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((params, input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let limit = usize::from(params[0]) * 8 + 1;
    let chunk = usize::from(params[1]) + 1;
    let max_entries = usize::from(params[2] % 32);
    let keep = usize::from(params[3]) * 16;
    status_lines(input, limit);
    multiline(input, chunk, keep);
    listing(input, chunk, max_entries);
    lines(input, chunk, limit);
    text(input);
});
