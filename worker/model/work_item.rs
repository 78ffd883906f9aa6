//! The words of a work item: its status and its flags, as enums.
//!
//! Plain data: the database keeps them as text, and the mapping to and from that text lives
//! in `store/` only (one place that must agree with the schema's constraints). The serde
//! names (for the golden parse files) are the same words; a store test proves it.

/// Where a work item is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkItemStatus {
    /// Waiting for an agent.
    Queued,
    /// Offered to one agent, who has until the offer expires to accept it.
    Offered,
    /// An agent works on it, holding a lease it renews.
    Accepted,
    /// Handled.
    Done,
    /// Withdrawn (spam, merged, no longer needed); the mail stays stored.
    Cancelled,
    /// Kept for a supervisor, never offered (automatic mail, too many offers).
    Held,
}

impl WorkItemStatus {
    /// Every status, in life order.
    pub const ALL: [WorkItemStatus; 6] = [
        WorkItemStatus::Queued,
        WorkItemStatus::Offered,
        WorkItemStatus::Accepted,
        WorkItemStatus::Done,
        WorkItemStatus::Cancelled,
        WorkItemStatus::Held,
    ];

    /// An agent holds it under a claim token.
    pub fn is_claimed(self) -> bool {
        matches!(self, WorkItemStatus::Offered | WorkItemStatus::Accepted)
    }

    /// Nothing more happens to it unless someone reopens it.
    pub fn is_final(self) -> bool {
        matches!(self, WorkItemStatus::Done | WorkItemStatus::Cancelled)
    }
}

/// Why a work item needs a closer look: what ingest or the parser could not do normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// Larger than the pilot's size limit: only the header section is stored.
    Oversize,
    /// Downloading it kept failing: only the header section is stored.
    FetchFailed,
    /// Storing it in full kept failing: only the header section is stored.
    StoreError,
    /// The bytes could not be parsed as a message (the raw message is stored).
    ParseError,
    /// A header value was longer than the store keeps (the raw message is stored whole).
    HeaderTruncated,
    /// Only a prefix of the MIME structure was parsed (a parse limit was reached).
    MimeTruncated,
    /// The MIME structure is nested deeper than any mail client writes.
    MimeTooDeep,
    /// The HTML body was too large or too deep to sanitise affordably.
    HtmlNotSanitized,
    /// Parsing ran past its time budget: only the header section was parsed.
    ParseTimeout,
    /// The full parse did not run: only the header section was parsed.
    ParseSkipped,
    /// Automatic mail routed anyway (the pilot's class policy says `route_flagged`).
    Automatic,
}

impl Flag {
    /// Every flag.
    pub const ALL: [Flag; 11] = [
        Flag::Oversize,
        Flag::FetchFailed,
        Flag::StoreError,
        Flag::ParseError,
        Flag::HeaderTruncated,
        Flag::MimeTruncated,
        Flag::MimeTooDeep,
        Flag::HtmlNotSanitized,
        Flag::ParseTimeout,
        Flag::ParseSkipped,
        Flag::Automatic,
    ];
}
