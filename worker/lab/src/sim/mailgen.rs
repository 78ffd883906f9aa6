//! Deterministic, realistic e-mail for the demo, the benchmark and the tests.
//!
//! [`MailGen`] writes RFC 5322 messages the way contact-center mailboxes receive them:
//! plain text, text + HTML, attachments, inline images, replies in a thread, non-ASCII names,
//! subjects and file names (RFC 2047 B and Q encoded words, RFC 2231 parameters), bodies with
//! lines starting with `.` and `From `, quoted-printable. No external data is used.
//!
//! Invariants:
//! * the same seed produces the same bytes, message after message;
//! * every message has a unique `Message-ID` and a unique `X-Ccmail-Marker` header (see
//!   [`marker`]), so a test can count exact delivery;
//! * lines end in CRLF; the normal kinds are valid RFC 5322 with `Date`, `From`, `To`,
//!   `Subject`, `Message-ID` and `MIME-Version`; base64 lines are 76 characters.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Duration, FixedOffset, Offset, TimeZone, Utc};

/// The shapes of message the generator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One `text/plain` part.
    Plain,
    /// `multipart/alternative` with text and HTML.
    Alternative,
    /// Text + HTML body and 1–3 attachments (PDF, PNG, CSV, DOCX-like).
    Attachments,
    /// HTML referencing a PNG through `cid:` in `multipart/related`.
    InlineImage,
    /// `Re:` an earlier generated message, with `In-Reply-To` and `References`.
    Reply,
    /// Non-ASCII display names and subject (German, French, Japanese, Russian, Arabic) as
    /// encoded words, a base64 UTF-8 body and an RFC 2231 file name.
    International,
    /// A body with lines starting with `.` and `From ` (POP3 dot-stuffing, mbox escaping).
    DotLines,
    /// A quoted-printable body with non-ASCII text and long lines (soft line breaks).
    QuotedPrintable,
}

impl Kind {
    /// Every kind, for tests that cover them all.
    pub const ALL: [Kind; 8] = [
        Kind::Plain,
        Kind::Alternative,
        Kind::Attachments,
        Kind::InlineImage,
        Kind::Reply,
        Kind::International,
        Kind::DotLines,
        Kind::QuotedPrintable,
    ];
}

/// One generated message and what it is meant to contain, so tests can check a parser.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The message bytes, CRLF line endings.
    pub raw: Vec<u8>,
    /// `Message-ID` without angle brackets.
    pub message_id: String,
    /// The `X-Ccmail-Marker` value.
    pub marker: String,
    /// The subject as Unicode text, before encoding.
    pub subject: String,
    /// Each attachment's file name and bytes, before transfer encoding, in MIME order.
    pub attachments: Vec<(String, Vec<u8>)>,
}

/// Seeded generator. See the module documentation.
pub struct MailGen {
    rng: fastrand::Rng,
    seed: u64,
    counter: u64,
    /// Recent messages that replies point at.
    thread: Vec<Earlier>,
}

/// How many earlier messages a reply may point at.
const THREAD_MEMORY: usize = 16;
/// How many ids a `References` field keeps (the thread root and the latest ones).
const MAX_REFERENCES: usize = 8;

/// A generated message a later reply may answer.
#[derive(Clone)]
struct Earlier {
    message_id: String,
    subject: String,
    references: Vec<String>,
}
/// [`MailGen::bench_mix`]: total size of the common (about 90 %) messages, 5–50 KiB.
pub const BENCH_SMALL_BYTES: std::ops::RangeInclusive<usize> = 5 * 1024..=50 * 1024;
/// Targets stay a little inside the range: padding lands within one sentence of the target.
const BENCH_SMALL_TARGET: std::ops::RangeInclusive<usize> = 5 * 1024 + 512..=49 * 1024;
/// [`MailGen::bench_mix`]: decoded size of the one attachment of the large (about 10 %)
/// messages, 100 KiB–2 MiB.
pub const BENCH_LARGE_ATTACHMENT_BYTES: std::ops::RangeInclusive<usize> =
    100 * 1024..=2 * 1024 * 1024;

struct Person {
    name: &'static str,
    email: &'static str,
}

const ASCII_PEOPLE: [Person; 6] = [
    Person {
        name: "Jordan Lee",
        email: "jordan.lee@gmail.com",
    },
    Person {
        name: "Pat Smith",
        email: "pat.smith@example.com",
    },
    Person {
        name: "Schmidt, Anna",
        email: "anna.schmidt@kunde-gmbh.de",
    },
    Person {
        name: "Chris O'Neil",
        email: "chris@oneil.example.ie",
    },
    Person {
        name: "Sam Taylor",
        email: "sam.taylor@outlook.example",
    },
    Person {
        name: "Morgan Blake",
        email: "m.blake@contractor.example",
    },
];

