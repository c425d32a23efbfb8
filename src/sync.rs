//! The locks the core uses, in one place, so the rules are easy to keep:
//! a guard is a plain value held for a few lines, never across an `.await`
//! (the guard is not `Send`, so a future holding one cannot be spawned) and
//! never while calling into another component. A poisoned lock (a panic
//! while it was held) is taken as is: every critical section leaves its
//! state consistent before anything that can panic.

/// A mutex whose `lock` cannot fail.
#[derive(Default, Debug)]
pub struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
