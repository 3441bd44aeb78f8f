//! A team of worker threads that stays awake between the small products of a decode step.
//!
//! Decoding one token runs about twenty matrix-vector products back to back, each a few to a
//! few hundred microseconds. Splitting each over the cores pays only if the other cores start
//! at once: a rayon worker that went to sleep between two products takes longer to wake than
//! a product takes. llama2.c keeps its OpenMP threads spinning instead; this team does the same,
//! within bounds:
//!
//! ```text
//! caller                                   worker (1..size)
//! ──────                                   ────────────────
//! publish job, generation += 1      ───►   spinning: sees the new generation
//! claim and run parts                      claim and run parts
//! wait until every part is done     ◄───   done += 1 per part; spin again (≈ 200 µs), then park
//! ```
//!
//! A job is a borrowed closure `Fn(part)`, run once for each part `0..parts`. Parts are
//! *claimed* from a shared counter by whichever thread gets there first, the caller included:
//! if a worker is slow to start (parked, or its core busy with another process), the caller
//! simply runs its parts too, so the team is never slower than one thread by more than a few
//! atomic operations. The call returns only when every part has finished and no worker still
//! holds the job, which is what makes lending the closure to other threads sound.
//!
//! Workers spin for [`SPIN`] after each job, then park on a condition variable, so an idle
//! process (or `cargo test` running many tests on two cores) does not burn a core.
//!
//! **One job at a time.** The team serves one caller at a time; a second caller that finds it
//! busy (two models decoding on two threads) runs all its parts itself, in order. Nothing waits
//! on anything else, so there is no deadlock, and the results are the same either way: a part
//! computes the same numbers on whichever thread runs it.
//!
//! Outputs are split with [`Chunks`]: a buffer cut into one disjoint piece per part, each piece
//! taken (moved out) by the part that owns it, so no two threads ever hold the same piece.
//!
//! **Parts that wait for each other.** [`Team::run_together`] runs a job whose parts all run at
//! the same time, on different threads, and may meet at a [`Gang::sync`] barrier: the decoder
//! runs each layer as one job this way, each thread doing its share of every
//! step of the layer and waiting only where it needs the others' results, instead of one
//! hand-off per product (a barrier is one atomic add and a spin; a hand-off, waking a worker
//! and handing a job over, costs several round trips between the cores). The buffers such parts
//! share are [`SharedBuf`]: written in disjoint places between two barriers, read whole after.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most threads a team has (parts of one job), caller included.
pub const MAX_TEAM: usize = 8;

/// How long a worker spins for the next job before it parks.
pub const SPIN: Duration = Duration::from_micros(200);

/// A job as the workers see it: the closure, how many parts it has, the next part to claim
/// and how many have finished.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Claims and runs parts until none is left (a panic is caught and recorded).
    fn work(&self) {
        loop {
            let p = self.next.fetch_add(1, Ordering::AcqRel);
            if p >= self.parts {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.run)(p))).is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What the caller and the workers share.
struct Shared {
    /// Bumped once per job: a worker runs a job when it sees a generation it has not run.
    generation: AtomicUsize,
    /// The current job (a `*const Job`), null when there is none.
    job: AtomicPtr<()>,
    /// Workers holding the current job (they announce themselves before reading `job`).
    holders: AtomicUsize,
    /// Workers parked on `wake` (the caller notifies only when there are some).
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// Workers that have started (a new team waits for all, so none is still starting, and
    /// allocating as threads do when they start, when the first job runs).
    started: AtomicUsize,
}

/// A team of `size − 1` worker threads plus the calling thread (see the module doc).
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held by the caller of the running job.
    busy: Mutex<()>,
}

