//! Fencing tokens that keep growing across restarts.
//!
//! The table numbers grants from a first token. Without state, that is the wall clock in
//! microseconds: tokens grow across a restart as long as the clock does not step back and a run
//! makes fewer grants than microseconds pass. With `--state-dir`, the server also stores a
//! reservation before serving — "this run issues tokens below R" — and the next run starts past
//! R whatever the clock says. One small file write per start (and per 2^39 grants).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::table::{TOKEN_RESERVATION, first_token};

const FILE: &str = "token-reservation";

pub struct Tokens {
    path: Option<PathBuf>,
    /// Tokens below this are covered by the stored reservation.
    reserved_until: u64,
}

impl Tokens {
    /// Reads the previous reservation (if any), stores the new one, and returns the first token.
    pub fn start(state_dir: Option<&Path>) -> io::Result<(u64, Tokens)> {
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let path = state_dir.map(|d| d.join(FILE));
        let stored = match &path {
            Some(p) => read(p)?,
            None => None,
        };
        let first = first_token(wall_us, stored);
        let mut tokens = Tokens {
            path,
            reserved_until: 0,
        };
        tokens.reserve(first)?;
        Ok((first, tokens))
    }

    /// Extends the reservation when half of it is used. Called now and then with the table's
    /// next token; a grant can never outrun a reservation of 2^40 between two calls.
    pub fn keep_ahead(&mut self, next_token: u64) -> io::Result<()> {
        if self.path.is_some() && next_token > self.reserved_until - TOKEN_RESERVATION / 2 {
            self.reserve(next_token)?;
        }
        Ok(())
    }

    fn reserve(&mut self, from: u64) -> io::Result<()> {
        let until = from.saturating_add(TOKEN_RESERVATION);
        if let Some(path) = &self.path {
            // Write, sync, rename: a crash leaves the old reservation or the new one.
            let tmp = path.with_extension("tmp");
            let mut f = fs::File::create(&tmp)?;
            writeln!(f, "{until}")?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
        }
        self.reserved_until = until;
        Ok(())
    }
}

/// The stored reservation. A number too large to leave room for a run's tokens (2^63 is more than
/// 290,000 years of microseconds) means the file is damaged: refusing to start beats wrapping.
fn read(path: &Path) -> io::Result<Option<u64>> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} {what}", path.display()),
        )
    };
    match fs::read_to_string(path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(n) if n < 1 << 63 => Ok(Some(n)),
            Ok(_) => Err(bad("holds an implausibly large reservation")),
            Err(_) => Err(bad("does not hold a number")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_survive_restarts() {
        let dir = std::env::temp_dir().join(format!("tcpnetlock-tokens-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (first, _) = Tokens::start(Some(&dir)).unwrap();
        let stored: u64 = fs::read_to_string(dir.join(FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(stored, first + TOKEN_RESERVATION);
        // The next run starts past the reservation, not at the clock.
        let (second, mut tokens) = Tokens::start(Some(&dir)).unwrap();
        assert_eq!(second, stored + 1);
        // Half used: extended.
        tokens
            .keep_ahead(second + TOKEN_RESERVATION / 2 + 1)
            .unwrap();
        let again: u64 = fs::read_to_string(dir.join(FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            again,
            second + TOKEN_RESERVATION / 2 + 1 + TOKEN_RESERVATION
        );
        fs::write(dir.join(FILE), "garbage").unwrap();
        assert!(Tokens::start(Some(&dir)).is_err());
        fs::write(dir.join(FILE), u64::MAX.to_string()).unwrap();
        assert!(Tokens::start(Some(&dir)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_state_the_clock_decides() {
        let (first, _) = Tokens::start(None).unwrap();
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert!(first <= now_us + 1 && first > now_us - 60_000_000);
    }
}
