//! Cleanup paths under failure, through the fault-injecting store: after a
//! failed streamed upload, a failed staged upload, a failed copy, an abort
//! that fails too, and a writer dropped mid-upload, the budget is back to
//! zero and no multipart upload is left open. Also: concurrent openers of
//! one file share one writer, a writer that finds no room in the budget
//! waits a bounded time, then fails with ENOBUFS, a file created from the
//! FUSE thread fails its flush when its PUT fails, and a local writer (write
//! passthrough) uploads what was written into its file, conditionally, and
//! fills it from a cache file only of the version it started from.

use std::sync::Arc;
use std::time::Duration;

use super::cache::ReservationKind;
use super::{Fs, FsError, MountPoint};
use crate::spec::FsSettings;
use crate::store::faulty::{Fault, FaultyStore, Rule};
use crate::store::memory::MemoryStore;
use crate::store::{ObjectStore, StoreError};

pub(super) struct Setup {
    pub fs: Arc<Fs>,
    pub mem: Arc<MemoryStore>,
    pub faults: Arc<FaultyStore>,
    pub mount: Arc<MountPoint>,
}

pub(super) fn setup(limit: u64, seed: u64) -> Setup {
    setup_with_ttl(limit, seed, Duration::from_secs(60))
}

pub(super) fn setup_with_ttl(limit: u64, seed: u64, ttl: Duration) -> Setup {
    let mem = Arc::new(MemoryStore::new());
    let faults = Arc::new(FaultyStore::new(mem.clone(), seed));
    let mount = Arc::new(MountPoint {
        name: "faults".into(),
        store: faults.clone(),
        prefix: String::new(),
        read_only: false,
        ttl,
        source_id: "memory".into(),
    });
    let settings = FsSettings { memory_limit: limit, ..FsSettings::default() };
    let fs = Arc::new(Fs::new(settings, vec![(Vec::new(), mount.clone())]).unwrap());
    Setup { fs, mem, faults, mount }
}

fn server_error() -> Fault {
    Fault::Fail(StoreError::Server { status: 500, message: "injected".into() })
}

/// Waits (bounded) for background aborts, then checks that nothing is held.
pub(super) async fn assert_clean(s: &Setup) {
    for _ in 0..100 {
        if s.mem.open_uploads().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.mem.open_uploads().len(), 0, "multipart uploads left open");
    for kind in ReservationKind::ALL {
        assert_eq!(s.fs.cache().reserved(kind), 0, "{kind:?} bytes still reserved");
    }
    assert_eq!(s.fs.writer_count(), 0, "writers left registered");
}

/// Every name `readdir` hands out for `dir`, `.` and `..` included.
async fn all_names(fs: &Arc<Fs>, dir: u64) -> Vec<String> {
    let fh = fs.opendir(dir).unwrap();
    let mut names = Vec::new();
    loop {
        let got = fs.readdir(fh, names.len() as u64).await.unwrap();
        if got.is_empty() {
            break;
        }
        names.extend(got.iter().map(|i| i.name.clone()));
    }
    fs.releasedir(fh);
    names
}

fn pid() -> u32 {
    std::process::id()
}

async fn write_all(fs: &Fs, fh: u64, data: &[u8]) -> Result<(), FsError> {
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, chunk).await?;
    }
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_failed_streamed_upload_gives_back_its_budget_and_aborts() {
    rt().block_on(async {
        let s = setup(64 << 20, 1);
        s.faults.add(Rule::nth("upload_part", 1, server_error()));
        let (_, fh) = s.fs.create(1, "big", libc::O_WRONLY, pid()).await.unwrap();
        let data = vec![7u8; 26 << 20];
        let written = write_all(&s.fs, fh, &data).await;
        let flushed = s.fs.flush(fh, pid()).await;
        s.fs.release(fh).await;
        let err = written.and(flushed).expect_err("the failed part must reach close");
        assert_eq!(err.errno(), libc::EIO);
        assert!(s.mem.body("big").is_none());
        assert_clean(&s).await;
    });
}

#[test]
fn a_failed_staged_upload_gives_back_its_budget_and_aborts() {
    rt().block_on(async {
        let s = setup(64 << 20, 2);
        let original = vec![1u8; 12 << 20];
        s.mem.insert("doc", original.clone());
        let ino = s.fs.lookup(1, "doc").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_RDWR, pid()).await.unwrap();
        s.fs.write(fh, 100, b"edit").await.unwrap();
        s.faults.add(Rule::always("upload_part", server_error()));
        let flushed = s.fs.flush(fh, pid()).await;
        s.fs.release(fh).await;
        assert_eq!(flushed.expect_err("upload must fail").errno(), libc::EIO);
        assert_eq!(s.mem.body("doc").unwrap(), original, "the object is unchanged");
        assert_clean(&s).await;
    });
}

#[test]
fn a_failed_copy_aborts_its_upload() {
    rt().block_on(async {
        let s = setup(64 << 20, 3);
        s.mem.insert("a", vec![3u8; 1 << 20]);
        s.faults.add(Rule::always("upload_part_copy", server_error()));
        assert!(s.fs.multipart_copy(&s.mount, "a", "b", 1 << 20, None).await.is_err());
        assert_clean(&s).await;
        s.faults.clear();
        s.faults.add(Rule::always("complete_multipart", server_error()));
        assert!(s.fs.multipart_copy(&s.mount, "a", "b", 1 << 20, None).await.is_err());
        assert!(s.mem.body("b").is_none());
        assert_clean(&s).await;
        // A copy of a version the source no longer is.
        s.faults.clear();
        let copied = s.fs.multipart_copy(&s.mount, "a", "b", 1 << 20, Some("\"another\"")).await;
        assert_eq!(copied.unwrap_err(), StoreError::PreconditionFailed);
        assert!(s.mem.body("b").is_none());
        assert_clean(&s).await;
        // A failed rename leaves the source where it was.
        s.faults.clear();
        s.faults.add(Rule::always("copy", server_error()));
        assert!(s.fs.rename(1, "a", 1, "c", 0).await.is_err());
        assert!(s.mem.body("a").is_some() && s.mem.body("c").is_none());
        assert_clean(&s).await;
    });
}

#[test]
fn an_abort_that_fails_once_is_tried_again() {
    rt().block_on(async {
        let s = setup(64 << 20, 4);
        s.faults.add(Rule::always("upload_part", server_error()));
        s.faults.add(Rule::nth("abort_multipart", 0, server_error()));
        let (_, fh) = s.fs.create(1, "big", libc::O_WRONLY, pid()).await.unwrap();
        let written = write_all(&s.fs, fh, &vec![9u8; 20 << 20]).await;
        let flushed = s.fs.flush(fh, pid()).await;
        s.fs.release(fh).await;
        assert!(written.and(flushed).is_err());
        assert!(s.faults.injected() >= 2, "the abort failed once");
        assert_clean(&s).await;
    });
}

#[test]
fn unlinking_a_file_being_streamed_aborts_its_upload() {
    rt().block_on(async {
        let s = setup(64 << 20, 5);
        let (_, fh) = s.fs.create(1, "gone", libc::O_WRONLY, pid()).await.unwrap();
        write_all(&s.fs, fh, &vec![4u8; 20 << 20]).await.unwrap();
        assert_eq!(s.mem.open_uploads().len(), 1, "parts are on their way");
        s.fs.unlink(1, "gone").await.unwrap();
        assert_eq!(s.mem.open_uploads().len(), 0, "unlink aborts at once");
        // Writes after the unlink go nowhere, and do not fail.
        s.fs.write(fh, 20 << 20, b"more").await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert!(s.mem.body("gone").is_none());
        assert_clean(&s).await;
    });
}

