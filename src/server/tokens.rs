//! Fencing tokens that never go back, across restarts too.
//!
//! Tokens follow the wall clock. A run's first token is the clock in microseconds plus one, and
//! the table counts up from there, one per grant. This server grants far fewer than one lock per
//! microsecond (about 21,000 a second on 2 cores, see docs/BENCHMARKS.md), so every token is at or
//! below the clock when it is granted, and the next run, starting from the clock, starts above
//! it: file or no file, as long as the clock has not stepped back.
//!
//! `--state-dir` guards against a clock that steps back. The server stores a *reservation* R in
//! `DIR/token-reservation`: no token above R leaves the server, and the next run starts above R.
//! R is kept only a small block ([`BLOCK`], 0.1 s of microseconds) above the highest token or the
//! clock, whichever is higher, rather than far ahead, so that tokens stay on the clock:
//!
//! - a restart within 0.1 s of the last write finds R at most 0.1 s ahead of the clock and waits
//!   for the clock to pass it (up to [`MAX_START_WAIT`], which also rides out a small step back
//!   of the clock) instead of jumping ahead. Tokens therefore never run ahead of the clock, and
//!   losing the file later cannot make them go back;
//! - an R further ahead means the clock stepped back (or the file was edited): the run continues
//!   above R, ahead of the clock, and says so. With the file, tokens never go back;
//! - an R beyond any value this server writes is damage: the run continues from 2^63, far above
//!   the clock and far below the end of u64, and says so.
//!
//! R is extended where a token leaves the server ([`Tokens::cover`], called before a grant's
//! reply is written) rather than in the table, so the table stays pure and its mutex never waits
//! for a disk. A grant whose token is above R waits for the write, on its own thread; the first
//! grant within half a block of R extends it (one fsync before its reply) while other grants go
//! on. Writes are rare: tokens fall behind the clock by nearly a second every second, and each
//! extension puts R a block above the clock, so the gaps between writes grow geometrically (at
//! 30,000 grants a second: at start, then ~1.7 s, ~1 minute, ~half an hour, ~18 hours in).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};

const FILE: &str = "token-reservation";

/// How far the reservation runs ahead of the tokens and the clock, in microseconds: the longest
/// an ordinary restart waits, and (at 30,000 grants a second) 1.7 s of grants between writes at
/// the start of a run.
pub const BLOCK: u64 = 100_000;

/// The longest a start waits for the clock to pass the stored reservation, in microseconds. A
/// reservation further ahead is not waited for: tokens continue above it.
pub const MAX_START_WAIT: u64 = 1_000_000;

/// A stored reservation at or above this (2^63 + 2^62) cannot come from this server: it only
/// stores values a block above its tokens, which follow the clock (about 2^51 in 2026; 2^63 µs is
/// 292,000 years). Continuing from it would leave too few tokens before u64 wraps.
const DAMAGED_FROM: u64 = 3 << 62;

/// Where tokens continue after a damaged reservation: far above the clock, with 2^62 tokens of
/// room before [`DAMAGED_FROM`], so the reservations this run stores are read back as they are.
const AFTER_DAMAGE: u64 = 1 << 63;

/// After a failed write, grants go on without one for this long before the next attempt, so a
/// full disk costs one error line every 10 s and no latency.
const RETRY: Duration = Duration::from_secs(10);

/// The token source's persistent side: chooses the first token and keeps the stored
/// reservation above every token handed out. Shared by every connection (no `&mut`).
pub struct Tokens {
    /// `None` without `--state-dir`: tokens come from the clock alone.
    store: Option<Store>,
}

struct Store {
    path: PathBuf,
    dir: PathBuf,
    /// The stored reservation: tokens up to this may leave the server.
    reserved: AtomicU64,
    /// `reserved - BLOCK / 2`: a token above this extends the reservation. The fast path of
    /// [`Tokens::cover`] is one load of this.
    refresh_at: AtomicU64,
    /// Held while writing, so one grant writes and the others either go on or wait for it.
    writer: Mutex<Writer>,
}

struct Writer {
    /// After a failed write: no new attempt before this.
    retry_after: Option<Instant>,
}