const INTL_PEOPLE: [Person; 6] = [
    Person {
        name: "Jürgen Größmann",
        email: "juergen@beispiel.de",
    },
    Person {
        name: "Élodie Dupré",
        email: "elodie.dupre@exemple.fr",
    },
    Person {
        name: "山田 太郎",
        email: "taro.yamada@example.co.jp",
    },
    Person {
        name: "Ольга Смирнова",
        email: "olga@example.ru",
    },
    Person {
        name: "فاطمة الزهراء",
        email: "fatima@example.ae",
    },
    Person {
        name: "François Lefèvre",
        email: "f.lefevre@exemple.fr",
    },
];

const SUBJECTS: [&str; 8] = [
    "Order 48213 arrived damaged",
    "Question about my invoice",
    "Cannot log in to the customer portal",
    "Request for a quote: 40 licences",
    "Change of delivery address",
    "Refund not received",
    "Warranty claim for model X200",
    "Appointment next Tuesday",
];

const INTL_SUBJECTS: [&str; 6] = [
    "Beschwerde: Lieferung beschädigt – bitte um Rückruf",
    "Réclamation : facture n° 2024-118 erronée",
    "お問い合わせ：注文番号 8841 の配送について",
    "Жалоба на доставку заказа № 5521",
    "استفسار بخصوص الفاتورة رقم ٤٥",
    "Grüße aus Köln — Änderung der Bestellung",
];

const SENTENCES: [&str; 10] = [
    "I am writing about the order I placed last week.",
    "The parcel arrived today but the box was open and two items are missing.",
    "Could you please check the status and let me know when I can expect a reply?",
    "My customer number is on the attached invoice.",
    "I tried calling the hotline twice but nobody answered.",
    "Please send the corrected invoice to the address below.",
    "Thank you for your help, it is much appreciated.",
    "The serial number is printed on the back of the device.",
    "If you need more information, I am available every afternoon.",
    "We would like to extend the contract for another twelve months.",
];

const INTL_SENTENCES: [&str; 5] = [
    "Sehr geehrte Damen und Herren, die Lieferung kam leider beschädigt an. Grüße, Jürgen",
    "Bonjour, la facture reçue contient une erreur ; merci de la corriger. Cordialement",
    "いつもお世話になっております。注文番号 8841 の配送状況を教えてください。",
    "Здравствуйте! Посылка пришла повреждённой, прошу заменить товар.",
    "مرحبا، أرجو التحقق من الفاتورة المرفقة. شكرا لكم",
];