/// A file unlinked before any part of it went out never starts a multipart
/// upload, however much is written after: the bytes stay readable through
/// the open handle, nothing is sent, and nothing is left open.
#[test]
fn a_file_unlinked_before_its_first_part_never_starts_an_upload() {
    rt().block_on(async {
        let s = setup(64 << 20, 15);
        let (_, fh) = s.fs.create(1, "early", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"head").await.unwrap();
        s.fs.unlink(1, "early").await.unwrap();
        for i in 0..20u64 {
            s.fs.write(fh, 4 + (i << 20), &vec![5u8; 1 << 20]).await.unwrap();
        }
        assert_eq!(s.mem.count_of("create_multipart"), 0, "an unlinked file starts no upload");
        assert_eq!(&s.fs.read(fh, 0, 6).await.unwrap().to_vec()[..], &b"head\x05\x05"[..]);
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert!(s.mem.body("early").is_none());
        assert_eq!(s.mem.count_of("create_multipart"), 0);
        assert_clean(&s).await;
    });
}

#[test]
fn a_dropped_writer_aborts_its_upload() {
    rt().block_on(async {
        let s = setup(64 << 20, 6);
        let store: Arc<dyn ObjectStore> = s.faults.clone();
        let mut w = super::write::Writer::streaming(
            store,
            "dropped".into(),
            s.fs.cache().clone(),
            std::env::temp_dir().as_path(),
            None,
        );
        w.write(0, &vec![1u8; 17 << 20]).await.unwrap();
        assert_eq!(s.mem.open_uploads().len(), 1);
        assert!(s.fs.cache().reserved(ReservationKind::WriteBuffer) > 0);
        drop(w);
        assert_clean(&s).await;
    });
}

/// Ten processes editing one existing file through one mount, each its own
/// 16 KiB at its own offset, all at once (`dd conv=notrunc seek=...`): they
/// share one writer, every edit lands, and no upload fails its If-Match.
#[test]
fn concurrent_openers_of_one_file_share_one_writer() {
    rt().block_on(async {
        let s = setup(256 << 20, 7);
        let mut expected: Vec<u8> = (0..25u32 << 20).map(|i| (i % 251) as u8).collect();
        s.mem.insert("f.bin", expected.clone());
        // Opening takes a HEAD: slow it down so the openers overlap.
        s.faults.add(Rule::always("head", Fault::Delay(Duration::from_millis(30))));
        let ino = s.fs.lookup(1, "f.bin").await.unwrap().ino;
        let mut tasks = Vec::new();
        for n in 0..10u64 {
            let fs = s.fs.clone();
            let offset = n * (2 << 20) + 12_345;
            tasks.push(tokio::spawn(async move {
                let (fh, _) = fs.open(ino, libc::O_WRONLY, pid()).await?;
                let wrote = fs.write(fh, offset, &[n as u8 + 1; 16 << 10]).await;
                let flushed = fs.flush(fh, pid()).await;
                fs.release(fh).await;
                wrote.and(flushed).map(|_| offset)
            }));
        }
        for (n, t) in tasks.into_iter().enumerate() {
            let offset = t.await.unwrap().unwrap_or_else(|e| panic!("writer {n} failed: {e}")) as usize;
            expected[offset..offset + (16 << 10)].fill(n as u8 + 1);
        }
        assert!(s.mem.body("f.bin").unwrap() == expected, "every edit is in the object");
        assert_clean(&s).await;
    });
}

/// A writer that finds the budget full waits, then fails with ENOBUFS; once
/// room comes back, writing works again.
#[tokio::test(start_paused = true)]
async fn a_writer_without_room_waits_then_fails_with_enobufs() {
    let s = setup(16 << 20, 8);
    let hog = s.fs.cache().reserve_memory(ReservationKind::UploadPart, 16 << 20);
    let (_, fh) = s.fs.create(1, "small", libc::O_WRONLY, pid()).await.unwrap();
    let started = tokio::time::Instant::now();
    let err = s.fs.write(fh, 0, b"hello").await.expect_err("no room");
    assert_eq!(err.errno(), libc::ENOBUFS);
    assert!(started.elapsed() >= super::write::ADMISSION_PATIENCE, "it waited first");
    // Room that comes back while a writer waits lets it through.
    let fs = s.fs.clone();
    let waiting = tokio::spawn(async move { fs.write(fh, 0, b"hello").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(hog);
    waiting.await.unwrap().unwrap();
    s.fs.flush(fh, pid()).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.mem.body("small").unwrap(), &b"hello"[..]);
    assert_clean(&s).await;
}

/// A walk of a large directory, then the kernel forgetting every entry (as
/// after `echo 2 > /proc/sys/vm/drop_caches`): the inodes go, and so does the
/// listing once its TTL has passed.
#[test]
fn inodes_the_kernel_forgot_are_freed() {
    rt().block_on(async {
        let s = setup(64 << 20, 9);
        for i in 0..20_000 {
            s.mem.insert(&format!("big/k{i:05}"), &b"x"[..]);
        }
        let before = s.fs.inode_count();
        let dir = s.fs.lookup(1, "big").await.unwrap().ino;
        let fh = s.fs.opendir(dir).unwrap();
        let mut remembered = Vec::new();
        loop {
            let got = s.fs.readdir(fh, remembered.len() as u64 + 2).await.unwrap();
            if got.is_empty() {
                break;
            }
            for item in got.iter().filter(|i| i.name != "." && i.name != "..") {
                remembered.push(s.fs.remember_entry(dir, item).ino);
            }
            if remembered.is_empty() {
                break;
            }
        }
        s.fs.releasedir(fh);
        assert_eq!(remembered.len(), 20_000);
        assert!(s.fs.inode_count() >= 20_000);
        for ino in &remembered {
            s.fs.forget(*ino, 1);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        s.fs.sweep_inodes();
        assert!(s.fs.inode_count() <= before + 1, "{} inodes left", s.fs.inode_count());
        // Looked up again, a name is found as before.
        assert_eq!(s.fs.lookup(dir, "k00042").await.unwrap().size, 1);
    });
}

/// Sweeps run while a large listing is taken in, after the entries' TTL has
/// passed: every entry is still handed out, once.
#[test]
fn a_listing_longer_than_its_ttl_loses_no_entry_to_a_sweep() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 10, Duration::ZERO);
        for i in 0..12_000 {
            s.mem.insert(&format!("big/k{i:05}"), &b"x"[..]);
        }
        let dir = s.fs.lookup(1, "big").await.unwrap().ino;
        let names = all_names(&s.fs, dir).await;
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!((names.len(), unique.len()), (12_002, 12_002));
    });
}

/// A file created and written without waiting (`create_now`, `write_now`,
/// what the FUSE thread does for a file written in order) is uploaded at
/// flush like any other. When its PUT fails, flush returns the error and the
/// file's bytes stay: the file can still be written, and the next flush, or
/// else the last close, stores all of it. The budget comes back either way.
#[test]
fn a_file_whose_put_fails_keeps_its_bytes_for_the_next_try() {
    rt().block_on(async {
        let s = setup(64 << 20, 11);
        let (_, fh) = s.fs.create_now(super::inode::ROOT, "new.txt", libc::O_WRONLY, pid(), None).unwrap().unwrap();
        assert_eq!(s.fs.write_now(fh, 0, b"hello "), Some(6));
        assert_eq!(s.fs.write_now(fh, 3, b"not in order"), None, "a write that does not continue waits");
        assert_eq!(s.fs.write_now(fh, 6, b"world"), Some(5));
        assert!(s.fs.cache().reserved(ReservationKind::WriteBuffer) > 0);
        s.faults.add(Rule::nth("put", 0, server_error()));
        assert!(s.fs.flush(fh, pid()).await.is_err(), "the failed PUT reaches flush");
        assert!(s.mem.body("new.txt").is_none());
        assert_eq!(s.fs.write_now(fh, 11, b"!"), Some(1), "the file still streams from its buffer");
        s.fs.flush(fh, pid()).await.unwrap();
        assert_eq!(&s.mem.body("new.txt").unwrap()[..], b"hello world!");
        assert!(s.fs.flush_now(fh, pid()).is_some(), "nothing left to upload: answered without waiting");
        assert!(s.fs.release_now(fh).is_none(), "a clean writer is retired without waiting");
        assert_clean(&s).await;

        // Closed after a failed flush: the last release tries once more.
        let (_, fh) = s.fs.create_now(super::inode::ROOT, "late.txt", libc::O_WRONLY, pid(), None).unwrap().unwrap();
        assert_eq!(s.fs.write_now(fh, 0, b"late"), Some(4));
        s.faults.add(Rule::nth("put", 0, server_error()));
        assert!(s.fs.flush(fh, pid()).await.is_err());
        let last = s.fs.release_now(fh).expect("the writer still has bytes to upload");
        s.fs.release_last(last).await;
        assert_eq!(&s.mem.body("late.txt").unwrap()[..], b"late");
        assert_clean(&s).await;

        // A PUT that fails at the last close too: an error logged, and
        // nothing held.
        let (_, fh) = s.fs.create_now(super::inode::ROOT, "lost.txt", libc::O_WRONLY, pid(), None).unwrap().unwrap();
        assert_eq!(s.fs.write_now(fh, 0, b"lost"), Some(4));
        s.faults.add(Rule::always("put", server_error()));
        assert!(s.fs.flush(fh, pid()).await.is_err());
        s.fs.release(fh).await;
        assert!(s.mem.body("lost.txt").is_none());
        assert_clean(&s).await;
    });
}

