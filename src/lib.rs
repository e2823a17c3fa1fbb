//! A client for tcpnetlock, a network lock server: a lock is held for exactly as long as the TCP
//! connection that took it lives.
//!
//! [`client`] is the blocking client (a granted lock is a guard that releases on drop);
//! [`protocol`] is the line protocol both sides speak (docs/PROTOCOL.md), the protocol of
//! tcpnetlock 0.1.8 plus opt-in extensions. The server and the command-line tools are the
//! `tcpnetlock` program built from this package; none of them is part of this library.

pub mod client;
pub mod protocol;
pub mod status;
