//! Writes: streaming multipart uploads for new files written in order, and a
//! local staging file for everything else. Nothing is acknowledged as durable
//! before it is in S3: `flush` (close) and `fsync` upload and return the
//! upload's error. A failed upload loses nothing that is still here: a
//! staging file, or the buffer of a file sent as one PutObject, stays, and
//! the next flush, fsync or last close sends it again. Only a multipart
//! stream that failed is gone (its parts were sent and their bytes
//! dropped); every later upload of it reports the failure.
//!
//! A [`Writer`] belongs to an inode while any handle has it open for writing.
//! It starts in one of two modes:
//!
//! - **Streaming** (a new or truncated file): bytes collect in a memory
//!   buffer; every full part goes out as UploadPart while the application
//!   keeps writing, at most [`MAX_INFLIGHT_PARTS`] at a time. A file that
//!   ends under one part is a single PutObject. Part sizes grow
//!   ([`part_size`]) so a 5 TiB file fits in 10,000 parts. Buffers are
//!   counted in the shared memory budget.
//! - **Staged** (anything else): a sparse temp file in the cache directory
//!   holds the file's bytes at their offsets. When the file started as an
//!   existing object and has only been appended to, bytes before
//!   `base_prefix` are never downloaded: the upload reuses them with
//!   UploadPartCopy and sends only the new tail. Any write, read or truncate
//!   below `base_prefix` first downloads the object ("materialises" it).
//!
//! A staged file can also be made **local** ([`Writer::make_local`]): the
//! whole object is downloaded into the staging file, which then holds the
//! file's truth. That is what lets the kernel write the file itself (FUSE
//! passthrough, see [`crate::passthrough`]): bucketfs no longer sees the
//! writes, so a local writer reads its size from the file, and learns that
//! it changed from the file's mtime. The mtime is set to a fixed old time
//! ([`UNCHANGED`]) whenever the file matches S3 (after the download, before
//! each upload reads it); any write after that sets it to the present, so a
//! write is never missed, whatever the timestamp granularity.
//!
//! A write that does not continue a streaming file (a seek back, a read, a
//! truncate) turns it into a staged file: in memory only, the buffer moves to
//! the temp file; if parts were already sent, the upload is completed and the
//! new object becomes the base of an append-mode staged file.
//!
//! Memory and uploads free themselves. The streaming buffer and every part
//! in flight hold a [`Reservation`] of the shared budget, given back when
//! the buffer or the part's task is dropped, whatever the path (success,
//! error, abort, a dropped writer). A buffer that cannot grow waits up to
//! [`ADMISSION_PATIENCE`] for room, then the write fails with `ENOBUFS`. A
//! multipart upload is an [`Upload`] value: completed, or aborted by its
//! `Drop`. Staging-file I/O runs on tokio's blocking pool, never on the
//! threads that answer FUSE requests.
//!
//! Uploads carry `If-Match` (the ETag the content started from) or
//! `If-None-Match: *` (a file we created), so a concurrent change by another
//! client is an error, not a silent overwrite. Servers that do not implement
//! conditional writes get unconditional ones, with one warning.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;
use tracing::warn;

use super::cache::{BlockCache, Reservation, ReservationKind};
use super::posix::content_type_for;
use crate::store::{CompletedPart, ObjectAttrs, ObjectStore, PutCondition, StoreError, collect_body};

/// Largest object written with one PutObject.
pub const SINGLE_PUT_MAX: u64 = 8 << 20;
/// S3's smallest part (every part but the last).
pub const MIN_PART: u64 = 5 << 20;
/// S3's largest single copy (CopyObject and each UploadPartCopy).
pub const MAX_COPY: u64 = 5 << 30;
/// Parts in flight per writing handle: enough to keep a link busy, few
/// enough that 47 writers fit in the default 512 MiB budget.
pub const MAX_INFLIGHT_PARTS: usize = 4;
/// Range size used when materialising a base object into the staging file.
const DOWNLOAD_CHUNK: u64 = 8 << 20;
/// How long a write waits for room in the memory budget before it fails
/// with `ENOBUFS`: long enough for parts in flight elsewhere to finish on a
/// slow link, short enough that an application sees an error, not a hang.
pub const ADMISSION_PATIENCE: Duration = Duration::from_secs(10);
/// A streaming buffer grows its reservation by doubling from this size, so
/// a small file takes little of the budget and a large one few steps.
const FIRST_BUFFER_RESERVATION: u64 = 64 << 10;

/// The mtime of a local staging file whose bytes are what S3 has (see the
/// module documentation): any write moves it to the present.
const UNCHANGED: std::time::SystemTime = std::time::UNIX_EPOCH;

/// How much a streaming buffer's reservation of `held` bytes grows to hold
/// `need`: doubling from [`FIRST_BUFFER_RESERVATION`], at most a part at a
/// time, and at least what is missing.
fn grow_by(held: u64, need: u64, next_part: i32) -> u64 {
    (need - held).max(held.clamp(FIRST_BUFFER_RESERVATION, part_size(next_part)))
}

