//! The per-handle reader: sequential detection and prefetch over the shared
//! block cache.
//!
//! - A read that does not continue the handle's previous read (a seek; also
//!   a handle's first read, unless it starts at offset 0) is taken as
//!   random: unless the cache has all its blocks, it is fetched for itself
//!   alone, as one ranged GET of exactly its bytes, and answered from that
//!   GET's buffers without going through the block cache. The kernel's page
//!   cache keeps what it read, so caching it here too would only hold memory;
//!   rounding it out to blocks would fetch up to 32 times the bytes of a
//!   4 KiB read. The kernel sends a random read whole (FUSE requests are as
//!   large as the read when `max_pages` allows, and a lone random read gets
//!   no readahead), so one read is one GET and one round trip. With a disk
//!   cache, which stores blocks, random reads go through the blocks.
//! - Reads that continue the previous one before the stream is known to be
//!   sequential, and the first read at offset 0, fetch the blocks they
//!   touch: a file read from its start with small reads is then served by
//!   one block GET, not one GET per read.
//! - Once reads have been contiguous for [`SEQUENTIAL_TRIGGER`] bytes, the
//!   reader keeps a window of blocks requested ahead of the read position. The
//!   window starts at [`INITIAL_WINDOW`] (less when the memory budget is
//!   small) and is kept full, as parallel ranged GETs of [`PREFETCH_CHUNK`]
//!   each, or larger ones from a near server (below). Each time a whole
//!   window has been read (the first, which includes the stream's start, is
//!   not measured) its read rate is compared with the
//!   best rate so far: the window doubles if the rate rose by at least
//!   [`GROWTH_GAIN`] percent (always after the first measured window), and
//!   if it did not, the last doubling is undone and the window stays. Behind
//!   a high-latency link more GETs in flight mean more speed and the window
//!   grows, up to the handle's maximum ([`MAX_WINDOW`], at most a quarter of
//!   the memory budget); when the server or the CPU is the limit it returns
//!   to where it started, which keeps the process small.
//! - A read that skips forward inside what was already requested, or steps
//!   back at most [`BACKWARD_SLACK`] (the kernel's readahead reorders reads),
//!   keeps the stream going. Anything else is a seek: the window resets.
//! - If the cache refuses prefetch room (memory pressure), the window halves,
//!   down to [`MIN_WINDOW`].
//! - How large a prefetch GET is depends on how far the server is. Far away
//!   (S3 over a WAN, or in-region S3 with its tens of milliseconds to the
//!   first byte) the window is covered by many GETs of [`PREFETCH_CHUNK`]:
//!   parallel requests are what fills a long link, and S3 serves each
//!   connection at a bounded rate. A near server (on this host, or a LAN
//!   away: [`ObjectStore::is_near`]) needs no such parallelism; there every
//!   request costs the server and the client a fixed share of CPU, which on
//!   a machine they share is the limit. Prefetch GETs there are half the
//!   window, up to [`NEAR_CHUNK`]: two or more in flight. Not with a disk
//!   cache, whose blocks a GET looks up one by one before it starts.
//!
//! Every GET carries `If-Match` with the ETag the handle was opened with, so a
//! handle never returns bytes from two versions of an object.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use smallvec::SmallVec;
use tokio::sync::watch;

use super::cache::{
    BLOCK_SIZE, Block, BlockCache, BlockKey, BlockSender, ObjectId, PageCacheFile, Probe, ReadData, ReservationKind,
};
use super::disk_cache::DiskCache;
use crate::store::{ObjectStore, StoreError};

/// Contiguous bytes, after the read that starts a run, before a handle
/// counts as sequential. Above the kernel's readahead of one random read
/// (at most 2 × 256 KiB), so random readers never trigger prefetch.
pub const SEQUENTIAL_TRIGGER: u64 = 1 << 20;
/// First prefetch window, once a stream is known to be sequential: eight
/// GETs in flight, so a stream runs at full speed from its start behind a
/// round trip of up to ~50 ms (64 MiB last 50 ms at 1.3 GB/s) instead of
/// growing there window by window. With 20 ms per request, a 1 GiB read
/// went from 0.66 to 0.69 of the raw client and bucketfs's CPU per GiB from
/// 0.88 to 0.72 s against a 16 MiB start (docs/bench/RESULTS.md). Capped by
/// the memory budget ([`Reader::window_cap`]).
pub const INITIAL_WINDOW: u64 = 64 << 20;
/// Smallest window: two prefetch GETs of [`PREFETCH_CHUNK`] (the size at this
/// window from any server), one arriving while the other is read. Memory
/// pressure halves a window down to this, and small budgets start here.
pub const MIN_WINDOW: u64 = 2 * PREFETCH_CHUNK;
/// Largest single ranged GET for blocks a read is waiting for.
pub const MAX_CHUNK: u64 = 8 << 20;
/// Size of each prefetch GET: small enough that many run in parallel (S3
/// and S3-compatible servers serve parallel ranges faster than one stream),
/// large enough that request overhead stays small. GETs start at multiples
/// of it: servers store objects in chunks or parts of a power-of-two size,
/// and a range that straddles their boundaries costs the server more (25 %
/// more CPU for SeaweedFS's 4 MiB chunks).
pub const PREFETCH_CHUNK: u64 = 8 << 20;
/// Largest prefetch GET, from a near server.
pub const NEAR_CHUNK: u64 = 32 << 20;
/// How far back a read may step and still count as sequential: the kernel
/// sends readahead requests from several threads, slightly out of order.
pub const BACKWARD_SLACK: u64 = 4 << 20;
/// Largest per-handle window, before the memory budget's own limit.
pub const MAX_WINDOW: u64 = 128 << 20;
/// How much faster (in percent) a stream must have become since the window
/// last grew for it to grow again.
pub const GROWTH_GAIN: f64 = 10.0;

