//! Host work spread over the machine's cores (building random weights, encoding a batch
//! of texts). The calling thread works too, and a thread the OS refuses to start is not
//! an error: the threads that did start, the caller's among them, do its share.

use std::sync::{Mutex, PoisonError};

/// The cores the OS lets this process use (1 when it cannot say).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `job` applied to each item, on up to `threads` threads (the caller's included); the
/// results in the order of `items`. A panic in `job` is resumed in the caller.
pub fn map<P: Send, T: Send>(items: Vec<P>, threads: usize, job: impl Fn(P) -> T + Sync) -> Vec<T> {
    let helpers = threads.min(items.len()).saturating_sub(1);
    let queue = Mutex::new(items.into_iter().enumerate());
    // Each thread takes the next item until none is left, so none waits on a slow one.
    let work = || {
        let mut done = Vec::new();
        loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((i, item)) = next else { return done };
            done.push((i, job(item)));
        }
    };
    let mut done = std::thread::scope(|scope| {
        let started: Vec<_> =
            (0..helpers).map_while(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok()).collect();
        let mut done = work();
        for thread in started {
            match thread.join() {
                Ok(theirs) => done.extend(theirs),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        done
    });
    done.sort_unstable_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, result)| result).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_once_in_order_on_any_number_of_threads() {
        for threads in [0, 1, 2, 5, 64] {
            for n in [0, 1, 3, 100] {
                let calls = std::sync::atomic::AtomicUsize::new(0);
                let got = map((0..n).collect(), threads, |i: usize| {
                    calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i * i
                });
                assert_eq!(got, (0..n).map(|i| i * i).collect::<Vec<_>>(), "{threads} threads, {n} items");
                assert_eq!(calls.into_inner(), n, "{threads} threads, {n} items");
            }
        }
    }

    #[test]
    fn parts_of_one_slice_are_written_in_place() {
        let mut out = vec![0u32; 1000];
        map(out.chunks_mut(7).enumerate().collect(), 4, |(i, part): (usize, &mut [u32])| {
            for (j, v) in part.iter_mut().enumerate() {
                *v = (i * 7 + j) as u32;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32));
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| map((0..50).collect(), 4, |i: i32| assert_ne!(i, 37)));
        assert!(caught.is_err());
    }
}