/// How a run chooses its first token, from the stored reservation and the clock.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The clock is past the reservation (or there is none): start from the clock.
    Clock,
    /// The reservation is a little ahead of the clock: wait until the clock passes it.
    Wait { until: u64 },
    /// The reservation is far ahead of the clock (the clock stepped back): continue above it.
    Above { reservation: u64 },
    /// The stored value cannot be a reservation this server wrote: continue from 2^63.
    Damaged { stored: u64 },
}

fn plan(stored: Option<u64>, wall_us: u64) -> Plan {
    match stored {
        Some(r) if r >= DAMAGED_FROM => Plan::Damaged { stored: r },
        Some(r) if r > wall_us.saturating_add(MAX_START_WAIT) => Plan::Above { reservation: r },
        Some(r) if r >= wall_us => Plan::Wait { until: r },
        _ => Plan::Clock,
    }
}

/// The reservation that covers `token`: a block above it or above the clock, whichever is
/// higher, and never below what is stored already.
fn reservation_for(token: u64, wall_us: u64, stored: u64) -> u64 {
    token.max(wall_us).saturating_add(BLOCK).max(stored)
}

impl Tokens {
    /// Chooses the first token of this run and, with a state directory, stores the reservation
    /// that covers it before any grant. May wait up to [`MAX_START_WAIT`] (see the module doc).
    /// Errors name the file or directory concerned.
    pub fn start(state_dir: Option<&Path>) -> io::Result<(u64, Tokens)> {
        let Some(dir) = state_dir else {
            return Ok((wall_us().saturating_add(1), Tokens { store: None }));
        };
        check_dir(dir)?;
        let path = dir.join(FILE);
        let first = first_token(&path, read(&path)?);
        let store = Store {
            path,
            dir: dir.to_owned(),
            reserved: AtomicU64::new(0),
            refresh_at: AtomicU64::new(0),
            writer: Mutex::new(Writer { retry_after: None }),
        };
        store.extend(first)?;
        debug!(
            "fencing tokens start at {first}; {} holds {}",
            store.path.display(),
            store.reserved.load(Ordering::Acquire)
        );
        Ok((first, Tokens { store: Some(store) }))
    }

    /// Makes sure the stored reservation covers `token` before it leaves the server: call it
    /// before writing a grant. Usually one atomic load. Past the reservation it waits for the
    /// write; if the write fails, the token goes out anyway (an outage is worse) with an error
    /// logged: it still follows the clock, only a clock stepped back before the next start
    /// could then make tokens go back.
    pub fn cover(&self, token: u64) {
        let Some(store) = &self.store else { return };
        if token <= store.refresh_at.load(Ordering::Acquire) {
            return;
        }
        let beyond = token > store.reserved.load(Ordering::Acquire);
        let mut writer = if beyond {
            store.writer.lock().unwrap_or_else(PoisonError::into_inner)
        } else {
            match store.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // Another grant is extending it; this token is covered already.
                Err(TryLockError::WouldBlock) => return,
            }
        };
        if token <= store.refresh_at.load(Ordering::Acquire) {
            return; // extended while this grant waited
        }
        if writer.retry_after.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match store.extend(token) {
            Ok(()) => {
                if writer.retry_after.take().is_some() {
                    info!(
                        "{}: fencing-token reservation stored again",
                        store.path.display()
                    );
                }
            }
            Err(e) => {
                error!(
                    "cannot extend the fencing-token reservation: {e}; tokens above {} go out \
                     without it (next attempt in {} s): they follow the clock, but if the clock \
                     steps back before the next start, tokens may go back",
                    store.reserved.load(Ordering::Acquire),
                    RETRY.as_secs()
                );
                writer.retry_after = Some(Instant::now() + RETRY);
            }
        }
    }
}

impl Store {
    /// Stores a reservation covering `token`, then publishes it. Callers hold `writer` (or are
    /// alone, at start).
    fn extend(&self, token: u64) -> io::Result<()> {
        let until = reservation_for(token, wall_us(), self.reserved.load(Ordering::Acquire));
        write_reservation(&self.path, &self.dir, until)?;
        self.reserved.store(until, Ordering::Release);
        self.refresh_at.store(until - BLOCK / 2, Ordering::Release);
        Ok(())
    }
}

