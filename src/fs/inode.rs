//! The inode table: what the kernel has been told about, and what the last
//! listing of each directory said.
//!
//! An inode is a (parent, name) that the kernel knows, with its kind, its
//! location in a bucket and the attributes last seen. Inode numbers are not
//! stable across mounts. When a name changes kind on the server (a file
//! becomes a directory), it gets a new inode and the old one lives on until
//! the kernel forgets it.
//!
//! Each directory keeps its last listing for the metadata TTL, so lookups and
//! `stat`s after a `readdir` (`ls -l`, `find`, `du`) cost no request at all.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::MountPoint;
use super::namespace::{Entry, Kind};

pub const ROOT: u64 = 1;
/// Changes a directory remembers for a listing that is out
/// ([`Inode::changed`]); past this, the oldest are dropped, and a listing
/// that started before them may show them as they were for a TTL.
const MAX_CHANGES: usize = 4096;

/// What the kernel's page cache holds of a file. An open keeps the cache
/// (FOPEN_KEEP_CACHE) only when it holds the version being opened; any other
/// open makes the kernel drop the file's pages, and that drop can land after
/// a concurrent open has started filling them, so an open that has nothing
/// to drop must keep the cache too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageCache {
    /// Nothing: no handle has read or written the file through this inode.
    Empty,
    /// Pages of the object version with this ETag.
    Holds(String),
    /// Pages a writer put there, whose upload has not (or not yet) succeeded.
    Unknown,
}

/// Where an inode's data lives.
#[derive(Clone)]
pub enum Loc {
    /// A directory that exists only in the mounted tree (a parent of mount
    /// paths in Fluid mode), with fixed children.
    Virtual { children: BTreeMap<String, u64> },
    /// A file (its key) or a directory (its prefix, ending with `/`, or the
    /// mount prefix) inside a mounted bucket.
    Object { mount: Arc<MountPoint>, key: String },
}

#[derive(Clone)]
pub struct Inode {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: Kind,
    pub loc: Loc,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    /// Attributes are trusted until then.
    pub valid_until: Instant,
    /// Kernel lookup count; pinned inodes (root, virtual, mount roots) ignore it.
    pub lookups: u64,
    pub pinned: bool,
    /// For directories: the last full listing, and when it was taken.
    pub listing: Option<(Instant, Arc<HashMap<String, Entry>>)>,
    /// For files: what the kernel's page cache holds of it.
    pub page_cache: PageCache,
    /// A file created here and not uploaded yet.
    pub local: bool,
    /// For directories: names of local (not yet uploaded) children.
    pub local_children: std::collections::BTreeSet<String>,
    /// For directories: what this mount changed in it (an upload, a rename
    /// onto a name, a new directory: the entry; a removal: `None`) and when,
    /// for a listing that is out to take in (see [`InodeTable::install_listing`]).
    pub changed: std::collections::VecDeque<(Instant, String, Option<Entry>)>,
    /// With `--posix-metadata`: the object's stored attributes and when
    /// they were read (trusted for the metadata TTL); `None` until a HEAD.
    pub posix: Option<(Instant, Arc<super::PosixState>)>,
    /// For files: the ETag of the last version this mount made (an upload,
    /// a rename's copy, a metadata copy). Read handles open on an older
    /// version follow it, never another client's (see
    /// [`super::Fs::reader_of`]). A listing or HEAD that brings it before
    /// this mount recorded it (its answer crossed the upload's) only comes
    /// first: the record makes it this mount's.
    pub own_etag: Option<String>,
    /// For directories: when a change in it last failed without an answer
    /// (see [`super::Fs::doubt`]). A listing, or a lookup's answer, that
    /// started before then may tell of the directory before the server
    /// applied that change late: it answers its own request, but is not
    /// kept.
    pub doubted: Option<Instant>,
}

