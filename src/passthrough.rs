//! FUSE passthrough on the kernel side: which open files the kernel serves
//! by itself from a local file, and the rules it sets for them.
//!
//! With passthrough (Linux 6.9+, `CONFIG_FUSE_PASSTHROUGH`, and
//! `CAP_SYS_ADMIN` for the ioctl that registers a file), an open can be
//! answered with a *backing file*: the kernel then reads (and maps) that
//! file directly, and bucketfs sees no READ at all. The file system core
//! finds such a file ([`crate::fs::Fs::passthrough_file`]: the whole-object
//! file of a version cached whole on disk, checked); this component decides
//! whether the open may use it, and keeps the registration alive.
//!
//! The kernel's rule, per inode (fs/fuse/iomode.c): while any file of an
//! inode is open in passthrough mode, every other open of it must be in
//! passthrough mode on the *same* backing file; and an inode with a file
//! open in the ordinary (page cache) mode refuses a passthrough open. An
//! answer that breaks the rule fails the application's `open` with EIO. So
//! each inode here is in one of two modes, counted by open handle:
//!
//! - **Cached**: handles answered the ordinary way. A passthrough candidate
//!   opened now is answered the ordinary way too (it is correct, only
//!   slower).
//! - **Passed**: handles on one backing file. Another read of the same
//!   version shares it; an open that cannot (a write, or a read of a newer
//!   version of the object) fails with EBUSY and one log line, since no
//!   answer the kernel accepts would be right. `--no-passthrough` avoids it.
//!
//! The counts here are never below the kernel's: a handle is counted before
//! its answer is sent, and uncounted when its RELEASE arrives, which the
//! kernel sends after it has dropped the handle's mode. Write opens are
//! counted before the file system opens them ([`Passthrough::reserve`]),
//! so an open that must fail fails before a writer exists (a truncating
//! open that failed later would still have truncated).
//!
//! A registration ([`BackingId`]) is shared by the handles of its inode and
//! closed (its `Drop`) when the last of them is released. The lock is never
//! held across the registration ioctl, nor across a call into the file
//! system.
//!
//! Passthrough is on until the first failure to register a file (no
//! `CAP_SYS_ADMIN`, a cache directory on a stacked file system such as
//! overlayfs, ...): that failure is logged once and the mount goes on
//! without it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::BackingId;
use tracing::info;

use crate::sync::Mutex;

/// A backing file's identity: device and inode number.
type FileId = (u64, u64);

enum Mode {
    Cached(usize),
    Passed { file: FileId, backing: Arc<BackingId>, opens: usize },
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Mode>,
    /// Inode of each counted handle.
    handles: HashMap<u64, u64>,
}

/// How to answer an open.
pub enum Answer {
    /// In passthrough mode on this registration.
    Passthrough(Arc<BackingId>),
    /// The ordinary way.
    Cached,
    /// With EBUSY: the inode is passed through to a file this open cannot use.
    Busy,
}

/// See the module documentation.
pub struct Passthrough {
    on: AtomicBool,
    state: Mutex<State>,
    /// Woken when an inode's last handle is released.
    released: tokio::sync::Notify,
}