impl MailGen {
    /// A generator whose output depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        MailGen {
            rng: fastrand::Rng::with_seed(seed),
            seed,
            counter: 0,
            thread: Vec::new(),
        }
    }

    /// One message of `kind` addressed to `to`.
    pub fn message(&mut self, to: &str, kind: Kind) -> Vec<u8> {
        self.generate(to, kind).raw
    }

    /// One message whose kind follows a contact-center mix (mostly text and text + HTML,
    /// a fair share of replies and attachments, some international and odd bodies).
    pub fn mixed(&mut self, to: &str) -> Vec<u8> {
        let kind = self.mixed_kind();
        self.message(to, kind)
    }

    /// One message of `kind` with what it is meant to contain.
    pub fn generate(&mut self, to: &str, kind: Kind) -> Generated {
        self.build(to, kind, 0, None)
    }

    /// For the benchmark: about 90 % of messages are 5–50 KiB in total, about 10 % carry one
    /// attachment of 100 KiB–2 MiB (decoded).
    pub fn bench_mix(&mut self, to: &str) -> Vec<u8> {
        if self.rng.u32(0..10) == 0 {
            let size = self.rng.usize(BENCH_LARGE_ATTACHMENT_BYTES);
            self.build(to, Kind::Attachments, 0, Some(size)).raw
        } else {
            let target = self.rng.usize(BENCH_SMALL_TARGET);
            let kind = match self.rng.u32(0..4) {
                0 => Kind::Plain,
                1 => Kind::Reply,
                2 => Kind::International,
                _ => Kind::Alternative,
            };
            self.sized(to, kind, target).raw
        }
    }

    /// A message with broken MIME that a robust parser still reads: a multipart without its
    /// closing boundary, truncated in the middle of a base64 attachment.
    pub fn malformed(&mut self, to: &str) -> Vec<u8> {
        let generated = self.build(to, Kind::Attachments, 0, Some(4096));
        let raw = generated.raw;
        // Cut inside the last attachment's base64 so both the data and the closing
        // boundaries are missing, as when a connection drops mid-transfer.
        let cut = raw.len() - raw.len().min(1500);
        let mut out = raw[..cut].to_vec();
        out.extend_from_slice(b"\r\n");
        out
    }

    /// A valid message of at least `min_bytes`, made large by one attachment.
    pub fn oversize(&mut self, to: &str, min_bytes: usize) -> Vec<u8> {
        // base64 grows data by 4/3 plus CRLF every 76 characters; aim for the decoded size
        // that certainly reaches `min_bytes`.
        let decoded = min_bytes / 4 * 3 + 1024;
        self.build(to, Kind::Attachments, 0, Some(decoded)).raw
    }

    fn mixed_kind(&mut self) -> Kind {
        match self.rng.u32(0..100) {
            0..25 => Kind::Plain,
            25..50 => Kind::Alternative,
            50..62 => Kind::Reply,
            62..74 => Kind::Attachments,
            74..82 => Kind::InlineImage,
            82..92 => Kind::International,
            92..96 => Kind::DotLines,
            _ => Kind::QuotedPrintable,
        }
    }

    /// Builds a message of about `target` bytes by padding its body. The padding is linear in
    /// the body length, so two trial builds (same random state) give the slope.
    fn sized(&mut self, to: &str, kind: Kind, target: usize) -> Generated {
        let start = self.rng.clone();
        let (counter, thread) = (self.counter, self.thread.clone());
        let trial = |generator: &mut MailGen, padding: usize| {
            generator.rng = start.clone();
            generator.counter = counter;
            generator.thread = thread.clone();
            generator.build(to, kind, padding, None)
        };
        let base = trial(self, 0).raw.len();
        let probe = 8 * 1024;
        let grown = trial(self, probe).raw.len();
        let slope = (grown.saturating_sub(base)).max(1) as f64 / probe as f64;
        let padding = (target.saturating_sub(base) as f64 / slope) as usize;
        trial(self, padding)
    }

    fn next_id(&mut self) -> (String, String) {
        self.counter += 1;
        let nonce = self.rng.u32(..);
        let message_id = format!(
            "{:x}.{}.{nonce:08x}@mailgen.ccmail.test",
            self.seed, self.counter
        );
        let marker = format!("mg-{:016x}-{:08}", self.seed, self.counter);
        (message_id, marker)
    }

    fn date(&mut self) -> String {
        let base = Utc.with_ymd_and_hms(2024, 9, 2, 8, 0, 0).single();
        let base = base.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        let at = base + Duration::seconds(self.counter as i64 * 47 + self.rng.i64(0..40));
        let hours = [0, 1, 2, -4, -5, 9, 3][self.rng.usize(0..7)];
        let offset = FixedOffset::east_opt(hours * 3600).unwrap_or(Utc.fix());
        at.with_timezone(&offset).to_rfc2822()
    }

    fn build(
        &mut self,
        to: &str,
        kind: Kind,
        padding: usize,
        big_attachment: Option<usize>,
    ) -> Generated {
        let (message_id, marker) = self.next_id();
        let date = self.date();
        let filler_seed = self.rng.u64(..);
        let international = kind == Kind::International;
        let person = if international {
            &INTL_PEOPLE[self.rng.usize(0..INTL_PEOPLE.len())]
        } else {
            &ASCII_PEOPLE[self.rng.usize(0..ASCII_PEOPLE.len())]
        };

        let mut reply_headers = String::new();
        let mut references = Vec::new();
        let subject = match kind {
            Kind::Reply if !self.thread.is_empty() => {
                let pick = self.rng.usize(0..self.thread.len());
                let parent = self.thread[pick].clone();
                // RFC 5322 §3.6.4: the parent's References followed by the parent's id.
                let mut refs = parent.references.clone();
                refs.push(parent.message_id.clone());
                if refs.len() > MAX_REFERENCES {
                    refs.drain(1..refs.len() - (MAX_REFERENCES - 1));
                }
                let listed: Vec<String> = refs.iter().map(|id| format!("<{id}>")).collect();
                reply_headers = format!(
                    "In-Reply-To: <{}>\r\nReferences: {}\r\n",
                    parent.message_id,
                    listed.join("\r\n ")
                );
                references = refs;
                if parent.subject.starts_with("Re: ") {
                    parent.subject
                } else {
                    format!("Re: {}", parent.subject)
                }
            }
            Kind::Reply => {
                let parent = format!("{:x}.0.thread@mailgen.ccmail.test", self.seed);
                reply_headers = format!("In-Reply-To: <{parent}>\r\nReferences: <{parent}>\r\n");
                references = vec![parent];
                format!("Re: {}", SUBJECTS[self.rng.usize(0..SUBJECTS.len())])
            }
            Kind::International => INTL_SUBJECTS[self.rng.usize(0..INTL_SUBJECTS.len())].into(),
            _ => SUBJECTS[self.rng.usize(0..SUBJECTS.len())].into(),
        };

        let mut text = self.paragraphs(kind);
        let mut filler = fastrand::Rng::with_seed(filler_seed);
        append_filler(&mut text, padding, &mut filler);

        let mut head = String::new();
        head.push_str(&format!(
            "Received: from mx.mailgen.ccmail.test (127.0.0.1) by pop.ccmail.test; {date}\r\n"
        ));
        head.push_str(&format!("From: {}\r\n", mailbox(person, &mut self.rng)));
        head.push_str(&format!("To: {to}\r\n"));
        head.push_str(&format!(
            "Subject: {}\r\n",
            encode_subject(&subject, &mut self.rng)
        ));
        head.push_str(&format!("Date: {date}\r\n"));
        head.push_str(&format!("Message-ID: <{message_id}>\r\n"));
        head.push_str(&reply_headers);
        head.push_str(&format!("X-Ccmail-Marker: {marker}\r\n"));
        head.push_str("MIME-Version: 1.0\r\n");

        let boundary = |n: u32| format!("=_mg_{n}_{:x}_{marker}", filler_seed as u32);
        let mut attachments = Vec::new();
        let body = match kind {
            Kind::Plain | Kind::Reply => text_part(&text, &mut self.rng),
            Kind::DotLines => {
                let mut odd = String::from(".\r\n..starts with two dots\r\n");
                odd.push_str(".hidden line that a POP3 client must un-stuff\r\n");
                odd.push_str("From the desk of the customer, a line mbox would escape\r\n");
                odd.push_str(&text);
                odd.push_str(".\r\nFrom here on: the end\r\n");
                format!(
                    "Content-Type: text/plain; charset=us-ascii\r\n\
                     Content-Transfer-Encoding: 7bit\r\n\r\n{odd}"
                )
            }
            Kind::QuotedPrintable => {
                let mut long = text.clone();
                long.push_str("Zusammenfassung: Die Rücksendung über 129,95 € wurde am Montag ");
                long.push_str("abgeschickt, die Sendungsnummer lautet 00340434161094042557, ");
                long.push_str("bitte bestätigen Sie den Eingang = danke!\r\n");
                format!(
                    "Content-Type: text/plain; charset=utf-8\r\n\
                     Content-Transfer-Encoding: quoted-printable\r\n\r\n{}",
                    quoted_printable(long.as_bytes())
                )
            }
            Kind::Alternative => alternative(&text, &boundary(1), &mut self.rng),
            Kind::International => {
                let which = self.rng.usize(0..5);
                let (name, data) = self.attachment_data(Some(which), None);
                let body = format!(
                    "Content-Type: text/plain; charset=utf-8\r\n\
                     Content-Transfer-Encoding: base64\r\n\r\n{}",
                    base64_lines(text.as_bytes())
                );
                let part = attachment_part(&name, &data, false, None);
                attachments.push((name, data));
                multipart("mixed", &boundary(1), &[body, part])
            }
            Kind::InlineImage => {
                let cid = format!("image001.png@{marker}");
                let len = 2048 + self.rng.usize(0..4096);
                let png = png_like(&mut self.rng, len);
                let html = format!(
                    "Content-Type: text/html; charset=utf-8\r\n\
                     Content-Transfer-Encoding: quoted-printable\r\n\r\n{}",
                    quoted_printable(
                        format!(
                            "<html><body>{}<p><img src=\"cid:{cid}\" alt=\"photo\"></p></body></html>\r\n",
                            html_paragraphs(&text)
                        )
                        .as_bytes()
                    )
                );
                let image = attachment_part("image001.png", &png, true, Some(&cid));
                attachments.push(("image001.png".to_owned(), png));
                let related = multipart("related", &boundary(2), &[html, image]);
                let alt_text = text_part(&text, &mut self.rng);
                multipart("alternative", &boundary(1), &[alt_text, related])
            }
            Kind::Attachments => {
                let count = if big_attachment.is_some() {
                    1
                } else {
                    1 + self.rng.usize(0..3)
                };
                let mut parts = vec![alternative(&text, &boundary(2), &mut self.rng)];
                for _ in 0..count {
                    let (name, data) = self.attachment_data(None, big_attachment);
                    parts.push(attachment_part(&name, &data, false, None));
                    attachments.push((name, data));
                }
                multipart("mixed", &boundary(1), &parts)
            }
        };

        let mut raw = head.into_bytes();
        raw.extend_from_slice(body.as_bytes());
        self.thread.push(Earlier {
            message_id: message_id.clone(),
            subject: subject.clone(),
            references,
        });
        if self.thread.len() > THREAD_MEMORY {
            self.thread.remove(0);
        }
        Generated {
            raw,
            message_id,
            marker,
            subject,
            attachments,
        }
    }

    fn paragraphs(&mut self, kind: Kind) -> String {
        let mut text = String::from("Hello,\r\n\r\n");
        if kind == Kind::International {
            text.push_str(INTL_SENTENCES[self.rng.usize(0..INTL_SENTENCES.len())]);
            text.push_str("\r\n\r\n");
        }
        for _ in 0..1 + self.rng.usize(0..4) {
            let sentence = SENTENCES[self.rng.usize(0..SENTENCES.len())];
            text.push_str(sentence);
            text.push_str("\r\n");
        }
        if kind == Kind::Reply {
            text.push_str("\r\nOn Monday, Contoso Support wrote:\r\n");
            text.push_str("> Thank you for contacting us.\r\n> We will get back to you.\r\n");
        }
        text.push_str("\r\nKind regards\r\n");
        text
    }

    /// An attachment's name and bytes. `intl_index` picks a non-ASCII file name; `size`
    /// forces a size (bench / oversize), otherwise a few KiB.
    fn attachment_data(
        &mut self,
        intl_index: Option<usize>,
        size: Option<usize>,
    ) -> (String, Vec<u8>) {
        let small = 1024 + self.rng.usize(0..6 * 1024);
        let len = size.unwrap_or(small);
        let which = self.rng.usize(0..4);
        let (stem, ext, data) = match which {
            0 => ("invoice", "pdf", pdf_like(&mut self.rng, len)),
            1 => ("photo", "png", png_like(&mut self.rng, len)),
            2 => ("export", "csv", csv_like(&mut self.rng, len)),
            _ => ("contract", "docx", docx_like(&mut self.rng, len)),
        };
        let name = match intl_index {
            Some(i) => {
                let stems = [
                    "Übersicht Größen",
                    "Reçu de caisse",
                    "請求書",
                    "Счёт-фактура",
                    "فاتورة",
                ];
                format!("{} {}.{ext}", stems[i % stems.len()], self.counter)
            }
            None => format!("{stem}-{}.{ext}", self.counter),
        };
        (name, data)
    }
}