impl Team {
    /// A team of `size` threads (the caller and `size − 1` workers), `1 <= size <= MAX_TEAM`.
    pub fn new(size: usize) -> Team {
        assert!((1..=MAX_TEAM).contains(&size), "Team::new: size {size} is not in 1..={MAX_TEAM}");
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            holders: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            started: AtomicUsize::new(0),
        });
        let workers = (1..size)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("lego-team-{index}"))
                    .spawn(move || worker(&shared))
                    .expect("cannot start a decode team thread")
            })
            .collect::<Vec<_>>();
        spin_until(|| shared.started.load(Ordering::Acquire) == workers.len());
        Team { shared, workers, busy: Mutex::new(()) }
    }

    /// Threads in the team, the caller included.
    pub fn size(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(part)` for every part `0..parts` (at most [`MAX_TEAM`]; more parts than threads
    /// balance the load, as each thread claims the next part when it is done with one) on the
    /// calling thread and the workers (see the module doc), and returns when all have finished. If the
    /// team is busy with another caller's job, or `parts == 1`, runs them all here. A panic in
    /// any part is raised again here, after every part has stopped.
    pub fn run(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        assert!(parts <= MAX_TEAM, "Team::run: {parts} parts, at most {MAX_TEAM}");
        let serial = || (0..parts).for_each(job);
        if parts <= 1 {
            return serial();
        }
        let Some(_busy) = self.claim() else {
            return serial();
        };
        self.hand_out(parts, job);
    }

    /// The team for this caller, or `None` if another caller has it. (A job that panicked
    /// poisons the lock; the team itself is fine then, so that counts as free.)
    fn claim(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        match self.busy.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Publishes `job` to the workers, runs parts here too, and waits until all have
    /// finished (the caller holds `busy`).
    fn hand_out(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        let published = Job {
            run: job,
            parts,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        s.job.store(&published as *const Job as *mut (), Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        published.work();
        // Parts claimed by workers may still be running: wait for them.
        spin_until(|| published.done.load(Ordering::Acquire) == parts);
        // Withdraw the job, then wait for any worker that got hold of it to let go: a worker
        // announces itself in `holders` before it reads `job`, so once `job` is null and
        // `holders` is 0, no worker can reach `published` (on our stack) any more.
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        spin_until(|| s.holders.load(Ordering::SeqCst) == 0);
        if published.panicked.load(Ordering::Acquire) {
            panic!("Team::run: a part of the job panicked");
        }
    }
}

/// What one part of a [`Team::run_together`] job is given: which part it is, how many run at
/// once, and the barrier they share.
pub struct Gang<'a> {
    /// This part, `0..parts`.
    pub part: usize,
    /// Parts running at once (1 when the team was busy or one was asked for).
    pub parts: usize,
    barrier: &'a Barrier,
}

impl Gang<'_> {
    /// Waits until every part of the job has called `sync` as many times as this one (a
    /// barrier). Every part must call it the same number of times. If another part panicked,
    /// this panics too (so no part waits forever).
    pub fn sync(&self) {
        self.barrier.wait();
    }
}

/// A reusable spin barrier for `parts` threads: the last to arrive opens the next phase.
struct Barrier {
    parts: usize,
    arrived: AtomicUsize,
    phase: AtomicUsize,
    /// Set when a part panicked: the others stop waiting and panic too.
    broken: AtomicBool,
}

impl Barrier {
    fn new(parts: usize) -> Barrier {
        Barrier {
            parts,
            arrived: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
        }
    }

    fn wait(&self) {
        if self.parts == 1 {
            return;
        }
        let phase = self.phase.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parts {
            // The last one: reset the count for the next phase, then open this one.
            self.arrived.store(0, Ordering::Relaxed);
            self.phase.fetch_add(1, Ordering::Release);
        } else {
            spin_until(|| self.phase.load(Ordering::Acquire) != phase || self.broken.load(Ordering::Acquire));
            assert!(!self.broken.load(Ordering::Acquire), "Gang::sync: another part of the job panicked");
        }
    }
}

impl Team {
    /// Runs `job` on `want` threads **at once** (the caller and `want − 1` workers; clamped to
    /// the team's size), each call given its [`Gang`]: its part, the number of parts, and a
    /// barrier ([`Gang::sync`]) the parts can meet at. If the team is busy with another
    /// caller's job, or `want <= 1`, `job` runs once, here, as the only part (`parts == 1`,
    /// where `sync` returns at once): so a job must compute the same results for any number
    /// of parts, which it does if each part takes its share of every step from `gang`.
    /// A panic in any part is raised again here, after every part has stopped.
    pub fn run_together(&self, want: usize, job: &(dyn Fn(&Gang) + Sync)) {
        let want = want.clamp(1, self.size());
        let alone = || job(&Gang { part: 0, parts: 1, barrier: &Barrier::new(1) });
        if want == 1 {
            return alone();
        }
        let Some(busy) = self.claim() else {
            return alone();
        };
        let barrier = Barrier::new(want);
        // Each thread runs at most one part at a time, and a part cannot finish before every
        // part has reached its barriers, so the `want` parts are claimed by `want` different
        // threads and run together. A part that panics breaks the barrier for the others.
        let part = |p: usize| {
            let gang = Gang { part: p, parts: want, barrier: &barrier };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| job(&gang))) {
                barrier.broken.store(true, Ordering::Release);
                std::panic::resume_unwind(panic);
            }
        };
        self.hand_out(want, &part);
        drop(busy);
    }
}

/// A buffer that the parts of one [`Team::run_together`] job share: between two barriers each
/// part writes only places no other part touches, and after a barrier any part may read what
/// the others wrote. Rust cannot check that split (it changes from step to step), so the two
/// accessors are `unsafe` and each call site says why its ranges are its own.
pub struct SharedBuf<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `SharedBuf` is a `&mut [f32]` lent to several threads; the callers of `part_mut` and
// `read` promise that no two of them touch the same element at once unless both only read.
unsafe impl Send for SharedBuf<'_> {}
unsafe impl Sync for SharedBuf<'_> {}

impl<'a> SharedBuf<'a> {
    /// Lends `buf` to the parts of a job.
    pub fn new(buf: &'a mut [f32]) -> SharedBuf<'a> {
        SharedBuf { ptr: buf.as_mut_ptr(), len: buf.len(), _buffer: std::marker::PhantomData }
    }

    /// Elements `range`, to write.
    ///
    /// # Safety
    /// Until the next barrier, no other part reads or writes any element of `range`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part_mut(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "SharedBuf::part_mut: {range:?} of {}",
            self.len
        );
        // SAFETY: in bounds (checked); exclusive for its lifetime by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// Elements `range`, to read.
    ///
    /// # Safety
    /// Until the next barrier, no part writes any element of `range`.
    pub unsafe fn read(&self, range: std::ops::Range<usize>) -> &[f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "SharedBuf::read: {range:?} of {}",
            self.len
        );
        // SAFETY: in bounds (checked); not written while borrowed, by the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }
}

/// Spins (then yields the core) until `done()`.
fn spin_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins < 1 << 12 { std::hint::spin_loop() } else { std::thread::yield_now() }
    }
}

impl Drop for Team {
    /// Stops the workers and waits for them to exit.
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker's life: wait for a job, run its part, report, again; until shutdown.
fn worker(s: &Shared) {
    s.started.fetch_add(1, Ordering::Release);
    // The generation the team was made with (not the current one: a job may have been
    // published before this thread got to run, and it must still take part in it).
    let mut seen = 0;
    loop {
        // Spin for the next generation, then park.
        let mut spun_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let since = *spun_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                continue;
            }
            // Park. The count goes up before the generation is checked again under the lock,
            // and the caller bumps the generation before reading the count: so either the
            // caller sees a sleeper and notifies (after we wait, since it must take the lock),
            // or we see its new generation and do not wait.
            let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spun_since = None;
            spins = 0;
        }
        // Announce, then look for the job (see `Team::run` for why in this order).
        s.holders.fetch_add(1, Ordering::SeqCst);
        let job = s.job.load(Ordering::SeqCst) as *const Job;
        if !job.is_null() {
            // SAFETY: `job` points to the caller's `published`, which stays alive until the
            // caller has seen `holders` drop to 0 after withdrawing it; we announced ourselves
            // in `holders` before loading the pointer, and let go only below.
            unsafe { &*job }.work();
        }
        s.holders.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The process's decode team, started at its first use, with one thread per core (at most
/// [`MAX_TEAM`]). It lives as long as the process; idle, its workers are parked.
pub fn decode_team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Team::new(cores.clamp(1, MAX_TEAM))
    })
}

/// A buffer cut into disjoint pieces, one per part, each taken once by its part (moved out of
/// its slot), so parts on different threads write to their own pieces and nothing else.
pub struct Chunks<'a> {
    slots: [Mutex<Option<&'a mut [f32]>>; MAX_TEAM],
}

impl<'a> Chunks<'a> {
    /// `buf` in pieces of `len` (the last may be shorter; parts past the end get none).
    pub fn new(buf: &'a mut [f32], len: usize) -> Chunks<'a> {
        let mut pieces = buf.chunks_mut(len.max(1));
        Chunks { slots: std::array::from_fn(|_| Mutex::new(pieces.next())) }
    }

    /// Part `part`'s piece (`None` if it has none, or took it already).
    pub fn take(&self, part: usize) -> Option<&'a mut [f32]> {
        self.slots[part].lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The range of `n` rows that part `part` of `parts` works on: equal blocks, each a multiple of
/// `align` rows (except the last), so that each part streams its own contiguous share of W.
pub fn part_rows(n: usize, parts: usize, part: usize, align: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(parts).next_multiple_of(align.max(1));
    (part * per).min(n)..((part + 1) * per).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_writes_its_own_chunk() {
        let team = Team::new(2);
        for parts in [1, 2] {
            for _ in 0..200 {
                let mut out = vec![0.0f32; 10];
                let chunks = Chunks::new(&mut out, 5);
                team.run(parts, &|p| {
                    let piece = chunks.take(p).expect("each part's piece once");
                    piece.iter_mut().for_each(|x| *x += 1.0 + p as f32);
                });
                if parts == 2 {
                    assert_eq!(out, [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
                } else {
                    assert_eq!(out[..5], [1.0; 5]);
                }
            }
        }
    }

    #[test]
    fn two_callers_at_once_both_get_their_results() {
        let team = Team::new(2);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let team = &team;
                    s.spawn(move || {
                        for i in 0..2000 {
                            let sum = AtomicUsize::new(0);
                            team.run(2, &|p| {
                                sum.fetch_add(p + 1 + t + i, Ordering::Relaxed);
                            });
                            assert_eq!(sum.load(Ordering::Relaxed), 3 + 2 * (t + i));
                        }
                    })
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
        });
    }

    #[test]
    fn a_panicking_part_panics_the_caller_and_the_team_still_works() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(2, &|p| assert!(p != 1, "part 1 fails"))));
        assert!(r.is_err());
        let r = catch_unwind(AssertUnwindSafe(|| team.run(2, &|p| assert!(p != 0, "part 0 fails"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        team.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
        // ... on both threads again (the panic left the team's lock poisoned, not taken).
        let threads = Mutex::new(Vec::new());
        for _ in 0..200 {
            team.run(2, &|_| {
                std::thread::sleep(Duration::from_micros(200));
                threads.lock().unwrap().push(std::thread::current().id());
            });
        }
        let mut threads = threads.into_inner().unwrap();
        threads.sort_unstable_by_key(|t| format!("{t:?}"));
        threads.dedup();
        assert_eq!(threads.len(), 2, "the team's worker never ran a part after the panic");
    }

    #[test]
    fn a_parked_team_wakes_and_a_dropped_team_stops_its_workers() {
        let team = Team::new(3);
        std::thread::sleep(SPIN * 5); // every worker parks
        let n = AtomicUsize::new(0);
        team.run(3, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 3);
        drop(team); // joins the workers: returns only when they have exited
    }

    #[test]
    fn parts_run_together_and_see_each_others_writes_after_a_sync() {
        let team = Team::new(2);
        for round in 0..2000usize {
            let mut slots = [0.0f32; 2];
            let shared = SharedBuf::new(&mut slots);
            let seen = AtomicUsize::new(0);
            team.run_together(2, &|g| {
                assert_eq!(g.parts, 2, "a free team runs both parts");
                // SAFETY: slot g.part is this part's alone before the sync.
                let mine = unsafe { shared.part_mut(g.part..g.part + 1) };
                mine[0] = (round + g.part) as f32;
                g.sync();
                // SAFETY: after the sync nobody writes: read the other part's slot.
                let other = unsafe { shared.read(1 - g.part..2 - g.part) }[0];
                assert_eq!(other, (round + 1 - g.part) as f32);
                seen.fetch_add(1, Ordering::Relaxed);
                g.sync();
            });
            assert_eq!(seen.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn a_busy_team_runs_a_together_job_alone_and_a_panicking_part_does_not_hang() {
        let team = Team::new(2);
        // Busy: another caller holds the team, so the job runs here as the only part.
        let guard = team.busy.lock().unwrap();
        let parts = AtomicUsize::new(0);
        team.run_together(2, &|g| {
            g.sync();
            parts.fetch_add(g.parts, Ordering::Relaxed);
        });
        assert_eq!(parts.load(Ordering::Relaxed), 1);
        drop(guard);
        // A part that panics before the barrier: the other stops waiting, the caller panics,
        // and the team still works.
        for bad in [0, 1] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                team.run_together(2, &|g| {
                    assert!(g.part != bad, "part {bad} fails");
                    g.sync();
                })
            }));
            assert!(r.is_err());
        }
        let n = AtomicUsize::new(0);
        team.run_together(2, &|g| {
            g.sync();
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn part_rows_cover_every_row_once_in_aligned_blocks() {
        for n in [1, 15, 16, 17, 256, 688, 4096] {
            for parts in 1..=4 {
                let ranges: Vec<_> = (0..parts).map(|p| part_rows(n, parts, p, 16)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, n);
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
                assert!(ranges.iter().filter(|r| !r.is_empty()).all(|r| r.start % 16 == 0));
            }
        }
    }
}
