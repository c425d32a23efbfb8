//! The core read path through a real FUSE mount on a real S3 server.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

fn walk(root: &Path) -> BTreeSet<String> {
    let out = sh(&format!("cd {} && find . -mindepth 1", root.display()));
    out.lines().map(|l| l.trim_start_matches("./").to_string()).collect()
}

#[test]
fn nested_tree_matches_what_was_uploaded() {
    let srv = server();
    let bucket = srv.bucket("tree");
    let mut objects = Vec::new();
    for i in 0..300 {
        let key = format!("d{}/e{}/f{}/file-{i}.txt", i % 5, i % 7, i % 3);
        objects.push((key, format!("content of {i}\n").repeat(i % 11 + 1).into_bytes()));
    }
    srv.put_many(&bucket, objects.clone());
    let m = Mount::start(&bucket, &[]);

    let mut expected = BTreeSet::new();
    for (key, _) in &objects {
        let parts: Vec<&str> = key.split('/').collect();
        for n in 1..=parts.len() {
            expected.insert(parts[..n].join("/"));
        }
    }
    assert_eq!(walk(&m.mountpoint), expected);
    for (key, body) in &objects {
        assert_eq!(&std::fs::read(m.path(key)).unwrap(), body, "{key}");
    }
    // `cat` through the shell agrees too.
    let cat = sh(&format!("cat {}", m.path("d0/e0/f0/file-0.txt").display()));
    assert_eq!(cat, "content of 0\n");
    let meta = std::fs::metadata(m.path("d1")).unwrap();
    assert!(meta.is_dir());
}

#[test]
fn large_directory_lists_completely_with_sizes() {
    let srv = server();
    let bucket = srv.bucket("big");
    // More entries than one LIST page (5,000 keys asked for, 1,000 on
    // servers that cap it), streamed to readdir page by page, with a name
    // clash at the end of the first page: `zz` is a file and a directory.
    // In S3's key order `zz/` would come after `zz-1`, on the next page;
    // SeaweedFS lists it next to `zz`. The S3 order across pages is covered
    // by the property test `paged_entries_match_model` on the memory store.
    let objects: Vec<(String, Vec<u8>)> = (0..4999).map(|i| (format!("many/f{i:05}"), vec![b'x'; i % 97])).collect();
    srv.put_many(&bucket, objects);
    // One after the other, the directory's key first: SeaweedFS keeps a file
    // `zz` next to a directory `zz/` only when they arrive in this order
    // (concurrent uploads sometimes left only the file).
    for key in ["many/zz/inner", "many/zz", "many/zz-1"] {
        srv.put(&bucket, key, b"z".to_vec());
    }
    let m = Mount::start(&bucket, &[]);
    let entries: Vec<(String, bool)> = std::fs::read_dir(m.path("many"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.file_type().unwrap().is_dir())
        })
        .collect();
    let names: BTreeSet<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), entries.len(), "a name listed twice");
    assert_eq!(names.len(), 5001);
    assert!(names.contains("f00000") && names.contains("f04998") && names.contains("zz-1"));
    assert!(entries.contains(&("zz".to_string(), true)), "zz is not listed as a directory");
    assert_eq!(std::fs::read(m.path("many/zz/inner")).unwrap(), b"z");
    let ls = sh(&format!("ls -l {} | tail -n +2 | grep ' f0'", m.path("many").display()));
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 4999);
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let name = fields[fields.len() - 1];
        let i: usize = name[1..].parse().unwrap();
        assert_eq!(fields[4], (i % 97).to_string(), "size of {name}");
    }
    // The listing answered every stat: no HEAD per entry.
    let log = m.log_text();
    assert!(!log.contains("head failed"), "{log}");
}

