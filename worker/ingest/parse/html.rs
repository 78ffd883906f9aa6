//! HTML for agents: the sanitising policy and the cheap pre-scan that decides whether
//! sanitising is affordable.
//!
//! ammonia parses with html5ever, whose tree builder walks the stack of open elements for
//! many start tags ("has an element in scope"), so its cost grows with the number of
//! elements times their nesting: 25 000 nested `<div>` take 3.6 s, 200 000 take minutes.
//! [`shape`] measures size, elements and nesting in one linear pass, approximating
//! html5ever's tree: void elements and elements that close their open sibling (`<p>`,
//! `<li>`, `<td>` …) do not nest, comments and raw text (`<script>`, `<style>` …) hold no
//! elements. Where it has to guess it counts more nesting, never less.
//!
//! Policy ([`policy`]): ammonia's allow-list (no scripts, event handlers, styles, forms or
//! frames), links kept clickable with `rel="noopener noreferrer"`, relative URLs removed,
//! and `<img src>` only `cid:` (an inline part of the same message) or an inline
//! `data:image/…` of a raster type; remote images (tracking pixels) are dropped.

use std::borrow::Cow;
use std::collections::HashSet;

/// Size and nesting of an HTML text, as far as [`shape`] looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Shape {
    /// Start tags seen.
    pub elements: usize,
    /// Deepest nesting of open elements.
    pub depth: usize,
}

/// Elements html5ever never leaves open.
const VOID: &[&str] = &[
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "image", "img",
    "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
];
/// Elements whose content is text up to their end tag.
const RAW_TEXT: &[&str] = &[
    "iframe", "noembed", "noframes", "noscript", "script", "style", "textarea", "title", "xmp",
];
/// Elements a start tag of the same group closes when it is the current element.
const SIBLING_GROUPS: &[&[&str]] = &[
    &["p"],
    &["li"],
    &["dt", "dd"],
    &["td", "th"],
    &["tr"],
    &["option"],
    &["optgroup"],
    &["a"],
    &["thead", "tbody", "tfoot"],
    &["rb", "rt", "rp", "rtc"],
];
/// How far down the open elements an end tag is matched; deeper matches are ignored, which
/// can only overstate the nesting.
const END_TAG_REACH: usize = 16;

