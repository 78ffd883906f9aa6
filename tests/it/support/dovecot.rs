//! The private Dovecot instance lives in the lab (`ccmail_lab::dovecot`), shared with
//! `ccmail-lab bench --server dovecot`.

pub use ccmail_lab::dovecot::{Dovecot, DovecotOptions};
