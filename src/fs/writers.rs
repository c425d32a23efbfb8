//! The writer registry: at most one [`Writer`] per inode, shared by every
//! handle that has the file open for writing, and by a `truncate` without a
//! handle.
//!
//! Opening a writer takes a server round trip (a HEAD for the ETag the
//! upload will be conditional on), so the registry must not be a map that is
//! checked, then awaited, then filled: two openers would each make a writer
//! and the second upload would fail its `If-Match` against the first. Here
//! the first opener of an inode leaves a slot at once; concurrent openers
//! find it and wait for the one writer being made in it. A slot counts its
//! users (handles, and openers still waiting), so the last one out knows it
//! is the last and uploads before the slot is retired.
//!
//! The registry owns its map and its lock, and nothing else: the lock is
//! never held across an `.await`, nor while calling into another component.
//! Values leaving the map are dropped after the guard, so a writer's `Drop`
//! (which gives budget bytes back and may abort an upload) never runs under
//! it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::MountPoint;
use super::write::Writer;
use crate::sync::Mutex;

/// A writer shared by every write handle of one inode.
pub struct WriterEntry {
    pub writer: tokio::sync::Mutex<Writer>,
    pub mount: Arc<MountPoint>,
    /// The logical size, readable without the writer's lock (for getattr).
    pub size: AtomicU64,
    /// Set once the writer is local (see [`Writer::make_local`]): its
    /// staging file, which the kernel may write directly.
    pub local: std::sync::OnceLock<Arc<std::fs::File>>,
}

impl WriterEntry {
    /// The logical size: a local file's own, since the kernel may have
    /// written it without bucketfs seeing the write.
    pub fn size(&self) -> u64 {
        let local = self.local.get().and_then(|f| f.metadata().ok());
        local.map_or_else(|| self.size.load(std::sync::atomic::Ordering::Relaxed), |m| m.len())
    }
}

type Cell = Arc<tokio::sync::OnceCell<Arc<WriterEntry>>>;

struct Slot {
    cell: Cell,
    /// Handles holding the writer, and openers waiting for it.
    users: usize,
}

/// What [`Writers::leave`] found.
pub enum Left {
    /// Other users remain.
    Others,
    /// This was the last user of this writer: upload it, then [`Writers::retire`] it.
    Last(Arc<WriterEntry>),
    /// The slot was not there (or its writer was never made).
    Gone,
}

/// See the module documentation.
#[derive(Default)]
pub struct Writers {
    slots: Mutex<HashMap<u64, Slot>>,
}

impl Writers {
    /// Joins the writer of `ino` as one more user, making it with `make`
    /// if there is none. Concurrent callers for one inode share one `make`.
    /// Returns the writer and whether this call made it. On error the call
    /// is not a user.
    pub async fn join<E, F, Fut>(&self, ino: u64, make: F) -> Result<(Arc<WriterEntry>, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<WriterEntry, E>>,
    {
        let cell = {
            let mut slots = self.slots.lock();
            let slot = slots.entry(ino).or_insert_with(|| Slot { cell: Arc::default(), users: 0 });
            slot.users += 1;
            slot.cell.clone()
        };
        let mut made = false;
        let got = cell
            .get_or_try_init(|| async {
                made = true;
                make().await.map(Arc::new)
            })
            .await
            .cloned();
        match got {
            Ok(entry) => Ok((entry, made)),
            Err(e) => {
                self.leave_cell(ino, &cell);
                Err(e)
            }
        }
    }

    /// Registers `entry` as the writer of `ino`, a new inode, with one
    /// user. A new inode number is never reused, so it has no slot; if it
    /// had one, nothing changes and the call fails.
    pub fn adopt(&self, ino: u64, entry: WriterEntry) -> Result<Arc<WriterEntry>, super::FsError> {
        let entry = Arc::new(entry);
        let cell: Cell = Arc::new(tokio::sync::OnceCell::new_with(Some(entry.clone())));
        let mut slots = self.slots.lock();
        match slots.entry(ino) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Slot { cell, users: 1 });
                Ok(entry)
            }
            std::collections::hash_map::Entry::Occupied(_) => Err(super::FsError::Busy),
        }
    }

    /// The writer of `ino`, if one is made and in use.
    pub fn get(&self, ino: u64) -> Option<Arc<WriterEntry>> {
        self.slots.lock().get(&ino).and_then(|s| s.cell.get().cloned())
    }

    /// The writer of `ino`, waiting for one being made: an operation that
    /// changes the file (a rename, an unlink) must reach a writer whose open
    /// is still under way. `None` if there is none, or its making failed.
    pub async fn get_or_wait(&self, ino: u64) -> Option<Arc<WriterEntry>> {
        let cell = self.slots.lock().get(&ino).map(|s| s.cell.clone())?;
        cell.get_or_try_init(|| async { Err(()) }).await.ok().cloned()
    }

    /// True when the writer of `ino` has users (handles, openers waiting):
    /// not when its last handle closed and its upload is under way.
    pub fn in_use(&self, ino: u64) -> bool {
        self.slots.lock().get(&ino).is_some_and(|s| s.users > 0)
    }

    /// True when `ino` has a writer, or one is being made.
    pub fn contains(&self, ino: u64) -> bool {
        self.slots.lock().contains_key(&ino)
    }

    /// The inodes with a writer, or one being made.
    pub fn inodes(&self) -> Vec<u64> {
        self.slots.lock().keys().copied().collect()
    }

    /// Every writer made.
    pub fn all(&self) -> Vec<(u64, Arc<WriterEntry>)> {
        self.slots.lock().iter().filter_map(|(ino, s)| s.cell.get().map(|w| (*ino, w.clone()))).collect()
    }

    /// One user of `entry` (the writer of `ino`) less.
    pub fn leave(&self, ino: u64, entry: &Arc<WriterEntry>) -> Left {
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(&ino) else { return Left::Gone };
        if !slot.cell.get().is_some_and(|w| Arc::ptr_eq(w, entry)) {
            return Left::Gone;
        }
        slot.users = slot.users.saturating_sub(1);
        if slot.users > 0 { Left::Others } else { Left::Last(entry.clone()) }
    }

    /// Removes the slot of `ino` if it still holds `entry` and nobody joined
    /// it since [`Self::leave`] said it was the last. Returns whether it did.
    pub fn retire(&self, ino: u64, entry: &Arc<WriterEntry>) -> bool {
        let removed = {
            let mut slots = self.slots.lock();
            let ours =
                slots.get(&ino).is_some_and(|s| s.users == 0 && s.cell.get().is_some_and(|w| Arc::ptr_eq(w, entry)));
            if ours { slots.remove(&ino) } else { None }
        };
        removed.is_some()
    }

    /// A failed join: one waiting user less, and the slot goes if it is empty.
    fn leave_cell(&self, ino: u64, cell: &Cell) {
        let removed = {
            let mut slots = self.slots.lock();
            let Some(slot) = slots.get_mut(&ino) else { return };
            if !Arc::ptr_eq(&slot.cell, cell) {
                return;
            }
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 { slots.remove(&ino) } else { None }
        };
        drop(removed);
    }

    /// Number of slots (for tests).
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
