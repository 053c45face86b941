//! A small persistent thread pool for the kernels: spawning threads per call (`thread::scope`)
//! costs tens of µs, as much as a whole 576×576 mat-vec. Workers are started lazily (as many as
//! the largest request asks for, minus the calling thread), sleep on a condition variable and live
//! for the rest of the process. The calling thread always does share 0 itself.

use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

type Task = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

struct State {
    tasks: VecDeque<Task>,
    workers: usize,
}

/// Counts outstanding shares; shared by `Arc` so a finishing worker never touches freed memory.
struct Latch {
    left: Mutex<(usize, bool)>, // (shares still running, some share panicked)
    done: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing runs user code while holding these locks, so poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool { state: Mutex::new(State { tasks: VecDeque::new(), workers: 0 }), work: Condvar::new() })
}

fn worker(pool: &'static Pool) {
    loop {
        let task = {
            let mut st = lock(&pool.state);
            loop {
                if let Some(t) = st.tasks.pop_front() {
                    break t;
                }
                st = pool.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        task();
    }
}

/// Runs `f(0), …, f(n − 1)`, `f(0)` on the calling thread and the others on pool workers, and
/// returns when all have finished. A panic in any share is re-raised here after all finished.
pub(crate) fn run<F: Fn(usize) + Sync>(n: usize, f: F) {
    if n <= 1 {
        if n == 1 {
            f(0);
        }
        return;
    }
    let pool = pool();
    let latch = Arc::new(Latch { left: Mutex::new((n - 1, false)), done: Condvar::new() });
    let f_ref: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: the erased reference is only used by the n − 1 tasks pushed below, and this
    // function does not return (or unwind) before every one of them has finished with it: it
    // waits on the latch unconditionally (a panic of f(0) is caught first), and each task counts
    // the latch down only after its last use of `f`.
    let f_static: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f_ref) };
    {
        let mut st = lock(&pool.state);
        while st.workers < n - 1 {
            // If the OS refuses a thread, fewer workers serve the queue; still correct.
            if std::thread::Builder::new().name("drq-kernels".into()).spawn(move || worker(pool)).is_err() {
                break;
            }
            st.workers += 1;
        }
        if st.workers == 0 {
            drop(st);
            for i in 0..n {
                f(i);
            }
            return;
        }
        for i in 1..n {
            let latch = Arc::clone(&latch);
            st.tasks.push_back(Box::new(move || {
                let ok = catch_unwind(AssertUnwindSafe(|| f_static(i))).is_ok();
                let mut left = lock(&latch.left);
                left.0 -= 1;
                left.1 |= !ok;
                if left.0 == 0 {
                    latch.done.notify_all();
                }
            }));
        }
    }
    for _ in 1..n {
        pool.work.notify_one();
    }
    let first = catch_unwind(AssertUnwindSafe(|| f(0)));
    let mut left = lock(&latch.left);
    while left.0 > 0 {
        left = latch.done.wait(left).unwrap_or_else(|e| e.into_inner());
    }
    let panicked = left.1;
    drop(left);
    if let Err(p) = first {
        resume_unwind(p);
    }
    if panicked {
        panic!("a kernel worker thread panicked");
    }
}
