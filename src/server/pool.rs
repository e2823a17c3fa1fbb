//! Worker threads, reused.
//!
//! A lock holder parks a thread in a blocking read for as long as it holds, so the pool cannot be
//! fixed-size: it grows whenever no worker is idle and retires workers that stay idle. Reusing
//! threads instead of spawning one per connection was measured at ~1.5x the throughput under
//! musl, whose thread creation is comparatively expensive.
//!
//! Spawning can fail (pids cgroup limit, RLIMIT_NPROC, memory); [`Pool::submit`] then hands the
//! job back so the caller can refuse the client cleanly instead of dropping it.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

pub struct Pool<J> {
    shared: Arc<Shared<J>>,
}

struct Shared<J> {
    state: Mutex<Workers<J>>,
    wake: Condvar,
    run: Box<dyn Fn(J) + Send + Sync>,
    idle_timeout: Duration,
    stack_size: usize,
}

struct Workers<J> {
    queue: VecDeque<J>,
    /// Workers waiting for a job. A job is queued only when an idle worker is sure to take it;
    /// otherwise a new worker is started with the job in hand.
    idle: usize,
    threads: usize,
}

impl<J: Send + 'static> Pool<J> {
    pub fn new(
        idle_timeout: Duration,
        stack_size: usize,
        run: impl Fn(J) + Send + Sync + 'static,
    ) -> Pool<J> {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(Workers {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                }),
                wake: Condvar::new(),
                run: Box::new(run),
                idle_timeout,
                stack_size,
            }),
        }
    }

    /// Runs `job` on an idle worker, or on a new one. Gives the job back with the error when no
    /// worker could be started.
    pub fn submit(&self, job: J) -> Result<(), (J, io::Error)> {
        let mut state = self.shared.lock();
        if state.idle > state.queue.len() {
            state.queue.push_back(job);
            drop(state);
            self.shared.wake.notify_one();
            return Ok(());
        }
        state.threads += 1;
        drop(state);

        // The job travels through a slot so that it can be recovered if the spawn fails.
        let slot = Arc::new(Mutex::new(Some(job)));
        let theirs = Arc::clone(&slot);
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name("tcpnetlock-worker".into())
            .stack_size(self.shared.stack_size)
            .spawn(move || {
                let first = theirs.lock().unwrap_or_else(PoisonError::into_inner).take();
                drop(theirs);
                if let Some(job) = first {
                    shared.work(job);
                }
            });
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                self.shared.lock().threads -= 1;
                let job = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                Err((
                    job.expect("a worker that never started cannot have taken its job"),
                    e,
                ))
            }
        }
    }

    /// (threads alive, threads idle)
    pub fn size(&self) -> (usize, usize) {
        let state = self.shared.lock();
        (state.threads, state.idle)
    }
}

impl<J> Shared<J> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Workers<J>> {
        // Jobs run outside this lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn work(&self, mut job: J) {
        loop {
            // A panicking job must not take the worker's bookkeeping with it; the job's own
            // guards (connection count, held lock) are released by unwinding.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.run)(job)));
            match self.next_job() {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    fn next_job(&self) -> Option<J> {
        let mut state = self.lock();
        state.idle += 1;
        loop {
            if let Some(job) = state.queue.pop_front() {
                state.idle -= 1;
                return Some(job);
            }
            let (s, timeout) = self
                .wake
                .wait_timeout(state, self.idle_timeout)
                .unwrap_or_else(PoisonError::into_inner);
            state = s;
            if timeout.timed_out() && state.queue.is_empty() {
                state.idle -= 1;
                state.threads -= 1;
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn grows_while_busy_and_reuses_idle_workers() {
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = Arc::clone(&gate);
        let pool = Pool::new(Duration::from_secs(60), 64 * 1024, move |n: u32| {
            let (open, cv) = &*g;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            done_tx.send(n).unwrap();
        });
        for n in 0..4 {
            pool.submit(n).map_err(|(_, e)| e).unwrap();
        }
        // All four block, so each needed its own thread.
        assert_eq!(pool.size(), (4, 0));
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let mut got: Vec<u32> = (0..4).map(|_| done_rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3]);
        wait_for(|| pool.size() == (4, 4));
        // Idle workers take new jobs: no new threads.
        for n in 4..8 {
            pool.submit(n).map_err(|(_, e)| e).unwrap();
            assert_eq!(done_rx.recv().unwrap(), n);
        }
        assert_eq!(pool.size().0, 4);
    }

    #[test]
    fn idle_workers_retire() {
        let pool = Pool::new(Duration::from_millis(50), 64 * 1024, |_: ()| {});
        pool.submit(()).map_err(|(_, e)| e).unwrap();
        pool.submit(()).map_err(|(_, e)| e).unwrap();
        wait_for(|| pool.size() == (0, 0));
    }

    #[test]
    fn a_panicking_job_keeps_its_worker() {
        let (tx, rx) = mpsc::channel();
        let pool = Pool::new(Duration::from_secs(60), 64 * 1024, move |n: u32| {
            if n == 0 {
                panic!("job 0 panics (expected in this test)");
            }
            tx.send(n).unwrap();
        });
        pool.submit(0).map_err(|(_, e)| e).unwrap();
        wait_for(|| pool.size() == (1, 1));
        pool.submit(1).map_err(|(_, e)| e).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
        assert_eq!(pool.size().0, 1);
    }
}
