//! `--posix-metadata`: modes, owners, times, symlinks and `user.*` extended
//! attributes kept in object user metadata, in s3fs's format (see
//! `posix.rs` for the format). Without the option none of this runs.
//!
//! Reading: a listing carries no user metadata, so an entry's metadata
//! costs a HEAD (of the object, or of a directory's `dir/` marker). It is
//! kept for the metadata TTL like other attributes. `lookup` of a name not
//! known yet gets it from the HEAD it sends anyway; `readdir` HEADs the
//! entries of each batch it hands out and reads ahead the next ones, with
//! at most [`HEAD_CONCURRENCY`] HEADs in flight for the whole mount, so
//! `ls -l` costs one round trip per that many entries.
//!
//! Writing: a change (chmod, chown, utimes, setxattr) of a closed file is a
//! CopyObject onto itself with the new metadata (`MetadataDirective:
//! REPLACE`, `If-Match` on the ETag it was read with; a multipart copy above
//! 5 GiB). A file open for writing takes it with the upload at close. A
//! directory's metadata is its `dir/` marker, written anew.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::StreamExt;

use super::inode::{Loc, PageCache};
use super::namespace::{self, Entry, Kind};
use super::posix::{self, Posix, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use super::write::MAX_COPY;
use super::{Attr, DirItem, Fs, FsError, MountPoint, PosixState, Result, lock};
use crate::store::{ObjectAttrs, PutCondition, StoreError};

/// HEADs in flight at once for the metadata of listed entries, for the
/// whole mount: `readdir` batches and their read-aheads share them.
pub const HEAD_CONCURRENCY: usize = 64;
/// Entries after a `readdir` batch whose metadata is read ahead.
pub const READ_AHEAD: usize = 1024;

/// A metadata read (one HEAD) that several callers wait for.
pub type SharedRead = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// Who creates a file, directory or symlink, and with which permission bits.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (the umask already applied).
    pub perm: u32,
}

/// A change of attributes asked by `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

impl AttrChange {
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.uid.is_none() && self.gid.is_none() && self.atime.is_none() && self.mtime.is_none()
    }
}

impl PosixState {
    /// The state of an object whose HEAD answered `attrs`.
    pub fn of(attrs: ObjectAttrs) -> Self {
        PosixState { posix: Posix::from_metadata(&attrs.metadata), attrs, mtime_pinned: false, pending: false }
    }

    /// A new object's state: type bits `kind`, created by `owner` now.
    fn new(kind: u32, owner: Owner, now: SystemTime) -> Self {
        let posix = Posix {
            mode: Some(kind | (owner.perm & 0o7777)),
            uid: Some(owner.uid),
            gid: Some(owner.gid),
            mtime: Some(now),
            ctime: Some(now),
            atime: None,
        };
        let mut attrs = ObjectAttrs::default();
        posix.write_into(&mut attrs.metadata);
        PosixState { posix, attrs, mtime_pinned: false, pending: false }
    }

    /// The metadata an upload or copy stores: the object's other metadata
    /// unchanged, the POSIX headers from `posix`.
    fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = self.attrs.metadata.clone();
        self.posix.write_into(&mut m);
        m
    }
}

/// Where an inode's metadata lives.
enum MetaHome {
    /// A file or symlink object, with the ETag it was last seen with.
    Object { key: String, etag: Option<String>, size: u64 },
    /// A directory's `dir/` marker.
    Marker { key: String },
    /// The bucket root or a virtual directory: nowhere (kept in memory).
    Nowhere,
}

impl Fs {
    /// Attributes with the stored metadata, loading it if needed; on failure
    /// the attributes as they are (the defaults of the mount options).
    pub(super) async fn with_posix(&self, attr: Attr) -> Attr {
        if self.ensure_posix(attr.ino).await.is_err() {
            return attr;
        }
        let table = lock(&self.inodes);
        table.get(attr.ino).map(|i| self.attr_of(i)).unwrap_or(attr)
    }

    /// Makes sure inode `ino` knows its stored metadata, no older than the
    /// metadata TTL: one HEAD if not.
    pub(super) async fn ensure_posix(&self, ino: u64) -> Result<()> {
        self.refresh_posix(ino).await.map(|_| ())
    }

