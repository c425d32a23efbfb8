//! Open file and directory handles: what each kernel file handle reads or
//! writes, and a directory handle's listing and batch size.
//!
//! This component owns one lock over both tables and the handle counter.
//! Its methods copy out what a caller needs (an `Arc` of the handle, a
//! listing's receiver) and return, so no guard outlives a call and none is
//! held while the caller goes on to the writer registry, the namespace or
//! the server.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::read::Reader;
use super::writers::WriterEntry;
use super::{Listed, READDIR_BATCH, READDIR_BATCH_MAX};
use crate::sync::Mutex;

pub(super) enum HandleKind {
    Read(ReadHandle),
    Write(Arc<WriterEntry>),
}

/// A read handle: the reader of the version it reads now, which is not
/// always the version it opened (see [`super::Fs::reader_of`]).
pub(super) struct ReadHandle {
    reader: Mutex<Arc<Reader>>,
}

impl ReadHandle {
    pub fn new(reader: Reader) -> Self {
        Self { reader: Mutex::new(Arc::new(reader)) }
    }

    pub fn reader(&self) -> Arc<Reader> {
        self.reader.lock().clone()
    }

    /// Reads with `next` from now on, unless another read replaced `was`
    /// first.
    pub fn replace(&self, was: &Arc<Reader>, next: Reader) {
        let mut reader = self.reader.lock();
        if Arc::ptr_eq(&reader, was) {
            *reader = Arc::new(next);
        }
    }
}

pub(super) struct FileHandle {
    pub ino: u64,
    pub kind: HandleKind,
    /// For write handles, the thread group of the process that opened it
    /// (see [`super::Fs::flush`]); 0 for read handles, whose flush does
    /// nothing. Finding it reads /proc, which cost 5 % of bucketfs's CPU
    /// when it was done for every open of a small file.
    pub opener: u32,
}

struct DirHandle {
    ino: u64,
    /// The listing this handle reads, filled as its pages arrive.
    listed: Option<watch::Receiver<Listed>>,
    /// Entries handed out per call: as many as the kernel's last reply
    /// buffer held (one page on older kernels, up to 128 KiB on newer).
    batch: usize,
    /// What fitted the last time an answer did not: `batch` grows up to it.
    batch_ceiling: usize,
}

/// What a directory handle is reading, copied out of the table.
pub(super) struct DirState {
    pub ino: u64,
    pub listed: Option<watch::Receiver<Listed>>,
    pub batch: usize,
}

struct Tables {
    files: HashMap<u64, Arc<FileHandle>>,
    dirs: HashMap<u64, DirHandle>,
    next: u64,
}

/// See the module documentation.
pub(super) struct Handles {
    tables: Mutex<Tables>,
}

impl Default for Handles {
    fn default() -> Self {
        Self { tables: Mutex::new(Tables { files: HashMap::new(), dirs: HashMap::new(), next: 1 }) }
    }
}

impl Handles {
    pub fn add_file(&self, handle: FileHandle) -> u64 {
        let mut t = self.tables.lock();
        let fh = t.next;
        t.next += 1;
        t.files.insert(fh, Arc::new(handle));
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.tables.lock().files.get(&fh).cloned()
    }

    pub fn remove_file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.tables.lock().files.remove(&fh)
    }

    pub fn add_dir(&self, ino: u64) -> u64 {
        let mut t = self.tables.lock();
        let fh = t.next;
        t.next += 1;
        t.dirs.insert(fh, DirHandle { ino, listed: None, batch: READDIR_BATCH, batch_ceiling: READDIR_BATCH_MAX });
        fh
    }

    pub fn remove_dir(&self, fh: u64) {
        let removed = self.tables.lock().dirs.remove(&fh);
        drop(removed);
    }

    pub fn dir(&self, fh: u64) -> Option<DirState> {
        let t = self.tables.lock();
        let h = t.dirs.get(&fh)?;
        Some(DirState { ino: h.ino, listed: h.listed.clone(), batch: h.batch })
    }

    /// Handle `fh` reads `listed` from now on.
    pub fn set_listing(&self, fh: u64, listed: watch::Receiver<Listed>) {
        if let Some(h) = self.tables.lock().dirs.get_mut(&fh) {
            h.listed = Some(listed);
        }
    }

    /// Records that `fitted` of the `given` entries of an answer fitted into
    /// the kernel's buffer: the batch doubles while answers fit, but not
    /// past what fitted when one did not.
    pub fn fitted(&self, fh: u64, given: usize, fitted: usize) {
        if let Some(h) = self.tables.lock().dirs.get_mut(&fh) {
            if fitted < given {
                h.batch = fitted.max(1);
                h.batch_ceiling = h.batch;
            } else if given >= h.batch {
                h.batch = (h.batch * 2).min(h.batch_ceiling);
            }
        }
    }
}
