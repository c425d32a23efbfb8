//! Operations that change the bucket: create, write, flush/fsync (upload),
//! truncate, mkdir, unlink, rmdir and rename. See `write.rs` for how file
//! contents reach S3, and the README's semantics table for what each
//! operation costs and guarantees.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use tracing::{error, info};

use super::handles::HandleKind;
use super::inode::{Loc, PageCache};
use super::namespace::{self, Entry, Kind};
use super::posix_ops::{Owner, check_name};
use super::write::{Base, MAX_COPY, MAX_INFLIGHT_PARTS, Upload, WriteError, Writer, stop_all};
use super::writers::{Left, WriterEntry};
use super::{Attr, Fs, FsError, MountPoint, Result, lock, posix, tgid};
use crate::store::{PutCondition, StoreError};

/// Renames of directories copy this many objects at once.
const RENAME_CONCURRENCY: usize = 16;
/// How many times a rename copies a file whose object another client keeps
/// replacing before it gives up (`ESTALE`).
const COPY_TRIES: usize = 3;

/// How long a directory rename waits for the uploads of files closed just
/// before it.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// A key or prefix registered in one of [`Fs`]'s lists while this lives: a
/// directory being renamed (`renaming`), or a key being written by a
/// `mkdir`, a symlink, a metadata change or a rename (`making`). A new entry or writer under a directory checks the
/// renaming list after it is visible itself (a new inode in the table, a
/// writer's slot in the registry, a put in the making list), and the rename
/// looks for those after registering: whichever comes second sees the
/// other, so nothing is made under the old prefix while the rename copies
/// and deletes it.
pub(super) struct Registered<'a> {
    list: &'a std::sync::Mutex<Vec<(Arc<str>, String)>>,
    entry: (Arc<str>, String),
}

impl<'a> Registered<'a> {
    fn start(list: &'a std::sync::Mutex<Vec<(Arc<str>, String)>>, source: &Arc<str>, key: &str) -> Self {
        let entry = (source.clone(), key.to_string());
        lock(list).push(entry.clone());
        Self { list, entry }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut list = lock(self.list);
        if let Some(i) = list.iter().position(|e| *e == self.entry) {
            list.swap_remove(i);
        }
    }
}

/// What a rename's copy made.
struct Copied {
    etag: String,
    size: u64,
    /// The version the inode knew was copied (not another client's).
    known: bool,
}