impl Inode {
    /// A directory that lives for the whole mount: the root, a virtual
    /// directory, or a mount's root. `ino` 0 means "allocate one".
    pub fn pinned_dir(ino: u64, parent: u64, name: &str, loc: Loc, now: SystemTime) -> Self {
        Inode {
            ino,
            parent,
            name: name.to_string(),
            kind: Kind::Dir,
            loc,
            size: 0,
            mtime: now,
            etag: None,
            valid_until: Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600),
            lookups: 0,
            pinned: true,
            listing: None,
            page_cache: PageCache::Empty,
            local: false,
            local_children: Default::default(),
            changed: Default::default(),
            posix: None,
            own_etag: None,
            doubted: None,
        }
    }

    pub fn mount(&self) -> Option<&Arc<MountPoint>> {
        match &self.loc {
            Loc::Object { mount, .. } => Some(mount),
            Loc::Virtual { .. } => None,
        }
    }

    /// True if what the inode holds is newer than an answer trusted until
    /// `until` (a request's start plus the TTL): it is local, or an upload,
    /// a listing or a HEAD started later recorded it. Such an answer tells
    /// of an earlier state and must not replace it.
    pub fn knows_more_than(&self, until: Instant) -> bool {
        self.local || self.valid_until > until
    }

    /// Takes the ETag a listing or HEAD found on the server. Where none was
    /// known (a rename's copy answered without one), it is of the version
    /// this mount made.
    pub fn take_server_etag(&mut self, etag: Option<String>) {
        if self.etag.as_deref().is_none_or(str::is_empty) {
            self.own_etag = etag.clone();
        }
        self.etag = etag;
    }

    /// Takes the ETag of a version this mount made.
    pub fn take_own_etag(&mut self, etag: String) {
        self.own_etag = Some(etag.clone()).filter(|e| !e.is_empty());
        self.etag = Some(etag);
    }

    /// True if the inode's object is `key` (a rename moves it elsewhere).
    pub fn is_at(&self, key: &str) -> bool {
        matches!(&self.loc, Loc::Object { key: k, .. } if k == key)
    }

    /// Takes the metadata a HEAD started at `at` read from the server,
    /// unless what the inode holds is newer: set after `at` (a chmod, an
    /// upload, a later HEAD), or changed here and waiting for the upload of a
    /// file open for `writing` (a chmod of an open file). Once no writer is
    /// left, a change whose upload failed is not kept.
    pub fn take_stored_posix(&mut self, at: Instant, attrs: crate::store::ObjectAttrs, writing: bool) {
        if self.posix.as_ref().is_some_and(|(set, p)| *set > at || (writing && p.pending)) {
            return;
        }
        self.posix = Some((at, Arc::new(super::PosixState::of(attrs))));
    }
}

#[derive(Default)]
pub struct InodeTable {
    // hashbrown with its default (foldhash, randomly seeded) hasher: a
    // listing of a large directory hashes every name here, and looks names
    // up without allocating a key (see `NameRef`).
    inodes: hashbrown::HashMap<u64, Inode>,
    names: hashbrown::HashMap<(u64, String), u64>,
    next: u64,
    /// Names found missing (or removed here), and when: for a TTL they stay
    /// missing without asking the server, even if it still lists them.
    negative: HashMap<(u64, String), Instant>,
    /// Per directory: when counting started, and lookups that missed.
    misses: HashMap<u64, (Instant, u32)>,
    /// Inodes made and kernel lookups forgotten since the last sweep.
    churn: usize,
    /// Inodes removed since [`InodeTable::take_freed`] last said so.
    freed: usize,
    /// Inodes left after the last sweep.
    kept: usize,
}

/// Bound on remembered negative lookups (and directories counting misses);
/// the table is cleared when full.
const NEGATIVE_CACHE_MAX: usize = 100_000;

/// Sweeps are at least this far apart (in inodes made or forgotten), so
/// their cost stays a small constant per operation.
const SWEEP_MIN_CHURN: usize = 4096;

/// A borrowed `(parent, name)` key of `InodeTable::names`; hashes like the
/// owned tuple.
#[derive(Hash)]
struct NameRef<'a>(u64, &'a str);

