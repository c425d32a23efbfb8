//! FUSE passthrough through a real mount: a file cached whole in
//! `--cache-dir` is read by the kernel from the cache file, with no GET and
//! no READ reaching bucketfs; with `--no-passthrough` the same reads go
//! through bucketfs from the disk cache. Both ways, a changed object is
//! never served from the old version's file, and writes land in the bucket.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

/// A mount with a disk cache and metrics; `passthrough` false adds
/// `--no-passthrough`.
struct Cached {
    m: Mount,
    addr: String,
    _cache: tempfile::TempDir,
    cache_dir: std::path::PathBuf,
}

impl Cached {
    fn start(bucket: &str, passthrough: bool) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().to_path_buf();
        let addr = free_addr();
        let mut args = vec!["--cache-dir", cache_dir.to_str().unwrap(), "--metrics-addr", &addr];
        if !passthrough {
            args.push("--no-passthrough");
        }
        let m = Mount::start(bucket, &args);
        Cached { m, addr, _cache: cache, cache_dir }
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = http_get(&self.addr, "/metrics");
        metric(&body, name, labels)
    }

    fn gets(&self) -> f64 {
        self.metric("bucketfs_s3_requests_total", "operation=\"get\"")
    }

    fn passthrough_opens(&self) -> f64 {
        self.metric("bucketfs_passthrough_opens_total", "")
    }

    fn read_bytes(&self) -> f64 {
        self.metric("bucketfs_read_bytes_total", "")
    }

    /// Whole-object files in the cache directory.
    fn object_files(&self) -> usize {
        let out = sh(&format!("find {} -name '*.obj' | wc -l", self.cache_dir.display()));
        out.trim().parse().unwrap()
    }
}

/// SHA-256 of the file's bytes read through a shared read-only mapping.
fn mapped_sha256(path: &std::path::Path) -> String {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only mapping of an open file, unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: `len` bytes are mapped at `p`.
    let sum = sha256(unsafe { std::slice::from_raw_parts(p as *const u8, len) });
    unsafe { libc::munmap(p, len) };
    sum
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("dropping the page cache (needs root)");
}

/// Reads `key` until its blocks are joined into one file in the cache.
fn cache_whole(c: &Cached, key: &str, want: &str) {
    assert_eq!(sha256(&std::fs::read(c.m.path(key)).unwrap()), want);
    assert!(
        wait_until(Duration::from_secs(20), || c.object_files() >= 1),
        "the object was never joined into one file; log:\n{}",
        c.m.log_text()
    );
}

fn cached_reread(passthrough: bool) {
    let srv = server();
    let bucket = srv.bucket(if passthrough { "pt-read" } else { "nopt-read" });
    let data = pattern((24 << 20) + 4321, 17);
    let want = sha256(&data);
    srv.put(&bucket, "dir/big.bin", data.clone());
    let c = Cached::start(&bucket, passthrough);
    cache_whole(&c, "dir/big.bin", &want);
    // A first open after the join may still find the blocks being removed:
    // one read settles it.
    assert_eq!(sha256(&std::fs::read(c.m.path("dir/big.bin")).unwrap()), want);
    let (gets, opens, read) = (c.gets(), c.passthrough_opens(), c.read_bytes());
    drop_page_cache();
    assert_eq!(sha256(&std::fs::read(c.m.path("dir/big.bin")).unwrap()), want, "bytes after drop_caches");
    drop_page_cache();
    assert_eq!(mapped_sha256(&c.m.path("dir/big.bin")), want, "bytes through mmap");
    assert_eq!(c.gets(), gets, "no GET for a file cached whole");
    if passthrough {
        assert!(c.passthrough_opens() > opens, "the open was not passed through; log:\n{}", c.m.log_text());
        assert_eq!(c.read_bytes(), read, "the kernel read the cache file itself: no READ reached bucketfs");
    } else {
        assert_eq!(c.passthrough_opens(), 0.0, "--no-passthrough passed an open through");
        assert!(c.read_bytes() >= read + data.len() as f64, "the reads went through bucketfs");
        assert!(!c.m.log_text().contains("passthrough off"), "--no-passthrough is not a fallback to log");
    }

    // The object changes on the server: once the metadata TTL (1 s) has
    // passed, the next open sees the new ETag and never the old file.
    let changed = pattern(data.len(), 99);
    srv.put(&bucket, "dir/big.bin", changed.clone());
    std::thread::sleep(Duration::from_millis(1200));
    let opens = c.passthrough_opens();
    assert_eq!(sha256(&std::fs::read(c.m.path("dir/big.bin")).unwrap()), sha256(&changed), "stale cache file served");
    assert_eq!(c.passthrough_opens(), opens, "the new version is not on disk yet: no passthrough");
    drop_page_cache();
    assert_eq!(sha256(&std::fs::read(c.m.path("dir/big.bin")).unwrap()), sha256(&changed), "stale after drop_caches");
}

