//! Many clients contending for a few names with waits, leaving by release, close, reset and
//! half-close at random. Checked from what the clients saw: no two holders of a name overlap
//! (no more than K for a semaphore), grants follow request order, nobody starves.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::Server;

#[derive(Debug, Clone)]
struct Hold {
    name: String,
    max: usize,
    client: usize,
    /// When the request was written, when `ok` was read, when the client began letting go.
    asked: Instant,
    granted: Instant,
    letting_go: Instant,
    /// The fencing token: the server's grant order.
    token: u64,
}

enum Leave {
    Release,
    Close,
    Reset,
    /// Shut down the sending side, stay a little, then close: the server must keep the lock
    /// until the socket is gone.
    HalfCloseThenClose,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn client(addr: SocketAddr, id: usize, rounds: usize, holds: Arc<Mutex<Vec<Hold>>>) {
    let mut rng = 0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1000_0001);
    for _ in 0..rounds {
        let r = xorshift(&mut rng);
        // Names: two mutexes and one semaphore of 3.
        let (name, max) = match r % 3 {
            0 => ("m0", 1),
            1 => ("m1", 1),
            _ => ("s3", 3),
        };
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut w = &stream;
        let asked = Instant::now();
        writeln!(w, "lock,name:{name},max:{max},wait:60,fencing:1").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let token: u64 = line
            .strip_prefix("ok,token:")
            .and_then(|t| t.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("client {id} on {name}: {line:?}"));
        let granted = Instant::now();
        thread::sleep(Duration::from_micros(xorshift(&mut rng) % 3000));
        let letting_go = Instant::now();
        holds.lock().unwrap().push(Hold {
            name: name.into(),
            max,
            client: id,
            asked,
            granted,
            letting_go,
            token,
        });
        let leave = match xorshift(&mut rng) % 20 {
            0 => Leave::HalfCloseThenClose,
            1..=4 => Leave::Reset,
            5..=9 => Leave::Close,
            _ => Leave::Release,
        };
        match leave {
            Leave::Release => {
                w.write_all(b"release\n").unwrap();
                line.clear();
                reader.read_line(&mut line).unwrap();
                assert_eq!(line, "released\n");
            }
            Leave::Close => drop(stream),
            Leave::Reset => {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(stream);
            }
            Leave::HalfCloseThenClose => {
                stream.shutdown(Shutdown::Write).unwrap();
                thread::sleep(Duration::from_millis(20));
                drop(stream);
            }
        }
    }
}

#[test]
fn contention_never_overlaps_and_stays_fair() {
    let s = Server::start(&[]);
    let clients = 24;
    let rounds = 40;
    let holds = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let holds = Arc::clone(&holds);
            let addr = s.addr;
            thread::spawn(move || client(addr, id, rounds, holds))
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
    let holds = holds.lock().unwrap().clone();
    // Nobody starved: every request was granted (a 60 s wait never ran out).
    assert_eq!(holds.len(), clients * rounds);
    assert_eq!(
        common::json_number(&s.stats(), "wait_timeout_count"),
        Some(0.0)
    );

    for name in ["m0", "m1", "s3"] {
        let mut mine: Vec<&Hold> = holds.iter().filter(|h| h.name == name).collect();
        mine.sort_by_key(|h| h.granted);
        let max = mine[0].max;
        // Exclusion: at the moment each holder got `ok`, fewer than K others were still holding.
        // (A holder counts until it began letting go; the server can only regrant after that.)
        for (i, h) in mine.iter().enumerate() {
            let overlapping = mine[..i]
                .iter()
                .filter(|o| o.letting_go > h.granted)
                .count();
            assert!(
                overlapping < max,
                "{name}: client {} granted while {overlapping} others held (max {max})",
                h.client
            );
        }
        // Order: a client that asked well before another (50 ms: ample for the request to reach
        // the server) was granted before it. Tokens give the server's grant order; times read
        // by the clients would not (a thread may be scheduled late).
        for a in &mine {
            for b in &mine {
                assert!(
                    !(a.asked + Duration::from_millis(50) < b.asked && b.token < a.token),
                    "{name}: client {} asked {:?} before client {} but was granted after it",
                    a.client,
                    b.asked - a.asked,
                    b.client
                );
            }
        }
    }
    eprintln!(
        "{} grants in {:?} over 3 names",
        holds.len(),
        start.elapsed()
    );
}