/// A writer made local (what a write passthrough open does): the object is
/// downloaded whole into the staging file; bytes written into that file
/// directly (as the kernel does) are what flush uploads, with If-Match; a
/// flush with no such write uploads nothing; and a download that fails
/// leaves the open on the ordinary path with nothing held.
#[test]
fn a_local_writer_uploads_what_was_written_into_its_file() {
    use std::os::unix::fs::FileExt;
    rt().block_on(async {
        let s = setup(64 << 20, 12);
        s.mem.insert("edit.bin", vec![7u8; 3 << 20]);
        let ino = s.fs.lookup(super::inode::ROOT, "edit.bin").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_RDWR, pid()).await.unwrap();
        s.faults.add(Rule::nth("get", 0, server_error()));
        assert!(s.fs.passthrough_file(fh, libc::O_RDWR).await.is_none(), "a failed download gives no file");
        assert_eq!(s.fs.cache().reserved(ReservationKind::WriteBuffer), 0);
        let file = s.fs.passthrough_file(fh, libc::O_RDWR).await.expect("the object downloaded whole");
        assert_eq!(file.metadata().unwrap().len(), 3 << 20);
        let puts = s.mem.count_of("put");
        s.fs.flush(fh, pid()).await.unwrap();
        assert_eq!(s.mem.count_of("put"), puts, "nothing written, nothing uploaded");
        file.write_all_at(b"kernel wrote this", (3 << 20) - 4).unwrap();
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, (3 << 20) + 13, "the size comes from the file");
        s.fs.flush(fh, pid()).await.unwrap();
        let body = s.mem.body("edit.bin").unwrap();
        assert_eq!(body.len(), (3 << 20) + 13);
        assert_eq!(&body[(3 << 20) - 4..], b"kernel wrote this");
        // Another client's change meanwhile: the next upload fails, not overwrites.
        file.write_all_at(b"again", 0).unwrap();
        s.mem.insert("edit.bin", b"someone else".to_vec());
        assert!(s.fs.flush(fh, pid()).await.is_err());
        assert_eq!(&s.mem.body("edit.bin").unwrap()[..], b"someone else");
        let _ = s.fs.release(fh).await;
        assert_clean(&s).await;
    });
}

/// A writer made local takes a cache file only for the version it started
/// from: another version's file is ignored (and the object downloaded, or
/// not made local when it is over the limit); its own version's file is
/// copied, with no GET.
#[test]
fn a_local_writer_takes_only_its_own_version_from_the_cache() {
    use std::os::unix::fs::FileExt;
    rt().block_on(async {
        let s = setup(64 << 20, 13);
        let etag = s.mem.insert("v.bin", vec![1u8; 1 << 20]);
        let base = super::write::Base { etag: etag.clone(), size: 1 << 20 };
        let store: Arc<dyn ObjectStore> = s.faults.clone();
        let tmp = std::env::temp_dir();
        let staged = || {
            let (store, cache, base) = (store.clone(), s.fs.cache().clone(), Some(base.clone()));
            super::write::Writer::staged(store, "v.bin".into(), cache, tmp.as_path(), base)
        };
        // A cache file with other bytes than the server's shows where they came from.
        let cached = |etag: &str, byte: u8| {
            let f = tempfile::tempfile().unwrap();
            f.write_all_at(&vec![byte; 1 << 20], 0).unwrap();
            Some((etag.to_string(), Arc::new(f)))
        };
        let first_byte = |f: &std::fs::File| {
            let mut b = [0u8];
            f.read_exact_at(&mut b, 0).unwrap();
            b[0]
        };
        let mut w = staged().await.unwrap();
        assert!(w.make_local(0, cached("\"other\"", 9)).await.unwrap().is_none(), "another version, over the limit");
        let gets = s.mem.count_of("get");
        let f = w.make_local(u64::MAX, cached("\"other\"", 9)).await.unwrap().unwrap();
        assert!(s.mem.count_of("get") > gets, "another version's file is not used");
        assert_eq!(first_byte(&f), 1);
        let mut w = staged().await.unwrap();
        let gets = s.mem.count_of("get");
        let f = w.make_local(0, cached(&etag, 7)).await.unwrap().unwrap();
        assert_eq!(s.mem.count_of("get"), gets, "its own version is copied from the cache");
        assert_eq!(first_byte(&f), 7);
        drop((w, f));
        assert_clean(&s).await;
    });
}

/// A directory made through the mount starts with an empty listing: the
/// names created in it are looked up (not found) and then found without a
/// request, and a listing of it shows them. A mkdir whose marker PUT fails
/// leaves no directory and no listing behind.
#[test]
fn a_new_directory_answers_its_names_without_requests() {
    rt().block_on(async {
        let s = setup(64 << 20, 13);
        s.faults.add(Rule::nth("put", 0, server_error()));
        assert!(s.fs.mkdir(super::inode::ROOT, "d").await.is_err(), "the failed marker PUT reaches mkdir");
        let dir = s.fs.mkdir(super::inode::ROOT, "d").await.unwrap().ino;
        let asked = |s: &Setup| s.mem.count_of("head") + s.mem.count_of("list");
        let before = asked(&s);
        for i in 0..10 {
            let name = format!("f{i}");
            assert_eq!(s.fs.lookup(dir, &name).await.unwrap_err(), FsError::NotFound);
            let (_, fh) = s.fs.create(dir, &name, libc::O_WRONLY, pid()).await.unwrap();
            s.fs.write(fh, 0, b"data").await.unwrap();
            s.fs.flush(fh, pid()).await.unwrap();
            s.fs.release(fh).await;
            assert_eq!(s.fs.lookup(dir, &name).await.unwrap().size, 4);
        }
        assert_eq!(asked(&s), before, "no HEAD or LIST for the names of a new directory");
        let names = all_names(&s.fs, dir).await;
        assert_eq!(names.len(), 12, "., .. and the ten files: {names:?}");
        assert_eq!(s.mem.body("d/f9").as_deref(), Some(&b"data"[..]));
        assert_clean(&s).await;
    });
}