#[test]
fn a_cached_file_is_reread_without_get_with_passthrough() {
    cached_reread(true);
}

#[test]
fn a_cached_file_is_reread_without_get_without_passthrough() {
    cached_reread(false);
}

/// Appends and in-place edits of a file cached whole (and read through the
/// cache file just before) are in the bucket once closed, and are what the
/// next read sees.
fn edits_after_cached_reads(passthrough: bool) {
    let srv = server();
    let bucket = srv.bucket(if passthrough { "pt-edit" } else { "nopt-edit" });
    let data = pattern((9 << 20) + 77, 3);
    srv.put(&bucket, "f.bin", data.clone());
    let c = Cached::start(&bucket, passthrough);
    cache_whole(&c, "f.bin", &sha256(&data));
    assert_eq!(sha256(&std::fs::read(c.m.path("f.bin")).unwrap()), sha256(&data));

    // Append.
    let mut expect = data.clone();
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(c.m.path("f.bin")).unwrap();
        f.write_all(b"appended tail").unwrap();
    }
    expect.extend_from_slice(b"appended tail");
    assert!(srv.get(&bucket, "f.bin").unwrap() == expect, "append not in the bucket after close");
    // In place.
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(c.m.path("f.bin")).unwrap();
        f.write_all_at(b"EDITED", 5 << 20).unwrap();
    }
    expect[(5 << 20)..(5 << 20) + 6].copy_from_slice(b"EDITED");
    assert!(srv.get(&bucket, "f.bin").unwrap() == expect, "in-place edit not in the bucket after close");
    drop_page_cache();
    assert_eq!(sha256(&std::fs::read(c.m.path("f.bin")).unwrap()), sha256(&expect), "read after the edits");
}

#[test]
fn edits_of_a_cached_file_reach_the_bucket_with_passthrough() {
    edits_after_cached_reads(true);
}

#[test]
fn edits_of_a_cached_file_reach_the_bucket_without_passthrough() {
    edits_after_cached_reads(false);
}

