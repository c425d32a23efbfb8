//! `bucketfs check`: walks through what a mount needs, step by step, and says
//! for every failed step what to fix. Meant for the Fluid admin debugging a
//! profile, and for anyone whose mount does not come up.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::mount::{FSNAME, explain_check_failure, mounts_at};
use crate::spec::{CredentialSource, MountSpec};
use crate::store::s3::S3Store;
use crate::store::{ObjectStore, StoreError, collect_body};

const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Collects ✓/✗ lines; `ok()` is false once any step failed.
#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
    failed: usize,
}

impl Report {
    pub fn pass(&mut self, step: &str, detail: impl AsRef<str>) {
        self.lines.push(format!("✓ {step}: {}", detail.as_ref()));
    }

    pub fn fail(&mut self, step: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failed += 1;
        self.lines.push(format!("✗ {step}: {}\n    fix: {}", detail.as_ref(), fix.as_ref()));
    }

    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Checks one mount against its server.
pub async fn check_mount(report: &mut Report, spec: &MountSpec, write_test: bool) {
    let name = format!("mount {:?} ({})", spec.name, spec.source);
    match &spec.s3.credentials {
        CredentialSource::Chain => report.pass(&format!("{name} credentials"), "from the AWS credential chain"),
        CredentialSource::Keys { .. } => match spec.s3.credentials.static_keys() {
            Ok(_) => report.pass(&format!("{name} credentials"), "access key and secret key are readable"),
            Err(e) => {
                return report.fail(
                    &format!("{name} credentials"),
                    format!("{e:#}"),
                    "make the secret files exist and be readable (check the Secret and the encryptOptions names)",
                );
            }
        },
    }
    let store: Arc<dyn ObjectStore> = match S3Store::new(&spec.source.bucket, spec.s3.clone()).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            return report.fail(&format!("{name} client"), format!("{e:#}"), "check endpoint, region and CA bundle");
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, store.check_bucket()).await {
        Ok(Ok(())) => report.pass(&format!("{name} bucket"), "reachable, and listing is allowed"),
        Ok(Err(e)) => {
            let fix = match e {
                StoreError::Network(_) => "check the endpoint URL, DNS and network policy from this pod",
                StoreError::AccessDenied(_) => {
                    "check the access key and secret, and that the bucket policy allows s3:ListBucket"
                }
                StoreError::NoSuchBucket | StoreError::NotFound => {
                    "check the bucket name in mountPoint, or create the bucket"
                }
                _ => "check the server's logs",
            };
            return report.fail(&format!("{name} bucket"), explain_check_failure(spec, &e), fix);
        }
        Err(_) => {
            return report.fail(
                &format!("{name} bucket"),
                "no answer within 15s",
                "check the endpoint URL and that the server is up",
            );
        }
    }
    // Read one object under the prefix, if there is one.
    match store.list(&spec.source.prefix, false, None, Some(1)).await {
        Ok(page) => match page.objects.first() {
            Some(o) if o.size > 0 => match store.get_range(&o.key, None, 0, 1).await {
                Ok(body) => match collect_body(body).await {
                    Ok(_) => report.pass(&format!("{name} read"), format!("read {}", o.key)),
                    Err(e) => report.fail(&format!("{name} read"), format!("{}: {e}", o.key), "check s3:GetObject"),
                },
                Err(e) => report.fail(&format!("{name} read"), format!("{}: {e}", o.key), "allow s3:GetObject"),
            },
            _ => report.pass(&format!("{name} read"), "nothing to read under the prefix yet"),
        },
        Err(e) => report.fail(&format!("{name} list"), e.to_string(), "allow s3:ListBucket on the prefix"),
    }
    if write_test && !spec.read_only {
        let key = format!("{}.bucketfs-check-{}", spec.source.prefix, std::process::id());
        match store.put(&key, bytes::Bytes::from_static(b"check"), crate::store::PutCondition::None).await {
            Ok(_) => {
                let _ = store.delete(&key).await;
                report.pass(&format!("{name} write"), "created and deleted a test object")
            }
            Err(e) => report.fail(
                &format!("{name} write"),
                e.to_string(),
                "allow s3:PutObject and s3:DeleteObject, or mount read-only",
            ),
        }
    }
}

/// Checks the local side: /dev/fuse and the mount point.
pub fn check_local(report: &mut Report, mountpoint: &Path) {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => report.pass("FUSE", "/dev/fuse can be opened"),
        Err(e) => report.fail(
            "FUSE",
            format!("/dev/fuse: {e}"),
            "install fuse3 and load the fuse module; in a container, run privileged or pass /dev/fuse",
        ),
    }
    let mounted = mounts_at(mountpoint);
    if mounted.iter().any(|m| m.source == FSNAME) {
        report.pass("mount point", format!("{} is already mounted by bucketfs", mountpoint.display()));
    } else if !mounted.is_empty() {
        report.pass(
            "mount point",
            format!("{} has another file system mounted; bucketfs will mount on top", mountpoint.display()),
        );
    } else if mountpoint.is_dir() {
        report.pass("mount point", format!("{} is a directory", mountpoint.display()));
    } else if mountpoint.parent().is_some_and(Path::is_dir) {
        report.pass("mount point", format!("{} will be created", mountpoint.display()));
    } else {
        report.fail(
            "mount point",
            format!("{} does not exist and neither does its parent", mountpoint.display()),
            "create the directory, or check targetPath and the hostPath volume of the FUSE pod",
        );
    }
}