    /// [`Self::ensure_posix`]; true if it sent a HEAD (which also refreshed
    /// a file's size and ETag).
    pub(super) async fn refresh_posix(&self, ino: u64) -> Result<bool> {
        if !self.settings.posix_metadata {
            return Ok(false);
        }
        let (mount, key, kind, known) = {
            let table = lock(&self.inodes);
            let inode = table.get(ino).ok_or(FsError::NotFound)?;
            let Loc::Object { mount, key } = &inode.loc else { return Ok(false) };
            let fresh = inode.posix.as_ref().is_some_and(|(at, _)| Instant::now() < *at + mount.ttl);
            if fresh || inode.local {
                return Ok(false);
            }
            (mount.clone(), key.clone(), inode.kind, inode.posix.is_some())
        };
        // A writer holds the metadata its upload will store.
        if known && self.writers.contains(ino) {
            return Ok(false);
        }
        let started = Instant::now();
        if key.is_empty() {
            // The bucket's root has no marker to keep metadata on.
            self.set_posix(ino, started, PosixState::default());
            return Ok(false);
        }
        match mount.store.head_attrs(&key).await {
            Ok((meta, attrs)) => {
                let writing = self.writers.contains(ino);
                let mut table = lock(&self.inodes);
                if let Some(inode) = table.get_mut(ino) {
                    // As in `revalidate`: an object's version found while the
                    // HEAD was out (an upload, a listing) is newer than the
                    // HEAD's, and keeps its metadata.
                    let remote = kind == Kind::File && !inode.local && !writing;
                    let stale = !inode.is_at(&key) || (remote && inode.knows_more_than(started + mount.ttl));
                    if remote && !stale {
                        inode.size = meta.size;
                        inode.mtime = meta.last_modified;
                        inode.take_server_etag(Some(meta.etag));
                        inode.valid_until = started + mount.ttl;
                    }
                    if !stale {
                        inode.take_stored_posix(started, attrs, writing);
                    }
                    // A dropped answer leaves what the inode holds, which is
                    // newer: fresh, but not by this HEAD.
                    return Ok(!stale);
                }
                Ok(true)
            }
            Err(StoreError::NotFound) if kind == Kind::Dir => {
                // A directory without a marker: the mount options' defaults.
                self.set_posix(ino, started, PosixState::default());
                Ok(true)
            }
            Err(e) => {
                self.log_store_error("head", &mount, &key, &e);
                Err(e.into())
            }
        }
    }

