//! Plain data shared by the layers: the parsed mail and the rule that keeps its text
//! storable, the pilot's protocol-neutral facts, the defaults written once, the work-item
//! words, and the one retry decision every layer's error gives the supervisor.
//!
//! The bottom layer: nothing here does I/O or knows SQL, and nothing here imports another
//! ccmail module except `display`. Conversions to and from database text live in `store/`.

pub mod defaults;
pub mod mail;
pub mod pilot;
pub mod retry;
pub mod text;
pub mod triage;
pub mod work_item;

pub use mail::{Address, Attachment, ParseLimits, ParsedMail};
pub use pilot::{AppKey, AssertionAlg, TlsMode};
pub use retry::Retry;
pub use work_item::{Flag, WorkItemStatus};
