//! Model-checked concurrency of the writer registry and the budget, with
//! shuttle: each test runs many random interleavings of a few threads and
//! checks the invariants in every one. Run with
//! `cargo test --features shuttle --lib shuttle` (the `shuttle` feature
//! puts the core's mutexes on shuttle's, so only these tests run with it).
//!
//! - Openers of one file racing each other, a failing opener and the last
//!   user's retirement: at most one writer per inode at any time, every
//!   opener gets the writer in the registry, and the registry ends empty.
//! - Reservations taken, split, merged, shrunk and dropped from several
//!   threads: the budget never passes its limit through `try_reserve`, no
//!   count goes negative, and everything comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use shuttle::future::block_on;
use shuttle::thread;

use super::cache::{BLOCK_SIZE, BlockCache, ReservationKind};
use super::writers::{Left, WriterEntry, Writers};
use super::{MountPoint, write::Writer};
use crate::store::memory::MemoryStore;

const ITERATIONS: usize = 2_000;

fn entry(cache: &Arc<BlockCache>) -> WriterEntry {
    let store = Arc::new(MemoryStore::new());
    let mount = Arc::new(MountPoint {
        name: "m".into(),
        store: store.clone(),
        prefix: String::new(),
        read_only: false,
        ttl: std::time::Duration::from_secs(1),
        source_id: "memory".into(),
    });
    let writer = Writer::streaming(store, "k".into(), cache.clone(), std::path::Path::new("/tmp"), None);
    WriterEntry { writer: tokio::sync::Mutex::new(writer), mount, size: Default::default(), local: Default::default() }
}

/// Joins the writer of inode 1 (making it if needed), checks it is the one
/// registered, leaves, and retires it if this was the last user. `holding`
/// counts threads between a successful join and their leave: a new writer
/// may only be made while nobody holds one.
fn open_use_close(reg: &Writers, cache: &Arc<BlockCache>, made: &AtomicUsize, holding: &AtomicUsize, fail: bool) {
    let joined = block_on(reg.join(1, || async {
        if fail {
            return Err("HEAD failed");
        }
        made.fetch_add(1, Ordering::SeqCst);
        assert_eq!(holding.load(Ordering::SeqCst), 0, "a second writer made while one is in use");
        Ok(entry(cache))
    }));
    let Ok((w, _)) = joined else { return };
    holding.fetch_add(1, Ordering::SeqCst);
    let current = reg.get(1).expect("a user's writer is registered");
    assert!(Arc::ptr_eq(&current, &w), "an opener got a writer other than the registered one");
    thread::yield_now();
    holding.fetch_sub(1, Ordering::SeqCst);
    if let Left::Last(last) = reg.leave(1, &w) {
        reg.retire(1, &last);
    }
}

#[test]
fn shuttle_openers_of_one_inode_share_one_writer() {
    shuttle::check_random(
        || {
            let reg = Arc::new(Writers::default());
            let cache = Arc::new(BlockCache::new(16 * BLOCK_SIZE));
            let made = Arc::new(AtomicUsize::new(0));
            let holding = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..3)
                .map(|t| {
                    let (reg, cache, made, holding) = (reg.clone(), cache.clone(), made.clone(), holding.clone());
                    // The first thread's opener fails: the others must not
                    // be left waiting or lose their slot.
                    thread::spawn(move || open_use_close(&reg, &cache, &made, &holding, t == 0))
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert!(reg.is_empty(), "a slot is left in the registry");
            assert!(made.load(Ordering::SeqCst) >= 1);
        },
        ITERATIONS,
    );
}

#[test]
fn shuttle_reservations_never_pass_the_limit_or_leak() {
    shuttle::check_random(
        || {
            let limit = 8 * BLOCK_SIZE;
            let cache = Arc::new(BlockCache::new(limit));
            let threads: Vec<_> = (0..3u64)
                .map(|t| {
                    let cache = cache.clone();
                    thread::spawn(move || {
                        let n = (t + 1) * BLOCK_SIZE;
                        let Some(mut held) = cache.try_reserve_memory(ReservationKind::WriteBuffer, n) else {
                            return;
                        };
                        assert!(cache.used() <= limit, "over the limit: {}", cache.used());
                        thread::yield_now();
                        let part = held.split(n / 2, ReservationKind::UploadPart);
                        if let Some(more) = cache.try_reserve_memory(ReservationKind::DiskWrite, BLOCK_SIZE) {
                            assert!(cache.used() <= limit);
                            held.absorb(more);
                        }
                        thread::yield_now();
                        held.shrink(BLOCK_SIZE / 2);
                        drop(part);
                        drop(held);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            for kind in ReservationKind::ALL {
                assert_eq!(cache.reserved(kind), 0, "{kind:?} left reserved");
            }
            assert_eq!(cache.used(), 0);
        },
        ITERATIONS,
    );
}