#[derive(Debug, Default)]
struct State {
    /// A read has happened on this handle.
    started: bool,
    /// End of the previous read.
    next: u64,
    /// Contiguous bytes read after the read that started the run.
    streak: u64,
    /// Current prefetch window, 0 when not prefetching.
    window: u64,
    /// Everything before this offset has been requested.
    ahead: u64,
    /// Start (offset, time) of the current rate measurement.
    measured_from: Option<(u64, Instant)>,
    /// Best read rate seen, bytes per second.
    best_rate: f64,
    /// Windows read so far; the first includes the stream's start-up and is
    /// not measured.
    periods: u32,
    /// The window doubled at the last measurement.
    grew: bool,
    /// A doubling did not pay: the window no longer grows.
    settled: bool,
}

/// Size of the prefetch GETs of a `window`: [`PREFETCH_CHUNK`], or from a
/// `near` server half the window rounded down to a power of two (GETs stay
/// aligned to the server's chunks), from [`PREFETCH_CHUNK`] up to
/// [`NEAR_CHUNK`] (module doc).
fn prefetch_chunk(window: u64, near: bool) -> u64 {
    let half = (window / 2).max(1);
    match near {
        true => (1u64 << half.ilog2()).clamp(PREFETCH_CHUNK, NEAR_CHUNK),
        false => PREFETCH_CHUNK,
    }
}

/// Blocks to prefetch, and the size of the GETs that fetch them.
struct Prefetch {
    blocks: Range<u64>,
    chunk: u64,
}

/// A started read, and how it gets its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// From blocks of the cache, fetched or being fetched.
    Blocks(Range<u64>),
    /// From a GET of exactly its bytes, for it alone (a random read).
    Direct(Range<u64>),
}

impl Started {
    /// The bytes the read returns.
    pub fn range(&self) -> &Range<u64> {
        match self {
            Started::Blocks(r) | Started::Direct(r) => r,
        }
    }
}

/// Reads one version of one object for one open handle.
pub struct Reader {
    object: Arc<ObjectId>,
    size: u64,
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    disk: Option<Arc<DiskCache>>,
    max_window: u64,
    state: Mutex<State>,
    /// Becomes true when the handle closes: its prefetch GETs stop, even one
    /// waiting for the server's answer.
    closed: watch::Sender<bool>,
    /// The inode whose kernel page cache this handle's reads fill; `None`
    /// for O_DIRECT handles, whose reads bypass it.
    page_cache: Option<PageCacheFile>,
}

impl Reader {
    pub fn new(
        object: Arc<ObjectId>,
        size: u64,
        store: Arc<dyn ObjectStore>,
        cache: Arc<BlockCache>,
        disk: Option<Arc<DiskCache>>,
    ) -> Self {
        let max_window = MAX_WINDOW.min(cache.limit() / 4).max(MIN_WINDOW);
        let (state, closed) = (Mutex::new(State::default()), watch::Sender::new(false));
        Self { object, size, store, cache, disk, max_window, state, closed, page_cache: None }
    }

    /// Reads of this handle fill the page cache of inode `ino`: prefetch
    /// then skips what other handles of the inode already read.
    pub fn in_page_cache_of(mut self, ino: u64) -> Self {
        self.page_cache = Some((ino, self.object.clone()));
        self
    }

    pub fn object(&self) -> &ObjectId {
        &self.object
    }

    /// A reader of another version of the same file, for the same handle:
    /// same store, caches and page cache.
    pub fn successor(&self, object: Arc<ObjectId>, size: u64) -> Reader {
        let next = Reader::new(object, size, self.store.clone(), self.cache.clone(), self.disk.clone());
        match &self.page_cache {
            Some((ino, _)) => next.in_page_cache_of(*ino),
            None => next,
        }
    }

    fn block_len(size: u64) -> impl Fn(u64) -> u64 {
        move |i| (size - i * BLOCK_SIZE).min(BLOCK_SIZE)
    }

    /// Reads up to `len` bytes at `offset`; short only at end of file.
    pub async fn read(&self, offset: u64, len: u32) -> Result<ReadData, StoreError> {
        match self.start(offset, len) {
            Some(started) => self.finish(started).await,
            None => Ok(ReadData::default()),
        }
    }

    /// Starts a read and answers it without waiting when every block it
    /// spans is in memory: the common case of a stream that prefetch keeps
    /// ahead of. Otherwise returns the started range, for [`Self::finish`].
    pub fn read_now(&self, offset: u64, len: u32) -> Result<ReadData, Started> {
        let range = match self.start(offset, len) {
            None => return Ok(ReadData::default()),
            Some(Started::Blocks(range)) => range,
            Some(direct) => return Err(direct),
        };
        let sequential = self.is_sequential();
        let blocks = self.span(&range);
        let mut ready = Vec::with_capacity(blocks.clone().count());
        for index in blocks {
            match self.cache.probe(&self.key(index), !sequential) {
                Probe::Ready(b) => ready.push(b),
                _ => return Err(Started::Blocks(range)),
            }
        }
        for index in self.span(&range) {
            self.cache.hit();
            if sequential {
                self.cache.consumed(&self.key(index));
            }
        }
        Ok(self.assemble(&range, ready))
    }

    fn span(&self, range: &Range<u64>) -> std::ops::RangeInclusive<u64> {
        range.start / BLOCK_SIZE..=(range.end - 1) / BLOCK_SIZE
    }

    /// The read's bytes out of the blocks it spans.
    fn assemble(&self, range: &Range<u64>, blocks: Vec<Block>) -> ReadData {
        let mut parts = Vec::with_capacity(blocks.len() + 2);
        for (index, block) in self.span(range).zip(blocks) {
            let base = index * BLOCK_SIZE;
            let start = range.start.saturating_sub(base) as usize;
            block.slice_into(start..(range.end - base) as usize, &mut parts);
        }
        ReadData::from_parts(parts)
    }

