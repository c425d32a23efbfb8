//! Mounting, serving and unmounting: stale-mount cleanup, the FUSE session,
//! signals and exit codes.
//!
//! Exit codes: 0 after a clean unmount (a signal, or `umount` from outside);
//! 2 when the mount cannot start (bad input, unreachable server, missing
//! bucket, denied credentials); 1 when the session fails while running.

use std::path::{Path, PathBuf};
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
pub const FSNAME: &str = "bucketfs";
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
}

/// The config file `bucketfs fluid` follows.
pub struct ConfigWatch {
    pub path: PathBuf,
    pub mount_options: Option<String>,
}

/// Runs a mount until it is unmounted. Returns the process exit code.
pub fn run(req: MountRequest) -> i32 {
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
                rt.spawn(crate::metrics::serve(l, fs.clone(), req.mountpoint.clone()));
            }
            serve(&rt, &req, fs)
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
        StoreError::Network(cause) => {
            format!("cannot reach {endpoint} for bucket {bucket:?}: {cause}")
        }
        other => format!("bucket {bucket:?} at {endpoint}: {other}"),
    }
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

fn serve(rt: &tokio::runtime::Runtime, req: &MountRequest, fs: Arc<Fs>) -> i32 {
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
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |what| {
        let notifier = notifier.clone();
        std::thread::spawn(move || {
            let _ = match what {
                Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, -1),
                Invalidate::Entry(parent, name) => notifier.inval_entry(INodeNo(parent), std::ffi::OsStr::new(&name)),
            };
        });
    }));
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
            lazy_unmount(&req.mountpoint);
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

fn lazy_unmount(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted file system.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub line: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountInfo {
                dev: fields.get(2)?.to_string(),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2)?),
                line: line.to_string(),
            })
        })
        .collect()
}

/// Sets the kernel readahead of the bucketfs mount at `path` (its backing
/// device's `read_ahead_kb`). FUSE can only lower the kernel's 128 KiB default
/// at INIT, so this runs once the session is up; it needs root (or a writable
/// /sys). Returns the sysfs file written.
pub fn set_read_ahead(path: &Path, bytes: u64) -> Result<PathBuf, String> {
    let dev = mounts_at(path)
        .into_iter()
        .rev()
        .find(|m| m.source == FSNAME)
        .map(|m| m.dev)
        .ok_or_else(|| format!("no {FSNAME} mount at {}", path.display()))?;
    let file = PathBuf::from(format!("/sys/class/bdi/{dev}/read_ahead_kb"));
    std::fs::write(&file, format!("{}\n", bytes.div_ceil(1024))).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}

/// Entries of this process's mount table at `path`.
pub fn mounts_at(path: &Path) -> Vec<MountInfo> {
    let target = absolute(path);
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&text).into_iter().filter(|m| m.mount_point == target).collect()
}

/// The absolute path of `path` without following its last component (which
/// may be a dead mount that cannot be resolved).
pub fn absolute(path: &Path) -> PathBuf {
    let abs =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().unwrap_or_else(|_| parent.to_path_buf()).join(name),
        _ => abs,
    }
}

/// True if `path` is a FUSE mount whose server is gone. `stat` alone is not
/// enough: the kernel answers it from its attribute cache for as long as the
/// attributes are valid, dead server or not (seen with a FUSE container
/// killed and restarted at once). `statfs` always asks the server.
pub fn is_dead_mount(path: &Path) -> bool {
    let dead = |e: Option<i32>| matches!(e, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED));
    if let Err(e) = std::fs::metadata(path) {
        return dead(e.raw_os_error());
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a valid C string and a zeroed out-struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc != 0 && dead(std::io::Error::last_os_error().raw_os_error())
}

/// Detaches dead FUSE mounts stacked at `path`, and leaves healthy ones
/// alone. Returns how many were removed.
pub fn clean_stale_mount(path: &Path) -> usize {
    let mut removed = 0;
    for _ in 0..32 {
        if mounts_at(path).is_empty() || !is_dead_mount(path) {
            break;
        }
        if !lazy_unmount(&absolute(path)) {
            warn!("cannot detach the dead mount at {}: {}", path.display(), std::io::Error::last_os_error());
            break;
        }
        removed += 1;
    }
    if removed > 0 {
        info!("removed {removed} dead mount(s) left at {} by a previous instance", path.display());
    } else if !mounts_at(path).is_empty() {
        warn!("a working file system is already mounted at {}; mounting on top of it", path.display());
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    99 1 0:52 / /runtime-mnt/thin/default/demo/thin-fuse rw,nosuid,nodev,relatime shared:7 - fuse bucketfs rw,user_id=0,group_id=0,allow_other\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].fs_type, "fuse");
        assert_eq!(m[1].source, "bucketfs");
    }
}
