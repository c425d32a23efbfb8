//! The write path through a real FUSE mount on a real S3 server: what
//! programs write is what S3 holds once close() or fsync() returns.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};

fn raw(bucket: &str, key: &str) -> Option<Vec<u8>> {
    server().get(bucket, key)
}

/// A source tree with nested dirs, binary and empty files, odd names.
fn make_tree(root: &std::path::Path) {
    for i in 0..40 {
        let dir = root.join(format!("d{}/sub{}", i % 4, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("file {i}.txt")), format!("line {i}\n").repeat(i * 13)).unwrap();
    }
    std::fs::write(root.join("bin.dat"), pattern(3 << 20, 9)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    std::fs::write(root.join("ünï+%.txt"), "odd name").unwrap();
}

#[test]
fn close_makes_data_durable_and_visible() {
    let srv = server();
    let bucket = srv.bucket("durable");
    let m = Mount::start(&bucket, &[]);
    std::fs::write(m.path("a.txt"), "first").unwrap();
    assert_eq!(raw(&bucket, "a.txt").unwrap(), b"first");
    // Empty files exist once closed.
    std::fs::File::create(m.path("empty")).unwrap();
    assert!(wait_until(std::time::Duration::from_secs(5), || raw(&bucket, "empty") == Some(Vec::new())));
    // Overwrite with O_TRUNC.
    std::fs::write(m.path("a.txt"), "second version").unwrap();
    assert_eq!(raw(&bucket, "a.txt").unwrap(), b"second version");
    // fsync uploads while the file stays open; later writes upload at close.
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(m.path("log")).unwrap();
    f.write_all(b"one\n").unwrap();
    f.sync_all().unwrap();
    assert_eq!(raw(&bucket, "log").unwrap(), b"one\n");
    f.write_all(b"two\n").unwrap();
    drop(f);
    assert_eq!(raw(&bucket, "log").unwrap(), b"one\ntwo\n");
    // Shell redirection and dup'd descriptors: the whole content, once.
    sh(&format!("cd {} && exec 3>dup.txt && echo a >&3 && (echo b >&3) && exec 3>&-", m.mountpoint.display()));
    assert_eq!(raw(&bucket, "dup.txt").unwrap(), b"a\nb\n");
    sh(&format!("echo hello > {} && echo world >> {}", m.path("sh.txt").display(), m.path("sh.txt").display()));
    assert_eq!(raw(&bucket, "sh.txt").unwrap(), b"hello\nworld\n");
    assert_eq!(std::fs::read_to_string(m.path("sh.txt")).unwrap(), "hello\nworld\n");
}

#[test]
fn in_place_edits_appends_and_truncate() {
    let srv = server();
    let bucket = srv.bucket("edits");
    let base = pattern(12 << 20, 3);
    srv.put(&bucket, "big.bin", base.clone());
    srv.put(&bucket, "small.txt", "0123456789");
    let m = Mount::start(&bucket, &[]);

    // Append to a large object: the unchanged bytes are reused server-side.
    let mut f = std::fs::OpenOptions::new().append(true).open(m.path("big.bin")).unwrap();
    f.write_all(b"appended tail").unwrap();
    drop(f);
    let mut want = base.clone();
    want.extend_from_slice(b"appended tail");
    assert!(raw(&bucket, "big.bin").unwrap() == want, "append result differs");

    // Random writes in the middle.
    let f = std::fs::OpenOptions::new().write(true).open(m.path("big.bin")).unwrap();
    f.write_all_at(b"XXXX", 5 << 20).unwrap();
    f.write_all_at(b"YY", 1).unwrap();
    drop(f);
    want[5 << 20..(5 << 20) + 4].copy_from_slice(b"XXXX");
    want[1..3].copy_from_slice(b"YY");
    assert!(raw(&bucket, "big.bin").unwrap() == want, "random write result differs");
    assert!(std::fs::read(m.path("big.bin")).unwrap() == want);

    // Read-modify-write through one O_RDWR handle.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(m.path("small.txt")).unwrap();
    f.seek(SeekFrom::Start(3)).unwrap();
    f.write_all(b"abc").unwrap();
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"012abc6789");
    drop(f);
    assert_eq!(raw(&bucket, "small.txt").unwrap(), b"012abc6789");

    // truncate(2) without an open handle, down and up.
    let f = std::fs::OpenOptions::new().write(true).open(m.path("small.txt")).unwrap();
    f.set_len(4).unwrap();
    drop(f);
    assert_eq!(raw(&bucket, "small.txt").unwrap(), b"012a");
    sh(&format!("truncate -s 6 {}", m.path("small.txt").display()));
    assert_eq!(raw(&bucket, "small.txt").unwrap(), b"012a\0\0");
    assert_eq!(std::fs::metadata(m.path("small.txt")).unwrap().len(), 6);
}