    /// Finishes a read started by [`Self::read_now`]: fetches a random read's
    /// bytes, or waits for the blocks of any other.
    pub async fn finish(&self, started: Started) -> Result<ReadData, StoreError> {
        match started {
            Started::Direct(range) => self.read_direct(range).await,
            Started::Blocks(range) => self.finish_blocks(range).await,
        }
    }

    /// One ranged GET of exactly `range`, answered from the buffers the body
    /// arrives in; the bytes count in the budget until the answer is dropped.
    async fn read_direct(&self, range: Range<u64>) -> Result<ReadData, StoreError> {
        let len = range.end - range.start;
        let held = self.cache.reserve_memory(ReservationKind::DirectRead, len);
        let mut body = self.store.get_range(&self.object.key, Some(&self.object.etag), range.start, range.end).await?;
        let (mut parts, mut have) = (Vec::new(), 0u64);
        while have < len {
            match body.next().await {
                Some(Ok(mut chunk)) => {
                    chunk.truncate((len - have) as usize);
                    have += chunk.len() as u64;
                    parts.push(chunk);
                }
                Some(Err(e)) => return Err(e),
                None => return Err(StoreError::Network("the body ended before the requested range".into())),
            }
        }
        // Read the end of the body, so the connection returns to the pool.
        while let Some(Ok(_)) = body.next().await {}
        self.cache.fetched(len);
        Ok(ReadData::holding(parts, held))
    }

    /// Waits for the blocks of a read.
    async fn finish_blocks(&self, range: Range<u64>) -> Result<ReadData, StoreError> {
        let sequential = self.is_sequential();
        let mut blocks = Vec::new();
        for index in self.span(&range) {
            blocks.push(self.block(index, sequential).await?);
        }
        Ok(self.assemble(&range, blocks))
    }

    /// Updates the access pattern and starts the GETs a read at `offset`
    /// needs, with any prefetch it triggers. Returns the byte range it will
    /// return and how, `None` at or after the end of the file.
    fn start(&self, offset: u64, len: u32) -> Option<Started> {
        if offset >= self.size || len == 0 {
            return None;
        }
        let end = (offset + len as u64).min(self.size);
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        if let Some(file) = &self.page_cache {
            let whole_end = if end == self.size { last + 1 } else { end / BLOCK_SIZE };
            if self.cache.delivered(file, first..last + 1, offset.div_ceil(BLOCK_SIZE)..whole_end) {
                // Prefetch skipped blocks the kernel has lost since: plan
                // the window again from here.
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.ahead = st.ahead.min(end);
            }
        }
        let (prefetch, seek) = self.plan(offset, end);
        if seek && self.disk.is_none() && self.any_missing(first..last + 1) {
            return Some(Started::Direct(offset..end));
        }
        self.fetch(first..last + 1, None);
        // Blocks the kernel already has (another handle read them) are not
        // fetched: no read will come for them.
        let (parts, chunk) = match (prefetch, &self.page_cache) {
            (Some(p), Some(file)) => (self.cache.undelivered(file, p.blocks), p.chunk),
            (Some(p), None) => (vec![p.blocks], p.chunk),
            (None, _) => (Vec::new(), PREFETCH_CHUNK),
        };
        for part in parts {
            let requested = self.fetch(part.clone(), Some(chunk));
            if requested < part.end {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.ahead = st.ahead.min(requested * BLOCK_SIZE);
                st.window = (st.window / 2).max(MIN_WINDOW);
                break;
            }
        }
        Some(Started::Blocks(offset..end))
    }

    /// True if a block in `blocks` is neither cached nor being fetched.
    fn any_missing(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().any(|i| matches!(self.cache.probe(&self.key(i), false), Probe::Missing))
    }

    /// The largest window this handle may use now: sequential streams share
    /// half the memory budget, so prefetched blocks are not evicted by other
    /// streams' prefetch before they are read.
    fn window_cap(&self) -> u64 {
        let streams = self.cache.streams.load(Ordering::Relaxed).max(1) as u64;
        (self.cache.limit() / 2 / streams).clamp(MIN_WINDOW, self.max_window)
    }

