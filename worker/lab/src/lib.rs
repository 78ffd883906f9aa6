//! ccmail's lab: everything that exercises the product without being part of it.
//!
//! [`sim`] plays Exchange Online POP3S and the Entra ID token endpoint on 127.0.0.1;
//! [`dovecot`] runs a private Dovecot POP3S server as a child process;
//! [`testdb`] makes a fresh, migrated PostgreSQL database per test; [`demo`], [`bench`] and
//! [`soak`] are the `ccmail-lab` subcommands; [`world`] builds the one simulated world they and
//! the tests run against; [`child`] and [`wait`] are the one way the tests and the soak run a
//! binary as a child process and wait for a condition. Invariant: the production crate `ccmail` never
//! depends on this one (it is only a dev-dependency there), so no simulator, certificate
//! generator or test-database helper ships in the product binary.

pub mod bench;
pub mod child;
pub mod demo;
pub mod dovecot;
pub mod sim;
pub mod soak;
pub mod testdb;
pub mod wait;
pub mod work_bench;
pub mod workload;
pub mod world;
