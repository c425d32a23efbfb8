//! The read path under injected network faults (issue 7): a real bucketfs
//! mount whose `--endpoint-url` is the fault-injecting proxy in
//! `common::proxy`, in front of the test SeaweedFS server.
//!
//! What must hold: throttling bursts are retried away; a body cut short by a
//! reset or a clean close gives EIO, never wrong or missing bytes, and the
//! same file reads correctly once the network is back; a frozen or downed
//! server gives EIO in bounded time, and the mount recovers by itself.

mod common;

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::ProvideErrorMetadata;
use common::proxy::{Mode, Proxy};
use common::*;
use rand::{Rng, SeedableRng};

/// Several 128 KiB blocks, and long enough for a prefetch window.
const FILE_LEN: usize = 3 << 20;
/// Bound on one failing operation against a frozen or downed server, with
/// `--request-timeout 2s --max-attempts 2`.
const BOUND: Duration = Duration::from_secs(30);

fn upstream() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server().s3_port))
}

/// What the test saw, for the final line.
#[derive(Default)]
struct Tally {
    ops: u64,
    bytes_verified: u64,
    errors_surfaced: u64,
    /// Operations that returned wrong or missing bytes, an unexpected
    /// error, or did not finish in bounded time.
    lost: u64,
    problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, p: String) {
        self.lost += 1;
        self.problems.push(p);
    }

    /// One read that must return `want` or fail with EIO.
    fn read(&mut self, what: &str, r: io::Result<usize>, buf: &[u8], want: &[u8]) -> bool {
        self.ops += 1;
        match r {
            Ok(n) if n == want.len() && buf[..n] == *want => {
                self.bytes_verified += n as u64;
                true
            }
            Ok(n) => {
                let first_bad = buf[..n.min(want.len())].iter().zip(want).position(|(a, b)| a != b);
                self.problem(format!("{what}: got {n} bytes, wanted {} (first wrong byte: {first_bad:?})", want.len()));
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                self.errors_surfaced += 1;
                false
            }
            Err(e) => {
                self.problem(format!("{what}: unexpected error {e}"));
                false
            }
        }
    }

    /// A whole file that must read back exactly (same sha256).
    fn whole(&mut self, what: &str, path: &std::path::Path, want: &[u8]) {
        self.ops += 1;
        match std::fs::read(path) {
            Ok(got) if sha256(&got) == sha256(want) => self.bytes_verified += got.len() as u64,
            Ok(got) => self.problem(format!(
                "{what}: {} bytes with sha256 {}, wanted {} bytes with {}",
                got.len(),
                sha256(&got),
                want.len(),
                sha256(want)
            )),
            Err(e) => self.problem(format!("{what}: {e}")),
        }
    }

    /// A shell command that must fail with EIO within [`BOUND`].
    fn fails_with_eio(&mut self, what: &str, cmd: &str) -> Duration {
        self.ops += 1;
        let (ok, _, err, took) = run_timed(cmd);
        if ok {
            self.problem(format!("{what}: succeeded while the server was unreachable"));
        } else if took > BOUND {
            self.problem(format!("{what}: took {took:?} to fail (bound {BOUND:?})"));
        } else if !err.contains("Input/output error") {
            self.problem(format!("{what}: failed without EIO: {err}"));
        } else {
            self.errors_surfaced += 1;
        }
        took
    }

    /// A shell command that must succeed and print `want`.
    fn prints(&mut self, what: &str, cmd: &str, want: &str) -> bool {
        self.ops += 1;
        let (ok, out, err, took) = run_timed(cmd);
        if !ok || out != want {
            self.problem(format!("{what}: ok={ok} after {took:?}, printed {out:?}, wanted {want:?}; stderr: {err}"));
            return false;
        }
        true
    }
}

