//! `MountSpec`: the one description of what to mount, whichever front end
//! (`bucketfs mount` or `bucketfs fluid`) built it. Defaults live here, once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

/// Default kernel and in-process metadata TTL: short, but non-zero, so `ls -l`
/// right after a listing costs nothing while changes on the server show up
/// within a second (mountpoint-s3 uses 1 s for directories).
pub const DEFAULT_METADATA_TTL: Duration = Duration::from_secs(1);
/// What `--metadata-ttl indefinite` means: long enough to never expire.
pub const INDEFINITE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default global memory budget shared by prefetch windows and the block cache.
pub const DEFAULT_MEMORY_LIMIT: u64 = 512 << 20;
/// Kernel readahead of the mount (`--read-ahead`): sequential reads arrive as
/// FUSE requests of up to this size (the kernel's own default is 128 KiB).
pub const DEFAULT_READ_AHEAD: u64 = 1 << 20;
/// Default bound on opening a TCP (and TLS) connection, per attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on one attempt of a request up to the response headers
/// (connecting included), for requests without a large body. Uploads, copies
/// and CompleteMultipartUpload get longer bounds; see `store::s3`.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on a pause in a response body: no byte for this long ends
/// the read. A body that keeps moving is never cut, however long it takes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default attempts per request (the first try plus retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;

/// A bucket and an optional prefix inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub bucket: String,
    /// Empty for the whole bucket, otherwise ends with `/`.
    pub prefix: String,
}

impl FromStr for Source {
    type Err = anyhow::Error;

    /// Accepts `BUCKET`, `BUCKET/PREFIX`, `s3://BUCKET[/PREFIX]` and
    /// `minio://BUCKET[/PREFIX]`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        let rest = if let Some((scheme, rest)) = s.split_once("://") {
            match scheme {
                "s3" | "minio" => rest,
                _ => {
                    bail!("unsupported scheme {scheme:?} in {s:?}: use s3://BUCKET[/PREFIX] or minio://BUCKET[/PREFIX]")
                }
            }
        } else {
            s
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            bail!("no bucket name in {s:?}: expected BUCKET[/PREFIX]");
        }
        if bucket.len() > 255 || bucket.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\') {
            bail!("invalid bucket name {bucket:?}");
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty()
            && prefix.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255 || c.contains('\0'))
        {
            bail!("invalid prefix {prefix:?} in {s:?}: components must be non-empty file names");
        }
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(Source { bucket: bucket.to_string(), prefix })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// A credential value: a literal, or a file holding it (how Kubernetes
/// Secrets arrive). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretValue {
    Literal(String),
    File(PathBuf),
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretValue::Literal(_) => f.write_str("Literal(<redacted>)"),
            SecretValue::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl SecretValue {
    /// A value that is an absolute path to an existing file is a file;
    /// anything else is a literal (Fluid passes either).
    pub fn from_option(value: &str) -> Self {
        let path = Path::new(value);
        if path.is_absolute() && path.is_file() {
            SecretValue::File(path.to_path_buf())
        } else {
            SecretValue::Literal(value.to_string())
        }
    }

    /// The value, read fresh from the file each time (following kubelet's
    /// `..data` symlinks), with one trailing newline removed.
    pub fn read(&self) -> anyhow::Result<String> {
        match self {
            SecretValue::Literal(v) => Ok(v.clone()),
            SecretValue::File(p) => {
                let mut v =
                    std::fs::read_to_string(p).with_context(|| format!("cannot read secret file {}", p.display()))?;
                if v.ends_with('\n') {
                    v.pop();
                    if v.ends_with('\r') {
                        v.pop();
                    }
                }
                Ok(v)
            }
        }
    }
}

/// Where the S3 credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// The standard AWS chain: environment, shared profile, web identity,
    /// container and instance metadata.
    Chain,
    Keys {
        access_key: SecretValue,
        secret_key: SecretValue,
    },
}

impl CredentialSource {
    /// The access and secret key for `Keys`, read now; `None` for the chain.
    pub fn static_keys(&self) -> anyhow::Result<Option<(String, String)>> {
        match self {
            CredentialSource::Chain => Ok(None),
            CredentialSource::Keys { access_key, secret_key } => {
                let a = access_key.read().context("access key")?;
                let s = secret_key.read().context("secret key")?;
                if a.is_empty() {
                    bail!("the access key is empty");
                }
                Ok(Some((a, s)))
            }
        }
    }
}

/// How to reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub ca_bundle: Option<PathBuf>,
    pub credentials: CredentialSource,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// When set, the one bound on every attempt of every request (uploads,
    /// copies and CompleteMultipartUpload included), instead of the first-byte
    /// timeout and the longer bounds derived from it.
    pub request_timeout: Option<Duration>,
    pub max_attempts: u32,
    /// Whether sequential reads treat the server as near (see `fs::read`).
    pub near_server: NearServer,
}

/// Whether the server is near (on this host or a LAN away), where a
/// sequential read is fetched in fewer, larger GETs. `Auto` tells it from
/// how quickly the server answers, and never for AWS's own endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NearServer {
    #[default]
    Auto,
    Yes,
    No,
}

