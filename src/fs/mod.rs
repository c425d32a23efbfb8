//! The file system core: async, on tokio, and free of FUSE types.
//!
//! [`Fs`] answers the operations the FUSE adapter forwards. It is built from
//! one or more [`MountPoint`]s: a single mount at the root, or several mounts
//! at paths below synthetic ("virtual") directories, all in one tree.
//!
//! Errors are [`FsError`]s; they become errno values at the FUSE edge only.
//! Every failure that is not a plain "no such file" is logged here, once,
//! with the key and the cause.
//!
//! `Fs` dispatches between components, each the one owner of its state:
//!
//! - the namespace ([`inode::InodeTable`]): inodes, names, listings, the
//!   negative cache and the per-directory miss counts, under one lock;
//! - the open handles (`handles`);
//! - the writer registry ([`writers::Writers`]): one writer per inode, and
//!   its upload lifecycle ([`write::Writer`], [`write::Upload`]);
//! - the read side: per-handle prefetch ([`read::Reader`]) and the block
//!   cache with the memory budget ([`cache::BlockCache`], whose
//!   [`cache::Reservation`]s give their bytes back on `Drop`);
//! - the disk cache ([`disk_cache::DiskCache`]), which also hands out the
//!   checked whole-object file of a version cached whole, for the FUSE
//!   edge to pass through to the kernel ([`Fs::passthrough_file`], which
//!   also hands out a writer's staging file once it holds the whole file;
//!   the kernel-side rules live in [`crate::passthrough`]).
//!
//! The rule that keeps them deadlock-free: no lock guard is held across an
//! `.await` (guards are not `Send`, so such a future cannot be spawned) or
//! across a call into another component. Components hand out copies and
//! `Arc`s, never guards; an operation here takes what it needs from one,
//! lets go, then goes on to the next.

pub mod cache;
pub mod disk_cache;
#[cfg(test)]
mod fault_tests;
mod handles;
pub mod inode;
#[cfg(test)]
mod model_tests;
mod mutate;
pub mod namespace;
pub mod posix;
pub mod posix_ops;
pub mod read;
pub mod reply;
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests;
#[cfg(test)]
mod stress_tests;
pub mod write;
pub mod writers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::spec::FsSettings;
use crate::store::{ObjectAttrs, ObjectMeta, ObjectStore, StoreError};
use cache::{BlockCache, ObjectId, ReadData};
use handles::{FileHandle, HandleKind, Handles, ReadHandle};
use inode::{Inode, InodeTable, Loc, PageCache, ROOT};
use namespace::{Entry, Kind, Skipped};
use read::Reader;
use write::WriteError;
use writers::{Left, WriterEntry, Writers};

/// Lookups that miss in one directory within a TTL before it is listed
/// whole instead: two requests per name cost more than a listing page.
const LIST_AFTER_MISSES: u32 = 3;
/// What the caches say about a name ([`Fs::lookup_now`]).
enum Cached {
    /// The answer, from the caches.
    Answer(FsError),
    /// Not known: ask the server about the directory `(mount, key)`'s child.
    Miss(Arc<MountPoint>, String),
}

/// The largest download an open for writing makes so that the kernel can
/// write the file itself (passthrough): an edit of a larger object goes
/// through bucketfs, which appends without downloading what is before.
pub const PASSTHROUGH_DOWNLOAD_MAX: u64 = 64 << 20;
/// Inodes freed between two hand-backs of free heap memory to the system.
const TRIM_AFTER_FREED: usize = 16_384;

/// Hands free heap memory back to the system. glibc keeps what a walk of a
/// large tree freed for later use, so without it the process stays at the
/// walk's size after the kernel has forgotten every inode.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bound on remembered warnings about odd keys, so each is logged once.
const WARNED_MAX: usize = 10_000;

/// The thread group (process) of a thread id, from /proc; the id itself if
/// it cannot be read.
fn tgid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(pid)
}

/// Something the kernel should stop caching.
#[derive(Clone, Debug)]
pub enum Invalidate {
    /// Attributes and pages of an inode.
    Inode(u64),
    /// The entry `name` in directory `parent`.
    Entry(u64, String),
}

/// A mount and where it sits in the tree.
pub type PlacedMount = (Vec<String>, Arc<MountPoint>);

/// One bucket (or prefix) served somewhere in the tree.
pub struct MountPoint {
    pub name: String,
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix of the mount root: empty or ending with `/`.
    pub prefix: String,
    pub read_only: bool,
    pub ttl: Duration,
    /// Endpoint and bucket, identifying cached blocks.
    pub source_id: Arc<str>,
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("read-only file system")]
    ReadOnly,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("bad file handle")]
    BadHandle,
    #[error("operation not supported")]
    NotSupported,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("cross-device rename")]
    CrossDevice,
    #[error("busy: files under it are open for writing")]
    Busy,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("no such attribute")]
    NoAttr,
    #[error("argument list too long")]
    TooBig,
    #[error("no space left on device")]
    NoSpace,
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Write(#[from] WriteError),
}

impl FsError {
    /// The request may have been applied although it failed: no answer came
    /// (a timeout, a broken connection) or the server failed (5xx).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            FsError::Store(e) | FsError::Write(WriteError::Store(e)) => e.is_transient(),
            _ => false,
        }
    }

    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::BadHandle => libc::EBADF,
            FsError::NotSupported => libc::ENOTSUP,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::CrossDevice => libc::EXDEV,
            FsError::Busy => libc::EBUSY,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotPermitted => libc::EPERM,
            FsError::NoAttr => libc::ENODATA,
            FsError::TooBig => libc::E2BIG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Store(StoreError::PreconditionFailed) => libc::ESTALE,
            FsError::Store(e) | FsError::Write(WriteError::Store(e)) => match e {
                StoreError::NotFound => libc::ENOENT,
                StoreError::AccessDenied(_) => libc::EACCES,
                _ => libc::EIO,
            },
            FsError::Write(WriteError::Local { errno, .. }) => *errno,
            FsError::Write(WriteError::Failed) => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// Attributes of an inode, as the adapter needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// How long the kernel may cache this.
    pub ttl: Duration,
    /// Under a read-only mount (for the permission bits shown).
    pub read_only: bool,
    /// With `--posix-metadata`: what the object stores (mode, owner, times).
    pub posix: Option<Arc<PosixState>>,
}

/// An object's stored POSIX attributes (with `--posix-metadata`), with the
/// whole metadata they came from, so a change rewrites the rest unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PosixState {
    pub posix: posix::Posix,
    pub attrs: ObjectAttrs,
    /// The mtime was set (utimes) while the file is open for writing: the
    /// upload at close keeps it instead of stamping the upload time.
    pub mtime_pinned: bool,
    /// Changed while the file is open for writing and not stored yet: the
    /// upload at close (or a copy, if there is nothing to upload) stores it.
    pub pending: bool,
}

/// What [`Fs::read_now`] did without waiting.
pub enum ReadNow {
    /// The read is answered.
    Done(ReadData),
    /// The read is started; [`Fs::finish_read`] waits for its bytes.
    Started(StartedRead),
    /// Not a handle reading an object: use [`Fs::read`].
    Wait,
}

/// A read [`Fs::read_now`] started, and the reader that finishes it.
pub struct StartedRead {
    reader: Arc<Reader>,
    started: read::Started,
}

/// A writer whose last user released it with data still to upload (see
/// [`Fs::release_now`]).
pub struct LastWriter {
    ino: u64,
    entry: Arc<WriterEntry>,
}

/// One entry of a directory snapshot.
#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: String,
    pub attr: Attr,
}