fn append_filler(text: &mut String, padding: usize, rng: &mut fastrand::Rng) {
    let goal = text.len() + padding;
    while text.len() < goal {
        let sentence = SENTENCES[rng.usize(0..SENTENCES.len())];
        text.push_str(sentence);
        text.push_str("\r\n");
    }
}

/// `Name <addr>`, with the name as an encoded word when it is not ASCII.
fn mailbox(person: &Person, rng: &mut fastrand::Rng) -> String {
    if person.name.is_ascii() {
        let needs_quotes = person.name.contains([',', '\'', '.', '"']);
        if needs_quotes {
            format!(
                "\"{}\" <{}>",
                person.name.replace('"', "\\\""),
                person.email
            )
        } else {
            format!("{} <{}>", person.name, person.email)
        }
    } else {
        format!(
            "{} <{}>",
            encoded_words(person.name, rng.bool()),
            person.email
        )
    }
}

fn encode_subject(subject: &str, rng: &mut fastrand::Rng) -> String {
    if subject.is_ascii() {
        subject.to_owned()
    } else {
        encoded_words(subject, rng.bool())
    }
}

/// RFC 2047 encoded words, each at most 75 characters, folded onto continuation lines.
fn encoded_words(text: &str, b_encoding: bool) -> String {
    let mut words = Vec::new();
    let mut chunk = String::new();
    // 45 bytes of UTF-8 give 60 base64 characters; Q grows up to 3× for non-ASCII.
    let limit = if b_encoding { 45 } else { 20 };
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > limit {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| {
            if b_encoding {
                format!("=?UTF-8?B?{}?=", B64.encode(w.as_bytes()))
            } else {
                format!("=?UTF-8?Q?{}?=", q_encode(w))
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n ")
}

fn q_encode(text: &str) -> String {
    let mut out = String::new();
    for &b in text.as_bytes() {
        match b {
            b' ' => out.push('_'),
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'*' | b'+' | b'-' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("={b:02X}")),
        }
    }
    out
}

/// RFC 2045 §6.7 quoted-printable with CRLF hard breaks and soft breaks before 76 columns.
fn quoted_printable(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 3 / 2);
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut column = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal = matches!(b, 33..=60 | 62..=126) || (matches!(b, b' ' | b'\t') && !last);
            let piece = if literal {
                (b as char).to_string()
            } else {
                format!("={b:02X}")
            };
            if column + piece.len() > 75 {
                out.push_str("=\r\n");
                column = 0;
            }
            out.push_str(&piece);
            column += piece.len();
        }
        out.push_str("\r\n");
    }
    // split() yields one extra empty line after a final newline.
    if data.ends_with(b"\n") {
        out.truncate(out.len() - 2);
    }
    out
}