/// Part size for part number `n` (1-based): 8 MiB for the first 1,000 parts
/// (7.8 GiB), 128 MiB for the next 1,000 (125 GiB), then 640 MiB, which
/// reaches 5 TiB within S3's 10,000 parts.
pub fn part_size(n: i32) -> u64 {
    match n {
        ..=1000 => 8 << 20,
        1001..=2000 => 128 << 20,
        _ => 640 << 20,
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WriteError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("local staging file: {message}")]
    Local { errno: i32, message: String },
    #[error("an earlier upload of this file failed and its data is lost; reopen and write it again")]
    Failed,
}

fn local(e: std::io::Error) -> WriteError {
    WriteError::Local { errno: e.raw_os_error().unwrap_or(libc::EIO), message: e.to_string() }
}

fn no_room(cache: &BlockCache, n: u64) -> WriteError {
    WriteError::Local {
        errno: libc::ENOBUFS,
        message: format!(
            "the memory budget (--memory-limit, {} MiB) had no room for {} KiB more of write buffers within {} s; \
             fewer files written at once, or a larger --memory-limit, avoids this",
            cache.limit() >> 20,
            n.div_ceil(1024),
            ADMISSION_PATIENCE.as_secs()
        ),
    }
}

/// Runs `op` on the staging file on tokio's blocking pool.
async fn on_file<T: Send + 'static>(
    file: &Arc<std::fs::File>,
    op: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
) -> Result<T, WriteError> {
    let file = file.clone();
    match tokio::task::spawn_blocking(move || op(&file)).await {
        Ok(r) => r.map_err(local),
        Err(e) => Err(WriteError::Local { errno: libc::EIO, message: format!("staging file I/O task failed: {e}") }),
    }
}

/// Stops every task of a failed upload and waits until they have ended, so
/// their reservations are back and no part is still on its way when the
/// upload is aborted (S3 may keep a part that lands after the abort).
pub async fn stop_all<T: 'static>(tasks: &mut JoinSet<T>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Copies bytes `0..len` of `from` to the same offsets of `to`, in the
/// kernel (copy_file_range), falling back to reads and writes.
fn copy_range(from: &std::fs::File, to: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0u64;
    while done < len {
        let (mut off_in, mut off_out) = (done as i64, done as i64);
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the call; the offsets are
        // ours and the kernel only reads and writes the files.
        let n = unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, chunk, 0) };
        match n {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cache file shorter than the object",
                ));
            }
            n if n > 0 => done += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Not offered between these files: plain reads and writes.
                let mut buf = vec![0u8; 1 << 20];
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    from.read_exact_at(&mut buf[..n], done)?;
                    to.write_all_at(&buf[..n], done)?;
                    done += n as u64;
                }
            }
        }
    }
    Ok(())
}

