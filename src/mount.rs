//! Mounting, serving and unmounting: stale-mount cleanup, the FUSE session,
//! signals and exit codes.
//!
//! Exit codes: 0 after a clean unmount (a signal, or `umount` from outside);
//! 2 when the mount cannot start (bad input, unreachable server, missing
//! bucket, denied credentials); 1 when the session fails while running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, INodeNo, MountOption, Session, SessionACL};
use tracing::{error, info, warn};

use crate::fs::{Fs, Invalidate, MountPoint, PlacedMount};
use crate::fuse::FuseAdapter;
use crate::spec::{FsSettings, MountSpec};
use crate::store::s3::S3Store;
use crate::store::{ObjectStore, StoreError};

/// Exit code for anything that stops a mount from starting.
pub const EXIT_START: i32 = 2;
/// The FUSE fsname: the source field of the mountinfo line.
pub use crate::host::{FSNAME, clean_stale_mount, mounts_at};
/// How long the mount-time check may wait for the server.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutdown waits for open files to be uploaded: within the 30 s
/// Kubernetes gives between SIGTERM and SIGKILL.
const SHUTDOWN_UPLOAD_WAIT: Duration = Duration::from_secs(25);
/// How often the Fluid config is read for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);
/// How long to wait for the session to end after unmounting.
const UNMOUNT_WAIT: Duration = Duration::from_secs(10);

/// An error that stops the mount from starting: one line, exit code 2.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Everything one FUSE session serves.
pub struct MountRequest {
    pub mountpoint: PathBuf,
    pub settings: FsSettings,
    pub mounts: Vec<MountSpec>,
    /// Check every bucket before mounting (`bucketfs mount`); Fluid mode
    /// mounts first and reports problems per operation instead.
    pub check_first: bool,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A Fluid config to follow for live updates.
    pub watch: Option<ConfigWatch>,
    /// Called once the mount is up and its root answers (`--background`).
    pub on_ready: Option<Box<dyn FnOnce() + Send>>,
}

/// The config file `bucketfs fluid` follows.
pub struct ConfigWatch {
    pub path: PathBuf,
    pub mount_options: Option<String>,
}

/// Runs a mount until it is unmounted. Returns the process exit code.
pub fn run(mut req: MountRequest) -> i32 {
    let on_ready = req.on_ready.take();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bucketfs").build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let listener = match req.metrics_addr {
        Some(addr) => match rt.block_on(crate::metrics::bind(addr)) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("bucketfs: cannot serve metrics on {addr}: {e}");
                return EXIT_START;
            }
        },
        None => None,
    };
    match rt.block_on(prepare(&req)) {
        Ok(fs) => {
            if let Some(l) = listener {
                rt.spawn(crate::metrics::serve(l, fs.snapshot_fn(), req.mountpoint.clone()));
            }
            serve(&rt, &req, fs, on_ready)
        }
        Err(e) => {
            eprintln!("bucketfs: {e}");
            EXIT_START
        }
    }
}

fn endpoint_name(spec: &MountSpec) -> String {
    match &spec.s3.endpoint {
        Some(e) => e.clone(),
        None => format!("AWS S3 ({})", spec.s3.region.as_deref().unwrap_or("default region")),
    }
}

/// Explains a failed bucket check in one line.
pub fn explain_check_failure(spec: &MountSpec, e: &StoreError) -> String {
    let bucket = &spec.source.bucket;
    let endpoint = endpoint_name(spec);
    match e {
        StoreError::NoSuchBucket | StoreError::NotFound => {
            format!("bucket {bucket:?} does not exist at {endpoint}: check the name, or create the bucket")
        }
        StoreError::AccessDenied(code) => format!(
            "access to bucket {bucket:?} at {endpoint} was denied ({code}): check the access key and secret key, or the bucket policy"
        ),
        StoreError::Network(cause) if is_missing_credentials(cause) => format!(
            "no S3 credentials found for bucket {bucket:?} at {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             or AWS_PROFILE (~/.aws/credentials), or use --access-key-file and --secret-key-file"
        ),
        StoreError::Network(cause) => {
            format!("cannot reach {endpoint} for bucket {bucket:?}: {}", first_line(cause))
        }
        other => format!("bucket {bucket:?} at {endpoint}: {other}"),
    }
}

/// True when a request failed because the credential chain found nothing.
fn is_missing_credentials(cause: &str) -> bool {
    cause.contains("no credentials found in chain") || cause.contains("no providers in chain provided credentials")
}

/// The first line of a cause (the credential chain explains itself over several).
fn first_line(cause: &str) -> &str {
    cause.lines().next().unwrap_or(cause)
}

