//! The persistent block cache on local disk (`--cache-dir`,
//! `--max-cache-size`), under the memory cache.
//!
//! Each block is one file, named by the SHA-256 of (source, key, ETag, block
//! index) and spread over 256 subdirectories. A file starts with a header
//! that repeats the identity and holds the CRC32 of the data; a block whose
//! header or checksum does not match is deleted and counts as a miss, so a
//! torn write or a hash collision can never serve wrong bytes.
//!
//! Unlike mountpoint-s3's cache, the directory is kept across restarts: the
//! index is rebuilt from the files at start (oldest first, by mtime), and a
//! block stays valid for as long as the object's ETag is the same. Eviction
//! is least-recently-used by bytes; reads refresh a block's place.
//!
//! All file I/O runs on tokio's blocking pool.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::cache::{Block, ObjectId, Reservation};

const MAGIC: &[u8; 8] = b"BFSBLK1\n";

struct Index {
    lru: LruCache<String, u64>,
    total: u64,
}

pub struct DiskCache {
    dir: PathBuf,
    max: u64,
    index: Mutex<Index>,
}

fn identity(object: &ObjectId, block: u64) -> String {
    format!("{}\0{}\0{}\0{block}", object.source, object.key, object.etag)
}

fn name_of(identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
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
                files.push((meta.modified().ok(), name, meta.len()));
            }
        }
        files.sort();
        let mut index = Index { lru: LruCache::unbounded(), total: 0 };
        for (_, name, len) in files {
            index.total += len;
            index.lru.put(name, len);
        }
        info!(
            "disk cache {}: {} blocks, {} MiB of at most {} MiB",
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block, if cached and intact.
    pub async fn get(self: &Arc<Self>, object: &ObjectId, block: u64) -> Option<Bytes> {
        let id = identity(object, block);
        let name = name_of(&id);
        self.lock().lru.get(&name)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let path = this.path(&name);
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|raw| decode(&raw, &id)) {
                Ok(data) => Some(data),
                Err(why) => {
                    debug!("disk cache block {} dropped: {why}", path.display());
                    let _ = std::fs::remove_file(&path);
                    let mut index = this.lock();
                    if let Some(len) = index.lru.pop(&name) {
                        index.total -= len;
                    }
                    None
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Stores a block in the background. `held` counts the block and its
    /// encoded copy in the memory budget until the write is done.
    pub fn put(self: &Arc<Self>, object: &ObjectId, block: u64, data: Block, held: Reservation) {
        let id = identity(object, block);
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _held = held;
            let name = name_of(&id);
            if this.lock().lru.contains(&name) {
                return;
            }
            let path = this.path(&name);
            let encoded = encode(&id, &data.to_bytes());
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
                    this.evict();
                }
                Err(e) => warn!("cannot write to the disk cache {}: {e}", this.dir.display()),
            }
        });
    }

    fn evict(&self) {
        let mut index = self.lock();
        while index.total > self.max {
            let Some((name, len)) = index.lru.pop_lru() else { break };
            index.total -= len;
            let _ = std::fs::remove_file(self.path(&name));
        }
        crate::metrics::metrics().disk_cache_bytes.set(index.total as i64);
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
        c.put(&obj("a"), 0, Block::own(Bytes::from(vec![1u8; 1000])), held());
        c.put(&obj("a"), 1, Block::own(Bytes::from(vec![2u8; 1000])), held());
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
            c.put(&obj("a"), i, Block::own(Bytes::from(vec![0u8; 1000])), held());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(c.size() <= 3000, "{}", c.size());
    }
}
