//! Operations features through real mounts: metrics, health, the persistent
//! disk cache across restarts, `bucketfs warm`, `bucketfs check` and JSON logs.

mod common;

use std::process::Command;

use common::*;

#[test]
fn metrics_and_health_endpoints() {
    let srv = server();
    let bucket = srv.bucket("metrics");
    srv.put(&bucket, "f.bin", pattern(3 << 20, 1));
    let addr = free_addr();
    let m = Mount::start(&bucket, &["--metrics-addr", &addr]);
    assert_eq!(std::fs::read(m.path("f.bin")).unwrap().len(), 3 << 20);
    std::fs::write(m.path("w.txt"), "written").unwrap();
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(metric(&body, "bucketfs_s3_requests_total", "operation=\"get\"") >= 1.0, "{body}");
    assert!(metric(&body, "bucketfs_s3_requests_total", "operation=\"put\"") >= 1.0, "{body}");
    assert!(metric(&body, "bucketfs_s3_request_duration_seconds_count", "get") >= 1.0);
    assert!(metric(&body, "bucketfs_read_bytes_total", "") >= (3 << 20) as f64);
    assert!(metric(&body, "bucketfs_written_bytes_total", "") >= 7.0);
    assert!(metric(&body, "bucketfs_cache_misses_total", "") >= 1.0);
    assert!(metric(&body, "bucketfs_memory_limit_bytes", "") > 0.0);
    for name in [
        "bucketfs_cache_hits",
        "bucketfs_cache_evictions",
        "bucketfs_prefetch_restarts",
        "bucketfs_open_handles",
        "bucketfs_memory_used_bytes",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
}

#[test]
fn health_reports_an_unreachable_server() {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = format!(
        r#"{{"mounts":[{{"mountPoint":"s3://gone","options":{{"endpoint":"http://127.0.0.1:{port}","access-key":"{}","secret-key":"{}"}}}}],"targetPath":"{}","runtimeOptions":{{"metrics-addr":"{}"}}}}"#,
        a.display(),
        s.display(),
        mnt.display(),
        "127.0.0.1:0"
    );
    // metrics-addr with port 0 is valid but unknown to us: pick one instead.
    let addr = free_addr();
    let cfg = cfg.replace("127.0.0.1:0", &addr);
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let args = vec!["fluid".to_string(), "--config".into(), dir.path().join("config.json").to_str().unwrap().into()];
    let log_dir = tempfile::tempdir().unwrap();
    let _m = Mount::spawn(log_dir, mnt, &args, &[]);
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"ok\":false"), "{body}");
}

#[test]
fn disk_cache_serves_warmed_files_after_a_restart() {
    let srv = server();
    let bucket = srv.bucket("diskcache");
    let data = pattern(20 << 20, 5);
    srv.put(&bucket, "warm/a.bin", data.clone());
    srv.put(&bucket, "warm/b.txt", "small");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap().to_string();
    {
        let m = Mount::start(&bucket, &["--cache-dir", &cache_dir]);
        let out = Command::new(bucketfs()).args(["warm", m.path("warm").to_str().unwrap()]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("warmed 2 files"), "{text}");
        // Let the background disk writes land.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let addr = free_addr();
    let m = Mount::start(&bucket, &["--cache-dir", &cache_dir, "--metrics-addr", &addr]);
    assert!(std::fs::read(m.path("warm/a.bin")).unwrap() == data);
    assert_eq!(std::fs::read_to_string(m.path("warm/b.txt")).unwrap(), "small");
    let (_, body) = http_get(&addr, "/metrics");
    assert_eq!(metric(&body, "bucketfs_s3_requests_total", "operation=\"get\""), 0.0, "data fetched again:\n{body}");
    // Served from disk: through bucketfs block by block, or, for files
    // cached whole, by the kernel from the cache file (passthrough).
    let (hits, passed) =
        (metric(&body, "bucketfs_disk_cache_hits_total", ""), metric(&body, "bucketfs_passthrough_opens_total", ""));
    assert!(hits >= 160.0 || passed >= 2.0, "{body}");
    // A changed object is not served from the cache.
    srv.put(&bucket, "warm/b.txt", "changed");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(std::fs::read_to_string(m.path("warm/b.txt")).unwrap(), "changed");
}

#[test]
fn check_reports_each_step() {
    let srv = server();
    let bucket = srv.bucket("check");
    srv.put(&bucket, "x", "y");
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let run = |source: &str, secret: &std::path::Path| {
        Command::new(bucketfs())
            .args(["check", source, "--endpoint-url", &srv.endpoint, "--write-test"])
            .args(["--access-key-file", a.to_str().unwrap(), "--secret-key-file", secret.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run(&bucket, &s);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("✓") && text.contains("bucket: reachable") && text.contains("write: created"), "{text}");
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong-secret").unwrap();
    let out = run(&bucket, &bad);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✗") && text.contains("fix:"), "{text}");
    assert!(!text.contains("wrong-secret"));
    let out = run("no-such-bucket-x", &s);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("does not exist") && text.contains("fix:"), "{text}");
}

#[test]
fn json_logs_are_json() {
    let srv = server();
    let bucket = srv.bucket("jsonlog");
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let args: Vec<String> = [
        "mount",
        &bucket,
        mnt.to_str().unwrap(),
        "--endpoint-url",
        &srv.endpoint,
        "--access-key-file",
        a.to_str().unwrap(),
        "--secret-key-file",
        s.to_str().unwrap(),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log_dir = tempfile::tempdir().unwrap();
    let mut m = Mount::spawn(log_dir, mnt, &args, &[]);
    let _ = std::fs::metadata(m.path("missing"));
    m.signal_and_wait(libc::SIGTERM);
    let log = m.log_text();
    assert!(!log.trim().is_empty());
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}