/// `getattr_now` answers what needs no request: a directory, a file being
/// written (its writer's size) and fresh attributes; attributes past their
/// TTL are left to `getattr`, which revalidates them with a HEAD.
#[test]
fn getattr_without_waiting_answers_only_what_needs_no_request() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 14, Duration::ZERO);
        s.mem.insert("old.bin", vec![1u8; 10]);
        let ino = s.fs.lookup(super::inode::ROOT, "old.bin").await.unwrap().ino;
        assert!(s.fs.getattr_now(ino).is_none(), "attributes past their TTL need a HEAD");
        let heads = s.mem.count_of("head");
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, 10);
        assert_eq!(s.mem.count_of("head"), heads + 1);
        assert!(matches!(s.fs.getattr_now(super::inode::ROOT), Some(Ok(a)) if a.kind == super::namespace::Kind::Dir));
        let (attr, fh) = s.fs.create(super::inode::ROOT, "new.bin", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"12345").await.unwrap();
        assert_eq!(s.fs.getattr_now(attr.ino).unwrap().unwrap().size, 5, "a file being written: its writer's size");
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert!(s.fs.getattr_now(u64::MAX).unwrap().is_err(), "an unknown inode");
        assert_clean(&s).await;
    });
}

/// A file the kernel forgets before its upload (a `touch` whose release
/// uploads after close returned, with the dentry reclaimed meanwhile) is
/// still recorded in its directory's listing by that upload, so the new
/// directory's listing does not hide it.
#[test]
fn a_file_forgotten_before_its_upload_is_still_listed() {
    rt().block_on(async {
        let s = setup(64 << 20, 16);
        let dir = s.fs.mkdir(super::inode::ROOT, "d").await.unwrap().ino;
        let (attr, fh) = s.fs.create(dir, "x", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.forget(attr.ino, 1);
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert!(s.mem.body("d/x").is_some(), "the empty file is uploaded at release");
        assert_eq!(s.fs.lookup(dir, "x").await.unwrap().size, 0, "the listing knows it");
        assert_clean(&s).await;
    });
}

/// A listing of `dir` (the first LIST from now on) whose answer is held
/// back until the gate returned is notified; it is out when this returns.
async fn held_listing(s: &Setup, dir: u64) -> (Arc<tokio::sync::Notify>, tokio::task::JoinHandle<Vec<String>>) {
    let gate = Arc::new(tokio::sync::Notify::new());
    s.faults.add(Rule::nth("list", 0, Fault::HeldAnswer(gate.clone())));
    let listing = tokio::spawn({
        let fs = s.fs.clone();
        async move { all_names(&fs, dir).await }
    });
    held(&s.faults).await;
    (gate, listing)
}

/// Waits (bounded) until the one fault added is holding its call.
pub(super) async fn held(faults: &FaultyStore) {
    for _ in 0..500 {
        if faults.injected() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replaces the whole content of file `ino` through the mount, uploaded.
async fn rewrite(fs: &Arc<Fs>, ino: u64, data: &[u8]) {
    let (fh, _) = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, pid()).await.unwrap();
    fs.write(fh, 0, data).await.unwrap();
    fs.flush(fh, pid()).await.unwrap();
    fs.release(fh).await;
}

/// The first 128 KiB of file `ino`, from a new open.
async fn read_start(fs: &Arc<Fs>, ino: u64) -> Result<Vec<u8>, FsError> {
    let (fh, _) = fs.open(ino, libc::O_RDONLY, pid()).await.unwrap();
    let got = fs.read(fh, 0, 128 << 10).await.map(|d| d.to_vec());
    fs.release(fh).await;
    got
}

/// A HEAD sent before an upload of this mount finished and answered after
/// it (a slow answer under load) tells of the previous version: it must not
/// replace what the upload recorded, or the next open, within the TTL, reads
/// the previous version's bytes from the block cache (or fails its
/// If-Match). Nor when a handle still open on the previous version reads
/// meanwhile: it reads the new version, and leaves it current.
#[test]
fn a_late_head_does_not_bring_back_the_previous_version() {
    rt().block_on(async {
        for old_handle_reads in [false, true] {
            let s = setup_with_ttl(64 << 20, 13, Duration::from_secs(2));
            let (old, new) = (vec![b'a'; 3 << 20], vec![b'b'; 3 << 20]);
            s.mem.insert("f.bin", old.clone());
            let ino = s.fs.lookup(super::inode::ROOT, "f.bin").await.unwrap().ino;
            // The first 128 KiB of the old version into the block cache.
            let (old_fh, _) = s.fs.open(ino, libc::O_RDONLY, pid()).await.unwrap();
            assert_eq!(s.fs.read(old_fh, 0, 128 << 10).await.unwrap().to_vec(), &old[..128 << 10]);
            // Stale: the next open sends a HEAD, whose answer is held back.
            tokio::time::sleep(Duration::from_millis(2100)).await;
            let gate = Arc::new(tokio::sync::Notify::new());
            s.faults.add(Rule::nth("head", 0, Fault::HeldAnswer(gate.clone())));
            let opening = tokio::spawn({
                let fs = s.fs.clone();
                async move { fs.open(ino, libc::O_RDONLY, pid()).await }
            });
            held(&s.faults).await;
            assert_eq!(s.faults.injected(), 1, "the open's HEAD is out");
            rewrite(&s.fs, ino, &new).await;
            assert!(s.mem.body("f.bin").unwrap() == new);
            if old_handle_reads {
                // A seek on the old handle reads what this mount wrote.
                assert_eq!(s.fs.read(old_fh, 2 << 20, 4096).await.unwrap().to_vec(), &new[2 << 20..(2 << 20) + 4096]);
            }
            gate.notify_one();
            let (early, _) = opening.await.unwrap().unwrap();
            s.fs.release(early).await;
            s.fs.release(old_fh).await;
            let got = read_start(&s.fs, ino).await;
            assert!(
                got.as_deref().ok() == Some(&new[..128 << 10]),
                "an open after the upload (old handle read: {old_handle_reads}) read {:?}",
                got.map(|b| b[..8].to_vec())
            );
        }
    });
}

/// All handles of a file fill one kernel page cache. A handle open on a
/// version this mount then rewrote reads the new version (its bytes and its
/// end), as the handles of a local file do; serving the old version's
/// cached blocks would put them, and its shorter size, where the new
/// version's readers read. So it does when a HEAD brought the new version
/// before the upload's answer did. A version made by another client fails
/// the old handle with ESTALE instead, and a new open reads it.
#[test]
fn an_open_reader_reads_what_this_mount_wrote_since() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 42, Duration::ZERO);
        let (old, new, theirs) = (vec![b'a'; 300_000], vec![b'b'; 100_000], vec![b'c'; 50_000]);
        s.mem.insert("f", old.clone());
        let ino = s.fs.lookup(super::inode::ROOT, "f").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_RDONLY, pid()).await.unwrap();
        assert_eq!(s.fs.read(fh, 0, 300_000).await.unwrap().to_vec(), old, "the old version, now in memory");
        rewrite(&s.fs, ino, &new[..50_000]).await;
        assert_eq!(s.fs.read(fh, 0, 300_000).await.unwrap().to_vec(), &new[..50_000]);
        // The next upload's answer comes after a HEAD that saw its version.
        let gate = Arc::new(tokio::sync::Notify::new());
        s.faults.add(Rule::nth("put", 0, Fault::HeldAnswer(gate.clone())));
        let rewriting = tokio::spawn({
            let (fs, new) = (s.fs.clone(), new.clone());
            async move { rewrite(&fs, ino, &new).await }
        });
        held(&s.faults).await;
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, 100_000, "the HEAD sees the upload");
        gate.notify_one();
        rewriting.await.unwrap();
        assert_eq!(s.fs.read(fh, 0, 300_000).await.unwrap().to_vec(), new);
        assert!(matches!(s.fs.read_now(fh, 200_000, 4096), super::ReadNow::Done(d) if d.is_empty()), "past the end");
        // A rename by this mount moves the handle with the file.
        s.fs.rename(super::inode::ROOT, "f", super::inode::ROOT, "g", 0).await.unwrap();
        assert_eq!(s.fs.read(fh, 4096, 4096).await.unwrap().to_vec(), &new[4096..8192]);
        // Another client's version, once the mount knows of it.
        s.mem.insert("g", theirs.clone());
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, 50_000);
        let err = s.fs.read(fh, 0, 4096).await.expect_err("another client's version fails the handle");
        assert_eq!(err.errno(), libc::ESTALE);
        s.fs.release(fh).await;
        assert_eq!(read_start(&s.fs, ino).await.unwrap(), theirs);
        assert_clean(&s).await;
    });
}

