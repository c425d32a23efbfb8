//! The block cache shared by every handle and file, and the memory budget.
//!
//! Objects are read in fixed blocks of [`BLOCK_SIZE`] bytes, keyed by
//! (source, key, ETag, block index), so two readers of one file, or a re-read,
//! are served from memory, and a changed object can never be served from
//! blocks of its previous version.
//!
//! A block is either *ready* (in an LRU) or *pending* (a GET is filling it; a
//! `watch` channel lets any number of readers wait for it, so a block is never
//! fetched twice at once). Ready and pending bytes together stay within one
//! budget (`--memory-limit`): reserving room evicts the least recently used
//! ready blocks, and prefetch reservations are refused once pending bytes
//! would pass [`PREFETCH_SHARE`] of the budget, which makes prefetch windows
//! shrink under pressure instead of growing the process.
//!
//! 128 KiB blocks: the kernel's default readahead, and 512 MiB of cache is
//! only 4,096 entries. Random
//! reads do not come here: the reader fetches them for themselves alone
//! (see `read`), counted in the budget as [`ReservationKind::DirectRead`]
//! until their answer is sent.

use std::collections::HashMap;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use lru::LruCache;
use smallvec::{SmallVec, smallvec};
use tokio::sync::watch;

use crate::store::StoreError;

pub const BLOCK_SIZE: u64 = 128 * 1024;
/// At most this fraction (in quarters) of the budget may be pending prefetch.
const PREFETCH_SHARE: u64 = 3;
/// Blocks already read by a sequential stream keep at most this part of the
/// budget (32 MiB of the default 512 MiB). The kernel's page cache holds them
/// too, and every byte kept is memory a fresh allocation must fault in for
/// the next blocks: at a quarter of the budget, bucketfs took 66,000 page
/// faults and 0.82 CPU s per GiB streamed on a fresh mount; at 1/16, 40,000
/// and 0.74 s (manual `dd` runs, same server).
const STREAMED_SHARE: u64 = 16;

/// Files whose delivered blocks are remembered (see [`BlockCache::delivered`]).
const DELIVERED_OBJECTS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(64).unwrap();
/// Blocks tracked per file: the first 128 GiB (a bitmap of at most 128 KiB).
const TRACKED_BLOCKS: u64 = 1 << 20;
/// Gaps between delivered blocks shorter than this are not prefetched.
const SHORT_GAP: u64 = 4;

/// An inode and the object version it shows: what one kernel page cache holds.
pub type PageCacheFile = (u64, Arc<ObjectId>);

/// Identity of one version of one object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectId {
    /// Endpoint and bucket, so two mounts of different servers never share blocks.
    pub source: Arc<str>,
    pub key: String,
    pub etag: String,
}

pub type BlockKey = (Arc<ObjectId>, u64);
pub type BlockResult = Option<Result<Block, StoreError>>;

/// A block made of more pieces than this is copied into one allocation, so a
/// read's reply has few pieces whatever sizes the HTTP client delivers.
const MAX_PIECES: usize = 4;

/// The bytes of one block. A block filled by a GET is made of slices of the
/// buffers the HTTP client received the body in (one slice, or two when the
/// block straddles two of them), shared with the neighbouring blocks, so
/// nothing is copied between the socket and the reply to the kernel. A
/// block kept on its own gets an allocation of its own first
/// ([`BlockCache::probe`]): it must not keep its neighbours' memory alive
/// outside the budget.
#[derive(Clone, Debug)]
pub struct Block {
    pieces: SmallVec<[Bytes; 2]>,
    /// The pieces are slices of buffers that other blocks share.
    shared: bool,
}

/// Blocks are equal when their bytes are, however they are split.
impl PartialEq for Block {
    fn eq(&self, other: &Self) -> bool {
        let bytes = |b: &Self| b.pieces.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u8>>();
        self.len() == other.len() && bytes(self) == bytes(other)
    }
}

impl Eq for Block {}

impl Block {
    /// A block with its own allocation.
    pub fn own(bytes: Bytes) -> Self {
        Self { pieces: smallvec![bytes], shared: false }
    }