#[test]
fn namespace_operations() {
    let srv = server();
    let bucket = srv.bucket("names");
    let m = Mount::start(&bucket, &[]);
    std::fs::create_dir(m.path("dir")).unwrap();
    assert_eq!(raw(&bucket, "dir/").unwrap(), b"");
    std::fs::write(m.path("dir/f"), "x").unwrap();
    assert_eq!(std::fs::remove_dir(m.path("dir")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    // rename a file, and over an existing one (write-temp-then-rename).
    std::fs::write(m.path("dir/target"), "old").unwrap();
    std::fs::write(m.path("dir/.tmp"), "new").unwrap();
    std::fs::rename(m.path("dir/.tmp"), m.path("dir/target")).unwrap();
    assert_eq!(raw(&bucket, "dir/target").unwrap(), b"new");
    assert_eq!(raw(&bucket, "dir/.tmp"), None);
    assert_eq!(std::fs::read_to_string(m.path("dir/target")).unwrap(), "new");
    // rename a directory, object by object.
    std::fs::create_dir(m.path("dir/sub")).unwrap();
    std::fs::write(m.path("dir/sub/deep"), "deep").unwrap();
    std::fs::rename(m.path("dir"), m.path("moved")).unwrap();
    assert_eq!(raw(&bucket, "moved/sub/deep").unwrap(), b"deep");
    assert_eq!(raw(&bucket, "moved/f").unwrap(), b"x");
    assert_eq!(raw(&bucket, "dir/f"), None);
    assert!(std::fs::metadata(m.path("dir")).is_err());
    assert_eq!(std::fs::read_to_string(m.path("moved/sub/deep")).unwrap(), "deep");
    // unlink and rmdir.
    std::fs::remove_file(m.path("moved/sub/deep")).unwrap();
    std::fs::remove_dir(m.path("moved/sub")).unwrap();
    assert_eq!(raw(&bucket, "moved/sub/deep"), None);
    assert_eq!(raw(&bucket, "moved/sub/"), None);
    assert!(std::fs::metadata(m.path("moved/sub")).is_err());
    let names: Vec<String> =
        std::fs::read_dir(m.path("moved")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn cp_rsync_and_tar_round_trip() {
    let srv = server();
    let bucket = srv.bucket("tools");
    let m = Mount::start(&bucket, &[]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    sh(&format!("cp -r {} {}", tree.display(), m.path("cp").display()));
    sh(&format!("diff -r {} {}", tree.display(), m.path("cp").display()));
    sh(&format!("rsync -a {}/ {}/", tree.display(), m.path("rsync").display()));
    sh(&format!("diff -r {} {}", tree.display(), m.path("rsync").display()));
    let tarball = src.path().join("t.tar");
    sh(&format!("tar -C {} -cf {} tree", src.path().display(), tarball.display()));
    std::fs::create_dir(m.path("tar")).unwrap();
    sh(&format!("tar -C {} -xf {}", m.path("tar").display(), tarball.display()));
    sh(&format!("diff -r {} {}", tree.display(), m.path("tar/tree").display()));
    // And S3 has the same bytes.
    assert!(raw(&bucket, "rsync/bin.dat").unwrap() == std::fs::read(tree.join("bin.dat")).unwrap());
}

#[test]
fn git_clone_onto_the_mount_is_clean() {
    let srv = server();
    let bucket = srv.bucket("git");
    let m = Mount::start(&bucket, &[]);
    let src = tempfile::tempdir().unwrap();
    let repo = src.path().join("repo");
    make_tree(&repo);
    sh(&format!(
        "cd {} && git init -q && git -c user.name=t -c user.email=t@e add -A && git -c user.name=t -c user.email=t@e commit -qm one \
         && echo change >> empty && git -c user.name=t -c user.email=t@e commit -qam two",
        repo.display()
    ));
    sh(&format!("git clone -q {} {}", repo.display(), m.path("clone").display()));
    let status = sh(&format!("cd {} && git status --porcelain", m.path("clone").display()));
    assert_eq!(status, "", "git status is not clean");
    let log = sh(&format!("cd {} && git log --oneline | wc -l", m.path("clone").display()));
    assert_eq!(log.trim(), "2");
    sh(&format!("cd {} && git fsck 2>&1", m.path("clone").display()));
}

#[test]
fn sqlite_database_on_the_mount() {
    let srv = server();
    let bucket = srv.bucket("sqlite");
    let m = Mount::start(&bucket, &[]);
    let db = m.path("data.db");
    let sql = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\n\
               BEGIN; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 5000) \
               INSERT INTO t(v) SELECT 'row ' || x FROM c; COMMIT;\n\
               UPDATE t SET v = 'changed' WHERE id % 100 = 0;\n";
    let out = Command::new("sqlite3").arg(&db).arg(sql).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q = sh(&format!(
        "sqlite3 {} \"SELECT count(*), sum(v = 'changed') FROM t; PRAGMA integrity_check;\"",
        db.display()
    ));
    assert_eq!(q, "5000|50\nok\n");
    // The database in S3 is the same file.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("copy.db"), raw(&bucket, "data.db").unwrap()).unwrap();
    let q = sh(&format!("sqlite3 {} \"SELECT count(*) FROM t\"", local.path().join("copy.db").display()));
    assert_eq!(q, "5000\n");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn streaming_write_of_2_gib_stays_in_bounded_memory() {
    let srv = server();
    let bucket = srv.bucket("stream");
    let m = Mount::start(&bucket, &["--memory-limit", "256MiB"]);
    let len: u64 = 2 << 30;
    let chunk = pattern(1 << 20, 11);
    let mut f = std::fs::File::create(m.path("big")).unwrap();
    for _ in 0..(len >> 20) {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let hwm = vm_hwm_kib(m.pid());
    assert!(hwm < 400 * 1024, "peak RSS {hwm} KiB for a 2 GiB streaming write");
    // Verify the object by streaming it back through the SDK.
    let (size, ok) = srv.block_on(async {
        let out = srv.client.get_object().bucket(&bucket).key("big").send().await.unwrap();
        let size = out.content_length().unwrap() as u64;
        let mut body = out.body;
        let mut pos = 0usize;
        let mut ok = true;
        while let Some(b) = body.try_next().await.unwrap() {
            for (i, byte) in b.iter().enumerate() {
                if *byte != chunk[(pos + i) % chunk.len()] {
                    ok = false;
                }
            }
            pos += b.len();
        }
        (size, ok)
    });
    assert_eq!(size, len);
    assert!(ok, "content differs");
}

#[test]
fn read_only_mount_refuses_every_change() {
    let srv = server();
    let bucket = srv.bucket("ro");
    srv.put(&bucket, "f", "x");
    let m = Mount::start(&bucket, &["--read-only"]);
    for err in [
        std::fs::write(m.path("new"), "x").unwrap_err(),
        std::fs::OpenOptions::new().append(true).open(m.path("f")).unwrap_err(),
        std::fs::create_dir(m.path("d")).unwrap_err(),
        std::fs::remove_file(m.path("f")).unwrap_err(),
        std::fs::rename(m.path("f"), m.path("g")).unwrap_err(),
    ] {
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    assert_eq!(raw(&bucket, "f").unwrap(), b"x");
}

#[test]
fn concurrent_overwrite_by_another_client_is_an_error() {
    let srv = server();
    let bucket = srv.bucket("conflict");
    srv.put(&bucket, "f", "original");
    let m = Mount::start(&bucket, &[]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(m.path("f")).unwrap();
    f.write_all_at(b"mine", 0).unwrap();
    srv.put(&bucket, "f", "theirs, written meanwhile");
    let err = f.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(raw(&bucket, "f").unwrap(), b"theirs, written meanwhile", "the other client's write was lost");
    drop(f);
    assert!(m.log_text().contains("upload of"), "{}", m.log_text());
}

/// Ten `dd conv=notrunc` processes, each writing its own 16 KiB into one
/// 25 MiB file at once: they share one writer, so every write lands and no
/// upload fails its If-Match against another writer of the same mount.
#[test]
fn concurrent_in_place_writers_of_one_file_all_land() {
    let srv = server();
    let bucket = srv.bucket("concurrent-dd");
    let mut expected = pattern(25 << 20, 17);
    srv.put(&bucket, "f.bin", expected.clone());
    let m = Mount::start(&bucket, &[]);
    let offsets: Vec<usize> = (0..10).map(|n| n * (2 << 20) + 4096 * (n + 1) + 123).collect();
    let children: Vec<_> = offsets
        .iter()
        .enumerate()
        .map(|(n, off)| {
            let src = m.mountpoint.parent().unwrap().join(format!("chunk{n}"));
            std::fs::write(&src, vec![n as u8 + 1; 16 << 10]).unwrap();
            Command::new("dd")
                .arg(format!("if={}", src.display()))
                .arg(format!("of={}", m.path("f.bin").display()))
                .args(["conv=notrunc", "oflag=seek_bytes", "bs=1024", "count=16", "status=none"])
                .arg(format!("seek={off}"))
                .spawn()
                .unwrap()
        })
        .collect();
    for (n, mut c) in children.into_iter().enumerate() {
        assert!(c.wait().unwrap().success(), "dd {n} failed: {}", m.log_text());
        expected[offsets[n]..offsets[n] + (16 << 10)].fill(n as u8 + 1);
    }
    assert!(raw(&bucket, "f.bin").unwrap() == expected, "every write is in the object");
    assert!(!m.log_text().contains("precondition failed"), "{}", m.log_text());
}

/// `mv` of a file another client replaced since this mount last looked
/// (within the metadata TTL, so the mount still holds the old size): the
/// renamed file has the new version's size and bytes, and the log says
/// that the new version was copied.
#[test]
fn rename_of_a_file_replaced_by_another_client_keeps_its_size() {
    let srv = server();
    let bucket = srv.bucket("rename-replaced");
    srv.put(&bucket, "a", vec![b'o'; 1000]);
    let m = Mount::start(&bucket, &["--metadata-ttl", "60s"]);
    assert_eq!(std::fs::metadata(m.path("a")).unwrap().len(), 1000);
    let newer = pattern(3000, 5);
    srv.put(&bucket, "a", newer.clone());
    std::fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(raw(&bucket, "b").unwrap(), newer);
    assert!(raw(&bucket, "a").is_none());
    assert_eq!(std::fs::metadata(m.path("b")).unwrap().len(), 3000, "the size of the version copied");
    assert_eq!(std::fs::read(m.path("b")).unwrap(), newer);
    assert!(m.log_text().contains("was replaced on the server before its rename"), "{}", m.log_text());
    // A file of several server chunks, uploaded in parts: the copy's
    // condition holds against the ETag the mount has (no fallback).
    let big = pattern(12 << 20, 6);
    std::fs::write(m.path("big"), &big).unwrap();
    std::fs::rename(m.path("big"), m.path("big2")).unwrap();
    assert!(raw(&bucket, "big2").unwrap() == big);
    assert!(std::fs::read(m.path("big2")).unwrap() == big);
    let log = m.log_text();
    assert_eq!(log.matches("was replaced on the server").count(), 1, "{log}");
    assert!(!log.contains("renames copy without it"), "{log}");
}

/// `touch d/f && mv d e`, again and again: the empty file is uploaded by the
/// kernel's RELEASE after `close` returned, and the rename waits for it
/// rather than failing with EBUSY. Then the rename of a file onto one that
/// is still open for writing: the open file's close succeeds and leaves the
/// renamed content, as on a local disk.
#[test]
fn renames_right_after_a_close_and_onto_an_open_file() {
    use std::io::Write as _;
    let srv = server();
    let bucket = srv.bucket("rename-races");
    let m = Mount::start(&bucket, &[]);
    for i in 0..20 {
        let (d, e) = (m.path(&format!("d{i}")), m.path(&format!("e{i}")));
        std::fs::create_dir(&d).unwrap();
        std::fs::File::create(d.join("f")).unwrap();
        std::fs::rename(&d, &e).unwrap_or_else(|err| panic!("round {i}: {err}"));
        assert_eq!(raw(&bucket, &format!("e{i}/f")).unwrap(), b"", "round {i}");
        assert!(raw(&bucket, &format!("d{i}/f")).is_none(), "round {i}");
    }
    std::fs::write(m.path("f"), "old").unwrap();
    let mut open = std::fs::OpenOptions::new().write(true).truncate(true).open(m.path("f")).unwrap();
    open.write_all(b"written through the open file").unwrap();
    std::fs::write(m.path("tmp"), b"renamed over it").unwrap();
    std::fs::rename(m.path("tmp"), m.path("f")).unwrap();
    open.write_all(b", and more").unwrap();
    open.sync_all().expect("fsync of the replaced file");
    drop(open);
    assert_eq!(raw(&bucket, "f").unwrap(), b"renamed over it");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"renamed over it");
}

/// Overwriting a large file through the mount (`> file`, a write-only open
/// with `O_TRUNC`) and `fopen(path, "w+")` (the same, read-write) download
/// none of the old object, with passthrough on (the default) or off, and
/// the file holds what was written after.
#[test]
fn truncating_opens_of_a_large_file_download_nothing() {
    use std::io::Write as _;
    let srv = server();
    let bucket = srv.bucket("trunc-opens");
    for passthrough in [true, false] {
        let addr = free_addr();
        let mut args = vec!["--metrics-addr", addr.as_str()];
        if !passthrough {
            args.push("--no-passthrough");
        }
        let m = Mount::start(&bucket, &args);
        for read in [false, true] {
            srv.put(&bucket, "big.bin", pattern(24 << 20, 8));
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let mut f =
                std::fs::OpenOptions::new().read(read).write(true).truncate(true).open(m.path("big.bin")).unwrap();
            f.write_all(b"replaced").unwrap();
            drop(f);
            assert_eq!(raw(&bucket, "big.bin").unwrap(), b"replaced", "passthrough {passthrough}, read {read}");
        }
        let (_, body) = http_get(&addr, "/metrics");
        assert_eq!(
            metric(&body, "bucketfs_s3_requests_total", "operation=\"get\""),
            0.0,
            "passthrough {passthrough}: {body}"
        );
        assert_eq!(std::fs::read(m.path("big.bin")).unwrap(), b"replaced");
    }
}

/// A file rewritten again and again (`>` then write, fsync, close) while
/// other processes read it whole: each rewrite reads back as written. A
/// reader still open on the previous version shares the file's page cache;
/// had it gone on reading that version, its bytes and its shorter size
/// (through a short read) would be what the read-back saw.
#[test]
fn a_file_rewritten_while_others_read_it_reads_back_whole() {
    let srv = server();
    for extra in [&["--no-passthrough"][..], &[][..]] {
        let bucket = srv.bucket("rewr");
        let m = Mount::start(&bucket, extra);
        let root = m.mountpoint.clone();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let bad = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for r in 0..2u64 {
                let (root, stop, bad) = (&root, &stop, &bad);
                s.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Only this mount writes: once the file exists, a
                        // reader never fails.
                        match std::fs::read(root.join(format!("f{}", r % 2))) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                bad.lock().unwrap().push(format!("{extra:?} reader {r}: {e}"))
                            }
                            _ => {}
                        }
                    }
                });
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for n in 0..400u64 {
                let name = format!("f{}", n % 2);
                let len = rng.random_range(0..200_000);
                let data = pattern(len, n);
                let path = root.join(&name);
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&data).unwrap();
                f.sync_all().unwrap();
                drop(f);
                let back = std::fs::read(&path).unwrap();
                if back != data {
                    let at = back.iter().zip(&data).position(|(a, b)| a != b);
                    bad.lock().unwrap().push(format!("{extra:?} n={n} len={len} got={} first diff={at:?}", back.len()));
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let bad = bad.into_inner().unwrap();
        assert!(bad.is_empty(), "{bad:#?}");
    }
}
