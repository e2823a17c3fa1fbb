//! While `do -w` or `lock -w` waits in a lock's queue, stderr says for whom: who holds the lock
//! and for how long, how many are ahead, and how long the wait may still last.
//!
//! The protocol is not changed for it. The waiting connection is left alone (the grant arrives
//! on it); a thread asks `.locks` on connections of its own, at most once a second (each
//! `.locks` is a full snapshot on the server), and finds this client in the lock's `waiters` by
//! the waiting connection's local address, which is the `peer` the server shows. Behind a NAT
//! or a proxy the two differ: the place is then unknown, and the rest is still shown.
//!
//! Nothing is shown for a wait that ends within [`FIRST_LOOK`], so an uncontended `do -w` costs
//! no `.locks` request and prints nothing. Then:
//!
//! - **stderr a terminal, and we in its foreground:** one status line, rewritten in place every
//!   second (`\r`, erase line), cut to the terminal's width, and erased once the wait ends,
//!   before anything else is written (the command's own output, `ok`). Not drawn while the job
//!   is in the background (it would land in the middle of the shell's line), and never after
//!   the wait: from then on the terminal is the command's.
//! - **otherwise (a log, a pipe, a background job, `TERM=dumb`):** one line when the wait
//!   starts; with `-v`, one more each time the holders change.
//!
//! The grant is never delayed by any of this: the thread only asks with timeouts of a second,
//! and ending the wait does not wait for it. It only writes while holding the [`Screen`] lock
//! and after checking that the wait has not ended, so nothing it writes comes after the line is
//! erased; a `.locks` it still has under way when the command starts is dropped.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::output::{printable, with_sigttou_blocked};
use super::status::human_duration;
use tcpnetlock::client::{self, Asked, Client, Lock, LockBuilder};
use tcpnetlock::status::{HolderInfo, Locks, Mode};

/// How long a wait lasts before it is shown: long enough for an uncontended grant to arrive
/// even over a slow link, short enough to feel immediate.
const FIRST_LOOK: Duration = Duration::from_millis(200);
/// Between two `.locks` requests (from the start of one to the start of the next).
const EVERY: Duration = Duration::from_secs(1);
/// Connect and reply timeout of each `.locks` request: a slow answer is skipped, never waited
/// for past the next tick.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Without a size from the terminal.
const DEFAULT_WIDTH: usize = 80;
/// Carriage return, then erase the whole line (ECMA-48 EL 2).
const ERASE: &str = "\r\x1b[2K";

/// Takes the lock as `request` says. With a `wait` above zero, the wait is shown on stderr
/// once it lasts (see the module's documentation); `verbose` adds a line per change of holder
/// where stderr is not a live terminal.
pub fn take(
    request: &LockBuilder<'_>,
    name: &str,
    wait: Option<Duration>,
    verbose: bool,
) -> Result<Lock, client::Error> {
    let Some(wait) = wait.filter(|w| !w.is_zero()) else {
        return request.take();
    };
    let mut watch = None;
    let taken = request.take_with(|asked| {
        watch = Watch::start(name, wait, *asked, verbose);
    });
    if let Some(watch) = watch {
        watch.stop();
    }
    taken
}

/// Where the wait is shown, decided when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Display {
    /// A status line kept up to date on the terminal.
    Live,
    /// Lines, each written once.
    Lines { verbose: bool },
}

/// What the watching thread and the thread that waits for the grant share.
struct Shared {
    screen: Mutex<Screen>,
    /// Woken when the wait ends.
    ended: Condvar,
}

struct Screen {
    /// The wait has ended: write nothing more.
    ended: bool,
    /// A status line is on the terminal and not erased yet.
    drawn: bool,
}

impl Shared {
    fn screen(&self) -> MutexGuard<'_, Screen> {
        self.screen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The watching thread, seen from the thread that waits for the grant.
struct Watch {
    shared: Arc<Shared>,
}

impl Watch {
    /// Starts watching the wait for `name`; `None` if no thread can be started (the wait then
    /// goes unreported: it is not a reason to give it up).
    fn start(name: &str, wait: Duration, asked: Asked, verbose: bool) -> Option<Watch> {
        let display = if stderr_is_live_terminal() {
            Display::Live
        } else {
            Display::Lines { verbose }
        };
        let shared = Arc::new(Shared {
            screen: Mutex::new(Screen {
                ended: false,
                drawn: false,
            }),
            ended: Condvar::new(),
        });
        let watcher = Watcher {
            name: name.to_owned(),
            me: asked.local_addr(),
            server: poll_client(asked.server_addr()),
            deadline: Instant::now() + wait,
            display,
            shared: Arc::clone(&shared),
        };
        spawn_without_signals(move || watcher.run()).ok()?;
        Some(Watch { shared })
    }

