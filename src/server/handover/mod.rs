//! Handing live connections to the next server process, so that a restart or an upgrade drops
//! no lock (issue 14). Self-contained (std and libc only) so it can be mounted into the server
//! as it is: the prototype in `tests/handover-proto` builds these files with `#[path]`.
//!
//! The old process packs what the next one needs into two descriptors, whatever the transport:
//!
//! - the **state**: the lock table and every connection's unparsed bytes, serialised by the caller
//!   into a sealed memfd ([`state`]), so its size is not bounded by a socket buffer or the
//!   environment;
//! - the **bag**: one datagram socket whose receive queue holds every connection's descriptor in
//!   flight ([`bag`]). One descriptor instead of thousands: systemd's fd store compares each new
//!   descriptor with every stored one (O(n²) for n connections), and an exec keeps only the
//!   descriptors whose close-on-exec flag was cleared.
//!
//! Two transports carry them:
//!
//! - under systemd, on SIGTERM, the file descriptor store ([`notify`]: `FDSTORE=1` with
//!   `FileDescriptorStoreMax=` set): systemd hands them to the next process of the unit in
//!   `LISTEN_FDS`, after the socket unit's listeners, named by `FDNAME=` ([`listen`]);
//! - without systemd, on SIGUSR2, an exec of the server's own executable ([`reexec`]) keeping the
//!   two descriptors and the listeners open, their numbers passed in the environment.
//!
//! The new process finds each connection by its socket's inode ([`listen::inode`]), which the
//! old one wrote into the state: descriptor numbers and the order systemd passes stored
//! descriptors in both change on the way.

pub mod bag;
pub mod listen;
pub mod notify;
pub mod reexec;
pub mod state;
