//! The persistent cache on local disk (`--cache-dir`, `--max-cache-size`),
//! under the memory cache.
//!
//! Two kinds of files, both named by a SHA-256 of what they hold and spread
//! over 256 subdirectories:
//!
//! - **Blocks**: one file per [`BLOCK_SIZE`] block of an object version,
//!   named by (source, key, ETag, block index). A file starts with a header
//!   that repeats the identity and holds the CRC32 of the data; a block whose
//!   header or checksum does not match is deleted and counts as a miss, so a
//!   torn write or a hash collision can never serve wrong bytes.
//! - **Whole objects** (`<hash>.obj`, named by source, key and ETag): the
//!   object's bytes at their offsets and nothing else, with a sidecar
//!   (`<hash>.obj.meta`) holding the identity, the size and the CRC32 of
//!   every block. Once every block of an object version is on disk, the
//!   blocks are joined into one such file (each block checked on the way)
//!   and the block files go. Block reads are then served from it, checked
//!   against the sidecar's CRC of that block.
//!
//! Why a second layout: FUSE passthrough hands the kernel one file whose
//! offsets are the object's offsets, so it can serve reads itself; a block
//! file starts with its header, and an object is many of them. Joining the
//! blocks once the object is complete keeps the write path as it was
//! (blocks arrive in any order, from many readers, and a partly read object
//! is useful too), and costs one local copy of the object, once.
//!
//! Before a whole-object file is handed out for passthrough
//! ([`DiskCache::open_object`]), every block of it is checked against the
//! sidecar, once per file and process: a file joined by this process was
//! checked as it was written; one left by a previous run (which may have
//! ended in the middle of a write) is read and checked on its first open.
//! The check is remembered with the file's device, inode, size and change
//! time, so a file changed behind bucketfs's back is checked again.
//!
//! Unlike mountpoint-s3's cache, the directory is kept across restarts: the
//! index is rebuilt from the files at start (oldest first, by mtime), and an
//! entry stays valid for as long as the object's ETag is the same. Eviction
//! is least-recently-used by bytes; reads refresh an entry's place. An
//! object file evicted while passed through stays readable by the kernel
//! until its last handle closes (it is only unlinked).
//!
//! All file I/O runs on tokio's blocking pool.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::cache::{BLOCK_SIZE, Block, ObjectId, Reservation};

const MAGIC: &[u8; 8] = b"BFSBLK1\n";
const OBJECT_MAGIC: &[u8; 8] = b"BFSOBJ1\n";
/// Suffix of whole-object files; their sidecar adds [`META`].
const OBJECT: &str = ".obj";
const META: &str = ".meta";
/// Objects whose count of missing blocks is remembered: enough for the
/// files being read at once, few enough that counting stays cheap.
const PARTIAL_OBJECTS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// What a whole-object file's sidecar says.
struct ObjectMeta {
    size: u64,
    /// CRC32 of each block, in order.
    crcs: Vec<u32>,
}

/// Identity of a file on disk as `stat` sees it; a file checked once keeps
/// its check while this stays the same.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self { dev: m.dev(), ino: m.ino(), size: m.len(), ctime: (m.ctime(), m.ctime_nsec()) }
    }
}

struct Loaded {
    meta: Arc<ObjectMeta>,
    verified: Option<Stamp>,
}

struct Index {
    lru: LruCache<String, u64>,
    total: u64,
    /// Sidecars read so far, and whether their file was checked whole.
    objects: std::collections::HashMap<String, Loaded>,
    /// Per object not yet whole on disk: how many of its blocks are missing.
    partial: LruCache<String, u64>,
    /// Objects being joined now.
    joining: HashSet<String>,
}

impl Index {
    /// Forgets entry `name`; returns its length if it was there.
    fn remove(&mut self, name: &str) -> Option<u64> {
        self.objects.remove(name);
        let len = self.lru.pop(name)?;
        self.total -= len;
        Some(len)
    }
}

pub struct DiskCache {
    dir: PathBuf,
    max: u64,
    index: Mutex<Index>,
}