    /// The wait has ended (granted, refused, failed): the status line goes, and nothing more
    /// is written about the wait. Does not wait for the thread.
    fn stop(self) {
        let mut screen = self.shared.screen();
        screen.ended = true;
        if std::mem::take(&mut screen.drawn) && in_terminal_foreground() {
            with_sigttou_blocked(|| write_stderr(ERASE));
        }
        drop(screen);
        self.shared.ended.notify_all();
    }
}

/// A client for `.locks` on the very server address the lock was asked of (a name may resolve
/// to several servers).
fn poll_client(server: SocketAddr) -> Client {
    let host = match server {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => format!("{}%{}", v6.ip(), v6.scope_id()),
        other => other.ip().to_string(),
    };
    Client::new(host, server.port())
        .connect_timeout(ASK_TIMEOUT)
        .reply_timeout(ASK_TIMEOUT)
}

/// Starts `f` on a thread that blocks every signal, so that it never takes one meant for the
/// main thread (Ctrl-C still ends the process; after the grant, `do` and `lock` read their
/// signals from a signalfd, which only works while no thread accepts them). The caller's mask
/// is blocked around the spawn, so that the thread starts with everything blocked, and
/// restored after: a signal in between waits for the restore.
fn spawn_without_signals(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    // SAFETY: sigsets owned by this frame; pthread_sigmask changes this thread's mask only,
    // and the old one is put back before returning.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let spawned = thread::Builder::new().name("tnl-waiting".into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned.map(drop)
    }
}

/// The watching thread.
struct Watcher {
    name: String,
    /// The waiting connection's local address.
    me: SocketAddr,
    server: Client,
    /// When the server gives up the wait, by our clock.
    deadline: Instant,
    display: Display,
    shared: Arc<Shared>,
}

impl Watcher {
    fn run(self) {
        if self.sleep_until(Instant::now() + FIRST_LOOK) {
            return;
        }
        let mut shown: Option<Vec<Holder>> = None;
        loop {
            let tick = Instant::now();
            let seen = Seen::ask(&self.server, &self.name, self.me);
            let line = seen.line(&self.name, self.deadline.saturating_duration_since(tick));
            let mut screen = self.shared.screen();
            if screen.ended {
                return;
            }
            match (self.display, line) {
                // Not listed: the grant is on its way, or the snapshot was taken before the
                // request was read. Nothing to say yet.
                (_, None) => {}
                (Display::Live, Some(line)) => draw(&mut screen, &line),
                (Display::Lines { verbose }, Some(line)) => {
                    let holders = seen.holders();
                    if shown.as_ref() != Some(&holders) {
                        write_stderr(&format!("tcpnetlock: {line}\n"));
                        if !verbose {
                            return;
                        }
                        shown = Some(holders);
                    }
                }
            }
            drop(screen);
            if self.sleep_until(tick + EVERY) {
                return;
            }
        }
    }

    /// Sleeps until `at` or the end of the wait; true if the wait has ended.
    fn sleep_until(&self, at: Instant) -> bool {
        let screen = self.shared.screen();
        let screen = self
            .shared
            .ended
            .wait_timeout_while(screen, at.saturating_duration_since(Instant::now()), |s| {
                !s.ended
            })
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        screen.ended
    }
}

/// Rewrites the status line in place, cut to the terminal's width; in the background (the
/// job was moved there) nothing is drawn, and the line drawn before is the shell's now.
fn draw(screen: &mut Screen, line: &str) {
    if !in_terminal_foreground() {
        screen.drawn = false;
        return;
    }
    let fitted = fit(line, terminal_width().saturating_sub(1));
    write_stderr(&format!("{ERASE}{fitted}"));
    screen.drawn = true;
}

