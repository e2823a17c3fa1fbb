//! Worker threads, reused.
//!
//! A lock holder parks a thread in a blocking read for as long as it holds, so the pool cannot be
//! fixed-size: it grows whenever no worker is idle and retires workers that stay idle. Reusing
//! threads instead of spawning one per connection was measured at ~1.5x the throughput under
//! musl, whose thread creation is comparatively expensive.
//!
//! Spawning can fail (pids cgroup limit, RLIMIT_NPROC, memory); [`Pool::submit`] then hands the
//! job back so the caller can refuse the client cleanly instead of dropping it.
//!
//! For a hand-over to the next server process (`server::handover`) every job must come to rest
//! where no byte of its connection can be lost, and stay there: the pool knows each worker's
//! thread, to wake the busy ones with a signal ([`Pool::quiesce`]), and parks the jobs that say
//! they are at rest ([`Pool::rest`]) until the process ends or the hand-over is called off
//! ([`Pool::resume`]). Parked jobs block rather than return: thousands of threads unwinding one by
//! one would lengthen the hand-over by hundreds of milliseconds. For the same reason a job comes
//! to rest without the pool's lock (atomics, its own flag, `thread::park`): a thousand threads
//! woken at once and queueing for one lock took 50 to 80 ms on 2 CPUs, instead of under 10.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub struct Pool<J, R = ()> {
    shared: Arc<Shared<J, R>>,
}

struct Shared<J, R> {
    state: Mutex<Workers<J>>,
    wake: Condvar,
    /// Workers parked in [`Pool::rest`].
    resting: AtomicUsize,
    /// Moves on each [`Pool::resume`]: workers parked before it go on.
    epoch: AtomicU64,
    /// What the resting jobs handed over, with the epoch they rested in.
    records: Mutex<Vec<(u64, R)>>,
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
    /// Every worker by its number, for [`Pool::quiesce`] to wake the busy ones.
    members: HashMap<u64, Member>,
    next_member: u64,
    /// A hand-over is bringing the workers to rest: idle ones do not end meanwhile, so that the
    /// threads signalled stay alive.
    quiescing: bool,
}

struct Member {
    thread: Thread,
    handle: thread::Thread,
    busy: bool,
    /// Set by the worker while it rests.
    resting: Arc<AtomicBool>,
}

/// A worker's thread handle. musl's `pthread_t` is a pointer, so not `Send` by itself.
struct Thread(libc::pthread_t);

// SAFETY: a pthread_t is an opaque handle that names the thread in any thread of the process;
// it is only passed to pthread_kill, for a member while no member can end (`quiescing`).
unsafe impl Send for Thread {}