/// The store and mount point for one spec. With `check_first`, the bucket
/// must answer now; otherwise problems are logged and the mount comes up.
async fn build_point(spec: &MountSpec, check_first: bool) -> Result<(Vec<String>, Arc<MountPoint>), StartError> {
    let store = S3Store::new(&spec.source.bucket, spec.s3.clone())
        .await
        .map_err(|e| StartError(format!("mount {}: {e:#}", spec.name)))?;
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    if check_first {
        match tokio::time::timeout(CHECK_TIMEOUT, store.check_bucket()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError(explain_check_failure(spec, &e))),
            Err(_) => {
                return Err(StartError(format!(
                    "no answer from {} for bucket {:?} within {}s",
                    endpoint_name(spec),
                    spec.source.bucket,
                    CHECK_TIMEOUT.as_secs()
                )));
            }
        }
    } else {
        let (store, spec) = (store.clone(), spec.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(CHECK_TIMEOUT, store.check_bucket()).await {
                Ok(Ok(())) => info!("mount {}: {} is reachable", spec.name, spec.source),
                Ok(Err(e)) => warn!(
                    "mount {}: {}; operations under it will fail until this is fixed",
                    spec.name,
                    explain_check_failure(&spec, &e)
                ),
                Err(_) => warn!(
                    "mount {}: no answer from {} yet; operations will fail with EIO until it answers",
                    spec.name,
                    endpoint_name(&spec)
                ),
            }
        });
    }
    let source_id: Arc<str> = format!("{}|{}", spec.s3.endpoint.as_deref().unwrap_or("aws"), spec.source.bucket).into();
    Ok((
        spec.path.clone(),
        Arc::new(MountPoint {
            name: spec.name.clone(),
            store,
            prefix: spec.source.prefix.clone(),
            read_only: spec.read_only,
            ttl: spec.metadata_ttl,
            source_id,
        }),
    ))
}

/// Follows a Fluid config file and applies changes to the mounts without
/// remounting. Kubelet swaps the whole directory (`..data`), so the file is
/// polled by content rather than watched by inode.
async fn watch_config(fs: Arc<Fs>, watch: ConfigWatch, mut current: Vec<(MountSpec, PlacedMount)>) {
    let mut last = std::fs::read(&watch.path).unwrap_or_default();
    loop {
        tokio::time::sleep(CONFIG_POLL).await;
        let Ok(text) = tokio::fs::read(&watch.path).await else { continue };
        if text == last {
            continue;
        }
        last = text.clone();
        let plan = match crate::fluid::plan(&String::from_utf8_lossy(&text), watch.mount_options.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                error!("config update of {} ignored: {e:#}", watch.path.display());
                continue;
            }
        };
        if plan.settings != *fs.settings() {
            warn!("config update changes uid, gid, modes, memory or cache options: restart the FUSE pod to apply them");
        }
        let mut next = Vec::new();
        for spec in plan.mounts {
            if let Some((_, point)) = current.iter().find(|(old, _)| *old == spec) {
                point.1.store.reload_credentials().await;
                next.push((spec, point.clone()));
                continue;
            }
            match build_point(&spec, false).await {
                Ok(point) => next.push((spec, point)),
                Err(e) => error!("config update: mount {} not served: {e}", spec.name),
            }
        }
        match fs.reconfigure(next.iter().map(|(_, p)| p.clone()).collect()) {
            Ok(()) => {
                info!("config updated: serving {} mount(s) without remounting", next.len());
                current = next;
            }
            Err(e) => error!("config update of {} ignored: {e:#}", watch.path.display()),
        }
    }
}

async fn prepare(req: &MountRequest) -> Result<Arc<Fs>, StartError> {
    let mountpoint = &req.mountpoint;
    clean_stale_mount(mountpoint);
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StartError(format!("mount point {} is not a directory", mountpoint.display())));
        }
        Err(e) => {
            return Err(StartError(format!("mount point {}: {e}", mountpoint.display())));
        }
    }
    let mut points = Vec::new();
    for spec in &req.mounts {
        points.push(build_point(spec, req.check_first).await?);
    }
    let fs = Fs::new(req.settings.clone(), points).map_err(|e| StartError(format!("{e:#}")))?;
    Ok(Arc::new(fs))
}

/// Invalidations queued for the worker; past this they are dropped.
const INVALIDATIONS_QUEUED: usize = 4096;

/// Tells the kernel to drop cached attributes, pages or entries, from one
/// thread fed by a bounded queue. The kernel may hold an inode's lock while
/// it waits for the request that caused an invalidation, so the caller must
/// never wait for it: when the queue is full the invalidation is dropped with
/// a warning, and the kernel's copy lasts at most its TTL.
fn invalidation_worker(notifier: fuser::Notifier) -> Box<dyn Fn(Invalidate) + Send + Sync> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Invalidate>(INVALIDATIONS_QUEUED);
    let spawned = std::thread::Builder::new().name("bucketfs-invalidate".into()).spawn(move || {
        for what in rx {
            let _ = match what {
                Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, -1),
                Invalidate::Entry(parent, name) => notifier.inval_entry(INodeNo(parent), std::ffi::OsStr::new(&name)),
            };
        }
    });
    if let Err(e) = spawned {
        warn!("cannot start the kernel-invalidation thread ({e}); the kernel's caches expire by their TTL only");
    }
    let warned = std::sync::atomic::AtomicBool::new(false);
    Box::new(move |what| {
        if tx.try_send(what).is_err() && !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!("the kernel is slow to take cache invalidations; some are dropped and expire by their TTL");
        }
    })
}

