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
    /// An agent has it.
    Assigned,
    /// Handled.
    Done,
}

impl WorkItemStatus {
    /// Every status, in life order.
    pub const ALL: [WorkItemStatus; 3] = [
        WorkItemStatus::Queued,
        WorkItemStatus::Assigned,
        WorkItemStatus::Done,
    ];
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