/// Counts one running upload while it lives, so shutdown can wait for them;
/// an upload whose future is dropped is not counted for ever.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Fs {
    pub(super) fn check_writable(&self, mount: &MountPoint) -> Result<()> {
        if self.settings.read_only || mount.read_only { Err(FsError::ReadOnly) } else { Ok(()) }
    }

    /// The mount and prefix of directory `parent`, for a new entry `name`
    /// whose key is `extra` bytes longer than `prefix + name` (1 for a
    /// directory's marker): the name is valid, the mount writable and the
    /// key within S3's limit.
    pub(super) fn new_entry_location(
        &self,
        parent: u64,
        name: &str,
        extra: usize,
    ) -> Result<(Arc<MountPoint>, String)> {
        check_name(name)?;
        let (mount, dir_key) = self.dir_location(parent)?;
        self.check_writable(&mount)?;
        if dir_key.len() + name.len() + extra > posix::KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        self.check_not_renaming(&mount, &dir_key)?;
        Ok((mount, dir_key))
    }

    /// Registers a put of `key` (a directory marker, a symlink, a metadata
    /// copy, a rename's source or target) while the guard lives, then
    /// refuses it with `EBUSY` if a directory rename covers it: otherwise
    /// that rename waits for it ([`Self::wait_until_not_written`]), so it
    /// does not land under the old prefix after the rename listed it, to be
    /// deleted with the rest.
    pub(super) fn start_making(&self, mount: &MountPoint, key: &str) -> Result<Registered<'_>> {
        let making = Registered::start(&self.making, &mount.source_id, key);
        self.check_not_renaming(mount, key)?;
        Ok(making)
    }

    /// `EBUSY` if `key` is under a directory being renamed: what is made
    /// there now would be left behind, or deleted, by the rename.
    fn check_not_renaming(&self, mount: &MountPoint, key: &str) -> Result<()> {
        let renaming = lock(&self.renaming);
        match renaming.iter().any(|(src, prefix)| *src == mount.source_id && key.starts_with(prefix.as_str())) {
            true => Err(FsError::Busy),
            false => Ok(()),
        }
    }

    /// The mount and prefix of directory `ino`.
    pub(super) fn dir_location(&self, ino: u64) -> Result<(Arc<MountPoint>, String)> {
        let table = lock(&self.inodes);
        let dir = table.get(ino).ok_or(FsError::NotFound)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        match &dir.loc {
            Loc::Object { mount, key } => Ok((mount.clone(), key.clone())),
            // The synthetic directories above Fluid mounts cannot change.
            Loc::Virtual { .. } => Err(FsError::ReadOnly),
        }
    }

    pub(super) async fn open_for_write(
        &self,
        ino: u64,
        mount: &Arc<MountPoint>,
        key: &str,
        flags: i32,
        pid: u32,
    ) -> Result<(u64, bool)> {
        self.check_writable(mount)?;
        let truncate = flags & libc::O_TRUNC != 0;
        let streaming = truncate && flags & libc::O_ACCMODE == libc::O_WRONLY;
        let (entry, made) =
            self.writers.join(ino, || self.make_writer(ino, mount, key, streaming, truncate.then_some(0))).await?;
        if truncate && !made {
            let truncated = entry.writer.lock().await.truncate(0).await;
            if let Err(e) = truncated {
                let _ = self.leave_writer(ino, &entry).await;
                return Err(e.into());
            }
            entry.size.store(0, Ordering::Relaxed);
        }
        Ok((self.add_handle(ino, HandleKind::Write(entry), pid), false))
    }

    /// A writer for the existing file `ino`: streaming from empty, or staged
    /// on the current object and truncated to `truncate_to`.
    async fn make_writer(
        &self,
        ino: u64,
        mount: &Arc<MountPoint>,
        key: &str,
        streaming: bool,
        truncate_to: Option<u64>,
    ) -> Result<WriterEntry> {
        // Checked once the registry has this writer's slot, which a rename
        // starting now sees (`Registered`).
        self.check_not_renaming(mount, key)?;
        let local = lock(&self.inodes).get(ino).is_some_and(|i| i.local);
        let (key, base) = if local {
            (key.to_string(), None)
        } else {
            self.revalidate(ino, mount, key).await?;
            // Key, size and ETag of one version, read together (a rename
            // meanwhile moved the inode, with the copy's ETag).
            let table = lock(&self.inodes);
            let inode = table.get(ino).ok_or(FsError::NotFound)?;
            let Loc::Object { key, .. } = &inode.loc else { return Err(FsError::NotFound) };
            (key.clone(), Some(Base { etag: inode.etag.clone().unwrap_or_default(), size: inode.size }))
        };
        let key = key.as_str();
        let dir = self.staging.path();
        let writer = if streaming {
            Writer::streaming(mount.store.clone(), key.to_string(), self.cache.clone(), dir, base)
        } else {
            let mut w = Writer::staged(mount.store.clone(), key.to_string(), self.cache.clone(), dir, base).await?;
            if let Some(size) = truncate_to {
                w.truncate(size).await?;
            }
            w
        };
        Ok(self.writer_entry(ino, mount, writer))
    }

    fn writer_entry(&self, ino: u64, mount: &Arc<MountPoint>, writer: Writer) -> WriterEntry {
        // Writes go through the kernel's page cache: until an upload
        // succeeds, its pages may hold bytes that no object version has.
        if let Some(inode) = lock(&self.inodes).get_mut(ino) {
            inode.page_cache = PageCache::Unknown;
        }
        WriterEntry {
            size: AtomicU64::new(writer.size()),
            writer: tokio::sync::Mutex::new(writer),
            mount: mount.clone(),
            local: Default::default(),
        }
    }

    /// One user of the writer of `ino` is done with it; the last one uploads
    /// what is left and retires the writer.
    pub(super) async fn leave_writer(&self, ino: u64, w: &Arc<WriterEntry>) -> Result<()> {
        match self.writers.leave(ino, w) {
            Left::Last(entry) => {
                let result = self.upload(ino, &entry).await;
                self.writers.retire(ino, &entry);
                result
            }
            Left::Others | Left::Gone => Ok(()),
        }
    }

    /// Creates and opens a new file. Returns its attributes and the handle.
    pub async fn create(&self, parent: u64, name: &str, flags: i32, pid: u32) -> Result<(Attr, u64)> {
        self.create_as(parent, name, flags, pid, None).await
    }

    /// [`Self::create`] by `owner` (whose uid, gid and mode are stored with
    /// `--posix-metadata`).
    pub async fn create_as(
        &self,
        parent: u64,
        name: &str,
        flags: i32,
        pid: u32,
        owner: Option<Owner>,
    ) -> Result<(Attr, u64)> {
        if let Some(done) = self.create_now(parent, name, flags, pid, owner) {
            return done;
        }
        let (mount, key, ino) = self.new_local_file(parent, name, owner)?;
        let dir = self.staging.path();
        let make = || async {
            let writer = Writer::staged(mount.store.clone(), key, self.cache.clone(), dir, None).await?;
            Ok::<_, FsError>(self.writer_entry(ino, &mount, writer))
        };
        let (entry, _) = self.writers.join(ino, make).await.inspect_err(|_| {
            lock(&self.inodes).discard_local(parent, name, ino);
        })?;
        self.created(ino, entry, pid)
    }

    /// [`Self::create_as`] without waiting, for a file opened write-only:
    /// its writer streams from empty, which needs no request and no file.
    /// `None` for other opens.
    pub fn create_now(
        &self,
        parent: u64,
        name: &str,
        flags: i32,
        pid: u32,
        owner: Option<Owner>,
    ) -> Option<Result<(Attr, u64)>> {
        if flags & libc::O_ACCMODE != libc::O_WRONLY {
            return None;
        }
        let create = || {
            let (mount, key, ino) = self.new_local_file(parent, name, owner)?;
            let writer = Writer::streaming(mount.store.clone(), key, self.cache.clone(), self.staging.path(), None);
            let entry = self.writers.adopt(ino, self.writer_entry(ino, &mount, writer)).inspect_err(|_| {
                lock(&self.inodes).discard_local(parent, name, ino);
            })?;
            self.created(ino, entry, pid)
        };
        Some(create())
    }

    /// A new file's inode (in the namespace only, until it is uploaded):
    /// its mount, key and inode number.
    fn new_local_file(&self, parent: u64, name: &str, owner: Option<Owner>) -> Result<(Arc<MountPoint>, String, u64)> {
        let (mount, dir_key) = self.new_entry_location(parent, name, 0)?;
        let key = namespace::child_key(&dir_key, name);
        let ino = {
            let mut table = lock(&self.inodes);
            table.clear_negative(parent, name);
            table.insert_local(parent, &mount, key.clone(), name, SystemTime::now())
        };
        // Again once the inode is in the table, which a rename that started
        // meanwhile sees (`Registered`).
        if let Err(e) = self.check_not_renaming(&mount, &key) {
            lock(&self.inodes).discard_local(parent, name, ino);
            return Err(e);
        }
        self.posix_for_new_file(ino, owner);
        Ok((mount, key, ino))
    }

    fn created(&self, ino: u64, entry: Arc<WriterEntry>, pid: u32) -> Result<(Attr, u64)> {
        let fh = self.add_handle(ino, HandleKind::Write(entry), pid);
        let attr = self.attr_of(lock(&self.inodes).get(ino).ok_or(FsError::NotFound)?);
        Ok((attr, fh))
    }

    /// [`Self::write`] without waiting: done when the file streams, this
    /// write continues it, and its buffer has room already (a copy into
    /// memory); else `None`.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<u32> {
        let handle = self.handles.file(fh)?;
        let HandleKind::Write(w) = &handle.kind else { return None };
        let mut writer = w.writer.try_lock().ok()?;
        if !writer.write_now(offset, data) {
            return None;
        }
        w.size.store(writer.size(), Ordering::Relaxed);
        crate::metrics::metrics().bytes_written.inc_by(data.len() as u64);
        Some(data.len() as u32)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let handle = self.handles.file(fh).ok_or(FsError::BadHandle)?;
        let HandleKind::Write(w) = &handle.kind else {
            return Err(FsError::BadHandle);
        };
        let mut writer = w.writer.lock().await;
        if let Err(e) = writer.write(offset, data).await {
            error!(key = %writer.key(), offset, "write to {} failed: {e}", writer.key());
            return Err(e.into());
        }
        w.size.store(writer.size(), Ordering::Relaxed);
        crate::metrics::metrics().bytes_written.inc_by(data.len() as u64);
        Ok(data.len() as u32)
    }

    /// close(): uploads what this process wrote. A close by another process
    /// sharing the descriptor (a shell's dup'd fd) leaves it to the opener,
    /// so a file is never uploaded half-written or twice.
    pub async fn flush(&self, fh: u64, pid: u32) -> Result<()> {
        if let Some(done) = self.flush_now(fh, pid) {
            return done;
        }
        let Some(handle) = self.handles.file(fh) else {
            return Ok(());
        };
        let HandleKind::Write(w) = &handle.kind else {
            return Ok(());
        };
        // The opener's own thread (most often the one closing) is known
        // without reading /proc.
        if pid != handle.opener && tgid(pid) != handle.opener {
            return Ok(());
        }
        // A new file nobody wrote to yet is created at release, not here: a
        // shell closes its first descriptor of `> file` before writing. One
        // whose times were set (`touch`), and a chmod or utimes while open
        // with --posix-metadata, are stored now, so that close returns the
        // error.
        let changed = w.writer.lock().await.has_changes();
        if !changed && !self.posix_pending(handle.ino) {
            return Ok(());
        }
        self.upload(handle.ino, w).await
    }

    /// [`Self::flush`] when it has nothing to upload and knows it without
    /// waiting: a read handle, or the opener's close of a writer with no
    /// changes (or one busy elsewhere: `None`, ask [`Self::flush`]).
    pub fn flush_now(&self, fh: u64, pid: u32) -> Option<Result<()>> {
        let Some(handle) = self.handles.file(fh) else {
            return Some(Ok(()));
        };
        let HandleKind::Write(w) = &handle.kind else {
            return Some(Ok(()));
        };
        if pid != handle.opener {
            return None;
        }
        let changed = w.writer.try_lock().ok()?.has_changes();
        // A chmod or utimes while open is stored at close, by a request.
        (!changed && !self.posix_pending(handle.ino)).then_some(Ok(()))
    }

    pub async fn fsync(&self, fh: u64) -> Result<()> {
        let Some(handle) = self.handles.file(fh) else {
            return Ok(());
        };
        match &handle.kind {
            HandleKind::Write(w) => self.upload(handle.ino, w).await,
            HandleKind::Read(_) => Ok(()),
        }
    }

    /// Uploads a writer's content if it changed, and records the result.
    pub(super) async fn upload(&self, ino: u64, w: &Arc<WriterEntry>) -> Result<()> {
        let mut writer = w.writer.lock().await;
        if writer.unlinked {
            return Ok(());
        }
        if !writer.is_dirty() {
            if self.settings.posix_metadata {
                let key = writer.key().to_string();
                if let Some(etag) = self.store_pending_posix(ino, &key, writer.size(), &w.mount).await? {
                    writer.base_copied(&etag);
                }
            }
            return Ok(());
        }
        let posix_attrs = self.upload_attrs(ino, writer.key());
        if let Some(attrs) = &posix_attrs {
            writer.set_attrs(attrs.clone());
        }
        let result = {
            let _running = Running::new(&self.uploads);
            writer.upload().await
        };
        match result {
            Ok(()) => {
                let mut etag = writer.base().map(|b| b.etag.clone()).unwrap_or_default();
                if let Some(attrs) = posix_attrs {
                    // A multipart upload took its metadata when it started;
                    // a chmod or utimes since then is stored by a copy.
                    if writer.uploaded_attrs() != Some(&attrs) {
                        let key = writer.key().to_string();
                        etag = self.replace_metadata(&w.mount, &key, writer.size(), &attrs, Some(&etag)).await?;
                        writer.base_copied(&etag);
                    }
                    self.uploaded_posix(ino, attrs);
                }
                self.record_upload(ino, &w.mount, writer.size(), etag);
                Ok(())
            }
            // Already reported (and logged) when it failed.
            Err(e @ WriteError::Failed) => Err(e.into()),
            Err(e) => {
                crate::metrics::metrics().uploads_failed.inc();
                error!(key = %writer.key(), "upload of {}/{} failed: {e}", w.mount.store.describe(), writer.key());
                Err(e.into())
            }
        }
    }

    /// After an upload: the inode is remote, with the new size and ETag, and
    /// the parent's cached listing knows it.
    fn record_upload(&self, ino: u64, mount: &Arc<MountPoint>, size: u64, etag: String) {
        let now = SystemTime::now();
        let mut table = lock(&self.inodes);
        let Some(inode) = table.get_mut(ino) else {
            return;
        };
        inode.size = size;
        inode.take_own_etag(etag.clone());
        inode.mtime = now;
        inode.valid_until = Instant::now() + mount.ttl;
        inode.local = false;
        // The kernel's pages hold exactly what was uploaded.
        inode.page_cache = PageCache::Holds(etag.clone());
        let (parent, name) = (inode.parent, inode.name.clone());
        if let Some(dir) = table.get_mut(parent) {
            dir.local_children.remove(&name);
        }
        let entry = Entry { name: name.clone(), kind: Kind::File, size, etag: Some(etag), mtime: now };
        table.note_change(parent, &name, Some(entry), Instant::now());
    }

    /// Removes `name` from `parent` in every cache, and remembers for a TTL
    /// that it is gone (some servers list emptied prefixes for a while).
    fn forget_name(&self, parent: u64, name: &str) {
        let mut table = lock(&self.inodes);
        table.set_negative(parent, name, Instant::now());
        table.unlink_name(parent, name);
        if let Some(dir) = table.get_mut(parent) {
            dir.local_children.remove(name);
        }
        table.note_change(parent, name, None, Instant::now());
    }

    /// Records a new directory in the parent's cached listing.
    fn note_dir(&self, parent: u64, name: &str) {
        let mut table = lock(&self.inodes);
        table.clear_negative(parent, name);
        table.note_change(parent, name, Some(Entry::dir(name)), Instant::now());
    }

    /// truncate(2) and the attribute changes of chmod, chown and utimes.
    /// Only the size is stored; mode, owner and times come from the mount
    /// options (see the README's semantics table).
    pub async fn setattr(&self, ino: u64, size: Option<u64>, mtime: Option<SystemTime>) -> Result<Attr> {
        if let Some(size) = size {
            let (mount, key, kind) = {
                let table = lock(&self.inodes);
                let inode = table.get(ino).ok_or(FsError::NotFound)?;
                match &inode.loc {
                    Loc::Object { mount, key } => (mount.clone(), key.clone(), inode.kind),
                    Loc::Virtual { .. } => return Err(FsError::IsDir),
                }
            };
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            self.check_writable(&mount)?;
            // With an open handle, its writer takes the new size and uploads
            // at close; without one, a writer is made for this call and the
            // result uploaded now.
            let (entry, made) =
                self.writers.join(ino, || self.make_writer(ino, &mount, &key, size == 0, Some(size))).await?;
            let truncated = if made { Ok(()) } else { entry.writer.lock().await.truncate(size).await };
            if truncated.is_ok() {
                entry.size.store(size, Ordering::Relaxed);
            }
            let left = self.leave_writer(ino, &entry).await;
            truncated?;
            left?;
        }
        // Only a file being made: the writer of an existing file may be
        // busy uploading, and nothing waits for it here.
        if mtime.is_some()
            && lock(&self.inodes).get(ino).is_some_and(|i| i.local)
            && let Some(entry) = self.writers.get(ino)
        {
            // `touch` sets the times of the file it creates before closing
            // it: the new file is then made at that close, which returns
            // what making it gave, instead of at release, after close has
            // returned.
            entry.writer.lock().await.times_set();
        }
        let mut attr = self.getattr(ino).await?;
        if let Some(t) = mtime {
            if let Some(inode) = lock(&self.inodes).get_mut(ino) {
                inode.mtime = t;
            }
            attr.mtime = t;
        }
        Ok(attr)
    }

    /// mkdir: writes the zero-byte `name/` marker.
    pub async fn mkdir(&self, parent: u64, name: &str) -> Result<Attr> {
        self.mkdir_as(parent, name, None).await
    }

    /// [`Self::mkdir`] by `owner`: with `--posix-metadata`, the marker
    /// carries the directory's mode, owner and times.
    pub async fn mkdir_as(&self, parent: u64, name: &str, owner: Option<Owner>) -> Result<Attr> {
        let (mount, dir_key) = self.new_entry_location(parent, name, 1)?;
        match self.lookup_inner(parent, name, false).await {
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let marker = namespace::child_prefix(&dir_key, name);
        let _making = self.start_making(&mount, &marker)?;
        let state = self.posix_for_new_dir(owner);
        let attrs = state.as_ref().map(|s| s.attrs.clone()).unwrap_or_default();
        let put = crate::store::with_condition(&*mount.store, PutCondition::IfAbsent, |c| {
            mount.store.put_with(&marker, bytes::Bytes::new(), c, &attrs)
        })
        .await;
        match put {
            Ok(_) => {}
            Err(StoreError::PreconditionFailed) => return Err(FsError::Exists),
            Err(e) => {
                self.change_failed("mkdir", &mount, &marker, &e, (parent, name));
                return Err(e.into());
            }
        }
        self.note_dir(parent, name);
        let entry = Entry::dir(name);
        let mut table = lock(&self.inodes);
        let now = Instant::now();
        let ino = table.upsert(parent, &mount, &dir_key, &entry, now + mount.ttl, true);
        if let Some(i) = table.get_mut(ino) {
            i.mtime = SystemTime::now();
            // Nothing was under it a moment ago: the new directory's names
            // are answered without a request for a TTL, like a listing's.
            i.listing = Some((now, Arc::new(Default::default())));
            if let Some(state) = state {
                i.posix = Some((Instant::now(), Arc::new(state)));
            }
        }
        Ok(self.attr_of(table.get(ino).ok_or(FsError::NotFound)?))
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> Result<()> {
        let (mount, dir_key) = self.dir_location(parent)?;
        self.check_writable(&mount)?;
        let attr = self.lookup_inner(parent, name, false).await?;
        if attr.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        // Taking the writer's lock waits for an upload in progress (a last
        // close racing this unlink), so whether the object exists is known
        // below.
        let writer = self.writers.get_or_wait(attr.ino).await;
        let mut guard = match &writer {
            Some(w) => Some(w.writer.lock().await),
            None => None,
        };
        let local = lock(&self.inodes).get(attr.ino).is_some_and(|i| i.local);
        if !local {
            let key = namespace::child_key(&dir_key, name);
            match mount.store.delete(&key).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => {
                    // The file is still there, and so is what its open
                    // handles wrote: their close uploads it.
                    self.change_failed("delete", &mount, &key, &e, (parent, name));
                    return Err(e.into());
                }
            }
        }
        // Writes through open handles go nowhere now.
        if let Some(g) = guard.as_mut() {
            g.unlink().await;
        }
        drop(guard);
        self.forget_name(parent, name);
        Ok(())
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> Result<()> {
        let (mount, dir_key) = self.dir_location(parent)?;
        self.check_writable(&mount)?;
        let attr = self.lookup_inner(parent, name, false).await?;
        if attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if lock(&self.inodes).get(attr.ino).is_some_and(|d| !d.local_children.is_empty()) {
            return Err(FsError::NotEmpty);
        }
        let prefix = namespace::child_prefix(&dir_key, name);
        let page = mount.store.list(&prefix, false, None, Some(2)).await.inspect_err(|e| {
            self.log_store_error("list", &mount, &prefix, e);
        })?;
        if page.objects.iter().any(|o| o.key != prefix) || !page.prefixes.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let mut keys = vec![prefix.clone()];
        if self.settings.posix_metadata {
            // s3fs's older directory object: the key without the slash.
            let legacy = prefix.trim_end_matches('/');
            if let Ok((_, attrs)) = mount.store.head_attrs(legacy).await
                && posix::is_dir_object(&attrs)
            {
                keys.push(legacy.to_string());
            }
        }
        for key in keys {
            match mount.store.delete(&key).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => {
                    self.change_failed("delete", &mount, &key, &e, (parent, name));
                    return Err(e.into());
                }
            }
        }
        self.forget_name(parent, name);
        Ok(())
    }

    /// rename: copy, then delete. A directory is renamed object by object
    /// and is not atomic.
    pub async fn rename(&self, parent: u64, name: &str, newparent: u64, newname: &str, flags: u32) -> Result<()> {
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::Invalid);
        }
        check_name(newname)?;
        let (mount, src_dir) = self.dir_location(parent)?;
        let (new_mount, dst_dir) = self.dir_location(newparent)?;
        if !Arc::ptr_eq(&mount, &new_mount) {
            return Err(FsError::CrossDevice);
        }
        self.check_writable(&mount)?;
        let src = self.lookup_inner(parent, name, false).await?;
        let dst = match self.lookup_inner(newparent, newname, false).await {
            Ok(a) => Some(a),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if dst.is_some() && flags & libc::RENAME_NOREPLACE != 0 {
            return Err(FsError::Exists);
        }
        if dst.as_ref().is_some_and(|d| d.ino == src.ino) {
            return Ok(());
        }
        let renamed = match src.kind {
            Kind::File => {
                if dst.as_ref().is_some_and(|d| d.kind == Kind::Dir) {
                    return Err(FsError::IsDir);
                }
                let to = (newparent, dst_dir.as_str(), newname);
                self.rename_file(&mount, src.ino, &src_dir, name, to, dst.map(|d| d.ino)).await
            }
            Kind::Dir => {
                if let Some(d) = &dst {
                    if d.kind != Kind::Dir {
                        return Err(FsError::NotDir);
                    }
                    let dst_prefix = namespace::child_prefix(&dst_dir, newname);
                    let page = mount.store.list(&dst_prefix, false, None, Some(2)).await?;
                    if page.objects.iter().any(|o| o.key != dst_prefix) {
                        return Err(FsError::NotEmpty);
                    }
                }
                self.rename_dir(&mount, src.ino, &src_dir, name, newparent, &dst_dir, newname).await
            }
        };
        if renamed.as_ref().is_err_and(FsError::outcome_unknown) {
            self.doubt(parent, name);
            self.doubt(newparent, newname);
        }
        renamed?;
        // Both paths forgot the replaced destination and relinked the source.
        Ok(())
    }

    /// Renames file `ino` to `to` (parent inode, its key prefix, name).
    /// If the file it replaces (inode `replaced`) is open for writing, its
    /// writer, found once the source is uploaded, is unlinked (what its
    /// handles write goes nowhere, and their close succeeds), and its lock is
    /// held from before the copy, so an upload of it cannot land over the
    /// renamed file. Never together with the renamed file's own lock: two renames that each replace the
    /// other's source (which the kernel never sends at once, but nothing
    /// here relies on that) would each hold one and wait for the other.
    async fn rename_file(
        &self,
        mount: &Arc<MountPoint>,
        ino: u64,
        src_dir: &str,
        name: &str,
        (newparent, dst_dir, newname): (u64, &str, &str),
        replaced: Option<u64>,
    ) -> Result<()> {
        let src_key = namespace::child_key(src_dir, name);
        let dst_key = namespace::child_key(dst_dir, newname);
        // Neither name is under a directory being renamed, and one that
        // starts now waits for this rename (see `Registered`).
        let _moving = (self.start_making(mount, &src_key)?, self.start_making(mount, &dst_key)?);
        // The object must be complete in S3 before it can be copied.
        let writer = self.writers.get_or_wait(ino).await;
        if let Some(w) = &writer {
            self.upload(ino, w).await?;
        }
        let (mut size, local, etag) =
            lock(&self.inodes).get(ino).map(|i| (i.size, i.local, i.etag.clone())).unwrap_or((0, false, None));
        tracing::debug!(local, "rename {src_key} -> {dst_key}");
        let replaced = match replaced {
            Some(dst) => self.writers.get_or_wait(dst).await,
            None => None,
        };
        let mut copied = None;
        if local {
            // Created but never written or closed: it only exists here.
            let w = writer.clone().ok_or(FsError::NotFound)?;
            if let Some(r) = &replaced {
                r.writer.lock().await.unlink().await;
            }
            let mut guard = w.writer.lock().await;
            guard.set_key(dst_key.clone());
        } else {
            let mut replaced = match &replaced {
                Some(r) => Some(r.writer.lock().await),
                None => None,
            };
            let copy = self.copy_known_version(mount, &src_key, &dst_key, size, etag).await?;
            size = copy.size;
            match mount.store.delete(&src_key).await {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => {
                    self.log_store_error("delete", mount, &src_key, &e);
                    return Err(e.into());
                }
            }
            if let Some(mut guard) = replaced.take() {
                guard.unlink().await;
            }
            if let Some(w) = &writer {
                let mut guard = w.writer.lock().await;
                guard.set_key(dst_key.clone());
                // The writer's version, under its new key and ETag. (Not when
                // another client's version was copied: the next upload must
                // then fail its If-Match rather than replace theirs.)
                if copy.known && !copy.etag.is_empty() {
                    guard.base_copied(&copy.etag);
                }
            }
            copied = Some((copy.etag, copy.known));
        }
        let parent = lock(&self.inodes).get(ino).map(|i| i.parent).unwrap_or_default();
        self.forget_name(parent, name);
        self.forget_name(newparent, newname);
        let mut table = lock(&self.inodes);
        table.clear_negative(newparent, newname);
        table.relink(ino, newparent, newname);
        let (etag, mtime) = match table.get_mut(ino) {
            Some(inode) => {
                inode.loc = Loc::Object { mount: mount.clone(), key: dst_key };
                // What a listing or HEAD sent before the rename says of the
                // new name (an object it replaced) is older than this.
                inode.valid_until = Instant::now() + mount.ttl;
                if let Some((etag, known)) = copied {
                    // The size of the version copied: another client's, if it
                    // replaced the object before the copy.
                    inode.size = size;
                    if etag.is_empty() {
                        // No ETag in the answer: the next use asks for it.
                        inode.etag = None;
                        inode.valid_until = Instant::now();
                    } else if known {
                        inode.take_own_etag(etag);
                    } else {
                        inode.etag = Some(etag);
                    }
                    // The next open drops the kernel's pages: they may be of
                    // the version before the copy.
                    if inode.page_cache != PageCache::Empty {
                        inode.page_cache = PageCache::Unknown;
                    }
                }
                (inode.etag.clone(), inode.mtime)
            }
            None => (None, SystemTime::now()),
        };
        if local {
            if let Some(dir) = table.get_mut(newparent) {
                dir.local_children.insert(newname.to_string());
            }
        } else {
            let e = Entry { name: newname.to_string(), kind: Kind::File, size, etag, mtime };
            table.note_change(newparent, newname, Some(e), Instant::now());
        }
        Ok(())
    }

    /// Waits (at most [`SETTLE`]) until nothing under `prefix` is open for
    /// writing, only local or being written (see `start_making`): `EBUSY` if
    /// something is, once files whose last handle closed have had their
    /// uploads (a `touch` just before the rename is uploaded after its
    /// `close` returned).
    async fn wait_until_not_written(&self, mount: &MountPoint, prefix: &str) -> Result<()> {
        let under = |i: &super::inode::Inode| matches!(&i.loc, Loc::Object { mount: m, key } if m.source_id == mount.source_id && key.starts_with(prefix));
        let started = Instant::now();
        loop {
            let writing = self.writers.inodes();
            let (busy, local): (Vec<u64>, bool) = {
                let table = lock(&self.inodes);
                let busy = writing.into_iter().filter(|w| table.get(*w).is_some_and(under)).collect();
                (busy, table.iter().any(|i| i.local && under(i)))
            };
            let making = lock(&self.making).iter().any(|(s, k)| *s == mount.source_id && k.starts_with(prefix));
            let settled = started.elapsed() >= SETTLE;
            // A local file without a writer is a create that is registering
            // its writer right now, or one whose upload failed and that
            // nothing will write: that one does not hold the rename for ever.
            if busy.is_empty() && !making && (!local || settled) {
                return Ok(());
            }
            if busy.iter().any(|ino| self.writers.in_use(*ino)) || settled {
                return Err(FsError::Busy);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Copies `from` to `to` for a rename: the version whose ETag (`etag`)
    /// and `size` the inode holds, so that the renamed inode's size is the
    /// copy's. If another client replaced the object meanwhile, the copy is
    /// refused (412); its new version is then read with a HEAD and copied
    /// instead, up to [`COPY_TRIES`] times in all. A server that refuses a
    /// copy of the very ETag its HEAD gives (it compares another ETag), or
    /// rejects the condition (400, 501), gets copies without it from then on.
    async fn copy_known_version(
        &self,
        mount: &MountPoint,
        from: &str,
        to: &str,
        mut size: u64,
        etag: Option<String>,
    ) -> Result<Copied> {
        let refusals = mount.store.refusals();
        let mut cond = etag.filter(|e| !e.is_empty() && refusals.copy_conditions());
        let mut known = true;
        let mut tries = 0;
        loop {
            tries += 1;
            let copied = if size <= MAX_COPY {
                mount.store.copy(from, to, cond.as_deref()).await
            } else {
                self.multipart_copy(mount, from, to, size, cond.as_deref()).await
            };
            let e = match copied {
                Ok(etag) => return Ok(Copied { etag, size, known }),
                Err(StoreError::Server { status: 400 | 501, .. }) if cond.is_some() => {
                    refusals.refuse_copy_conditions(&mount.store.describe(), "rejects x-amz-copy-source-if-match");
                    cond = None;
                    continue;
                }
                Err(StoreError::PreconditionFailed) if tries < COPY_TRIES => match mount.store.head(from).await {
                    Ok(meta) if cond.as_deref().is_some_and(|c| c.trim_matches('"') == meta.etag.trim_matches('"')) => {
                        let why = "refuses a copy of the ETag its HEAD gives";
                        refusals.refuse_copy_conditions(&mount.store.describe(), why);
                        cond = None;
                        continue;
                    }
                    Ok(meta) => {
                        info!("{from} was replaced on the server before its rename; copying the new version");
                        (size, cond, known) = (meta.size, Some(meta.etag), false);
                        continue;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            self.log_store_error("copy", mount, from, &e);
            return Err(e.into());
        }
    }

    /// A multipart copy of `from` (the version with ETag `version`, if
    /// given) to `to`, with `from`'s metadata.
    pub(super) async fn multipart_copy(
        &self,
        mount: &MountPoint,
        from: &str,
        to: &str,
        size: u64,
        version: Option<&str>,
    ) -> std::result::Result<String, StoreError> {
        // A multipart copy does not copy metadata: it is read and given.
        let attrs =
            if self.settings.posix_metadata { mount.store.head_attrs(from).await?.1 } else { Default::default() };
        self.multipart_copy_with(mount, from, to, size, &attrs, version).await
    }

    /// A multipart copy whose object gets `attrs`. With `version`, every
    /// part is copied only from the version of `from` with that ETag (a
    /// 412 otherwise), and a copy onto itself is completed only if `to`
    /// still has that ETag.
    pub(super) async fn multipart_copy_with(
        &self,
        mount: &MountPoint,
        from: &str,
        to: &str,
        size: u64,
        attrs: &crate::store::ObjectAttrs,
        version: Option<&str>,
    ) -> std::result::Result<String, StoreError> {
        let upload = Upload::create_with(&mount.store, to, attrs.clone()).await?;
        // Onto itself, the completion's If-Match is the check: ranges copied
        // from another version make it fail. Elsewhere each part has it.
        let (cond, version) = match version {
            Some(e) if from == to => (PutCondition::IfMatch(e.to_string()), None),
            v => (PutCondition::None, v),
        };
        match self.copy_parts(mount, upload.id(), from, to, size, version).await {
            Ok(parts) => {
                let r = mount.store.complete_multipart(to, upload.id(), parts, cond).await;
                match r {
                    Ok(_) => upload.completed(),
                    Err(_) => upload.abort().await,
                }
                r
            }
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    /// The UploadPartCopy parts of a multipart copy, at most
    /// [`MAX_INFLIGHT_PARTS`] at a time; the first failure stops it.
    async fn copy_parts(
        &self,
        mount: &MountPoint,
        id: &str,
        from: &str,
        to: &str,
        size: u64,
        version: Option<&str>,
    ) -> std::result::Result<Vec<crate::store::CompletedPart>, StoreError> {
        let mut tasks = tokio::task::JoinSet::new();
        let parts = Self::send_copy_parts(mount, id, (from, version), to, size, &mut tasks).await;
        if parts.is_err() {
            stop_all(&mut tasks).await;
        }
        parts
    }

    async fn send_copy_parts(
        mount: &MountPoint,
        id: &str,
        (from, version): (&str, Option<&str>),
        to: &str,
        size: u64,
        tasks: &mut tokio::task::JoinSet<std::result::Result<crate::store::CompletedPart, StoreError>>,
    ) -> std::result::Result<Vec<crate::store::CompletedPart>, StoreError> {
        let parts_n = size.div_ceil(MAX_COPY);
        let part_len = size.div_ceil(parts_n);
        let mut parts = Vec::new();
        let joined = |r: std::result::Result<std::result::Result<_, StoreError>, tokio::task::JoinError>| {
            r.map_err(|e| StoreError::Network(format!("copy task failed: {e}"))).and_then(|r| r)
        };
        for n in 0..parts_n {
            let (start, end) = (n * part_len, ((n + 1) * part_len).min(size));
            let (store, to, from, id) = (mount.store.clone(), to.to_string(), from.to_string(), id.to_string());
            let version = version.map(str::to_string);
            tasks.spawn(async move {
                store.upload_part_copy(&to, &id, n as i32 + 1, &from, start, end, version.as_deref()).await
            });
            while tasks.len() >= MAX_INFLIGHT_PARTS {
                if let Some(r) = tasks.join_next().await {
                    parts.push(joined(r)?);
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            parts.push(joined(r)?);
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Runs `op` on every object under `prefix`, listed a page at a time,
    /// at most [`RENAME_CONCURRENCY`] at once. Logs and returns the first
    /// failure, after the page it happened in; returns how many objects
    /// there were.
    async fn for_each_object<'a, F, Fut>(
        &self,
        mount: &'a MountPoint,
        prefix: &str,
        op_name: &str,
        op: F,
    ) -> Result<usize>
    where
        F: Fn(crate::store::ObjectMeta) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), StoreError>> + 'a,
    {
        use futures::StreamExt;
        let mut token = None;
        let mut count = 0;
        loop {
            let page = mount.store.list(prefix, false, token.take(), None).await.inspect_err(|e| {
                self.log_store_error("list", mount, prefix, e);
            })?;
            count += page.objects.len();
            let mut results = futures::stream::iter(page.objects)
                .map(|o| {
                    let key = o.key.clone();
                    let done = op(o);
                    async move { done.await.map_err(|e| (key, e)) }
                })
                .buffer_unordered(RENAME_CONCURRENCY);
            let mut first = None;
            while let Some(r) = results.next().await {
                if let Err((key, e)) = r {
                    self.log_store_error(op_name, mount, &key, &e);
                    first.get_or_insert(e);
                }
            }
            if let Some(e) = first {
                return Err(e.into());
            }
            match page.next {
                Some(t) => token = Some(t),
                None => return Ok(count),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn rename_dir(
        &self,
        mount: &Arc<MountPoint>,
        ino: u64,
        src_dir: &str,
        name: &str,
        newparent: u64,
        dst_dir: &str,
        newname: &str,
    ) -> Result<()> {
        let from = namespace::child_prefix(src_dir, name);
        let to = namespace::child_prefix(dst_dir, newname);
        if to.starts_with(&from) {
            return Err(FsError::Invalid);
        }
        // Not into a directory being renamed, and one that starts now
        // waits for this one; nor out of one (a rename of the directory
        // that starts once this is past the check copies what this one
        // moves too: a copy left behind, nothing lost).
        self.check_not_renaming(mount, &from)?;
        let _into = self.start_making(mount, &to)?;
        let _renaming = Registered::start(&self.renaming, &mount.source_id, &from);
        self.wait_until_not_written(mount, &from).await?;
        // Page by page, copy everything under the old prefix; only once all
        // is copied, list it again and delete it page by page. A failed copy
        // leaves the source whole; memory and requests in flight stay
        // bounded by a page and RENAME_CONCURRENCY, whatever the tree's size.
        let (from_s, to_s) = (from.as_str(), to.as_str());
        let posix = self.settings.posix_metadata;
        let copied = self
            .for_each_object(mount, from_s, "copy", move |o| async move {
                let target = format!("{to_s}{}", &o.key[from_s.len()..]);
                if o.key.ends_with('/') && o.size == 0 {
                    // A directory marker: writing a new one is cheaper than a
                    // copy, and some servers cannot copy markers. With
                    // --posix-metadata it carries the directory's metadata.
                    let attrs = if posix { mount.store.head_attrs(&o.key).await?.1 } else { Default::default() };
                    mount.store.put_with(&target, bytes::Bytes::new(), PutCondition::None, &attrs).await.map(|_| ())
                } else if o.size <= MAX_COPY {
                    mount.store.copy(&o.key, &target, None).await.map(|_| ())
                } else {
                    self.multipart_copy(mount, &o.key, &target, o.size, None).await.map(|_| ())
                }
            })
            .await?;
        if copied == 0 {
            mount.store.put(&to, bytes::Bytes::new(), PutCondition::None).await?;
        }
        self.for_each_object(mount, from_s, "delete", move |o| async move {
            match mount.store.delete(&o.key).await {
                Err(StoreError::NotFound) | Ok(()) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await?;
        info!("renamed {copied} objects from {from} to {to}");
        let parent = lock(&self.inodes).get(ino).map(|i| i.parent).unwrap_or_default();
        self.forget_name(parent, name);
        self.forget_name(newparent, newname);
        self.note_dir(newparent, newname);
        let mut table = lock(&self.inodes);
        table.rekey(mount, &from, &to);
        table.relink(ino, newparent, newname);
        Ok(())
    }
}
