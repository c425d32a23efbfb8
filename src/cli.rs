//! The command line: `bucketfs mount` and friends, built with clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;
use crate::spec::{self, CredentialSource, FsSettings, MountSpec, S3Settings, SecretValue, Source};

#[derive(Parser, Debug)]
#[command(name = "bucketfs", version, about = "A FUSE file system for S3 and MinIO buckets")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a bucket (or a prefix of it) and serve it (in the foreground unless --background).
    ///
    /// `bucketfs SOURCE MOUNTPOINT -o OPT,OPT,...` (how `mount -t fuse.bucketfs` and
    /// /etc/fstab run it) is the same, with every option below as an `-o` key, in the
    /// background unless `-o foreground`.
    #[command(after_long_help = FSTAB_HELP)]
    Mount(Box<MountArgs>),
    /// Serve the mounts of a Fluid ThinRuntime config (the FUSE container's entry point).
    Fluid(FluidArgs),
    /// Readiness check: exit 0 when targetPath is mounted by bucketfs and answers.
    Probe(ProbeArgs),
    /// Read files or trees through a mount so they are cached (a Fluid DataLoad).
    Warm(WarmArgs),
    /// Validate a configuration and reach the server, step by step.
    Check(Box<CheckArgs>),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `bucketfs man | man -l -`, `bucketfs man mount | man -l -`.
    Man(ManArgs),
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The page of this command (e.g. mount) instead of the overview.
    pub command: Option<String>,
    /// Write every page (bucketfs.1, bucketfs-mount.1, ...) into this directory instead.
    #[arg(long, conflicts_with = "command")]
    pub dir: Option<PathBuf>,
}

/// The end of `bucketfs mount --help` and of its man page.
const FSTAB_HELP: &str = "\
/etc/fstab and mount -t fuse.bucketfs:
  mount.fuse3 runs `bucketfs SOURCE MOUNTPOINT -o OPT,OPT,...`; every long option above is an -o key,
  spelt with - or _ (endpoint_url=URL, read_only, ...). An fstab line:

    my-bucket /home/me/data fuse.bucketfs _netdev,nofail,endpoint_url=http://localhost:9000,access_key_file=/etc/bucketfs/ak,secret_key_file=/etc/bucketfs/sk 0 0

  It runs in the background (-o foreground to stay), logging to syslog or log_file=PATH. ro, rw, noexec and
  allow_other are honoured; _netdev, nofail, auto, noauto, user, users, defaults, x-systemd.* and x-* options,
  dev, suid, atime options and sync are ignored (mounts are always nosuid,nodev). An unknown option is an error
  naming it (exit 2). Keep secrets out of fstab: use key files, or the AWS environment or profile.";

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// Files or directories on a bucketfs mount.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Files read at once.
    #[arg(long, short = 'j', default_value_t = 8)]
    pub jobs: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// BUCKET[/PREFIX] or s3://BUCKET[/PREFIX] to check (or use --config for a Fluid config).
    pub source: Option<String>,
    /// A Fluid config to check (default locations as for `bucketfs fluid` when no SOURCE is given).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also create and delete a small test object.
    #[arg(long)]
    pub write_test: bool,
    /// The directory you would mount on (SOURCE mode).
    #[arg(long)]
    pub mountpoint: Option<PathBuf>,
    /// Instead of the checks: list the multipart uploads under the prefix that were never completed or aborted, and abort those older than --older-than.
    #[arg(long)]
    pub abort_incomplete_uploads: bool,
    /// With --abort-incomplete-uploads: abort only uploads started longer ago than this, e.g. 1d, 6h; 0 aborts all, including uploads a running mount is still sending.
    #[arg(long, default_value = "1d", value_parser = spec::parse_duration, requires = "abort_incomplete_uploads")]
    pub older_than: std::time::Duration,
    /// With --abort-incomplete-uploads: list only, abort nothing.
    #[arg(long, requires = "abort_incomplete_uploads")]
    pub dry_run: bool,
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Args, Debug)]
pub struct FluidArgs {
    /// Config file (default: $BUCKETFS_FLUID_CONFIG, /etc/fluid/config/config.json, /etc/fluid/config.json).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Config file (default as for `bucketfs fluid`); $MOUNT_POINT is used when there is none.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Path to check instead of the config's targetPath.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// How long `stat` may take.
    #[arg(long, default_value = "5s", value_parser = spec::parse_duration)]
    pub timeout: std::time::Duration,
}

/// Logging options.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log format: text, or json for log collectors.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Append logs to this file instead of stderr (with --background the default is syslog).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
}

/// How to reach the server: shared by every command that talks to one.
#[derive(Args, Debug, Clone)]
pub struct S3Args {
    /// S3 endpoint, e.g. http://localhost:9000 for MinIO. Implies path-style addressing.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// Region (default: from the AWS configuration, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Path-style addressing (bucket in the path); always on when --endpoint-url is given.
    #[arg(long)]
    pub force_path_style: bool,
    /// File holding the access key id (instead of the AWS credential chain).
    #[arg(long, requires = "secret_key_file")]
    pub access_key_file: Option<PathBuf>,
    /// File holding the secret access key.
    #[arg(long, requires = "access_key_file")]
    pub secret_key_file: Option<PathBuf>,
    /// PEM file with extra CA certificates to trust for HTTPS endpoints.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Bound on opening a connection, per attempt (0: none).
    #[arg(long, default_value = "3s", value_parser = spec::parse_duration)]
    pub connect_timeout: std::time::Duration,
    /// Bound on one attempt up to the response headers, connecting included (0: none); uploads, copies and completing a multipart upload get longer bounds.
    #[arg(long, default_value = "5s", value_parser = spec::parse_duration)]
    pub first_byte_timeout: std::time::Duration,
    /// A response body that sends no byte for this long fails (0: none); a body that keeps moving is never cut.
    #[arg(long, default_value = "10s", value_parser = spec::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// One bound on every attempt of every request, uploads included, instead of the first-byte timeout and the bounds derived from it, e.g. 20s.
    #[arg(long, value_parser = spec::parse_duration)]
    pub request_timeout: Option<std::time::Duration>,
    /// Attempts per request, including the first (retries back off with jitter).
    #[arg(long, default_value_t = spec::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,
    /// Whether the server is on this host or a LAN away, where sequential reads use fewer, larger GETs: auto (told by how quickly it answers; never for AWS endpoints), yes or no.
    #[arg(long, default_value = "auto", value_parser = spec::parse_near_server)]
    pub near_server: spec::NearServer,
}