/// A listing sent before this mount changed the directory and answered
/// after: its snapshot takes in the changes it may have missed. A file
/// rewritten meanwhile keeps its new version (a lookup answered from the
/// snapshot after the kernel forgot the inode does not bring back the
/// previous version's cached bytes), a file created meanwhile is found, and
/// one removed meanwhile stays gone.
#[test]
fn a_late_listing_does_not_bring_back_the_previous_version() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 14, Duration::from_secs(2));
        let (old, new) = (vec![b'a'; 1 << 20], vec![b'b'; 1 << 20]);
        s.mem.insert("d/f.bin", old.clone());
        s.mem.insert("d/gone.bin", b"removed meanwhile".to_vec());
        let dir = s.fs.lookup(super::inode::ROOT, "d").await.unwrap().ino;
        let ino = s.fs.lookup(dir, "f.bin").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_RDONLY, pid()).await.unwrap();
        assert_eq!(s.fs.read(fh, 0, 128 << 10).await.unwrap().to_vec(), &old[..128 << 10]);
        s.fs.release(fh).await;
        // A listing of d whose answer is held back while d changes.
        let (gate, listing) = held_listing(&s, dir).await;
        assert_eq!(s.faults.injected(), 1, "the listing is out");
        rewrite(&s.fs, ino, &new).await;
        let (_, fh) = s.fs.create(dir, "made.bin", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"made meanwhile").await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        s.fs.unlink(dir, "gone.bin").await.unwrap();
        gate.notify_one();
        listing.await.unwrap();
        // The kernel forgets the inodes; lookups are answered from the
        // directory's snapshot.
        s.fs.forget(ino, u64::MAX);
        let made = s.fs.lookup(dir, "made.bin").await.map(|a| a.ino);
        assert!(made.is_ok(), "a file made while the listing was out: {made:?}");
        s.fs.forget(made.unwrap(), u64::MAX);
        let made = s.fs.lookup(dir, "made.bin").await;
        assert!(made.is_ok_and(|a| a.size == 14), "looked up from the snapshot");
        assert!(s.fs.lookup(dir, "gone.bin").await.is_err(), "a file removed while the listing was out");
        let ino = s.fs.lookup(dir, "f.bin").await.unwrap().ino;
        let got = read_start(&s.fs, ino).await;
        assert!(got.as_deref().ok() == Some(&new[..128 << 10]), "read {:?}", got.map(|b| b[..8].to_vec()));
    });
}

/// A lookup whose HEAD was sent before this mount made the file, and
/// answered "not found" after, does not hide the file: the lookup finds it,
/// and so does the next one.
#[test]
fn a_late_not_found_does_not_hide_a_file_made_meanwhile() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 15, Duration::from_secs(2));
        s.mem.insert("d/other.bin", b"x".to_vec());
        let dir = s.fs.lookup(super::inode::ROOT, "d").await.unwrap().ino;
        let gate = Arc::new(tokio::sync::Notify::new());
        s.faults.add(Rule::nth("head", 0, Fault::HeldAnswer(gate.clone())));
        let looking = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.lookup(dir, "new.bin").await.map(|a| a.ino) }
        });
        held(&s.faults).await;
        assert_eq!(s.faults.injected(), 1, "the lookup's HEAD is out");
        let (attr, fh) = s.fs.create(dir, "new.bin", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"made meanwhile").await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        gate.notify_one();
        assert_eq!(looking.await.unwrap().ok(), Some(attr.ino), "the late lookup finds the file");
        let again = s.fs.lookup(dir, "new.bin").await;
        assert!(again.is_ok_and(|a| a.ino == attr.ino && a.size == 14), "and so does the next one");
    });
}

/// A rename copies the version whose size the inode holds. When another
/// client replaced the object within the TTL (the inode still holds the
/// previous size), the copy of the known version is refused, and the new
/// version is read and copied: the renamed file has the new version's size
/// and bytes, not the previous size over the new bytes.
#[test]
fn a_rename_copies_the_version_whose_size_it_gives() {
    rt().block_on(async {
        let s = setup(64 << 20, 16);
        s.mem.insert("a", vec![b'o'; 1000]);
        let ino = s.fs.lookup(super::inode::ROOT, "a").await.unwrap().ino;
        let newer = vec![b'n'; 3000];
        s.mem.insert("a", newer.clone());
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, 1000, "within the TTL the inode holds the old size");
        s.fs.rename(super::inode::ROOT, "a", super::inode::ROOT, "b", 0).await.unwrap();
        assert_eq!(s.mem.body("b").unwrap(), newer);
        assert!(s.mem.body("a").is_none());
        assert_eq!(s.fs.getattr(ino).await.unwrap().size, 3000, "the renamed file's size is the copied version's");
        let (fh, _) = s.fs.open(ino, libc::O_RDONLY, pid()).await.unwrap();
        assert_eq!(s.fs.read(fh, 0, 8192).await.unwrap().to_vec(), newer);
        s.fs.release(fh).await;
        assert_eq!(s.mem.count_of("copy"), 2, "the refused copy and the copy of the new version");
        assert_clean(&s).await;
    });
}

/// A HEAD of a file's old key, sent before its directory was renamed and
/// answered after, tells of the object the rename copied and deleted: it
/// must not give the inode, now at the new key, that object's ETag, or its
/// reads are refused their If-Match.
#[test]
fn a_late_head_does_not_undo_a_rename() {
    rt().block_on(async {
        let s = setup_with_ttl(64 << 20, 17, Duration::from_secs(2));
        let data = vec![b'r'; 1 << 20];
        s.mem.insert("d/f.bin", data.clone());
        let dir = s.fs.lookup(super::inode::ROOT, "d").await.unwrap().ino;
        let ino = s.fs.lookup(dir, "f.bin").await.unwrap().ino;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let gate = Arc::new(tokio::sync::Notify::new());
        s.faults.add(Rule::nth("head", 0, Fault::HeldAnswer(gate.clone())));
        let asking = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.getattr(ino).await }
        });
        held(&s.faults).await;
        assert_eq!(s.faults.injected(), 1, "the getattr's HEAD is out");
        s.fs.rename(super::inode::ROOT, "d", super::inode::ROOT, "e", 0).await.unwrap();
        assert!(s.mem.body("e/f.bin").is_some() && s.mem.body("d/f.bin").is_none());
        gate.notify_one();
        asking.await.unwrap().unwrap();
        let gets = s.mem.count_of("get");
        let got = read_start(&s.fs, ino).await;
        assert!(got.as_deref().ok() == Some(&data[..128 << 10]), "read after the rename: {:?}", got.map(|b| b.len()));
        assert_eq!(s.mem.count_of("get"), gets + 1, "one GET, not refused");
    });
}

/// A file renamed while open for writing: the rename uploads it and copies
/// it (a new ETag); what is written after the rename is stored under the new
/// name by the next close, not refused its If-Match.
#[test]
fn a_write_after_a_rename_of_an_open_file_lands() {
    rt().block_on(async {
        let s = setup(64 << 20, 18);
        let root = super::inode::ROOT;
        let (attr, fh) = s.fs.create(root, "a", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"first").await.unwrap();
        s.fs.rename(root, "a", root, "b", 0).await.unwrap();
        assert_eq!(s.mem.body("b").unwrap(), b"first".as_slice());
        s.fs.write(fh, 5, b" second").await.unwrap();
        s.fs.flush(fh, pid()).await.expect("stored under the new name");
        s.fs.release(fh).await;
        assert_eq!(s.mem.body("b").unwrap(), b"first second".as_slice());
        assert!(s.mem.body("a").is_none());
        assert_eq!(s.fs.getattr(attr.ino).await.unwrap().size, 12);
        assert_clean(&s).await;
    });
}

