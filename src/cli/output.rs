//! Everything the client commands write goes through here: answers on stdout, diagnostics on
//! stderr, and text from the server made safe to show.
//!
//! Writing can fail: stdout read by `head -0`, stderr a pipe whose reader has gone, a full
//! disk. std's `print!` and `eprint!` panic then; a panic in `do` would end its command with
//! SIGKILL instead of SIGTERM and a grace period. So nothing here panics: a diagnostic that
//! cannot be written is dropped (there is nowhere left to say so), and an answer that cannot
//! be written is the caller's error to report.
//!
//! Diagnostics are written with SIGTTOU blocked. With `stty tostop`, the kernel stops any
//! process outside the terminal's foreground group that writes to it, and `do` is outside it
//! while its command has the terminal: stopped, `do` could no longer end its command when the
//! lock is lost. A blocked SIGTTOU lets the write through instead (POSIX: "If TOSTOP is set,
//! and the process is blocking SIGTTOU, the process is allowed to write"), so a message from
//! `do` may appear although `tostop` asks background jobs to wait. Answers on stdout follow
//! the terminal's rules as any program's do.

use std::io::{self, Write};

use super::signals::sigset;

/// Writes `line` and a newline to stderr in one write, never stopped by SIGTTOU; a failure is
/// ignored.
pub fn err_line(line: &str) {
    let text = format!("{line}\n");
    with_sigttou_blocked(|| {
        let _ = io::stderr().lock().write_all(text.as_bytes());
    });
}

/// Writes `text` to stdout and flushes it.
pub fn out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Runs `f` with SIGTTOU blocked on this thread, as a shell does around tcsetpgrp: from a
/// background group the call (or a write to the terminal, with `tostop`) would stop us.
pub fn with_sigttou_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the masks are valid sigset_t values owned by this frame.
    unsafe {
        let ttou = sigset(&[libc::SIGTTOU]);
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::pthread_sigmask(libc::SIG_BLOCK, &ttou, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// Text from the server (lock names, client ids, error messages), safe to show on a
/// terminal: control characters (C0, DEL, C1: ANSI and OSC escape sequences start with them)
/// and the invisible characters that reorder or break lines (U+200E, U+202E, U+2066, U+2028,
/// ...: Unicode's format and separator characters) are shown as Rust escapes, `\u{1b}`.
/// Everything else, backslashes and quotes included, is left as it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '"' | '\'') {
            out.push(c);
        } else {
            // std's Debug escaping knows which characters are not printable: every control,
            // format, separator and unassigned character.
            out.extend(c.escape_debug());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert_eq!(printable("deploy-1"), "deploy-1");
        assert_eq!(
            printable("\x1b[31mred\x1b]0;title\x07"),
            "\\u{1b}[31mred\\u{1b}]0;title\\u{7}"
        );
        assert_eq!(printable("a\nb\tc\r"), "a\\nb\\tc\\r");
        for c in [
            '\u{7f}', '\u{85}', '\u{9b}', '\u{2028}', '\u{2029}', '\u{200e}', '\u{200f}',
            '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{feff}', '\u{61c}',
        ] {
            assert_eq!(printable(&c.to_string()), format!("\\u{{{:x}}}", c as u32));
        }
        assert_eq!(printable("é 中 \\ \" '"), "é 中 \\ \" '");
    }
}