#[test]
fn special_names_and_empty_files() {
    let srv = server();
    let bucket = srv.bucket("names");
    let names = ["ünïcødé.txt", "with space.txt", "plus+sign", "per%cent", "日本語/ファイル", "emoji-😀"];
    for (i, n) in names.iter().enumerate() {
        srv.put(&bucket, n, format!("body {i}"));
    }
    srv.put(&bucket, "empty", Vec::new());
    srv.put(&bucket, "dir/empty-too", Vec::new());
    let m = Mount::start(&bucket, &[]);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(std::fs::read_to_string(m.path(n)).unwrap(), format!("body {i}"), "{n}");
    }
    assert_eq!(std::fs::metadata(m.path("empty")).unwrap().len(), 0);
    assert_eq!(std::fs::read(m.path("empty")).unwrap(), Vec::<u8>::new());
    assert_eq!(std::fs::read(m.path("dir/empty-too")).unwrap(), Vec::<u8>::new());
    let ls = sh(&format!("ls {}", m.mountpoint.display()));
    assert!(ls.contains("with space.txt") && ls.contains("per%cent"), "{ls}");
}

#[test]
fn large_file_reads_at_random_offsets() {
    let srv = server();
    let bucket = srv.bucket("large");
    let len = 256 << 20;
    let data = pattern(len, 42);
    srv.put(&bucket, "blob.bin", data.clone());
    let m = Mount::start(&bucket, &[]);
    let path = m.path("blob.bin");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);

    // Sequential: dd and sha256 of the whole file.
    let dd = sh(&format!("dd if={} bs=1M status=none | sha256sum", path.display()));
    assert_eq!(dd.split_whitespace().next().unwrap(), sha256(&data));

    // Random offsets and sizes, including reads crossing and past EOF.
    let file = std::fs::File::open(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let off = rng.random_range(0..len as u64 + 4096);
        let size = *[1usize, 17, 4096, 65536, 131072, 300_000, 1 << 20].get(rng.random_range(0..7)).unwrap();
        let mut buf = vec![0u8; size];
        let n = file.read_at(&mut buf, off).unwrap();
        let start = (off as usize).min(len);
        let end = (off as usize + size).min(len);
        assert_eq!(n, end - start, "read at {off} of {size}");
        assert_eq!(&buf[..n], &data[start..end], "bytes at {off} of {size}");
    }
    // A second reader of the same file at the same time.
    let mut f2 = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 1 << 20];
    f2.read_exact(&mut head).unwrap();
    assert_eq!(&head[..], &data[..1 << 20]);
}

#[test]
fn name_clash_marker_and_hostile_keys() {
    let srv = server();
    let bucket = srv.bucket("hostile");
    srv.put(&bucket, "clash", "the file");
    srv.put(&bucket, "clash/inside", "inside");
    srv.put(&bucket, "marker/", Vec::new());
    srv.put(&bucket, "ok.txt", "fine");
    let hostile = ["a//b", "x/./y", "x/../z", "dots/..", "dots/.", "trail//", &format!("long/{}", "L".repeat(300))];
    let mut accepted = Vec::new();
    for k in hostile {
        let r = srv.block_on(srv.client.put_object().bucket(&bucket).key(k).body(b"h".to_vec().into()).send());
        if r.is_ok() {
            accepted.push(k.to_string());
        }
    }
    let m = Mount::start(&bucket, &[]);
    let root: BTreeSet<String> =
        std::fs::read_dir(&m.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(root.contains("clash") && root.contains("marker") && root.contains("ok.txt"), "{root:?}");
    // The directory wins: `clash` is a directory with its child; the file is hidden.
    assert!(std::fs::metadata(m.path("clash")).unwrap().is_dir());
    assert_eq!(std::fs::read_to_string(m.path("clash/inside")).unwrap(), "inside");
    // A zero-byte marker is an empty directory.
    assert!(std::fs::metadata(m.path("marker")).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(m.path("marker")).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(m.path("ok.txt")).unwrap(), "fine");
    // Whatever hostile keys the server kept, walking the tree works and shows
    // no invalid names; the mount is still alive afterwards.
    let all = walk(&m.mountpoint);
    for p in &all {
        for c in p.split('/') {
            assert!(!c.is_empty() && c != "." && c != ".." && c.len() <= 255, "{p}");
        }
    }
    assert!(std::fs::metadata(m.path("ok.txt")).is_ok());
    let log = m.log_text();
    assert!(log.contains("clash: hidden"), "no warning about the clash:\n{log}");
    assert_eq!(log.matches("clash: hidden").count(), 1, "warned more than once:\n{log}");
    let _ = accepted;
}

#[test]
fn prefix_mount_shows_only_the_prefix() {
    let srv = server();
    let bucket = srv.bucket("prefix");
    srv.put(&bucket, "outside.txt", "no");
    srv.put(&bucket, "team/a/data.csv", "1,2,3");
    srv.put(&bucket, "team/readme", "hi");
    srv.put(&bucket, "teammate/x", "no");
    let m = Mount::start(&format!("s3://{bucket}/team"), &[]);
    assert_eq!(walk(&m.mountpoint), ["a", "a/data.csv", "readme"].iter().map(|s| s.to_string()).collect());
    assert_eq!(std::fs::read_to_string(m.path("a/data.csv")).unwrap(), "1,2,3");
    assert!(std::fs::metadata(m.path("outside.txt")).is_err());
}

fn run_mount_expect_failure(source: &str, secret: &str) -> (i32, String, bool) {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    std::fs::write(&s, secret).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new(bucketfs())
        .args(["mount", source, mnt.to_str().unwrap(), "--endpoint-url", &srv.endpoint])
        .args(["--access-key-file", a.to_str().unwrap(), "--secret-key-file", s.to_str().unwrap()])
        .output()
        .unwrap();
    let mounted = !mountinfo_at(&mnt).is_empty();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned(), mounted)
}