/// A server that refuses a copy of the very ETag its HEAD gives (it checks
/// the condition against another ETag): the rename copies once more without
/// the condition, and later renames go without it.
#[test]
fn a_server_that_cannot_check_a_copy_condition_still_renames() {
    rt().block_on(async {
        let s = setup(64 << 20, 19);
        let root = super::inode::ROOT;
        s.mem.insert("a", b"data".to_vec());
        s.mem.insert("c", b"more".to_vec());
        s.fs.lookup(root, "a").await.unwrap();
        s.fs.lookup(root, "c").await.unwrap();
        s.faults.add(Rule::nth("copy", 0, Fault::Fail(StoreError::PreconditionFailed)));
        s.fs.rename(root, "a", root, "b", 0).await.unwrap();
        assert_eq!(s.mem.body("b").unwrap(), b"data".as_slice());
        assert_eq!(s.mem.count_of("copy"), 1, "the refused copy did not reach the store; one unconditional");
        s.fs.rename(root, "c", root, "d", 0).await.unwrap();
        assert_eq!(s.mem.body("d").unwrap(), b"more".as_slice());
        assert!(!s.mount.store.refusals().copy_conditions());
        assert_clean(&s).await;
    });
}

/// `rm` of a file open for writing whose DeleteObject fails: the file is
/// still there, so what its handle wrote must still be stored by its close
/// (before, the writer was unlinked first, and the close uploaded nothing).
#[test]
fn a_failed_unlink_keeps_what_open_handles_wrote() {
    rt().block_on(async {
        let s = setup(64 << 20, 20);
        let root = super::inode::ROOT;
        s.mem.insert("f", b"old".to_vec());
        let ino = s.fs.lookup(root, "f").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, pid()).await.unwrap();
        s.fs.write(fh, 0, b"new bytes").await.unwrap();
        s.faults.add(Rule::nth("delete", 0, server_error()));
        assert_eq!(s.fs.unlink(root, "f").await.unwrap_err().errno(), libc::EIO);
        s.fs.flush(fh, pid()).await.expect("the close stores what was written");
        s.fs.release(fh).await;
        assert_eq!(s.mem.body("f").unwrap(), b"new bytes".as_slice());
        assert_clean(&s).await;
    });
}

/// `rename(tmp, f)` while `f` is open for writing: `f`'s old inode is
/// unlinked, so its handle's writes go nowhere and its close succeeds,
/// leaving the renamed content (before, the close uploaded over it, or
/// failed its If-Match).
#[test]
fn renaming_onto_a_file_open_for_writing_unlinks_its_writer() {
    rt().block_on(async {
        let s = setup(64 << 20, 21);
        let root = super::inode::ROOT;
        s.mem.insert("f", b"old".to_vec());
        s.mem.insert("tmp", b"renamed".to_vec());
        let ino = s.fs.lookup(root, "f").await.unwrap().ino;
        let (fh, _) = s.fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, pid()).await.unwrap();
        s.fs.write(fh, 0, b"through the old handle").await.unwrap();
        s.fs.rename(root, "tmp", root, "f", 0).await.unwrap();
        s.fs.write(fh, 22, b", more").await.unwrap();
        s.fs.flush(fh, pid()).await.expect("the close of an unlinked file succeeds");
        s.fs.release(fh).await;
        assert_eq!(s.mem.body("f").unwrap(), b"renamed".as_slice());
        assert!(s.mem.body("tmp").is_none());
        assert_clean(&s).await;
    });
}

/// Two renames, each onto the other's source, both files open for writing:
/// the kernel never sends them at once, but the core does not rely on it.
/// Each rename holds the lock of the writer it replaces across its copy and
/// takes its own source's lock too, never both at once; holding both, the
/// two renames would each hold one lock and wait for the other for ever.
/// Here the writers' locks are held until both renames wait for their
/// first one. (What is left is only defined when they run one after the
/// other, as the kernel makes them.)
#[test]
fn crossed_renames_of_files_open_for_writing_do_not_deadlock() {
    rt().block_on(async {
        let s = setup(64 << 20, 27);
        let root = super::inode::ROOT;
        let mut handles = Vec::new();
        for name in ["a", "b"] {
            s.mem.insert(name, name.as_bytes().to_vec());
            let ino = s.fs.lookup(root, name).await.unwrap().ino;
            let (fh, _) = s.fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, pid()).await.unwrap();
            s.fs.write(fh, 0, format!("new {name}").as_bytes()).await.unwrap();
            handles.push((ino, fh));
        }
        let writers: Vec<_> = handles.iter().map(|(ino, _)| s.fs.writers.get(*ino).unwrap()).collect();
        let held: Vec<_> = futures::future::join_all(writers.iter().map(|w| w.writer.lock())).await;
        let rename = |from: &'static str, to: &'static str| {
            let fs = s.fs.clone();
            tokio::spawn(async move { fs.rename(root, from, root, to, 0).await })
        };
        let (one, two) = (rename("a", "b"), rename("b", "a"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
        let both = tokio::time::timeout(Duration::from_secs(20), async { (one.await, two.await) }).await;
        let (one, two) = both.expect("the crossed renames deadlocked");
        let (_, _) = (one.expect("the first rename panicked"), two.expect("the second rename panicked"));
        for (_, fh) in handles {
            let _ = s.fs.flush(fh, pid()).await;
            s.fs.release(fh).await;
        }
        assert_clean(&s).await;
    });
}

/// While a directory is renamed (its copies are slow here), nothing new is
/// made under it: a create, an open for writing and a mkdir there get
/// `EBUSY` instead of a file that the rename's delete pass would remove or
/// leave behind. After the rename, the new name takes them.
#[test]
fn nothing_is_made_under_a_directory_being_renamed() {
    rt().block_on(async {
        let s = setup(64 << 20, 22);
        let root = super::inode::ROOT;
        for i in 0..4 {
            s.mem.insert(&format!("d/f{i}"), vec![b'x'; 100]);
        }
        let d = s.fs.lookup(root, "d").await.unwrap().ino;
        let f0 = s.fs.lookup(d, "f0").await.unwrap().ino;
        s.faults.add(Rule::always("copy", Fault::Delay(Duration::from_millis(300))));
        let renaming = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.rename(root, "d", root, "e", 0).await }
        });
        while s.faults.injected() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let busy = |r: Result<u64, FsError>| r.err().map(|e| e.errno());
        assert_eq!(busy(s.fs.create(d, "new", libc::O_WRONLY, pid()).await.map(|a| a.1)), Some(libc::EBUSY));
        assert_eq!(busy(s.fs.create(d, "new2", libc::O_RDWR, pid()).await.map(|a| a.1)), Some(libc::EBUSY));
        assert_eq!(busy(s.fs.open(f0, libc::O_WRONLY, pid()).await.map(|a| a.0)), Some(libc::EBUSY));
        assert_eq!(busy(s.fs.mkdir(d, "sub").await.map(|a| a.ino)), Some(libc::EBUSY));
        renaming.await.unwrap().unwrap();
        s.faults.clear();
        assert_eq!(s.mem.keys().iter().filter(|k| k.starts_with("d/")).count(), 0, "{:?}", s.mem.keys());
        assert!(s.fs.lookup(d, "new").await.is_err(), "no entry was left behind");
        let (_, fh) = s.fs.create(d, "new", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert!(s.mem.body("e/new").is_some(), "{:?}", s.mem.keys());
        assert_clean(&s).await;
    });
}

