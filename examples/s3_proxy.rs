//! The benchmarks' counting, delaying proxy (benches/support/proxy.rs) as a
//! program, so that any client (bucketfs, s3fs, rclone, mount-s3) can be
//! measured against a server with a remote server's latency:
//! `scripts/compare.sh` runs it with `DELAY_MS=20`.
//!
//! `s3_proxy UPSTREAM_PORT DELAY_MS` listens on 127.0.0.1, prints its port
//! on the first line, and holds each request back DELAY_MS before relaying
//! it to 127.0.0.1:UPSTREAM_PORT. On end of input it prints the requests it
//! saw and exits.

#[allow(dead_code)]
#[path = "../benches/support/proxy.rs"]
mod proxy;

use std::io::BufRead;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, port, delay] => port.parse::<u16>().ok().zip(delay.parse::<u64>().ok()),
        _ => None,
    };
    let Some((upstream, delay_ms)) = parsed else {
        eprintln!("usage: s3_proxy UPSTREAM_PORT DELAY_MS");
        std::process::exit(2);
    };
    let p = proxy::Proxy::start(upstream, Duration::from_millis(delay_ms));
    println!("{}", p.port);
    // Runs until its input closes (the caller exits or closes the pipe).
    for _ in std::io::stdin().lock().lines() {}
    let c = p.stats.snapshot();
    eprintln!("s3_proxy: {} requests: {}", c.head + c.list + c.get_range + c.get_full + c.put + c.other, c.describe(1));
}
