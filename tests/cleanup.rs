//! `bucketfs check --abort-incomplete-uploads`: multipart uploads that were
//! never completed or aborted are listed and the old ones aborted, against
//! the test SeaweedFS server.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `bucketfs check --abort-incomplete-uploads SOURCE EXTRA...`:
/// success, stdout, stderr.
fn cleanup(source: &str, extra: &[&str]) -> (bool, String, String) {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let (a, s) = srv.key_files(dir.path());
    let out = Command::new(bucketfs())
        .args(["check", "--abort-incomplete-uploads", source, "--endpoint-url", &srv.endpoint])
        .arg("--access-key-file")
        .arg(&a)
        .arg("--secret-key-file")
        .arg(&s)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn old_incomplete_uploads_under_the_prefix_are_aborted_young_ones_kept() {
    let srv = server();
    let bucket = srv.bucket("cleanup");
    let c = raw_client(&srv.endpoint);
    let create = |key: &str, with_part: bool| {
        srv.block_on(async {
            let id = c
                .create_multipart_upload()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .unwrap()
                .upload_id()
                .unwrap()
                .to_string();
            if with_part {
                c.upload_part()
                    .bucket(&bucket)
                    .key(key)
                    .upload_id(&id)
                    .part_number(1)
                    .body(pattern(5 << 20, 1).into())
                    .send()
                    .await
                    .unwrap();
            }
            id
        })
    };
    let open = || -> Vec<String> {
        srv.block_on(async {
            let out = c.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
            let mut keys: Vec<String> = out.uploads().iter().filter_map(|u| u.key().map(str::to_string)).collect();
            keys.sort();
            keys
        })
    };
    create("data/a.bin", true);
    create("data/sub/b.bin", false);
    create("other/c.bin", false);
    std::thread::sleep(Duration::from_secs(3));
    create("data/young.bin", false);
    assert_eq!(open(), ["data/a.bin", "data/sub/b.bin", "data/young.bin", "other/c.bin"]);

    // The default bound is a day: everything here is younger.
    let (ok, out, err) = cleanup(&format!("s3://{bucket}/data"), &[]);
    eprintln!("{out}{err}");
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 incomplete upload(s) under \"data/\": 0 aborted, 3 kept (younger than 1day), 0 failed"));
    assert_eq!(open().len(), 4);

    // A dry run changes nothing.
    let (ok, out, err) = cleanup(&format!("s3://{bucket}/data"), &["--older-than", "2s", "--dry-run"]);
    assert!(ok && out.matches("would abort").count() == 2, "{out}{err}");
    assert_eq!(open().len(), 4);

    // Older than 2 s: the two old ones under data/ go.
    let (ok, out, err) = cleanup(&format!("s3://{bucket}/data"), &["--older-than", "2s"]);
    eprintln!("{out}{err}");
    assert!(ok, "{out}{err}");
    assert!(out.contains("aborted        data/a.bin"), "{out}");
    assert!(out.contains("aborted        data/sub/b.bin"), "{out}");
    assert!(out.contains("keep (younger) data/young.bin"), "{out}");
    assert!(out.contains(": 2 aborted, 1 kept"), "{out}");
    assert_eq!(open(), ["data/young.bin", "other/c.bin"]);

    // 0: all under the prefix, with a warning about running mounts.
    let (ok, out, err) = cleanup(&format!("{bucket}/data/"), &["--older-than", "0"]);
    assert!(ok && out.contains(": 1 aborted, 0 kept"), "{out}{err}");
    assert!(err.contains("running mount"), "{err}");
    assert_eq!(open(), ["other/c.bin"]);

    // Nothing left under the prefix: still a clean exit.
    let (ok, out, err) = cleanup(&format!("s3://{bucket}/data"), &["--older-than", "0"]);
    assert!(ok && out.contains("0 incomplete upload(s)"), "{out}{err}");
}