/// A `mkdir d/sub` whose PUT is already out when `mv d e` starts: the
/// rename waits for it, and moves it. Before, the marker could land after
/// the rename's copy had listed `d` and before its delete pass did, which
/// deleted it: the mkdir succeeded and the directory was gone.
#[test]
fn a_mkdir_under_way_when_its_directory_is_renamed_is_moved_with_it() {
    rt().block_on(async {
        let s = setup(64 << 20, 28);
        let root = super::inode::ROOT;
        s.mem.insert("d/f", vec![b'x'; 100]);
        let d = s.fs.lookup(root, "d").await.unwrap().ino;
        s.faults.add(Rule::nth("put", 0, Fault::Delay(Duration::from_millis(150))));
        s.faults.add(Rule::always("copy", Fault::Delay(Duration::from_millis(300))));
        let making = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.mkdir(d, "sub").await.map(|a| a.ino) }
        });
        while s.faults.injected() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.fs.rename(root, "d", root, "e", 0).await.expect("the rename");
        making.await.unwrap().expect("the mkdir");
        let keys = s.mem.keys();
        assert!(s.mem.body("e/sub/").is_some() && s.mem.body("e/f").is_some(), "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("d/")), "{keys:?}");
        let e = s.fs.lookup(root, "e").await.unwrap().ino;
        assert!(s.fs.lookup(e, "sub").await.is_ok());
        assert_clean(&s).await;
    });
}

/// A server that rejects a conditional write (501, or 400) gets the write
/// again without the condition, and none from then on: another client's
/// version is then overwritten, as the warning says. Remembered for that
/// store only: another mount's server keeps its conditions, so its write
/// over another client's version still fails.
#[test]
fn a_server_that_rejects_conditional_writes_gets_them_without() {
    rt().block_on(async {
        let (s, other) = (setup(64 << 20, 29), setup(64 << 20, 30));
        for s in [&s, &other] {
            s.mem.insert("f", b"old".to_vec());
        }
        let ino = s.fs.lookup(super::inode::ROOT, "f").await.unwrap().ino;
        let other_ino = other.fs.lookup(super::inode::ROOT, "f").await.unwrap().ino;
        let refused = StoreError::Server { status: 501, message: "conditional writes not implemented".into() };
        s.faults.add(Rule::nth("put", 0, Fault::Fail(refused)));
        rewrite(&s.fs, ino, b"new").await;
        assert_eq!(s.mem.body("f").unwrap(), b"new".as_slice());
        assert!(!s.mount.store.refusals().conditional_writes(), "remembered for this store");
        // Another client's version, made while the file is open: this
        // store's upload goes over it; the other store's still sends If-Match.
        let racing = |s: &Setup, ino: u64| {
            let (fs, mem) = (s.fs.clone(), s.mem.clone());
            async move {
                let (fh, _) = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, pid()).await.unwrap();
                fs.write(fh, 0, b"newer").await.unwrap();
                mem.insert("f", b"theirs".to_vec());
                let flushed = fs.flush(fh, pid()).await;
                fs.release(fh).await;
                flushed
            }
        };
        racing(&s, ino).await.expect("no condition to fail");
        assert_eq!(s.faults.injected(), 1);
        assert_eq!(s.mem.body("f").unwrap(), b"newer".as_slice());
        let refused = racing(&other, other_ino).await.expect_err("another client's version is kept");
        assert_eq!(refused.errno(), libc::EIO);
        assert_eq!(other.mem.body("f").unwrap(), b"theirs".as_slice());
        // mkdir asks the store too.
        s.fs.mkdir(super::inode::ROOT, "d").await.unwrap();
        assert_eq!(s.faults.injected(), 1, "no second refusal");
        assert_clean(&s).await;
    });
}

/// A file renamed into a directory while that directory is being renamed
/// (its copies are slow here): the file rename is refused with `EBUSY` if
/// it starts second, and waited for if it started first; either way the
/// file is not copied in after the directory's copy listed it and deleted
/// with the rest. The same for a chmod (a metadata copy) under it.
#[test]
fn a_rename_into_a_directory_being_renamed_loses_nothing() {
    rt().block_on(async {
        let s = setup(64 << 20, 31);
        let root = super::inode::ROOT;
        for key in ["d/f", "d/g", "z/x", "z/y"] {
            s.mem.insert(key, key.as_bytes().to_vec());
        }
        let (d, z) = (s.fs.lookup(root, "d").await.unwrap().ino, s.fs.lookup(root, "z").await.unwrap().ino);
        s.fs.lookup(z, "x").await.unwrap();
        s.fs.lookup(z, "y").await.unwrap();
        s.faults.add(Rule::always("copy", Fault::Delay(Duration::from_millis(200))));
        // First: z/x into d while d's rename has started.
        let renaming = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.rename(root, "d", root, "e", 0).await }
        });
        while s.faults.injected() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = s.fs.rename(z, "x", d, "x", 0).await;
        assert_eq!(late.err().map(|e| e.errno()), Some(libc::EBUSY));
        renaming.await.unwrap().unwrap();
        // Then: z/y into e, and e's rename starting while that copy is out.
        let e = s.fs.lookup(root, "e").await.unwrap().ino;
        let before = s.faults.injected();
        let moving = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.rename(z, "y", e, "y", 0).await }
        });
        while s.faults.injected() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.fs.rename(root, "e", root, "h", 0).await.expect("waits for the file's rename");
        moving.await.unwrap().unwrap();
        let mut keys = s.mem.keys();
        keys.sort();
        assert_eq!(keys, ["h/f", "h/g", "h/y", "z/x"]);
        assert_clean(&s).await;
    });
}

