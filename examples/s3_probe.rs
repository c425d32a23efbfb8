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

use std::time::Instant;

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, bucket, ak, sk, what, rest @ ..] = args.as_slice() else {
        eprintln!("usage: s3_probe ENDPOINT BUCKET ACCESS_KEY SECRET_KEY put [N] | head PREFIX [CONCURRENCY]");
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
        "head" => {
            let prefix = rest.first().expect("PREFIX");
            heads(&client, bucket, prefix, rest.get(1).map_or(64, |s| s.parse().expect("CONCURRENCY"))).await
        }
        _ => {
            eprintln!("s3_probe: unknown probe {what:?} (put or head)");
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

async fn puts(client: &aws_sdk_s3::Client, bucket: &str, n: usize) {
    let body = bytes::Bytes::from(vec![b'x'; 4096]);
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    for round in 0..2 {
        for variant in ["plain", "if-none-match", "content-type", "both"] {
            let t = Instant::now();
            for i in 0..n {
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
            let per = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
            println!("round {round} {variant:<14} {per:.3} ms per PUT");
        }
    }
}

async fn store_puts(client: &aws_sdk_s3::Client, endpoint: &str, bucket: &str, ak: &str, sk: &str, n: usize) {
    use bucketfs::spec::{CredentialSource, S3Settings, SecretValue};
    use bucketfs::store::{ObjectAttrs, ObjectStore, PutCondition};
    let settings = S3Settings {
        endpoint: Some(endpoint.to_string()),
        path_style: true,
        credentials: CredentialSource::Keys {
            access_key: SecretValue::Literal(ak.to_string()),
            secret_key: SecretValue::Literal(sk.to_string()),
        },
        ..S3Settings::default()
    };
    let store = bucketfs::store::s3::S3Store::new(bucket, settings).await.expect("store");
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