    /// True once the handle reads sequentially (prefetch is running).
    fn is_sequential(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).window > 0
    }

    /// Updates the access pattern and returns the blocks to prefetch, and
    /// whether the read is a seek: it does not continue the previous read,
    /// and is not a handle's first read at offset 0.
    fn plan(&self, offset: u64, end: u64) -> (Option<Prefetch>, bool) {
        // With a disk cache, a GET's blocks are looked up there one by one
        // first: many smaller GETs keep that parallel.
        let near = self.disk.is_none() && self.store.is_near();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let sequential =
            st.started && offset + BACKWARD_SLACK >= st.next && offset <= st.next.max(st.ahead) + BLOCK_SIZE;
        let seek = !sequential && (st.started || offset > 0);
        if sequential {
            st.streak += end.saturating_sub(st.next.max(offset));
        } else {
            if st.window > 0 {
                crate::metrics::metrics().prefetch_restarts.inc();
                self.cache.streams.fetch_sub(1, Ordering::Relaxed);
            }
            *st = State { started: true, ..State::default() };
        }
        st.next = st.next.max(end);
        if st.streak < SEQUENTIAL_TRIGGER || end >= self.size {
            return (None, seek);
        }
        if st.window == 0 {
            st.window = INITIAL_WINDOW.min(self.window_cap());
            self.cache.streams.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(key = %self.object.key, window = st.window, near, "sequential: prefetch starts");
        }
        // Keep the whole window requested, in GETs that end on multiples of
        // the chunk: the first one up to the next multiple after `from`
        // (shorter when the chunk grew or room was refused), the others whole.
        let chunk = prefetch_chunk(st.window, near);
        let from = st.ahead.max(end);
        let to = ((end + st.window) / chunk * chunk).min(self.size);
        if to < (from / chunk + 1) * chunk && to < self.size {
            return (None, seek);
        }
        st.ahead = to;
        self.adapt_window(&mut st, end, Instant::now());
        ((from < to).then(|| Prefetch { blocks: from / BLOCK_SIZE..to.div_ceil(BLOCK_SIZE), chunk }), seek)
    }

    /// Each time a whole window has been read (the first, which includes the
    /// stream's start, is not measured): if the read rate rose by
    /// [`GROWTH_GAIN`] over the best so far (always, for the first measured
    /// window), the window doubles; if not, the last doubling did not pay,
    /// so it is undone and the window stays. Always within the current cap.
    fn adapt_window(&self, st: &mut State, end: u64, now: Instant) {
        let cap = self.window_cap();
        match st.measured_from {
            None => st.measured_from = Some((end, now)),
            Some((from, since)) if end >= from + st.window => {
                let rate = (end - from) as f64 / now.duration_since(since).as_secs_f64().max(1e-6);
                if st.periods > 0 && !st.settled {
                    let before = st.window;
                    if rate > st.best_rate * (1.0 + GROWTH_GAIN / 100.0) {
                        st.window = (st.window * 2).min(cap);
                    } else {
                        if st.grew {
                            st.window = (st.window / 2).max(MIN_WINDOW);
                        }
                        st.settled = true;
                    }
                    st.grew = st.window > before;
                    st.best_rate = st.best_rate.max(rate);
                }
                st.periods += 1;
                st.measured_from = Some((end, now));
            }
            Some(_) => {}
        }
        st.window = st.window.min(cap);
    }

    /// Starts GETs for the missing blocks in `blocks`: a read's own (GETs of
    /// up to [`MAX_CHUNK`]), or prefetch (`Some(chunk)`: optional, in GETs of
    /// `chunk` that start at its multiples). Returns the block index up to
    /// which blocks are requested (less than `blocks.end` when the cache
    /// refused optional room).
    fn fetch(&self, blocks: Range<u64>, prefetch: Option<u64>) -> u64 {
        let optional = prefetch.is_some();
        let (reserved, refused) =
            self.cache.reserve(&self.object, blocks.clone(), Self::block_len(self.size), optional);
        let reached = refused.unwrap_or(blocks.end);
        let chunk_blocks = prefetch.unwrap_or(MAX_CHUNK) / BLOCK_SIZE;
        let mut run: Vec<(u64, BlockSender)> = Vec::new();
        for (index, tx) in reserved {
            let contiguous = run.last().is_none_or(|(last, _)| *last + 1 == index);
            let boundary = optional && !run.is_empty() && index.is_multiple_of(chunk_blocks);
            if !contiguous || boundary || run.len() as u64 >= chunk_blocks {
                self.spawn_get(std::mem::take(&mut run), optional);
            }
            run.push((index, tx));
        }
        if !run.is_empty() {
            self.spawn_get(run, optional);
        }
        reached
    }

    /// Fills a run of consecutive blocks: from the disk cache where it has
    /// them, the rest with ranged GETs that fill blocks as bytes arrive.
    /// Prefetched blocks (`prefetch`) are slices of the buffers the body
    /// arrives in (see [`Block`]), and their GETs stop when the handle closes
    /// (a reader that stops early does not leave a window's worth of GETs
    /// running); blocks a read asked for get their own allocation, as they
    /// are likely to be kept on their own.
    fn spawn_get(&self, run: Vec<(u64, BlockSender)>, prefetch: bool) {
        let closed = prefetch.then(|| self.closed.subscribe());
        let store = self.store.clone();
        let cache = self.cache.clone();
        let disk = self.disk.clone();
        let object = self.object.clone();
        let size = self.size;
        tokio::spawn(async move {
            let block_len = Self::block_len(size);
            let mut missing = Vec::with_capacity(run.len());
            match &disk {
                Some(d) => {
                    for (i, tx) in run {
                        match d.get(&object, i).await {
                            Some(b) if b.len() as u64 == block_len(i) => {
                                crate::metrics::metrics().disk_cache_hits.inc();
                                cache.fill(&object, i, tx, Ok(Block::own(b)));
                            }
                            _ => missing.push((i, tx)),
                        }
                    }
                }
                None => missing = run,
            }
            // Consecutive stretches of what is still missing, one GET each.
            let mut stretch: Vec<(u64, BlockSender)> = Vec::new();
            for (i, tx) in missing {
                if stretch.last().is_some_and(|(last, _)| *last + 1 != i) {
                    let stretch = std::mem::take(&mut stretch);
                    Self::get_run(&*store, &cache, disk.as_ref(), &object, size, stretch, closed.clone()).await;
                }
                stretch.push((i, tx));
            }
            if !stretch.is_empty() {
                Self::get_run(&*store, &cache, disk.as_ref(), &object, size, stretch, closed.clone()).await;
            }
        });
    }

    async fn get_run(
        store: &dyn ObjectStore,
        cache: &Arc<BlockCache>,
        disk: Option<&Arc<DiskCache>>,
        object: &Arc<ObjectId>,
        size: u64,
        run: Vec<(u64, BlockSender)>,
        closed: Option<watch::Receiver<bool>>,
    ) {
        let shared = closed.is_some();
        // Resolves when the handle this prefetch is for closes; never for
        // blocks a read asked for.
        let cancel = async move {
            match closed {
                Some(mut rx) => drop(rx.wait_for(|c| *c).await),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(cancel);
        let block_len = Self::block_len(size);
        let start = run[0].0 * BLOCK_SIZE;
        let end = (run[run.len() - 1].0 * BLOCK_SIZE + block_len(run[run.len() - 1].0)).min(size);
        let mut pending = run.into_iter();
        let fail = |pending: &mut dyn Iterator<Item = (u64, BlockSender)>, e: StoreError| {
            for (i, tx) in pending {
                cache.fill(object, i, tx, Err(e.clone()));
            }
        };
        let mut body = tokio::select! {
            biased;
            _ = &mut cancel => return fail(&mut pending, StoreError::Cancelled),
            got = store.get_range(&object.key, Some(&object.etag), start, end) => match got {
                Ok(b) => b,
                Err(e) => return fail(&mut pending, e),
            },
        };
        // Blocks are slices of the buffers the body arrives in: no copy.
        let mut current = pending.next();
        let (mut pieces, mut have) = (SmallVec::new(), 0);
        while current.is_some() {
            let next = tokio::select! {
                biased;
                _ = &mut cancel => return fail(&mut current.take().into_iter().chain(pending), StoreError::Cancelled),
                next = body.next() => next,
            };
            match next {
                Some(Ok(mut chunk)) => {
                    while !chunk.is_empty() {
                        let Some((index, _)) = &current else { break };
                        let want = block_len(*index) as usize;
                        let take = (want - have).min(chunk.len());
                        pieces.push(chunk.split_to(take));
                        have += take;
                        if have == want {
                            let Some((i, tx)) = current.take() else { break };
                            current = pending.next();
                            let block = Block::shared(std::mem::take(&mut pieces));
                            let block = if shared { block } else { block.to_own() };
                            have = 0;
                            // Skipped when the budget has no room: the disk
                            // cache is an optimisation, memory is a bound.
                            if let Some(d) = disk
                                && let Some(held) =
                                    cache.try_reserve_memory(ReservationKind::DiskWrite, 2 * block.len() as u64)
                            {
                                d.put(object, size, i, block.clone(), held);
                            }
                            cache.fill(object, i, tx, Ok(block));
                        }
                    }
                }
                Some(Err(e)) => return fail(&mut current.take().into_iter().chain(pending), e),
                None => {
                    let e = StoreError::Network("the body ended before the requested range".into());
                    return fail(&mut current.take().into_iter().chain(pending), e);
                }
            }
        }
        // Read the end of the body, so the connection returns to the pool
        // instead of being closed.
        while let Some(Ok(_)) = body.next().await {}
    }

    fn key(&self, index: u64) -> BlockKey {
        (self.object.clone(), index)
    }

    /// Waits for block `index`, fetching it again if it was evicted or failed
    /// under another reader. A sequential stream then marks it consumed.
    async fn block(&self, index: u64, sequential: bool) -> Result<Block, StoreError> {
        let key = self.key(index);
        let block = self.wait_block(&key, sequential).await;
        if sequential && block.is_ok() {
            self.cache.consumed(&key);
        }
        block
    }

    async fn wait_block(&self, key: &BlockKey, sequential: bool) -> Result<Block, StoreError> {
        let index = key.1;
        for _ in 0..4 {
            match self.cache.probe(key, !sequential) {
                Probe::Ready(b) => {
                    self.cache.hit();
                    return Ok(b);
                }
                Probe::Pending(mut rx) => {
                    let result = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
                    match result {
                        // Another handle's prefetch, stopped as it closed:
                        // fetch the block here.
                        Ok(Some(Err(StoreError::Cancelled))) => {
                            self.cache.stats.cancelled_waits.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Ok(Some(r)) => return r,
                        _ => return Err(StoreError::Network("block fetch was abandoned".into())),
                    }
                }
                Probe::Missing => {
                    self.fetch(index..index + 1, None);
                }
            }
        }
        Err(StoreError::Network("block was evicted repeatedly; memory limit too small".into()))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.closed.send_replace(true);
        if self.state.lock().unwrap_or_else(|e| e.into_inner()).window > 0 {
            self.cache.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn setup(len: usize, limit: u64) -> (Arc<MemoryStore>, Reader, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let store = Arc::new(MemoryStore::new());
        let etag = store.insert("k", data.clone());
        let object = Arc::new(ObjectId { source: "t".into(), key: "k".into(), etag });
        let reader = Reader::new(object, len as u64, store.clone(), Arc::new(BlockCache::new(limit)), None);
        (store, reader, data)
    }

    #[tokio::test]
    async fn every_offset_and_size_is_correct() {
        let len = 3 * BLOCK_SIZE as usize + 12345;
        let (_, reader, data) = setup(len, 64 << 20);
        for (off, n) in [
            (0, 1),
            (0, 4096),
            (BLOCK_SIZE as usize - 1, 2),
            (1000, 300_000),
            (len - 1, 10),
            (len, 10),
            (len + 5, 1),
            (0, len as u32 as usize + 100),
        ] {
            let got = reader.read(off as u64, n as u32).await.unwrap().to_vec();
            let want = &data[off.min(len)..(off + n).min(len)];
            assert_eq!(&got[..], want, "offset {off} len {n}");
        }
    }

    #[tokio::test]
    async fn sequential_reads_prefetch_and_random_reads_do_not() {
        let len = 32 << 20;
        let (store, reader, data) = setup(len, 64 << 20);
        let mut off = 0;
        while off < len {
            let got = reader.read(off as u64, 128 * 1024).await.unwrap().to_vec();
            assert_eq!(&got[..], &data[off..off + 128 * 1024]);
            off += 128 * 1024;
        }
        let gets = store.requests.lock().unwrap()["get"];
        assert!(gets < 40, "sequential read of 32 MiB took {gets} GETs");

        let (store, reader, _) = setup(len, 64 << 20);
        for i in 0..20u64 {
            let off = (i * 7_919 * 4096) % (len as u64 - 300_000);
            reader.read(off, 256 * 1024).await.unwrap();
        }
        let fetched = reader.cache.stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(fetched <= 2 * 20 * 256 * 1024, "random reads fetched {fetched} bytes");
        drop(store);
    }

    /// From a near server a sequential stream is prefetched in GETs of half
    /// the window (up to 32 MiB), from a far one in 8 MiB GETs; the bytes
    /// are the same.
    #[tokio::test]
    async fn a_near_server_gets_fewer_larger_prefetch_gets() {
        let len = 256 << 20;
        let mut counts = Vec::new();
        for near in [false, true] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let store = Arc::new(MemoryStore::new());
            store.set_near(near);
            let etag = store.insert("k", data.clone());
            let object = Arc::new(ObjectId { source: "t".into(), key: "k".into(), etag });
            let reader = Reader::new(object, len as u64, store.clone(), Arc::new(BlockCache::new(512 << 20)), None);
            for off in (0..len).step_by(1 << 20) {
                let got = reader.read(off as u64, 1 << 20).await.unwrap().to_vec();
                assert_eq!(&got[..], &data[off..off + (1 << 20)], "near {near}, offset {off}");
            }
            assert_eq!(reader.cache.stats.fetched_bytes.load(Ordering::Relaxed), len as u64, "fetched once");
            counts.push(gets(&store));
        }
        let (far, near) = (counts[0], counts[1]);
        assert!(far >= 256 / 8, "far: {far} GETs for 256 MiB");
        assert!(near <= 256 / 32 + 4, "near: {near} GETs for 256 MiB");
    }

    #[test]
    fn near_prefetch_gets_are_half_the_window_in_powers_of_two() {
        const M: u64 = 1 << 20;
        for (window, near, chunk) in [
            (64 * M, true, 32 * M),
            (128 * M, true, 32 * M),
            (48 * M, true, 16 * M),
            (16 * M, true, 8 * M),
            (64 * M, false, 8 * M),
        ] {
            assert_eq!(prefetch_chunk(window, near), chunk, "window {window}, near {near}");
        }
    }

    /// A server found near in the middle of a stream: the window goes on
    /// from where it was requested, in GETs that realign to the larger
    /// chunk, with every byte right and fetched once, and the stream never
    /// waits for a whole window to drain (no GET of a block a read waits for).
    #[tokio::test]
    async fn a_stream_turning_near_midway_realigns_its_gets() {
        let len = 192 << 20;
        let (store, reader, data) = setup(len, 512 << 20);
        for off in (0..len).step_by(1 << 20) {
            if off == 20 << 20 {
                store.set_near(true);
            }
            let got = reader.read(off as u64, 1 << 20).await.unwrap().to_vec();
            assert_eq!(&got[..], &data[off..off + (1 << 20)], "offset {off}");
        }
        assert_eq!(reader.cache.stats.fetched_bytes.load(Ordering::Relaxed), len as u64, "fetched once");
        let n = gets(&store);
        // 2 for the first reads, 10 of 8 MiB up to 80 MiB, 1 up to 96, then
        // 32 MiB each: 16 (26 if every GET stayed at 8 MiB).
        assert!((10..=18).contains(&n), "{n} GETs for 192 MiB");
    }

    fn gets(store: &MemoryStore) -> u64 {
        store.requests.lock().unwrap().get("get").copied().unwrap_or(0)
    }

    /// Random reads (seeks) are one GET each of exactly their bytes, answered
    /// without the block cache: nothing is cached or held once the answers
    /// are dropped, and a 4 KiB read fetches 4 KiB, not a block.
    #[tokio::test]
    async fn random_reads_fetch_exactly_their_bytes_once() {
        let len = 64 << 20;
        let (store, reader, data) = setup(len, 64 << 20);
        let mut read = 0u64;
        for (i, bs) in (1..65u64).zip([4096usize, 256 << 10, 12_345].into_iter().cycle()) {
            // Steps of 9 MiB + 4 KiB (or back 54 MiB): never a continuation.
            let off = ((i * ((9 << 20) + 4096)) % (len as u64 - (1 << 20))) as usize;
            let got = match reader.read_now(off as u64, bs as u32) {
                Ok(_) => panic!("read {i} at {off} was in memory"),
                Err(started) => reader.finish(started).await.unwrap(),
            };
            assert_eq!(got.to_vec(), &data[off..off + bs], "read {i} at {off}");
            read += bs as u64;
            assert_eq!(gets(&store), i, "one GET per random read");
            assert_eq!(reader.cache.stats.fetched_bytes.load(Ordering::Relaxed), read, "exactly the bytes read");
            assert_eq!(reader.cache.reserved(ReservationKind::DirectRead), bs as u64, "held while answered");
        }
        assert_eq!(reader.cache.used(), 0, "nothing cached, nothing held");
        assert!(!reader.is_sequential());
    }

    /// A random read whose GET fails (the server, or a changed object) fails
    /// with the store's error and gives its budget bytes back; the next one
    /// works.
    #[tokio::test]
    async fn a_failed_random_read_gives_its_budget_back() {
        use crate::store::faulty::{Fault, FaultyStore, Rule};
        let len = 16 << 20;
        let (mem, _, data) = setup(len, 64 << 20);
        let faults = Arc::new(FaultyStore::new(mem.clone(), 1));
        let object =
            Arc::new(ObjectId { source: "t".into(), key: "k".into(), etag: mem.head("k").await.unwrap().etag });
        let cache = Arc::new(BlockCache::new(64 << 20));
        let reader = Reader::new(object, len as u64, faults.clone(), cache.clone(), None);
        let failures = [StoreError::Network("injected".into()), StoreError::PreconditionFailed];
        for (offset, error) in [2u64 << 20, 11 << 20].into_iter().zip(failures) {
            faults.add(Rule::nth("get", 0, Fault::Fail(error)));
            let started = reader.read_now(offset, 256 << 10).expect_err("a random read is not in memory");
            assert!(matches!(started, Started::Direct(_)), "{started:?}");
            assert!(reader.finish(started).await.is_err());
            assert_eq!(cache.reserved(ReservationKind::DirectRead), 0, "budget bytes held after a failed read");
            faults.clear();
        }
        let got = reader.read(6 << 20, 4096).await.unwrap();
        assert_eq!(got.to_vec(), &data[6 << 20..(6 << 20) + 4096]);
        drop(got);
        assert_eq!(cache.reserved(ReservationKind::DirectRead), 0);
    }

    /// A file read from its start, or from a seek on, with small reads goes
    /// through the blocks after its first read: one block GET serves many
    /// reads, and the stream turns sequential and prefetches as before.
    #[tokio::test]
    async fn small_reads_that_continue_use_blocks() {
        let len = 16 << 20;
        let (store, reader, data) = setup(len, 64 << 20);
        // From offset 0: the first read fetches its block, the next 31 hit it.
        for off in (0..BLOCK_SIZE as usize).step_by(4096) {
            assert_eq!(reader.read(off as u64, 4096).await.unwrap().to_vec(), &data[off..off + 4096]);
        }
        assert_eq!(gets(&store), 1);
        // A seek: its own 4 KiB GET; the reads that continue it fetch the
        // block they are in (one GET), then hit it.
        let at = 5 * BLOCK_SIZE as usize + 8192;
        for off in (at..at + 16 * 4096).step_by(4096) {
            assert_eq!(reader.read(off as u64, 4096).await.unwrap().to_vec(), &data[off..off + 4096]);
        }
        assert_eq!(gets(&store), 3);
        // Going on sequentially turns prefetch on, as before.
        let mut off = at + 16 * 4096;
        while off + (256 << 10) <= len {
            assert_eq!(reader.read(off as u64, 256 << 10).await.unwrap().to_vec(), &data[off..off + (256 << 10)]);
            off += 256 << 10;
        }
        assert!(gets(&store) < 10, "{} GETs", gets(&store));
    }

    /// A random read whose blocks another handle has cached is answered from
    /// them, without a GET.
    #[tokio::test]
    async fn random_reads_of_cached_blocks_are_answered_from_memory() {
        let len = 8 << 20;
        let (store, first, data) = setup(len, 64 << 20);
        first.read(0, 2 << 20).await.unwrap();
        let before = gets(&store);
        let other = Reader::new(first.object.clone(), len as u64, store.clone(), first.cache.clone(), None);
        let got = other.read_now(1 << 20, 256 << 10).expect("in memory");
        assert_eq!(got.to_vec(), &data[1 << 20..(1 << 20) + (256 << 10)]);
        assert_eq!(gets(&store), before);
    }

    /// Prefetch skips blocks another handle's reads put in the kernel's page
    /// cache: quarter readers fetch the object about once. Blocks asked for
    /// again (the page cache lost them) are prefetched as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_skips_blocks_the_kernel_already_has() {
        let len = 64 << 20;
        let q = len / 4;
        let (store, first, data) = setup(len, 32 << 20);
        let handle = || {
            Reader::new(first.object.clone(), len as u64, store.clone(), first.cache.clone(), None).in_page_cache_of(1)
        };
        let read_range = |reader: Reader, range: Range<usize>| {
            let data = &data;
            async move {
                for off in range.step_by(1 << 20) {
                    let got = reader.read(off as u64, 1 << 20).await.unwrap().to_vec();
                    assert_eq!(&got[..], &data[off..off + (1 << 20)], "at {off}");
                }
                // Let the window's GETs land before the handle closes, as
                // they do over a network long before a reader gets there.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        };
        // Last quarter first, so every stream's window runs into a quarter
        // read before.
        for k in (0..4).rev() {
            read_range(handle(), k * q..(k + 1) * q).await;
        }
        let fetched = first.cache.stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(fetched <= len as u64 + (len as u64) / 16, "4 quarter readers fetched {fetched} bytes for {len}");

        // The whole object again (as after the page cache was dropped): the
        // first read shows the kernel lost it, and prefetch runs as usual.
        let gets_before = store.requests.lock().unwrap()["get"];
        read_range(handle(), 0..len).await;
        let gets = store.requests.lock().unwrap()["get"] - gets_before;
        assert!(gets < 30, "a second pass over 64 MiB took {gets} GETs");
    }

    /// A page cache lost behind the reader's back is noticed at the first
    /// read touching a recorded block, also one that straddles blocks, and
    /// the stream goes on with prefetch: no run of small GETs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_page_cache_is_noticed_and_prefetch_resumes() {
        let len = 64usize << 20;
        let (store, first, data) = setup(len, 32 << 20);
        let handle = || {
            Reader::new(first.object.clone(), len as u64, store.clone(), first.cache.clone(), None).in_page_cache_of(1)
        };
        // One handle reads 32..48 MiB; its pages are then lost (as after
        // eviction), and a second handle streams the whole object with
        // requests that straddle blocks (4 KiB past each 128 KiB boundary).
        let a = handle();
        for off in ((32usize << 20)..(48 << 20)).step_by(1 << 20) {
            a.read(off as u64, 1 << 20).await.unwrap();
        }
        drop(a);
        let gets_before = store.requests.lock().unwrap()["get"];
        let b = handle();
        let mut off = 0;
        while off < len {
            let n = (128 << 10).min(len - off);
            let got = b.read(off as u64, n as u32).await.unwrap().to_vec();
            assert_eq!(&got[..], &data[off..off + n], "at {off}");
            off += if off == 0 { 4096 } else { n };
        }
        let gets = store.requests.lock().unwrap()["get"] - gets_before;
        assert!(gets < 30, "streaming 64 MiB through a lost page cache took {gets} GETs");
    }

    #[tokio::test]
    async fn reads_are_answered_from_the_blocks_without_copying() {
        let len = 16 << 20;
        let (_, reader, data) = setup(len, 64 << 20);
        for i in 0..16usize {
            let got = reader.read((i << 20) as u64, 1 << 20).await.unwrap();
            assert_eq!(got.to_vec(), &data[i << 20..(i + 1) << 20]);
        }
        // A read across two blocks the stream keeps, twice: the same bytes
        // in the same memory.
        let at = |d: &ReadData| d.io_slices().iter().map(|s| s.as_ptr()).collect::<Vec<_>>();
        let mid = 15 << 20;
        let (a, b) = (reader.read(mid - 100, 200).await.unwrap(), reader.read(mid - 100, 200).await.unwrap());
        assert_eq!(a.to_vec(), &data[mid as usize - 100..mid as usize + 100]);
        assert!(a.io_slices().len() >= 2, "one piece per block at least");
        assert_eq!(at(&a), at(&b), "both replies point into the cached blocks");
    }

    #[tokio::test]
    async fn read_now_answers_from_memory_or_defers() {
        let len = 8 << 20;
        let (_, reader, data) = setup(len, 64 << 20);
        // Nothing fetched yet: the read starts the GET and defers.
        let started = reader.read_now(0, 1 << 20).unwrap_err();
        assert_eq!(started, Started::Blocks(0..1 << 20));
        assert_eq!(reader.finish(started).await.unwrap().to_vec(), &data[..1 << 20]);
        // Fetched blocks are answered at once, with the right bytes.
        let now = reader.read_now(1000, 5000).expect("in memory");
        assert_eq!(now.to_vec(), &data[1000..6000]);
        // Past the end: an empty answer, not a deferral.
        assert!(reader.read_now(len as u64, 10).expect("end of file").is_empty());
    }

    /// Feeds `adapt_window` a stream read at `rate(window)` bytes per second
    /// and returns the window it settles on.
    fn settle(rate: impl Fn(u64) -> f64) -> u64 {
        let (_, reader, _) = setup(BLOCK_SIZE as usize, 1 << 30);
        let mut st = State { window: INITIAL_WINDOW.min(reader.window_cap()), ..State::default() };
        let (start, mut end, mut secs) = (Instant::now(), 0u64, 0.0);
        for _ in 0..400 {
            reader.adapt_window(&mut st, end, start + std::time::Duration::from_secs_f64(secs));
            end += PREFETCH_CHUNK;
            secs += PREFETCH_CHUNK as f64 / rate(st.window);
        }
        st.window
    }

    #[test]
    fn window_grows_only_while_it_pays() {
        // Server- or CPU-bound: the same rate whatever the window.
        assert_eq!(settle(|_| 700e6), INITIAL_WINDOW);
        // Latency-bound: the rate follows the GETs in flight, up to the cap.
        assert_eq!(settle(|w| w as f64 * 20.0), MAX_WINDOW);
        // Saturates below the first window: it never grows.
        assert_eq!(settle(|w| w.min(32 << 20) as f64 * 20.0), INITIAL_WINDOW);
    }

    #[tokio::test]
    async fn closing_a_handle_stops_its_prefetch_and_others_still_read() {
        let len = 64 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let store = Arc::new(MemoryStore::new());
        let etag = store.insert("k", data.clone());
        let object = Arc::new(ObjectId { source: "t".into(), key: "k".into(), etag });
        // A budget whose windows (16 MiB) are smaller than the object.
        let cache = Arc::new(BlockCache::new(64 << 20));
        let open = || Reader::new(object.clone(), len as u64, store.clone(), cache.clone(), None);
        // A sequential reader starts a prefetch window; its last read (not
        // awaited) tops the window up, and the handle closes before those
        // GETs have run.
        let first = open();
        for i in 0..2u64 {
            first.read(i << 20, 1 << 20).await.unwrap();
        }
        let _ = first.read_now(15 << 20, 1 << 20);
        drop(first);
        let gets_before = store.requests.lock().unwrap()["get"];
        // Another handle reads the whole object: blocks the closed handle's
        // cancelled GETs would have filled are fetched again, never an error.
        // It starts where the cancelled GETs were, while they are still
        // pending, then reads the rest.
        let second = open();
        for off in ((16usize << 20)..len).chain(0..16 << 20).step_by(1 << 20) {
            let got = second.read(off as u64, 1 << 20).await.unwrap();
            assert_eq!(got.to_vec(), &data[off..off + (1 << 20)]);
        }
        let fetched = cache.stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(fetched <= len as u64 + (8 << 20), "fetched {fetched} for {len}");
        assert!(cache.stats.cancelled_waits.load(Ordering::Relaxed) > 0, "no wait met a cancelled GET");
        assert!(store.requests.lock().unwrap()["get"] > gets_before);
        assert!(cache.used() <= cache.limit());
    }

    #[tokio::test]
    async fn changed_object_fails_instead_of_mixing() {
        let len = 4 * BLOCK_SIZE as usize;
        let (store, reader, _) = setup(len, 64 << 20);
        reader.read(0, 100).await.unwrap();
        store.insert("k", vec![1u8; len]);
        let err = reader.read(2 * BLOCK_SIZE, 100).await.unwrap_err();
        assert_eq!(err, StoreError::PreconditionFailed);
    }
}