/// A directory listing as it arrives: `readdir` hands out entries while the
/// later pages are still being listed.
#[derive(Default)]
pub(crate) struct Listed {
    /// `.`, `..`, then the entries in the order they became final.
    items: Vec<Arc<DirItem>>,
    /// Set once the listing is complete or has failed.
    done: bool,
    error: Option<FsError>,
}

/// Most entries one `readdir` call returns. A reply holds one memory page:
/// about 25 entries with attributes (READDIRPLUS, which the kernel always
/// uses here), about 150 without.
pub(crate) const READDIR_BATCH: usize = 64;
/// Entries of a LIST page taken in between two wake-ups of `readdir`.
const LISTED_SLICE: usize = 512;
/// The most entries handed out per `readdir` call.
pub(crate) const READDIR_BATCH_MAX: usize = 4096;

/// Numbers for `statfs`.
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// See the module documentation.
pub struct Fs {
    settings: FsSettings,
    inodes: Mutex<InodeTable>,
    handles: Handles,
    cache: Arc<BlockCache>,
    warned: Mutex<HashSet<String>>,
    started: SystemTime,
    /// Tells the kernel to drop what it caches about an inode or an entry.
    invalidate: OnceLock<Box<dyn Fn(Invalidate) + Send + Sync>>,
    writers: Writers,
    staging: tempfile::TempDir,
    /// Uploads running now, so shutdown can wait for them.
    uploads: AtomicUsize,
    /// The mounts served now.
    mounts: Mutex<Vec<Arc<MountPoint>>>,
    disk: Option<Arc<disk_cache::DiskCache>>,
    /// With `--posix-metadata`: metadata reads in flight, by inode, so a
    /// read-ahead and a `readdir` waiting for the same entry share one HEAD.
    posix_reads: Mutex<HashMap<u64, posix_ops::SharedRead>>,
    /// Permits for those reads' HEADs: at most
    /// [`posix_ops::HEAD_CONCURRENCY`] in flight for the whole mount,
    /// however many `readdir` batches and read-aheads overlap.
    posix_heads: tokio::sync::Semaphore,
    /// Directories being renamed, by mount (source id) and key prefix: no
    /// writer is made and no entry created under one until its rename ends
    /// (see `mutate::Registered`).
    renaming: Mutex<Vec<(Arc<str>, String)>>,
    /// Keys being written by a mkdir, a symlink, a metadata change or a
    /// rename, which a directory rename waits for (see `mutate::Registered`).
    making: Mutex<Vec<(Arc<str>, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fs {
    /// Builds the tree: one mount with an empty path is the root; otherwise
    /// the root is virtual and each mount sits at its path.
    pub fn new(settings: FsSettings, mounts: Vec<(Vec<String>, Arc<MountPoint>)>) -> anyhow::Result<Self> {
        let now = SystemTime::now();
        let mut table = InodeTable::new();
        // The root starts as an empty virtual directory; `reconfigure` lays
        // out the mounts, as it does for a live config update.
        table.insert_pinned(Inode::pinned_dir(ROOT, ROOT, "", Loc::Virtual { children: BTreeMap::new() }, now));
        let (staging, disk) = match &settings.cache_dir {
            Some(dir) => {
                let staging_root = dir.join("staging");
                std::fs::create_dir_all(&staging_root)
                    .map_err(|e| anyhow::anyhow!("cache directory {}: {e}", dir.display()))?;
                let staging = tempfile::Builder::new().prefix("bucketfs-").tempdir_in(&staging_root)?;
                let disk = disk_cache::DiskCache::open(dir, settings.max_cache_size)
                    .map_err(|e| anyhow::anyhow!("cache directory {}: {e}", dir.display()))?;
                (staging, Some(disk))
            }
            None => (tempfile::Builder::new().prefix("bucketfs-staging-").tempdir()?, None),
        };
        let fs = Self {
            cache: Arc::new(BlockCache::new(settings.memory_limit)),
            settings,
            inodes: Mutex::new(table),
            handles: Handles::default(),
            warned: Mutex::new(HashSet::new()),
            started: now,
            invalidate: OnceLock::new(),
            writers: Writers::default(),
            staging,
            uploads: AtomicUsize::new(0),
            mounts: Mutex::new(Vec::new()),
            disk,
            posix_reads: Mutex::new(HashMap::new()),
            posix_heads: tokio::sync::Semaphore::new(posix_ops::HEAD_CONCURRENCY),
            renaming: Default::default(),
            making: Default::default(),
        };
        fs.reconfigure(mounts)?;
        Ok(fs)
    }

    /// The metadata TTL of a directory's mount (None for virtual directories).
    pub fn dir_ttl(&self, ino: u64) -> Option<Duration> {
        lock(&self.inodes).get(ino).and_then(|i| i.mount().map(|m| m.ttl))
    }

    /// The mounts served now.
    pub fn mounts(&self) -> Vec<Arc<MountPoint>> {
        lock(&self.mounts).clone()
    }

    pub fn settings(&self) -> &FsSettings {
        &self.settings
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// Installs the hook that drops the kernel's caches.
    pub fn set_invalidator(&self, f: Box<dyn Fn(Invalidate) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }

    /// Replaces the mounts without remounting (Fluid's live config update):
    /// mounts whose path is unchanged keep their directory inode (re-targeted
    /// if the mount changed), new paths appear, removed ones disappear.
    pub fn reconfigure(&self, mounts: Vec<(Vec<String>, Arc<MountPoint>)>) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let mut gone: Vec<(u64, String)> = Vec::new();
        let mut retargeted: Vec<u64> = Vec::new();
        {
            let mut table = lock(&self.inodes);
            let old_children: Vec<(String, u64)> = match table.get(ROOT).map(|r| r.loc.clone()) {
                Some(Loc::Virtual { children }) => children.into_iter().collect(),
                _ => Vec::new(),
            };
            let set_loc = |table: &mut InodeTable, ino: u64, loc: Loc| {
                if let Some(i) = table.get_mut(ino) {
                    i.loc = loc;
                    i.listing = None;
                    i.local_children.clear();
                }
            };
            if let [(path, mount)] = mounts.as_slice()
                && path.is_empty()
            {
                // The root becomes the mount's root: the names under it so far
                // (mount directories, or another mount's entries) must not
                // resolve any more.
                for (name, ino) in table.unlink_children(ROOT) {
                    if let Some(i) = table.get_mut(ino) {
                        i.pinned = false;
                    }
                    gone.push((ROOT, name));
                }
                set_loc(&mut table, ROOT, Loc::Object { mount: mount.clone(), key: mount.prefix.clone() });
                retargeted.push(ROOT);
            } else {
                // Walk every mount path, reusing the pinned inodes already there.
                let mut children: HashMap<u64, BTreeMap<String, u64>> = HashMap::new();
                let was_virtual =
                    !old_children.is_empty() || matches!(table.get(ROOT).map(|r| &r.loc), Some(Loc::Virtual { .. }));
                if !was_virtual {
                    // The root was one mount's root: its entries go away.
                    gone.extend(table.unlink_children(ROOT).into_iter().map(|(name, _)| (ROOT, name)));
                }
                let existing: HashMap<(u64, String), u64> = if was_virtual {
                    let mut m = HashMap::new();
                    let mut stack: Vec<u64> = vec![ROOT];
                    while let Some(dir) = stack.pop() {
                        if let Some(Inode { loc: Loc::Virtual { children }, .. }) = table.get(dir) {
                            for (n, c) in children {
                                m.insert((dir, n.clone()), *c);
                                stack.push(*c);
                            }
                        }
                    }
                    m
                } else {
                    HashMap::new()
                };
                for (path, mount) in &mounts {
                    anyhow::ensure!(
                        !path.is_empty(),
                        "mount {} at the root cannot share the tree with other mounts",
                        mount.name
                    );
                    let mut parent = ROOT;
                    for (depth, component) in path.iter().enumerate() {
                        let last = depth + 1 == path.len();
                        let ino = match existing.get(&(parent, component.clone())).copied() {
                            Some(ino) => ino,
                            None => {
                                let loc = Loc::Virtual { children: BTreeMap::new() };
                                table.insert_pinned(Inode::pinned_dir(0, parent, component, loc, now))
                            }
                        };
                        if last {
                            let same = matches!(table.get(ino).map(|i| &i.loc), Some(Loc::Object { mount: m, .. }) if Arc::ptr_eq(m, mount));
                            if !same {
                                set_loc(
                                    &mut table,
                                    ino,
                                    Loc::Object { mount: mount.clone(), key: mount.prefix.clone() },
                                );
                                retargeted.push(ino);
                            }
                        } else if !matches!(table.get(ino).map(|i| &i.loc), Some(Loc::Virtual { .. })) {
                            set_loc(&mut table, ino, Loc::Virtual { children: BTreeMap::new() });
                        }
                        anyhow::ensure!(
                            !(last && children.contains_key(&ino))
                                && children.get(&parent).is_none_or(|c| c.get(component).is_none_or(|c| *c == ino)),
                            "mount path /{} overlaps another mount",
                            path.join("/")
                        );
                        children.entry(parent).or_default().insert(component.clone(), ino);
                        parent = ino;
                    }
                }
                // Install the new children maps; what is no longer reachable goes.
                let mut dirs: Vec<u64> = vec![ROOT];
                dirs.extend(existing.values().copied());
                for dir in dirs {
                    let old: BTreeMap<String, u64> = match table.get(dir).map(|i| &i.loc) {
                        Some(Loc::Virtual { children }) => children.clone(),
                        _ => BTreeMap::new(),
                    };
                    let new = children.remove(&dir);
                    for (name, ino) in &old {
                        if new.as_ref().and_then(|n| n.get(name)) != Some(ino) {
                            gone.push((dir, name.clone()));
                            table.unlink_name(dir, name);
                            if let Some(i) = table.get_mut(*ino) {
                                i.pinned = false;
                            }
                        }
                    }
                    if let Some(new) = new.or_else(|| (dir == ROOT).then(BTreeMap::new))
                        && let Some(i) = table.get_mut(dir)
                    {
                        i.loc = Loc::Virtual { children: new };
                    }
                }
                // Directories created by this walk.
                for (dir, map) in children {
                    if let Some(i) = table.get_mut(dir) {
                        i.loc = Loc::Virtual { children: map };
                    }
                }
            }
        }
        *lock(&self.mounts) = mounts.into_iter().map(|(_, m)| m).collect();
        if let Some(f) = self.invalidate.get() {
            for (parent, name) in gone {
                f(Invalidate::Entry(parent, name));
            }
            for ino in retargeted {
                f(Invalidate::Inode(ino));
            }
        }
        Ok(())
    }

    fn attr_of(&self, inode: &Inode) -> Attr {
        let (ttl, read_only) = match inode.mount() {
            Some(m) => (m.ttl, m.read_only || self.settings.read_only),
            None => (Duration::from_secs(365 * 24 * 3600), true),
        };
        let mtime =
            if inode.kind == Kind::Dir && inode.mtime == SystemTime::UNIX_EPOCH { self.started } else { inode.mtime };
        let posix = inode.posix.as_ref().map(|(_, p)| p.clone());
        Attr { ino: inode.ino, kind: inode.kind, size: inode.size, mtime, ttl, read_only, posix }
    }

    fn warn_once(&self, key: &str, message: impl FnOnce() -> String) {
        let mut warned = lock(&self.warned);
        if warned.len() >= WARNED_MAX || warned.insert(key.to_string()) {
            warn!("{}", message());
        }
    }

    fn log_skipped(&self, store: &dyn ObjectStore, skipped: &[Skipped]) {
        for s in skipped {
            match s {
                Skipped::InvalidName { key } => self.warn_once(key, || {
                    format!(
                        "{}/{key:?}: skipped: the key is not a valid file name (empty, '.', '..', or over 255 bytes)",
                        store.describe()
                    )
                }),
                Skipped::ShadowedByDir { key } => self.warn_once(key, || {
                    format!(
                        "{}/{key}: hidden: a directory of the same name exists, and the directory wins",
                        store.describe()
                    )
                }),
            }
        }
    }

    /// A change to `name` in `parent` (request `op` on `key`) failed: one
    /// log line, and if the server may have applied it all the same, the
    /// name is doubted ([`Self::doubt`]).
    fn change_failed(&self, op: &str, mount: &MountPoint, key: &str, e: &StoreError, (parent, name): (u64, &str)) {
        self.log_store_error(op, mount, key, e);
        if e.is_transient() {
            self.doubt(parent, name);
        }
    }

    fn log_store_error(&self, op: &str, mount: &MountPoint, key: &str, e: &StoreError) {
        match e {
            StoreError::NotFound => debug!(op, key, "{}: not found", mount.store.describe()),
            _ => error!(op, key, "{}/{key}: {op} failed: {e}", mount.store.describe()),
        }
    }

    // ----- lookup and attributes -----

    /// Finds `name` in `parent`; counts one kernel lookup on success.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let attr = self.lookup_inner(parent, name, true).await?;
        if self.settings.posix_metadata {
            return Ok(self.with_posix(attr).await);
        }
        Ok(attr)
    }

    /// [`Self::lookup`] without waiting: the answer when the caches hold
    /// it (no request needed), else `None`. The FUSE edge answers such
    /// lookups on its own thread.
    pub fn lookup_now(&self, parent: u64, name: &str) -> Option<Result<Attr>> {
        if self.settings.posix_metadata {
            return None;
        }
        match self.lookup_cached(parent, name, true) {
            Ok(attr) => Some(Ok(attr)),
            Err(Cached::Answer(e)) => Some(Err(e)),
            Err(Cached::Miss(..)) => None,
        }
    }

    /// The part of a lookup the caches answer.
    fn lookup_cached(&self, parent: u64, name: &str, count: bool) -> std::result::Result<Attr, Cached> {
        if !namespace::valid_name(name) {
            // Such a name cannot exist; one too long gets its own errno, so
            // `open(O_CREAT)` fails as on a local file system.
            let e = if name.len() > namespace::NAME_MAX { FsError::NameTooLong } else { FsError::NotFound };
            return Err(Cached::Answer(e));
        }
        let mut table = lock(&self.inodes);
        let dir = table.get(parent).ok_or(Cached::Answer(FsError::NotFound))?;
        if dir.kind != Kind::Dir {
            return Err(Cached::Answer(FsError::NotDir));
        }
        let found = |table: &InodeTable, ino: u64| table.get(ino).map(|i| self.attr_of(i)).ok_or(FsError::NotFound);
        match &dir.loc {
            Loc::Virtual { children } => {
                let ino = *children.get(name).ok_or(Cached::Answer(FsError::NotFound))?;
                if count {
                    table.remember(ino);
                }
                found(&table, ino).map_err(Cached::Answer)
            }
            Loc::Object { mount, key } => {
                let (mount, key) = (mount.clone(), key.clone());
                let now = Instant::now();
                // Files being created exist only here until uploaded.
                if let Some(ino) = table.child(parent, name)
                    && table.get(ino).is_some_and(|i| i.local)
                {
                    if count {
                        table.remember(ino);
                    }
                    return found(&table, ino).map_err(Cached::Answer);
                }
                // A fresh listing answers both ways.
                if let Some((at, entries)) = &dir.listing
                    && now < *at + mount.ttl
                {
                    let valid_until = *at + mount.ttl;
                    let entry = entries.get(name).cloned().ok_or(Cached::Answer(FsError::NotFound))?;
                    let ino = table.upsert(parent, &mount, &key, &entry, valid_until, true);
                    return found(&table, ino).map_err(Cached::Answer);
                }
                // A known child with fresh attributes.
                if let Some(ino) = table.child(parent, name)
                    && table.get(ino).is_some_and(|i| now < i.valid_until)
                {
                    table.remember(ino);
                    return found(&table, ino).map_err(Cached::Answer);
                }
                if table.is_negative(parent, name, mount.ttl, now) {
                    return Err(Cached::Answer(FsError::NotFound));
                }
                Err(Cached::Miss(mount, key))
            }
        }
    }

    /// True if `parent`'s child `name` is known and open for writing. (The
    /// inode table's lock is let go before the writers' is taken.)
    fn writing_child(&self, parent: u64, name: &str) -> bool {
        let child = lock(&self.inodes).child(parent, name);
        child.is_some_and(|ino| self.writers.contains(ino))
    }

    /// Finds `name` in `parent`; `count` adds a kernel lookup.
    async fn lookup_inner(&self, parent: u64, name: &str, count: bool) -> Result<Attr> {
        let (mount, dir_key) = match self.lookup_cached(parent, name, count) {
            Ok(attr) => return Ok(attr),
            Err(Cached::Answer(e)) => return Err(e),
            Err(Cached::Miss(mount, key)) => (mount, key),
        };
        // Many names looked up one by one in the same directory (a program
        // opening files by path): one listing answers them all for the TTL.
        if self.busy_directory(parent, mount.ttl) {
            match self.list_dir(parent).await {
                Ok(()) => return Box::pin(self.lookup_inner(parent, name, count)).await,
                Err(e) => debug!("listing {dir_key} to answer lookups failed: {e}"),
            }
        }
        let key = namespace::child_key(&dir_key, name);
        if key.len() > posix::KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        let started = Instant::now();
        match self.remote_lookup(&mount, &key, name).await {
            Ok((entry, attrs)) => {
                let writing = attrs.is_some() && self.writing_child(parent, name);
                let mut table = lock(&self.inodes);
                table.clear_negative(parent, name);
                // An answer older than a change that failed in `parent` is
                // given, but not trusted past now.
                let until = if table.doubted_since(parent, started) { started } else { started + mount.ttl };
                let ino = table.upsert(parent, &mount, &dir_key, &entry, until, count);
                let inode = table.get_mut(ino).ok_or(FsError::NotFound)?;
                // Not when `upsert` kept a newer version than the HEAD's.
                if let Some(attrs) = attrs.filter(|_| entry.kind == Kind::File && inode.etag == entry.etag) {
                    inode.take_stored_posix(started, attrs, writing);
                }
                Ok(self.attr_of(inode))
            }
            Err(FsError::NotFound) => {
                let mut table = lock(&self.inodes);
                // A file made here while the HEAD was out (still local, or
                // uploaded since) exists: the HEAD's answer is older.
                if let Some(ino) = table.child(parent, name)
                    && table.get(ino).is_some_and(|c| c.knows_more_than(started + mount.ttl))
                {
                    if count {
                        table.remember(ino);
                    }
                    return Ok(self.attr_of(table.get(ino).unwrap_or_else(|| unreachable!())));
                }
                if !mount.ttl.is_zero() {
                    table.set_negative(parent, name, started);
                }
                table.unlink_name(parent, name);
                Err(FsError::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts a lookup that missed the caches of `dir`; true once a directory
    /// has had [`LIST_AFTER_MISSES`] such lookups within one TTL.
    fn busy_directory(&self, dir: u64, ttl: Duration) -> bool {
        if ttl.is_zero() {
            return false;
        }
        lock(&self.inodes).count_miss(dir, ttl, Instant::now(), LIST_AFTER_MISSES)
    }

    /// HEAD `key`; with `--posix-metadata`, with the object's metadata.
    async fn head(
        &self,
        mount: &MountPoint,
        key: &str,
    ) -> std::result::Result<(ObjectMeta, Option<ObjectAttrs>), StoreError> {
        if self.settings.posix_metadata {
            mount.store.head_attrs(key).await.map(|(m, a)| (m, Some(a)))
        } else {
            mount.store.head(key).await.map(|m| (m, None))
        }
    }

    /// HEAD `key` and LIST `key/` at once; a directory wins over a file.
    /// With `--posix-metadata`, also the object's metadata (from the same
    /// HEAD), and s3fs's older directory objects (`key` marked as a
    /// directory) are directories.
    async fn remote_lookup(&self, mount: &MountPoint, key: &str, name: &str) -> Result<(Entry, Option<ObjectAttrs>)> {
        let dir_prefix = format!("{key}/");
        let (head, list) = tokio::join!(self.head(mount, key), mount.store.list(&dir_prefix, true, None, Some(1)));
        match list {
            Ok(page) if !page.objects.is_empty() || !page.prefixes.is_empty() => {
                if head.is_ok() {
                    self.warn_once(key, || {
                        format!(
                            "{}/{key}: hidden: a directory of the same name exists, and the directory wins",
                            mount.store.describe()
                        )
                    });
                }
                return Ok((Entry::dir(name), None));
            }
            Ok(_) => {}
            Err(e) => {
                self.log_store_error("list", mount, &dir_prefix, &e);
                return Err(e.into());
            }
        }
        match head {
            Ok((_, Some(attrs))) if posix::is_dir_object(&attrs) => Ok((Entry::dir(name), None)),
            Ok((meta, attrs)) => Ok((Entry::file(name, &meta), attrs)),
            Err(StoreError::NotFound) => Err(FsError::NotFound),
            Err(e) => {
                self.log_store_error("head", mount, key, &e);
                Err(e.into())
            }
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let trim = {
            let mut table = lock(&self.inodes);
            table.forget(ino, n);
            table.take_freed(TRIM_AFTER_FREED)
        };
        if trim {
            trim_heap();
        }
    }

    /// Attributes, revalidated with a HEAD once the TTL has passed.
    pub async fn getattr(&self, ino: u64) -> Result<Attr> {
        // With --posix-metadata, a HEAD just sent counts as the revalidation.
        let fresh = self.refresh_posix(ino).await?;
        let (mount, key) = match self.attr_cached(ino, fresh) {
            Ok(answer) => return answer,
            Err(location) => location,
        };
        self.revalidate(ino, &mount, &key).await
    }

    /// [`Self::getattr`] without waiting: the answer when no request is
    /// needed (a file being written, a directory, fresh attributes), else
    /// `None`. Not with `--posix-metadata`, whose attributes may need a HEAD.
    pub fn getattr_now(&self, ino: u64) -> Option<Result<Attr>> {
        if self.settings.posix_metadata {
            return None;
        }
        self.attr_cached(ino, false).ok()
    }

    /// The attributes of `ino` when no request is needed, else where to
    /// revalidate them.
    fn attr_cached(&self, ino: u64, fresh: bool) -> std::result::Result<Result<Attr>, (Arc<MountPoint>, String)> {
        // Read before the table is locked (a local writer's size is an fstat).
        let written_size = self.writers.get(ino).map(|w| w.size());
        let table = lock(&self.inodes);
        let Some(inode) = table.get(ino) else { return Ok(Err(FsError::NotFound)) };
        if let Some(size) = written_size {
            let mut attr = self.attr_of(inode);
            attr.size = size;
            return Ok(Ok(attr));
        }
        if fresh || inode.kind == Kind::Dir || Instant::now() < inode.valid_until {
            return Ok(Ok(self.attr_of(inode)));
        }
        match &inode.loc {
            Loc::Object { mount, key } => Err((mount.clone(), key.clone())),
            Loc::Virtual { .. } => Ok(Ok(self.attr_of(inode))),
        }
    }

    async fn revalidate(&self, ino: u64, mount: &MountPoint, key: &str) -> Result<Attr> {
        let started = Instant::now();
        match self.head(mount, key).await {
            Ok((meta, attrs)) => {
                let writing = attrs.is_some() && self.writers.contains(ino);
                let mut table = lock(&self.inodes);
                let inode = table.get_mut(ino).ok_or(FsError::NotFound)?;
                // Only newer information replaces what is known: an upload
                // that finished while the HEAD was out (this mount's, or
                // found by a listing) is newer than what the HEAD saw; and a
                // rename meanwhile gave the inode another key.
                if !inode.knows_more_than(started + mount.ttl) && inode.is_at(key) {
                    if let Some(attrs) = attrs {
                        inode.take_stored_posix(started, attrs, writing);
                    }
                    inode.size = meta.size;
                    inode.mtime = meta.last_modified;
                    inode.take_server_etag(Some(meta.etag));
                    inode.valid_until = started + mount.ttl;
                }
                Ok(self.attr_of(inode))
            }
            Err(e) => {
                self.log_store_error("head", mount, key, &e);
                Err(e.into())
            }
        }
    }

    // ----- files -----

    /// Opens a file. Returns the handle and whether the kernel's page cache
    /// may be kept (the object is unchanged since it was filled).
    pub async fn open(&self, ino: u64, flags: i32, pid: u32) -> Result<(u64, bool)> {
        let (mount, key, stale, local) = {
            let table = lock(&self.inodes);
            let inode = table.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let Loc::Object { mount, key } = &inode.loc else {
                return Err(FsError::IsDir);
            };
            (mount.clone(), key.clone(), Instant::now() >= inode.valid_until || inode.etag.is_none(), inode.local)
        };
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writing {
            return self.open_for_write(ino, &mount, &key, flags, pid).await;
        }
        let existing_writer = self.writers.contains(ino);
        if stale && !local && !existing_writer {
            self.revalidate(ino, &mount, &key).await?;
        }
        let (object, size, keep_cache, changed) = {
            let mut table = lock(&self.inodes);
            let inode = table.get_mut(ino).ok_or(FsError::NotFound)?;
            let etag = inode.etag.clone().unwrap_or_default();
            let keep = !existing_writer
                && match &inode.page_cache {
                    PageCache::Empty => true,
                    PageCache::Holds(held) => *held == etag,
                    PageCache::Unknown => false,
                };
            let changed = inode.page_cache != PageCache::Empty && !keep && !existing_writer;
            if !existing_writer {
                inode.page_cache = PageCache::Holds(etag.clone());
            }
            let object = Arc::new(ObjectId { source: mount.source_id.clone(), key: key.clone(), etag });
            (object, inode.size, keep, changed)
        };
        if changed {
            self.invalidate_kernel(ino);
        }
        let file = (ino, object.clone());
        if !keep_cache {
            self.cache.forget_delivered(&file);
        }
        let mut reader = Reader::new(object, size, mount.store.clone(), self.cache.clone(), self.disk.clone());
        if flags & libc::O_DIRECT == 0 {
            reader = reader.in_page_cache_of(ino);
        }
        let handle = ReadHandle::new(reader);
        Ok((self.add_handle(ino, HandleKind::Read(handle), pid), keep_cache))
    }

    /// The local file that holds every byte handle `fh` can read, for the
    /// kernel to read (and write) by itself: FUSE passthrough.
    ///
    /// - A read handle: the staging file of the inode's writer if it is
    ///   local; else, if the inode has no writer, the whole-object file of
    ///   the version the open saw, checked (see [`disk_cache`]).
    /// - A write handle: its writer's staging file, made local now
    ///   ([`write::Writer::make_local`]): filled from the disk cache when
    ///   the version is cached whole there (whatever its size), else
    ///   downloaded if it is at most [`PASSTHROUGH_DOWNLOAD_MAX`]. An append
    ///   (`flags` with `O_APPEND`) downloads only an object smaller than S3's
    ///   least part: a larger one is kept in S3 and copied there at upload,
    ///   which for a log appended line by line beats downloading and
    ///   uploading it whole at every open. A streaming writer (a new or
    ///   truncated file written in order) has none.
    ///
    /// `None` when passthrough is off or no such file exists.
    pub async fn passthrough_file(&self, fh: u64, flags: i32) -> Option<Arc<std::fs::File>> {
        if !self.settings.passthrough {
            return None;
        }
        let handle = self.handles.file(fh)?;
        let reader = match &handle.kind {
            HandleKind::Read(read) => read.reader(),
            HandleKind::Write(entry) => return self.make_local(entry, flags & libc::O_APPEND != 0).await,
        };
        if let Some(entry) = self.writers.get(handle.ino) {
            return entry.local.get().cloned();
        }
        if self.writers.contains(handle.ino) {
            return None;
        }
        let disk = self.disk.clone()?;
        let size = lock(&self.inodes).get(handle.ino)?.size;
        disk.open_object(reader.object(), size).await
    }

    /// The disk cache's whole-object file of the version the writer of
    /// `entry` started from, with that version's ETag. Looked up without
    /// the writer's lock: checking a cache file may read it whole.
    async fn cached_base(&self, entry: &WriterEntry) -> Option<(String, Arc<std::fs::File>)> {
        let disk = self.disk.clone()?;
        let (key, base) = {
            let writer = entry.writer.lock().await;
            (writer.key().to_string(), writer.base().cloned()?)
        };
        if base.size == 0 {
            return None;
        }
        let object = ObjectId { source: entry.mount.source_id.clone(), key, etag: base.etag.clone() };
        disk.open_object(&object, base.size).await.map(|file| (base.etag, file))
    }

    /// The staging file of the writer of `ino`, if it is local.
    pub fn local_writer_file(&self, ino: u64) -> Option<Arc<std::fs::File>> {
        self.writers.get(ino)?.local.get().cloned()
    }

    async fn make_local(&self, entry: &Arc<WriterEntry>, append: bool) -> Option<Arc<std::fs::File>> {
        if let Some(file) = entry.local.get() {
            return Some(file.clone());
        }
        let (max, cached) = match append {
            true => (write::MIN_PART - 1, None),
            false => (PASSTHROUGH_DOWNLOAD_MAX, self.cached_base(entry).await),
        };
        let mut writer = entry.writer.lock().await;
        match writer.make_local(max, cached).await {
            Ok(Some(file)) => Some(entry.local.get_or_init(|| file).clone()),
            Ok(None) => None,
            Err(e) => {
                // The open goes on the ordinary way; the write path will
                // meet (and report) the same failure if it matters.
                warn!(key = %writer.key(), "could not prepare {} for passthrough writes: {e}", writer.key());
                None
            }
        }
    }

    fn add_handle(&self, ino: u64, kind: HandleKind, pid: u32) -> u64 {
        crate::metrics::metrics().open_handles.inc();
        let opener = if matches!(kind, HandleKind::Write(_)) { tgid(pid) } else { 0 };
        self.handles.add_file(FileHandle { ino, kind, opener })
    }

    /// The hook must not notify the kernel synchronously: the kernel may hold
    /// the inode's lock while it waits for the request being answered.
    fn invalidate_kernel(&self, ino: u64) {
        if let Some(f) = self.invalidate.get() {
            f(Invalidate::Inode(ino));
        }
    }

    /// Starts a read of a handle reading an object, and answers it at once
    /// when its bytes are in memory (see [`Reader::read_now`]). Needs a tokio
    /// runtime context, for the fetches it starts.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> ReadNow {
        let Some(handle) = self.handles.file(fh) else { return ReadNow::Wait };
        let HandleKind::Read(read) = &handle.kind else { return ReadNow::Wait };
        if self.writers.contains(handle.ino) {
            return ReadNow::Wait;
        }
        let Ok(reader) = self.reader_of(&handle, read) else { return ReadNow::Wait };
        match reader.read_now(offset, size) {
            Ok(data) => {
                crate::metrics::metrics().bytes_read.inc_by(data.len() as u64);
                ReadNow::Done(data)
            }
            Err(started) => ReadNow::Started(StartedRead { reader, started }),
        }
    }

    /// Finishes a read that [`Self::read_now`] started. It finishes on the
    /// reader that started it even if the handle has moved on to a newer
    /// version meanwhile: the kernel holds the pages it fills locked, so no
    /// write lands in them before it ends.
    pub async fn finish_read(&self, fh: u64, read: StartedRead) -> Result<ReadData> {
        let handle = self.handles.file(fh).ok_or(FsError::BadHandle)?;
        let StartedRead { reader, started } = read;
        let range = started.range().clone();
        let len = (range.end - range.start) as u32;
        if self.writers.contains(handle.ino) {
            return self.read(fh, range.start, len).await;
        }
        let got = reader.finish(started).await;
        self.reader_result(&handle, &reader, got, range.start, len)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        let handle = self.handles.file(fh).ok_or(FsError::BadHandle)?;
        // While the file is open for writing, every handle reads what was written.
        let writer = match &handle.kind {
            HandleKind::Write(w) => Some(w.clone()),
            HandleKind::Read(_) => self.writers.get(handle.ino),
        };
        if let Some(w) = writer {
            let mut guard = w.writer.lock().await;
            return guard.read(offset, size).await.map(ReadData::from).map_err(|e| {
                error!(key = %guard.key(), "read of {} (open for writing) failed: {e}", guard.key());
                e.into()
            });
        }
        let HandleKind::Read(read) = &handle.kind else {
            return Err(FsError::BadHandle);
        };
        let reader = match self.reader_of(&handle, read) {
            Ok(reader) => reader,
            Err(stale) => {
                return self.reader_result(&handle, &stale, Err(StoreError::PreconditionFailed), offset, size);
            }
        };
        let got = reader.read(offset, size).await;
        self.reader_result(&handle, &reader, got, offset, size)
    }

    /// The reader a read handle reads with now. All handles of an inode
    /// fill one kernel page cache, so a handle reads the inode's current
    /// version: the one it opened, or one this mount made since (an upload,
    /// a rename's copy, a metadata copy), as the open handles of a local
    /// file read what is written to it (and as this handle read the
    /// writer's bytes while the file was open for writing). Reading the old
    /// version instead would put its bytes, and through a short read its
    /// size, in the pages the new version's handles read. A version made by
    /// another client fails the handle, as a GET that finds it does: that is
    /// `Err` with the handle's reader.
    fn reader_of(&self, handle: &FileHandle, read: &ReadHandle) -> std::result::Result<Arc<Reader>, Arc<Reader>> {
        // Another read of the handle may move it on at the same time: the
        // reader returned is one checked against the inode.
        loop {
            let reader = read.reader();
            let (object, size) = {
                let table = lock(&self.inodes);
                let Some(inode) = table.get(handle.ino) else { return Ok(reader) };
                let Loc::Object { mount, key } = &inode.loc else { return Ok(reader) };
                let Some(etag) = inode.etag.as_ref().filter(|e| !e.is_empty()) else { return Ok(reader) };
                let opened = reader.object();
                if opened.etag == *etag && opened.key == *key {
                    return Ok(reader);
                }
                // The same version under a new key (a directory's rename), or
                // this mount's newest version.
                if opened.etag != *etag && inode.own_etag.as_ref() != Some(etag) {
                    return Err(reader);
                }
                let object = ObjectId { source: mount.source_id.clone(), key: key.clone(), etag: etag.clone() };
                (Arc::new(object), inode.size)
            };
            read.replace(&reader, reader.successor(object, size));
        }
    }

    /// Counts a reader's bytes, or logs why it failed.
    fn reader_result(
        &self,
        handle: &FileHandle,
        reader: &Reader,
        got: std::result::Result<ReadData, StoreError>,
        offset: u64,
        size: u32,
    ) -> Result<ReadData> {
        match got {
            Ok(b) => {
                crate::metrics::metrics().bytes_read.inc_by(b.len() as u64);
                Ok(b)
            }
            Err(e) => {
                let object = reader.object();
                if e == StoreError::PreconditionFailed {
                    error!(
                        key = %object.key,
                        "{}: the object changed on the server while open; this handle fails, the next open reads the new version",
                        object.key
                    );
                    // Only if the inode still holds that version: a newer one
                    // (this mount's upload) is not stale, and a HEAD sent
                    // before it must not be let in.
                    if let Some(inode) = lock(&self.inodes).get_mut(handle.ino)
                        && inode.etag.as_deref() == Some(object.etag.as_str())
                    {
                        inode.valid_until = Instant::now();
                    }
                } else {
                    error!(key = %object.key, offset, size, "read of {} failed: {e}", object.key);
                }
                Err(e.into())
            }
        }
    }

    /// Last close of a handle: a write handle's data is uploaded if no other
    /// close did it (errors can only be logged here).
    pub async fn release(&self, fh: u64) {
        if let Some(last) = self.release_now(fh) {
            self.release_last(last).await;
        }
    }

    /// [`Self::release`] as far as it goes without waiting: the handle is
    /// gone, and so is its writer if this was its last user and it has
    /// nothing to upload. Returns the writer when it still has to be
    /// uploaded and retired: [`Self::release_last`] does that.
    pub fn release_now(&self, fh: u64) -> Option<LastWriter> {
        let handle = self.handles.remove_file(fh)?;
        crate::metrics::metrics().open_handles.dec();
        let HandleKind::Write(w) = &handle.kind else { return None };
        let Left::Last(entry) = self.writers.leave(handle.ino, w) else { return None };
        // Checked after leaving: a write by another user before it left is
        // seen here, and nobody writes through a retired writer. With
        // --posix-metadata a clean writer may still have attributes to store.
        // A writer with a staging file is dropped on the runtime: closing
        // that file may free gigabytes of disk blocks.
        let clean = !self.settings.posix_metadata
            && entry.writer.try_lock().is_ok_and(|wr| !wr.is_dirty() && !wr.has_staging_file());
        if clean {
            self.writers.retire(handle.ino, &entry);
            return None;
        }
        Some(LastWriter { ino: handle.ino, entry })
    }

    /// Uploads what the last user of a writer left, and retires it.
    pub async fn release_last(&self, last: LastWriter) {
        let LastWriter { ino, entry } = last;
        let result = self.upload(ino, &entry).await;
        let never_made = result.is_err() && entry.writer.lock().await.never_made();
        // Not if an open (a retried `cp`, a `touch`) joined the writer
        // meanwhile: the file is open again, and its close makes it.
        if self.writers.retire(ino, &entry) && never_made {
            self.forget_never_made(ino);
        }
        if let Err(e) = result
            && e != FsError::Write(WriteError::Failed)
        {
            error!("{}: data written through a closed handle could not be uploaded: {e}", entry.mount.store.describe());
        }
    }

    /// A new file whose every upload failed, with no handle left: its name
    /// goes, here and in the kernel, so that `stat` and a new `open` (a
    /// retried `cp` opens with `O_EXCL`) find what the server holds. Without
    /// this the kernel kept a name that `stat` called missing and `O_EXCL`
    /// called existing for as long as the entry's TTL. No negative entry is
    /// recorded: a request the server applied after its caller gave up may
    /// have made the file after all.
    fn forget_never_made(&self, ino: u64) {
        let (parent, name) = {
            let mut table = lock(&self.inodes);
            let Some(inode) = table.get_mut(ino).filter(|i| i.local) else { return };
            // No longer a file being made: the table may drop the inode once
            // the kernel forgets it, and a directory rename does not wait
            // for it.
            inode.local = false;
            let (parent, name) = (inode.parent, inode.name.clone());
            if table.child(parent, &name) != Some(ino) {
                return;
            }
            table.unlink_name(parent, &name);
            if let Some(dir) = table.get_mut(parent) {
                dir.local_children.remove(&name);
            }
            (parent, name)
        };
        self.doubt(parent, &name);
    }

    /// A change to `name` in `parent` failed in a way that leaves it unknown
    /// whether the server applied it (see [`FsError::outcome_unknown`]): a
    /// request it read before it froze is applied when it runs again. What
    /// this mount knows of the name (its directory's listing, its cached
    /// attributes, a negative entry, the kernel's entry) is dropped, and
    /// listings and lookups of the directory already out are not kept
    /// ([`inode::Inode::doubted`]), so the next lookup asks the server,
    /// however long the metadata TTL.
    pub(super) fn doubt(&self, parent: u64, name: &str) {
        {
            let mut table = lock(&self.inodes);
            table.clear_negative(parent, name);
            if let Some(dir) = table.get_mut(parent) {
                dir.listing = None;
                dir.doubted = Some(Instant::now());
            }
            if let Some(child) = table.child(parent, name)
                && let Some(inode) = table.get_mut(child)
            {
                inode.valid_until = Instant::now();
            }
        }
        if let Some(f) = self.invalidate.get() {
            f(Invalidate::Entry(parent, name.to_string()));
        }
    }

    // ----- directories -----

    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let kind = lock(&self.inodes).get(ino).map(|i| i.kind).ok_or(FsError::NotFound)?;
        if kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(self.handles.add_dir(ino))
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove_dir(fh);
    }

    /// A batch (see [`Self::readdir_fitted`]) of the directory's entries from `offset` on
    /// (`.` and `..` first); none at the end. Reading from the start lists
    /// the directory again, in the background: entries are answered as the
    /// listing's pages arrive, while the next page is requested.
    pub async fn readdir(self: &Arc<Self>, fh: u64, offset: u64) -> Result<Vec<Arc<DirItem>>> {
        let handles::DirState { ino, listed, batch } = self.handles.dir(fh).ok_or(FsError::BadHandle)?;
        let mut listed = match listed {
            Some(rx) if offset > 0 => rx,
            _ => {
                let (tx, rx) = watch::channel(Listed::default());
                let fs = self.clone();
                tokio::spawn(async move {
                    let result = fs.list_into(ino, &tx).await;
                    tx.send_modify(|l| {
                        l.done = true;
                        l.error = result.err();
                    });
                });
                self.handles.set_listing(fh, rx.clone());
                rx
            }
        };
        let offset = offset as usize;
        let items = {
            let listed = listed
                .wait_for(|l| l.done || l.items.len() > offset)
                .await
                .map_err(|_| FsError::Store(StoreError::Network("directory listing was abandoned".into())))?;
            Self::listed_from(&listed, offset, batch).unwrap_or_else(|| Ok(Vec::new()))?
        };
        if self.settings.posix_metadata {
            // Read ahead: the metadata of the entries after this batch,
            // while the kernel takes this one and asks for the next.
            let ahead: Vec<u64> = {
                let listed = listed.borrow();
                let start = (offset + items.len()).min(listed.items.len());
                let end = (start + posix_ops::READ_AHEAD).min(listed.items.len());
                listed.items[start..end].iter().map(|i| i.attr.ino).collect()
            };
            let mut items = items;
            self.load_posix_of(ino, &mut items).await;
            if !ahead.is_empty() {
                let fs = self.clone();
                tokio::spawn(async move { fs.read_posix_of(ahead).await });
            }
            return Ok(items);
        }
        Ok(items)
    }

    /// Adds `items` (a batch from [`Self::readdir`], starting at `offset`)
    /// to `reply` until it is full. With `plus` (READDIRPLUS), each entry
    /// the kernel takes counts a lookup of its inode. Then records how many
    /// fitted, so the next batch holds about as many.
    pub fn fill_dir(
        &self,
        fh: u64,
        dir: u64,
        offset: u64,
        items: &[Arc<DirItem>],
        plus: bool,
        reply: &mut dyn reply::DirReply,
    ) {
        let mut fitted = 0;
        for (next, item) in (offset + 1..).zip(items) {
            let attr = if plus { self.remember_entry(dir, item) } else { item.attr.clone() };
            if !reply.add(next, item, &attr) {
                // Did not fit: the kernel never saw it.
                if plus && item.name != "." && item.name != ".." {
                    self.forget(attr.ino, 1);
                }
                break;
            }
            fitted += 1;
        }
        self.readdir_fitted(fh, items.len(), fitted);
    }

    /// Tells handle `fh` how many of the `given` entries of a `readdir`
    /// answer fitted into the kernel's buffer, so the next answer holds about
    /// as many: entries that do not fit are looked up for nothing.
    fn readdir_fitted(&self, fh: u64, given: usize, fitted: usize) {
        self.handles.fitted(fh, given, fitted);
    }

    /// [`Self::readdir`] without waiting: the entries from `offset` on when
    /// the listing already has them (or has ended); `None` when the call
    /// must wait for the server.
    pub fn readdir_now(&self, fh: u64, offset: u64) -> Option<Result<Vec<Arc<DirItem>>>> {
        if self.settings.posix_metadata {
            return None; // entries' metadata may need HEADs first
        }
        let h = self.handles.dir(fh)?;
        let listed = h.listed.as_ref().filter(|_| offset > 0)?.borrow();
        Self::listed_from(&listed, offset as usize, h.batch)
    }

    /// Up to `batch` entries from `offset` on, the listing's error, or an
    /// empty batch at its end; `None` while the entries are not there yet.
    fn listed_from(listed: &Listed, offset: usize, batch: usize) -> Option<Result<Vec<Arc<DirItem>>>> {
        if listed.items.len() > offset {
            let end = (offset + batch).min(listed.items.len());
            return Some(Ok(listed.items[offset..end].to_vec()));
        }
        if !listed.done {
            return None;
        }
        Some(match &listed.error {
            Some(e) => Err(e.clone()),
            None => Ok(Vec::new()),
        })
    }

    /// Lists directory `ino` whole, to answer lookups from the listing.
    async fn list_dir(&self, ino: u64) -> Result<()> {
        let (tx, _rx) = watch::channel(Listed::default());
        self.list_into(ino, &tx).await
    }

    /// Lists directory `ino` page by page into `tx`, updating the inode
    /// table as entries become final. Stops early once nobody reads `tx`.
    /// A complete listing is kept for lookups for the metadata TTL.
    async fn list_into(&self, ino: u64, tx: &watch::Sender<Listed>) -> Result<()> {
        let (mount, prefix) = {
            let table = lock(&self.inodes);
            let inode = table.get(ino).ok_or(FsError::NotFound)?;
            let dot = |i: &Inode, name: &str| DirItem { name: name.to_string(), attr: self.attr_of(i) };
            let parent = table.get(inode.parent).map(|p| dot(p, "..")).unwrap_or_else(|| dot(inode, ".."));
            let mut items = vec![dot(inode, "."), parent];
            let found = match &inode.loc {
                Loc::Virtual { children } => {
                    for (name, child) in children {
                        if let Some(c) = table.get(*child) {
                            items.push(DirItem { name: name.clone(), attr: self.attr_of(c) });
                        }
                    }
                    None
                }
                Loc::Object { mount, key } => Some((mount.clone(), key.clone())),
            };
            tx.send_modify(|l| l.items.extend(items.into_iter().map(Arc::new)));
            match found {
                Some(found) => found,
                None => return Ok(()),
            }
        };
        let started = Instant::now();
        let valid_until = started + mount.ttl;
        let mut paged = namespace::PagedEntries::new(&prefix);
        let mut all = HashMap::new();
        // The next page is requested as soon as its token is known, before
        // this page's entries are taken in.
        let list = |token: Option<String>| {
            let (store, prefix) = (mount.store.clone(), prefix.clone());
            tokio::spawn(async move { store.list(&prefix, true, token, None).await })
        };
        let mut pending = Some(list(None));
        let mut complete = false;
        while let Some(next) = pending.take() {
            let page = next.await.unwrap_or_else(|e| Err(StoreError::Network(format!("listing task failed: {e}"))));
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    self.log_store_error("list", &mount, &prefix, &e);
                    return Err(e.into());
                }
            };
            complete = page.next.is_none();
            if let Some(t) = page.next.filter(|_| !tx.is_closed()) {
                pending = Some(list(Some(t)));
            }
            let mut entries = paged.page(&page.objects, &page.prefixes);
            if complete {
                entries.extend(paged.finish());
            }
            self.add_listed(ino, &mount, &prefix, entries, valid_until, &mut all, tx).await;
        }
        if !complete {
            return Ok(()); // stopped: nobody reads this listing any more
        }
        self.log_skipped(mount.store.as_ref(), &paged.skipped);
        // With what this mount changed in the directory since the listing
        // started (an upload, a rename, a removal), which it may have missed.
        lock(&self.inodes).install_listing(ino, started, all);
        Ok(())
    }

    /// Adds entries of a listing of `ino` that have become final: to the
    /// inode table, to `all`, and to what `readdir` hands out.
    #[allow(clippy::too_many_arguments)]
    async fn add_listed(
        &self,
        ino: u64,
        mount: &Arc<MountPoint>,
        prefix: &str,
        entries: Vec<Entry>,
        valid_until: Instant,
        all: &mut HashMap<String, Entry>,
        tx: &watch::Sender<Listed>,
    ) {
        // In slices, so `readdir` can answer the first entries of a large
        // page while the rest are taken in.
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let mut slice: Vec<Entry> = entries.by_ref().take(LISTED_SLICE).collect();
            let mut items = Vec::with_capacity(slice.len());
            {
                let mut table = lock(&self.inodes);
                // Names removed here within the TTL stay removed, even if
                // the server still lists them for a moment.
                table.drop_negative(ino, &mut slice, mount.ttl, Instant::now());
                // A listing older than a change that failed in the directory
                // is handed out, but its entries are not trusted past now.
                let started = valid_until.checked_sub(mount.ttl).unwrap_or(valid_until);
                let until = if table.doubted_since(ino, started) { started } else { valid_until };
                for entry in slice {
                    let child = table.upsert(ino, mount, prefix, &entry, until, false);
                    if let Some(c) = table.get(child) {
                        items.push(Arc::new(DirItem { name: entry.name.clone(), attr: self.attr_of(c) }));
                    }
                    all.insert(entry.name.clone(), entry);
                }
            }
            tx.send_modify(|l| l.items.extend(items));
            tokio::task::yield_now().await;
        }
    }

    /// For READDIRPLUS: counts a kernel lookup of an entry handed out, and
    /// returns its current inode (the entry may have been forgotten and
    /// re-created since the snapshot was taken).
    pub fn remember_entry(&self, dir: u64, item: &DirItem) -> Attr {
        let mut table = lock(&self.inodes);
        if item.name == "." || item.name == ".." {
            return item.attr.clone();
        }
        // Usually the inode the listing made is still there.
        if let Some(inode) = table.get_mut(item.attr.ino)
            && inode.parent == dir
            && inode.kind == item.attr.kind
            && inode.name == item.name
        {
            inode.lookups += 1;
            return self.attr_of(inode);
        }
        match table.child(dir, &item.name) {
            Some(ino) if table.get(ino).is_some_and(|i| i.kind == item.attr.kind) => {
                table.remember(ino);
                self.attr_of(table.get(ino).unwrap_or_else(|| unreachable!()))
            }
            _ => {
                let Some(d) = table.get(dir) else { return item.attr.clone() };
                let Loc::Object { mount, key } = d.loc.clone() else {
                    return item.attr.clone();
                };
                // Swept since the listing made it: the listing still knows
                // the object; without it no ETag is known, and the next open
                // revalidates.
                let listed = d.listing.as_ref().and_then(|(at, entries)| {
                    entries.get(&item.name).filter(|e| e.kind == item.attr.kind).map(|e| (e.clone(), *at + mount.ttl))
                });
                let (entry, valid_until) = listed.unwrap_or_else(|| {
                    let entry = Entry {
                        name: item.name.clone(),
                        kind: item.attr.kind,
                        size: item.attr.size,
                        etag: None,
                        mtime: item.attr.mtime,
                    };
                    (entry, Instant::now())
                });
                let ino = table.upsert(dir, &mount, &key, &entry, valid_until, true);
                self.attr_of(table.get(ino).unwrap_or_else(|| unreachable!()))
            }
        }
    }

    pub fn statfs(&self) -> StatFs {
        // Object stores have no fixed capacity: report a large, constant
        // size so `df` and free-space checks in applications are happy.
        const BLOCKS: u64 = 1 << 40; // 4 PiB in 4 KiB blocks
        StatFs {
            blocks: BLOCKS,
            bfree: BLOCKS,
            bavail: BLOCKS,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: 4096,
            namelen: 255,
        }
    }

    /// Uploads every file open for writing (at shutdown) and waits for
    /// uploads in progress. Returns how many files could not be uploaded.
    pub async fn flush_all(&self) -> usize {
        let writers = self.writers.all();
        let mut failed = 0;
        for (ino, w) in writers {
            let key = w.writer.lock().await.key().to_string();
            match self.upload(ino, &w).await {
                Ok(()) => tracing::info!("uploaded {key}, still open at shutdown"),
                Err(e) => {
                    failed += 1;
                    error!("{key} was open at shutdown and could not be uploaded: {e}");
                }
            }
        }
        while self.uploads.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failed
    }

    /// Number of inodes known (for tests and metrics).
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).len()
    }

    /// Drops the inodes and listings nothing holds any more (see
    /// [`inode::InodeTable::sweep`]); runs by itself as inodes come and go.
    pub fn sweep_inodes(&self) {
        lock(&self.inodes).sweep(Instant::now());
    }

    /// Inodes with a writer now (for tests).
    pub fn writer_count(&self) -> usize {
        self.writers.len()
    }

    /// What `/metrics` and `/healthz` report, taken when they ask.
    pub fn snapshot_fn(self: &Arc<Self>) -> crate::metrics::SnapshotFn {
        let fs = Arc::downgrade(self);
        Arc::new(move || {
            let Some(fs) = fs.upgrade() else {
                return crate::metrics::Snapshot {
                    memory_used: 0,
                    memory_limit: 0,
                    reserved: Vec::new(),
                    inodes: 0,
                    servers: Vec::new(),
                };
            };
            crate::metrics::Snapshot {
                memory_used: fs.cache.used(),
                memory_limit: fs.cache.limit(),
                reserved: cache::ReservationKind::ALL.iter().map(|k| (k.name(), fs.cache.reserved(*k))).collect(),
                inodes: fs.inode_count() as u64,
                servers: fs.mounts().iter().map(|m| (m.name.clone(), m.store.clone())).collect(),
            }
        })
    }
}
