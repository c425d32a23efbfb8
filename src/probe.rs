//! The readiness check behind `bucketfs probe`: the path is a bucketfs mount
//! in this mount namespace, and `stat` on it answers in time.

use std::path::Path;
use std::time::Duration;

use crate::host::{FSNAME, mounts_at};

pub fn check(target: &Path, timeout: Duration) -> Result<(), String> {
    let entries = mounts_at(target);
    if !entries.iter().any(|m| m.source == FSNAME || m.fs_type.ends_with(FSNAME)) {
        return Err(format!("{} is not mounted by bucketfs", target.display()));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let path = target.to_path_buf();
    // A hung mount blocks stat forever; the thread is abandoned on timeout.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&path).map(|_| ()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("stat {} failed: {e}", target.display())),
        Err(_) => Err(format!("stat {} did not answer within {:?}", target.display(), timeout)),
    }
}