/// How long an open that conflicts with a passed-through inode waits for
/// its handles to be released before it fails. The kernel sends RELEASE
/// after `close` has returned, so `cat f; echo x >> f` would otherwise
/// race with the RELEASE of `cat`'s handle; a few milliseconds settle it.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Passthrough {
    pub fn new(on: bool) -> Self {
        Self { on: AtomicBool::new(on), state: Mutex::new(State::default()), released: tokio::sync::Notify::new() }
    }

    /// True while passthrough may be offered.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Turns passthrough off for the rest of the mount, with one log line.
    pub fn turn_off(&self, why: &str) {
        if self.on.swap(false, Ordering::Relaxed) {
            info!("passthrough off: {why}; files cached whole are read through bucketfs");
        }
    }

    /// Counts an ordinary open of `ino` before the file system makes it;
    /// false (and nothing counted) when the inode is passed through.
    /// [`Self::bind`] or [`Self::unreserve`] follows.
    pub fn reserve(&self, ino: u64) -> bool {
        let mut s = self.state.lock();
        match s.inodes.entry(ino).or_insert(Mode::Cached(0)) {
            Mode::Cached(n) => {
                *n += 1;
                true
            }
            Mode::Passed { .. } => false,
        }
    }

    /// Waits up to [`SETTLE`] for `ino` to leave passthrough mode (its
    /// handles released); true if it did.
    pub async fn settle(&self, ino: u64) -> bool {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !matches!(self.state.lock().inodes.get(&ino), Some(Mode::Passed { .. })) {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return false;
            }
        }
    }

    /// The reserved open of `ino` became handle `fh`.
    pub fn bind(&self, ino: u64, fh: u64) {
        self.state.lock().handles.insert(fh, ino);
    }

    /// The reserved open of `ino` failed.
    pub fn unreserve(&self, ino: u64) {
        let gone = {
            let mut s = self.state.lock();
            Self::uncount(&mut s, ino)
        };
        drop(gone);
    }

    /// Decides how to answer read handle `fh` of `ino`, given the local file
    /// that holds its bytes, if any; `register` registers a file with the
    /// kernel. A handle answered [`Answer::Busy`] is not counted.
    pub fn open_read(
        &self,
        ino: u64,
        fh: u64,
        file: Option<&std::fs::File>,
        register: impl Fn(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Answer {
        let id = file.and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
        let (Some(file), Some(id)) = (file.filter(|_| self.is_on()), id) else {
            return self.count(ino, fh);
        };
        // The registration is made outside the lock, when the inode may
        // take it; another open may register the same file meanwhile, and
        // then one of the two registrations is dropped.
        let needs = {
            let s = self.state.lock();
            match s.inodes.get(&ino) {
                None | Some(Mode::Cached(0)) => true,
                Some(Mode::Cached(_)) => false,
                Some(Mode::Passed { file, .. }) => *file != id,
            }
        };
        let mut made = match needs {
            true => match register(file) {
                Ok(b) => Some(Arc::new(b)),
                Err(e) => {
                    self.turn_off(&format!("the kernel refused a backing file: {e}"));
                    None
                }
            },
            false => None,
        };
        let answer = {
            let mut s = self.state.lock();
            let answer = match s.inodes.entry(ino).or_insert(Mode::Cached(0)) {
                mode @ Mode::Cached(0) => match made.take() {
                    Some(backing) => {
                        *mode = Mode::Passed { file: id, backing: backing.clone(), opens: 1 };
                        Answer::Passthrough(backing)
                    }
                    None => {
                        *mode = Mode::Cached(1);
                        Answer::Cached
                    }
                },
                Mode::Cached(n) => {
                    *n += 1;
                    Answer::Cached
                }
                Mode::Passed { file, backing, opens } if *file == id => {
                    *opens += 1;
                    Answer::Passthrough(backing.clone())
                }
                Mode::Passed { .. } => Answer::Busy,
            };
            if !matches!(answer, Answer::Busy) {
                s.handles.insert(fh, ino);
            }
            answer
        };
        // An unused registration is closed here, outside the lock.
        drop(made);
        answer
    }

    /// Counts an ordinary open `fh` of `ino`, made without a reservation.
    fn count(&self, ino: u64, fh: u64) -> Answer {
        let mut s = self.state.lock();
        match s.inodes.entry(ino).or_insert(Mode::Cached(0)) {
            Mode::Cached(n) => {
                *n += 1;
                s.handles.insert(fh, ino);
                Answer::Cached
            }
            Mode::Passed { .. } => Answer::Busy,
        }
    }

    /// Handle `fh` was released.
    pub fn release(&self, fh: u64) {
        let gone = {
            let mut s = self.state.lock();
            match s.handles.remove(&fh) {
                Some(ino) => Self::uncount(&mut s, ino),
                None => None,
            }
        };
        // The last handle's registration is closed here, outside the lock.
        if gone.is_some() {
            drop(gone);
            self.released.notify_waiters();
        }
    }

    /// One handle of `ino` less; the inode's mode when it was the last.
    fn uncount(s: &mut State, ino: u64) -> Option<Mode> {
        let last = match s.inodes.get_mut(&ino)? {
            Mode::Cached(n) | Mode::Passed { opens: n, .. } => {
                *n = n.saturating_sub(1);
                *n == 0
            }
        };
        if last { s.inodes.remove(&ino) } else { None }
    }

    /// Opens counted now (for tests): (ordinary, passed through).
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock();
        s.inodes.values().fold((0, 0), |(c, p), m| match m {
            Mode::Cached(n) => (c + n, p),
            Mode::Passed { opens, .. } => (c, p + opens),
        })
    }
}