/// While a reader holds the file open in passthrough mode, a second reader
/// shares its cache file, and a write (which cannot: the kernel requires one
/// backing file per inode) fails at once with EBUSY, not EIO; it works once
/// the reader has closed, and did not touch the object meanwhile.
#[test]
fn a_write_open_while_passed_through_fails_with_ebusy() {
    let srv = server();
    let bucket = srv.bucket("pt-busy");
    let data = pattern(3 << 20, 8);
    srv.put(&bucket, "f", data.clone());
    let c = Cached::start(&bucket, true);
    cache_whole(&c, "f", &sha256(&data));
    let opens = c.passthrough_opens();
    let mut reader = std::fs::File::open(c.m.path("f")).unwrap();
    assert!(c.passthrough_opens() > opens, "log:\n{}", c.m.log_text());
    let second = std::fs::read(c.m.path("f")).unwrap();
    assert!(second == data);
    assert!(c.passthrough_opens() >= opens + 2.0, "the second reader shares the backing file");
    let err = std::fs::OpenOptions::new().write(true).truncate(true).open(c.m.path("f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    assert!(srv.get(&bucket, "f").unwrap() == data, "a refused truncating open truncated the object");
    assert!(c.m.log_text().contains("EBUSY"), "one log line names the refusal");
    // The passed-through reader still reads.
    reader.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut buf = vec![0u8; 4096];
    std::io::Read::read_exact(&mut reader, &mut buf).unwrap();
    assert!(buf[..] == data[1 << 20..(1 << 20) + 4096]);
    drop(reader);
    // RELEASE is sent asynchronously: retry for a moment.
    let ok = wait_until(Duration::from_secs(5), || {
        std::fs::OpenOptions::new().append(true).open(c.m.path("f")).and_then(|mut f| f.write_all(b"+")).is_ok()
    });
    assert!(ok, "the write open still fails once the reader closed");
    let mut expect = data.clone();
    expect.push(b'+');
    assert!(srv.get(&bucket, "f").unwrap() == expect);
}

/// A cache directory the kernel will not take backing files from (here on
/// overlayfs, a stacked file system): the first refusal is logged once,
/// passthrough stays off for the mount, and reads go through bucketfs.
#[test]
fn a_refused_backing_file_falls_back_with_one_log_line() {
    let srv = server();
    let bucket = srv.bucket("pt-fallback");
    let data = pattern(2 << 20, 4);
    srv.put(&bucket, "a", data.clone());
    srv.put(&bucket, "b", data.clone());
    let layers = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = ["l", "u", "w", "m"].iter().map(|d| layers.path().join(d)).collect();
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
    }
    let opts = format!("lowerdir={},upperdir={},workdir={}", dirs[0].display(), dirs[1].display(), dirs[2].display());
    sh(&format!("mount -t overlay overlay -o {opts} {}", dirs[3].display()));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _overlay = Unmount(dirs[3].clone());
    let addr = free_addr();
    let m = Mount::start(&bucket, &["--cache-dir", dirs[3].to_str().unwrap(), "--metrics-addr", &addr]);
    let objects = || sh(&format!("find {} -name '*.obj' | wc -l", dirs[3].display())).trim().parse::<usize>().unwrap();
    let gets = || metric(&http_get(&addr, "/metrics").1, "bucketfs_s3_requests_total", "operation=\"get\"");
    for key in ["a", "b"] {
        assert!(std::fs::read(m.path(key)).unwrap() == data);
        assert!(wait_until(Duration::from_secs(20), || objects() >= if key == "a" { 1 } else { 2 }));
        let before = gets();
        for _ in 0..3 {
            drop_page_cache();
            assert!(std::fs::read(m.path(key)).unwrap() == data, "reads after the fallback");
        }
        assert_eq!(gets(), before, "served from the disk cache through bucketfs");
    }
    let (_, body) = http_get(&addr, "/metrics");
    assert_eq!(metric(&body, "bucketfs_passthrough_opens_total", ""), 0.0);
    let log = m.log_text();
    assert_eq!(log.matches("passthrough off").count(), 1, "{log}");
}

/// Edits of an existing object through write opens: with passthrough the
/// kernel writes the writer's staging file itself (no WRITE reaches
/// bucketfs), and readers and other writers opened meanwhile share that
/// file; without it every write goes through bucketfs. Both ways, what
/// close and fsync return is in the bucket, and an open for writing that
/// writes nothing uploads nothing.
fn staged_edits(passthrough: bool) {
    let srv = server();
    let bucket = srv.bucket(if passthrough { "pt-wedit" } else { "nopt-wedit" });
    let data = pattern((3 << 20) + 5, 21);
    srv.put(&bucket, "f.bin", data.clone());
    let c = Cached::start(&bucket, passthrough);
    let path = c.m.path("f.bin");
    let written = || c.metric("bucketfs_written_bytes_total", "");
    let puts = || c.metric("bucketfs_s3_requests_total", "operation=\"put\"");
    let (opens, bytes_in) = (c.passthrough_opens(), written());
    let mut expect = data.clone();
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"tail one").unwrap();
        expect.extend_from_slice(b"tail one");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), expect.len() as u64, "stat while open");
        assert!(std::fs::read(&path).unwrap() == expect, "a reader while the writer is open");
        let mut g = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        g.write_all(b"+two").unwrap();
        expect.extend_from_slice(b"+two");
        f.write_all(b"+three").unwrap();
        expect.extend_from_slice(b"+three");
    }
    assert!(srv.get(&bucket, "f.bin").unwrap() == expect, "appends not in the bucket after close");
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        f.write_all_at(b"EDITED", 1 << 20).unwrap();
        f.set_len(expect.len() as u64 - 3).unwrap();
        f.sync_all().unwrap();
        expect[(1 << 20)..(1 << 20) + 6].copy_from_slice(b"EDITED");
        expect.truncate(expect.len() - 3);
        assert!(
            srv.get(&bucket, "f.bin").unwrap() == expect,
            "in-place edit and truncate not in the bucket after fsync"
        );
        f.write_all_at(b"after fsync", 7).unwrap();
        expect[7..18].copy_from_slice(b"after fsync");
    }
    assert!(srv.get(&bucket, "f.bin").unwrap() == expect, "a write after fsync not in the bucket after close");
    let before = puts();
    drop(std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap());
    assert_eq!(puts(), before, "an open for writing that wrote nothing uploaded");
    if passthrough {
        assert!(c.passthrough_opens() >= opens + 5.0, "the opens were not passed through; log:\n{}", c.m.log_text());
        assert_eq!(written(), bytes_in, "a WRITE reached bucketfs: the kernel writes the staging file itself");
    } else {
        assert_eq!(c.passthrough_opens(), 0.0);
        assert!(written() > bytes_in, "the writes went through bucketfs");
    }
    drop_page_cache();
    assert!(std::fs::read(&path).unwrap() == expect, "read after the edits");
}