/// A new staging file of `size` bytes (sparse).
async fn new_staging_file(dir: &Path, size: u64) -> Result<Arc<std::fs::File>, WriteError> {
    let dir = dir.to_path_buf();
    let file = tokio::task::spawn_blocking(move || {
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(size)?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| WriteError::Local { errno: libc::EIO, message: format!("staging file task failed: {e}") })?
    .map_err(local)?;
    Ok(Arc::new(file))
}

/// A multipart upload in progress. It ends one way or the other: completed
/// ([`Upload::completed`]), aborted ([`Upload::abort`]), or, if the value is
/// dropped first (a dropped or unlinked writer, a failed or cancelled task),
/// aborted in the background by `Drop`. No path leaves it open for the
/// bucket owner to pay for.
pub struct Upload {
    store: Arc<dyn ObjectStore>,
    key: String,
    id: String,
    ended: bool,
    /// The Content-Type and user metadata the completed object carries
    /// (boxed: a writer holds an `Option<Upload>` while streaming).
    attrs: Box<ObjectAttrs>,
    /// The runtime it was started on: a drop on a thread outside it (a
    /// FUSE thread dropping the last reference) still aborts it there.
    rt: Option<tokio::runtime::Handle>,
}

impl Upload {
    pub async fn create(store: &Arc<dyn ObjectStore>, key: &str) -> Result<Self, StoreError> {
        Self::create_with(store, key, ObjectAttrs::default()).await
    }

    /// An upload whose object gets `attrs`.
    pub async fn create_with(store: &Arc<dyn ObjectStore>, key: &str, attrs: ObjectAttrs) -> Result<Self, StoreError> {
        let id = store.create_multipart_with(key, &attrs).await?;
        crate::metrics::metrics().multipart_open.inc();
        let rt = tokio::runtime::Handle::try_current().ok();
        Ok(Self { store: store.clone(), key: key.to_string(), id, ended: false, attrs: Box::new(attrs), rt })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn end(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            crate::metrics::metrics().multipart_open.dec();
        }
    }

    /// The upload was completed: nothing to abort.
    pub fn completed(mut self) {
        self.end();
    }

    /// Aborts the upload now, logging a failure to do so.
    pub async fn abort(mut self) {
        self.end();
        abort_logged(&*self.store, &self.key, &self.id).await;
    }
}

/// Tries an abort a few times (the server that failed the upload may be
/// failing for a moment), then leaves a log line naming the way out.
async fn abort_logged(store: &dyn ObjectStore, key: &str, id: &str) {
    const ATTEMPTS: u32 = 3;
    for attempt in 1..=ATTEMPTS {
        match store.abort_multipart(key, id).await {
            Ok(()) | Err(StoreError::NotFound) => return,
            Err(e) if attempt == ATTEMPTS => warn!(
                key,
                "aborting the multipart upload of {key} failed: {e}; `bucketfs check --abort-incomplete-uploads` removes it"
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await,
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.end();
        let (store, key, id) = (self.store.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current().ok().or_else(|| self.rt.clone()) {
            Some(rt) => {
                rt.spawn(async move { abort_logged(&*store, &key, &id).await });
            }
            None => warn!(key, "the multipart upload of {key} is left incomplete (no runtime to abort it)"),
        }
    }
}

/// The remote object the content started from.
#[derive(Clone, Debug)]
pub struct Base {
    pub etag: String,
    pub size: u64,
}

struct Streaming {
    upload: Option<Upload>,
    parts: Vec<CompletedPart>,
    next_part: i32,
    buf: BytesMut,
    /// Budget bytes for `buf` (at least its length).
    held: Reservation,
    inflight: JoinSet<Result<CompletedPart, StoreError>>,
}

struct Staged {
    file: Arc<std::fs::File>,
    /// Bytes `[0, base_prefix)` are the base object's and are not local.
    base_prefix: u64,
}

enum Mode {
    Streaming(Box<Streaming>),
    Staged(Staged),
    /// The content is the base object, and nothing is local: what a
    /// staged writer with an untouched staging file would be. The file is
    /// made when something needs it ([`Writer::make_staged`]), so a file written
    /// once and closed never makes one.
    Uploaded,
    Failed,
}

/// See the module documentation.
pub struct Writer {
    store: Arc<dyn ObjectStore>,
    key: String,
    cache: Arc<BlockCache>,
    staging_dir: std::path::PathBuf,
    mode: Mode,
    size: u64,
    dirty: bool,
    base: Option<Base>,
    /// Created by us and never uploaded: the first upload uses If-None-Match.
    new_file: bool,
    /// The file was unlinked while open: nothing is uploaded any more.
    pub unlinked: bool,
    /// The staging file holds every byte and may be written by the kernel:
    /// size and changes are read from it.
    local: bool,
    /// What uploads give the object: Content-Type (from the file name) and
    /// user metadata (POSIX attributes, when they are stored).
    attrs: ObjectAttrs,
    /// What the last upload gave the object. A multipart upload takes its
    /// attributes when it starts, so they may be older than `attrs`.
    uploaded_attrs: Option<ObjectAttrs>,
}

impl Writer {
    /// A new (or truncated) file, streamed if written in order.
    pub fn streaming(
        store: Arc<dyn ObjectStore>,
        key: String,
        cache: Arc<BlockCache>,
        staging_dir: &Path,
        base: Option<Base>,
    ) -> Self {
        let new_file = base.is_none();
        let held_by = cache.clone();
        Self {
            store,
            key: key.clone(),
            cache,
            staging_dir: staging_dir.to_path_buf(),
            mode: Mode::Streaming(Box::new(Streaming {
                upload: None,
                parts: Vec::new(),
                next_part: 1,
                buf: BytesMut::new(),
                held: Reservation::empty(&held_by, ReservationKind::WriteBuffer),
                inflight: JoinSet::new(),
            })),
            size: 0,
            // A truncation of an existing object must be uploaded even if
            // nothing is written; a new file is created at close.
            dirty: !new_file,
            base,
            new_file,
            unlinked: false,
            local: false,
            attrs: ObjectAttrs::typed(content_type_for(&key)),
            uploaded_attrs: None,
        }
    }

    /// An existing object (or a new empty file) edited in place.
    pub async fn staged(
        store: Arc<dyn ObjectStore>,
        key: String,
        cache: Arc<BlockCache>,
        staging_dir: &Path,
        base: Option<Base>,
    ) -> Result<Self, WriteError> {
        let size = base.as_ref().map_or(0, |b| b.size);
        let file = new_staging_file(staging_dir, size).await?;
        Ok(Self {
            store,
            new_file: base.is_none(),
            attrs: ObjectAttrs::typed(content_type_for(&key)),
            uploaded_attrs: None,
            key,
            cache,
            staging_dir: staging_dir.to_path_buf(),
            mode: Mode::Staged(Staged { file, base_prefix: size }),
            size,
            dirty: false,
            base,
            unlinked: false,
            local: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.local_state().map_or(self.size, |(size, _)| size)
    }

    /// Written, truncated or otherwise changed since the last upload.
    pub fn has_changes(&self) -> bool {
        self.changed() && !self.unlinked
    }

    /// The file's times were set while open. A new file nobody wrote to is
    /// made at the next close by its opener, rather than at release (which
    /// waits for a shell's `> file`, closed once before it is written).
    pub fn times_set(&mut self) {
        if self.new_file && !self.unlinked {
            self.dirty = true;
        }
    }

    /// A new file that no upload has made (and that is not unlinked).
    pub fn never_made(&self) -> bool {
        self.new_file && !self.unlinked
    }

    /// Has content S3 does not have yet, counting a new, still empty file.
    pub fn is_dirty(&self) -> bool {
        self.changed() || self.never_made()
    }

    fn changed(&self) -> bool {
        self.dirty || self.local_state().is_some_and(|(_, written)| written)
    }

    /// A local staging file's size, and whether it was written since it last
    /// matched S3.
    fn local_state(&self) -> Option<(u64, bool)> {
        let Mode::Staged(st) = &self.mode else { return None };
        if !self.local {
            return None;
        }
        let meta = st.file.metadata().ok()?;
        Some((meta.len(), meta.modified().ok() != Some(UNCHANGED)))
    }

    /// Takes what the kernel wrote into a local staging file into account.
    fn sync_local(&mut self) {
        if let Some((size, written)) = self.local_state() {
            self.size = size;
            self.dirty |= written;
        }
    }

    /// Holds a staging file (staged, not just uploaded).
    pub fn has_staging_file(&self) -> bool {
        matches!(self.mode, Mode::Staged(_))
    }

    /// The staging file of a local writer (see the module documentation).
    pub fn local_file(&self) -> Option<Arc<std::fs::File>> {
        match &self.mode {
            Mode::Staged(st) if self.local => Some(st.file.clone()),
            _ => None,
        }
    }

    /// Makes a staged writer local: downloads what of the object is not in
    /// the staging file yet, and returns the file, which holds every byte of
    /// the file from now on. `None` for a streaming writer (a new or
    /// truncated file written in order uploads as it goes), or when more
    /// than `max` bytes would be downloaded.
    ///
    /// `cached` is a local file holding a whole object version with its
    /// ETag (the disk cache's checked copy): when it is the version this
    /// writer started from, the bytes are copied from it instead of
    /// downloaded, whatever their size.
    pub async fn make_local(
        &mut self,
        max: u64,
        cached: Option<(String, Arc<std::fs::File>)>,
    ) -> Result<Option<Arc<std::fs::File>>, WriteError> {
        if self.local {
            return Ok(self.local_file());
        }
        if self.unlinked {
            return Ok(None);
        }
        self.make_staged().await?;
        let Mode::Staged(st) = &mut self.mode else { return Ok(None) };
        let base_etag = self.base.as_ref().map(|b| b.etag.as_str());
        let cached = cached.filter(|(etag, _)| Some(etag.as_str()) == base_etag).map(|(_, file)| file);
        match cached {
            Some(from) if st.base_prefix > 0 => {
                let len = st.base_prefix;
                on_file(&st.file, move |to| copy_range(&from, to, len)).await?;
                st.base_prefix = 0;
            }
            _ if st.base_prefix > max => return Ok(None),
            _ => self.materialise_all().await?,
        }
        let Mode::Staged(st) = &self.mode else { return Err(WriteError::Failed) };
        let file = st.file.clone();
        on_file(&file, |f| f.set_modified(UNCHANGED)).await?;
        self.local = true;
        Ok(Some(file))
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The object is renamed: later uploads go to `key`, with the
    /// Content-Type of its name.
    pub fn set_key(&mut self, key: String) {
        self.attrs.content_type = content_type_for(&key);
        self.key = key;
    }

    /// What the next upload gives the object (Content-Type, user metadata).
    pub fn set_attrs(&mut self, attrs: ObjectAttrs) {
        self.attrs = attrs;
    }

    pub fn attrs(&self) -> &ObjectAttrs {
        &self.attrs
    }

    /// What the last upload gave the object, if there was one.
    pub fn uploaded_attrs(&self) -> Option<&ObjectAttrs> {
        self.uploaded_attrs.as_ref()
    }

    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    /// The base object was copied (onto itself for new metadata, or to a
    /// new key by a rename) and has ETag `etag` now, with the same bytes: the
    /// next upload's If-Match must name it.
    pub fn base_copied(&mut self, etag: &str) {
        if let Some(base) = &mut self.base {
            base.etag = etag.to_string();
        }
    }

    /// Grows the streaming buffer's reservation to hold `n` more bytes:
    /// doubling, up to a part; when the budget is full, by waiting for a
    /// part of this writer's own in flight first, then for anyone's bytes,
    /// at most [`ADMISSION_PATIENCE`].
    async fn make_room(&mut self, n: u64) -> Result<(), WriteError> {
        loop {
            let Mode::Streaming(s) = &mut self.mode else { return Ok(()) };
            let need = s.buf.len() as u64 + n;
            let held = s.held.bytes();
            if held >= need {
                return Ok(());
            }
            let want = grow_by(held, need, s.next_part);
            if let Some(r) = self.cache.try_reserve_memory(ReservationKind::WriteBuffer, want) {
                s.held.absorb(r);
                continue;
            }
            if !s.inflight.is_empty() {
                self.join_one().await?;
                continue;
            }
            match self.cache.reserve_memory_within(ReservationKind::WriteBuffer, want, ADMISSION_PATIENCE).await {
                Some(r) => {
                    if let Mode::Streaming(s) = &mut self.mode {
                        s.held.absorb(r);
                    }
                }
                None => return Err(no_room(&self.cache, want)),
            }
        }
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        if data.is_empty() {
            // POSIX: writing nothing does not extend the file.
            return Ok(());
        }
        self.sync_local();
        let end = offset + data.len() as u64;
        if self.unlinked && matches!(self.mode, Mode::Failed) {
            // Unlinked while streaming: its upload was abandoned, and what
            // is written now goes nowhere.
            self.size = self.size.max(end);
            return Ok(());
        }
        if let Mode::Streaming(_) = &self.mode {
            if offset == self.size {
                self.make_room(data.len() as u64).await?;
                let Mode::Streaming(s) = &mut self.mode else { return Err(WriteError::Failed) };
                s.buf.extend_from_slice(data);
                self.size += data.len() as u64;
                self.dirty = true;
                return self.send_full_parts().await;
            }
            self.switch_to_staging().await?;
        }
        self.make_staged().await?;
        self.materialise_below(offset.min(self.size)).await?;
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        let data = Bytes::copy_from_slice(data);
        on_file(&st.file, move |f| f.write_all_at(&data, offset)).await?;
        self.size = self.size.max(end);
        self.dirty = true;
        Ok(())
    }

    /// [`Self::write`] when it is a copy into memory: the file streams,
    /// `offset` continues it, and the buffer has room for `data` without
    /// filling a part. False (nothing done) otherwise.
    pub fn write_now(&mut self, offset: u64, data: &[u8]) -> bool {
        let Mode::Streaming(s) = &mut self.mode else { return false };
        let need = s.buf.len() as u64 + data.len() as u64;
        if data.is_empty() || offset != self.size || need >= part_size(s.next_part) {
            return false;
        }
        let held = s.held.bytes();
        if held < need {
            match self.cache.try_reserve_memory(ReservationKind::WriteBuffer, grow_by(held, need, s.next_part)) {
                Some(r) => s.held.absorb(r),
                None => return false,
            }
        }
        s.buf.extend_from_slice(data);
        self.size += data.len() as u64;
        self.dirty = true;
        true
    }

    /// The file was unlinked: nothing will be uploaded. A multipart upload
    /// already started is aborted now rather than at the last close.
    pub async fn unlink(&mut self) {
        self.unlinked = true;
        if matches!(&self.mode, Mode::Streaming(s) if s.upload.is_some()) {
            let _ = self.fail(StoreError::NotFound).await;
        }
    }

    /// Sends every complete part in the buffer, keeping at most
    /// [`MAX_INFLIGHT_PARTS`] in flight.
    async fn send_full_parts(&mut self) -> Result<(), WriteError> {
        loop {
            let Mode::Streaming(s) = &mut self.mode else {
                return Ok(());
            };
            let want = part_size(s.next_part);
            if (s.buf.len() as u64) < want {
                return Ok(());
            }
            if s.upload.is_none() && self.unlinked {
                // Unlinked before a part went out: nothing will be uploaded,
                // so the bytes go to a staging file (readable, not sent).
                return self.switch_to_staging().await;
            }
            if s.upload.is_none() {
                match Upload::create_with(&self.store, &self.key, self.attrs.clone()).await {
                    Ok(u) => s.upload = Some(u),
                    Err(e) => return Err(self.fail(e).await),
                }
            }
            let Mode::Streaming(s) = &mut self.mode else {
                return Ok(());
            };
            let body = s.buf.split_to(want as usize).freeze();
            let number = s.next_part;
            s.next_part += 1;
            let id = s.upload.as_ref().map(|u| u.id().to_string()).unwrap_or_default();
            let (store, key) = (self.store.clone(), self.key.clone());
            // The part's bytes go with its task and come back when it ends.
            let held = s.held.split(want, ReservationKind::UploadPart);
            s.inflight.spawn(async move {
                let _held = held;
                store.upload_part(&key, &id, number, body).await
            });
            while matches!(&self.mode, Mode::Streaming(s) if s.inflight.len() >= MAX_INFLIGHT_PARTS) {
                self.join_one().await?;
            }
        }
    }

    async fn join_one(&mut self) -> Result<(), WriteError> {
        let Mode::Streaming(s) = &mut self.mode else {
            return Ok(());
        };
        match s.inflight.join_next().await {
            Some(Ok(Ok(part))) => {
                s.parts.push(part);
                Ok(())
            }
            Some(Ok(Err(e))) => Err(self.fail(e).await),
            Some(Err(join)) => Err(self.fail(StoreError::Network(format!("upload task failed: {join}"))).await),
            None => Ok(()),
        }
    }

    /// Abandons a streaming upload after an error; its data cannot be resent.
    /// Its buffer's and parts' bytes go back to the budget as they drop.
    async fn fail(&mut self, e: StoreError) -> WriteError {
        if let Mode::Streaming(mut s) = std::mem::replace(&mut self.mode, Mode::Failed) {
            s.inflight.abort_all();
            while s.inflight.join_next().await.is_some() {}
            if let Some(upload) = s.upload.take() {
                upload.abort().await;
            }
        }
        WriteError::Store(e)
    }

    /// The condition this writer's uploads want (see
    /// [`crate::store::with_condition`] for servers that refuse it).
    fn condition(&self) -> PutCondition {
        match (&self.base, self.new_file) {
            (Some(b), _) if !b.etag.is_empty() => PutCondition::IfMatch(b.etag.clone()),
            (None, true) => PutCondition::IfAbsent,
            _ => PutCondition::None,
        }
    }

    /// Runs an upload step with this writer's condition.
    async fn conditional<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(PutCondition) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        crate::store::with_condition(&*self.store, self.condition(), f).await
    }

    /// Makes the current content the object in S3. Does nothing when there
    /// is nothing new. On success the writer continues as an append-mode
    /// staged file on top of the new object.
    pub async fn upload(&mut self) -> Result<(), WriteError> {
        self.sync_local();
        if self.unlinked || !self.is_dirty() {
            return Ok(());
        }
        if let (true, Mode::Staged(st)) = (self.local, &self.mode) {
            // Marked unchanged before it is read: a write from now on, even
            // one the upload reads, leaves the file changed for the next.
            on_file(&st.file, |f| f.set_modified(UNCHANGED)).await?;
        }
        tracing::debug!(key = %self.key, size = self.size, condition = ?self.condition(), "uploading");
        self.make_staged().await?;
        let etag = match std::mem::replace(&mut self.mode, Mode::Failed) {
            Mode::Failed => return Err(WriteError::Failed),
            // Not reached (made staged above); it would have nothing to send.
            Mode::Uploaded => {
                self.mode = Mode::Uploaded;
                return Ok(());
            }
            Mode::Streaming(s) => self.finish_streaming(s).await?,
            Mode::Staged(st) => {
                self.mode = Mode::Staged(st);
                // A base too small to copy as a part is downloaded instead.
                self.materialise_below(self.size).await?;
                let Mode::Staged(st) = std::mem::replace(&mut self.mode, Mode::Failed) else {
                    return Err(WriteError::Failed);
                };
                let result = self.upload_staged(&st).await;
                self.mode = Mode::Staged(st);
                result?
            }
        };
        self.base = Some(Base { etag, size: self.size });
        self.new_file = false;
        self.dirty = false;
        if matches!(self.mode, Mode::Failed) {
            // Streaming finished: later writes append to the new object.
            self.mode = Mode::Uploaded;
        }
        Ok(())
    }

    /// Gives an [`Mode::Uploaded`] writer its staging file, holding none of
    /// the base's bytes yet.
    async fn make_staged(&mut self) -> Result<(), WriteError> {
        if let Mode::Uploaded = self.mode {
            let file = new_staging_file(&self.staging_dir, self.size).await?;
            self.mode = Mode::Staged(Staged { file, base_prefix: self.size });
        }
        Ok(())
    }

    async fn finish_streaming(&mut self, mut s: Box<Streaming>) -> Result<String, WriteError> {
        while let Some(joined) = s.inflight.join_next().await {
            match joined {
                Ok(Ok(part)) => s.parts.push(part),
                Ok(Err(e)) => {
                    self.mode = Mode::Streaming(s);
                    return Err(self.fail(e).await);
                }
                Err(join) => {
                    self.mode = Mode::Streaming(s);
                    return Err(self.fail(StoreError::Network(format!("upload task failed: {join}"))).await);
                }
            }
        }
        let rest = s.buf.split().freeze();
        let result = match s.upload.take() {
            None => {
                let key = self.key.clone();
                self.uploaded_attrs = Some(self.attrs.clone());
                let put = self.conditional(|c| self.store.put_with(&key, rest.clone(), c, &self.attrs)).await;
                if put.is_err() {
                    // The whole file is still in this buffer: it stays, so
                    // the next flush, fsync or last close tries again.
                    s.buf = rest.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                    self.mode = Mode::Streaming(s);
                    return put.map_err(WriteError::Store);
                }
                put
            }
            Some(upload) => {
                let mut parts = std::mem::take(&mut s.parts);
                if !rest.is_empty() {
                    match self.store.upload_part(&self.key, upload.id(), s.next_part, rest).await {
                        Ok(p) => parts.push(p),
                        Err(e) => {
                            s.upload = Some(upload);
                            self.mode = Mode::Streaming(s);
                            return Err(self.fail(e).await);
                        }
                    }
                }
                self.complete(upload, parts).await
            }
        };
        // `s`, with the buffer's reservation, drops here.
        result.map_err(WriteError::Store)
    }

    /// CompleteMultipartUpload under the writer's condition; the upload is
    /// aborted if that fails.
    async fn complete(&mut self, upload: Upload, mut parts: Vec<CompletedPart>) -> Result<String, StoreError> {
        parts.sort_by_key(|p| p.number);
        self.uploaded_attrs = Some((*upload.attrs).clone());
        let key = self.key.clone();
        let r = self.conditional(|c| self.store.complete_multipart(&key, upload.id(), parts.clone(), c)).await;
        match r {
            Ok(_) => upload.completed(),
            Err(_) => upload.abort().await,
        }
        r
    }

    async fn upload_staged(&mut self, st: &Staged) -> Result<String, WriteError> {
        let key = self.key.clone();
        if st.base_prefix == 0 && self.size <= SINGLE_PUT_MAX {
            let (_held, body) = self.read_part(st, 0, self.size, None).await?;
            self.uploaded_attrs = Some(self.attrs.clone());
            return Ok(self.conditional(|c| self.store.put_with(&key, body.clone(), c, &self.attrs)).await?);
        }
        let upload = Upload::create_with(&self.store, &key, self.attrs.clone()).await?;
        match self.staged_parts(st, upload.id()).await {
            Ok(parts) => Ok(self.complete(upload, parts).await?),
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    /// Bytes `offset..offset + len` of the staging file, with their
    /// reservation; waits for room as [`Self::make_room`] does.
    /// `room` is a reservation already taken for it, if any.
    async fn read_part(
        &self,
        st: &Staged,
        offset: u64,
        len: u64,
        room: Option<Reservation>,
    ) -> Result<(Reservation, Bytes), WriteError> {
        let held = match room {
            Some(r) => r,
            None => self
                .cache
                .reserve_memory_within(ReservationKind::UploadPart, len, ADMISSION_PATIENCE)
                .await
                .ok_or_else(|| no_room(&self.cache, len))?,
        };
        let body = on_file(&st.file, move |f| {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await?;
        Ok((held, body))
    }

    /// Copy parts for the unchanged base prefix, then data parts from the
    /// staging file, at most [`MAX_INFLIGHT_PARTS`] at a time.
    async fn staged_parts(&self, st: &Staged, id: &str) -> Result<Vec<CompletedPart>, WriteError> {
        let mut tasks: JoinSet<Result<CompletedPart, WriteError>> = JoinSet::new();
        let parts = self.send_staged_parts(st, id, &mut tasks).await;
        if parts.is_err() {
            stop_all(&mut tasks).await;
        }
        parts
    }

    async fn send_staged_parts(
        &self,
        st: &Staged,
        id: &str,
        tasks: &mut JoinSet<Result<CompletedPart, WriteError>>,
    ) -> Result<Vec<CompletedPart>, WriteError> {
        let mut parts = Vec::new();
        let mut number = 1;
        let mut offset = 0;
        // Copy parts of equal size, each at most MAX_COPY, so none is below
        // MIN_PART (the base is at least MIN_PART).
        let copies = st.base_prefix.div_ceil(MAX_COPY).max(1);
        let copy_len = st.base_prefix.div_ceil(copies);
        while offset < st.base_prefix {
            let len = (st.base_prefix - offset).min(copy_len);
            let (store, key, id, from) = (self.store.clone(), self.key.clone(), id.to_string(), self.key.clone());
            let (start, n) = (offset, number);
            // Unconditional: the completion's If-Match on this very key fails
            // if the ranges came from another version than the base.
            tasks
                .spawn(async move { Ok(store.upload_part_copy(&key, &id, n, &from, start, start + len, None).await?) });
            offset += len;
            number += 1;
            Self::drain(tasks, &mut parts, MAX_INFLIGHT_PARTS).await?;
        }
        while offset < self.size || number == 1 {
            let len = (self.size - offset).min(part_size(number));
            // Room for the part: this upload's own parts in flight go first.
            let mut room = self.cache.try_reserve_memory(ReservationKind::UploadPart, len);
            while room.is_none() && !tasks.is_empty() {
                let running = tasks.len();
                Self::drain(tasks, &mut parts, running).await?;
                room = self.cache.try_reserve_memory(ReservationKind::UploadPart, len);
            }
            let (held, body) = self.read_part(st, offset, len, room).await?;
            let (store, key, id, n) = (self.store.clone(), self.key.clone(), id.to_string(), number);
            tasks.spawn(async move {
                let _held = held;
                Ok(store.upload_part(&key, &id, n, body).await?)
            });
            offset += len;
            number += 1;
            Self::drain(tasks, &mut parts, MAX_INFLIGHT_PARTS).await?;
            if len == 0 {
                break;
            }
        }
        Self::drain(tasks, &mut parts, 1).await?;
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    async fn drain(
        tasks: &mut JoinSet<Result<CompletedPart, WriteError>>,
        parts: &mut Vec<CompletedPart>,
        below: usize,
    ) -> Result<(), WriteError> {
        while tasks.len() >= below {
            match tasks.join_next().await {
                Some(Ok(Ok(p))) => parts.push(p),
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => {
                    return Err(WriteError::Store(StoreError::Network(format!("upload task failed: {e}"))));
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Turns a streaming writer into a staged one (see the module docs).
    async fn switch_to_staging(&mut self) -> Result<(), WriteError> {
        let Mode::Streaming(s) = &mut self.mode else {
            return Ok(());
        };
        if s.upload.is_none() && s.inflight.is_empty() {
            let file = new_staging_file(&self.staging_dir, self.size).await?;
            let buf = std::mem::take(&mut s.buf).freeze();
            on_file(&file, move |f| f.write_all_at(&buf, 0)).await?;
            // The buffer's reservation goes with the streaming state.
            self.mode = Mode::Staged(Staged { file, base_prefix: 0 });
            return Ok(());
        }
        self.upload().await
    }

    /// Downloads the base object into the staging file if `offset` lies in
    /// the part that is still only remote.
    async fn materialise_below(&mut self, offset: u64) -> Result<(), WriteError> {
        let Mode::Staged(st) = &mut self.mode else {
            return Ok(());
        };
        if st.base_prefix == 0 || (offset >= st.base_prefix && st.base_prefix >= MIN_PART) {
            return Ok(());
        }
        self.materialise_all().await
    }

    /// Downloads what of the base object is not in the staging file.
    async fn materialise_all(&mut self) -> Result<(), WriteError> {
        let Mode::Staged(st) = &mut self.mode else {
            return Ok(());
        };
        if st.base_prefix == 0 {
            return Ok(());
        }
        let etag = self.base.as_ref().map(|b| b.etag.clone());
        let held = self.cache.reserve_memory(ReservationKind::WriteBuffer, DOWNLOAD_CHUNK.min(st.base_prefix));
        let mut start = 0;
        while start < st.base_prefix {
            let end = (start + DOWNLOAD_CHUNK).min(st.base_prefix);
            let body = self.store.get_range(&self.key, etag.as_deref(), start, end).await?;
            let data = collect_body(body).await?;
            on_file(&st.file, move |f| f.write_all_at(&data, start)).await?;
            start = end;
        }
        st.base_prefix = 0;
        drop(held);
        Ok(())
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Bytes, WriteError> {
        self.sync_local();
        if offset >= self.size {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(self.size);
        if let Mode::Streaming(s) = &self.mode {
            if s.upload.is_none() {
                return Ok(Bytes::copy_from_slice(&s.buf[offset as usize..end as usize]));
            }
            self.switch_to_staging().await?;
        }
        self.make_staged().await?;
        let etag = self.base.as_ref().map(|b| b.etag.clone());
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        let remote = if offset < st.base_prefix {
            let remote_end = end.min(st.base_prefix);
            collect_body(self.store.get_range(&self.key, etag.as_deref(), offset, remote_end).await?).await?
        } else {
            Bytes::new()
        };
        let local_start = offset.max(st.base_prefix);
        let out = on_file(&st.file, move |f| {
            let mut out = vec![0u8; (end - offset) as usize];
            out[..remote.len()].copy_from_slice(&remote);
            if local_start < end {
                let at = (local_start - offset) as usize;
                f.read_exact_at(&mut out[at..], local_start)?;
            }
            Ok(out)
        })
        .await?;
        Ok(Bytes::from(out))
    }

    pub async fn truncate(&mut self, size: u64) -> Result<(), WriteError> {
        self.sync_local();
        if size == self.size && !matches!(self.mode, Mode::Failed) {
            return Ok(());
        }
        if matches!(self.mode, Mode::Streaming(_)) {
            if size == 0 {
                // Truncating an unsent stream to zero is the O_TRUNC pattern.
                if let Mode::Streaming(s) = &mut self.mode
                    && s.upload.is_none()
                {
                    s.buf.clear();
                    let held = s.held.bytes();
                    s.held.shrink(held);
                    self.size = 0;
                    self.dirty = true;
                    return Ok(());
                }
            }
            self.switch_to_staging().await?;
        }
        self.make_staged().await?;
        // Only the base's first `size` bytes stay, so only they are kept:
        // none at 0 (`O_TRUNC` on a read-write open), a copy part of them
        // from `MIN_PART` up, a download of them below (`materialise_below`).
        // Never the whole object.
        if let Mode::Staged(st) = &mut self.mode {
            st.base_prefix = st.base_prefix.min(size);
        }
        self.materialise_below(size.min(self.size)).await?;
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        on_file(&st.file, move |f| f.set_len(size)).await?;
        self.size = size;
        self.dirty = true;
        Ok(())
    }
}
