//! `bucketfs check`: walks through what a mount needs, step by step, and says
//! for every failed step what to fix. Meant for the Fluid admin debugging a
//! profile, and for anyone whose mount does not come up.
//!
//! `bucketfs check --abort-incomplete-uploads` is the clean-up side: it
//! lists the multipart uploads under a prefix that were never completed or
//! aborted (the bucket owner pays for their parts) and aborts the old ones.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::host::{FSNAME, mounts_at};
use crate::mount::explain_check_failure;
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

/// What [`abort_incomplete_uploads`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbortSummary {
    /// Open uploads found under the prefix.
    pub found: usize,
    pub aborted: usize,
    /// Younger than the bound (or all of them, in a dry run).
    pub kept: usize,
    /// Aborts that failed.
    pub failed: usize,
}

/// How many aborts are sent at once.
const ABORT_CONCURRENCY: usize = 8;

/// Lists the open multipart uploads under `prefix`, writes one line per
/// upload to `out` (key, age, what was done) and aborts those started more
/// than `older_than` before `now`, unless `dry_run`. Ends with a summary line.
/// An error is returned only when the listing itself fails.
pub async fn abort_incomplete_uploads(
    store: &dyn ObjectStore,
    prefix: &str,
    older_than: Duration,
    dry_run: bool,
    now: SystemTime,
    out: &mut dyn std::io::Write,
) -> Result<AbortSummary, StoreError> {
    use futures::StreamExt;
    let uploads = store.list_multipart_uploads(prefix).await?;
    let mut summary = AbortSummary { found: uploads.len(), ..AbortSummary::default() };
    let age_of = |u: &crate::store::OpenUpload| now.duration_since(u.initiated).unwrap_or(Duration::ZERO);
    let results: Vec<_> = futures::stream::iter(uploads.iter())
        .map(|u| async move {
            let age = age_of(u);
            if dry_run || age < older_than { None } else { Some(store.abort_multipart(&u.key, &u.upload_id).await) }
        })
        .buffered(ABORT_CONCURRENCY)
        .collect()
        .await;
    for (u, result) in uploads.iter().zip(results) {
        let age = humantime::format_duration(Duration::from_secs(age_of(u).as_secs()));
        let what = match result {
            None if dry_run => {
                summary.kept += 1;
                if age_of(u) < older_than { "keep (younger)" } else { "would abort" }.to_string()
            }
            None => {
                summary.kept += 1;
                "keep (younger)".to_string()
            }
            // Gone already (completed or aborted meanwhile) is what was wanted.
            Some(Ok(())) | Some(Err(StoreError::NotFound)) => {
                summary.aborted += 1;
                "aborted".to_string()
            }
            Some(Err(e)) => {
                summary.failed += 1;
                format!("FAILED: {e}")
            }
        };
        let _ = writeln!(out, "{what:<14} {}  age {age}  upload id {}", u.key, u.upload_id);
    }
    let bound = humantime::format_duration(older_than);
    let _ = writeln!(
        out,
        "{} incomplete upload(s) under {:?}: {} aborted, {} kept ({}), {} failed",
        summary.found,
        prefix,
        summary.aborted,
        summary.kept,
        if dry_run { "dry run".to_string() } else { format!("younger than {bound}") },
        summary.failed
    );
    Ok(summary)
}

/// `bucketfs check --abort-incomplete-uploads` for one mount: returns false
/// when the listing or an abort failed.
pub async fn abort_incomplete_uploads_of(spec: &MountSpec, older_than: Duration, dry_run: bool) -> bool {
    let store = match S3Store::new(&spec.source.bucket, spec.s3.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bucketfs check: {}: {e:#}", spec.source);
            return false;
        }
    };
    if older_than.is_zero() && !dry_run {
        eprintln!(
            "warning: --older-than 0 aborts every open upload under {}, including those a running mount is \
             still sending (those files then fail to save with EIO)",
            spec.source
        );
    }
    let mut out = std::io::stdout();
    match abort_incomplete_uploads(&store, &spec.source.prefix, older_than, dry_run, SystemTime::now(), &mut out).await
    {
        Ok(summary) => summary.failed == 0,
        Err(e) => {
            let fix = match e {
                StoreError::AccessDenied(_) => " (allow s3:ListBucketMultipartUploads and s3:AbortMultipartUpload)",
                _ => "",
            };
            eprintln!("bucketfs check: listing the multipart uploads under {} failed: {e}{fix}", spec.source);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn aborts_old_uploads_under_the_prefix_and_keeps_young_ones() {
        let store = MemoryStore::new();
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let old = store.create_multipart("p/old").await.unwrap();
        store.set_upload_initiated(&old, now - 2 * day);
        let young = store.create_multipart("p/young").await.unwrap();
        store.set_upload_initiated(&young, now - Duration::from_secs(60));
        let other = store.create_multipart("q/old").await.unwrap();
        store.set_upload_initiated(&other, now - 2 * day);
        let done = store.create_multipart("p/done").await.unwrap();
        store.complete_multipart("p/done", &done, Vec::new(), Default::default()).await.unwrap();

        let mut out = Vec::new();
        let dry = abort_incomplete_uploads(&store, "p/", day, true, now, &mut out).await.unwrap();
        assert_eq!(dry, AbortSummary { found: 2, aborted: 0, kept: 2, failed: 0 });
        assert_eq!(store.open_uploads().len(), 3);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("would abort    p/old  age 2days"), "{text}");

        let mut out = Vec::new();
        let s = abort_incomplete_uploads(&store, "p/", day, false, now, &mut out).await.unwrap();
        assert_eq!(s, AbortSummary { found: 2, aborted: 1, kept: 1, failed: 0 });
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("aborted        p/old"), "{text}");
        assert!(text.contains("keep (younger) p/young  age 1m"), "{text}");
        assert!(text.contains("2 incomplete upload(s) under \"p/\": 1 aborted, 1 kept (younger than 1day), 0 failed"));
        assert_eq!(
            store.open_uploads(),
            vec![("p/young".to_string(), young.clone()), ("q/old".to_string(), other.clone())]
        );

        let s = abort_incomplete_uploads(&store, "", Duration::ZERO, false, now, &mut Vec::new()).await.unwrap();
        assert_eq!(s, AbortSummary { found: 2, aborted: 2, kept: 0, failed: 0 });
        assert!(store.open_uploads().is_empty());
    }
}