/// Parses `auto`, `yes` or `no` (also `true`/`false`, `on`/`off`).
pub fn parse_near_server(s: &str) -> anyhow::Result<NearServer> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(NearServer::Auto),
        "yes" | "true" | "on" => Ok(NearServer::Yes),
        "no" | "false" | "off" => Ok(NearServer::No),
        other => bail!("{other:?} is not one of auto, yes, no"),
    }
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            path_style: false,
            ca_bundle: None,
            credentials: CredentialSource::Chain,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            near_server: NearServer::Auto,
        }
    }
}

/// One bucket (or prefix) and where it appears in the mounted tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    /// A name for logs (the Fluid mount name, or the bucket).
    pub name: String,
    /// Components of the directory inside the mount where this source
    /// appears; empty means the root.
    pub path: Vec<String>,
    pub source: Source,
    pub s3: S3Settings,
    pub read_only: bool,
    pub metadata_ttl: Duration,
}

/// Settings of the whole file system (one FUSE session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsSettings {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub allow_other: bool,
    /// Mount the whole file system read-only (`MS_RDONLY`).
    pub read_only: bool,
    /// Mount with `MS_NOEXEC`.
    pub no_exec: bool,
    pub memory_limit: u64,
    /// Kernel readahead for the mount in bytes; 0 leaves the kernel's default.
    pub read_ahead: u64,
    /// Where staging files for writes and the disk cache live (default:
    /// staging in the system temp dir, no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Bound on the disk cache (default: 10% of the file system's size).
    pub max_cache_size: Option<u64>,
    /// Store and read modes, owners, times, symlinks and extended attributes
    /// in object metadata, in s3fs's format (costs a HEAD per `stat`).
    pub posix_metadata: bool,
    /// Let the kernel serve opens whose bytes are local from the local file
    /// itself (FUSE passthrough), when the kernel allows it.
    pub passthrough: bool,
}

impl Default for FsSettings {
    fn default() -> Self {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            uid,
            gid,
            file_mode: 0o644,
            dir_mode: 0o755,
            allow_other: false,
            read_only: false,
            no_exec: false,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            read_ahead: DEFAULT_READ_AHEAD,
            cache_dir: None,
            max_cache_size: None,
            posix_metadata: false,
            passthrough: true,
        }
    }
}

/// Parses `1s`, `500ms`, `2m`, a bare number of seconds, or `indefinite`.
/// Anything longer than a year is `indefinite`.
pub fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    match s {
        "indefinite" | "infinite" | "forever" => Ok(INDEFINITE_TTL),
        "minimal" | "0" => Ok(Duration::ZERO),
        _ => Ok(parse_duration(s)?.min(INDEFINITE_TTL)),
    }
}

/// The longest duration accepted anywhere: long durations are clamped by
/// their users, but must not overflow on the way.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a duration such as `20s`, `500ms` or `1m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|_| anyhow::anyhow!("duration {s:?} is too long"))?
        }
        Ok(_) => bail!("invalid duration {s:?}: must be a non-negative number of seconds"),
        Err(_) => {
            humantime::parse_duration(s).with_context(|| format!("invalid duration {s:?}: use e.g. 500ms, 20s, 5m"))?
        }
    };
    if d > MAX_DURATION {
        bail!("duration {s:?} is too long (at most 100 years; use \"indefinite\" for metadata that never changes)");
    }
    Ok(d)
}

/// Parses a size such as `512MiB`, `1G`, `4096` (bytes).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("invalid size {s:?}: use e.g. 512MiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => bail!("invalid size unit in {s:?}: use B, KiB, MiB, GiB or TiB"),
    };
    if !(num.is_finite() && num >= 0.0) {
        bail!("invalid size {s:?}");
    }
    Ok((num * mult as f64) as u64)
}

/// Parses an octal file mode such as `0644` or `755`.
pub fn parse_mode(s: &str) -> anyhow::Result<u16> {
    let v = u16::from_str_radix(s.trim().trim_start_matches("0o"), 8)
        .with_context(|| format!("invalid mode {s:?}: use octal, e.g. 0644"))?;
    if v > 0o7777 {
        bail!("invalid mode {s:?}: at most 07777");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        let s: Source = "bucket".parse().unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", ""));
        let s: Source = "bucket/a/b".parse().unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", "a/b/"));
        let s: Source = "s3://bucket/a/".parse().unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", "a/"));
        let s: Source = "minio://my-first-bucket".parse().unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("my-first-bucket", ""));
        assert!("".parse::<Source>().is_err());
        assert!("s3://".parse::<Source>().is_err());
        assert!("gs://b".parse::<Source>().is_err());
        assert!("b/a/../c".parse::<Source>().is_err());
        assert!("b/a//c".parse::<Source>().is_err());
    }

    #[test]
    fn durations_sizes_modes() {
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_ttl("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_ttl("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_ttl("indefinite").unwrap(), INDEFINITE_TTL);
        assert!(parse_ttl("soon").is_err());
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert!(parse_mode("999").is_err());
    }

    #[test]
    fn secrets_trim_one_newline_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "abc\r\n").unwrap();
        let v = SecretValue::from_option(p.to_str().unwrap());
        assert_eq!(v.read().unwrap(), "abc");
        std::fs::write(&p, "abc\n\n").unwrap();
        assert_eq!(v.read().unwrap(), "abc\n");
        let lit = SecretValue::from_option("hunter2");
        assert_eq!(lit.read().unwrap(), "hunter2");
        assert!(!format!("{lit:?}").contains("hunter2"));
        assert_eq!(SecretValue::from_option("/no/such/file"), SecretValue::Literal("/no/such/file".into()));
    }
}
