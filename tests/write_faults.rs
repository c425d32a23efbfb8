//! The write path under faults, through a real mount whose endpoint is the
//! fault-injection proxy: writes land whole or close() reports an error, no
//! partial object ever becomes visible, and the mount recovers.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;

use common::proxy::{Mode, Proxy};
use common::*;

/// close(2) on the descriptor, returning its error.
fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: the descriptor is ours and closed once.
    if unsafe { libc::close(fd) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Multipart uploads the server has open in `bucket`.
fn open_uploads(srv: &Server, bucket: &str) -> usize {
    srv.block_on(async {
        let c = raw_client(&srv.endpoint);
        c.list_multipart_uploads().bucket(bucket).send().await.unwrap().uploads().len()
    })
}

#[test]
fn upload_failing_midway_is_an_error_and_leaves_no_object() {
    let srv = server();
    let bucket = srv.bucket("wfault");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--request-timeout", "2s", "--max-attempts", "2"]);
    let chunk = pattern(1 << 20, 3);

    // A 40 MiB streaming upload; the server goes away after 16 MiB.
    let mut f = std::fs::File::create(m.path("big.bin")).unwrap();
    let mut write_failed = false;
    for i in 0..40 {
        if i == 16 {
            proxy.set_mode(Mode::Down);
        }
        if f.write_all(&chunk).is_err() {
            write_failed = true;
            break;
        }
    }
    let closed = close(f);
    assert!(write_failed || closed.is_err(), "neither a write nor close() reported the failed upload");
    if let Err(e) = &closed {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    proxy.set_mode(Mode::Pass);
    assert_eq!(srv.get(&bucket, "big.bin"), None, "a partial object became visible");
    assert!(m.log_text().contains("upload of"), "{}", m.log_text());

    // A small file whose server goes away before close(): close() says so.
    let mut f = std::fs::File::create(m.path("small.txt")).unwrap();
    f.write_all(b"never lost silently").unwrap();
    proxy.set_mode(Mode::Down);
    let err = close(f).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    proxy.set_mode(Mode::Pass);
    assert_eq!(srv.get(&bucket, "small.txt"), None);

    // The mount recovers by itself once the server is back.
    std::fs::write(m.path("after.txt"), "back").unwrap();
    assert_eq!(srv.get(&bucket, "after.txt").unwrap(), b"back");
}

#[test]
fn throttling_during_uploads_is_retried() {
    let srv = server();
    let bucket = srv.bucket("wthrottle");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
    let data = pattern(20 << 20, 4);
    let mut f = std::fs::File::create(m.path("t.bin")).unwrap();
    proxy.set_mode(Mode::Error503 { remaining: 3 });
    f.write_all(&data).unwrap();
    close(f).unwrap();
    assert!(proxy.stats().faults() >= 3);
    assert!(srv.get(&bucket, "t.bin").unwrap() == data);
}

#[test]
fn mounts_are_nosuid_nodev_and_private_unless_asked() {
    let srv = server();
    let bucket = srv.bucket("secopts");
    let m = Mount::start(&bucket, &[]);
    let line = mountinfo_at(&m.mountpoint).join("\n");
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    assert!(line.contains("default_permissions"), "{line}");
    assert!(!line.contains("allow_other"), "allow_other without --allow-other: {line}");
    drop(m);
    let m = Mount::start(&bucket, &["--allow-other"]);
    assert!(mountinfo_at(&m.mountpoint).join("\n").contains("allow_other"));
}

/// A failed overwrite leaves the object as it was, and reads through the
/// mount show that object, not the bytes the failed writer left in the
/// kernel's page cache (whole pages written are kept there as they are).
#[test]
fn a_failed_overwrite_is_not_read_back_from_the_page_cache() {
    let srv = server();
    let bucket = srv.bucket("wkeep");
    let (old, new) = (vec![b'o'; 8192], vec![b'n'; 8192]);
    srv.put(&bucket, "doc.bin", old.clone());
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--request-timeout", "2s", "--max-attempts", "2"]);
    let path = m.path("doc.bin");
    // Read once, so the kernel caches the object's pages.
    assert!(std::fs::read(&path).unwrap() == old);
    // Overwrite in place, two whole pages; the server is gone before close().
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&new).unwrap();
    proxy.set_mode(Mode::Down);
    let err = close(f).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The release that follows close() tries once more; let it fail too.
    let gave_up = "data written through a closed handle could not be uploaded";
    let released = wait_until(std::time::Duration::from_secs(30), || m.log_text().contains(gave_up));
    assert!(released, "{}", m.log_text());
    proxy.set_mode(Mode::Pass);
    assert!(srv.get(&bucket, "doc.bin").unwrap() == old);
    let read = std::fs::read(&path).unwrap();
    assert!(read == old, "read back {:?}...\n{}", &read[..16], m.log_text());
}

/// Many failed uploads (1,000 single PUTs and 50 multipart uploads, each
/// failed by one injected 503 with retries off): every close() reports it.
/// A file of one PUT still has its bytes, and the last release sends them
/// again (the server answers by then): the object appears, whole. A
/// multipart stream that failed is gone and appears nowhere. Afterwards the
/// budget holds nothing and no multipart upload is left open on the server.
/// `BUCKETFS_FAILED_UPLOADS` changes the count of single PUTs.
#[test]
fn failed_uploads_leave_no_budget_and_no_open_upload() {
    let n: usize = std::env::var("BUCKETFS_FAILED_UPLOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let srv = server();
    let bucket = srv.bucket("failed-uploads");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let addr = free_addr();
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--max-attempts", "1", "--metrics-addr", &addr]);
    let small = pattern(64 << 10, 5);
    let big = pattern(9 << 20, 6);
    let mut failed = 0;
    let started = std::time::Instant::now();
    for i in 0..n + 50 {
        let (name, data) = if i < n { (format!("s{i}"), &small) } else { (format!("m{i}"), &big) };
        let mut f = std::fs::File::create(m.path(&name)).unwrap();
        f.write_all(data).unwrap();
        if i >= n {
            // Let the first part go out; the next request fails.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        proxy.set_mode(Mode::Error503 { remaining: 1 });
        if let Err(e) = close(f) {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            failed += 1;
        }
        proxy.set_mode(Mode::Pass);
        if i < n {
            // The release's second try, before the next file's 503.
            let sent = wait_until(std::time::Duration::from_secs(10), || srv.get(&bucket, &name).is_some());
            assert!(sent, "{name}: the last release did not send the file again\n{}", m.log_text());
        }
    }
    let took = started.elapsed();
    assert_eq!(failed, n + 50, "every failed upload is reported by close()");
    // Aborts of failed multipart uploads run as the failure is handled.
    assert!(
        wait_until(std::time::Duration::from_secs(10), || open_uploads(srv, &bucket) == 0),
        "{} left open",
        open_uploads(srv, &bucket)
    );
    let (_, body) = http_get(&addr, "/metrics");
    let reserved = metric(&body, "bucketfs_memory_reserved_bytes", "");
    let multipart_open = metric(&body, "bucketfs_multipart_uploads_open", "");
    let failed_metric = metric(&body, "bucketfs_uploads_failed", "");
    eprintln!(
        "failed uploads: {} in {took:.1?}; budget reserved after: {reserved} bytes; multipart uploads open: \
         bucketfs {multipart_open}, server {}; uploads_failed metric {failed_metric}",
        n + 50,
        open_uploads(srv, &bucket)
    );
    assert_eq!(reserved, 0.0, "{body}");
    assert_eq!(multipart_open, 0.0, "{body}");
    assert!(failed_metric >= (n + 50) as f64);
    assert!(srv.get(&bucket, &format!("m{n}")).is_none(), "a failed multipart stream left an object");
    assert!(srv.get(&bucket, "s0").unwrap() == small, "the release's try stored another body");
}

#[test]
fn a_put_applied_whose_answer_was_lost_is_not_an_error() {
    let srv = server();
    let bucket = srv.bucket("wlost");
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);

    // A new file: its PUT (If-None-Match) is applied, the answer lost, and
    // the retry finds the object it stored itself.
    proxy.set_mode(Mode::LoseAnswers { method: "PUT", remaining: 1 });
    let mut f = std::fs::File::create(m.path("new.txt")).unwrap();
    f.write_all(b"stored once, answered never").unwrap();
    close(f).expect("close() failed although the object is stored");
    assert_eq!(proxy.stats().lost_answers, 1);
    assert_eq!(srv.get(&bucket, "new.txt").unwrap(), b"stored once, answered never");
    let recognised = |m: &Mount| m.log_text().matches("refused by its own earlier attempt").count();
    assert_eq!(recognised(&m), 1, "{}", m.log_text());

    // An overwrite (If-Match on the old ETag) the same way.
    proxy.set_mode(Mode::LoseAnswers { method: "PUT", remaining: 1 });
    std::fs::write(m.path("new.txt"), b"second version").expect("overwrite failed although stored");
    assert_eq!(proxy.stats().lost_answers, 2);
    assert_eq!(srv.get(&bucket, "new.txt").unwrap(), b"second version");
    assert_eq!(std::fs::read(m.path("new.txt")).unwrap(), b"second version");
    assert_eq!(recognised(&m), 2, "{}", m.log_text());

    // A multipart upload whose completion is applied and its answer lost.
    // The first POST (CreateMultipartUpload) goes out while the first
    // 8 MiB part fills; the next is the completion.
    let big = pattern(20 << 20, 9);
    let mut f = std::fs::File::create(m.path("big.bin")).unwrap();
    f.write_all(&big[..12 << 20]).unwrap();
    proxy.set_mode(Mode::LoseAnswers { method: "POST", remaining: 1 });
    f.write_all(&big[12 << 20..]).unwrap();
    let closed = close(f);
    let posts = proxy.stats().lost_answers;
    assert!(srv.get(&bucket, "big.bin").unwrap() == big, "the multipart object is not whole");
    closed.expect("close() failed although the multipart object is stored");
    assert_eq!(posts, 3, "the completion's answer was not lost");
    assert!(m.log_text().contains("its earlier attempt had completed it"), "{}", m.log_text());

    // A multipart upload whose start is applied and its answer lost: the
    // retry starts a second upload, and the first is not left open.
    proxy.set_mode(Mode::LoseAnswers { method: "POST", remaining: 1 });
    let mut f = std::fs::File::create(m.path("big2.bin")).unwrap();
    f.write_all(&big).unwrap();
    close(f).expect("close() after a lost answer to the upload's start");
    assert_eq!(proxy.stats().lost_answers, 4, "the start's answer was not lost");
    assert!(srv.get(&bucket, "big2.bin").unwrap() == big, "the multipart object is not whole");
    assert_eq!(open_uploads(srv, &bucket), 0, "a multipart upload was left open\n{}", m.log_text());
    assert!(m.log_text().contains("a retried start had left"), "{}", m.log_text());

    // Another client's object is still never replaced: a new file whose
    // name another client took meanwhile fails, and the other bytes stay.
    let mut f = std::fs::File::create(m.path("taken.txt")).unwrap();
    f.write_all(b"mine").unwrap();
    srv.put(&bucket, "taken.txt", b"them");
    let err = close(f).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(srv.get(&bucket, "taken.txt").unwrap(), b"them");
}

/// Every kind of change against a frozen server (the proxy accepts and
/// forwards nothing) fails with EIO in bounded time, from the call that
/// made it: a new file's close, a multipart upload's close, an append, a
/// truncate, `touch`, `mkdir`, `rm` and `mv`. Nothing that was
/// in the bucket changes, nothing half-made appears, no multipart upload
/// stays open once the server answers again, the budget is whole, and
/// the same changes then succeed on the same mount.
#[test]
fn a_frozen_server_fails_every_change_in_bounded_time_and_changes_nothing() {
    /// With `--request-timeout 2s --max-attempts 2`: a hang detector, not a
    /// speed check (the times are printed).
    const BOUND: std::time::Duration = std::time::Duration::from_secs(40);
    let srv = server();
    let bucket = srv.bucket("frozen-changes");
    let old: Vec<(String, Vec<u8>)> = ["keep.txt", "rm.txt", "d/a.txt", "trunc.txt", "append.txt"]
        .iter()
        .enumerate()
        .map(|(i, k)| (k.to_string(), pattern(4096 + i, 60 + i as u64)))
        .collect();
    srv.put_many(&bucket, old.clone());
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let addr = free_addr();
    let m = Mount::start_via(
        &proxy.endpoint(),
        &bucket,
        &["--request-timeout", "2s", "--max-attempts", "2", "--metadata-ttl", "1h", "--metrics-addr", &addr],
    );
    let local = tempfile::tempdir().unwrap();
    let (small, big) = (pattern(64 << 10, 70), pattern(20 << 20, 71));
    std::fs::write(local.path().join("small"), &small).unwrap();
    std::fs::write(local.path().join("big"), &big).unwrap();
    let p = |rel: &str| m.path(rel).display().to_string();
    let src = |name: &str| local.path().join(name).display().to_string();
    let append = "import sys\nwith open(sys.argv[1], 'ab') as f: f.write(b'more')";
    let changes = [
        ("new file", format!("cp {} {}", src("small"), p("new.bin"))),
        ("multipart file", format!("cp {} {}", src("big"), p("big.bin"))),
        ("append", format!("python3 -c \"{append}\" {}", p("append.txt"))),
        ("truncate", format!("truncate -s 1 {}", p("trunc.txt"))),
        ("touch", format!("touch {}", p("touched"))),
        ("mkdir", format!("mkdir {}", p("newdir"))),
        ("rm", format!("rm {}", p("rm.txt"))),
        ("mv", format!("mv {} {}", p("d/a.txt"), p("d/b.txt"))),
    ];
    // Every name, new or old, is known to the mount first (and trusted for
    // an hour), so each change fails in its own request, not in a lookup.
    assert_eq!(sh(&format!("ls -l {} {}", p(""), p("d"))).lines().filter(|l| l.ends_with(".txt")).count(), 5);
    for new in ["new.bin", "big.bin", "touched", "newdir", "d/b.txt"] {
        assert!(std::fs::metadata(m.path(new)).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound));
    }
    proxy.set_mode(Mode::Freeze);
    let mut problems = Vec::new();
    let mut took = Vec::new();
    for (what, cmd) in &changes {
        let start = std::time::Instant::now();
        let out =
            std::process::Command::new("timeout").args(["-s", "KILL", "120", "bash", "-c", cmd]).output().unwrap();
        let t = start.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        took.push((*what, std::time::Duration::from_millis(t.as_millis() as u64)));
        if out.status.success() {
            problems.push(format!("{what}: succeeded against a frozen server"));
        } else if !err.contains("Input/output error") {
            problems.push(format!("{what}: failed without EIO: {}", err.trim()));
        }
        if t > BOUND {
            problems.push(format!("{what}: took {t:?}"));
        }
    }
    proxy.set_mode(Mode::Pass);
    eprintln!("frozen server, time to EIO per change: {took:?}");
    assert!(problems.is_empty(), "{problems:#?}\n{}", m.log_text());

    // A request the proxy held is sent on once the freeze ends, and the
    // server may apply it although its caller gave up: each object is as
    // it was, or the change's whole result. Nothing half-made appears.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (a, trunc, append) = (&old[2].1, &old[3].1, &old[4].1);
    let appended = [append.as_slice(), b"more"].concat();
    let outcomes: [(&str, &[Option<&[u8]>]); 10] = [
        ("keep.txt", &[Some(&old[0].1)]),
        ("rm.txt", &[Some(&old[1].1), None]),
        ("d/a.txt", &[Some(a)]),
        ("d/b.txt", &[None, Some(a)]),
        ("trunc.txt", &[Some(trunc), Some(&trunc[..1])]),
        ("append.txt", &[Some(append), Some(&appended)]),
        ("new.bin", &[None, Some(&small)]),
        ("big.bin", &[None]),
        ("touched", &[None, Some(b"")]),
        ("newdir/", &[None, Some(b"")]),
    ];
    for (key, allowed) in outcomes {
        let got = srv.get(&bucket, key);
        assert!(
            allowed.contains(&got.as_deref()),
            "{key}: {:?} bytes, not one of the allowed outcomes",
            got.map(|g| g.len())
        );
    }
    // The start of big.bin's upload, read by the server before it froze,
    // made an upload whose ID bucketfs never got: it is looked for and
    // aborted (the look backs off while the server is silent, up to 60 s).
    assert!(
        wait_until(std::time::Duration::from_secs(90), || open_uploads(srv, &bucket) == 0),
        "{} multipart uploads left open\n{}",
        open_uploads(srv, &bucket),
        m.log_text()
    );
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            metric(&http_get(&addr, "/metrics").1, "bucketfs_memory_reserved_bytes", "") == 0.0
        }),
        "the budget still holds reservations:\n{}",
        http_get(&addr, "/metrics").1
    );

    // The mount tells what the server holds, whatever it applied late,
    // although it trusts its metadata for an hour.
    for (name, key) in [
        ("new.bin", "new.bin"),
        ("big.bin", "big.bin"),
        ("touched", "touched"),
        ("newdir", "newdir/"),
        ("rm.txt", "rm.txt"),
        ("d/b.txt", "d/b.txt"),
    ] {
        let (seen, held) = (m.path(name).exists(), srv.get(&bucket, key).is_some());
        assert_eq!(seen, held, "{name}: the mount says exists={seen}, the server holds it={held}");
    }

    // The mount works on: the same changes succeed now.
    for (what, cmd) in &changes {
        let out =
            std::process::Command::new("timeout").args(["-s", "KILL", "120", "bash", "-c", cmd]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // A frozen mkdir or rm that the server applied late has done it:
        // EEXIST and ENOENT are the truth then, which the mount asks the
        // server for, whatever its metadata TTL. (A new file or a copy made
        // late is overwritten or replaced.)
        let done_late = match *what {
            "mkdir" => err.contains("File exists") && srv.get(&bucket, "newdir/").is_some(),
            "rm" => err.contains("No such file") && srv.get(&bucket, "rm.txt").is_none(),
            _ => false,
        };
        assert!(out.status.success() || done_late, "{what} after the freeze: {err}\n{}", m.log_text());
    }
    assert!(srv.get(&bucket, "big.bin").unwrap() == big);
    assert_eq!(srv.get(&bucket, "touched").unwrap(), b"", "touch's object is there when touch returns");
    assert!(srv.get(&bucket, "rm.txt").is_none() && srv.get(&bucket, "d/a.txt").is_none());
    assert!(srv.get(&bucket, "d/b.txt").as_ref() == Some(&old[2].1));
}