fn base64_lines(data: &[u8]) -> String {
    let encoded = B64.encode(data);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for line in encoded.as_bytes().chunks(76) {
        // base64 output is ASCII, so each chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push_str("\r\n");
    }
    out
}

fn text_part(text: &str, rng: &mut fastrand::Rng) -> String {
    if rng.bool() {
        format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n{text}"
        )
    } else {
        format!(
            "Content-Type: text/plain; charset=\"utf-8\"\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n{}",
            quoted_printable(text.as_bytes())
        )
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html_paragraphs(text: &str) -> String {
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| format!("<p>{}</p>", html_escape(l)))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn alternative(text: &str, boundary: &str, rng: &mut fastrand::Rng) -> String {
    let html = format!(
        "<html><head><meta charset=\"utf-8\"></head><body>\r\n{}\r\n</body></html>\r\n",
        html_paragraphs(text)
    );
    let html_part = format!(
        "Content-Type: text/html; charset=utf-8\r\n\
         Content-Transfer-Encoding: quoted-printable\r\n\r\n{}",
        quoted_printable(html.as_bytes())
    );
    multipart("alternative", boundary, &[text_part(text, rng), html_part])
}

/// A multipart entity: its Content-Type header, a blank line, the parts and the closing
/// delimiter. Each part is "headers CRLF CRLF body" and ends with CRLF.
fn multipart(subtype: &str, boundary: &str, parts: &[String]) -> String {
    let mut out = format!("Content-Type: multipart/{subtype}; boundary=\"{boundary}\"\r\n\r\n");
    for part in parts {
        out.push_str(&format!("--{boundary}\r\n{part}"));
        if !part.ends_with("\r\n") {
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    out
}

fn content_type_for(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or_default() {
        "pdf" => "application/pdf",
        "png" => "image/png",
        "csv" => "text/csv",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        _ => "application/octet-stream",
    }
}

/// RFC 2231 `filename*` (with continuations when long) for non-ASCII names; quoted otherwise.
fn filename_params(name: &str) -> (String, String) {
    if name.is_ascii() {
        return (format!("name=\"{name}\""), format!("filename=\"{name}\""));
    }
    let escape = |c: char| -> String {
        let mut utf8 = [0; 4];
        c.encode_utf8(&mut utf8)
            .bytes()
            .map(|b| match b {
                b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'.' | b'-' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let encoded: String = name.chars().map(escape).collect();
    // Continuations split between characters, never inside one: parsers (mail-parser among
    // them) decode each piece on its own, and a split UTF-8 sequence would become U+FFFD.
    let mut pieces: Vec<String> = vec![String::new()];
    for c in name.chars() {
        let e = escape(c);
        if pieces.last().is_some_and(|p| p.len() + e.len() > 40) {
            pieces.push(String::new());
        }
        if let Some(last) = pieces.last_mut() {
            last.push_str(&e);
        }
    }
    let filename = if pieces.len() == 1 {
        format!("filename*=UTF-8''{encoded}")
    } else {
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 0 {
                    format!("filename*0*=UTF-8''{p}")
                } else {
                    format!("filename*{i}*={p}")
                }
            })
            .collect::<Vec<_>>()
            .join(";\r\n ")
    };
    (format!("name*=UTF-8''{encoded}"), filename)
}

fn attachment_part(name: &str, data: &[u8], inline: bool, content_id: Option<&str>) -> String {
    let (name_param, filename_param) = filename_params(name);
    let disposition = if inline { "inline" } else { "attachment" };
    let mut out = format!(
        "Content-Type: {}; {name_param}\r\nContent-Disposition: {disposition};\r\n {filename_param}\r\n",
        content_type_for(name)
    );
    if let Some(cid) = content_id {
        out.push_str(&format!("Content-ID: <{cid}>\r\n"));
    }
    out.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
    out.push_str(&base64_lines(data));
    out
}

fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rng.fill(&mut data);
    data
}

fn pdf_like(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut data = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n".to_vec();
    let body = len.saturating_sub(data.len() + 6);
    data.extend(random_bytes(rng, body));
    data.extend_from_slice(b"%%EOF\n");
    data
}

fn png_like(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut data = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x40\0\0\0\x40\x08\x06\0\0\0".to_vec();
    let body = len.saturating_sub(data.len());
    data.extend(random_bytes(rng, body));
    data
}

fn docx_like(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut data = b"PK\x03\x04\x14\0\x06\0\x08\0\0\0!\0[Content_Types].xml".to_vec();
    let body = len.saturating_sub(data.len());
    data.extend(random_bytes(rng, body));
    data
}

fn csv_like(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut data = b"order;customer;amount;status\r\n".to_vec();
    while data.len() < len {
        let row = format!(
            "{};C{:05};{}.{:02};{}\r\n",
            40000 + rng.u32(0..9999),
            rng.u32(0..99999),
            rng.u32(1..999),
            rng.u32(0..100),
            ["open", "shipped", "returned"][rng.usize(0..3)]
        );
        data.extend_from_slice(row.as_bytes());
    }
    data.truncate(len.max(32));
    data
}

/// The `X-Ccmail-Marker` header value of `raw`, read from its header section only.
pub fn marker(raw: &[u8]) -> Option<String> {
    const NAME: &[u8] = b"x-ccmail-marker:";
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        if line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            let value = String::from_utf8_lossy(&line[NAME.len()..])
                .trim()
                .to_owned();
            return (!value.is_empty()).then_some(value);
        }
    }
    None
}

/// The reply a careless auto-responder of mailbox `from` sends to `original` (a message it
/// received): `Re:` its subject, `In-Reply-To` and `References` its `Message-ID`, and none of
/// the marks RFC 3834 asks for (no `Auto-Submitted`, no `X-Loop`, no null return path), so
/// nothing in it says "automatic". Two such responders answering each other are the mail
/// loop the loop breaker exists for. `n` makes the `Message-ID` and marker unique.
pub fn careless_auto_reply(from: &str, original: &[u8], n: u64) -> Vec<u8> {
    let head_end = original
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(original.len());
    let head = String::from_utf8_lossy(&original[..head_end]);
    let field = |name: &str| {
        head.split("\r\n")
            .find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let to = field("From");
    let subject = field("Subject");
    let message_id = field("Message-ID");
    let local = from.split('@').next().unwrap_or("responder");
    let domain = from.split('@').nth(1).unwrap_or("example.test");
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: Re: {subject}\r\n\
         Date: Mon, 16 Sep 2024 09:00:00 +0000\r\n\
         Message-ID: <{local}-autoreply-{n}@{domain}>\r\nIn-Reply-To: {message_id}\r\n\
         References: {message_id}\r\nX-Ccmail-Marker: {local}-autoreply-{n}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Thank you for your message. We will get back to you shortly.\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccmail::ingest::parse::parse;
    use sha2::Digest;
    use std::collections::HashSet;

    const TO: &str = "support@contoso.com";

    #[test]
    fn every_kind_parses_cleanly_with_intended_content() {
        let mut mail = MailGen::new(7);
        for round in 0..6 {
            for kind in Kind::ALL {
                let g = mail.generate(TO, kind);
                let parsed = parse(&g.raw);
                let context = format!("{kind:?} round {round}");
                assert_eq!(parsed.parse_error, None, "{context}");
                assert!(parsed.defects.is_empty(), "{context}: {:?}", parsed.defects);
                assert_eq!(
                    parsed.subject.as_deref(),
                    Some(g.subject.as_str()),
                    "{context}"
                );
                assert_eq!(parsed.message_id.as_deref(), Some(g.message_id.as_str()));
                assert_eq!(marker(&g.raw).as_deref(), Some(g.marker.as_str()));
                assert!(parsed.date.is_some(), "{context}");
                assert_eq!(parsed.to[0].email.as_deref(), Some(TO));
                assert!(parsed.from[0].name.is_some(), "{context}");
                assert!(
                    parsed
                        .text_body
                        .as_deref()
                        .is_some_and(|t| t.contains("Kind regards")),
                    "{context}"
                );
                let got: Vec<(String, Vec<u8>)> = parsed
                    .attachments
                    .iter()
                    .map(|a| (a.filename.clone().unwrap_or_default(), a.bytes.clone()))
                    .collect();
                let summary = |list: &[(String, Vec<u8>)]| -> Vec<(String, usize, String)> {
                    list.iter()
                        .map(|(n, b)| (n.clone(), b.len(), hex::encode(sha2::Sha256::digest(b))))
                        .collect()
                };
                assert_eq!(summary(&got), summary(&g.attachments), "{context}");
                match kind {
                    Kind::Reply => {
                        assert!(g.subject.starts_with("Re: "));
                        assert_eq!(parsed.in_reply_to.len(), 1);
                        assert_eq!(parsed.references.last(), Some(&parsed.in_reply_to[0]));
                        assert!(parsed.references.len() <= MAX_REFERENCES);
                    }
                    Kind::Alternative | Kind::InlineImage | Kind::Attachments => {
                        assert!(parsed.html_body.is_some(), "{context}");
                    }
                    Kind::DotLines => {
                        let text = parsed.text_body.unwrap_or_default();
                        assert!(text.contains("\r\n..starts with two dots\r\n"));
                        assert!(text.contains("\r\nFrom the desk"));
                    }
                    Kind::QuotedPrintable => {
                        let text = parsed.text_body.unwrap_or_default();
                        assert!(text.contains("129,95 €"));
                        assert!(text.contains("Eingang = danke!"));
                    }
                    Kind::International => {
                        assert!(!g.subject.is_ascii());
                        assert!(!g.attachments[0].0.is_ascii());
                    }
                    Kind::Plain => assert_eq!(parsed.html_body, None),
                }
                if kind == Kind::InlineImage {
                    let image = &parsed.attachments[0];
                    assert!(image.inline);
                    let cid = image.content_id.clone().unwrap_or_default();
                    assert!(
                        parsed
                            .html_body
                            .unwrap_or_default()
                            .contains(&format!("cid:{cid}"))
                    );
                }
            }
        }
    }

    #[test]
    fn replies_build_threads_with_growing_references() {
        let mut mail = MailGen::new(21);
        let mut longest = 0;
        let mut known = HashSet::new();
        for _ in 0..300 {
            let g = mail.generate(TO, Kind::Reply);
            let parsed = parse(&g.raw);
            // Every referenced id except a synthetic thread root was generated before.
            for id in parsed.references.iter().skip(1) {
                assert!(known.contains(id), "unknown reference {id}");
            }
            longest = longest.max(parsed.references.len());
            known.insert(g.message_id);
        }
        assert_eq!(longest, MAX_REFERENCES);
    }

    #[test]
    fn lines_are_crlf_and_short() {
        let mut mail = MailGen::new(3);
        for _ in 0..200 {
            let raw = mail.mixed(TO);
            for line in raw.split_inclusive(|&b| b == b'\n') {
                assert!(
                    line.ends_with(b"\r\n"),
                    "{:?}",
                    String::from_utf8_lossy(line)
                );
                assert!(line.len() <= 998, "line of {} bytes", line.len());
            }
            let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
            let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
            for field in [
                "\ndate: ",
                "from: ",
                "\nto: ",
                "\nsubject: ",
                "\nmessage-id: ",
                "\nmime-version: 1.0",
            ] {
                assert!(head.contains(field), "missing {field} in {head}");
            }
        }
    }

    #[test]
    fn markers_and_message_ids_are_unique_over_1000_messages() {
        let mut mail = MailGen::new(11);
        let mut markers = HashSet::new();
        let mut ids = HashSet::new();
        for _ in 0..1000 {
            let raw = mail.mixed(TO);
            assert!(markers.insert(marker(&raw).unwrap()));
            assert!(ids.insert(parse(&raw).message_id.unwrap()));
        }
        // A second generator with another seed never collides with the first.
        let mut other = MailGen::new(12);
        for _ in 0..100 {
            assert!(!markers.contains(&marker(&other.mixed(TO)).unwrap()));
        }
    }

    #[test]
    fn same_seed_same_bytes() {
        let (mut a, mut b, mut c) = (MailGen::new(42), MailGen::new(42), MailGen::new(43));
        let mut differs = false;
        for _ in 0..50 {
            let (x, y, z) = (a.mixed(TO), b.mixed(TO), c.mixed(TO));
            assert_eq!(x, y);
            differs |= x != z;
        }
        assert_eq!(a.bench_mix(TO), b.bench_mix(TO));
        assert_eq!(a.malformed(TO), b.malformed(TO));
        assert!(differs);
    }

    #[test]
    fn bench_mix_sizes_follow_the_stated_distribution() {
        let mut mail = MailGen::new(5);
        let total = 1000;
        let mut large = 0;
        for _ in 0..total {
            let raw = mail.bench_mix(TO);
            if BENCH_SMALL_BYTES.contains(&raw.len()) {
                continue;
            }
            let parsed = parse(&raw);
            assert_eq!(
                parsed.attachments.len(),
                1,
                "size {} outside both ranges",
                raw.len()
            );
            let size = parsed.attachments[0].bytes.len();
            assert!(
                BENCH_LARGE_ATTACHMENT_BYTES.contains(&size),
                "attachment {size} bytes"
            );
            large += 1;
        }
        assert!(
            (50..=150).contains(&large),
            "{large} large messages of {total}"
        );
    }

    #[test]
    fn malformed_survives_and_oversize_is_big_enough() {
        let mut mail = MailGen::new(9);
        for _ in 0..20 {
            let raw = mail.malformed(TO);
            let parsed = parse(&raw);
            assert_eq!(parsed.parse_error, None);
            assert!(!parsed.defects.is_empty());
            assert!(parsed.text_body.is_some());
            assert!(marker(&raw).is_some());
        }
        for min in [10_000, 1_000_000] {
            let raw = mail.oversize(TO, min);
            assert!(raw.len() >= min);
            assert!(raw.len() < min + min / 2 + 20_000);
            assert_eq!(parse(&raw).parse_error, None);
        }
    }

    #[test]
    fn marker_reads_only_the_header_section() {
        assert_eq!(
            marker(b"Subject: x\r\nx-ccmail-marker:  m-1 \r\n\r\nbody"),
            Some("m-1".to_owned())
        );
        assert_eq!(marker(b"Subject: x\r\n\r\nX-Ccmail-Marker: m-2\r\n"), None);
        assert_eq!(marker(b""), None);
    }

    #[test]
    fn quoted_printable_round_trips() {
        let text = "a = b\r\n".to_owned() + &"ü".repeat(60) + " \r\ntrailing space \r\n";
        let encoded = quoted_printable(text.as_bytes());
        assert!(encoded.split("\r\n").all(|l| l.len() <= 76));
        let decoded =
            mail_parser::decoders::quoted_printable::quoted_printable_decode(encoded.as_bytes())
                .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), text);
    }
}