fn serve(
    rt: &tokio::runtime::Runtime,
    req: &MountRequest,
    fs: Arc<Fs>,
    on_ready: Option<Box<dyn FnOnce() + Send>>,
) -> i32 {
    let mut options = vec![
        MountOption::FSName(FSNAME.to_string()),
        MountOption::Subtype(FSNAME.to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
    ];
    if req.settings.read_only {
        options.push(MountOption::RO);
    }
    if req.settings.no_exec {
        options.push(MountOption::NoExec);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if req.settings.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(2);
    config.clone_fd = true;
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone(), req.mountpoint.clone());
    let mut session = match Session::new(adapter, &req.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bucketfs: cannot mount at {}: {e}", req.mountpoint.display());
            return EXIT_START;
        }
    };
    fs.set_invalidator(invalidation_worker(session.notifier()));
    let mut unmounter = session.unmount_callable();
    if let Some(w) = &req.watch {
        let current = req
            .mounts
            .iter()
            .cloned()
            .zip(fs.mounts())
            .map(|(spec, point)| {
                let path = spec.path.clone();
                (spec, (path, point))
            })
            .collect();
        let watch = ConfigWatch { path: w.path.clone(), mount_options: w.mount_options.clone() };
        rt.spawn(watch_config(fs.clone(), watch, current));
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let runner = std::thread::Builder::new().name("fuse-session".into()).spawn(move || {
        let result = session.run();
        let _ = done_tx.send(result);
    });
    if let Err(e) = runner {
        error!("cannot start the FUSE session thread: {e}");
        return 1;
    }
    let sources: Vec<String> = req.mounts.iter().map(|m| m.source.to_string()).collect();
    info!(
        "mounted {} at {}{}",
        sources.join(", "),
        req.mountpoint.display(),
        if req.settings.read_only { " (read-only)" } else { "" }
    );
    if let Some(ready) = on_ready {
        let mountpoint = req.mountpoint.clone();
        std::thread::spawn(move || {
            // The root's attributes now come from this process's session.
            let answered = (0..100).any(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::fs::metadata(&mountpoint).is_ok()
            });
            if !answered {
                warn!("{} does not answer stat yet", mountpoint.display());
            }
            ready();
        });
    }
    rt.block_on(async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install the SIGTERM handler: {e}");
                return 1;
            }
        };
        let mut done_rx = done_rx;
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
            result = &mut done_rx => {
                return match result {
                    Ok(Ok(())) => { info!("{} was unmounted; exiting", req.mountpoint.display()); 0 }
                    Ok(Err(e)) => { error!("the FUSE session failed: {e}"); 1 }
                    Err(_) => { error!("the FUSE session thread ended unexpectedly"); 1 }
                };
            }
        };
        info!("{signal}: finishing uploads, then unmounting {}", req.mountpoint.display());
        let failed = match tokio::time::timeout(SHUTDOWN_UPLOAD_WAIT, fs.flush_all()).await {
            Ok(n) => n,
            Err(_) => {
                error!("uploads still running after {}s; exiting without them", SHUTDOWN_UPLOAD_WAIT.as_secs());
                1
            }
        };
        if let Err(e) = unmounter.unmount() {
            warn!("unmount of {} failed ({e}); detaching it lazily", req.mountpoint.display());
            crate::host::lazy_unmount(&req.mountpoint);
        }
        match tokio::time::timeout(UNMOUNT_WAIT, done_rx).await {
            Ok(_) => info!("unmounted {}; exiting", req.mountpoint.display()),
            Err(_) => warn!("the kernel still holds {} open; exiting anyway", req.mountpoint.display()),
        }
        if failed > 0 {
            error!("{failed} file(s) open at shutdown could not be uploaded");
            1
        } else {
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_credential_is_one_line() {
        let spec = MountSpec {
            name: "b".into(),
            path: Vec::new(),
            source: "b".parse().unwrap(),
            s3: crate::spec::S3Settings { endpoint: Some("http://127.0.0.1:9000".into()), ..Default::default() },
            read_only: false,
            metadata_ttl: Duration::from_secs(1),
        };
        let cause = "dispatch failure: other: the credential provider was not enabled: no credentials found in chain. Attempted:\n  Environment: not set\n  Profile: not enabled";
        let msg = explain_check_failure(&spec, &StoreError::Network(cause.into()));
        assert!(msg.starts_with("no S3 credentials found for bucket \"b\""), "{msg}");
        assert!(!msg.contains('\n'));
        let msg = explain_check_failure(&spec, &StoreError::Network("connection refused\nmore".into()));
        assert!(!msg.contains('\n'), "{msg}");
    }
}
