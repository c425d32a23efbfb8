//! Bench support: the counting/delaying proxy, deterministic data, the raw
//! aws-sdk-s3 baselines, and the results table.

pub mod proxy;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_s3::Client;
use futures::StreamExt;

use proxy::Counts;

/// Deterministic bytes at absolute offset `off` of object `seed` (random
/// access: word i is a hash of (seed, i)). `off` must be a multiple of 8.
pub fn data_at(seed: u64, off: u64, len: usize) -> Vec<u8> {
    assert_eq!(off % 8, 0);
    let mut out = Vec::with_capacity(len + 8);
    let mut i = off / 8;
    while out.len() < len {
        out.extend_from_slice(&splitmix(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Reads `[start, end)` of `key` with ranged GETs of `chunk` bytes, `inflight`
/// at a time; returns the bytes received (discarded, not kept).
pub async fn raw_ranges(
    client: &Client,
    bucket: &str,
    key: &str,
    start: u64,
    end: u64,
    chunk: u64,
    inflight: usize,
) -> u64 {
    let ranges: Vec<(u64, u64)> = (start..end).step_by(chunk as usize).map(|a| (a, (a + chunk).min(end))).collect();
    futures::stream::iter(ranges)
        .map(|(a, b)| raw_get(client, bucket, key, Some((a, b))))
        .buffer_unordered(inflight.max(1))
        .fold(0u64, |acc, n| async move { acc + n })
        .await
}

/// One GET (ranged when `range` is given), body drained; returns its length.
pub async fn raw_get(client: &Client, bucket: &str, key: &str, range: Option<(u64, u64)>) -> u64 {
    let mut req = client.get_object().bucket(bucket).key(key);
    if let Some((a, b)) = range {
        req = req.range(format!("bytes={}-{}", a, b - 1));
    }
    let out = req.send().await.unwrap_or_else(|e| panic!("GET {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)));
    let mut body = out.body;
    let mut n = 0u64;
    while let Some(chunk) = body.try_next().await.expect("GET body") {
        n += chunk.len() as u64;
    }
    n
}

/// A paged ListObjectsV2 of `prefix` with delimiter `/`, asking for
/// `max_keys` per page (the server's default of 1,000 if `None`); returns the
/// entries (objects plus common prefixes).
pub async fn raw_list(client: &Client, bucket: &str, prefix: &str, max_keys: Option<i32>) -> u64 {
    let mut token: Option<String> = None;
    let mut n = 0u64;
    loop {
        let out = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .delimiter("/")
            .set_max_keys(max_keys)
            .set_continuation_token(token.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("LIST {prefix}: {}", aws_sdk_s3::error::DisplayErrorContext(e)));
        n += out.contents().len() as u64 + out.common_prefixes().len() as u64;
        match out.next_continuation_token() {
            Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => break,
        }
    }
    n
}

/// What one measured configuration gave.
#[derive(Default)]
pub struct Record {
    /// Bytes (or entries, for listings) per iteration.
    pub units: u64,
    pub unit_is_bytes: bool,
    pub times: Vec<Duration>,
    pub counts: Counts,
    /// Largest VmHWM of the bucketfs process seen, in KiB (0: not a mount run).
    pub hwm_kib: u64,
}

impl Record {
    /// Median per-iteration rate, in units per second.
    pub fn median_rate(&self) -> f64 {
        let mut rates: Vec<f64> = self.times.iter().map(|t| self.units as f64 / t.as_secs_f64().max(1e-9)).collect();
        rates.sort_by(|a, b| a.total_cmp(b));
        if rates.is_empty() {
            return 0.0;
        }
        let m = rates.len() / 2;
        if rates.len() % 2 == 1 { rates[m] } else { (rates[m - 1] + rates[m]) / 2.0 }
    }

    pub fn rate_text(&self) -> String {
        let r = self.median_rate();
        if self.unit_is_bytes { format!("{:.1} MiB/s", r / (1 << 20) as f64) } else { format!("{r:.0} entries/s") }
    }
}

/// Results of the whole run, keyed by (group, id).
pub static RESULTS: Mutex<BTreeMap<(String, String), Record>> = Mutex::new(BTreeMap::new());

pub fn record(group: &str, id: &str, units: u64, unit_is_bytes: bool, time: Duration, counts: Counts, hwm_kib: u64) {
    let mut all = RESULTS.lock().unwrap();
    let r = all.entry((group.to_string(), id.to_string())).or_default();
    r.units = units;
    r.unit_is_bytes = unit_is_bytes;
    r.times.push(time);
    r.counts.add(&counts);
    r.hwm_kib = r.hwm_kib.max(hwm_kib);
}

/// VmHWM (peak resident set) of `pid` in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid` ("self" for this one) in ms; 0 if gone.
pub fn cpu_ms(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1000 / hz
}