/// The first token of the run: above the stored reservation, and on the clock whenever that is
/// possible (see [`Plan`]).
fn first_token(path: &Path, stored: Option<u64>) -> u64 {
    let wall = wall_us();
    match plan(stored, wall) {
        Plan::Clock => {
            if stored.is_none() {
                info!(
                    "{}: no fencing-token reservation (first start with this directory, or the \
                     file was lost): tokens start from the clock",
                    path.display()
                );
            }
            wall.saturating_add(1)
        }
        Plan::Wait { until } => {
            info!(
                "{}: the fencing-token reservation is {} ahead of the clock: waiting for the \
                 clock to pass it, so that tokens stay on the clock",
                path.display(),
                micros(until - wall)
            );
            wait_for_clock(until)
        }
        Plan::Above { reservation } => {
            warn!(
                "{}: the fencing-token reservation {reservation} is {} ahead of the clock (did \
                 the clock step back?): tokens continue above it, ahead of the clock, so they \
                 do not go back; keep this file until the clock has caught up",
                path.display(),
                micros(reservation - wall)
            );
            reservation + 1
        }
        Plan::Damaged { stored } => {
            warn!(
                "{}: {stored} is beyond any fencing-token reservation this server stores \
                 (tokens follow the clock in microseconds, now {wall}): treating the file as \
                 damaged and continuing from 2^63 = {AFTER_DAMAGE}; if no holder ever had a \
                 token that large, stop the server and delete the file to return to the clock",
                path.display()
            );
            AFTER_DAMAGE.max(wall).saturating_add(1)
        }
    }
}

/// Sleeps until the clock is past `until`, then returns the clock plus one. Gives up after
/// [`MAX_START_WAIT`] (the clock stepping back while we wait) and returns `until + 1`.
fn wait_for_clock(until: u64) -> u64 {
    let give_up = Instant::now() + Duration::from_micros(MAX_START_WAIT);
    loop {
        let wall = wall_us();
        if wall > until {
            return wall.saturating_add(1);
        }
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!(
                "the clock did not pass the fencing-token reservation {until} in {}: tokens \
                 continue above it, ahead of the clock",
                micros(MAX_START_WAIT)
            );
            return until.saturating_add(1);
        }
        thread::sleep(Duration::from_micros(until - wall + 1).min(left));
    }
}

/// The state directory must exist: creating it here could put state where no one looks for it
/// (a typo), and systemd's StateDirectory= or the packages make it with the right owner.
fn check_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("the state directory {} is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
            e.kind(),
            format!(
                "the state directory {} does not exist: create it (with systemd, \
                 StateDirectory= does)",
                dir.display()
            ),
        )),
        Err(e) => Err(context(
            e,
            &format!("cannot use the state directory {}", dir.display()),
        )),
    }
}

/// The stored reservation, if there is one.
fn read(path: &Path) -> io::Result<Option<u64>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(context(e, &format!("cannot read {}", path.display()))),
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim().parse::<u64>().map(Some).map_err(|_| {
        let shown: String = text.chars().take(40).collect();
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {shown:?}, not a number: if the file was damaged, delete it (tokens \
                 then start from the clock, above every earlier token unless the clock stepped \
                 back) or write into it the highest token a holder may have seen",
                path.display()
            ),
        )
    })
}