thread_local! {
    /// The calling worker's number in its pool (a thread serves one pool).
    static MEMBER: Cell<Option<u64>> = const { Cell::new(None) };
    /// The calling worker's resting flag (its member's).
    static RESTING: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

impl<J: Send + 'static, R: Send + 'static> Pool<J, R> {
    pub fn new(
        idle_timeout: Duration,
        stack_size: usize,
        run: impl Fn(J) + Send + Sync + 'static,
    ) -> Pool<J, R> {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(Workers {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    members: HashMap::new(),
                    next_member: 0,
                    quiescing: false,
                }),
                wake: Condvar::new(),
                resting: AtomicUsize::new(0),
                epoch: AtomicU64::new(0),
                records: Mutex::new(Vec::new()),
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
                    shared.join();
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

    /// Called by a job, on its worker: hands over `record` (what the job owns) and parks until
    /// [`Pool::resume`]; the job then goes on where it was (the hand-over was called off).
    /// Returns at once if `resting` no longer holds: the caller of [`Pool::resume`] makes it
    /// false before moving the epoch, so a job that parks after the last resume finds the epoch
    /// it read moved, and goes on.
    pub fn rest(&self, record: Option<R>, resting: impl Fn() -> bool) {
        let Some(flag) = RESTING.with_borrow(|f| f.clone()) else {
            return;
        };
        let shared = &self.shared;
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if !resting() {
            return;
        }
        if let Some(record) = record {
            shared
                .records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((epoch, record));
        }
        flag.store(true, Ordering::SeqCst);
        shared.resting.fetch_add(1, Ordering::SeqCst);
        while shared.epoch.load(Ordering::SeqCst) == epoch {
            thread::park();
        }
        shared.resting.fetch_sub(1, Ordering::SeqCst);
        flag.store(false, Ordering::SeqCst);
    }

    /// Brings every busy worker to rest: `wake` is called for each busy worker's thread not at
    /// rest yet, again every `every` until all are, since a job may miss a call (it was about to
    /// block when it came). False if some were not at rest by `deadline`; the caller then calls
    /// [`Pool::resume`].
    pub fn quiesce(
        &self,
        every: Duration,
        deadline: Instant,
        wake: impl Fn(libc::pthread_t),
    ) -> bool {
        self.shared.lock().quiescing = true;
        let mut woken: Option<Instant> = None;
        loop {
            let state = self.shared.lock();
            // Only busy workers rest, and none can stop resting before a resume, so this is
            // exact while the lock keeps the busy ones busy.
            let busy = state.threads - state.idle;
            if self.shared.resting.load(Ordering::SeqCst) == busy && state.queue.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let due: Vec<libc::pthread_t> = if woken.is_none_or(|t| now - t >= every) {
                woken = Some(now);
                state
                    .members
                    .values()
                    .filter(|m| m.busy && !m.resting.load(Ordering::SeqCst))
                    .map(|m| m.thread.0)
                    .collect()
            } else {
                Vec::new()
            };
            // Outside the lock: the woken threads do not need it to rest, and no member ends
            // while `quiescing`.
            drop(state);
            for t in due {
                wake(t);
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Takes what the resting jobs handed over (call it once [`Pool::quiesce`] said all rest).
    pub fn take_records(&self) -> Vec<R> {
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let mut records = self
            .shared
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *records)
            .into_iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
            .collect()
    }

    /// Lets the workers parked in [`Pool::rest`] go on; what they handed over is dropped.
    pub fn resume(&self) {
        let mut state = self.shared.lock();
        state.quiescing = false;
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        let records = std::mem::take(
            &mut *self
                .shared
                .records
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for m in state.members.values() {
            m.handle.unpark();
        }
        drop(state);
        drop(records);
    }
}

impl<J> Workers<J> {
    fn set_busy(&mut self, member: Option<u64>, busy: bool) {
        if let Some(m) = member.and_then(|m| self.members.get_mut(&m)) {
            m.busy = busy;
        }
    }
}

impl<J, R> Shared<J, R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Workers<J>> {
        // Jobs run outside this lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the calling thread a member, so that [`Pool::quiesce`] can wake it.
    fn join(&self) {
        let mut state = self.lock();
        let me = state.next_member;
        state.next_member += 1;
        let resting = Arc::new(AtomicBool::new(false));
        state.members.insert(
            me,
            Member {
                // SAFETY: pthread_self has no preconditions.
                thread: Thread(unsafe { libc::pthread_self() }),
                handle: thread::current(),
                busy: true,
                resting: Arc::clone(&resting),
            },
        );
        MEMBER.set(Some(me));
        RESTING.set(Some(resting));
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
        let me = MEMBER.get();
        let mut state = self.lock();
        state.idle += 1;
        state.set_busy(me, false);
        loop {
            if let Some(job) = state.queue.pop_front() {
                state.idle -= 1;
                state.set_busy(me, true);
                return Some(job);
            }
            let (s, timeout) = self
                .wake
                .wait_timeout(state, self.idle_timeout)
                .unwrap_or_else(PoisonError::into_inner);
            state = s;
            if timeout.timed_out() && state.queue.is_empty() && !state.quiescing {
                state.idle -= 1;
                state.threads -= 1;
                if let Some(me) = me {
                    state.members.remove(&me);
                }
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
        let pool: Pool<u32> = Pool::new(Duration::from_secs(60), 64 * 1024, move |n: u32| {
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
        let pool: Pool<()> = Pool::new(Duration::from_millis(50), 64 * 1024, |_: ()| {});
        pool.submit(()).map_err(|(_, e)| e).unwrap();
        pool.submit(()).map_err(|(_, e)| e).unwrap();
        wait_for(|| pool.size() == (0, 0));
    }

    #[test]
    fn a_panicking_job_keeps_its_worker() {
        let (tx, rx) = mpsc::channel();
        let pool: Pool<u32> = Pool::new(Duration::from_secs(60), 64 * 1024, move |n: u32| {
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

    /// Busy workers are woken until each rests, their records are collected, and after a resume
    /// they go on where they were; idle workers are left alone.
    #[test]
    fn quiesce_wakes_busy_workers_and_resume_lets_them_go_on() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        static RESTING: AtomicBool = AtomicBool::new(false);
        let woken = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let pool: Arc<Pool<u32, u32>> =
            Arc::new_cyclic(|weak: &std::sync::Weak<Pool<u32, u32>>| {
                let weak = weak.clone();
                Pool::new(Duration::from_secs(60), 64 * 1024, move |n: u32| {
                    // A job that "blocks" until told to rest, as a connection's read does.
                    while !RESTING.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(1));
                    }
                    weak.upgrade()
                        .unwrap()
                        .rest(Some(n), || RESTING.load(Ordering::SeqCst));
                    done_tx.send(n).unwrap();
                })
            });
        for n in 0..3 {
            pool.submit(n).map_err(|(_, e)| e).unwrap();
        }
        wait_for(|| pool.size() == (3, 0));
        RESTING.store(true, Ordering::SeqCst);
        let w = Arc::clone(&woken);
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(pool.quiesce(Duration::from_millis(2), deadline, move |_| {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        let mut records = pool.take_records();
        records.sort();
        assert_eq!(records, [0, 1, 2]);
        assert!(done_rx.try_recv().is_err(), "a resting job went on");
        RESTING.store(false, Ordering::SeqCst);
        pool.resume();
        let mut done: Vec<u32> = (0..3).map(|_| done_rx.recv().unwrap()).collect();
        done.sort();
        assert_eq!(done, [0, 1, 2]);
        // No busy worker left: quiesce is done at once, waking nobody.
        wait_for(|| pool.size() == (3, 3));
        let before = woken.load(Ordering::SeqCst);
        assert!(pool.quiesce(Duration::from_millis(2), Instant::now(), |_| {
            panic!("an idle worker was woken")
        }));
        assert_eq!(woken.load(Ordering::SeqCst), before);
    }
}
