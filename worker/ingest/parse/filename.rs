//! Attachment file names that are safe to offer as download names.
//!
//! A file name comes from the sender and ends up in a `Content-Disposition` header, a save
//! dialog or a file system. [`safe_filename`] keeps what a person would read as the name and
//! removes everything that could be used against the reader or the receiving system:
//! directory parts, control characters (header injection, terminal escapes), bidirectional
//! overrides (`invoice\u{202E}fdp.exe` displayed as `invoiceexe.pdf`), invisible characters, the
//! characters Windows forbids, leading and trailing dots and spaces, Windows device names,
//! and anything beyond 255 bytes (the extension is kept).

/// Longest name most file systems accept, in bytes.
const MAX_BYTES: usize = 255;
/// Longest suffix after the last `.` treated as an extension worth keeping when shortening.
const MAX_EXTENSION_BYTES: usize = 16;

/// Returns the sanitised form of `name`, or `None` when nothing usable is left.
pub fn safe_filename(name: &str) -> Option<String> {
    // Only the last path component: `../../etc/passwd` is `passwd`, `C:\x\evil.bat` is
    // `evil.bat`.
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = base
        .chars()
        .filter(|&c| !is_invisible(c))
        .map(|c| match c {
            ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c => c,
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| c == '.' || c.is_whitespace());
    if trimmed.is_empty() {
        return None;
    }
    let mut name = shorten(trimmed);
    if is_reserved_on_windows(&name) {
        name.insert(0, '_');
        name = shorten(&name);
    }
    Some(name)
}

/// Control characters (C0, DEL, C1), bidirectional controls and zero-width characters.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Cuts `name` to [`MAX_BYTES`] on a character boundary, keeping a short extension.
fn shorten(name: &str) -> String {
    if name.len() <= MAX_BYTES {
        return name.to_owned();
    }
    let extension = name
        .rfind('.')
        .map(|dot| &name[dot..])
        .filter(|ext| ext.len() <= MAX_EXTENSION_BYTES && ext.len() < name.len());
    let extension = extension.unwrap_or("");
    let stem_budget = MAX_BYTES - extension.len();
    let mut end = stem_budget.min(name.len() - extension.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let stem = name[..end].trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    format!("{stem}{extension}")
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM0`–`COM9`, `LPT0`–`LPT9` (also with superscript digits),
/// with or without an extension: Windows opens the device instead of a file.
fn is_reserved_on_windows(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" => true,
        _ => {
            let (Some(prefix), Some(digit)) = (upper.get(..3), upper.get(3..)) else {
                return false;
            };
            let mut digits = digit.chars();
            matches!(prefix, "COM" | "LPT")
                && digits
                    .next()
                    .is_some_and(|c| c.is_ascii_digit() || matches!(c, '¹' | '²' | '³'))
                && digits.next().is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_become_plain_download_names() {
        let long_a = format!("{}.pdf", "A".repeat(5_000));
        let long_e = format!("{}.pdf", "é".repeat(3_000));
        let cases: Vec<(&str, Option<String>)> = vec![
            ("invoice.pdf", Some("invoice.pdf".into())),
            (
                "Übersicht Größen 2024.xlsx",
                Some("Übersicht Größen 2024.xlsx".into()),
            ),
            ("../../etc/passwd", Some("passwd".into())),
            (
                "..\\..\\windows\\system32\\drivers\\etc\\hosts",
                Some("hosts".into()),
            ),
            ("/absolute/path/report.pdf", Some("report.pdf".into())),
            ("C:\\Users\\Public\\evil.bat", Some("evil.bat".into())),
            ("C:evil.bat", Some("C_evil.bat".into())),
            (
                "invoice\r\nContent-Type: text/html.pdf",
                Some("html.pdf".into()),
            ),
            (
                "invoice\r\nX-Evil: 1.pdf",
                Some("invoiceX-Evil_ 1.pdf".into()),
            ),
            ("\u{1b}[31mred\u{1b}[0m.txt", Some("[31mred[0m.txt".into())),
            ("invoice\u{202e}fdp.exe", Some("invoicefdp.exe".into())),
            (
                "a\u{2066}b\u{2069}c\u{200e}d\u{200f}e\u{061c}.txt",
                Some("abcde.txt".into()),
            ),
            (
                "zero\u{200b}width\u{feff}.doc",
                Some("zerowidth.doc".into()),
            ),
            ("c1\u{85}control\u{9f}.txt", Some("c1control.txt".into())),
            ("del\u{7f}.txt", Some("del.txt".into())),
            ("CON", Some("_CON".into())),
            ("nul.txt", Some("_nul.txt".into())),
            ("COM1.log", Some("_COM1.log".into())),
            ("lpt9", Some("_lpt9".into())),
            ("COM10.log", Some("COM10.log".into())),
            ("console.log", Some("console.log".into())),
            ("...", None),
            (" . . ", None),
            ("", None),
            ("\u{202e}", None),
            ("dir/", None),
            (".hidden", Some("hidden".into())),
            ("trailing.dots...", Some("trailing.dots".into())),
            ("  spaced  ", Some("spaced".into())),
            ("what?*<>|\".txt", Some("what______.txt".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(safe_filename(input), expected, "{input:?}");
        }
        let a = safe_filename(&long_a).unwrap();
        assert_eq!(a.len(), 255);
        assert!(a.ends_with(".pdf") && a.starts_with("AAAA"));
        let e = safe_filename(&long_e).unwrap();
        assert!(e.len() <= 255 && e.len() > 250, "{}", e.len());
        assert!(e.ends_with("é.pdf"));
    }

    #[test]
    fn every_result_is_safe() {
        let samples = [
            "a/b\\c:d*e?f\"g<h>i|j",
            "\u{0}\u{1}\u{1f}x",
            "...x...",
            "\u{2028}line\u{2029}sep",
            "名前.txt",
            "abé",
            "COMé",
        ];
        for s in samples {
            if let Some(name) = safe_filename(s) {
                assert!(!name.is_empty() && name.len() <= 255);
                assert!(!name.contains(['/', '\\', ':', '*', '?', '"', '<', '>', '|']));
                assert!(!name.chars().any(is_invisible), "{name:?}");
                assert!(!name.starts_with(['.', ' ']) && !name.ends_with(['.', ' ']));
            }
        }
    }
}
