//! One directory with 100,000 keys (issue 7): the listing through the mount
//! is complete, and entries can be stat'ed.
//!
//! `BUCKETFS_SCALE_KEYS` overrides the count (e.g. for a quick run).

mod common;

use std::time::Instant;

use common::*;

#[test]
fn hundred_thousand_keys_in_one_directory() {
    let n: usize = std::env::var("BUCKETFS_SCALE_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let srv = server();
    let bucket = srv.bucket("scale");
    let body = |i: usize| format!("{i}").into_bytes();
    let objects: Vec<(String, Vec<u8>)> = (0..n).map(|i| (format!("flat/k{i:06}"), body(i))).collect();
    let start = Instant::now();
    srv.put_many(&bucket, objects);
    let upload = start.elapsed();

    let addr = free_addr();
    let m = Mount::start(&bucket, &["--metrics-addr", &addr]);
    let inodes = || metric(&http_get(&addr, "/metrics").1, "bucketfs_inodes", "");
    let rss_mib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).unwrap_or_default();
        let kib: u64 = status
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        kib as f64 / 1024.0
    };
    let (rss_start, inodes_start) = (rss_mib(), inodes());
    let start = Instant::now();
    let count = sh(&format!("ls {} | wc -l", m.path("flat").display()));
    let listing = start.elapsed();
    assert_eq!(count.trim(), n.to_string(), "{}", m.log_text());

    let start = Instant::now();
    for i in [0, 1, n / 3, n / 2, n - 2, n - 1] {
        let meta = std::fs::metadata(m.path(&format!("flat/k{i:06}"))).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), body(i).len() as u64, "size of k{i:06}");
    }
    assert_eq!(std::fs::read(m.path(&format!("flat/k{:06}", n / 2))).unwrap(), body(n / 2));
    assert!(std::fs::metadata(m.path(&format!("flat/k{n:06}"))).is_err());
    let stats = start.elapsed();

    // A walk of the tree, then the kernel forgets its inodes: bucketfs's
    // inode table goes back to about where it started.
    let found = sh(&format!("find {} -type f | wc -l", m.path("").display()));
    assert_eq!(found.trim(), n.to_string());
    let (rss_walked, inodes_walked) = (rss_mib(), inodes());
    std::fs::write("/proc/sys/vm/drop_caches", "2\n").unwrap();
    let freed = wait_until(std::time::Duration::from_secs(20), || inodes() < 1000.0);
    let (rss_after, inodes_after) = (rss_mib(), inodes());
    eprintln!(
        "scale: inodes {inodes_start} at the start, {inodes_walked} after find, {inodes_after} after drop_caches; \
         RSS {rss_start:.0} MiB, {rss_walked:.0} MiB, {rss_after:.0} MiB"
    );
    assert!(freed, "inodes the kernel forgot are still held: {inodes_after}");
    eprintln!(
        "scale: keys={n} upload={upload:.1?} ({:.0} puts/s at concurrency 32) ls={listing:.1?} stat+read={stats:.1?}",
        n as f64 / upload.as_secs_f64()
    );
}
