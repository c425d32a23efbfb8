//! Write throughput through a real bucketfs mount on a SeaweedFS S3 server,
//! next to raw aws-sdk-s3 uploads of the same data in the same run.
//!
//! `cargo bench --bench write`. Workloads:
//! - `seq_write_256MiB`: one 256 MiB file written with 1 MiB writes and
//!   closed (the upload is complete when close returns); raw: a multipart
//!   upload of 8 MiB parts, 4 in flight (what bucketfs does), and one PUT.
//! - `create_1000x4KiB`: 1,000 new 4 KiB files written and closed, one after
//!   another; raw: 1,000 PutObject requests, one after another, plain and
//!   with the headers bucketfs sends for a new file. Timed in rounds where
//!   the clients take turns (`BUCKETFS_BENCH_CREATE_ROUNDS`, default 7), not
//!   by criterion: the server slows as the bucket grows.
//!
//! The summary is printed and written to `target/criterion-summary-write.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};

const MIB: usize = 1 << 20;
const BIG: usize = 256 * MIB;
const SMALL: usize = 4096;
const FILES: usize = 1000;

static SUMMARY: Mutex<Vec<(String, Vec<Duration>, f64)>> = Mutex::new(Vec::new());

fn record(name: &str, elapsed: Duration, units: f64) {
    let mut s = SUMMARY.lock().unwrap();
    match s.iter_mut().find(|(n, _, _)| n == name) {
        Some((_, times, _)) => times.push(elapsed),
        None => s.push((name.to_string(), vec![elapsed], units)),
    }
}

/// Benchmarks `id` in `group`: each of criterion's iterations times only
/// `run` (not `setup`) and is recorded under `group_name/id`.
fn bench_timed<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    group_name: &str,
    id: &str,
    units: usize,
    mut setup: impl FnMut(u64) -> S,
    mut run: impl FnMut(u64, S),
) {
    let name = format!("{group_name}/{id}");
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let state = setup(i);
                let start = Instant::now();
                run(i, state);
                let t = start.elapsed();
                record(&name, t, units as f64);
                total += t;
            }
            total
        })
    });
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[t.len() / 2]
}