impl hashbrown::Equivalent<(u64, String)> for NameRef<'_> {
    fn equivalent(&self, key: &(u64, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

impl InodeTable {
    pub fn new() -> Self {
        Self { next: ROOT + 1, ..Self::default() }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.names.get(&NameRef(parent, name)).copied()
    }

    /// Inserts a pinned inode (root, virtual directory, mount root).
    pub fn insert_pinned(&mut self, mut inode: Inode) -> u64 {
        if inode.ino == 0 {
            inode.ino = self.next;
            self.next += 1;
        }
        inode.pinned = true;
        let ino = inode.ino;
        if ino != ROOT {
            self.names.insert((inode.parent, inode.name.clone()), ino);
        }
        self.inodes.insert(ino, inode);
        ino
    }

    /// Records what the server says `name` in `parent` is, reusing the inode
    /// when the kind is unchanged. `count` adds one kernel lookup.
    pub fn upsert(
        &mut self,
        parent: u64,
        mount: &Arc<MountPoint>,
        dir_key: &str,
        entry: &Entry,
        valid_until: Instant,
        count: bool,
    ) -> u64 {
        if let Some(&ino) = self.names.get(&NameRef(parent, &entry.name))
            && let Some(inode) = self.inodes.get_mut(&ino)
            && inode.kind == entry.kind
        {
            // Only newer information replaces what is known: a listing that
            // started before an upload finished must not bring back the
            // object's previous version.
            if !inode.knows_more_than(valid_until) {
                if entry.kind == Kind::File {
                    inode.size = entry.size;
                    inode.mtime = entry.mtime;
                    if inode.etag != entry.etag {
                        // Replaced by another client: its metadata is unknown.
                        inode.posix = None;
                    }
                    inode.take_server_etag(entry.etag.clone());
                }
                inode.valid_until = valid_until;
            }
            if count {
                inode.lookups += 1;
            }
            return ino;
        }
        // A sweep comes before the new inode is in: the caller reads it
        // right after, whatever its lookups and TTL.
        self.churned();
        let ino = self.next;
        self.next += 1;
        let key = match entry.kind {
            Kind::File => super::namespace::child_key(dir_key, &entry.name),
            Kind::Dir => super::namespace::child_prefix(dir_key, &entry.name),
        };
        self.inodes.insert(
            ino,
            Inode {
                ino,
                parent,
                name: entry.name.clone(),
                kind: entry.kind,
                loc: Loc::Object { mount: mount.clone(), key },
                size: entry.size,
                mtime: entry.mtime,
                etag: entry.etag.clone(),
                valid_until,
                lookups: u64::from(count),
                pinned: false,
                listing: None,
                page_cache: PageCache::Empty,
                local: false,
                local_children: Default::default(),
                changed: Default::default(),
                posix: None,
                own_etag: None,
                doubted: None,
            },
        );
        self.names.insert((parent, entry.name.clone()), ino);
        ino
    }

    /// Records a change this mount made to `name` in directory `dir` (`Some`:
    /// the entry it is now; `None`: removed) in its cached listing, and for
    /// a listing of it that is out now, which started before the change and
    /// may not have seen it.
    pub fn note_change(&mut self, dir: u64, name: &str, entry: Option<Entry>, at: Instant) {
        let Some(d) = self.inodes.get_mut(&dir) else { return };
        if let Some((_, entries)) = &mut d.listing {
            match &entry {
                Some(e) => Arc::make_mut(entries).insert(name.to_string(), e.clone()),
                None => Arc::make_mut(entries).remove(name),
            };
        }
        if d.changed.len() >= MAX_CHANGES {
            d.changed.pop_front();
        }
        d.changed.push_back((at, name.to_string(), entry));
    }

    /// Installs `entries`, a listing of `dir` that started at `started`, as
    /// its cached listing, with the changes this mount made since applied
    /// to it: the listing may have read those names before them. A listing
    /// that started before the one cached is dropped.
    pub fn install_listing(&mut self, dir: u64, started: Instant, mut entries: HashMap<String, Entry>) {
        let Some(d) = self.inodes.get_mut(&dir) else { return };
        if d.listing.as_ref().is_some_and(|(at, _)| *at > started) || d.doubted.is_some_and(|at| at > started) {
            return;
        }
        for (_, name, entry) in d.changed.iter().filter(|(at, ..)| *at >= started) {
            match entry {
                Some(e) => entries.insert(name.clone(), e.clone()),
                None => entries.remove(name),
            };
        }
        d.changed.retain(|(at, ..)| *at >= started);
        d.listing = Some((started, Arc::new(entries)));
    }

    /// True while `name` in `parent` is known to be missing (within `ttl`).
    pub fn is_negative(&self, parent: u64, name: &str, ttl: Duration, now: Instant) -> bool {
        self.negative.get(&(parent, name.to_string())).is_some_and(|at| now < *at + ttl)
    }

    /// Remembers that `name` in `parent` was missing at `at` (unless a
    /// change in `parent` failed without an answer since).
    pub fn set_negative(&mut self, parent: u64, name: &str, at: Instant) {
        if self.doubted_since(parent, at) {
            return;
        }
        if self.negative.len() >= NEGATIVE_CACHE_MAX {
            self.negative.clear();
        }
        self.negative.insert((parent, name.to_string()), at);
    }

    /// True if a change in directory `dir` failed without an answer after
    /// `at` (see [`Inode::doubted`]).
    pub fn doubted_since(&self, dir: u64, at: Instant) -> bool {
        self.inodes.get(&dir).and_then(|d| d.doubted).is_some_and(|t| t > at)
    }

    pub fn clear_negative(&mut self, parent: u64, name: &str) {
        if !self.negative.is_empty() {
            self.negative.remove(&(parent, name.to_string()));
        }
    }

    /// Drops from `entries` (listed in `parent`) the names known missing.
    pub fn drop_negative(&self, parent: u64, entries: &mut Vec<Entry>, ttl: Duration, now: Instant) {
        if !self.negative.is_empty() {
            entries.retain(|e| !self.is_negative(parent, &e.name, ttl, now));
        }
    }

    /// Counts a lookup in `dir` that missed every cache; true (and the count
    /// starts again) once the directory has had more than `limit` such
    /// lookups within one `ttl`.
    pub fn count_miss(&mut self, dir: u64, ttl: Duration, now: Instant, limit: u32) -> bool {
        if self.misses.len() > NEGATIVE_CACHE_MAX {
            self.misses.clear();
        }
        let entry = self.misses.entry(dir).or_insert((now, 0));
        if now >= entry.0 + ttl {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 > limit {
            *entry = (now, 0);
            true
        } else {
            false
        }
    }

    /// Counts one inode made or forgotten, and sweeps once enough have been.
    fn churned(&mut self) {
        self.churn += 1;
        if self.churn >= SWEEP_MIN_CHURN.max(self.kept) {
            self.sweep(Instant::now());
        }
    }

    /// Removes the inodes no kernel lookup holds (made by listings and not
    /// handed out, or forgotten by the kernel) once their metadata TTL has
    /// passed, and the directory listings whose TTL has passed: after a walk
    /// of a large tree, memory goes back to about where it was once the
    /// kernel drops its caches. Within the TTL they stay, so a listing being
    /// handed out keeps its inodes; an entry swept from an old `readdir`
    /// answer is made again by name if the kernel takes it.
    pub fn sweep(&mut self, now: Instant) {
        let before = self.inodes.len();
        let Self { inodes, names, .. } = self;
        inodes.retain(|ino, i| {
            let keep = i.pinned || i.local || i.lookups > 0 || now < i.valid_until;
            if !keep && names.get(&NameRef(i.parent, &i.name)) == Some(ino) {
                names.remove(&NameRef(i.parent, &i.name));
            }
            keep
        });
        for i in inodes.values_mut() {
            let ttl = i.mount().map(|m| m.ttl).unwrap_or_default();
            if i.listing.as_ref().is_some_and(|(at, _)| now >= *at + ttl) {
                i.listing = None;
            }
        }
        self.churn = 0;
        self.kept = self.inodes.len();
        self.freed += before - self.kept;
        // Tables sized for a walk long gone give their memory back.
        if self.inodes.capacity() > 4 * self.inodes.len() + SWEEP_MIN_CHURN {
            self.inodes.shrink_to_fit();
            self.names.shrink_to_fit();
        }
        if self.negative.capacity() > 4 * self.negative.len() + SWEEP_MIN_CHURN {
            self.negative.shrink_to_fit();
        }
    }

    /// True once `at_least` inodes have been removed since it last said so:
    /// time to hand freed memory back to the system.
    pub fn take_freed(&mut self, at_least: usize) -> bool {
        if self.freed < at_least {
            return false;
        }
        self.freed = 0;
        true
    }

    /// Inserts a file created here (not in S3 yet), with one kernel lookup.
    pub fn insert_local(
        &mut self,
        parent: u64,
        mount: &Arc<MountPoint>,
        key: String,
        name: &str,
        now: SystemTime,
    ) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(
            ino,
            Inode {
                ino,
                parent,
                name: name.to_string(),
                kind: Kind::File,
                loc: Loc::Object { mount: mount.clone(), key },
                size: 0,
                mtime: now,
                etag: None,
                valid_until: Instant::now(),
                lookups: 1,
                pinned: false,
                listing: None,
                page_cache: PageCache::Empty,
                local: true,
                local_children: Default::default(),
                changed: Default::default(),
                posix: None,
                own_etag: None,
                doubted: None,
            },
        );
        self.names.insert((parent, name.to_string()), ino);
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.local_children.insert(name.to_string());
        }
        ino
    }

    /// Moves an inode to a new parent and name (after a rename).
    pub fn relink(&mut self, ino: u64, parent: u64, name: &str) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        if self.names.get(&NameRef(inode.parent, &inode.name)) == Some(&ino) {
            self.names.remove(&NameRef(inode.parent, &inode.name));
        }
        inode.parent = parent;
        inode.name = name.to_string();
        self.names.insert((parent, name.to_string()), ino);
    }

    /// Rewrites the keys of every inode of `mount` under `from` to be under `to`.
    pub fn rekey(&mut self, mount: &Arc<MountPoint>, from: &str, to: &str) {
        for inode in self.inodes.values_mut() {
            if let Loc::Object { mount: m, key } = &mut inode.loc
                && Arc::ptr_eq(m, mount)
                && let Some(rest) = key.strip_prefix(from)
            {
                *key = format!("{to}{rest}");
                inode.listing = None;
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Inode> {
        self.inodes.values()
    }

    /// Adds one kernel lookup to a known inode.
    pub fn remember(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups += 1;
        }
    }

    /// Drops `n` kernel lookups; an unpinned inode nobody knows is removed.
    /// A file not uploaded yet stays (as in [`Self::sweep`]): its upload
    /// still has to record it in its directory's listing.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        if inode.lookups == 0 && !inode.pinned && !inode.local {
            let key = NameRef(inode.parent, &inode.name);
            if self.names.get(&key) == Some(&ino) {
                self.names.remove(&key);
            }
            self.inodes.remove(&ino);
            self.freed += 1;
        }
        self.churned();
    }

    /// Removes new local file `ino` (named `name` in `parent`) whose create
    /// failed: the kernel never got it, so it would never be forgotten.
    pub fn discard_local(&mut self, parent: u64, name: &str, ino: u64) {
        if self.names.get(&NameRef(parent, name)) == Some(&ino) {
            self.names.remove(&NameRef(parent, name));
        }
        if self.inodes.get(&ino).is_some_and(|i| i.local) {
            self.inodes.remove(&ino);
        }
    }

    /// Detaches `name` from `parent` (it no longer exists on the server).
    pub fn unlink_name(&mut self, parent: u64, name: &str) {
        self.names.remove(&NameRef(parent, name));
    }

    /// Forgets every name under `parent` (the inodes stay); returns them.
    pub fn unlink_children(&mut self, parent: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        self.names.retain(|(p, name), ino| {
            if *p == parent {
                out.push((name.clone(), *ino));
                false
            } else {
                true
            }
        });
        out
    }
}