/// Scans `html`, stopping as soon as `max_elements` or `max_depth` is passed (the returned
/// shape is then over that limit).
pub(super) fn shape(html: &str, max_elements: usize, max_depth: usize) -> Shape {
    let bytes = html.as_bytes();
    let mut open: Vec<&str> = Vec::new();
    let mut foreign = 0usize;
    let mut found = Shape::default();
    let mut i = 0;
    while let Some(lt) = find(bytes, i, b"<") {
        i = lt + 1;
        match bytes.get(i) {
            Some(b'!') => i = skip_markup_declaration(bytes, i),
            Some(b'?') => i = find(bytes, i, b">").map_or(bytes.len(), |gt| gt + 1),
            Some(b'/') => {
                let (name, end) = tag_name(html, i + 1);
                i = skip_tag(bytes, end).0;
                if name.is_empty() {
                    continue;
                }
                let reach = open.len().saturating_sub(END_TAG_REACH);
                if let Some(at) = open[reach..]
                    .iter()
                    .rposition(|n| n.eq_ignore_ascii_case(name))
                {
                    for closed in open.drain(reach + at..) {
                        if is_foreign_root(closed) {
                            foreign = foreign.saturating_sub(1);
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let (name, end) = tag_name(html, i);
                let (after, self_closing) = skip_tag(bytes, end);
                i = after;
                found.elements += 1;
                if found.elements > max_elements {
                    return found;
                }
                let lower = name.to_ascii_lowercase();
                if VOID.contains(&lower.as_str()) || (self_closing && foreign > 0) {
                    continue;
                }
                if RAW_TEXT.contains(&lower.as_str()) {
                    found.depth = found.depth.max(open.len() + 3);
                    i = skip_raw_text(bytes, i, &lower);
                    continue;
                }
                if lower == "plaintext" {
                    break;
                }
                if let Some(current) = open.last()
                    && same_group(current, &lower)
                {
                    open.pop();
                }
                // html5ever inserts the `tbody` a `tr` directly in a `table` needs.
                if lower == "tr" && open.last().is_some_and(|n| n.eq_ignore_ascii_case("table")) {
                    open.push("tbody");
                }
                if is_foreign_root(name) {
                    foreign += 1;
                }
                open.push(name);
                // `html`, `head`/`body` are implied around everything.
                found.depth = found.depth.max(open.len() + 2);
                if found.depth > max_depth {
                    return found;
                }
            }
            _ => {}
        }
    }
    found
}

fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let rest = bytes.get(from..)?;
    let (&first, tail) = needle.split_first()?;
    let mut at = 0;
    while let Some(p) = rest.get(at..)?.iter().position(|&b| b == first) {
        let start = at + p;
        if rest.get(start + 1..start + needle.len()) == Some(tail) {
            return Some(from + start);
        }
        at = start + 1;
    }
    None
}

fn find_ignore_case(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

fn is_foreign_root(name: &str) -> bool {
    name.eq_ignore_ascii_case("svg") || name.eq_ignore_ascii_case("math")
}

fn same_group(open: &str, new: &str) -> bool {
    SIBLING_GROUPS
        .iter()
        .any(|group| group.iter().any(|n| open.eq_ignore_ascii_case(n)) && group.contains(&new))
}

/// The tag name starting at `start` and the offset after it.
fn tag_name(html: &str, start: usize) -> (&str, usize) {
    let bytes = html.as_bytes();
    let mut end = start;
    while end < bytes.len()
        && !matches!(
            bytes[end],
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/' | b'>'
        )
    {
        end += 1;
    }
    (html.get(start..end).unwrap_or(""), end)
}

/// Skips a tag's attributes, honouring quoted values; returns the offset after `>` and
/// whether the tag ended in `/>`.
fn skip_tag(bytes: &[u8], mut i: usize) -> (usize, bool) {
    let mut quote: Option<u8> = None;
    let mut last = 0u8;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return (i, last == b'/'),
            None => {}
        }
        if !b.is_ascii_whitespace() {
            last = b;
        }
    }
    (i, false)
}

/// Skips `<!-- … -->` (also ended by `--!>`, and `<!-->`, `<!--->`), and any other `<!…>`.
fn skip_markup_declaration(bytes: &[u8], bang: usize) -> usize {
    if bytes.get(bang + 1..bang + 3) == Some(b"--") {
        let body = bang + 3;
        if bytes.get(body) == Some(&b'>') {
            return body + 1;
        }
        if bytes.get(body..body + 2) == Some(b"->") {
            return body + 2;
        }
        let mut from = body;
        while let Some(at) = find(bytes, from, b"--") {
            match bytes.get(at + 2..) {
                Some([b'>', ..]) => return at + 3,
                Some([b'!', b'>', ..]) => return at + 4,
                _ => from = at + 1,
            }
        }
        return bytes.len();
    }
    find(bytes, bang, b">").map_or(bytes.len(), |gt| gt + 1)
}

/// Skips the content of a raw text element up to its end tag (the first `</name`, which is
/// never later than where html5ever ends it).
fn skip_raw_text(bytes: &[u8], from: usize, name: &str) -> usize {
    let needle = format!("</{name}");
    find_ignore_case(bytes, from, needle.as_bytes()).unwrap_or(bytes.len())
}

/// The sanitising policy. See the module documentation.
pub(super) fn policy() -> ammonia::Builder<'static> {
    let schemes: HashSet<&str> = ["http", "https", "mailto", "tel", "cid", "data"]
        .into_iter()
        .collect();
    let mut builder = ammonia::Builder::default();
    builder
        .url_schemes(schemes)
        .url_relative(ammonia::UrlRelative::Deny)
        .link_rel(Some("noopener noreferrer"))
        .attribute_filter(|element, attribute, value| {
            let url_attribute = matches!(attribute, "src" | "href" | "cite" | "longdesc");
            if !url_attribute {
                return Some(Cow::Borrowed(value));
            }
            let lower = value.trim_start().to_ascii_lowercase();
            let allowed = if element == "img" && attribute == "src" {
                lower.starts_with("cid:") || is_inline_raster_image(&lower)
            } else {
                // `data:` is allowed for inline images only; a `data:` link can carry a
                // whole phishing page.
                !lower.starts_with("data:")
            };
            allowed.then_some(Cow::Borrowed(value))
        });
    builder
}

