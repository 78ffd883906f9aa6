//! The model's enums as the database writes them: the only place that turns a
//! [`WorkItemStatus`] or a [`Flag`] into text and back.
//!
//! Invariant: the status words are exactly those the `work_items_status` constraint allows;
//! the flag words are what agents and dashboards already read in `work_items.flags`.

use std::fmt;

use crate::model::{Flag, WorkItemStatus};

impl WorkItemStatus {
    /// The word in `work_items.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkItemStatus::Queued => "queued",
            WorkItemStatus::Offered => "offered",
            WorkItemStatus::Accepted => "accepted",
            WorkItemStatus::Done => "done",
            WorkItemStatus::Cancelled => "cancelled",
            WorkItemStatus::Held => "held",
        }
    }

    /// Parses [`WorkItemStatus::as_str`]'s words.
    pub fn parse(word: &str) -> Option<WorkItemStatus> {
        WorkItemStatus::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl fmt::Display for WorkItemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for WorkItemStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Flag {
    /// The word in `work_items.flags`.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Oversize => "oversize",
            Flag::FetchFailed => "fetch_failed",
            Flag::StoreError => "store_error",
            Flag::ParseError => "parse_error",
            Flag::HeaderTruncated => "header_truncated",
            Flag::MimeTruncated => "mime_truncated",
            Flag::MimeTooDeep => "mime_too_deep",
            Flag::HtmlNotSanitized => "html_not_sanitized",
            Flag::ParseTimeout => "parse_timeout",
            Flag::ParseSkipped => "parse_skipped",
            Flag::Automatic => "automatic",
        }
    }

    /// Parses [`Flag::as_str`]'s words.
    pub fn parse(word: &str) -> Option<Flag> {
        Flag::ALL.into_iter().find(|f| f.as_str() == word)
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A flag read back from the database equals the enum it was written from.
impl PartialEq<Flag> for String {
    fn eq(&self, other: &Flag) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Flag> for &str {
    fn eq(&self, other: &Flag) -> bool {
        *self == other.as_str()
    }
}

/// Reads a `work_items.status` word.
pub(crate) fn status(word: &str) -> Result<WorkItemStatus, super::StoreError> {
    WorkItemStatus::parse(word).ok_or_else(|| super::StoreError::UnexpectedValue {
        column: "work_items.status",
        value: word.to_owned(),
    })
}

/// Reads a `work_items.flags` word.
pub(crate) fn flag(word: &str) -> Result<Flag, super::StoreError> {
    Flag::parse(word).ok_or_else(|| super::StoreError::UnexpectedValue {
        column: "work_items.flags",
        value: word.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn words_round_trip_and_agree_with_the_serde_names() {
        for flag in Flag::ALL {
            assert_eq!(Flag::parse(flag.as_str()), Some(flag));
            let json = serde_json::to_string(&flag).unwrap();
            assert_eq!(json, format!("\"{}\"", flag.as_str()));
        }
        for status in WorkItemStatus::ALL {
            assert_eq!(WorkItemStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(Flag::parse("nope"), None);
    }
}
