//! A client for tcpnetlock, a network lock server: a lock is held for exactly as long as the TCP
//! connection that took it lives.
//!
//! [`client`] is the blocking client (a granted lock is a guard that releases on drop);
//! [`status`] holds the types of what `.stats` and `.locks` report; [`protocol`] is the line
//! protocol both sides speak (docs/PROTOCOL.md), the protocol of tcpnetlock 0.1.8 plus opt-in
//! extensions. The server and the command-line tools are the `tcpnetlock` program built from
//! this package; none of them is part of this library, and a program that depends on it with
//! `default-features = false` builds none of their dependencies.
//!
//! ```no_run
//! # fn build_report() {}
//! # fn run_migrations(_token: Option<u64>) {}
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tcpnetlock::client::{Client, Error};
//!
//! let client = Client::new("localhost", 7654).client_id("migrations-job");
//!
//! // Granted or refused at once, as with 0.1.8:
//! match client.try_lock("nightly-report") {
//!     Ok(_lock) => build_report(), // released when `_lock` goes
//!     Err(Error::NotGranted) => println!("a report is being built"),
//!     Err(e) => return Err(e.into()),
//! }
//!
//! // Queue for up to a minute, and take a fencing token with the grant:
//! let lock = client
//!     .request("django-migrations")
//!     .wait(Duration::from_secs(60))
//!     .fencing(true)
//!     .take()?;
//! run_migrations(lock.token());
//! lock.release()?; // or drop it: released either way
//! # Ok(())
//! # }
//! ```

// Every public item has docs (checked here) and an example (rustdoc's check for that is not
// stable yet: `cargo +nightly rustdoc --lib -- -Z unstable-options -Z crate-attr=
// 'feature(rustdoc_missing_doc_code_examples)' -W rustdoc::missing_doc_code_examples`).
#![warn(missing_docs)]

pub mod client;
pub mod protocol;
pub mod status;