/// Who holds the lock, as far as telling a change of holder goes.
type Holder = (Option<String>, Option<String>);

/// One look at `.locks`, for one lock and one waiter.
enum Seen {
    /// The lock is listed with its holders; `place` is our index in its queue, `None` if we
    /// are not found in it (another address, or a server that lists no waiters).
    Listed {
        holders: Vec<HolderInfo>,
        place: Option<usize>,
        left: Option<Duration>,
    },
    /// The lock is not listed, or we are neither listed nor behind anyone.
    NotWaiting,
    /// `.locks` could not be had.
    Unknown(String),
}

impl Seen {
    fn ask(server: &Client, name: &str, me: SocketAddr) -> Seen {
        match server.locks() {
            Ok(locks) => Seen::read(&locks, name, me),
            Err(e) => Seen::Unknown(e.to_string()),
        }
    }

    fn read(locks: &Locks, name: &str, me: SocketAddr) -> Seen {
        let Some(lock) = locks.get(name) else {
            return Seen::NotWaiting;
        };
        let holding = place(lock.holders.iter().map(|h| h.peer.as_deref()), me);
        let place = place(lock.waiters.iter().map(|w| w.peer.as_deref()), me);
        // Granted already (the `ok` is on its way), or about to be.
        if place.is_none() && (lock.holders.is_empty() || holding.is_some()) {
            return Seen::NotWaiting;
        }
        Seen::Listed {
            holders: lock.holders.clone(),
            place,
            left: place.and_then(|i| lock.waiters[i].left()),
        }
    }