#[test]
fn missing_bucket_and_bad_credentials_fail_clearly() {
    let srv = server();
    let (code, err, mounted) = run_mount_expect_failure("no-such-bucket-here", SECRET_KEY);
    assert_eq!(code, 2, "{err}");
    assert!(!mounted);
    assert!(err.contains("\"no-such-bucket-here\" does not exist"), "{err}");

    let bucket = srv.bucket("creds");
    let (code, err, mounted) = run_mount_expect_failure(&bucket, "definitely-wrong-secret");
    assert_eq!(code, 2, "{err}");
    assert!(!mounted);
    assert!(err.contains("denied") && err.contains("secret key"), "{err}");
    assert!(!err.contains("definitely-wrong-secret"), "the secret leaked: {err}");

    // An endpoint nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(bucketfs())
        .args(["mount", &bucket, dir.path().to_str().unwrap(), "--endpoint-url", &format!("http://127.0.0.1:{port}")])
        .args(["--access-key-file", a.to_str().unwrap(), "--secret-key-file", s.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("cannot reach")).count(), 1, "{err}");
}

#[test]
fn sigterm_and_external_umount_exit_zero() {
    let srv = server();
    let bucket = srv.bucket("signals");
    srv.put(&bucket, "f", "x");
    let mut m = Mount::start(&bucket, &[]);
    assert_eq!(std::fs::read_to_string(m.path("f")).unwrap(), "x");
    assert_eq!(m.signal_and_wait(libc::SIGTERM), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&m.mountpoint).is_empty());

    let mut m = Mount::start(&bucket, &[]);
    assert_eq!(std::fs::read_to_string(m.path("f")).unwrap(), "x");
    let status = Command::new("umount").arg(&m.mountpoint).status().unwrap();
    assert!(status.success());
    assert_eq!(m.wait_exit(), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&m.mountpoint).is_empty());

    let mut m = Mount::start(&bucket, &[]);
    assert_eq!(m.signal_and_wait(libc::SIGINT), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&m.mountpoint).is_empty());
}