/// Write, sync, rename, sync the directory: a crash or a power loss leaves the old reservation
/// or the new one, never a torn file, and never the old one once a token above it went out.
fn write_reservation(path: &Path, dir: &Path, until: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let at = |what: &str, p: &Path| {
        let what = format!("cannot {what} {}", p.display());
        move |e: io::Error| context(e, &what)
    };
    let mut f = fs::File::create(&tmp).map_err(at("create", &tmp))?;
    writeln!(f, "{until}").map_err(at("write", &tmp))?;
    f.sync_all().map_err(at("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(at(&format!("rename {} to", tmp.display()), path))?;
    // The rename lives in the directory: until the directory is synced, a power loss can bring
    // back the old reservation, below tokens that already went out.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("sync the directory", dir))
}

fn context(e: io::Error, what: &str) -> io::Error {
    let hint = if e.kind() == io::ErrorKind::PermissionDenied {
        " (is --state-dir writable by the user the server runs as?)"
    } else {
        ""
    };
    io::Error::new(e.kind(), format!("{what}: {e}{hint}"))
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A duration in microseconds, for people: `0.25 s`, `3.2 days`.
fn micros(us: u64) -> String {
    let secs = us as f64 / 1e6;
    if secs < 120.0 {
        format!("{secs:.3} s")
    } else if secs < 2.0 * 86_400.0 {
        format!("{:.1} hours", secs / 3600.0)
    } else {
        format!("{:.1} days", secs / 86_400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tcpnetlock-tokens-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn stored(dir: &Path) -> u64 {
        fs::read_to_string(dir.join(FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn the_plan_waits_for_a_near_reservation_and_continues_above_a_far_one() {
        let wall = 1_800_000_000_000_000;
        assert_eq!(plan(None, wall), Plan::Clock);
        assert_eq!(plan(Some(wall - 1), wall), Plan::Clock);
        assert_eq!(plan(Some(wall), wall), Plan::Wait { until: wall });
        let near = wall + MAX_START_WAIT;
        assert_eq!(plan(Some(near), wall), Plan::Wait { until: near });
        assert_eq!(
            plan(Some(near + 1), wall),
            Plan::Above {
                reservation: near + 1
            }
        );
        assert_eq!(
            plan(Some(DAMAGED_FROM - 1), wall),
            Plan::Above {
                reservation: DAMAGED_FROM - 1
            }
        );
        for huge in [DAMAGED_FROM, u64::MAX] {
            assert_eq!(plan(Some(huge), wall), Plan::Damaged { stored: huge });
        }
        // A clock near the end of u64 does not overflow the comparison.
        assert_eq!(plan(Some(5), u64::MAX), Plan::Clock);
    }

    #[test]
    fn reservations_are_a_block_above_the_token_or_the_clock() {
        assert_eq!(reservation_for(10, 1_000, 0), 1_000 + BLOCK);
        assert_eq!(reservation_for(5_000, 1_000, 0), 5_000 + BLOCK);
        // Never lower than what is stored, even if the clock stepped back.
        assert_eq!(reservation_for(10, 1_000, 9_999_999), 9_999_999);
        assert_eq!(reservation_for(u64::MAX - 1, 0, 0), u64::MAX);
    }

    #[test]
    fn grants_extend_the_reservation_before_they_pass_it() {
        let dir = temp_dir("extend");
        let (first, tokens) = Tokens::start(Some(&dir)).unwrap();
        let at_start = stored(&dir);
        assert!(
            at_start >= first + BLOCK - 1,
            "{at_start} for first token {first}"
        );
        // Well inside the block: nothing written.
        tokens.cover(first + 10);
        assert_eq!(stored(&dir), at_start);
        // A token past the reservation (tokens far ahead of the clock): stored before it goes.
        let far = at_start + 5 * BLOCK;
        tokens.cover(far);
        assert_eq!(stored(&dir), far + BLOCK);
        // Within half a block of the end: extended ahead of time.
        tokens.cover(far + BLOCK / 2 + 1);
        assert_eq!(stored(&dir), far + BLOCK / 2 + 1 + BLOCK);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_lets_the_grant_go_and_is_retried_later() {
        let dir = temp_dir("fail");
        let (first, tokens) = Tokens::start(Some(&dir)).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        // Returns (does not block or panic) although nothing can be written.
        tokens.cover(first + 10 * BLOCK);
        let store = tokens.store.as_ref().unwrap();
        assert!(store.writer.lock().unwrap().retry_after.is_some());
        // Within the retry pause no new attempt: the directory stays absent.
        tokens.cover(first + 20 * BLOCK);
        assert!(!dir.exists());
    }

    #[test]
    fn without_state_the_clock_decides() {
        let before = wall_us();
        let (first, tokens) = Tokens::start(None).unwrap();
        assert!(first > before && first <= wall_us() + 1);
        tokens.cover(u64::MAX); // nothing to keep
    }
}
