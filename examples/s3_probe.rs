//! The raw client's side of two comparisons, with the SDK as plainly
//! configured as in the benchmarks (`tests/common`):
//!
//! - `s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY put [N]`: how long one
//!   PutObject of a small file takes, with and without what bucketfs adds
//!   to a new file's PUT (`If-None-Match: *`, a Content-Type). Each variant
//!   sends N (default 1,000) PUTs of 4 KiB one after another, twice, into
//!   new keys, and prints the time per PUT of each round.
//! - `s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY store-put [N]`: the
//!   same new-file PUT (`If-None-Match: *`, a Content-Type) sent by the raw
//!   client and by bucketfs's own S3 store (its client configuration,
//!   timeouts and request path), alternating, in one process.
//! - `s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY head PREFIX [CONCURRENCY]`:
//!   lists PREFIX, then HEADs every object with CONCURRENCY (default 64) in
//!   flight, and prints the rate: the server's HEAD ceiling, next to which
//!   `ls -l` with `--posix-metadata` is measured.
//! - `s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY get KEY [N] [SIZE]`:
//!   N (default 1,000) ranged GETs of SIZE bytes (default 256 KiB) at
//!   random aligned offsets of KEY, one at a time, in rounds that alternate
//!   a plain GET and one with `If-Match` (what a conditional read costs the
//!   server): the one-GET-per-read floor of a random read. With
//!   `PROBE_STORE=1` the second variant goes through bucketfs's own S3
//!   store instead; `PROBE_GAP_US=G` sleeps G µs before each GET, as the
//!   round trip through the kernel does between a mount's reads (`put`
//!   takes it too).

use std::time::Instant;

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Buf;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, bucket, ak, sk, what, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY put [N] | store-put [N] | get KEY [N] [SIZE] | head PREFIX [CONCURRENCY]"
        );
        std::process::exit(2);
    };
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .credentials_provider(Credentials::new(ak, sk, None, None, "probe"))
        .build();
    let client = aws_sdk_s3::Client::from_conf(conf);
    match what.as_str() {
        "put" => puts(&client, bucket, rest.first().map_or(1000, |s| s.parse().expect("N"))).await,
        "store-put" => {
            let n = rest.first().map_or(1000, |s| s.parse().expect("N"));
            store_puts(&client, endpoint, bucket, ak, sk, n).await
        }
        "get" => {
            let key = rest.first().expect("KEY");
            let n = rest.get(1).map_or(1000, |s| s.parse().expect("N"));
            let size = rest.get(2).map_or(256 << 10, |s| s.parse().expect("SIZE"));
            let store = if std::env::var_os("PROBE_STORE").is_some() {
                Some(store(endpoint, bucket, ak, sk).await)
            } else {
                None
            };
            gets(&client, store.as_ref(), bucket, key, n, size).await
        }
        "head" => {
            let prefix = rest.first().expect("PREFIX");
            heads(&client, bucket, prefix, rest.get(1).map_or(64, |s| s.parse().expect("CONCURRENCY"))).await
        }
        _ => {
            eprintln!("s3_probe: unknown probe {what:?} (put, store-put, get or head)");
            std::process::exit(2);
        }
    }
}

