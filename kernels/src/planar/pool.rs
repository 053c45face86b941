//! A small persistent thread pool for the kernels. A decode step is ~200 mat-vecs of 10–100 µs
//! each, so handing a share to another core must cost well under a microsecond: workers that
//! have just finished a share spin on an epoch counter for a while ([`SPIN`]) before they sleep
//! on a condition variable, and the calling thread claims shares too, so a job never waits for a
//! sleeping worker to wake up. Workers are started lazily (as many as the largest request asks
//! for, minus the calling thread) and live for the rest of the process. One job runs on the
//! workers at a time; a caller that finds the pool busy runs its shares itself.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the gaps between the mat-vecs
/// of a step (attention, norms: microseconds), short enough not to burn a core between requests.
const SPIN: Duration = Duration::from_micros(100);

/// Spins of a caller waiting for the last shares before it yields its core (~10 µs).
const YIELD_AFTER_SPINS: u32 = 1 << 12;

struct Pool {
    /// Held by the caller whose job runs on the workers.
    busy: Mutex<()>,
    /// The current job; workers take it when `epoch` moves.
    job: Mutex<Option<Arc<Job>>>,
    epoch: AtomicU64,
    workers: Mutex<usize>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// One `run` call's shares, claimed one at a time by whoever is free.
struct Job {
    /// The caller's closure, its lifetime erased. Called only for a claimed share `< n`; the
    /// caller does not return before every share has finished.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    left: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure, called from several threads only while the `run`
// that owns it waits for them; the other fields are atomics.
unsafe impl Send for Job {}
// SAFETY: as for `Send`.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs shares until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: share `i < n` was claimed by this thread alone, so `run` is still waiting
            // (it returns only once `left` reaches 0, which this share has not yet counted down):
            // the closure is alive.
            let f = unsafe { &*self.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.left.fetch_sub(1, Ordering::Release);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing runs user code while holding these locks, so poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        busy: Mutex::new(()),
        job: Mutex::new(None),
        epoch: AtomicU64::new(0),
        workers: Mutex::new(0),
        sleepers: AtomicUsize::new(0),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
    })
}

fn worker(pool: &'static Pool) {
    let mut seen = pool.epoch.load(Ordering::Acquire);
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        while pool.epoch.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Sleep. Counting this worker as a sleeper before the last look at `epoch` (both
            // SeqCst, as is the caller's bump and its look at `sleepers`) means a caller either
            // sees the sleeper and notifies, or this look sees the new epoch.
            let mut guard = lock(&pool.sleep);
            pool.sleepers.fetch_add(1, Ordering::SeqCst);
            while pool.epoch.load(Ordering::SeqCst) == seen {
                guard = pool.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            pool.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        seen = pool.epoch.load(Ordering::Acquire);
        let job = lock(&pool.job).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

/// Runs `f(0), …, f(n − 1)` on the calling thread and pool workers, and returns when all have
/// finished. A panic in any share is re-raised here after all finished.
pub(crate) fn run<F: Fn(usize) + Sync>(n: usize, f: F) {
    if n <= 1 {
        if n == 1 {
            f(0);
        }
        return;
    }
    let pool = pool();
    let Ok(_busy) = pool.busy.try_lock() else {
        // Another caller's job is on the workers: do this one here rather than wait.
        (0..n).for_each(&f);
        return;
    };
    {
        let mut workers = lock(&pool.workers);
        while *workers < n - 1 {
            // If the OS refuses a thread, fewer workers (or only this thread) do the shares.
            if std::thread::Builder::new().name("drq-kernels".into()).spawn(move || worker(pool)).is_err() {
                break;
            }
            *workers += 1;
        }
    }
    let f_ref: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased (same fat-pointer layout); the pointer is dereferenced
    // only for claimed shares, and this function does not return (or unwind) before every share
    // has finished: it waits for `left` to reach 0 unconditionally, panics being caught per share.
    let f_erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f_ref) };
    let job = Arc::new(Job {
        f: f_erased,
        n,
        next: AtomicUsize::new(0),
        left: AtomicUsize::new(n),
        panicked: AtomicBool::new(false),
    });
    *lock(&pool.job) = Some(Arc::clone(&job));
    pool.epoch.fetch_add(1, Ordering::SeqCst);
    if pool.sleepers.load(Ordering::SeqCst) > 0 {
        let _guard = lock(&pool.sleep);
        pool.wake.notify_all();
    }
    job.work();
    // The last shares are on other threads: spin a little, then let others run (a worker may be
    // descheduled when the machine has more runnable threads than cores).
    let mut spins = 0u32;
    while job.left.load(Ordering::Acquire) > 0 {
        spins = spins.saturating_add(1);
        if spins < YIELD_AFTER_SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    *lock(&pool.job) = None;
    if job.panicked.load(Ordering::Relaxed) {
        resume_unwind(Box::new("a kernel share panicked"));
    }
}
