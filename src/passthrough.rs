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
//! - **Passed**: handles on one backing file. An open that can use the
//!   same file shares it (another read of the same cached version; any
//!   read or write of a file whose writer's staging file is passed
//!   through); an open that cannot (a write of a file read from the cache,
//!   or a read of a newer version of the object) fails with EBUSY and one
//!   log line, since no answer the kernel accepts would be right.
//!   `--no-passthrough` avoids it.
//!
//! The counts here are never below the kernel's: a handle is counted before
//! its answer is sent, and uncounted when its RELEASE arrives, which the
//! kernel sends after it has dropped the handle's mode. Write opens are
//! counted before the file system opens them ([`Passthrough::reserve`]),
//! so an open that must fail fails before a writer exists (a truncating
//! open that failed later would still have truncated).
//!
//! A write open is reserved and counted as an ordinary open before its
//! writer exists; when it is the inode's only open and its writer can make
//! its staging file hold the whole file ([`crate::fs::Fs::passthrough_file`]),
//! it is then *upgraded* to passthrough on that file. Later opens of the
//! inode, reads and writes, share the staging file while it is passed
//! through: every one of them sees what the kernel wrote there.
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

fn file_id(file: &std::fs::File) -> Option<FileId> {
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

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
        let id = file.and_then(file_id);
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
            true => self.register(file, register),
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

    /// True when handle `fh`, counted by [`Self::reserve`] and
    /// [`Self::bind`], is the only open of `ino`: the one case in which it
    /// may still be answered in passthrough mode ([`Self::upgrade`]).
    pub fn alone(&self, ino: u64, fh: u64) -> bool {
        self.is_on() && Self::sole(&self.state.lock(), ino, fh)
    }

    fn sole(s: &State, ino: u64, fh: u64) -> bool {
        matches!(s.inodes.get(&ino), Some(Mode::Cached(1))) && s.handles.get(&fh) == Some(&ino)
    }

    /// True when `ino` is passed through to `file`: an open that can use
    /// `file` may share it ([`Self::open_read`] counts it).
    pub fn passed_to(&self, ino: u64, file: &std::fs::File) -> bool {
        let Some(id) = file_id(file) else { return false };
        matches!(self.state.lock().inodes.get(&ino), Some(Mode::Passed { file, .. }) if *file == id)
    }

    /// Registers `file` with the kernel; a refusal turns passthrough off.
    fn register(
        &self,
        file: &std::fs::File,
        register: impl Fn(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        match register(file) {
            Ok(b) => Some(Arc::new(b)),
            Err(e) => {
                self.turn_off(&format!("the kernel refused a backing file: {e}"));
                None
            }
        }
    }

    /// Answers handle `fh` of `ino`, already counted as an ordinary open,
    /// in passthrough mode on `file` if it is still the inode's only open;
    /// otherwise the ordinary way. A write open takes this path: its writer
    /// exists before the backing file does (see the module documentation).
    pub fn upgrade(
        &self,
        ino: u64,
        fh: u64,
        file: &std::fs::File,
        register: impl Fn(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Answer {
        let Some(id) = file_id(file) else { return Answer::Cached };
        if !self.alone(ino, fh) {
            return Answer::Cached;
        }
        let Some(backing) = self.register(file, register) else { return Answer::Cached };
        let mut s = self.state.lock();
        if !Self::sole(&s, ino, fh) {
            drop(s);
            // Another open came meanwhile: ordinary mode, and the unused
            // registration is closed outside the lock.
            drop(backing);
            return Answer::Cached;
        }
        s.inodes.insert(ino, Mode::Passed { file: id, backing: backing.clone(), opens: 1 });
        Answer::Passthrough(backing)
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

/// The kernel's rule, checked against what [`Passthrough`] answers: a model
/// of the kernel holds each answered handle (added when the answer is
/// "sent", removed just before its RELEASE is "sent", as the kernel does),
/// and every answer must agree with the handles the model already holds:
/// all ordinary, or all passed through to one file.
#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Kernel {
        Cached,
        Passed(FileId),
    }

    /// The kernel's view: handle -> (inode, mode).
    #[derive(Default)]
    struct Model(crate::sync::Mutex<HashMap<u64, (u64, Kernel)>>);

    impl Model {
        fn answered(&self, ino: u64, fh: u64, answer: &Answer, file: Option<FileId>) {
            let mode = match answer {
                Answer::Busy => return,
                Answer::Cached => Kernel::Cached,
                Answer::Passthrough(_) => Kernel::Passed(file.expect("passed through without a file")),
            };
            let mut open = self.0.lock();
            for (other, (i, m)) in open.iter() {
                if *i == ino {
                    assert_eq!(*m, mode, "handle {fh} answered {mode:?} while handle {other} is {m:?}");
                }
            }
            open.insert(fh, (ino, mode));
        }

        fn closing(&self, fh: u64) {
            self.0.lock().remove(&fh);
        }
    }

    fn id(f: &std::fs::File) -> FileId {
        file_id(f).unwrap()
    }

    fn register(_: &std::fs::File) -> std::io::Result<BackingId> {
        Ok(BackingId::detached(7))
    }

    /// A write open as the FUSE edge makes it: reserved, bound, upgraded
    /// to `file` if alone; false if it was refused.
    fn write_open(p: &Passthrough, m: &Model, ino: u64, fh: u64, file: &std::fs::File) -> bool {
        if !p.reserve(ino) {
            if !p.passed_to(ino, file) {
                return false;
            }
            let answer = p.open_read(ino, fh, Some(file), register);
            m.answered(ino, fh, &answer, Some(id(file)));
            return !matches!(answer, Answer::Busy);
        }
        p.bind(ino, fh);
        let answer = match p.alone(ino, fh) {
            true => p.upgrade(ino, fh, file, register),
            false => Answer::Cached,
        };
        m.answered(ino, fh, &answer, Some(id(file)));
        true
    }

    fn read_open(p: &Passthrough, m: &Model, ino: u64, fh: u64, file: Option<&std::fs::File>) -> bool {
        let answer = p.open_read(ino, fh, file, register);
        m.answered(ino, fh, &answer, file.map(id));
        !matches!(answer, Answer::Busy)
    }

    fn close(p: &Passthrough, m: &Model, fh: u64) {
        m.closing(fh);
        p.release(fh);
    }

    /// Random sequences of opens (reads of a cache file, reads and writes of
    /// a staging file, plain reads) and closes on two inodes, in one thread:
    /// every answer keeps the kernel's rule, and everything is uncounted at
    /// the end.
    #[test]
    fn answers_keep_the_kernels_rule_and_counts_come_back() {
        let files = [tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap()];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let (p, m) = (Passthrough::new(true), Model::default());
            let mut open: Vec<u64> = Vec::new();
            for fh in 1..60u64 {
                let ino = 1 + next(2);
                let ok = match next(5) {
                    0 => write_open(&p, &m, ino, fh, &files[1]),
                    1 => read_open(&p, &m, ino, fh, Some(&files[0])),
                    2 => read_open(&p, &m, ino, fh, Some(&files[1])),
                    3 => read_open(&p, &m, ino, fh, None),
                    _ => {
                        if !open.is_empty() {
                            let i = next(open.len() as u64) as usize;
                            close(&p, &m, open.swap_remove(i));
                        }
                        false
                    }
                };
                if ok {
                    open.push(fh);
                }
            }
            for fh in open {
                close(&p, &m, fh);
            }
            assert_eq!(p.counts(), (0, 0));
            assert!(p.state.lock().handles.is_empty());
        }
    }

    /// A write open that upgrades to passthrough while reads of the same
    /// inode arrive: either the reads share its file or the write stays
    /// ordinary, never a mix.
    #[test]
    fn a_write_upgrading_alone_is_never_mixed_with_ordinary_opens() {
        let file = tempfile::tempfile().unwrap();
        let (p, m) = (Passthrough::new(true), Model::default());
        assert!(write_open(&p, &m, 1, 1, &file));
        assert_eq!(p.counts(), (0, 1), "alone: upgraded");
        assert!(read_open(&p, &m, 1, 2, Some(&file)), "a read shares the staging file");
        assert!(write_open(&p, &m, 1, 3, &file), "a second write shares it");
        assert!(!read_open(&p, &m, 1, 4, None), "a read that cannot use it is refused");
        for fh in [1, 2, 3] {
            close(&p, &m, fh);
        }
        assert!(read_open(&p, &m, 1, 5, None));
        assert!(write_open(&p, &m, 1, 6, &file), "not alone: ordinary");
        assert_eq!(p.counts(), (2, 0));
        close(&p, &m, 5);
        close(&p, &m, 6);
        assert_eq!(p.counts(), (0, 0));
    }

    /// The same race under shuttle's scheduler, in many interleavings.
    #[cfg(feature = "shuttle")]
    #[test]
    fn shuttle_passthrough_upgrade_races_reads() {
        shuttle::check_random(
            || {
                let file = Arc::new(tempfile::tempfile().unwrap());
                let p = Arc::new(Passthrough::new(true));
                let m = Arc::new(Model::default());
                let threads: Vec<_> = (0..3u64)
                    .map(|t| {
                        let (p, m, file) = (p.clone(), m.clone(), file.clone());
                        shuttle::thread::spawn(move || {
                            let fh = 10 + t;
                            let ok = match t {
                                0 => write_open(&p, &m, 1, fh, &file),
                                1 => read_open(&p, &m, 1, fh, Some(&file)),
                                _ => read_open(&p, &m, 1, fh, None),
                            };
                            shuttle::thread::yield_now();
                            if ok {
                                close(&p, &m, fh);
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap();
                }
                assert_eq!(p.counts(), (0, 0));
            },
            2_000,
        );
    }
}