/// `data:image/png;base64,…` and the other raster types browsers decode without scripts
/// (not SVG, which is a document).
fn is_inline_raster_image(lower: &str) -> bool {
    ["png", "gif", "jpeg", "jpg", "webp", "bmp"]
        .iter()
        .any(|t| {
            lower.starts_with(&format!("data:image/{t};"))
                || lower.starts_with(&format!("data:image/{t},"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(html: &str) -> usize {
        shape(html, usize::MAX, usize::MAX).depth
    }

    #[test]
    fn nesting_follows_html5ever_for_common_shapes() {
        // html, body and the implied head count as 2 around the content.
        assert_eq!(depth("<div><div><div>x</div></div></div>"), 5);
        assert_eq!(depth(&"<div>".repeat(1_000)), 1_002);
        assert_eq!(depth(&"<p>para".repeat(1_000)), 3);
        assert_eq!(depth(&"<li>item".repeat(1_000)), 3);
        assert_eq!(depth(&"<br><img src=x><hr>".repeat(1_000)), 0);
        assert_eq!(depth("<table><tr><td>x</td><td>y</td></tr></table>"), 6);
        assert_eq!(depth(&"<a href=x>".repeat(100)), 3);
        assert_eq!(depth("<p title=\"a > b <div><div>\">x</p>"), 3);
        assert_eq!(
            depth(&format!("<script>{}</script>", "<div>".repeat(100))),
            3
        );
        assert_eq!(depth(&format!("<!--{}-->", "<div>".repeat(100))), 0);
        assert_eq!(depth(&format!("<svg>{}</svg>", "<path/>".repeat(100))), 3);
    }

    #[test]
    fn comment_tricks_do_not_hide_elements() {
        // html5ever ends a comment at `--!>`, and `<!-->` is an empty comment.
        let nested = "<div>".repeat(100);
        assert!(depth(&format!("<!-- --!>{nested}-->")) >= 100);
        assert!(depth(&format!("<!-->{nested}-->")) >= 100);
        assert!(depth(&format!("<!--->{nested}-->")) >= 100);
        // A `<div/>` nests in HTML.
        assert!(depth(&"<div/>".repeat(100)) >= 100);
    }

    #[test]
    fn scanning_stops_at_the_limits() {
        let deep = "<div>".repeat(100_000);
        assert_eq!(shape(&deep, usize::MAX, 50).depth, 51);
        assert_eq!(shape(&deep, 10, usize::MAX).elements, 11);
    }

    #[test]
    fn policy_keeps_cid_and_links_and_drops_what_phones_home() {
        let html = "<img src=\"https://t.test/p.gif\"><img src=\"//t.test/p.gif\">\
<img src=\"rel.png\"><img src=\"cid:logo@x\"><img src=\"data:image/png;base64,iVBO\">\
<img src=\"data:image/svg+xml;base64,PHN2Zz4=\"><a href=\"https://x.test/\">x</a>\
<a href=\"../rel\">r</a><a href=\"data:text/html,<script>alert(1)</script>\">d</a>\
<p style=\"background:url(https://t.test/bg)\">s</p><style>p{background:url(x)}</style>";
        let out = policy().clean(html).to_string();
        assert!(!out.contains("t.test"), "{out}");
        assert!(!out.contains("rel.png") && !out.contains("../rel"), "{out}");
        assert!(!out.contains("url("), "{out}");
        assert!(!out.contains("svg") && !out.contains("text/html"), "{out}");
        assert!(out.contains("src=\"cid:logo@x\""), "{out}");
        assert!(out.contains("src=\"data:image/png;base64,iVBO\""), "{out}");
        assert!(
            out.contains("<a href=\"https://x.test/\" rel=\"noopener noreferrer\">"),
            "{out}"
        );
    }
}