#[test]
fn overwrite_while_open_gives_estale_then_new_version() {
    let srv = server();
    let bucket = srv.bucket("overwrite");
    let len = 8 << 20;
    let old = pattern(len, 1);
    let new = pattern(len, 2);
    srv.put(&bucket, "f", old.clone());
    let m = Mount::start(&bucket, &[]);
    let file = std::fs::File::open(m.path("f")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &old[..4096]);
    srv.put(&bucket, "f", new.clone());
    // ESTALE, as NFS gives for a file replaced under an open handle.
    let err = file.read_at(&mut buf, 6 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(file);
    assert!(m.log_text().contains("changed on the server while open"), "{}", m.log_text());
    // The next open reads the new version, whole.
    std::thread::sleep(Duration::from_millis(1100));
    let got = std::fs::read(m.path("f")).unwrap();
    assert!(got == new, "the reopened file does not have the new content");
}

#[test]
fn statfs_is_sane_and_read_only_refuses_writes() {
    let srv = server();
    let bucket = srv.bucket("statfs");
    srv.put(&bucket, "f", "x");
    let m = Mount::start(&bucket, &["--read-only"]);
    let df = sh(&format!("df --block-size=1 {} | tail -1", m.mountpoint.display()));
    let fields: Vec<&str> = df.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "{df}");
    assert_eq!(fields[0], "bucketfs");
    assert!(fields[1].parse::<u64>().unwrap() > 1 << 40);
    let err = std::fs::write(m.path("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = std::fs::OpenOptions::new().write(true).open(m.path("f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(std::fs::metadata(m.path("missing")).unwrap_err().kind() == std::io::ErrorKind::NotFound);
}

#[test]
fn https_endpoint_with_a_custom_ca_bundle() {
    let srv = server();
    let bucket = srv.bucket("tls");
    srv.put(&bucket, "secure.txt", "over TLS");
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let base: Vec<String> = [
        "mount",
        &bucket,
        mnt.to_str().unwrap(),
        "--endpoint-url",
        &srv.https_endpoint,
        "--access-key-file",
        a.to_str().unwrap(),
        "--secret-key-file",
        s.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Without the CA the certificate is refused: a clear error, exit 2.
    let out = Command::new(bucketfs()).args(&base).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach") && err.to_lowercase().contains("certificate"), "{err}");
    // With it, the mount works.
    let mut args = base.clone();
    args.extend(["--ca-bundle".to_string(), srv.ca_bundle.to_str().unwrap().to_string()]);
    let log_dir = tempfile::tempdir().unwrap();
    let m = Mount::spawn(log_dir, mnt, &args, &[]);
    assert_eq!(std::fs::read_to_string(m.path("secure.txt")).unwrap(), "over TLS");
}

/// The sysfs file holding the mount's kernel readahead.
fn read_ahead_file(m: &Mount) -> String {
    let mounts = bucketfs::mount::mounts_at(&m.path(""));
    let dev = &mounts.last().unwrap_or_else(|| panic!("{} not in mountinfo", m.path("").display())).dev;
    format!("/sys/class/bdi/{dev}/read_ahead_kb")
}

fn read_ahead_kb(m: &Mount) -> u64 {
    std::fs::read_to_string(read_ahead_file(m)).unwrap().trim().parse().unwrap()
}

#[test]
fn kernel_readahead_follows_the_read_ahead_option() {
    let srv = server();
    let bucket = srv.bucket("readahead");
    srv.put(&bucket, "f.bin", pattern(3 << 20, 5));
    for (args, want) in
        [(vec![], Some(1024)), (vec!["--read-ahead", "4MiB"], Some(4096)), (vec!["--read-ahead", "0"], None)]
    {
        let m = Mount::start(&bucket, &args);
        let before = read_ahead_kb(&m);
        let mut f = std::fs::File::open(m.path("f.bin")).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, pattern(3 << 20, 5));
        // Set on the first open (INIT could only lower it). Where /sys is not
        // writable (an unprivileged container), bucketfs says so and goes on.
        let c = std::ffi::CString::new(read_ahead_file(&m)).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0;
        if writable {
            assert_eq!(read_ahead_kb(&m), want.unwrap_or(before), "{args:?}");
        } else if want.is_some() {
            assert_eq!(read_ahead_kb(&m), before);
            assert!(m.log_text().contains("kernel readahead left at its default"), "{}", m.log_text());
        }
    }
}

/// Four readers of one quarter each, at once, download the file about once:
/// near the end of its quarter a stream's window does not fetch the next
/// quarter again, which the next reader has already put in the kernel's page
/// cache (it would be thrown away: no read comes for it).
#[test]
fn quarter_readers_download_the_file_about_once() {
    let srv = server();
    let bucket = srv.bucket("quarters");
    let len = 256 << 20;
    let data = pattern(len, 9);
    srv.put(&bucket, "q.bin", data.clone());
    let proxy = common::proxy::Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
    let path = m.path("q.bin");
    let before = proxy.stats().bytes_down;
    let q = len / 4;
    std::thread::scope(|s| {
        for k in 0..4 {
            let (path, data) = (&path, &data);
            s.spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                for off in (k * q..(k + 1) * q).step_by(1 << 20) {
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(buf == data[off..off + (1 << 20)], "quarter {k}: wrong bytes at {off}");
                }
            });
        }
    });
    let down = proxy.stats().bytes_down - before;
    eprintln!("4 quarter readers downloaded {down} bytes for {len} ({:.3}x)", down as f64 / len as f64);
    assert!(down <= len as u64 * 21 / 20, "4 quarter readers downloaded {down} bytes for {len}\n{}", m.log_text());
}

