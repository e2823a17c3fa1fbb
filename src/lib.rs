//! tcpnetlock: a network lock server. A client holds a named lock for exactly as long as its TCP
//! connection lives; the wire protocol is the line protocol of tcpnetlock 0.1.8 (docs/PROTOCOL.md).
//!
//! The crate is layered so each part can be tested alone: [`protocol`] turns bytes into requests
//! and replies into bytes, [`table`] decides who holds what, and [`server`] does the sockets and
//! threads around them. [`client`] is the blocking client library (a lock is a guard that
//! releases on drop); the command line tools in [`cli`] are built on it.

pub mod cli;
pub mod client;
pub mod log;
pub mod protocol;
pub mod server;
pub mod status;
pub mod table;