async fn raw_multipart(client: &aws_sdk_s3::Client, bucket: &str, key: &str, data: &[u8]) {
    let id = client.create_multipart_upload().bucket(bucket).key(key).send().await.unwrap().upload_id.unwrap();
    let mut set = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(8 * MIB).enumerate() {
        let (client, bucket, key, id, body) =
            (client.clone(), bucket.to_string(), key.to_string(), id.clone(), chunk.to_vec());
        set.spawn(async move {
            let out = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(&id)
                .part_number(i as i32 + 1)
                .body(ByteStream::from(body))
                .send()
                .await
                .unwrap();
            CompletedPart::builder().part_number(i as i32 + 1).e_tag(out.e_tag.unwrap_or_default()).build()
        });
        while set.len() >= 4 {
            parts.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(p) = set.join_next().await {
        parts.push(p.unwrap());
    }
    parts.sort_by_key(|p| p.part_number());
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .unwrap();
}

fn benches(c: &mut Criterion) {
    let srv = common::server();
    let bucket = srv.bucket("bench-write");
    let data = common::pattern(BIG, 1);
    let small = common::pattern(SMALL, 2);

    const SEQ: &str = "seq_write_256MiB";
    let mut g = c.benchmark_group(SEQ);
    g.sample_size(10).measurement_time(Duration::from_secs(30)).throughput(Throughput::Bytes(BIG as u64));
    // The level a user runs at (tests log at debug); BUCKETFS_BENCH_LOG
    // changes it, as in the throughput bench.
    let log = std::env::var("BUCKETFS_BENCH_LOG").unwrap_or_else(|_| "bucketfs=info".into());
    let m = common::Mount::start_with(&srv.endpoint, &bucket, &[], &[("RUST_LOG", &log)]);
    bench_timed(
        &mut g,
        SEQ,
        "bucketfs",
        BIG,
        |_| (),
        |i, ()| {
            let mut f = std::fs::File::create(m.path(&format!("seq-{i}"))).unwrap();
            for chunk in data.chunks(MIB) {
                f.write_all(chunk).unwrap();
            }
            drop(f); // close: returns once the object is complete in S3
        },
    );
    bench_timed(
        &mut g,
        SEQ,
        "raw_multipart_8MiB_x4",
        BIG,
        |_| (),
        |i, ()| srv.block_on(raw_multipart(&srv.client, &bucket, &format!("raw-seq-{i}"), &data)),
    );
    bench_timed(
        &mut g,
        SEQ,
        "raw_single_put",
        BIG,
        |_| (),
        |i, ()| srv.put(&bucket, &format!("raw-put-{i}"), data.clone()),
    );
    g.finish();

    // Creates. The server's PUT time drifts by a third as the bucket grows,
    // so the clients take turns round by round (the order alternating) and
    // every round gives its own ratio. The raw client runs twice: plain
    // PutObject, and with the headers bucketfs sends for a new file
    // (`If-None-Match: *`, which makes the upload fail rather than replace
    // an object another client created meanwhile, and a Content-Type).
    const CREATE: &str = "create_1000x4KiB";
    let rounds: usize = std::env::var("BUCKETFS_BENCH_CREATE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let raw_puts = |round: usize, headers: bool| {
        let start = Instant::now();
        srv.block_on(async {
            for i in 0..FILES {
                let mut req = srv
                    .client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("raw-small-{headers}-{round}/f{i}"))
                    .body(ByteStream::from(small.clone()));
                if headers {
                    req = req.if_none_match("*").content_type("application/octet-stream");
                }
                req.send().await.unwrap();
            }
        });
        start.elapsed()
    };
    let through_mount = |round: usize| {
        let dir = m.path(&format!("small-{round}"));
        std::fs::create_dir(&dir).unwrap();
        let start = Instant::now();
        for i in 0..FILES {
            std::fs::write(dir.join(format!("f{i}")), &small).unwrap();
        }
        start.elapsed()
    };
    let (mut to_plain, mut to_headers) = (Vec::new(), Vec::new());
    // Criterion's name filter, applied by hand to these rounds.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rounds = if filters.is_empty() || filters.iter().any(|f| CREATE.contains(f.as_str())) { rounds } else { 0 };
    for round in 0..rounds {
        let (mount, plain, headers) = if round % 2 == 0 {
            let t = through_mount(round);
            (t, raw_puts(round, false), raw_puts(round, true))
        } else {
            let (p, h) = (raw_puts(round, false), raw_puts(round, true));
            (through_mount(round), p, h)
        };
        record(&format!("{CREATE}/bucketfs"), mount, FILES as f64);
        record(&format!("{CREATE}/raw_put_serial"), plain, FILES as f64);
        record(&format!("{CREATE}/raw_put_bucketfs_headers"), headers, FILES as f64);
        to_plain.push(plain.as_secs_f64() / mount.as_secs_f64());
        to_headers.push(headers.as_secs_f64() / mount.as_secs_f64());
    }
    drop(m);

    let mut out = String::from("workload/config                          median       rate\n");
    for (name, times, units) in SUMMARY.lock().unwrap().iter() {
        let t = median(times);
        let rate = if name.starts_with("seq") {
            format!("{:.1} MiB/s", units / t.as_secs_f64() / MIB as f64)
        } else {
            format!("{:.0} files/s ({:.2} ms per file)", units / t.as_secs_f64(), t.as_secs_f64() * 1000.0 / units)
        };
        out += &format!("{name:<40} {:>8.3} s  {rate}\n", t.as_secs_f64());
    }
    if !to_plain.is_empty() {
        let mid = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        out += &format!(
            "{CREATE}: bucketfs's rate / raw's, median of {} rounds: {:.2} (plain PutObject), {:.2} (with bucketfs's headers)\n",
            to_plain.len(),
            mid(&mut to_plain),
            mid(&mut to_headers)
        );
    }
    eprintln!("\n{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/criterion-summary-write.txt", out);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