/// A sequential read from a near server (here, on this host) is fetched in a
/// few large GETs; from a far one (the same server behind 15 ms per request)
/// in 8 MiB GETs, many in flight. The bytes are the same either way.
/// `--near-server no|yes` decides it instead of the answers' times.
#[test]
fn a_near_server_is_read_in_fewer_larger_gets() {
    let srv = server();
    let bucket = srv.bucket("near");
    let len = 96 << 20;
    let data = pattern(len, 5);
    srv.put(&bucket, "s.bin", data.clone());
    let slow = Some(Duration::from_millis(15));
    // (delay per request, --near-server, near?)
    for (delay, option, near) in [(None, "auto", true), (slow, "auto", false), (None, "no", false), (slow, "yes", true)]
    {
        let proxy = common::proxy::Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], srv.s3_port)));
        if let Some(d) = delay {
            // From the mount's first request on: its quickest answer then
            // takes longer than a server on this host would.
            proxy.set_mode(common::proxy::Mode::Delay(d));
        }
        let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--near-server", option]);
        // Answers first, from which the mount tells how near the server
        // is: each lookup of a new missing name is a LIST answered 200.
        // Many, so that three are quick even while other tests load the
        // host. A near server is waited for (bounded): tests running beside
        // this one can slow every answer for a while.
        let wait = option == "auto" && near;
        for i in 0..if wait { 600 } else { 30 } {
            assert!(std::fs::metadata(m.path(&format!("warm-{i}"))).is_err());
            if i >= 30 && m.log_text().contains("the server is near") {
                break;
            }
            if i >= 30 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let before = proxy.stats().requests_of("GET");
        let mut all = Vec::new();
        std::fs::File::open(m.path("s.bin")).unwrap().read_to_end(&mut all).unwrap();
        let case = format!("delay {delay:?}, --near-server {option}");
        assert!(all == data, "{case}: wrong bytes");
        let n = proxy.stats().requests_of("GET") - before;
        let log = m.log_text();
        assert!(log.contains(&format!("prefetch starts key=s.bin window=67108864 near={near}")), "{case}: {log}");
        // Said once, when the answers show it; not when the option says it.
        assert_eq!(log.contains("the server is near"), wait, "{case}: {log}");
        eprintln!("{case}: {n} GETs for {len} bytes");
        // Near: the first blocks, then 32 MiB GETs; far: 8 MiB GETs.
        match near {
            true => assert!(n <= 10, "{case}: {n} GETs for 96 MiB"),
            false => assert!(n >= 12, "{case}: {n} GETs for 96 MiB"),
        }
    }
}
