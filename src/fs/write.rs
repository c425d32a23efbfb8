//! Writes: streaming multipart uploads for new files written in order, and a
//! local staging file for everything else. Nothing is acknowledged as durable
//! before it is in S3: `flush` (close) and `fsync` upload and return the
//! upload's error.
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
//! A write that does not continue a streaming file (a seek back, a read, a
//! truncate) turns it into a staged file: in memory only, the buffer moves to
//! the temp file; if parts were already sent, the upload is completed and the
//! new object becomes the base of an append-mode staged file.
//!
//! Uploads carry `If-Match` (the ETag the content started from) or
//! `If-None-Match: *` (a file we created), so a concurrent change by another
//! client is an error, not a silent overwrite. Servers that do not implement
//! conditional writes get unconditional ones, with one warning.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;
use tracing::warn;

use super::cache::BlockCache;
use crate::store::{CompletedPart, ObjectStore, PutCondition, StoreError, collect_body};

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

/// Warned once per process that conditional writes are not supported.
static NO_CONDITIONAL: AtomicBool = AtomicBool::new(false);

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

/// The remote object the content started from.
#[derive(Clone, Debug)]
pub struct Base {
    pub etag: String,
    pub size: u64,
}

struct Streaming {
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    next_part: i32,
    buf: BytesMut,
    inflight: JoinSet<Result<CompletedPart, StoreError>>,
}

struct Staged {
    file: std::fs::File,
    /// Bytes `[0, base_prefix)` are the base object's and are not local.
    base_prefix: u64,
}