/// Runs `cmd` in bash (killed after 120 s): success, stdout, stderr, time taken.
fn run_timed(cmd: &str) -> (bool, String, String, Duration) {
    let start = Instant::now();
    let out = Command::new("timeout").args(["-s", "KILL", "120", "bash", "-c", cmd]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn read_path_survives_injected_faults() {
    let srv = server();
    let bucket = srv.bucket("faults");
    let cut_modes = [
        Mode::Truncate { after_bytes: 0 },
        Mode::Truncate { after_bytes: 1 },
        Mode::Truncate { after_bytes: 100_000 },
        Mode::Truncate { after_bytes: 131_072 },
        Mode::Truncate { after_bytes: 1_000_000 },
        Mode::ResetMidBody { after_bytes: 0 },
        Mode::ResetMidBody { after_bytes: 4096 },
        Mode::ResetMidBody { after_bytes: 131_073 },
        Mode::ResetMidBody { after_bytes: 700_000 },
    ];
    const BURSTS: usize = 4;
    const SMALL: usize = 10;
    let data = |seed: u64| pattern(FILE_LEN, seed);
    let mut objects: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..BURSTS {
        objects.push((format!("burst/{i}/data.bin"), data(100 + i as u64)));
        for k in 0..SMALL {
            objects.push((format!("burst/{i}/s{k}"), format!("small {k}").into_bytes()));
        }
    }
    for j in 0..cut_modes.len() {
        objects.push((format!("cut/{j}.bin"), data(200 + j as u64)));
    }
    for phase in ["frozen", "down"] {
        objects.push((format!("{phase}/file.bin"), data(300)));
        objects.push((format!("{phase}/listed/data.bin"), data(301)));
        for k in 0..SMALL {
            objects.push((format!("{phase}/dir/s{k}"), b"x".to_vec()));
        }
    }
    srv.put_many(&bucket, objects);

    let proxy = Proxy::start(upstream());
    let mut t = Tally::default();
    let mut injected_by_phase = Vec::new();

    // (a) 503 Slow Down bursts: the SDK retries them away (4 attempts, so a
    // burst of 3 is absorbed however it spreads over concurrent requests).
    {
        let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
        let before = proxy.stats().faults();
        for i in 0..BURSTS {
            proxy.set_mode(Mode::Error503 { remaining: 3 });
            t.ops += 1;
            match std::fs::read_dir(m.path(&format!("burst/{i}"))) {
                Ok(rd) => {
                    let n = rd.filter(|e| e.is_ok()).count();
                    if n != SMALL + 1 {
                        t.problem(format!("ls burst/{i}: {n} entries, wanted {}", SMALL + 1));
                    }
                }
                Err(e) => t.problem(format!("ls burst/{i} during a 503 burst: {e}")),
            }
            proxy.set_mode(Mode::Error503 { remaining: 3 });
            t.whole(
                &format!("read burst/{i}/data.bin during a 503 burst"),
                &m.path(&format!("burst/{i}/data.bin")),
                &data(100 + i as u64),
            );
            assert_eq!(proxy.mode(), Mode::Error503 { remaining: 0 }, "the burst was not used up");
        }
        proxy.set_mode(Mode::Pass);
        injected_by_phase.push(("503", proxy.stats().faults() - before));
        assert!(t.problems.is_empty(), "{:#?}\n{}", t.problems, m.log_text());
    }

    // (b) Bodies cut by a reset or a clean close: every read gives the right
    // bytes or EIO; back on Pass, the same handle and a new open read right.
    {
        let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
        let before = proxy.stats();
        let errors_before = t.errors_surfaced;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (j, mode) in cut_modes.iter().enumerate() {
            let path = m.path(&format!("cut/{j}.bin"));
            let want = data(200 + j as u64);
            proxy.set_mode(Mode::Pass);
            let file = File::open(&path).unwrap();
            proxy.set_mode(*mode);
            let mut reads: Vec<(u64, usize)> =
                (0..FILE_LEN as u64).step_by(128 << 10).map(|o| (o, 128 << 10)).collect();
            for _ in 0..20 {
                reads.push((rng.random_range(0..FILE_LEN as u64), rng.random_range(1..400_000)));
            }
            for &(off, len) in &reads {
                let mut buf = vec![0u8; len];
                let end = (off as usize + len).min(FILE_LEN);
                let r = file.read_at(&mut buf, off);
                t.read(&format!("{mode:?}: cut/{j}.bin at {off}+{len}"), r, &buf, &want[off as usize..end]);
            }
            proxy.set_mode(Mode::Pass);
            for &(off, len) in reads.iter().rev().take(8) {
                let mut buf = vec![0u8; len];
                let end = (off as usize + len).min(FILE_LEN);
                let r = file.read_at(&mut buf, off);
                if !t.read(
                    &format!("after {mode:?}, same handle: cut/{j}.bin at {off}+{len}"),
                    r,
                    &buf,
                    &want[off as usize..end],
                ) {
                    t.problem(format!("cut/{j}.bin did not recover on the same handle"));
                }
            }
            drop(file);
            t.whole(&format!("after {mode:?}: cut/{j}.bin"), &path, &want);
        }
        let after = proxy.stats();
        let cuts = (after.truncations + after.resets) - (before.truncations + before.resets);
        injected_by_phase.push(("cut", after.faults() - before.faults()));
        assert!(t.problems.is_empty(), "{:#?}\n{}", t.problems, m.log_text());
        assert!(cuts > 0, "no body was cut: {after:?}");
        assert!(t.errors_surfaced > errors_before, "cut bodies never surfaced as EIO");
    }

    // (c) and (d): a frozen server, then a downed one. Short timeouts, so a
    // failing operation is bounded; fresh paths, so nothing is cached.
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--request-timeout", "2s", "--max-attempts", "2"]);
    let mut failing_ops: Vec<(String, Duration)> = Vec::new();
    for (phase, mode) in [("frozen", Mode::Freeze), ("down", Mode::Down)] {
        let root = m.path(phase);
        let root = root.display();
        // Listed (metadata known), but never read.
        t.prints(&format!("ls {phase}/listed before the fault"), &format!("ls {root}/listed"), "data.bin\n");
        let before = proxy.stats().faults();
        proxy.set_mode(mode);
        let ops = [
            (format!("ls {phase}/dir"), format!("ls {root}/dir")),
            (format!("cat {phase}/file.bin"), format!("cat {root}/file.bin > /dev/null")),
            (format!("cat {phase}/listed/data.bin"), format!("cat {root}/listed/data.bin > /dev/null")),
        ];
        for (what, cmd) in &ops {
            let took = t.fails_with_eio(&format!("{what} ({mode:?})"), cmd);
            failing_ops.push((what.clone(), Duration::from_millis(took.as_millis() as u64)));
        }
        proxy.set_mode(Mode::Pass);
        injected_by_phase.push((phase, proxy.stats().faults() - before));
        // Recovery by itself: the same paths work at once.
        let names: String = (0..SMALL).map(|k| format!("s{k}\n")).collect();
        t.prints(&format!("ls {phase}/dir after {mode:?}"), &format!("ls {root}/dir"), &names);
        for (file, seed) in [("file.bin", 300), ("listed/data.bin", 301)] {
            if t.prints(
                &format!("sha256 {phase}/{file} after {mode:?}"),
                &format!("sha256sum < {root}/{file}"),
                &format!("{}  -\n", sha256(&data(seed))),
            ) {
                t.bytes_verified += FILE_LEN as u64;
            }
        }
    }
    assert!(m.has_own_mount(), "the mount went away:\n{}", m.log_text());

    let injected: u64 = injected_by_phase.iter().map(|(_, n)| n).sum();
    eprintln!("faults by phase: {injected_by_phase:?}; proxy {:?}", proxy.stats());
    eprintln!("time to EIO: {failing_ops:?}");
    eprintln!(
        "faults: injected={injected} ops={} bytes_verified={} errors_surfaced={} lost={}",
        t.ops, t.bytes_verified, t.errors_surfaced, t.lost
    );
    assert!(t.problems.is_empty(), "{:#?}\nbucketfs log:\n{}", t.problems, m.log_text());
    assert!(injected_by_phase.iter().all(|(_, n)| *n > 0));
}

/// A client without retries, to see the proxy's answers as they are.
fn bare_client(endpoint: &str) -> aws_sdk_s3::Client {
    let base = raw_client(endpoint);
    let conf = base
        .config()
        .to_builder()
        .retry_config(RetryConfig::disabled())
        .timeout_config(TimeoutConfig::builder().operation_attempt_timeout(Duration::from_secs(2)).build())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// The proxy itself, checked with a plain SDK client.
#[test]
fn proxy_modes_do_what_they_say() {
    let srv = server();
    let bucket = srv.bucket("proxy");
    let body = pattern(1 << 20, 9);
    srv.put(&bucket, "obj", body.clone());
    let proxy = Proxy::start(upstream());
    let c = bare_client(&proxy.endpoint());
    let get = |c: &aws_sdk_s3::Client| {
        srv.block_on(async {
            let out = c
                .get_object()
                .bucket(&bucket)
                .key("obj")
                .send()
                .await
                .map_err(|e| (e.code().unwrap_or("").to_string(), e.to_string()))?;
            out.body.collect().await.map(|b| b.into_bytes().to_vec()).map_err(|e| ("body".to_string(), e.to_string()))
        })
    };

    assert_eq!(get(&c).unwrap(), body);
    assert_eq!(proxy.stats().requests_of("GET"), 1);

    proxy.set_mode(Mode::Error503 { remaining: 2 });
    assert_eq!(get(&c).unwrap_err().0, "SlowDown");
    let head = srv.block_on(c.head_object().bucket(&bucket).key("obj").send());
    assert!(head.is_err());
    assert_eq!(get(&c).unwrap(), body, "the burst is over");
    assert_eq!(proxy.mode(), Mode::Error503 { remaining: 0 });
    assert_eq!(proxy.stats().injected_503, 2);

    proxy.set_mode(Mode::Truncate { after_bytes: 1000 });
    assert_eq!(get(&c).unwrap_err().0, "body");
    proxy.set_mode(Mode::ResetMidBody { after_bytes: 1000 });
    assert_eq!(get(&c).unwrap_err().0, "body");
    let s = proxy.stats();
    assert_eq!((s.truncations, s.resets), (1, 1));

    proxy.set_mode(Mode::Freeze);
    let start = Instant::now();
    assert!(get(&c).is_err());
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(proxy.stats().frozen >= 1);

    proxy.set_mode(Mode::Down);
    assert!(get(&c).is_err());
    assert!(proxy.stats().refused >= 1);

    proxy.set_mode(Mode::Delay(Duration::from_millis(300)));
    let start = Instant::now();
    assert_eq!(get(&c).unwrap(), body);
    assert!(start.elapsed() >= Duration::from_millis(300));

    proxy.set_mode(Mode::Pass);
    assert_eq!(get(&c).unwrap(), body);
    let s = proxy.stats();
    assert!(s.bytes_down >= 4 * body.len() as u64, "{s:?}");
    assert!(s.requests_of("HEAD") >= 1 && s.requests_of("GET") >= 8, "{s:?}");
}

/// A handle that stops reading early stops its prefetch: GETs still waiting
/// for the server's answer are dropped when it closes, so the window it had
/// requested is not downloaded.
#[test]
fn closing_a_handle_cancels_its_prefetch() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let srv = server();
    let bucket = srv.bucket("cancel");
    let len = 48 << 20;
    let want = pattern(len, 11);
    srv.put(&bucket, "big.bin", want.clone());
    let proxy = Proxy::start(upstream());
    // With a disk cache every read goes through blocks: without one, the
    // warm-up's reads below (each a seek) would be fetched as exact ranges
    // and kept nowhere.
    let cache = tempfile::tempdir().unwrap();
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--cache-dir", cache.path().to_str().unwrap()]);
    let no_readahead = |f: &File| {
        // SAFETY: a valid descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    };
    let mut buf = vec![0u8; 1 << 20];
    // The first 2 MiB into bucketfs's cache (backwards: no stream starts),
    // then out of the kernel's page cache (tests run as root).
    {
        let f = File::open(m.path("big.bin")).unwrap();
        no_readahead(&f);
        f.read_exact_at(&mut buf, 1 << 20).unwrap();
        f.read_exact_at(&mut buf, 0).unwrap();
    }
    std::fs::write("/proc/sys/vm/drop_caches", "1").expect("dropping the page cache (needs root)");
    proxy.set_mode(Mode::Delay(Duration::from_millis(400)));
    let before = proxy.stats().bytes_down;
    {
        let mut f = File::open(m.path("big.bin")).unwrap();
        // No kernel readahead: bucketfs sees exactly these two reads, served
        // from its cache; the second makes the stream sequential and starts
        // a 16 MiB prefetch window, held 400 ms by the proxy. Then it closes.
        no_readahead(&f);
        for i in 0..2 {
            f.read_exact(&mut buf).unwrap();
            assert!(buf == want[i << 20..(i + 1) << 20]);
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let down = proxy.stats().bytes_down - before;
    assert!(down < 2 << 20, "{down} bytes came down after the handle closed; the prefetch was not cancelled");
    // The file still reads whole afterwards (cancelled blocks are fetched again).
    proxy.set_mode(Mode::Pass);
    let mut all = Vec::new();
    File::open(m.path("big.bin")).unwrap().read_to_end(&mut all).unwrap();
    assert!(all == want, "{}", m.log_text());
}

/// bucketfs asks for large LIST pages; a server that allows at most 1,000
/// keys per page and refuses more gets pages of 1,000 from then on, with one
/// log line, and every listing is complete.
#[test]
fn a_server_refusing_large_list_pages_still_lists() {
    let srv = server();
    let bucket = srv.bucket("pages");
    let objects: Vec<(String, Vec<u8>)> = (0..2100).map(|i| (format!("d/f{i:04}"), b"x".to_vec())).collect();
    srv.put_many(&bucket, objects);
    let proxy = Proxy::start(upstream());
    proxy.set_mode(Mode::RefuseLargeListPages);
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
    for dir in ["d", "."] {
        let n = std::fs::read_dir(m.path(dir)).unwrap().count();
        assert_eq!(n, if dir == "d" { 2100 } else { 1 }, "{}", m.log_text());
    }
    let refused = proxy.stats().refused_pages;
    assert_eq!(refused, 1, "only the first large page is refused");
    let log = m.log_text();
    assert!(log.contains("refused LIST pages of 5000 keys"), "{log}");
}

/// A LIST reply broken off mid-body, or a 200 carrying an error document, is
/// asked for again, up to `--max-attempts` times; if every answer breaks,
/// `ls` fails with EIO (never a short listing, never a hang), and lists
/// everything once the server answers whole again.
#[test]
fn a_broken_list_reply_is_retried_then_an_error_never_a_short_listing() {
    let srv = server();
    let bucket = srv.bucket("cutlist");
    let objects: Vec<(String, Vec<u8>)> = (0..3000).map(|i| (format!("d/f{i:04}"), b"x".to_vec())).collect();
    srv.put_many(&bucket, objects);
    let proxy = Proxy::start(upstream());
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &["--max-attempts", "3", "--metadata-ttl", "0"]);
    // A 3,000-key reply is about half a megabyte; lookups' replies are far
    // shorter than the cut.
    proxy.set_mode(Mode::Truncate { after_bytes: 20_000 });
    let before = proxy.stats().truncations;
    let dir = m.path("d");
    let (ok, _, err, took) = run_timed(&format!("ls {}", dir.display()));
    assert!(!ok && err.contains("Input/output error"), "ls with every LIST reply cut: ok={ok} {err}");
    assert!(took < BOUND, "ls took {took:?} to fail");
    assert_eq!(proxy.stats().truncations - before, 3, "one LIST, asked 3 times");
    let log = m.log_text();
    assert!(log.contains("reading a LIST reply") && log.contains("asking again"), "{log}");
    proxy.set_mode(Mode::Pass);
    let n = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(n, 3000, "{}", m.log_text());
    // A 200 carrying an error document is retried too: two of them, then
    // the whole listing.
    proxy.set_mode(Mode::ListErrorIn200 { remaining: 2 });
    let n = std::fs::read_dir(m.path("d")).unwrap().count();
    assert_eq!(n, 3000, "{}", m.log_text());
    assert_eq!(proxy.stats().errors_in_200, 2);
    assert!(m.log_text().contains("InternalError"), "{}", m.log_text());
}

/// At default settings, a frozen server (connections accepted, no byte ever
/// sent) gives `EIO` in bounded time: 4 attempts of 5 s to the first byte plus
/// at most 0.35 s of backoff is 20.4 s per request, and once a request has
/// timed out in every attempt, further ones get one attempt until the server
/// answers (the kernel looks a name up twice when revalidating it fails). The
/// bound asserted here is a hang detector only; the figures are printed.
#[test]
fn a_frozen_server_gives_eio_in_bounded_time_at_defaults() {
    let srv = server();
    let bucket = srv.bucket("frozen-defaults");
    srv.put_many(
        &bucket,
        vec![
            ("d/listed.bin".to_string(), pattern(1 << 20, 41)),
            ("d/other.bin".to_string(), pattern(1 << 20, 42)),
            ("fresh.bin".to_string(), pattern(1 << 20, 43)),
        ],
    );
    let proxy = Proxy::start(upstream());
    let mut took = Vec::new();
    let mut fails = |m: &Mount, what: &str, rel: &str| {
        let (ok, _, err, t) = run_timed(&format!("cat {} > /dev/null", m.path(rel).display()));
        eprintln!("frozen server at defaults: {what}: failed={} after {:.1}s: {}", !ok, t.as_secs_f64(), err.trim());
        assert!(!ok && err.contains("Input/output error"), "{what}: ok={ok} {err}\n{}", m.log_text());
        assert!(t < Duration::from_secs(60), "{what}: took {t:?}\n{}", m.log_text());
        took.push((what.to_string(), Duration::from_millis(t.as_millis() as u64)));
    };
    // A name the mount has seen (its revalidation fails, so the kernel asks
    // twice), then, with the server known silent, another one.
    {
        let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
        let (ok, out, err, _) = run_timed(&format!("ls {}", m.path("d").display()));
        assert!(ok && out == "listed.bin\nother.bin\n", "{out} {err}");
        proxy.set_mode(Mode::Freeze);
        fails(&m, "cat d/listed.bin, listed before the freeze", "d/listed.bin");
        fails(&m, "cat d/other.bin, after the first failure", "d/other.bin");
        proxy.set_mode(Mode::Pass);
        let (ok, out, _, _) = run_timed(&format!("sha256sum < {}", m.path("d/listed.bin").display()));
        assert!(ok && out == format!("{}  -\n", sha256(&pattern(1 << 20, 41))), "no recovery: {}", m.log_text());
    }
    // A name never looked up: one lookup (HEAD and LIST at once).
    {
        let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
        proxy.set_mode(Mode::Freeze);
        fails(&m, "cat fresh.bin, never looked up", "fresh.bin");
        proxy.set_mode(Mode::Pass);
    }
    eprintln!("time to EIO at defaults: {took:?}; proxy {:?}", proxy.stats());
}

/// A body that keeps moving is never cut, however long it takes: each piece
/// comes well within the idle timeout (10 s), while a whole 128 KiB block
/// takes longer than the idle and first-byte timeouts together.
#[test]
fn a_slow_but_moving_body_is_read_whole() {
    let srv = server();
    let bucket = srv.bucket("trickle");
    let want = pattern(192 << 10, 43);
    srv.put(&bucket, "slow.bin", want.clone());
    let proxy = Proxy::start(upstream());
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
    assert_eq!(std::fs::metadata(m.path("slow.bin")).unwrap().len(), want.len() as u64);
    // 8 KiB a second: 16 s for a 128 KiB block, 24 s for the file.
    proxy.set_mode(Mode::Trickle { bytes: 8 << 10, every: Duration::from_secs(1) });
    let start = Instant::now();
    let got = std::fs::read(m.path("slow.bin"));
    let took = start.elapsed();
    proxy.set_mode(Mode::Pass);
    eprintln!("slow body: {} bytes in {:.1}s", want.len(), took.as_secs_f64());
    let got = got.unwrap_or_else(|e| panic!("reading a slow but moving body failed: {e}\n{}", m.log_text()));
    assert!(got == want, "wrong bytes");
    assert!(took > Duration::from_secs(15), "the body was not slowed: {took:?}");
}

/// An upload on a slow link is not cut by the first-byte timeout: the attempt
/// bound of a PUT grows with its body.
#[test]
fn a_slow_upload_is_not_cut_by_the_first_byte_timeout() {
    let srv = server();
    let bucket = srv.bucket("slowput");
    let proxy = Proxy::start(upstream());
    let m = Mount::start_via(&proxy.endpoint(), &bucket, &[]);
    let want = pattern(1 << 20, 44);
    // 64 KiB every half second: about 8 s to send 1 MiB, more than the 5 s
    // first-byte timeout.
    proxy.set_mode(Mode::Trickle { bytes: 64 << 10, every: Duration::from_millis(500) });
    let start = Instant::now();
    let r = std::fs::write(m.path("up.bin"), &want);
    let took = start.elapsed();
    proxy.set_mode(Mode::Pass);
    eprintln!("slow upload of 1 MiB: {:.1}s", took.as_secs_f64());
    r.unwrap_or_else(|e| panic!("a slow upload failed: {e}\n{}", m.log_text()));
    assert!(took > Duration::from_secs(6), "the upload was not slowed: {took:?}");
    assert_eq!(srv.get(&bucket, "up.bin").as_deref(), Some(&want[..]));
    assert_eq!(proxy.stats().requests_of("PUT"), 1, "the upload was sent more than once");
}