impl S3Args {
    pub fn settings(&self) -> S3Settings {
        let credentials = match (&self.access_key_file, &self.secret_key_file) {
            (Some(a), Some(s)) => CredentialSource::Keys {
                access_key: SecretValue::File(a.clone()),
                secret_key: SecretValue::File(s.clone()),
            },
            _ => CredentialSource::Chain,
        };
        let endpoint = self.endpoint_url.clone().filter(|e| !e.trim().is_empty());
        S3Settings {
            path_style: self.force_path_style || endpoint.is_some(),
            endpoint,
            region: self.region.clone(),
            ca_bundle: self.ca_bundle.clone(),
            credentials,
            connect_timeout: self.connect_timeout,
            first_byte_timeout: self.first_byte_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            max_attempts: self.max_attempts.max(1),
            near_server: self.near_server,
        }
    }

    /// The one mount of `source` with these settings.
    pub fn spec(&self, source: &str, read_only: bool, metadata_ttl: std::time::Duration) -> anyhow::Result<MountSpec> {
        let source: Source = source.parse()?;
        Ok(MountSpec {
            name: source.bucket.clone(),
            path: Vec::new(),
            source,
            s3: self.settings(),
            read_only,
            metadata_ttl,
        })
    }
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// BUCKET, BUCKET/PREFIX, s3://BUCKET[/PREFIX] or minio://BUCKET[/PREFIX].
    pub source: String,
    /// An existing directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub s3: S3Args,
    /// Mount read-only: every change fails with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Mount with noexec: files on the mount cannot be executed.
    #[arg(long)]
    pub no_exec: bool,
    /// Return once the mount answers and serve it from a background process; on failure,
    /// the same one-line error and exit code 2 as in the foreground. Logs go to --log-file, else syslog.
    #[arg(long)]
    pub background: bool,
    /// Let other users (and containers running as other uids) use the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Owner of every file and directory (default: the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group of every file and directory (default: the mounting user's group).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Permission bits of files, in octal.
    #[arg(long, default_value = "0644", value_parser = spec::parse_mode)]
    pub file_mode: u16,
    /// Permission bits of directories, in octal.
    #[arg(long, default_value = "0755", value_parser = spec::parse_mode)]
    pub dir_mode: u16,
    /// How long metadata and listings are trusted: e.g. 1s, 5m, or "indefinite" for immutable data.
    #[arg(long, default_value = "1s", value_parser = spec::parse_ttl)]
    pub metadata_ttl: std::time::Duration,
    /// Memory budget shared by prefetching, the block cache and write buffers, e.g. 512MiB.
    #[arg(long, default_value = "512MiB", value_parser = spec::parse_size)]
    pub memory_limit: u64,
    /// Kernel readahead of the mount, e.g. 1MiB: sequential reads reach bucketfs as requests this large (needs root to set; 0 keeps the kernel's 128 KiB).
    #[arg(long, default_value = "1MiB", value_parser = spec::parse_size)]
    pub read_ahead: u64,
    /// Serve Prometheus /metrics and /healthz on this address, e.g. 127.0.0.1:9567 (off by default).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Directory for the persistent block cache and staging files of writes (default: no disk cache, staging in the system temp dir).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Bound on the disk cache in --cache-dir, e.g. 20GiB (default: 10% of that file system).
    #[arg(long, value_parser = spec::parse_size)]
    pub max_cache_size: Option<u64>,
    /// Store modes, owners, times, symlinks and user.* xattrs in object metadata, in s3fs's format (x-amz-meta-mode, -uid, -gid, -mtime, ...); costs a HEAD per file for stat.
    #[arg(long)]
    pub posix_metadata: bool,
    /// Never hand files to the kernel for passthrough: every read of a file cached whole in --cache-dir, and every write of an edit, goes through bucketfs.
    #[arg(long)]
    pub no_passthrough: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

impl MountArgs {
    /// Turns the arguments into the file-system settings and the one mount.
    pub fn to_specs(&self) -> anyhow::Result<(FsSettings, MountSpec)> {
        let spec = self.s3.spec(&self.source, self.read_only, self.metadata_ttl)?;
        let defaults = FsSettings::default();
        let settings = FsSettings {
            uid: self.uid.unwrap_or(defaults.uid),
            gid: self.gid.unwrap_or(defaults.gid),
            file_mode: self.file_mode,
            dir_mode: self.dir_mode,
            allow_other: self.allow_other,
            read_only: self.read_only,
            no_exec: self.no_exec,
            memory_limit: self.memory_limit,
            read_ahead: self.read_ahead,
            cache_dir: self.cache_dir.clone(),
            max_cache_size: self.max_cache_size,
            posix_metadata: self.posix_metadata,
            passthrough: !self.no_passthrough,
        };
        Ok((settings, spec))
    }
}