enum Mode {
    Streaming(Streaming),
    Staged(Staged),
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
    /// Memory reserved in the budget for the streaming buffer and parts.
    reserved: u64,
    /// The file was unlinked while open: nothing is uploaded any more.
    pub unlinked: bool,
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
        Self {
            store,
            key,
            cache,
            staging_dir: staging_dir.to_path_buf(),
            mode: Mode::Streaming(Streaming {
                upload_id: None,
                parts: Vec::new(),
                next_part: 1,
                buf: BytesMut::new(),
                inflight: JoinSet::new(),
            }),
            size: 0,
            // A truncation of an existing object must be uploaded even if
            // nothing is written; a new file is created at close.
            dirty: !new_file,
            base,
            new_file,
            reserved: 0,
            unlinked: false,
        }
    }

    /// An existing object (or a new empty file) edited in place.
    pub fn staged(
        store: Arc<dyn ObjectStore>,
        key: String,
        cache: Arc<BlockCache>,
        staging_dir: &Path,
        base: Option<Base>,
    ) -> Result<Self, WriteError> {
        let file = tempfile::tempfile_in(staging_dir).map_err(local)?;
        let size = base.as_ref().map_or(0, |b| b.size);
        file.set_len(size).map_err(local)?;
        Ok(Self {
            store,
            new_file: base.is_none(),
            key,
            cache,
            staging_dir: staging_dir.to_path_buf(),
            mode: Mode::Staged(Staged { file, base_prefix: size }),
            size,
            dirty: false,
            base,
            reserved: 0,
            unlinked: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Written, truncated or otherwise changed since the last upload.
    pub fn has_changes(&self) -> bool {
        self.dirty && !self.unlinked
    }

    /// Has content S3 does not have yet, counting a new, still empty file.
    pub fn is_dirty(&self) -> bool {
        self.dirty || (self.new_file && !self.unlinked)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn set_key(&mut self, key: String) {
        self.key = key;
    }

    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    fn reserve(&mut self, n: u64) {
        self.cache.reserve_extra(n);
        self.reserved += n;
    }

    fn unreserve(&mut self, n: u64) {
        let n = n.min(self.reserved);
        self.cache.release_extra(n);
        self.reserved -= n;
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        if data.is_empty() {
            // POSIX: writing nothing does not extend the file.
            return Ok(());
        }
        if let Mode::Streaming(s) = &mut self.mode {
            if offset == self.size {
                s.buf.extend_from_slice(data);
                self.size += data.len() as u64;
                self.dirty = true;
                self.reserve(data.len() as u64);
                return self.send_full_parts().await;
            }
            self.switch_to_staging().await?;
        }
        let end = offset + data.len() as u64;
        self.materialise_below(offset.min(self.size)).await?;
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        st.file.write_all_at(data, offset).map_err(local)?;
        self.size = self.size.max(end);
        self.dirty = true;
        Ok(())
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
            if s.upload_id.is_none() {
                match self.store.create_multipart(&self.key).await {
                    Ok(id) => s.upload_id = Some(id),
                    Err(e) => return Err(self.fail(e).await),
                }
            }
            let Mode::Streaming(s) = &mut self.mode else {
                return Ok(());
            };
            let body = s.buf.split_to(want as usize).freeze();
            let number = s.next_part;
            s.next_part += 1;
            let (store, key, id) = (self.store.clone(), self.key.clone(), s.upload_id.clone().unwrap_or_default());
            let cache = self.cache.clone();
            s.inflight.spawn(async move {
                let len = body.len() as u64;
                let r = store.upload_part(&key, &id, number, body).await;
                cache.release_extra(len);
                r
            });
            // The part's memory is released by its task.
            self.reserved = self.reserved.saturating_sub(want);
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
    async fn fail(&mut self, e: StoreError) -> WriteError {
        if let Mode::Streaming(s) = std::mem::replace(&mut self.mode, Mode::Failed) {
            let mut s = s;
            s.inflight.abort_all();
            while s.inflight.join_next().await.is_some() {}
            if let Some(id) = &s.upload_id
                && let Err(abort) = self.store.abort_multipart(&self.key, id).await
            {
                warn!(key = %self.key, "aborting the failed upload of {} also failed: {abort}", self.key);
            }
        }
        let r = self.reserved;
        self.unreserve(r);
        WriteError::Store(e)
    }

    fn condition(&self) -> PutCondition {
        if NO_CONDITIONAL.load(Ordering::Relaxed) {
            return PutCondition::None;
        }
        match (&self.base, self.new_file) {
            (Some(b), _) if !b.etag.is_empty() => PutCondition::IfMatch(b.etag.clone()),
            (None, true) => PutCondition::IfAbsent,
            _ => PutCondition::None,
        }
    }

    /// Runs an upload step with a condition, once more without it if the
    /// server does not implement conditional writes.
    async fn conditional<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(PutCondition) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let cond = self.condition();
        match f(cond.clone()).await {
            Err(StoreError::Server { status: 501, .. }) | Err(StoreError::Server { status: 400, .. })
                if cond != PutCondition::None =>
            {
                if !NO_CONDITIONAL.swap(true, Ordering::Relaxed) {
                    warn!(
                        "the server rejects conditional writes; concurrent changes by other clients will not be detected"
                    );
                }
                f(PutCondition::None).await
            }
            other => other,
        }
    }

    /// Makes the current content the object in S3. Does nothing when there
    /// is nothing new. On success the writer continues as an append-mode
    /// staged file on top of the new object.
    pub async fn upload(&mut self) -> Result<(), WriteError> {
        if self.unlinked || !self.is_dirty() {
            return Ok(());
        }
        tracing::debug!(key = %self.key, size = self.size, condition = ?self.condition(), "uploading");
        let etag = match std::mem::replace(&mut self.mode, Mode::Failed) {
            Mode::Failed => return Err(WriteError::Failed),
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
            let file = tempfile::tempfile_in(&self.staging_dir).map_err(local)?;
            file.set_len(self.size).map_err(local)?;
            self.mode = Mode::Staged(Staged { file, base_prefix: self.size });
        }
        Ok(())
    }

    async fn finish_streaming(&mut self, mut s: Streaming) -> Result<String, WriteError> {
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
        let rest_len = rest.len() as u64;
        let result = match &s.upload_id {
            None => {
                let key = self.key.clone();
                self.conditional(|c| self.store.put(&key, rest.clone(), c)).await
            }
            Some(id) => {
                let mut parts = std::mem::take(&mut s.parts);
                if !rest.is_empty() {
                    match self.store.upload_part(&self.key, id, s.next_part, rest).await {
                        Ok(p) => parts.push(p),
                        Err(e) => {
                            self.mode = Mode::Streaming(s);
                            return Err(self.fail(e).await);
                        }
                    }
                }
                parts.sort_by_key(|p| p.number);
                let (key, id) = (self.key.clone(), id.clone());
                let r = self.conditional(|c| self.store.complete_multipart(&key, &id, parts.clone(), c)).await;
                if r.is_err() {
                    let _ = self.store.abort_multipart(&key, &id).await;
                }
                r
            }
        };
        self.unreserve(rest_len);
        let r = self.reserved;
        self.unreserve(r);
        result.map_err(WriteError::Store)
    }

    async fn upload_staged(&self, st: &Staged) -> Result<String, WriteError> {
        let key = self.key.clone();
        if st.base_prefix == 0 && self.size <= SINGLE_PUT_MAX {
            let mut buf = vec![0u8; self.size as usize];
            st.file.read_exact_at(&mut buf, 0).map_err(local)?;
            let body = Bytes::from(buf);
            return Ok(self.conditional(|c| self.store.put(&key, body.clone(), c)).await?);
        }
        let id = self.store.create_multipart(&key).await?;
        match self.staged_parts(st, &id).await {
            Ok(parts) => {
                let r = self.conditional(|c| self.store.complete_multipart(&key, &id, parts.clone(), c)).await;
                if r.is_err() {
                    let _ = self.store.abort_multipart(&key, &id).await;
                }
                Ok(r?)
            }
            Err(e) => {
                let _ = self.store.abort_multipart(&key, &id).await;
                Err(e)
            }
        }
    }

    /// Copy parts for the unchanged base prefix, then data parts from the
    /// staging file, at most [`MAX_INFLIGHT_PARTS`] at a time.
    async fn staged_parts(&self, st: &Staged, id: &str) -> Result<Vec<CompletedPart>, WriteError> {
        let mut parts = Vec::new();
        let mut tasks: JoinSet<Result<CompletedPart, WriteError>> = JoinSet::new();
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
            tasks.spawn(async move { Ok(store.upload_part_copy(&key, &id, n, &from, start, start + len).await?) });
            offset += len;
            number += 1;
            Self::drain(&mut tasks, &mut parts, MAX_INFLIGHT_PARTS).await?;
        }
        while offset < self.size || number == 1 {
            let len = (self.size - offset).min(part_size(number));
            let mut buf = vec![0u8; len as usize];
            st.file.read_exact_at(&mut buf, offset).map_err(local)?;
            let (store, key, id, n) = (self.store.clone(), self.key.clone(), id.to_string(), number);
            self.cache.reserve_extra(len);
            let cache = self.cache.clone();
            tasks.spawn(async move {
                let r = store.upload_part(&key, &id, n, Bytes::from(buf)).await;
                cache.release_extra(len);
                Ok(r?)
            });
            offset += len;
            number += 1;
            Self::drain(&mut tasks, &mut parts, MAX_INFLIGHT_PARTS).await?;
            if len == 0 {
                break;
            }
        }
        Self::drain(&mut tasks, &mut parts, 1).await?;
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
        if s.upload_id.is_none() && s.inflight.is_empty() {
            let file = tempfile::tempfile_in(&self.staging_dir).map_err(local)?;
            file.write_all_at(&s.buf, 0).map_err(local)?;
            file.set_len(self.size).map_err(local)?;
            let n = s.buf.len() as u64;
            self.mode = Mode::Staged(Staged { file, base_prefix: 0 });
            self.unreserve(n);
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
        let etag = self.base.as_ref().map(|b| b.etag.clone());
        let mut start = 0;
        while start < st.base_prefix {
            let end = (start + DOWNLOAD_CHUNK).min(st.base_prefix);
            let body = self.store.get_range(&self.key, etag.as_deref(), start, end).await?;
            let data = collect_body(body).await?;
            st.file.write_all_at(&data, start).map_err(local)?;
            start = end;
        }
        st.base_prefix = 0;
        Ok(())
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Bytes, WriteError> {
        if offset >= self.size {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(self.size);
        if let Mode::Streaming(s) = &self.mode {
            if s.upload_id.is_none() {
                return Ok(Bytes::copy_from_slice(&s.buf[offset as usize..end as usize]));
            }
            self.switch_to_staging().await?;
        }
        let etag = self.base.as_ref().map(|b| b.etag.clone());
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        let mut out = vec![0u8; (end - offset) as usize];
        if offset < st.base_prefix {
            let remote_end = end.min(st.base_prefix);
            let data =
                collect_body(self.store.get_range(&self.key, etag.as_deref(), offset, remote_end).await?).await?;
            out[..data.len()].copy_from_slice(&data);
        }
        let local_start = offset.max(st.base_prefix);
        if local_start < end {
            let at = (local_start - offset) as usize;
            st.file.read_exact_at(&mut out[at..], local_start).map_err(local)?;
        }
        Ok(Bytes::from(out))
    }

    pub async fn truncate(&mut self, size: u64) -> Result<(), WriteError> {
        if size == self.size && !matches!(self.mode, Mode::Failed) {
            return Ok(());
        }
        if matches!(self.mode, Mode::Streaming(_)) {
            if size == 0 {
                // Truncating an unsent stream to zero is the O_TRUNC pattern.
                if let Mode::Streaming(s) = &mut self.mode
                    && s.upload_id.is_none()
                {
                    let n = s.buf.len() as u64;
                    s.buf.clear();
                    self.size = 0;
                    self.dirty = true;
                    self.unreserve(n);
                    return Ok(());
                }
            }
            self.switch_to_staging().await?;
        }
        self.materialise_below(size.min(self.size)).await?;
        let Mode::Staged(st) = &self.mode else {
            return Err(WriteError::Failed);
        };
        st.file.set_len(size).map_err(local)?;
        self.size = size;
        self.dirty = true;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.cache.release_extra(self.reserved);
    }
}