    /// A block made of `pieces`, in order, slices of buffers shared with
    /// other blocks. More than [`MAX_PIECES`] are copied into one.
    pub fn shared(pieces: SmallVec<[Bytes; 2]>) -> Self {
        if pieces.len() > MAX_PIECES {
            return Self::own(Bytes::from(pieces.concat()));
        }
        Self { pieces, shared: true }
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the pieces are slices of buffers other blocks share.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The same bytes in one allocation of their own.
    pub fn to_own(&self) -> Self {
        if self.shared { Self::own(Bytes::from(self.pieces.concat())) } else { self.clone() }
    }

    /// All the bytes as one `Bytes` (a copy only when there are several pieces).
    pub fn to_bytes(&self) -> Bytes {
        match self.pieces.as_slice() {
            [one] => one.clone(),
            pieces => Bytes::from(pieces.concat()),
        }
    }

    /// Appends the pieces that cover `range` (clamped to the block) to `out`.
    pub fn slice_into(&self, range: Range<usize>, out: &mut Vec<Bytes>) {
        let mut base = 0;
        for piece in &self.pieces {
            let (from, to) = (range.start.max(base), range.end.min(base + piece.len()));
            if from < to {
                out.push(piece.slice(from - base..to - base));
            }
            base += piece.len();
        }
    }
}

/// The answer to one read: consecutive pieces of blocks, sent to the kernel
/// as they are with one vectored write.
#[derive(Clone, Debug, Default)]
pub struct ReadData {
    parts: Vec<Bytes>,
    /// The budget's bytes for pieces held outside the block cache (a read
    /// fetched for itself alone): they come back when the answer is dropped,
    /// once it has been sent.
    _held: Option<Arc<Reservation>>,
}

impl ReadData {
    /// Consecutive pieces, in order.
    pub fn from_parts(parts: Vec<Bytes>) -> Self {
        Self { parts, _held: None }
    }

    /// Consecutive pieces, in order, counted in the budget by `held` until
    /// the answer is dropped.
    pub fn holding(parts: Vec<Bytes>, held: Reservation) -> Self {
        Self { parts, _held: Some(Arc::new(held)) }
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces, for a vectored write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect()
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

impl From<Bytes> for ReadData {
    fn from(b: Bytes) -> Self {
        Self::from_parts(vec![b])
    }
}
/// The right and duty to fill one pending block. A fetch task that ends
/// without filling it (it panicked, was aborted, or returned early) fails the
/// block on `Drop`: its waiters get an error instead of waiting forever, and
/// its bytes return to the budget.
pub struct BlockSender {
    cache: Arc<BlockCache>,
    key: BlockKey,
    tx: Option<watch::Sender<BlockResult>>,
}

impl Drop for BlockSender {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let e = StoreError::Network("the fetch of this block ended without a result".into());
            self.cache.complete(&self.key, tx, Err(e));
        }
    }
}

/// What the cache knows about a block.
pub enum Probe {
    Ready(Block),
    Pending(watch::Receiver<BlockResult>),
    Missing,
}

#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub fetched_bytes: AtomicU64,
    /// Reads that found a block's GET cancelled (its handle closed) and
    /// fetched it themselves.
    pub cancelled_waits: AtomicU64,
}

struct Inner {
    ready: LruCache<BlockKey, Block>,
    ready_bytes: u64,
    /// Blocks a sequential stream has read: the kernel's page cache holds
    /// them too, so they are kept only up to 1/[`STREAMED_SHARE`] of the budget
    /// (a stream does not fill the process with data it has passed) and are
    /// evicted first.
    streamed: LruCache<BlockKey, Block>,
    streamed_bytes: u64,
    pending: HashMap<BlockKey, (watch::Receiver<BlockResult>, u64)>,
    pending_bytes: u64,
    /// Memory held outside the cache by [`Reservation`]s, per kind.
    reserved: [u64; ReservationKind::COUNT],
    /// Per object, a bitmap of the blocks the kernel has asked for whole
    /// (see [`BlockCache::delivered`]); the most recently read objects only.
    delivered: LruCache<PageCacheFile, Vec<u64>>,
}

fn bit(bits: &[u64], b: u64) -> bool {
    bits.get((b / 64) as usize).is_some_and(|w| (w >> (b % 64)) & 1 == 1)
}

impl Inner {
    /// Cached, streamed, pending and write-buffer bytes.
    fn used(&self) -> u64 {
        self.ready_bytes + self.streamed_bytes + self.pending_bytes + self.extra_bytes()
    }

    fn extra_bytes(&self) -> u64 {
        self.reserved.iter().sum()
    }
}