    fn holders(&self) -> Vec<Holder> {
        match self {
            Seen::Listed { holders, .. } => holders
                .iter()
                .map(|h| (h.client_id.clone(), h.peer.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The status line (a line on its own gets the `tcpnetlock: ` of every message; the live
    /// one has better use for the columns); `None` when there is nothing to say. `left` is the
    /// wait left by our own clock, for when the server's word is missing.
    fn line(&self, name: &str, left: Duration) -> Option<String> {
        let name = printable(name);
        let head = format!("waiting for lock {name}");
        match self {
            Seen::NotWaiting => None,
            Seen::Unknown(why) => Some(format!(
                "{head}: up to {} more (no status from the server: {})",
                human_duration(left),
                printable(why)
            )),
            Seen::Listed {
                holders,
                place,
                left: told,
            } => Some(format!(
                "{head}: {}, {}, up to {} more",
                held_by(holders),
                match place {
                    None => "place unknown".to_owned(),
                    Some(0) => "next in line".to_owned(),
                    Some(n) => format!("{n} ahead"),
                },
                human_duration(told.unwrap_or(left))
            )),
        }
    }
}

/// Where we are among `peers` (of the lock's waiters, or holders): the one that is our local
/// address. An IPv4 address may come back as IPv6 (`[::ffff:127.0.0.1]:5`) from a dual-stack
/// server.
fn place<'a>(mut peers: impl Iterator<Item = Option<&'a str>>, me: SocketAddr) -> Option<usize> {
    let same = |peer: &str| {
        peer.parse::<SocketAddr>()
            .is_ok_and(|p| p.port() == me.port() && p.ip().to_canonical() == me.ip().to_canonical())
    };
    peers.position(|peer| peer.is_some_and(same))
}

/// `held by ci-7 for 2m07s`, `held by reader-1 for 12.4s and 2 more (shared)`: the holder
/// that has held it longest (the server lists it first), by client id or else address.
fn held_by(holders: &[HolderInfo]) -> String {
    let Some(first) = holders.first() else {
        return "no holder now".to_owned();
    };
    let who = first
        .client_id
        .as_deref()
        .or(first.peer.as_deref())
        .map_or_else(|| "?".to_owned(), printable);
    let mut text = format!("held by {who}");
    if let Some(held) = first.held() {
        text += &format!(" for {}", human_duration(held));
    }
    if holders.len() > 1 {
        text += &format!(" and {} more", holders.len() - 1);
    }
    if holders.iter().any(|h| h.mode == Some(Mode::Shared)) {
        text += " (shared)";
    }
    text
}

/// `line` cut to at most `columns` columns, ending in `…` if cut. Characters outside ASCII
/// count as two columns: wide ones take two, and a line a little short is better than one
/// that wraps (the next `\r` would then rewrite only its second half).
fn fit(line: &str, columns: usize) -> String {
    let cols = |c: char| if c.is_ascii() { 1 } else { 2 };
    if line.chars().map(cols).sum::<usize>() <= columns {
        return line.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in line.chars() {
        if used + cols(c) + 1 > columns {
            break;
        }
        used += cols(c);
        out.push(c);
    }
    if columns > 0 {
        out.push('…');
    }
    out
}

fn write_stderr(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
}

/// stderr is a terminal that can erase a line (not `TERM=dumb`, as in Emacs's shell buffers,
/// which would show the escape sequence), and we are in its foreground process group.
fn stderr_is_live_terminal() -> bool {
    // SAFETY: isatty only looks at fd 2.
    let tty = unsafe { libc::isatty(2) == 1 };
    tty && std::env::var_os("TERM").is_none_or(|t| t != "dumb") && in_terminal_foreground()
}

fn in_terminal_foreground() -> bool {
    // SAFETY: plain system calls on fd 2 and this process.
    unsafe { libc::tcgetpgrp(2) == libc::getpgrp() }
}

/// The terminal's width (TIOCGWINSZ on stderr), or 80 when it does not say.
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize we own.
    let mut size = unsafe { std::mem::zeroed::<libc::winsize>() };
    let ok = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        DEFAULT_WIDTH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(json: &str) -> Locks {
        serde_json::from_str(json).unwrap()
    }

    const ME: &str = "127.0.0.1:50312";

    #[test]
    fn lines_say_who_holds_how_long_and_our_place() {
        let me: SocketAddr = ME.parse().unwrap();
        let left = Duration::from_secs(30);
        let json = r#"{"q": {"max": 1, "waiting": 2, "holders": [{"client_id": "ci-7", "peer": "127.0.0.1:1", "held_secs": 127.4, "token": 3, "ttl_secs": null, "mode": "exclusive"}],
            "waiters": [{"client_id": null, "peer": "127.0.0.1:2", "waited_secs": 5.0, "left_secs": 3.0, "mode": "exclusive"},
                        {"client_id": null, "peer": "[::ffff:127.0.0.1]:50312", "waited_secs": 3.1, "left_secs": 26.9, "mode": "exclusive"}]}}"#;
        let seen = Seen::read(&locks(json), "q", me);
        assert_eq!(
            seen.line("q", left).unwrap(),
            "waiting for lock q: held by ci-7 for 2m07s, 1 ahead, up to 26.9s more"
        );
        // Another address (a NAT): what is known, by our clock.
        let other: SocketAddr = "10.0.0.1:50312".parse().unwrap();
        assert_eq!(
            Seen::read(&locks(json), "q", other)
                .line("q", left)
                .unwrap(),
            "waiting for lock q: held by ci-7 for 2m07s, place unknown, up to 30.0s more"
        );
        let shared = r#"{"r\u001b": {"holders": [{"peer": "[::1]:9", "held_secs": 0.25, "mode": "shared"}, {"client_id": "b", "mode": "shared"}],
            "waiters": [{"peer": "127.0.0.1:50312", "left_secs": 9.5}]}}"#;
        assert_eq!(
            Seen::read(&locks(shared), "r\u{1b}", me)
                .line("r\u{1b}", left)
                .unwrap(),
            "waiting for lock r\\u{1b}: held by [::1]:9 for 250ms and 1 more (shared), next in line, up to 9.5s more"
        );
        // Not listed, or listed without holders and without us: the grant is on its way.
        assert!(Seen::read(&locks("{}"), "q", me).line("q", left).is_none());
        let free = r#"{"q": {"holders": [], "waiters": []}}"#;
        assert!(Seen::read(&locks(free), "q", me).line("q", left).is_none());
        assert_eq!(
            Seen::Unknown("connection refused".into())
                .line("q", left)
                .unwrap(),
            "waiting for lock q: up to 30.0s more (no status from the server: connection refused)"
        );
    }

    #[test]
    fn lines_fit_the_terminal() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdef", 5), "abcd…");
        assert_eq!(fit("ab中cd", 5), "ab中…");
        assert_eq!(fit("ab中cd", 4), "ab…");
        assert_eq!(fit("abc", 0), "");
    }
}