/// `touch d/f; mv d e`: the new empty file is uploaded by the kernel's
/// RELEASE, after `close` returned. The rename waits for that upload
/// instead of failing with `EBUSY`, and moves the file.
#[test]
fn a_directory_rename_waits_for_a_file_closed_just_before() {
    rt().block_on(async {
        let s = setup(64 << 20, 23);
        let root = super::inode::ROOT;
        let d = s.fs.mkdir(root, "d").await.unwrap().ino;
        let (_, fh) = s.fs.create(d, "f", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        let last = s.fs.release_now(fh).expect("the upload is left to release");
        let renaming = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.rename(root, "d", root, "e", 0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!renaming.is_finished(), "the rename waits for the upload");
        s.fs.release_last(last).await;
        renaming.await.unwrap().expect("the rename goes on once the file is uploaded");
        assert!(s.mem.body("e/f").is_some() && s.mem.body("d/f").is_none(), "{:?}", s.mem.keys());
        assert_clean(&s).await;
    });
}

/// Truncating a large file keeps only what stays of it: `O_TRUNC` on a
/// read-write open (`fopen(…, "w+")`) and a truncate to 6 MiB download
/// nothing (the 6 MiB become a copy part), a truncate to 1 MiB downloads
/// that 1 MiB. Before, each downloaded the whole object first.
#[test]
fn truncating_a_large_file_downloads_only_what_stays() {
    rt().block_on(async {
        let s = setup(64 << 20, 24);
        let root = super::inode::ROOT;
        let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
        for name in ["a", "b", "c"] {
            s.mem.insert(name, data.clone());
        }
        let a = s.fs.lookup(root, "a").await.unwrap().ino;
        let gets = s.mem.count_of("get");
        let (fh, _) = s.fs.open(a, libc::O_RDWR | libc::O_TRUNC, pid()).await.unwrap();
        s.fs.write(fh, 0, b"x").await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        s.fs.release(fh).await;
        assert_eq!(s.mem.body("a").unwrap(), b"x".as_slice());
        assert_eq!(s.mem.count_of("get"), gets, "O_TRUNC downloads nothing");
        let b = s.fs.lookup(root, "b").await.unwrap().ino;
        assert_eq!(s.fs.setattr(b, Some(6 << 20), None).await.unwrap().size, 6 << 20);
        assert!(s.mem.body("b").unwrap() == data[..6 << 20], "the first 6 MiB");
        assert_eq!(s.mem.count_of("get"), gets, "a truncate to 6 MiB downloads nothing");
        let c = s.fs.lookup(root, "c").await.unwrap().ino;
        assert_eq!(s.fs.setattr(c, Some(1 << 20), None).await.unwrap().size, 1 << 20);
        assert!(s.mem.body("c").unwrap() == data[..1 << 20], "the first MiB");
        assert_eq!(s.mem.count_of("get"), gets + 1, "a truncate to 1 MiB downloads that MiB");
        assert_clean(&s).await;
    });
}

/// An open for writing whose writer is still being made (its HEAD is out)
/// when the file is renamed: the rename waits for that writer and moves it
/// with the file, so what the open writes lands under the new name. Before,
/// the rename did not see it, and the close uploaded to the old name (or
/// failed its If-Match there).
#[test]
fn a_rename_reaches_a_writer_still_being_made() {
    rt().block_on(async {
        let s = setup(64 << 20, 25);
        let root = super::inode::ROOT;
        s.mem.insert("f", b"0123456789".to_vec());
        let ino = s.fs.lookup(root, "f").await.unwrap().ino;
        let gate = Arc::new(tokio::sync::Notify::new());
        s.faults.add(Rule::nth("head", 0, Fault::HeldAnswer(gate.clone())));
        let opening = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.open(ino, libc::O_RDWR, pid()).await.map(|(fh, _)| fh) }
        });
        held(&s.faults).await;
        assert_eq!(s.faults.injected(), 1, "the open's HEAD is out");
        let renaming = tokio::spawn({
            let fs = s.fs.clone();
            async move { fs.rename(root, "f", root, "g", 0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_one();
        renaming.await.unwrap().unwrap();
        let fh = opening.await.unwrap().unwrap();
        s.fs.write(fh, 0, b"abc").await.unwrap();
        s.fs.flush(fh, pid()).await.expect("stored under the new name");
        s.fs.release(fh).await;
        assert_eq!(s.mem.body("g").unwrap(), b"abc3456789".as_slice());
        assert!(s.mem.body("f").is_none(), "{:?}", s.mem.keys());
        assert_clean(&s).await;
    });
}

/// A create that fails after its inode was made (here its staging file
/// cannot be made) leaves no inode and no name behind: the kernel never got
/// it, so nothing would forget it, the name would stay listed, and a local
/// inode under a directory would hold up the directory's rename.
#[test]
fn a_failed_create_leaves_no_inode() {
    rt().block_on(async {
        let s = setup(64 << 20, 26);
        let root = super::inode::ROOT;
        s.mem.insert("d/f", vec![b'x'; 100]);
        let d = s.fs.lookup(root, "d").await.unwrap().ino;
        let before = s.fs.inode_count();
        std::fs::remove_dir(s.fs.staging.path()).unwrap();
        assert!(s.fs.create(d, "new", libc::O_RDWR, pid()).await.is_err(), "no staging file, no create");
        assert_eq!(s.fs.inode_count(), before, "no inode left by the failed create");
        assert_eq!(s.fs.lookup(d, "new").await.err(), Some(FsError::NotFound));
        s.fs.rename(root, "d", root, "e", 0).await.expect("the rename is not held up");
        assert!(s.mem.body("e/f").is_some(), "{:?}", s.mem.keys());
        assert_clean(&s).await;
    });
}

/// `touch` (create, set the times, close): the new empty file is made at
/// close, which returns the error when that fails. When its release's try
/// fails too, the name goes, and a later lookup finds what the server
/// holds (here, another client's object made meanwhile) instead of a name
/// `stat` calls missing and `O_EXCL` calls existing.
#[test]
fn a_touched_file_is_made_at_close_and_a_never_made_one_is_forgotten() {
    rt().block_on(async {
        let s = setup(64 << 20, 17);
        let (attr, fh) = s.fs.create(super::inode::ROOT, "t", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.setattr(attr.ino, None, Some(std::time::SystemTime::now())).await.unwrap();
        s.fs.flush(fh, pid()).await.unwrap();
        assert_eq!(s.mem.body("t").as_deref(), Some(&b""[..]), "made at close, before release");
        s.fs.release(fh).await;

        let (attr, fh) = s.fs.create(super::inode::ROOT, "u", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.setattr(attr.ino, None, Some(std::time::SystemTime::now())).await.unwrap();
        s.faults.add(Rule::always("put", server_error()));
        assert!(s.fs.flush(fh, pid()).await.is_err(), "close reports the failed creation");
        s.fs.release(fh).await;
        assert!(s.mem.body("u").is_none());
        s.faults.clear();
        s.mem.insert("u", &b"theirs"[..]);
        assert_eq!(
            s.fs.lookup(super::inode::ROOT, "u").await.unwrap().size,
            6,
            "the server's object, not the failed file"
        );
        assert_clean(&s).await;
    });
}

/// A new file whose release's upload fails while another open of it (a
/// retried `cp` that found the name) joins its writer keeps its name: the
/// file is open again, and that handle's close makes it.
#[test]
fn a_file_opened_again_while_its_release_fails_keeps_its_name() {
    rt().block_on(async {
        let s = setup(64 << 20, 18);
        let (attr, fh) = s.fs.create(super::inode::ROOT, "v", libc::O_WRONLY, pid()).await.unwrap();
        s.fs.write(fh, 0, b"abc").await.unwrap();
        let late = StoreError::Server { status: 500, message: "injected".into() };
        s.faults.add(Rule::always("put", Fault::FailAfter(Duration::from_millis(300), late)));
        assert!(s.fs.flush(fh, pid()).await.is_err());
        let fs = s.fs.clone();
        let release = tokio::spawn(async move { fs.release(fh).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (fh2, _) = s.fs.open(attr.ino, libc::O_WRONLY, pid()).await.unwrap();
        release.await.unwrap();
        s.faults.clear();
        assert_eq!(s.fs.lookup(super::inode::ROOT, "v").await.unwrap().ino, attr.ino, "still named while open");
        s.fs.flush(fh2, pid()).await.unwrap();
        s.fs.release(fh2).await;
        assert_eq!(s.mem.body("v").as_deref(), Some(&b"abc"[..]), "made by the second handle's close");
        assert_clean(&s).await;
    });
}

/// A `mkdir` whose PUT fails without a clear answer (a 5xx, a timeout)
/// may still have been applied: the next lookup asks the server, even
/// within the TTL and after the lookup `mkdir` made itself said "none".
#[test]
fn a_mkdir_that_failed_without_an_answer_is_looked_up_again() {
    rt().block_on(async {
        let s = setup(64 << 20, 19);
        s.faults.add(Rule::always("put", server_error()));
        assert!(s.fs.mkdir(super::inode::ROOT, "n").await.is_err());
        s.faults.clear();
        s.mem.insert("n/", &b""[..]);
        assert_eq!(s.fs.lookup(super::inode::ROOT, "n").await.unwrap().kind, crate::fs::Kind::Dir, "applied late");
        assert_clean(&s).await;
    });
}

/// A listing of a directory that was out when a change in it failed
/// without an answer is handed out, but not kept: it may tell of the
/// directory before the server applied that change late, and the next
/// lookup asks the server instead.
#[test]
fn a_listing_out_when_a_change_failed_without_an_answer_is_not_kept() {
    rt().block_on(async {
        let s = setup(64 << 20, 20);
        s.mem.insert("d/other", &b"x"[..]);
        let dir = s.fs.lookup(super::inode::ROOT, "d").await.unwrap().ino;
        let (gate, listing) = held_listing(&s, dir).await;
        s.faults.add(Rule::always("put", server_error()));
        assert!(s.fs.mkdir(dir, "n").await.is_err());
        s.mem.insert("d/n/", &b""[..]);
        gate.notify_one();
        listing.await.unwrap();
        s.faults.clear();
        assert_eq!(s.fs.lookup(dir, "n").await.unwrap().kind, crate::fs::Kind::Dir, "applied late, and asked for");
        assert_clean(&s).await;
    });
}