    /// Reads the metadata of `inos` that is not fresh, [`HEAD_CONCURRENCY`]
    /// at once, joining reads already in flight. A failed HEAD leaves an
    /// entry with the mount options' defaults.
    pub(super) async fn read_posix_of(self: &Arc<Self>, inos: Vec<u64>) {
        futures::stream::iter(inos)
            .map(|ino| self.shared_posix_read(ino))
            .buffer_unordered(HEAD_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    fn shared_posix_read(self: &Arc<Self>, ino: u64) -> SharedRead {
        use futures::FutureExt;
        let mut reads = lock(&self.posix_reads);
        if let Some(r) = reads.get(&ino) {
            return r.clone();
        }
        let fs = self.clone();
        let read = async move {
            // The semaphore is never closed.
            let permit = fs.posix_heads.acquire().await;
            let _ = fs.ensure_posix(ino).await;
            drop(permit);
            lock(&fs.posix_reads).remove(&ino);
        }
        .boxed()
        .shared();
        reads.insert(ino, read.clone());
        read
    }

    fn set_posix(&self, ino: u64, at: Instant, state: PosixState) {
        if let Some(inode) = lock(&self.inodes).get_mut(ino) {
            inode.posix = Some((at, Arc::new(state)));
        }
    }

    /// The stored metadata of the entries of a `readdir` batch of
    /// directory `dir`, read with up to [`HEAD_CONCURRENCY`] HEADs at once
    /// (none for fresh ones). An object that its metadata marks as a
    /// directory (s3fs's older directory objects) becomes one.
    pub(super) async fn load_posix_of(self: &Arc<Self>, dir: u64, items: &mut [Arc<DirItem>]) {
        let inos: Vec<u64> = items.iter().filter(|i| i.name != "." && i.name != "..").map(|i| i.attr.ino).collect();
        self.read_posix_of(inos).await;
        let mut table = lock(&self.inodes);
        let Some(Loc::Object { mount, key: dir_key }) = table.get(dir).map(|d| d.loc.clone()) else { return };
        for item in items.iter_mut().filter(|i| i.attr.kind == Kind::File) {
            let is_dir = table
                .get(item.attr.ino)
                .and_then(|i| i.posix.as_ref())
                .is_some_and(|(_, p)| posix::is_dir_object(&p.attrs));
            if !is_dir {
                continue;
            }
            let entry = Entry::dir(&item.name);
            if let Some((_, entries)) = table.get_mut(dir).and_then(|d| d.listing.as_mut()) {
                Arc::make_mut(entries).insert(item.name.clone(), entry.clone());
            }
            let ino = table.upsert(dir, &mount, &dir_key, &entry, Instant::now() + mount.ttl, false);
            if let Some(inode) = table.get(ino) {
                *item = Arc::new(DirItem { name: item.name.clone(), attr: self.attr_of(inode) });
            }
        }
    }

    /// The metadata of `ino` now (loading it if needed), and where it lives.
    async fn posix_and_home(&self, ino: u64) -> Result<(Arc<MountPoint>, PosixState, MetaHome)> {
        self.ensure_posix(ino).await?;
        let table = lock(&self.inodes);
        let inode = table.get(ino).ok_or(FsError::NotFound)?;
        let Loc::Object { mount, key } = &inode.loc else { return Err(FsError::ReadOnly) };
        let state = inode.posix.as_ref().map(|(_, p)| (**p).clone()).unwrap_or_default();
        let home = match inode.kind {
            Kind::Dir if key.is_empty() => MetaHome::Nowhere,
            Kind::Dir => MetaHome::Marker { key: key.clone() },
            Kind::File => MetaHome::Object { key: key.clone(), etag: inode.etag.clone(), size: inode.size },
        };
        Ok((mount.clone(), state, home))
    }

    /// chmod, chown and utimes with `--posix-metadata`.
    pub async fn change_attrs(&self, ino: u64, change: AttrChange) -> Result<Attr> {
        let now = SystemTime::now();
        self.change_metadata(ino, |state| {
            if let Some(t) = change.mtime {
                state.mtime_pinned = true;
                state.posix.mtime = Some(t);
            }
            let p = &mut state.posix;
            if let Some(mode) = change.mode {
                let kind = p.mode.map(|m| m & S_IFMT).filter(|k| *k != 0);
                p.mode = Some(kind.unwrap_or(mode & S_IFMT) | (mode & 0o7777));
            }
            p.uid = change.uid.or(p.uid);
            p.gid = change.gid.or(p.gid);
            p.atime = change.atime.or(p.atime);
            p.ctime = Some(now);
            Ok(None)
        })
        .await?;
        let table = lock(&self.inodes);
        Ok(self.attr_of(table.get(ino).ok_or(FsError::NotFound)?))
    }

    /// Applies `edit` to the metadata of `ino` and stores it: on the
    /// upload at close for a file open for writing, by a copy onto itself
    /// for a closed file, on the marker for a directory. `edit` may name
    /// the metadata it alone adds (for telling E2BIG from ENOSPC).
    async fn change_metadata<F>(&self, ino: u64, edit: F) -> Result<()>
    where
        F: FnOnce(&mut PosixState) -> Result<Option<BTreeMap<String, String>>>,
    {
        let (mount, mut state, home) = self.posix_and_home(ino).await?;
        self.check_writable(&mount)?;
        let alone = edit(&mut state)?;
        let metadata = state.metadata();
        let alone = alone.unwrap_or_else(|| metadata.clone());
        match posix::check_size(&metadata, &alone) {
            Ok(()) => {}
            Err(posix::TooLarge::Alone) => return Err(FsError::TooBig),
            Err(posix::TooLarge::WithOthers) => return Err(FsError::NoSpace),
        }
        state.attrs.metadata = metadata.clone();
        let writing = self.writers.contains(ino) || lock(&self.inodes).get(ino).is_some_and(|i| i.local);
        let started = Instant::now();
        if writing {
            // Taken by the upload at close.
            state.pending = true;
            self.set_posix(ino, started, state);
            return Ok(());
        }
        state.mtime_pinned = false;
        state.pending = false;
        match home {
            MetaHome::Nowhere => {}
            MetaHome::Marker { key } => {
                let attrs = ObjectAttrs { content_type: state.attrs.content_type.clone(), metadata };
                let _making = self.start_making(&mount, &key)?;
                mount.store.put_with(&key, bytes::Bytes::new(), PutCondition::None, &attrs).await.inspect_err(|e| {
                    self.log_store_error("put", &mount, &key, e);
                })?;
            }
            MetaHome::Object { key, etag, size } => {
                let attrs = ObjectAttrs { content_type: state.attrs.content_type.clone(), metadata };
                let new_etag = self.replace_metadata(&mount, &key, size, &attrs, etag.as_deref()).await?;
                let mut table = lock(&self.inodes);
                if let Some(inode) = table.get_mut(ino) {
                    // Same bytes, new ETag: pages of the old one are still right.
                    if etag.as_ref().is_some_and(|e| inode.page_cache == PageCache::Holds(e.clone())) {
                        inode.page_cache = PageCache::Holds(new_etag.clone());
                    }
                    inode.take_own_etag(new_etag);
                    // From now: a HEAD sent during the copy saw the old ETag.
                    inode.valid_until = Instant::now() + mount.ttl;
                }
            }
        }
        self.set_posix(ino, started, state);
        Ok(())
    }

    /// Gives object `key` new metadata by copying it onto itself, if it
    /// still has ETag `etag`. Returns the new ETag.
    pub(super) async fn replace_metadata(
        &self,
        mount: &MountPoint,
        key: &str,
        size: u64,
        attrs: &ObjectAttrs,
        etag: Option<&str>,
    ) -> Result<String> {
        // Not lost to a directory rename that lists and deletes meanwhile.
        let _making = self.start_making(mount, key)?;
        let refusals = mount.store.refusals();
        let mut etag = etag.filter(|_| refusals.copy_conditions());
        loop {
            let result = if size <= MAX_COPY {
                mount.store.copy_replace(key, key, attrs, etag).await
            } else {
                self.multipart_copy_with(mount, key, key, size, attrs, etag).await
            };
            match result {
                Err(StoreError::Server { status: 400 | 501, .. }) if etag.is_some() => {
                    refusals.refuse_copy_conditions(&mount.store.describe(), "rejects a copy's condition");
                    etag = None;
                }
                result => {
                    return result.map_err(|e| {
                        self.log_store_error("copy", mount, key, &e);
                        e.into()
                    });
                }
            }
        }
    }

    /// What the next upload of `ino` (to `key`) stores: its metadata with
    /// the mtime of the upload (unless utimes set one) and the Content-Type
    /// of its name. `None` without `--posix-metadata`.
    pub(super) fn upload_attrs(&self, ino: u64, key: &str) -> Option<ObjectAttrs> {
        if !self.settings.posix_metadata {
            return None;
        }
        let now = SystemTime::now();
        let mut state = lock(&self.inodes).get(ino).and_then(|i| i.posix.as_ref().map(|(_, p)| (**p).clone()))?;
        if !state.mtime_pinned {
            state.posix.mtime = Some(now);
        }
        state.posix.ctime = Some(now);
        Some(ObjectAttrs { content_type: posix::content_type_for(key), metadata: state.metadata() })
    }

    /// After an upload with `attrs`: the inode's metadata is what was stored.
    pub(super) fn uploaded_posix(&self, ino: u64, attrs: ObjectAttrs) {
        self.set_posix(ino, Instant::now(), PosixState::of(attrs));
    }

    /// True if metadata of `ino` changed while it is open for writing waits
    /// to be stored at close (a new file's goes with its first upload).
    pub(super) fn posix_pending(&self, ino: u64) -> bool {
        self.settings.posix_metadata
            && lock(&self.inodes).get(ino).is_some_and(|i| !i.local && i.posix.as_ref().is_some_and(|(_, p)| p.pending))
    }

    /// With nothing to upload: stores metadata changed while the file was
    /// open (a chmod or utimes after the last upload) by a copy onto itself.
    /// Returns the copy's ETag, if it made one.
    pub(super) async fn store_pending_posix(
        &self,
        ino: u64,
        key: &str,
        size: u64,
        mount: &MountPoint,
    ) -> Result<Option<String>> {
        if !self.posix_pending(ino) {
            return Ok(None);
        }
        let etag = lock(&self.inodes).get(ino).and_then(|i| i.etag.clone());
        let Some(attrs) = self.upload_attrs(ino, key) else { return Ok(None) };
        let new_etag = self.replace_metadata(mount, key, size, &attrs, etag.as_deref()).await?;
        self.uploaded_posix(ino, attrs);
        if let Some(inode) = lock(&self.inodes).get_mut(ino) {
            if etag.as_ref().is_some_and(|e| inode.page_cache == PageCache::Holds(e.clone())) {
                inode.page_cache = PageCache::Holds(new_etag.clone());
            }
            inode.take_own_etag(new_etag.clone());
            // Newer than any HEAD sent before the copy finished.
            inode.valid_until = Instant::now() + mount.ttl;
        }
        Ok(Some(new_etag))
    }

    // ----- creating -----

    /// The metadata a new file gets (before its first upload).
    pub(super) fn posix_for_new_file(&self, ino: u64, owner: Option<Owner>) {
        if let (true, Some(owner)) = (self.settings.posix_metadata, owner) {
            self.set_posix(ino, Instant::now(), PosixState::new(S_IFREG, owner, SystemTime::now()));
        }
    }

    /// The marker attributes of a new directory, with `--posix-metadata`.
    pub(super) fn posix_for_new_dir(&self, owner: Option<Owner>) -> Option<PosixState> {
        match (self.settings.posix_metadata, owner) {
            (true, Some(owner)) => Some(PosixState::new(S_IFDIR, owner, SystemTime::now())),
            _ => None,
        }
    }

    /// symlink(2): an object whose body is `target` and whose mode has
    /// `S_IFLNK`, as s3fs makes them.
    pub async fn symlink(&self, parent: u64, name: &str, target: &str, owner: Owner) -> Result<Attr> {
        if !self.settings.posix_metadata {
            return Err(FsError::NotPermitted);
        }
        let (mount, dir_key) = self.new_entry_location(parent, name, 0)?;
        let key = namespace::child_key(&dir_key, name);
        match self.lookup_inner(parent, name, false).await {
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let _making = self.start_making(&mount, &key)?;
        let now = SystemTime::now();
        let state = PosixState::new(S_IFLNK, Owner { perm: 0o777, ..owner }, now);
        let attrs = ObjectAttrs { content_type: Some("application/octet-stream".into()), metadata: state.metadata() };
        let body = bytes::Bytes::copy_from_slice(target.as_bytes());
        let etag = mount.store.put_with(&key, body, PutCondition::None, &attrs).await.inspect_err(|e| {
            self.change_failed("put", &mount, &key, e, (parent, name));
        })?;
        let started = Instant::now();
        let entry =
            Entry { name: name.to_string(), kind: Kind::File, size: target.len() as u64, etag: Some(etag), mtime: now };
        let mut table = lock(&self.inodes);
        table.clear_negative(parent, name);
        table.note_change(parent, name, Some(entry.clone()), started);
        let ino = table.upsert(parent, &mount, &dir_key, &entry, started + mount.ttl, true);
        let inode = table.get_mut(ino).ok_or(FsError::NotFound)?;
        inode.posix = Some((started, Arc::new(PosixState::of(attrs))));
        Ok(self.attr_of(inode))
    }

    /// readlink(2): the body of a symlink object.
    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let (mount, state, home) = self.posix_and_home(ino).await?;
        let MetaHome::Object { key, etag, size } = home else { return Err(FsError::Invalid) };
        if !state.posix.is_symlink() {
            return Err(FsError::Invalid);
        }
        let body = mount.store.get_range(&key, etag.as_deref(), 0, size).await;
        let body = match body {
            Ok(b) => crate::store::collect_body(b).await,
            Err(e) => Err(e),
        };
        body.map(|b| b.to_vec()).map_err(|e| {
            self.log_store_error("get", &mount, &key, &e);
            e.into()
        })
    }

    /// mknod(2): a regular file is created (empty); FIFOs, sockets and
    /// devices cannot be stored.
    pub async fn mknod(&self, parent: u64, name: &str, mode: u32, owner: Owner, pid: u32) -> Result<Attr> {
        if mode & S_IFMT != S_IFREG && mode & S_IFMT != 0 {
            return Err(FsError::NotPermitted);
        }
        let (attr, fh) = self.create_as(parent, name, libc::O_WRONLY, pid, Some(owner)).await?;
        // The last close uploads the empty object.
        self.release(fh).await;
        let table = lock(&self.inodes);
        Ok(table.get(attr.ino).map(|i| self.attr_of(i)).unwrap_or(attr))
    }

    // ----- extended attributes -----

    /// getxattr(2): only `user.*` attributes are stored; others are absent
    /// without a request (the kernel asks for `security.capability` on
    /// every write).
    pub async fn getxattr(&self, ino: u64, name: &str) -> Result<Vec<u8>> {
        if !name.starts_with("user.") {
            return Err(FsError::NoAttr);
        }
        let (_, state, _) = self.posix_and_home(ino).await?;
        posix::xattrs_of(&state.attrs.metadata).remove(name).ok_or(FsError::NoAttr)
    }

    /// [`Self::getxattr`] without waiting: the answer if it needs no
    /// request (a name outside `user.*`, or fresh metadata), else `None`.
    pub fn getxattr_now(&self, ino: u64, name: &str) -> Option<Result<Vec<u8>>> {
        if !name.starts_with("user.") {
            return Some(Err(FsError::NoAttr));
        }
        let state = {
            let table = lock(&self.inodes);
            let inode = table.get(ino)?;
            let Loc::Object { mount, .. } = &inode.loc else { return None };
            let (at, state) = inode.posix.as_ref()?;
            if Instant::now() >= *at + mount.ttl {
                return None;
            }
            state.clone()
        };
        Some(posix::xattrs_of(&state.attrs.metadata).remove(name).ok_or(FsError::NoAttr))
    }

    /// listxattr(2): the names of the stored attributes.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<String>> {
        let (_, state, _) = self.posix_and_home(ino).await?;
        Ok(posix::xattrs_of(&state.attrs.metadata).into_keys().collect())
    }

    /// setxattr(2) of a `user.*` attribute; others are not supported.
    pub async fn setxattr(&self, ino: u64, name: &str, value: &[u8], flags: i32) -> Result<()> {
        if !name.starts_with("user.") {
            return Err(FsError::NotSupported);
        }
        if !posix::xattr_name_ok(name) {
            return Err(FsError::Invalid);
        }
        self.change_metadata(ino, |state| {
            let mut xattrs = posix::xattrs_of(&state.attrs.metadata);
            let exists = xattrs.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(FsError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(FsError::NoAttr);
            }
            let mut alone = BTreeMap::new();
            posix::set_xattrs(&mut alone, &posix::Xattrs::from([(name.to_string(), value.to_vec())]));
            state.posix.write_into(&mut alone);
            xattrs.insert(name.to_string(), value.to_vec());
            posix::set_xattrs(&mut state.attrs.metadata, &xattrs);
            Ok(Some(alone))
        })
        .await
    }

    /// removexattr(2).
    pub async fn removexattr(&self, ino: u64, name: &str) -> Result<()> {
        if !name.starts_with("user.") {
            return Err(FsError::NoAttr);
        }
        self.change_metadata(ino, |state| {
            let mut xattrs = posix::xattrs_of(&state.attrs.metadata);
            xattrs.remove(name).ok_or(FsError::NoAttr)?;
            posix::set_xattrs(&mut state.attrs.metadata, &xattrs);
            Ok(None)
        })
        .await
    }
}

/// A name a new entry can have: `ENAMETOOLONG` over 255 bytes, `EINVAL` for
/// the impossible ones (empty, `.`, `..`, with `/` or NUL).
pub(super) fn check_name(name: &str) -> Result<()> {
    if name.len() > namespace::NAME_MAX {
        Err(FsError::NameTooLong)
    } else if !namespace::valid_name(name) {
        Err(FsError::Invalid)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::fault_tests::Setup;
    use crate::fs::inode::ROOT as ROOT_INO;
    use crate::store::ObjectStore;
    use bytes::Bytes;

    fn posix_setup() -> Setup {
        posix_setup_with_ttl(std::time::Duration::from_secs(60))
    }

    fn posix_setup_with_ttl(ttl: std::time::Duration) -> Setup {
        let mut s = crate::fs::fault_tests::setup_with_ttl(64 << 20, 1, ttl);
        let mut settings = s.fs.settings().clone();
        settings.posix_metadata = true;
        s.fs = Arc::new(Fs::new(settings, vec![(Vec::new(), s.mount.clone())]).unwrap());
        s
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn a_renamed_directory_keeps_its_marker_metadata_and_its_files() {
        let s = posix_setup();
        rt().block_on(async {
            let d = s.fs.mkdir(ROOT_INO, "d").await.unwrap();
            s.fs.change_attrs(d.ino, AttrChange { mode: Some(S_IFDIR | 0o700), uid: Some(7), ..Default::default() })
                .await
                .unwrap();
            s.mem
                .put_with(
                    "d/f",
                    Bytes::from_static(b"x"),
                    PutCondition::None,
                    &ObjectAttrs { content_type: None, metadata: [("mode".to_string(), "33188".to_string())].into() },
                )
                .await
                .unwrap();
            s.fs.rename(ROOT_INO, "d", ROOT_INO, "e", 0).await.unwrap();
            let (_, marker) = s.mem.head_attrs("e/").await.unwrap();
            let p = Posix::from_metadata(&marker.metadata);
            assert_eq!((p.mode, p.uid), (Some(S_IFDIR | 0o700), Some(7)), "{marker:?}");
            let (_, file) = s.mem.head_attrs("e/f").await.unwrap();
            assert_eq!(file.metadata.get("mode").map(String::as_str), Some("33188"));
            assert!(s.mem.head("d/").await.is_err());
        });
    }

    #[test]
    fn rmdir_removes_an_older_s3fs_directory_object() {
        let s = posix_setup();
        rt().block_on(async {
            let attrs =
                ObjectAttrs { content_type: Some("application/x-directory".into()), metadata: Default::default() };
            s.mem.put_with("old", Bytes::new(), PutCondition::None, &attrs).await.unwrap();
            assert_eq!(s.fs.lookup(ROOT_INO, "old").await.unwrap().kind, Kind::Dir);
            s.fs.rmdir(ROOT_INO, "old").await.unwrap();
            assert!(matches!(s.mem.head("old").await, Err(StoreError::NotFound)));
            assert!(matches!(s.fs.lookup(ROOT_INO, "old").await, Err(FsError::NotFound)));
        });
    }

    fn with_mode(mode: u32) -> ObjectAttrs {
        ObjectAttrs { content_type: None, metadata: [("mode".to_string(), mode.to_string())].into() }
    }

    /// Object `f` with body `x` and `mode` stored, looked up: its inode.
    async fn file_with_mode(s: &Setup, mode: u32) -> u64 {
        s.mem.put_with("f", Bytes::from_static(b"x"), PutCondition::None, &with_mode(mode)).await.unwrap();
        s.fs.lookup(ROOT_INO, "f").await.unwrap().ino
    }

    /// The mode stored on object `f`.
    async fn stored_mode(s: &Setup) -> Option<u32> {
        Posix::from_metadata(&s.mem.head_attrs("f").await.unwrap().1.metadata).mode
    }

    /// chmod of a closed file whose CopyObject fails: the error reaches the
    /// caller, neither the object nor what `stat` shows changes, and the
    /// next chmod works.
    #[test]
    fn a_failed_copy_leaves_the_mode_as_it_was() {
        use crate::store::faulty::{Fault, Rule};
        let s = posix_setup();
        rt().block_on(async {
            let ino = file_with_mode(&s, S_IFREG | 0o644).await;
            let fail = Fault::Fail(StoreError::Server { status: 500, message: "injected".into() });
            s.faults.add(Rule::nth("copy", 0, fail));
            let chmod = AttrChange { mode: Some(S_IFREG | 0o600), ..Default::default() };
            assert!(s.fs.change_attrs(ino, chmod).await.is_err());
            let mode = |a: &Attr| a.posix.as_ref().and_then(|p| p.posix.mode);
            assert_eq!(mode(&s.fs.getattr(ino).await.unwrap()), Some(S_IFREG | 0o644), "stat after a failed chmod");
            assert_eq!(stored_mode(&s).await, Some(S_IFREG | 0o644));
            let attr = s.fs.change_attrs(ino, chmod).await.unwrap();
            assert_eq!(mode(&attr), Some(S_IFREG | 0o600));
            assert_eq!(stored_mode(&s).await, Some(S_IFREG | 0o600));
        });
    }

    /// A chmod of a file open for writing is stored by the upload at close.
    /// A lookup answered meanwhile (the kernel forgot the name, the TTL
    /// passed) reads the stored metadata, older than the chmod: it must not
    /// replace it, or `stat` shows the old mode and close stores nothing.
    #[test]
    fn a_lookup_meanwhile_keeps_a_chmod_that_waits_for_close() {
        let s = posix_setup_with_ttl(std::time::Duration::from_millis(500));
        rt().block_on(async {
            let ino = file_with_mode(&s, S_IFREG | 0o644).await;
            let pid = std::process::id();
            let (fh, _) = s.fs.open(ino, libc::O_WRONLY, pid).await.unwrap();
            let chmod = AttrChange { mode: Some(S_IFREG | 0o600), ..Default::default() };
            s.fs.change_attrs(ino, chmod).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
            let heads = s.mem.count_of("head");
            let attr = s.fs.lookup(ROOT_INO, "f").await.unwrap();
            assert!(s.mem.count_of("head") > heads, "the lookup asked the server");
            let mode = |a: &Attr| a.posix.as_ref().and_then(|p| p.posix.mode);
            assert_eq!(mode(&attr), Some(S_IFREG | 0o600), "the lookup's answer");
            s.fs.flush(fh, pid).await.unwrap();
            assert_eq!(stored_mode(&s).await, Some(S_IFREG | 0o600), "stored by close");
            s.fs.release(fh).await;
        });
    }

    /// Two descriptors of one file share its writer. A close of one that
    /// stores only a chmod (a copy onto itself, a new ETag) leaves the
    /// writer's base at that ETag: what is written through the other is
    /// then stored by its close, with the mode, not refused its If-Match.
    #[test]
    fn a_write_after_a_close_that_stored_a_chmod_lands() {
        let s = posix_setup();
        rt().block_on(async {
            let old = vec![b'o'; 10 << 20];
            s.mem.insert_with("f", old.clone(), with_mode(S_IFREG | 0o644));
            let ino = s.fs.lookup(ROOT_INO, "f").await.unwrap().ino;
            let pid = std::process::id();
            let (a, _) = s.fs.open(ino, libc::O_WRONLY, pid).await.unwrap();
            let (b, _) = s.fs.open(ino, libc::O_WRONLY, pid).await.unwrap();
            let chmod = AttrChange { mode: Some(S_IFREG | 0o600), ..Default::default() };
            s.fs.change_attrs(ino, chmod).await.unwrap();
            s.fs.flush(a, pid).await.unwrap();
            s.fs.release(a).await;
            s.fs.write(b, 100, b"edit").await.unwrap();
            s.fs.flush(b, pid).await.expect("the edit is stored");
            s.fs.release(b).await;
            let mut want = old;
            want[100..104].copy_from_slice(b"edit");
            assert!(s.mem.body("f").unwrap() == want, "the edit landed");
            assert_eq!(stored_mode(&s).await, Some(S_IFREG | 0o600));
        });
    }

    /// A HEAD sent before a chmod of a closed file (a copy onto itself) and
    /// answered after it tells of the metadata and ETag before the copy: it
    /// must not bring them back.
    #[test]
    fn a_late_head_does_not_undo_a_chmod() {
        use crate::store::faulty::{Fault, Rule};
        let s = posix_setup_with_ttl(std::time::Duration::from_secs(2));
        rt().block_on(async {
            let ino = file_with_mode(&s, S_IFREG | 0o644).await;
            tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
            let gate = Arc::new(tokio::sync::Notify::new());
            s.faults.add(Rule::nth("head", 0, Fault::HeldAnswer(gate.clone())));
            let asking = tokio::spawn({
                let fs = s.fs.clone();
                async move { fs.getattr(ino).await }
            });
            crate::fs::fault_tests::held(&s.faults).await;
            assert_eq!(s.faults.injected(), 1, "the getattr's HEAD is out");
            let chmod = AttrChange { mode: Some(S_IFREG | 0o600), ..Default::default() };
            s.fs.change_attrs(ino, chmod).await.unwrap();
            gate.notify_one();
            asking.await.unwrap().unwrap();
            let mode = |a: &Attr| a.posix.as_ref().and_then(|p| p.posix.mode);
            assert_eq!(mode(&s.fs.getattr(ino).await.unwrap()), Some(S_IFREG | 0o600), "stat after the late HEAD");
            let (fh, _) = s.fs.open(ino, libc::O_RDONLY, std::process::id()).await.unwrap();
            assert_eq!(s.fs.read(fh, 0, 10).await.unwrap().to_vec(), b"x", "read with the copy's ETag");
            s.fs.release(fh).await;
        });
    }

    /// `ls -l` of three large directories at once, with slow HEADs of which
    /// some fail: never more than [`HEAD_CONCURRENCY`] HEADs in flight for
    /// the mount, every entry is listed, a failed HEAD leaves the mount's
    /// defaults (no error to `ls`), and the others show what is stored.
    #[test]
    fn metadata_read_ahead_is_bounded_and_survives_failed_heads() {
        use crate::store::faulty::{Fault, Rule};
        let s = posix_setup();
        rt().block_on(async {
            for d in 0..3 {
                for i in 0..400 {
                    let attrs = with_mode(S_IFREG | 0o640);
                    s.mem.put_with(&format!("d{d}/f{i:03}"), Bytes::new(), PutCondition::None, &attrs).await.unwrap();
                }
            }
            s.faults.add(Rule::always("head", Fault::Delay(std::time::Duration::from_millis(40))));
            let fail = Fault::Fail(StoreError::Server { status: 503, message: "injected".into() });
            s.faults.add(Rule::sometimes("head", 0.2, fail));
            let mut dirs = Vec::new();
            for d in 0..3 {
                dirs.push(s.fs.lookup(ROOT_INO, &format!("d{d}")).await.unwrap().ino);
            }
            let listings = dirs.iter().map(|&dir| {
                let fs = s.fs.clone();
                async move {
                    let fh = fs.opendir(dir).unwrap();
                    let mut names = Vec::new();
                    let mut offset = 0;
                    loop {
                        let batch = fs.readdir(fh, offset).await.unwrap();
                        if batch.is_empty() {
                            break;
                        }
                        offset += batch.len() as u64;
                        names.extend(batch.iter().filter(|i| i.name.starts_with('f')).map(|i| i.attr.clone()));
                    }
                    fs.releasedir(fh);
                    names
                }
            });
            let listed = futures::future::join_all(listings).await;
            // Read-aheads may still run: wait for them before counting.
            for _ in 0..200 {
                if s.fs.posix_heads.available_permits() == HEAD_CONCURRENCY {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let most = s.faults.most_heads_at_once();
            assert!(most > 8 && most <= HEAD_CONCURRENCY, "{most} HEADs at once");
            for attrs in &listed {
                assert_eq!(attrs.len(), 400, "every entry listed");
                let table = lock(&s.fs.inodes);
                let mode = |ino| table.get(ino).and_then(|i| i.posix.as_ref()).and_then(|(_, p)| p.posix.mode);
                let stored = attrs.iter().filter(|a| mode(a.ino) == Some(S_IFREG | 0o640)).count();
                assert!(stored > 100, "{stored} entries show their stored mode");
            }
        });
    }
}