#[test]
fn staged_edits_reach_the_bucket_with_passthrough() {
    staged_edits(true);
}

#[test]
fn staged_edits_reach_the_bucket_without_passthrough() {
    staged_edits(false);
}

/// The guarantees of an edit hold when the kernel writes the file: an
/// object changed by another client meanwhile fails fsync and close (If-Match),
/// and the other client's object stays.
#[test]
fn a_passthrough_edit_of_an_object_changed_meanwhile_fails_fsync_and_close() {
    use std::os::fd::IntoRawFd;
    let srv = server();
    let bucket = srv.bucket("pt-conflict");
    srv.put(&bucket, "f", b"first version\n".to_vec());
    let c = Cached::start(&bucket, true);
    let opens = c.passthrough_opens();
    let mut f = std::fs::OpenOptions::new().append(true).open(c.m.path("f")).unwrap();
    assert!(c.passthrough_opens() > opens, "not passed through; log:\n{}", c.m.log_text());
    f.write_all(b"local line\n").unwrap();
    srv.put(&bucket, "f", b"another client's\n".to_vec());
    assert!(f.sync_all().is_err(), "fsync of an edit of a changed object succeeded");
    // SAFETY: the descriptor is ours and closed once.
    let closed = unsafe { libc::close(f.into_raw_fd()) };
    assert_eq!(closed, -1, "close of an edit of a changed object succeeded");
    assert_eq!(srv.get(&bucket, "f").unwrap(), b"another client's\n", "the other client's object was overwritten");
}

/// An in-place edit of a file cached whole, larger than what an open
/// downloads for passthrough: its staging file is filled from the cache
/// file (no GET), the kernel writes it, and the bucket has the edit.
#[test]
fn an_edit_of_a_cached_file_is_filled_from_the_cache() {
    let srv = server();
    let bucket = srv.bucket("pt-fill");
    let mut data = pattern((70 << 20) + 11, 31);
    srv.put(&bucket, "big.bin", data.clone());
    let c = Cached::start(&bucket, true);
    cache_whole(&c, "big.bin", &sha256(&data));
    assert_eq!(sha256(&std::fs::read(c.m.path("big.bin")).unwrap()), sha256(&data));
    let (gets, opens) = (c.gets(), c.passthrough_opens());
    // The readers' RELEASE is sent after close returns: retry for a moment.
    let mut f = None;
    assert!(wait_until(Duration::from_secs(5), || {
        f = std::fs::OpenOptions::new().read(true).write(true).open(c.m.path("big.bin")).ok();
        f.is_some()
    }));
    let f = f.unwrap();
    f.write_all_at(b"EDITED IN PLACE", 40 << 20).unwrap();
    assert!(c.passthrough_opens() > opens, "not passed through; log:\n{}", c.m.log_text());
    assert_eq!(c.gets(), gets, "the staging file was downloaded instead of copied from the cache");
    drop(f);
    data[(40 << 20)..(40 << 20) + 15].copy_from_slice(b"EDITED IN PLACE");
    assert!(srv.get(&bucket, "big.bin").unwrap() == data, "the edit is not in the bucket after close");
}
