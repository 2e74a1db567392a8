//! A mutex that serves its waiters in the order they came: a ticket lock on a condvar.
//!
//! The model's scratch is taken by an Engine's scheduler every step, by `embed` between
//! the chunks of a long text, and by any thread calling forward. With std's Mutex, the
//! thread that unlocks can take the lock again before a woken waiter runs, so a loop of
//! calls (a long embedding) could starve the Engine's streams; here the waiter that came
//! first goes next. A holder that panicked leaves the value as it was, like the
//! `unwrap_or_else(into_inner)` the callers used on std's poisoned Mutex.
//!
//! A thread asking again for a lock it holds gets `Reentered` instead of waiting for
//! itself forever: a Python signal handler or callback that runs inside a long call (the
//! call asks for pending signals between its submissions) may call back into the model.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

pub struct FairMutex<T> {
    /// (next ticket to hand out, ticket being served)
    turns: Mutex<(u64, u64)>,
    turn_changed: Condvar,
    value: Mutex<T>,
    holder: Mutex<Option<ThreadId>>,
}

/// The calling thread holds the lock already.
#[derive(Debug, PartialEq, Eq)]
pub struct Reentered;

pub struct FairGuard<'a, T> {
    lock: &'a FairMutex<T>,
    value: Option<MutexGuard<'a, T>>,
}

impl<T> FairMutex<T> {
    pub fn new(value: T) -> Self {
        FairMutex {
            turns: Mutex::new((0, 0)),
            turn_changed: Condvar::new(),
            value: Mutex::new(value),
            holder: Mutex::new(None),
        }
    }

    fn holder(&self) -> MutexGuard<'_, Option<ThreadId>> {
        self.holder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this caller's turn, then holds the value until the guard is dropped.
    pub fn lock(&self) -> Result<FairGuard<'_, T>, Reentered> {
        let me = std::thread::current().id();
        if *self.holder() == Some(me) {
            return Err(Reentered);
        }
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = turns.0;
        turns.0 += 1;
        while turns.1 != ticket {
            turns = self.turn_changed.wait(turns).unwrap_or_else(|p| p.into_inner());
        }
        drop(turns);
        // Only the ticket being served gets here, so this never waits.
        let value = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *self.holder() = Some(me);
        Ok(FairGuard { lock: self, value: Some(value) })
    }
}

impl<T> Drop for FairGuard<'_, T> {
    fn drop(&mut self) {
        *self.lock.holder() = None;
        self.value.take();
        self.lock.turns.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
        self.lock.turn_changed.notify_all();
    }
}

impl<T> Deref for FairGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("held until dropped")
    }
}

impl<T> DerefMut for FairGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("held until dropped")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A thread that unlocks and at once locks again does not get the lock back while
    /// another was already waiting (std's Mutex may give it back: the waiter may not be
    /// awake yet).
    #[test]
    fn a_waiter_goes_before_the_holder_locking_again() {
        let lock = Arc::new(FairMutex::new(String::new()));
        for round in 0..20 {
            let mut held = lock.lock().unwrap();
            let other = {
                let lock = lock.clone();
                std::thread::spawn(move || lock.lock().unwrap().push('b'))
            };
            // The other thread has its ticket: it is waiting.
            while lock.turns.lock().unwrap().0 < 3 * round + 2 {
                std::thread::sleep(Duration::from_millis(1));
            }
            held.push('a');
            drop(held);
            lock.lock().unwrap().push('c');
            other.join().unwrap();
        }
        assert_eq!(*lock.lock().unwrap(), "abc".repeat(20));
    }

    #[test]
    fn a_panic_while_held_leaves_the_lock_usable() {
        let lock = Arc::new(FairMutex::new(1));
        let held = lock.clone();
        assert!(std::thread::spawn(move || {
            let mut v = held.lock().unwrap();
            *v = 2;
            panic!("while holding the lock");
        })
        .join()
        .is_err());
        assert_eq!(*lock.lock().unwrap(), 2);
    }

    #[test]
    fn the_holder_asking_again_is_told_not_left_waiting() {
        let lock = Arc::new(FairMutex::new(0));
        let held = lock.lock().unwrap();
        assert!(matches!(lock.lock(), Err(Reentered)));
        // Another thread waits its turn as before, and gets it once the holder lets go.
        let other = {
            let lock = lock.clone();
            std::thread::spawn(move || *lock.lock().unwrap() += 1)
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        other.join().unwrap();
        assert_eq!(*lock.lock().unwrap(), 1);
    }
}