fn identity(object: &ObjectId, block: u64) -> String {
    format!("{}\0{}\0{}\0{block}", object.source, object.key, object.etag)
}

fn object_identity(object: &ObjectId) -> String {
    format!("object\0{}\0{}\0{}", object.source, object.key, object.etag)
}

fn name_of(identity: &str) -> String {
    crate::store::hex(&Sha256::digest(identity.as_bytes()))
}

fn object_name(object: &ObjectId) -> String {
    name_of(&object_identity(object)) + OBJECT
}

fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

fn block_len(size: u64, i: u64) -> u64 {
    (size - i * BLOCK_SIZE).min(BLOCK_SIZE)
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, indexing what a previous run left.
    pub fn open(dir: &Path, max: Option<u64>) -> std::io::Result<Arc<Self>> {
        let dir = dir.join("blocks");
        std::fs::create_dir_all(&dir)?;
        let max = match max {
            Some(m) => m,
            None => default_size(&dir),
        };
        let mut files = Vec::new();
        for sub in std::fs::read_dir(&dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let meta = f.metadata()?;
                if let Some(object) = name.strip_suffix(META) {
                    // Counted with its object; alone, it is left over.
                    if !f.path().with_file_name(object).exists() {
                        let _ = std::fs::remove_file(f.path());
                    }
                    continue;
                }
                let mut len = meta.len();
                if name.ends_with(OBJECT) {
                    match std::fs::metadata(f.path().with_file_name(format!("{name}{META}"))) {
                        Ok(m) => len += m.len(),
                        Err(_) => {
                            let _ = std::fs::remove_file(f.path());
                            continue;
                        }
                    }
                }
                files.push((meta.modified().ok(), name, len));
            }
        }
        files.sort();
        let mut index = Index {
            lru: LruCache::unbounded(),
            total: 0,
            objects: Default::default(),
            partial: LruCache::new(PARTIAL_OBJECTS),
            joining: HashSet::new(),
        };
        for (_, name, len) in files {
            index.total += len;
            index.lru.put(name, len);
        }
        info!(
            "disk cache {}: {} files, {} MiB of at most {} MiB",
            dir.display(),
            index.lru.len(),
            index.total >> 20,
            max >> 20
        );
        crate::metrics::metrics().disk_cache_bytes.set(index.total as i64);
        let cache = Arc::new(Self { dir, max, index: Mutex::new(index) });
        cache.evict();
        Ok(cache)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(&name[..2]).join(name)
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}{META}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes entry `name` and its files (a whole object's sidecar too).
    fn drop_entry(&self, name: &str, why: &str) {
        debug!("disk cache file {} dropped: {why}", self.path(name).display());
        self.lock().remove(name);
        let _ = std::fs::remove_file(self.path(name));
        if name.ends_with(OBJECT) {
            let _ = std::fs::remove_file(self.meta_path(name));
        }
        crate::metrics::metrics().disk_cache_bytes.set(self.size() as i64);
    }

    /// The block, if cached and intact.
    pub async fn get(self: &Arc<Self>, object: &ObjectId, block: u64) -> Option<Bytes> {
        let id = identity(object, block);
        let name = name_of(&id);
        let whole = object_name(object);
        let in_object = {
            let mut index = self.lock();
            if index.lru.get(&whole).is_some() {
                true
            } else {
                index.lru.get(&name)?;
                false
            }
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if in_object {
                return this.block_of_object(&whole, block);
            }
            let path = this.path(&name);
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|raw| decode(&raw, &id)) {
                Ok(data) => Some(data),
                Err(why) => {
                    this.drop_entry(&name, &why);
                    None
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Block `block` of whole-object file `name`, checked against its CRC.
    fn block_of_object(&self, name: &str, block: u64) -> Option<Bytes> {
        let meta = match self.meta(name) {
            Ok(m) => m,
            Err(why) => {
                self.drop_entry(name, &why);
                return None;
            }
        };
        let &crc = meta.crcs.get(block as usize)?;
        let mut buf = vec![0u8; block_len(meta.size, block) as usize];
        let read = std::fs::File::open(self.path(name)).and_then(|f| f.read_exact_at(&mut buf, block * BLOCK_SIZE));
        match read {
            Ok(()) if crc32fast::hash(&buf) == crc => Some(Bytes::from(buf)),
            Ok(()) => {
                self.drop_entry(name, &format!("checksum mismatch in block {block}"));
                None
            }
            Err(e) => {
                self.drop_entry(name, &e.to_string());
                None
            }
        }
    }

    /// The sidecar of whole-object file `name`, read once.
    fn meta(&self, name: &str) -> Result<Arc<ObjectMeta>, String> {
        if let Some(l) = self.lock().objects.get(name) {
            return Ok(l.meta.clone());
        }
        let raw = std::fs::read(self.meta_path(name)).map_err(|e| format!("sidecar: {e}"))?;
        let (identity, meta) = decode_meta(&raw)?;
        if name_of(&identity) + OBJECT != name {
            return Err("sidecar names another object".into());
        }
        let meta = Arc::new(meta);
        self.lock().objects.entry(name.to_string()).or_insert(Loaded { meta: meta.clone(), verified: None });
        Ok(meta)
    }

    /// The whole object `object` as one file, for the kernel to read by
    /// itself (FUSE passthrough): `None` unless every byte of this version
    /// is on disk and matches its checksums (see the module documentation).
    /// An object whose blocks are all on disk, but not yet joined, is joined
    /// in the background; this call then answers `None`.
    pub async fn open_object(self: &Arc<Self>, object: &ObjectId, size: u64) -> Option<Arc<std::fs::File>> {
        let name = object_name(object);
        if self.lock().lru.get(&name).is_none() {
            let this = self.clone();
            let object = object.clone();
            tokio::task::spawn_blocking(move || {
                if this.count_missing(&object, size, false) {
                    this.join(&object, size);
                }
            });
            return None;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || match this.checked_file(&name, size) {
            Ok(f) => f.map(Arc::new),
            Err(why) => {
                this.drop_entry(&name, &why);
                None
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Opens whole-object file `name` and checks it, unless it was checked
    /// already and has not changed since.
    /// `Ok(None)` when the caller's size is not this version's (the caller
    /// raced with a change of the object): the file stays.
    fn checked_file(&self, name: &str, size: u64) -> Result<Option<std::fs::File>, String> {
        let meta = self.meta(name)?;
        if meta.size != size {
            return Ok(None);
        }
        let file = std::fs::File::open(self.path(name)).map_err(|e| e.to_string())?;
        let stamp = Stamp::of(&file.metadata().map_err(|e| e.to_string())?);
        if stamp.size != size {
            return Err(format!("is {} bytes long, the object has {size}", stamp.size));
        }
        let checked = self.lock().objects.get(name).and_then(|l| l.verified);
        if checked == Some(stamp) {
            return Ok(Some(file));
        }
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for (i, crc) in meta.crcs.iter().enumerate() {
            let len = block_len(size, i as u64) as usize;
            reader.read_exact(&mut buf[..len]).map_err(|e| e.to_string())?;
            if crc32fast::hash(&buf[..len]) != *crc {
                return Err(format!("checksum mismatch in block {i}"));
            }
        }
        if let Some(l) = self.lock().objects.get_mut(name) {
            l.verified = Some(stamp);
        }
        Ok(Some(file))
    }

    /// Stores a block in the background. `held` counts the block and its
    /// encoded copy in the memory budget until the write is done. `size` is
    /// the object's: once all its blocks are on disk, they are joined into
    /// one file.
    pub fn put(self: &Arc<Self>, object: &ObjectId, size: u64, block: u64, data: Block, held: Reservation) {
        let id = identity(object, block);
        let this = self.clone();
        let object = object.clone();
        tokio::task::spawn_blocking(move || {
            let _held = held;
            let name = name_of(&id);
            {
                let index = this.lock();
                if index.lru.contains(&name) || index.lru.contains(&object_name(&object)) {
                    return;
                }
            }
            let path = this.path(&name);
            let encoded = encode(&id, &data.to_bytes());
            drop(data);
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(path.parent().unwrap_or(&this.dir))?;
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&encoded)?;
                std::fs::rename(&tmp, &path)
            };
            match write() {
                Ok(()) => {
                    let mut index = this.lock();
                    index.total += encoded.len() as u64;
                    index.lru.put(name, encoded.len() as u64);
                    drop(index);
                    drop(encoded);
                    this.evict();
                    if this.count_missing(&object, size, true) {
                        this.join(&object, size);
                    }
                }
                Err(e) => warn!("cannot write to the disk cache {}: {e}", this.dir.display()),
            }
        });
    }

    /// Counts one more block of `object` on disk (`added`), or just looks;
    /// true when none is missing any more and nobody is joining them yet
    /// (the caller then joins them). The first call for an object counts
    /// its blocks in the index; later ones count down.
    fn count_missing(&self, object: &ObjectId, size: u64, added: bool) -> bool {
        let n = block_count(size);
        if n == 0 || size > self.max {
            return false;
        }
        let whole = object_name(object);
        {
            let mut index = self.lock();
            if index.lru.contains(&whole) || index.joining.contains(&whole) {
                return false;
            }
            if let Some(missing) = index.partial.get_mut(&whole) {
                if added {
                    *missing = missing.saturating_sub(1);
                }
                if *missing > 0 {
                    return false;
                }
                index.partial.pop(&whole);
                index.joining.insert(whole);
                return true;
            }
        }
        // Hashing the names takes about a millisecond per GiB: done
        // outside the lock.
        let names: Vec<String> = (0..n).map(|i| name_of(&identity(object, i))).collect();
        let mut index = self.lock();
        let missing = names.iter().filter(|n| !index.lru.contains(*n)).count() as u64;
        if index.lru.contains(&whole) || index.joining.contains(&whole) {
            return false;
        }
        if missing > 0 {
            index.partial.put(whole, missing);
            return false;
        }
        index.partial.pop(&whole);
        index.joining.insert(whole);
        true
    }

    /// Joins the blocks of `object` into one whole-object file, checking
    /// each, then drops the block files. Runs on a blocking thread.
    fn join(&self, object: &ObjectId, size: u64) {
        let whole = object_name(object);
        let result = self.join_files(object, size, &whole);
        let mut index = self.lock();
        index.joining.remove(&whole);
        let blocks = match result {
            Ok((len, meta, stamp, blocks)) => {
                index.total += len;
                index.lru.put(whole.clone(), len);
                index.objects.insert(whole, Loaded { meta: Arc::new(meta), verified: Some(stamp) });
                for name in &blocks {
                    index.remove(name);
                }
                blocks
            }
            Err(why) => {
                debug!("the blocks of {} were not joined: {why}", object.key);
                Vec::new()
            }
        };
        drop(index);
        for name in blocks {
            let _ = std::fs::remove_file(self.path(&name));
        }
        self.evict();
    }

    /// Writes the whole-object file and its sidecar from the block files:
    /// (bytes on disk, sidecar, stamp of the checked file, block names).
    fn join_files(
        &self,
        object: &ObjectId,
        size: u64,
        whole: &str,
    ) -> Result<(u64, ObjectMeta, Stamp, Vec<String>), String> {
        let path = self.path(whole);
        std::fs::create_dir_all(path.parent().unwrap_or(&self.dir)).map_err(|e| e.to_string())?;
        let tmp = path.with_file_name(format!("{whole}.tmp"));
        let meta_tmp = path.with_file_name(format!("{whole}{META}.tmp"));
        let write = || -> Result<(u64, ObjectMeta, Stamp, Vec<String>), String> {
            let mut out =
                std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(|e| e.to_string())?);
            let mut crcs = Vec::with_capacity(block_count(size) as usize);
            let mut names = Vec::with_capacity(crcs.capacity());
            for i in 0..block_count(size) {
                let id = identity(object, i);
                let name = name_of(&id);
                let raw = std::fs::read(self.path(&name)).map_err(|e| format!("block {i}: {e}"))?;
                let data = decode(&raw, &id).map_err(|e| format!("block {i}: {e}"))?;
                if data.len() as u64 != block_len(size, i) {
                    return Err(format!("block {i} has {} bytes", data.len()));
                }
                crcs.push(crc32fast::hash(&data));
                out.write_all(&data).map_err(|e| e.to_string())?;
                names.push(name);
            }
            let file = out.into_inner().map_err(|e| e.to_string())?;
            let meta = ObjectMeta { size, crcs };
            let encoded = encode_meta(&object_identity(object), &meta);
            std::fs::write(&meta_tmp, &encoded).map_err(|e| e.to_string())?;
            std::fs::rename(&meta_tmp, self.meta_path(whole)).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
            let stamp = Stamp::of(&file.metadata().map_err(|e| e.to_string())?);
            Ok((size + encoded.len() as u64, meta, stamp, names))
        };
        let result = write();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&meta_tmp);
        }
        result
    }

    fn evict(&self) {
        let mut index = self.lock();
        let mut gone = Vec::new();
        while index.total > self.max {
            let Some((name, len)) = index.lru.pop_lru() else { break };
            index.total -= len;
            index.objects.remove(&name);
            gone.push(name);
        }
        crate::metrics::metrics().disk_cache_bytes.set(index.total as i64);
        drop(index);
        for name in gone {
            let _ = std::fs::remove_file(self.path(&name));
            if name.ends_with(OBJECT) {
                let _ = std::fs::remove_file(self.meta_path(&name));
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.lock().total
    }
}

/// 10% of the cache directory's file system.
fn default_size(dir: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return 1 << 30 };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 1 << 30;
    }
    (st.f_blocks as u64 * st.f_frsize as u64) / 10
}

fn encode(identity: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 16 + identity.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(identity.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(identity.as_bytes());
    out.extend_from_slice(data);
    out
}

fn decode(raw: &[u8], identity: &str) -> Result<Bytes, String> {
    let head = MAGIC.len() + 16;
    if raw.len() < head || &raw[..MAGIC.len()] != MAGIC {
        return Err("bad header".into());
    }
    let id_len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(raw[16..24].try_into().unwrap_or_default()) as usize;
    if raw.len() != head + id_len + len {
        return Err("truncated".into());
    }
    if &raw[head..head + id_len] != identity.as_bytes() {
        return Err("identity mismatch".into());
    }
    let data = &raw[head + id_len..];
    if crc32fast::hash(data) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(Bytes::copy_from_slice(data))
}

/// A sidecar: magic, identity length (u32), size (u64), then the identity,
/// the CRC32 of each block, and a CRC32 of all that (a torn sidecar is
/// never believed).
fn encode_meta(identity: &str, meta: &ObjectMeta) -> Vec<u8> {
    let mut out = Vec::with_capacity(OBJECT_MAGIC.len() + 16 + identity.len() + 4 * meta.crcs.len());
    out.extend_from_slice(OBJECT_MAGIC);
    out.extend_from_slice(&(identity.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta.size.to_le_bytes());
    out.extend_from_slice(identity.as_bytes());
    for crc in &meta.crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    let all = crc32fast::hash(&out);
    out.extend_from_slice(&all.to_le_bytes());
    out
}

fn decode_meta(raw: &[u8]) -> Result<(String, ObjectMeta), String> {
    let head = OBJECT_MAGIC.len() + 12;
    if raw.len() < head + 4 || &raw[..OBJECT_MAGIC.len()] != OBJECT_MAGIC {
        return Err("bad sidecar header".into());
    }
    let (body, tail) = raw.split_at(raw.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(tail.try_into().unwrap_or_default()) {
        return Err("sidecar checksum mismatch".into());
    }
    let id_len = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default()) as usize;
    let size = u64::from_le_bytes(body[12..20].try_into().unwrap_or_default());
    let n = block_count(size) as usize;
    if body.len() != head + id_len + 4 * n {
        return Err("sidecar truncated".into());
    }
    let identity =
        String::from_utf8(body[head..head + id_len].to_vec()).map_err(|_| "sidecar identity is not UTF-8")?;
    let crcs =
        body[head + id_len..].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    Ok((identity, ObjectMeta { size, crcs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(etag: &str) -> ObjectId {
        ObjectId { source: "s".into(), key: "k".into(), etag: etag.into() }
    }

    fn held() -> Reservation {
        let budget = Arc::new(super::super::cache::BlockCache::new(1 << 20));
        budget.reserve_memory(super::super::cache::ReservationKind::DiskWrite, 2000)
    }

    #[tokio::test]
    async fn survives_restart_checks_identity_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), Some(3000)).unwrap();
        c.put(&obj("a"), 1 << 30, 0, Block::own(Bytes::from(vec![1u8; 1000])), held());
        c.put(&obj("a"), 1 << 30, 1, Block::own(Bytes::from(vec![2u8; 1000])), held());
        // Background writes: wait until both are indexed.
        for _ in 0..100 {
            if c.size() > 2000 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(c.get(&obj("a"), 1).await.unwrap(), vec![2u8; 1000]);
        assert!(c.get(&obj("b"), 1).await.is_none(), "another ETag is another object");
        drop(c);
        let c = DiskCache::open(dir.path(), Some(3000)).unwrap();
        assert_eq!(c.get(&obj("a"), 0).await.unwrap(), vec![1u8; 1000]);
        // Corrupt a block: it is dropped, never served.
        let name = name_of(&identity(&obj("a"), 0));
        let p = c.path(&name);
        let mut raw = std::fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 0xff;
        std::fs::write(&p, raw).unwrap();
        assert!(c.get(&obj("a"), 0).await.is_none());
        assert!(!p.exists());
        // Eviction keeps the total under the bound.
        for i in 10..20 {
            c.put(&obj("a"), 1 << 30, i, Block::own(Bytes::from(vec![0u8; 1000])), held());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(c.size() <= 3000, "{}", c.size());
    }

    #[tokio::test]
    async fn a_complete_object_becomes_one_checked_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK_SIZE + 100;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let held = || {
            let budget = Arc::new(super::super::cache::BlockCache::new(64 << 20));
            budget.reserve_memory(super::super::cache::ReservationKind::DiskWrite, 2 * BLOCK_SIZE)
        };
        let c = DiskCache::open(dir.path(), Some(64 << 20)).unwrap();
        let block = |i: u64| {
            let s = (i * BLOCK_SIZE) as usize;
            Block::own(Bytes::copy_from_slice(&data[s..(s + block_len(size, i) as usize)]))
        };
        c.put(&obj("a"), size, 0, block(0), held());
        c.put(&obj("a"), size, 2, block(2), held());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(c.open_object(&obj("a"), size).await.is_none(), "a block is missing");
        c.put(&obj("a"), size, 1, block(1), held());
        let mut file = None;
        for _ in 0..100 {
            file = c.open_object(&obj("a"), size).await;
            if file.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let file = file.expect("joined into one file");
        let mut got = Vec::new();
        (&*file).read_to_end(&mut got).unwrap();
        assert!(got == data, "the file holds the object's bytes at their offsets");
        assert!(c.open_object(&obj("b"), size).await.is_none(), "another ETag is another object");
        assert_eq!(c.get(&obj("a"), 2).await.unwrap(), &data[2 * BLOCK_SIZE as usize..]);
        assert!(c.size() < size + 4096, "the block files are gone: {}", c.size());
        drop(c);
        // After a restart the file is checked before it is handed out: a
        // changed byte drops it.
        let c = DiskCache::open(dir.path(), Some(64 << 20)).unwrap();
        assert!(c.open_object(&obj("a"), size).await.is_some());
        let c = DiskCache::open(dir.path(), Some(64 << 20)).unwrap();
        let path = c.path(&object_name(&obj("a")));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", BLOCK_SIZE + 5).unwrap();
        assert!(c.open_object(&obj("a"), size).await.is_none());
        assert!(!path.exists() && c.size() == 0);
        assert!(c.get(&obj("a"), 0).await.is_none());
    }
}
