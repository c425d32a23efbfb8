//! Signals in the middle of work: SIGTERM during a large write finishes the
//! upload (or says it could not), and never leaves a mount behind.

mod common;

use std::io::Write;

use common::*;

#[test]
fn sigterm_during_a_large_write_finishes_the_upload() {
    let srv = server();
    let bucket = srv.bucket("sigterm-write");
    let mut m = Mount::start(&bucket, &[]);
    let data = pattern(40 << 20, 77);
    let mut f = std::fs::File::create(m.path("big.bin")).unwrap();
    f.write_all(&data).unwrap();
    // The file is still open when the pod is told to stop.
    assert_eq!(m.signal_and_wait(libc::SIGTERM), Some(0), "{}", m.log_text());
    let log = m.log_text();
    assert!(log.contains("uploaded big.bin, still open at shutdown"), "{log}");
    assert!(mountinfo_at(&m.mountpoint).is_empty());
    assert!(srv.get(&bucket, "big.bin").unwrap() == data, "the object is not what was written");
    // Later writes through the orphaned descriptor fail; they do not vanish silently.
    assert!(f.write_all(b"more").and_then(|_| f.sync_all()).is_err());
    assert!(!log.contains(SECRET_KEY) && !log.contains(ACCESS_KEY), "a secret reached the log");
}

#[test]
fn kill_nine_then_a_new_mount_recovers() {
    let srv = server();
    let bucket = srv.bucket("kill9");
    srv.put(&bucket, "f", "survives");
    let mut m = Mount::start(&bucket, &[]);
    assert_eq!(std::fs::read_to_string(m.path("f")).unwrap(), "survives");
    assert_eq!(m.signal_and_wait(libc::SIGKILL), None);
    // Once the kernel's cached attributes expire, the dead mount says ENOTCONN.
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        std::fs::metadata(&m.mountpoint).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
    }));
    // `bucketfs mount` on the same directory cleans the dead mount first.
    let srv_args = vec![
        "mount".to_string(),
        bucket.clone(),
        m.mountpoint.to_str().unwrap().to_string(),
        "--endpoint-url".into(),
        srv.endpoint.clone(),
        "--access-key-file".into(),
        m.dir.path().join("access-key").to_str().unwrap().into(),
        "--secret-key-file".into(),
        m.dir.path().join("secret-key").to_str().unwrap().into(),
    ];
    let log_dir = tempfile::tempdir().unwrap();
    let m2 = Mount::spawn(log_dir, m.mountpoint.clone(), &srv_args, &[]);
    assert_eq!(std::fs::read_to_string(m2.path("f")).unwrap(), "survives");
    assert_eq!(mountinfo_at(&m2.mountpoint).len(), 1);
    drop(m2);
    drop(m);
}
