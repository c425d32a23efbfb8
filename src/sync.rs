//! The locks the core uses, in one place, so the rules are easy to keep:
//! a guard is a plain value held for a few lines, never across an `.await`
//! (the guard is not `Send`, so a future holding one cannot be spawned) and
//! never while calling into another component. A poisoned lock (a panic
//! while it was held) is taken as is: every critical section leaves its
//! state consistent before anything that can panic.
//!
//! With the `shuttle` feature the same code runs on shuttle's mutex, so the
//! model-checking tests (`src/fs/shuttle_tests.rs`) explore the
//! interleavings of the writer registry and the budget.

#[cfg(not(feature = "shuttle"))]
use std::sync as imp;

#[cfg(feature = "shuttle")]
use shuttle::sync as imp;

pub type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;

/// A mutex whose `lock` cannot fail.
#[derive(Default, Debug)]
pub struct Mutex<T>(imp::Mutex<T>);

impl<T> Mutex<T> {
    pub fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
