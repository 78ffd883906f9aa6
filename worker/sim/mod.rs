//! Simulators of Exchange Online POP3S and the Entra ID token endpoint, for `ccmail demo` and
//! the tests. They listen on 127.0.0.1 only.

pub mod cert;
pub mod mailgen;