async fn heads(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str, concurrency: usize) {
    let mut keys = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        keys.extend(page.expect("list").contents().iter().filter_map(|o| o.key().map(str::to_string)));
    }
    let t = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys.iter().cloned() {
        let (client, bucket, permit) = (client.clone(), bucket.to_string(), sem.clone().acquire_owned().await);
        tasks.spawn(async move {
            let _permit = permit;
            client.head_object().bucket(bucket).key(key).send().await.expect("head");
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = t.elapsed().as_secs_f64();
    println!("{} HEADs, {concurrency} in flight: {secs:.3} s, {:.0} HEADs/s", keys.len(), keys.len() as f64 / secs);
}

async fn store(endpoint: &str, bucket: &str, ak: &str, sk: &str) -> bucketfs::store::s3::S3Store {
    use bucketfs::spec::{CredentialSource, S3Settings, SecretValue};
    let settings = S3Settings {
        endpoint: Some(endpoint.to_string()),
        path_style: true,
        credentials: CredentialSource::Keys {
            access_key: SecretValue::Literal(ak.to_string()),
            secret_key: SecretValue::Literal(sk.to_string()),
        },
        ..S3Settings::default()
    };
    bucketfs::store::s3::S3Store::new(bucket, settings).await.expect("store")
}

async fn gets(
    client: &aws_sdk_s3::Client,
    store: Option<&bucketfs::store::s3::S3Store>,
    bucket: &str,
    key: &str,
    n: usize,
    size: u64,
) {
    use bucketfs::store::ObjectStore;
    use futures::StreamExt;
    let head = client.head_object().bucket(bucket).key(key).send().await.expect("head");
    let (len, etag) = (head.content_length().unwrap_or(0) as u64, head.e_tag().unwrap_or("").to_string());
    let slots = (len / size).max(1);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..3 {
        let second = if store.is_some() {
            "store"
        } else if split() > 1 {
            "split"
        } else {
            "if-match"
        };
        for variant in ["plain", second] {
            let t = Instant::now();
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let start = (seed % slots) * size;
                pause();
                if variant == "store" {
                    let mut body = store.unwrap().get_range(key, Some(&etag), start, start + size).await.expect("get");
                    let mut got = 0;
                    while let Some(chunk) = body.next().await {
                        got += chunk.expect("body").len() as u64;
                    }
                    assert_eq!(got, size);
                    continue;
                }
                if variant == "split" {
                    let part = size / split();
                    let parts =
                        (0..split()).map(|i| {
                            let from = start + i * part;
                            let req = client.get_object().bucket(bucket).key(key).range(format!(
                                "bytes={}-{}",
                                from,
                                from + part - 1
                            ));
                            async move {
                                req.send().await.expect("get").body.collect().await.expect("body").remaining() as u64
                            }
                        });
                    let got: u64 = futures::future::join_all(parts).await.into_iter().sum();
                    assert_eq!(got, size);
                    continue;
                }
                let req =
                    client.get_object().bucket(bucket).key(key).range(format!("bytes={}-{}", start, start + size - 1));
                let req = if variant == "if-match" { req.if_match(&etag) } else { req };
                let body = req.send().await.expect("get").body.collect().await.expect("body");
                assert_eq!(body.remaining() as u64, size);
            }
            let secs = t.elapsed().as_secs_f64() - gap_ms() * n as f64 / 1000.0;
            let rate = (n as u64 * size) as f64 / secs / (1 << 20) as f64;
            println!("round {round} {variant:<8} {:.3} ms per GET, {rate:.1} MiB/s", secs * 1000.0 / n as f64);
        }
    }
}

/// `PROBE_SPLIT`, 1 if unset: how many ranged GETs, sent at once, the
/// second variant of `get` splits each read into.
fn split() -> u64 {
    std::env::var("PROBE_SPLIT").ok().and_then(|g| g.parse().ok()).unwrap_or(1)
}

/// `PROBE_GAP_US`, 0 if unset: a pause before each request, as a mount has
/// between two requests while the kernel and the program take their turns.
/// The times printed leave it out.
fn gap_ms() -> f64 {
    std::env::var("PROBE_GAP_US").ok().and_then(|g| g.parse::<f64>().ok()).unwrap_or(0.0) / 1000.0
}

fn pause() {
    if gap_ms() > 0.0 {
        std::thread::sleep(std::time::Duration::from_secs_f64(gap_ms() / 1000.0));
    }
}

async fn puts(client: &aws_sdk_s3::Client, bucket: &str, n: usize) {
    let body = bytes::Bytes::from(vec![b'x'; 4096]);
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    for round in 0..2 {
        for variant in ["plain", "if-none-match", "content-type", "both"] {
            let t = Instant::now();
            for i in 0..n {
                pause();
                let mut req = client
                    .put_object()
                    .bucket(bucket)
                    .key(format!("probe-{run}-{round}-{variant}/f{i}"))
                    .body(ByteStream::from(body.clone()));
                if variant == "if-none-match" || variant == "both" {
                    req = req.if_none_match("*");
                }
                if variant == "content-type" || variant == "both" {
                    req = req.content_type("application/octet-stream");
                }
                req.send().await.expect("put");
            }
            let per = t.elapsed().as_secs_f64() * 1000.0 / n as f64 - gap_ms();
            println!("round {round} {variant:<14} {per:.3} ms per PUT");
        }
    }
}

async fn store_puts(client: &aws_sdk_s3::Client, endpoint: &str, bucket: &str, ak: &str, sk: &str, n: usize) {
    use bucketfs::store::{ObjectAttrs, ObjectStore, PutCondition};
    let store = store(endpoint, bucket, ak, sk).await;
    let body = bytes::Bytes::from(vec![b'x'; 4096]);
    let attrs = ObjectAttrs::typed(Some("application/octet-stream".to_string()));
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    for round in 0..3 {
        for variant in ["raw", "store"] {
            let t = Instant::now();
            for i in 0..n {
                let key = format!("probe-{run}-{round}-{variant}/f{i}");
                if variant == "raw" {
                    let req = client.put_object().bucket(bucket).key(key).body(ByteStream::from(body.clone()));
                    req.if_none_match("*").content_type("application/octet-stream").send().await.expect("put");
                } else {
                    store.put_with(&key, body.clone(), PutCondition::IfAbsent, &attrs).await.expect("put");
                }
            }
            let per = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
            println!("round {round} {variant:<6} {per:.3} ms per PUT");
        }
    }
}