/// See the module documentation.
pub struct BlockCache {
    inner: crate::sync::Mutex<Inner>,
    limit: u64,
    /// Woken whenever reserved bytes come back, for writers waiting for room.
    released: tokio::sync::Notify,
    pub stats: CacheStats,
    /// Sequential streams prefetching now; they share the budget.
    pub streams: AtomicUsize,
}

impl BlockCache {
    pub fn new(limit: u64) -> Self {
        Self {
            inner: crate::sync::Mutex::new(Inner {
                ready: LruCache::unbounded(),
                ready_bytes: 0,
                streamed: LruCache::unbounded(),
                streamed_bytes: 0,
                pending: HashMap::new(),
                pending_bytes: 0,
                reserved: [0; ReservationKind::COUNT],
                delivered: LruCache::new(DELIVERED_OBJECTS),
            }),
            limit: limit.max(4 * BLOCK_SIZE),
            released: tokio::sync::Notify::new(),
            stats: CacheStats::default(),
            streams: AtomicUsize::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes counted against the budget now.
    pub fn used(&self) -> u64 {
        self.lock().used()
    }

    /// Bytes held by reservations of `kind` now (for metrics and tests).
    pub fn reserved(&self, kind: ReservationKind) -> u64 {
        self.lock().reserved[kind as usize]
    }

    /// Takes `n` bytes of the budget for `kind`, evicting cached blocks to
    /// make room. Always succeeds; the bytes come back when the reservation
    /// is dropped. For memory that exists already and must be counted.
    pub fn reserve_memory(self: &Arc<Self>, kind: ReservationKind, n: u64) -> Reservation {
        let mut i = self.lock();
        i.reserved[kind as usize] += n;
        self.evict(&mut i);
        drop(i);
        Reservation { cache: self.clone(), kind, bytes: n }
    }

    /// Takes `n` bytes if they fit in the budget once every cached block that
    /// can go has gone; `None` when pending fetches and other reservations
    /// leave no room.
    pub fn try_reserve_memory(self: &Arc<Self>, kind: ReservationKind, n: u64) -> Option<Reservation> {
        let mut i = self.lock();
        if i.pending_bytes + i.extra_bytes() + n > self.limit {
            return None;
        }
        i.reserved[kind as usize] += n;
        self.evict(&mut i);
        drop(i);
        Some(Reservation { cache: self.clone(), kind, bytes: n })
    }

    /// [`Self::try_reserve_memory`], waiting up to `patience` for other
    /// reservations to come back.
    pub async fn reserve_memory_within(
        self: &Arc<Self>,
        kind: ReservationKind,
        n: u64,
        patience: std::time::Duration,
    ) -> Option<Reservation> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.try_reserve_memory(kind, n) {
                return Some(r);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn give_back(&self, kind: ReservationKind, n: u64) {
        if n == 0 {
            return;
        }
        let mut i = self.lock();
        let slot = &mut i.reserved[kind as usize];
        debug_assert!(*slot >= n, "{kind:?}: giving back {n} of {slot}");
        *slot = slot.saturating_sub(n);
        drop(i);
        self.released.notify_waiters();
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// What the cache holds for `key`. `promote` refreshes the block's place
    /// in the LRU; sequential readers pass false, so the blocks they have
    /// consumed are evicted before blocks prefetched for them but not read yet.
    /// A promoted block that shares its buffers with other blocks gets an
    /// allocation of its own first: kept on its own, it must not keep its
    /// neighbours' memory alive outside the budget.
    pub fn probe(&self, key: &BlockKey, promote: bool) -> Probe {
        let mut i = self.lock();
        if promote && let Some(b) = i.streamed.pop(key) {
            // Read again by a non-sequential reader: a cached block again.
            i.streamed_bytes -= b.len() as u64;
            i.ready_bytes += b.len() as u64;
            i.ready.put(key.clone(), b);
        } else if let Some(b) = i.streamed.peek(key) {
            return Probe::Ready(b.clone());
        }
        let ready = if promote {
            i.ready.get_mut(key).map(|b| {
                if b.is_shared() {
                    *b = b.to_own();
                }
                b.clone()
            })
        } else {
            i.ready.peek(key).cloned()
        };
        if let Some(b) = ready {
            return Probe::Ready(b);
        }
        match i.pending.get(key) {
            Some((rx, _)) => Probe::Pending(rx.clone()),
            None => Probe::Missing,
        }
    }

    /// Records a read of `touched` blocks of `file` (an inode and the object
    /// version it shows), of which `whole` were asked for whole. Once
    /// answered, those are in the kernel's page cache, which all handles of
    /// the inode share: no handle will ask for them again, so prefetch skips
    /// them ([`Self::undelivered`]); four readers of one quarter each do not
    /// fetch the next reader's quarter again at the end of their own. A read
    /// touching a recorded block shows the page cache lost it (evicted,
    /// dropped, or the read failed): the file's record is forgotten, and
    /// true returned.
    pub fn delivered(&self, file: &PageCacheFile, touched: Range<u64>, whole: Range<u64>) -> bool {
        let mut i = self.lock();
        let bits = i.delivered.get_or_insert_mut(file.clone(), Vec::new);
        let lost = touched.into_iter().any(|b| bit(bits, b));
        if lost {
            *bits = Vec::new();
        }
        let whole = whole.start..whole.end.min(TRACKED_BLOCKS);
        if !whole.is_empty() {
            let words = whole.end.div_ceil(64) as usize;
            if bits.len() < words {
                bits.resize(words, 0);
            }
            for b in whole {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        lost
    }

    /// Forgets what the kernel had of `file`: its page cache was dropped.
    pub fn forget_delivered(&self, file: &PageCacheFile) {
        self.lock().delivered.pop(file);
    }

    /// `blocks` without those the kernel already has, as runs in order. A
    /// gap of a few blocks between blocks it has is left out too: a reader
    /// whose requests straddle blocks leaves such gaps, and the kernel holds
    /// their pages as well.
    pub fn undelivered(&self, file: &PageCacheFile, blocks: Range<u64>) -> Vec<Range<u64>> {
        let i = self.lock();
        let Some(bits) = i.delivered.peek(file) else { return vec![blocks] };
        let (mut runs, mut start) = (Vec::new(), None);
        for b in blocks.clone() {
            match (bit(bits, b), start) {
                (true, Some(s)) => {
                    if s == blocks.start || b - s >= SHORT_GAP {
                        runs.push(s..b);
                    }
                    start = None;
                }
                (false, None) => start = Some(b),
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push(s..blocks.end);
        }
        runs
    }

    /// Records that a sequential stream has read block `key`: it moves to the
    /// streamed blocks, which are bounded on their own.
    pub fn consumed(&self, key: &BlockKey) {
        let mut i = self.lock();
        let Some(b) = i.ready.pop(key) else { return };
        let n = b.len() as u64;
        i.ready_bytes -= n;
        i.streamed_bytes += n;
        i.streamed.put(key.clone(), b);
        let cap = self.limit / STREAMED_SHARE;
        while i.streamed_bytes > cap {
            let Some((_, old)) = i.streamed.pop_lru() else { break };
            i.streamed_bytes -= old.len() as u64;
            self.evicted();
        }
    }

    fn evicted(&self) {
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        crate::metrics::metrics().cache_evictions.inc();
    }

    /// Registers blocks of `object` in `blocks` that are neither ready nor
    /// pending, and returns them with the senders that will fill them.
    /// `len(i)` is the length of block `i`. With `optional`, stops at the first
    /// block that would push pending bytes past the prefetch share, and says
    /// which block that was.
    pub fn reserve(
        self: &Arc<Self>,
        object: &Arc<ObjectId>,
        blocks: Range<u64>,
        len: impl Fn(u64) -> u64,
        optional: bool,
    ) -> (Vec<(u64, BlockSender)>, Option<u64>) {
        let mut i = self.lock();
        let mut out = Vec::new();
        let mut refused = None;
        for index in blocks {
            let key = (object.clone(), index);
            if i.ready.contains(&key) || i.streamed.contains(&key) || i.pending.contains_key(&key) {
                continue;
            }
            let n = len(index);
            if optional && i.pending_bytes + i.extra_bytes() + n > self.limit / 4 * PREFETCH_SHARE {
                refused = Some(index);
                break;
            }
            let (tx, rx) = watch::channel(None);
            i.pending.insert(key.clone(), (rx, n));
            i.pending_bytes += n;
            out.push((index, BlockSender { cache: self.clone(), key, tx: Some(tx) }));
        }
        self.evict(&mut i);
        if !out.is_empty() {
            self.stats.misses.fetch_add(out.len() as u64, Ordering::Relaxed);
            crate::metrics::metrics().cache_misses.inc_by(out.len() as u64);
        }
        (out, refused)
    }

    /// Records the outcome of a fetch and wakes the block's waiters.
    pub fn fill(&self, object: &Arc<ObjectId>, index: u64, mut tx: BlockSender, result: Result<Block, StoreError>) {
        debug_assert!(Arc::ptr_eq(&tx.key.0, object) && tx.key.1 == index);
        if let Some(sender) = tx.tx.take() {
            self.complete(&tx.key, sender, result);
        }
    }

    fn complete(&self, key: &BlockKey, tx: watch::Sender<BlockResult>, result: Result<Block, StoreError>) {
        {
            let mut i = self.lock();
            if let Some((_, n)) = i.pending.remove(key) {
                i.pending_bytes -= n;
            }
            if let Ok(b) = &result {
                let n = b.len() as u64;
                self.stats.fetched_bytes.fetch_add(n, Ordering::Relaxed);
                crate::metrics::metrics().bytes_fetched.inc_by(n);
                i.ready_bytes += n;
                if let Some(old) = i.streamed.pop(key) {
                    i.streamed_bytes -= old.len() as u64;
                }
                if let Some(old) = i.ready.put(key.clone(), b.clone()) {
                    i.ready_bytes -= old.len() as u64;
                }
                self.evict(&mut i);
            }
        }
        tx.send_replace(Some(result));
        self.released.notify_waiters();
    }

    /// Evicts streamed blocks, then the least recently used ready ones,
    /// until the budget holds.
    fn evict(&self, i: &mut Inner) {
        while i.used() > self.limit {
            if let Some((_, b)) = i.streamed.pop_lru() {
                i.streamed_bytes -= b.len() as u64;
            } else if let Some((_, b)) = i.ready.pop_lru() {
                i.ready_bytes -= b.len() as u64;
            } else {
                break;
            }
            self.evicted();
        }
    }

    /// Counts `n` bytes fetched for one read alone, outside the blocks.
    pub fn fetched(&self, n: u64) {
        self.stats.fetched_bytes.fetch_add(n, Ordering::Relaxed);
        crate::metrics::metrics().bytes_fetched.inc_by(n);
    }

    pub fn hit(&self) {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        crate::metrics::metrics().cache_hits.inc();
    }
}

/// What a [`Reservation`] holds memory for; each kind has a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationKind {
    /// A streaming writer's buffer of bytes not yet sent.
    WriteBuffer = 0,
    /// Parts on their way to the server.
    UploadPart = 1,
    /// Blocks on their way to the disk cache.
    DiskWrite = 2,
    /// The bytes of a random read, fetched for it alone (not cached), until
    /// its answer has been sent.
    DirectRead = 3,
}

impl ReservationKind {
    pub const COUNT: usize = 4;
    pub const ALL: [ReservationKind; Self::COUNT] = [
        ReservationKind::WriteBuffer,
        ReservationKind::UploadPart,
        ReservationKind::DiskWrite,
        ReservationKind::DirectRead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReservationKind::WriteBuffer => "write_buffer",
            ReservationKind::UploadPart => "upload_part",
            ReservationKind::DiskWrite => "disk_write",
            ReservationKind::DirectRead => "direct_read",
        }
    }
}

/// Bytes of the memory budget held outside the block cache. They come back
/// when the value is dropped, on every path: a finished or aborted task, an
/// early return, a panic, a dropped writer. Nothing else gives bytes back.
#[must_use = "the bytes come back when the reservation is dropped"]
pub struct Reservation {
    cache: Arc<BlockCache>,
    kind: ReservationKind,
    bytes: u64,
}

impl Reservation {
    /// An empty reservation, to grow later.
    pub fn empty(cache: &Arc<BlockCache>, kind: ReservationKind) -> Self {
        Self { cache: cache.clone(), kind, bytes: 0 }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds the bytes of `other` (of any kind) to this one.
    pub fn absorb(&mut self, mut other: Reservation) {
        if other.kind != self.kind {
            let mut i = self.cache.lock();
            i.reserved[other.kind as usize] -= other.bytes;
            i.reserved[self.kind as usize] += other.bytes;
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Moves `n` bytes (at most all) into a reservation of `kind` of their own.
    pub fn split(&mut self, n: u64, kind: ReservationKind) -> Reservation {
        let n = n.min(self.bytes);
        self.bytes -= n;
        if kind != self.kind {
            let mut i = self.cache.lock();
            i.reserved[self.kind as usize] -= n;
            i.reserved[kind as usize] += n;
        }
        Reservation { cache: self.cache.clone(), kind, bytes: n }
    }

    /// Gives back `n` bytes (at most all) now.
    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.cache.give_back(self.kind, n);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.cache.give_back(self.kind, self.bytes);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({:?}, {})", self.kind, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(k: &str) -> Arc<ObjectId> {
        Arc::new(ObjectId { source: "t".into(), key: k.into(), etag: "e".into() })
    }

    #[test]
    fn budget_evicts_lru_and_bounds_prefetch() {
        let cache = Arc::new(BlockCache::new(8 * BLOCK_SIZE));
        let a = obj("a");
        let (got, _) = cache.reserve(&a, 0..8, |_| BLOCK_SIZE, false);
        assert_eq!(got.len(), 8);
        // Nothing twice.
        assert!(cache.reserve(&a, 0..8, |_| BLOCK_SIZE, false).0.is_empty());
        for (i, tx) in got {
            cache.fill(&a, i, tx, Ok(Block::own(Bytes::from(vec![i as u8; BLOCK_SIZE as usize]))));
        }
        assert_eq!(cache.used(), 8 * BLOCK_SIZE);
        // Touch block 0 so block 1 is the least recently used.
        assert!(matches!(cache.probe(&(a.clone(), 0), true), Probe::Ready(_)));
        let b = obj("b");
        let (more, _) = cache.reserve(&b, 0..1, |_| BLOCK_SIZE, false);
        assert_eq!(more.len(), 1);
        assert!(matches!(cache.probe(&(a.clone(), 1), true), Probe::Missing));
        assert!(matches!(cache.probe(&(a.clone(), 0), true), Probe::Ready(_)));
        assert!(cache.used() <= cache.limit());
        // Optional reservations stop at the prefetch share.
        let c = obj("c");
        let (opt, refused) = cache.reserve(&c, 0..100, |_| BLOCK_SIZE, true);
        assert!(opt.len() < 8, "{}", opt.len());
        assert_eq!(refused, Some(opt.len() as u64));
    }

    #[test]
    fn blocks_and_reads_are_pieces_of_shared_buffers() {
        let body: Vec<u8> = (0..40).collect();
        // Two received buffers; the block straddles them.
        let (first, second) = (Bytes::copy_from_slice(&body[..13]), Bytes::copy_from_slice(&body[13..]));
        let block = Block::shared(smallvec![first.slice(5..), second.slice(..12)]);
        assert_eq!((block.len(), block.is_shared()), (20, true));
        assert_eq!(block, Block::own(Bytes::copy_from_slice(&body[5..25])), "equal by content");
        assert_eq!(block.to_bytes(), &body[5..25]);
        let mut parts = Vec::new();
        block.slice_into(3..11, &mut parts);
        assert_eq!(parts.len(), 2, "a range across the seam takes a piece of each buffer");
        assert_eq!(parts[0].as_ptr(), first[8..].as_ptr(), "no copy");
        block.slice_into(15..100, &mut parts);
        let read = ReadData::from_parts(parts);
        assert_eq!(read.to_vec(), [&body[8..16], &body[20..25]].concat());
        assert_eq!(read.len(), 13);
        assert_eq!(read.io_slices().iter().map(|s| s.len()).collect::<Vec<_>>(), [5, 3, 5]);
        // Many small pieces are joined into one allocation.
        let tiny = Block::shared((0..10).map(|i| Bytes::copy_from_slice(&body[i * 2..i * 2 + 2])).collect());
        assert_eq!((tiny.is_shared(), tiny.to_bytes()), (false, Bytes::copy_from_slice(&body[..20])));
        assert!(ReadData::default().is_empty());
    }

    #[test]
    fn a_promoted_block_stops_sharing_its_buffers() {
        let cache = Arc::new(BlockCache::new(8 * BLOCK_SIZE));
        let a = obj("a");
        let (mut got, _) = cache.reserve(&a, 0..1, |_| BLOCK_SIZE, false);
        let (i, tx) = got.pop().unwrap();
        let received = Bytes::from(vec![5u8; 2 * BLOCK_SIZE as usize]);
        cache.fill(&a, i, tx, Ok(Block::shared(smallvec![received.slice(..BLOCK_SIZE as usize)])));
        let Probe::Ready(seq) = cache.probe(&(a.clone(), 0), false) else { panic!() };
        assert!(seq.is_shared(), "a sequential reader keeps the shared buffer");
        let Probe::Ready(own) = cache.probe(&(a.clone(), 0), true) else { panic!() };
        assert!(!own.is_shared());
        assert_ne!(own.to_bytes().as_ptr(), received.as_ptr());
        assert_eq!(own.to_bytes(), seq.to_bytes());
    }

    #[test]
    fn a_fetch_that_ends_without_a_result_fails_its_block() {
        let cache = Arc::new(BlockCache::new(8 * BLOCK_SIZE));
        let a = obj("a");
        let (mut got, _) = cache.reserve(&a, 0..1, |_| BLOCK_SIZE, false);
        let Probe::Pending(rx) = cache.probe(&(a.clone(), 0), true) else { panic!() };
        assert_eq!(cache.used(), BLOCK_SIZE);
        // The task holding the sender dies (panic, abort, early return).
        drop(got.pop());
        assert!(matches!(&*rx.borrow(), Some(Err(StoreError::Network(_)))), "waiters get an error");
        assert!(matches!(cache.probe(&(a.clone(), 0), true), Probe::Missing), "the next reader fetches again");
        assert_eq!(cache.used(), 0);
    }

    #[test]
    fn reservations_give_their_bytes_back_on_every_path() {
        let cache = Arc::new(BlockCache::new(8 * BLOCK_SIZE));
        let mut buffer = Reservation::empty(&cache, ReservationKind::WriteBuffer);
        buffer.absorb(cache.reserve_memory(ReservationKind::WriteBuffer, 3 * BLOCK_SIZE));
        let part = buffer.split(2 * BLOCK_SIZE, ReservationKind::UploadPart);
        assert_eq!(cache.reserved(ReservationKind::WriteBuffer), BLOCK_SIZE);
        assert_eq!(cache.reserved(ReservationKind::UploadPart), 2 * BLOCK_SIZE);
        // Full: nothing cached can make room for more.
        assert!(cache.try_reserve_memory(ReservationKind::DiskWrite, 6 * BLOCK_SIZE).is_none());
        // A task that panics while holding a part still gives it back.
        let held = std::thread::spawn(move || {
            let _part = part;
            panic!("upload task died");
        });
        assert!(held.join().is_err());
        assert_eq!(cache.reserved(ReservationKind::UploadPart), 0);
        buffer.shrink(BLOCK_SIZE / 2);
        assert_eq!(cache.used(), BLOCK_SIZE / 2);
        drop(buffer);
        assert_eq!(cache.used(), 0);
        // Reserving evicts cached blocks to make room.
        let (got, _) = cache.reserve(&obj("a"), 0..8, |_| BLOCK_SIZE, false);
        for (i, tx) in got {
            cache.fill(&obj_of(&tx), i, tx, Ok(Block::own(Bytes::from(vec![0u8; BLOCK_SIZE as usize]))));
        }
        let r = cache.try_reserve_memory(ReservationKind::DiskWrite, 4 * BLOCK_SIZE).expect("evicts");
        assert!(cache.used() <= cache.limit());
        drop(r);
    }

    fn obj_of(tx: &BlockSender) -> Arc<ObjectId> {
        tx.key.0.clone()
    }

    #[test]
    fn failed_fetch_is_not_cached() {
        let cache = Arc::new(BlockCache::new(8 * BLOCK_SIZE));
        let a = obj("a");
        let (mut got, _) = cache.reserve(&a, 0..1, |_| 10, false);
        let (i, tx) = got.pop().unwrap();
        let Probe::Pending(rx) = cache.probe(&(a.clone(), 0), true) else { panic!() };
        cache.fill(&a, i, tx, Err(StoreError::PreconditionFailed));
        assert_eq!(*rx.borrow(), Some(Err(StoreError::PreconditionFailed)));
        assert!(matches!(cache.probe(&(a.clone(), 0), true), Probe::Missing));
        assert_eq!(cache.used(), 0);
    }
}
