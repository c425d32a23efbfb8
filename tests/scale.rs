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

    let m = Mount::start(&bucket, &[]);
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
    eprintln!(
        "scale: keys={n} upload={upload:.1?} ({:.0} puts/s at concurrency 32) ls={listing:.1?} stat+read={stats:.1?}",
        n as f64 / upload.as_secs_f64()
    );
}
