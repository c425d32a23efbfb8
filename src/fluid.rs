//! Fluid ThinRuntime mode: turns Fluid's `config.json` (and the secret files
//! it points at) into [`MountSpec`]s. The contract is in the project's
//! `docs/fluid.md`; in short:
//!
//! - the config is one JSON object, parsed whole and tolerantly (unknown keys
//!   ignored, any whitespace, Go's `\u0026`-style escapes);
//! - each `mounts[]` entry is a bucket (`minio://b[/p]`, `s3://b[/p]`, `b`);
//!   one mount with an empty path is the root of `targetPath`, otherwise each
//!   mount sits at its `path`, or at `/<name>`;
//! - credentials are option values that are either literals or paths of
//!   secret files, read fresh whenever they are needed;
//! - the whole file system is read-only unless `accessModes` has a
//!   `ReadWrite*` mode (or, without `accessModes`, unless `MOUNT_OPTIONS`
//!   lacks `ro`), and a mount's `readOnly` makes its subtree read-only.
//!
//! Every problem is reported as one line naming the field or file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::spec::{
    self, CredentialSource, DEFAULT_METADATA_TTL, FsSettings, MountSpec, S3Settings, SecretValue, Source,
};

/// Where Fluid puts the config, newest layout first.
pub const CONFIG_PATHS: [&str; 2] = ["/etc/fluid/config/config.json", "/etc/fluid/config.json"];
/// Environment variable that overrides the config path.
pub const CONFIG_ENV: &str = "BUCKETFS_FLUID_CONFIG";

#[derive(Deserialize, Debug)]
struct RawConfig {
    #[serde(default)]
    mounts: Option<Vec<RawMount>>,
    #[serde(rename = "targetPath")]
    target_path: Option<String>,
    #[serde(rename = "runtimeOptions", default)]
    runtime_options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "accessModes")]
    access_modes: Option<Vec<String>>,
}

#[derive(Deserialize, Debug)]
struct RawMount {
    #[serde(rename = "mountPoint")]
    mount_point: Option<String>,
    #[serde(default)]
    options: Option<BTreeMap<String, Value>>,
    name: Option<String>,
    path: Option<String>,
    #[serde(rename = "readOnly", default)]
    read_only: Option<bool>,
}

/// Everything `bucketfs fluid` needs to serve.
#[derive(Debug, Clone)]
pub struct FluidPlan {
    pub target_path: PathBuf,
    pub settings: FsSettings,
    pub mounts: Vec<MountSpec>,
    /// Read-only because of the access modes (not only because writes are
    /// not implemented).
    pub read_only_by_access_mode: bool,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Option keys that were not understood, for one warning each.
    pub unknown_options: Vec<String>,
}

/// Finds the config file: the flag, then `$BUCKETFS_FLUID_CONFIG`, then
/// Fluid's two locations.
pub fn find_config(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    for p in CONFIG_PATHS {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("no Fluid config found: looked at {} and {} (set --config or {CONFIG_ENV})", CONFIG_PATHS[0], CONFIG_PATHS[1])
}

/// Only the `targetPath` of a config file (for the readiness probe, which
/// must not depend on secrets being readable).
pub fn target_path(path: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read Fluid config {}", path.display()))?;
    let v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("Fluid config {}: not valid JSON", path.display()))?;
    v.get("targetPath")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
        .with_context(|| format!("Fluid config {}: targetPath is missing", path.display()))
}

/// Reads and plans a config file. `mount_options` is `$MOUNT_OPTIONS`.
pub fn load(path: &Path, mount_options: Option<&str>) -> anyhow::Result<FluidPlan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read Fluid config {}", path.display()))?;
    plan(&text, mount_options).with_context(|| format!("Fluid config {}", path.display()))
}

/// A user-provided string made safe for a one-line message.
fn esc(s: &str) -> String {
    s.escape_debug().to_string()
}

fn scalar(field: &str, v: &Value) -> anyhow::Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        _ => bail!("{field} must be a string"),
    })
}

fn string_map(field: &str, m: Option<BTreeMap<String, Value>>) -> anyhow::Result<BTreeMap<String, String>> {
    m.unwrap_or_default().iter().map(|(k, v)| Ok((k.clone(), scalar(&format!("{field}.{}", esc(k)), v)?))).collect()
}

/// Parses `MOUNT_OPTIONS`: comma-separated `k=v` or bare `k`, in any order.
pub fn parse_mount_options(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (t.to_string(), String::new()),
        })
        .collect()
}

/// Whether the access modes (or, without them, `MOUNT_OPTIONS`) make the
/// whole file system read-only.
pub fn read_only_from(access_modes: Option<&[String]>, mount_options: Option<&str>) -> bool {
    match access_modes {
        Some(modes) => !modes.iter().any(|m| m.starts_with("ReadWrite")),
        None => mount_options.is_some_and(|o| parse_mount_options(o).contains_key("ro")),
    }
}

fn flag(field: &str, v: &str) -> anyhow::Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => bail!("{field}: expected true or false, got {v:?}"),
    }
}

/// Normalises a mount path into components; rejects `..` and `.`.
fn path_components(field: &str, path: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" => {}
            "." | ".." => bail!("{field}: {path:?} may not contain '.' or '..'"),
            c if !crate::fs::namespace::valid_name(c) => {
                bail!("{field}: {path:?} has an invalid component")
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

const ENDPOINT_KEYS: [&str; 4] = ["minio-url", "endpoint", "url", "endpoint-url"];
const CREDENTIAL_PAIRS: [(&str, &str); 3] =
    [("minio-access-key", "minio-access-secret"), ("access-key", "secret-key"), ("access-key-id", "secret-access-key")];
const TTL_KEYS: [&str; 3] = ["metadata-ttl", "attr-timeout", "stat-cache-ttl"];
const MOUNT_KEYS: [&str; 10] = [
    "region",
    "path-style",
    "force-path-style",
    "ca-bundle",
    "connect-timeout",
    "first-byte-timeout",
    "idle-timeout",
    "request-timeout",
    "max-attempts",
    "near-server",
];
const FS_KEYS: [&str; 11] = [
    "uid",
    "gid",
    "file-mode",
    "dir-mode",
    "allow-other",
    "memory-limit",
    "read-ahead",
    "log-level",
    "log-format",
    "read-only",
    "posix-metadata",
];

fn known_mount_key(k: &str) -> bool {
    ENDPOINT_KEYS.contains(&k)
        || CREDENTIAL_PAIRS.iter().any(|(a, s)| *a == k || *s == k)
        || TTL_KEYS.contains(&k)
        || MOUNT_KEYS.contains(&k)
        || k == "read-only"
}

/// Plans a config from its text.
pub fn plan(text: &str, mount_options: Option<&str>) -> anyhow::Result<FluidPlan> {
    let value: Value = serde_json::from_str(text.trim()).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    if !value.is_object() {
        bail!("not a JSON object: the config must be {{\"mounts\": [...], \"targetPath\": ...}}");
    }
    let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("{}: {}", if path == "." { "the top level".to_string() } else { esc(&path) }, e.inner())
    })?;
    let target = raw.target_path.filter(|t| !t.trim().is_empty()).context("targetPath is missing or empty")?;
    let target_path = PathBuf::from(target.trim());
    if !target_path.is_absolute() {
        bail!("targetPath {target:?} is not an absolute path");
    }
    let mut unknown = BTreeSet::new();

    // File-system-wide options: MOUNT_OPTIONS as a fallback, runtimeOptions win.
    let mut fs_opts: BTreeMap<String, String> = mount_options.map(parse_mount_options).unwrap_or_default();
    fs_opts.remove("ro");
    fs_opts.remove("rw");
    fs_opts.extend(string_map("runtimeOptions", raw.runtime_options)?);
    let defaults = FsSettings::default();
    let mut settings = FsSettings { allow_other: true, ..defaults };
    let mut default_ttl = DEFAULT_METADATA_TTL;
    let mut log_level = None;
    let mut log_format = None;
    let mut fs_read_only = false;
    let mut metrics_addr = None;
    for (k, v) in &fs_opts {
        let field = format!("runtimeOptions.{}", esc(k));
        match k.as_str() {
            "uid" => settings.uid = v.trim().parse().with_context(|| format!("{field}: not a number: {v:?}"))?,
            "gid" => settings.gid = v.trim().parse().with_context(|| format!("{field}: not a number: {v:?}"))?,
            "file-mode" => settings.file_mode = spec::parse_mode(v).with_context(|| field.clone())?,
            "dir-mode" => settings.dir_mode = spec::parse_mode(v).with_context(|| field.clone())?,
            "allow-other" => settings.allow_other = flag(&field, v)?,
            "memory-limit" => settings.memory_limit = spec::parse_size(v).with_context(|| field.clone())?,
            "read-ahead" => settings.read_ahead = spec::parse_size(v).with_context(|| field.clone())?,
            "log-level" => log_level = Some(v.clone()),
            "log-format" => log_format = Some(v.clone()),
            "read-only" => fs_read_only = flag(&field, v)?,
            "posix-metadata" => settings.posix_metadata = flag(&field, v)?,
            "metrics-addr" => {
                metrics_addr = Some(
                    v.trim().parse().with_context(|| format!("{field}: not an address such as 0.0.0.0:9567: {v:?}"))?,
                )
            }
            "cache-dir" => settings.cache_dir = Some(PathBuf::from(v.trim())),
            "no-passthrough" => settings.passthrough = !flag(&field, v)?,
            "max-cache-size" => settings.max_cache_size = Some(spec::parse_size(v).with_context(|| field.clone())?),
            k if TTL_KEYS.contains(&k) => default_ttl = spec::parse_ttl(v).with_context(|| field.clone())?,
            k if k.starts_with("fluid.") => {}
            k if known_mount_key(k) => {} // a per-mount option given for all; applied below
            _ => {
                unknown.insert(field);
            }
        }
    }
    let access_ro = read_only_from(raw.access_modes.as_deref(), mount_options);
    settings.read_only = access_ro || fs_read_only;

    let raw_mounts = raw.mounts.unwrap_or_default();
    let single_root =
        raw_mounts.len() == 1 && raw_mounts[0].path.as_deref().is_none_or(|p| p.trim_matches('/').is_empty());
    let mut mounts = Vec::new();
    let mut seen_paths = BTreeSet::new();
    for (i, m) in raw_mounts.into_iter().enumerate() {
        let label = match &m.name {
            Some(n) if !n.is_empty() => format!("mounts[{i}] ({n:?})"),
            _ => format!("mounts[{i}]"),
        };
        let mount_point = m
            .mount_point
            .filter(|s| !s.trim().is_empty())
            .with_context(|| format!("{label}: mountPoint is missing"))?;
        let source: Source = mount_point.parse().with_context(|| format!("{label}: mountPoint {mount_point:?}"))?;
        // runtimeOptions give defaults for per-mount keys; the mount's own options win.
        let mut opts: BTreeMap<String, String> =
            fs_opts.iter().filter(|(k, _)| known_mount_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        opts.extend(string_map(&format!("{label}.options"), m.options)?);
        let get = |k: &str| opts.get(k).map(|v| v.trim().to_string());

        let endpoint = ENDPOINT_KEYS.iter().find_map(|k| get(k)).filter(|e| !e.is_empty());
        let credentials = match CREDENTIAL_PAIRS.iter().find(|(a, s)| opts.contains_key(*a) || opts.contains_key(*s)) {
            Some((a, s)) => {
                let access = opts.get(*a).with_context(|| format!("{label}: {s} is set but {a} is missing"))?;
                let secret = opts.get(*s).with_context(|| format!("{label}: {a} is set but {s} is missing"))?;
                let access_key = secret_value(&label, a, access)?;
                let secret_key = secret_value(&label, s, secret)?;
                let creds = CredentialSource::Keys { access_key, secret_key };
                creds.static_keys().with_context(|| format!("{label}: credentials"))?;
                creds
            }
            None => CredentialSource::Chain,
        };
        let mut s3 = S3Settings { path_style: endpoint.is_some(), endpoint, credentials, ..S3Settings::default() };
        let mut ttl = default_ttl;
        let mut read_only = m.read_only.unwrap_or(false);
        for (k, v) in &opts {
            let field = format!("{label}.options.{}", esc(k));
            match k.as_str() {
                "region" => s3.region = Some(v.trim().to_string()).filter(|r| !r.is_empty()),
                "path-style" | "force-path-style" => s3.path_style = flag(&field, v)?,
                "ca-bundle" => s3.ca_bundle = Some(PathBuf::from(v.trim())),
                "connect-timeout" => s3.connect_timeout = spec::parse_duration(v).with_context(|| field.clone())?,
                "first-byte-timeout" => {
                    s3.first_byte_timeout = spec::parse_duration(v).with_context(|| field.clone())?
                }
                "idle-timeout" => s3.idle_timeout = spec::parse_duration(v).with_context(|| field.clone())?,
                "request-timeout" => s3.request_timeout = Some(spec::parse_duration(v).with_context(|| field.clone())?),
                "max-attempts" => {
                    s3.max_attempts = v.trim().parse::<u32>().with_context(|| format!("{field}: not a number"))?.max(1)
                }
                "near-server" => s3.near_server = spec::parse_near_server(v).with_context(|| field.clone())?,
                "read-only" => read_only |= flag(&field, v)?,
                k if TTL_KEYS.contains(&k) => ttl = spec::parse_ttl(v).with_context(|| field.clone())?,
                k if known_mount_key(k) || k.starts_with("fluid.") => {}
                k if FS_KEYS.contains(&k) => {
                    unknown.insert(format!("{field} (set it in the ThinRuntime's spec.fuse.options)"));
                }
                _ => {
                    unknown.insert(field);
                }
            }
        }
        let path = if single_root {
            Vec::new()
        } else {
            let raw_path = m.path.clone().unwrap_or_default();
            let mut comps = path_components(&format!("{label}.path"), &raw_path)?;
            if comps.is_empty() {
                if !raw_path.trim().is_empty() {
                    bail!("{label}: path \"/\" is only allowed when the dataset has a single mount");
                }
                let name = m
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .with_context(|| format!("{label}: has neither path nor name"))?;
                comps = path_components(&format!("{label}.name"), &name)?;
                if comps.len() != 1 {
                    bail!("{label}: name {name:?} is not a valid directory name");
                }
            }
            comps
        };
        let joined = esc(&path.join("/"));
        if !seen_paths.insert(joined.clone()) {
            bail!("{label}: path /{joined} is used by another mount");
        }
        mounts.push(MountSpec {
            name: m.name.filter(|n| !n.is_empty()).unwrap_or_else(|| source.bucket.clone()),
            path,
            source,
            s3,
            read_only: read_only || settings.read_only,
            metadata_ttl: ttl,
        });
    }
    // A mount inside another mount's directory would hide part of a bucket.
    for a in &mounts {
        for b in &mounts {
            if a.path.len() < b.path.len() && b.path.starts_with(&a.path) {
                bail!(
                    "mount {:?} at /{} lies inside mount {:?} at /{}",
                    b.name,
                    esc(&b.path.join("/")),
                    a.name,
                    esc(&a.path.join("/"))
                );
            }
        }
    }
    Ok(FluidPlan {
        target_path,
        settings,
        mounts,
        read_only_by_access_mode: access_ro,
        log_level,
        log_format,
        metrics_addr,
        unknown_options: unknown.into_iter().collect(),
    })
}

/// A credential option: a secret file path (Fluid's encrypt options) or a
/// literal (secret storage mode). An absolute path whose directory exists is
/// taken as a file, so a missing key file is an error, not a wrong key.
fn secret_value(label: &str, key: &str, value: &str) -> anyhow::Result<SecretValue> {
    let path = Path::new(value.trim());
    if path.is_absolute()
        && (path.exists() || path.starts_with("/etc/fluid/secrets") || path.parent().is_some_and(Path::exists))
    {
        if !path.is_file() {
            bail!("{label}: secret file {} for option {key} does not exist", esc(&path.to_string_lossy()));
        }
        return Ok(SecretValue::File(path.to_path_buf()));
    }
    Ok(SecretValue::from_option(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EX1: &str = include_str!("../tests/data/fluid/01-single-minio.json");
    const EX2: &str = include_str!("../tests/data/fluid/02-two-mounts-rwx.json");
    const EX3: &str = include_str!("../tests/data/fluid/03-runtime-options.json");
    const EX4: &str = include_str!("../tests/data/fluid/04-no-mounts.json");
    const EX5: &str = include_str!("../tests/data/fluid/05-single-minio-secret-storage.json");

    /// Replaces Fluid's secret paths with files in a temp dir.
    fn with_secrets(text: &str, dir: &Path) -> String {
        let mut out = text.to_string();
        for (name, key, value) in [
            ("minio-secret", "minio-access-key", "minioadmin"),
            ("minio-secret", "minio-access-secret", "minioadmin-secret"),
            ("s3-cred", "accessKey", "AK"),
            ("s3-cred", "secretKey", "SK"),
            ("shared-cred", "ak", "AK2"),
            ("logs-cred", "sk", "SK2"),
        ] {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(key), format!("{value}\n")).unwrap();
            out = out.replace(&format!("/etc/fluid/secrets/{name}/{key}"), d.join(key).to_str().unwrap());
        }
        out
    }

    #[test]
    fn single_minio_mount_is_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&with_secrets(EX1, dir.path()), None).unwrap();
        assert_eq!(p.target_path, PathBuf::from("/runtime-mnt/thin/default/minio-demo/thin-fuse"));
        assert_eq!(p.mounts.len(), 1);
        let m = &p.mounts[0];
        assert!(m.path.is_empty());
        assert_eq!((m.source.bucket.as_str(), m.source.prefix.as_str()), ("my-first-bucket", ""));
        assert_eq!(m.s3.endpoint.as_deref(), Some("http://minio:9000"));
        assert!(m.s3.path_style);
        assert_eq!(m.s3.near_server, crate::spec::NearServer::Auto);
        let with_near = EX1.replace("\"options\":{", "\"options\":{\"near-server\":\"no\",");
        assert_ne!(with_near, EX1);
        let p = plan(&with_secrets(&with_near, dir.path()), None).unwrap();
        assert_eq!(p.mounts[0].s3.near_server, crate::spec::NearServer::No);
        assert_eq!(m.s3.credentials.static_keys().unwrap(), Some(("minioadmin".into(), "minioadmin-secret".into())));
        assert!(p.settings.read_only && p.settings.allow_other);
        assert!(!format!("{p:?}").contains("minioadmin"), "a secret leaked into Debug output");
    }

    #[test]
    fn two_mounts_at_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&with_secrets(EX2, dir.path()), None).unwrap();
        assert!(!p.read_only_by_access_mode);
        let paths: Vec<_> = p.mounts.iter().map(|m| m.path.join("/")).collect();
        assert_eq!(paths, ["imagenet", "ckpt"]);
        assert!(p.mounts[0].read_only && !p.settings.read_only);
        assert_eq!(p.mounts[0].source.prefix, "imagenet/train/");
        assert_eq!(p.mounts[1].s3.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn runtime_options_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p =
            plan(&with_secrets(EX3, dir.path()), Some("uid=1000,ro,allow-other,gid=1000,attr-timeout=60s")).unwrap();
        assert_eq!((p.settings.uid, p.settings.gid), (1000, 1000));
        assert_eq!(p.settings.read_ahead, crate::spec::DEFAULT_READ_AHEAD);
        let p = plan(&with_secrets(EX3, dir.path()), Some("read-ahead=4MiB")).unwrap();
        assert_eq!(p.settings.read_ahead, 4 << 20);
        let e = plan(&with_secrets(EX3, dir.path()), Some("read-ahead=lots")).unwrap_err();
        assert!(format!("{e:#}").contains("read-ahead"), "{e:#}");
        assert!(p.settings.allow_other);
        assert_eq!(p.mounts[0].metadata_ttl, std::time::Duration::from_secs(60));
        assert_eq!(p.mounts[0].source.prefix, "2024/");
        assert!(p.unknown_options.is_empty(), "{:?}", p.unknown_options);
    }

    #[test]
    fn no_mounts_and_secret_storage_and_variants() {
        let p = plan(EX4, None).unwrap();
        assert!(p.mounts.is_empty());
        let p = plan(EX5, None).unwrap();
        assert_eq!(p.mounts[0].s3.credentials.static_keys().unwrap(), Some(("minioadmin".into(), "minioadmin".into())));
        // Pretty-printed, trailing newline, unknown keys, escapes, no name, no accessModes, no mounts key.
        let text = "{\n  \"mounts\": [ { \"mountPoint\": \"s3://b/p\", \"options\": {\"endpoint\": \"http://h:1/?a=1\\u0026b=2\", \"fluid.fuse.hostvolume\": \"/x\"}, \"extra\": 1 } ],\n  \"targetPath\": \"/t\", \"future\": {\"x\": [1]}\n}\n";
        let p = plan(text, None).unwrap();
        assert_eq!(p.mounts[0].s3.endpoint.as_deref(), Some("http://h:1/?a=1&b=2"));
        assert!(!p.settings.read_only, "no accessModes and no MOUNT_OPTIONS: read-write");
        assert!(p.unknown_options.is_empty());
        let p = plan("{\"targetPath\":\"/t\"}", Some("ro")).unwrap();
        assert!(p.mounts.is_empty() && p.settings.read_only);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            ("not json", "not valid JSON"),
            ("{\"mounts\":[]}", "targetPath"),
            ("{\"targetPath\":\"rel\"}", "absolute"),
            ("{\"targetPath\":\"/t\",\"mounts\":[{\"name\":\"x\"}]}", "mounts[0] (\"x\"): mountPoint is missing"),
            ("{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"s3://\"}]}", "no bucket"),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"path\":\"/x\"},{\"mountPoint\":\"b\",\"path\":\"x/\"}]}",
                "used by another mount",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"path\":\"/../x\"},{\"mountPoint\":\"b\",\"name\":\"b\"}]}",
                "'..'",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"path\":\"/\"},{\"mountPoint\":\"b\",\"name\":\"b\"}]}",
                "single mount",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"path\":\"/x\"},{\"mountPoint\":\"b\",\"path\":\"/x/y\"}]}",
                "inside",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"options\":{\"access-key\":\"/etc/fluid/secrets/nope/ak\",\"secret-key\":\"s\"}}]}",
                "secret file /etc/fluid/secrets/nope/ak for option access-key does not exist",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"options\":{\"access-key\":\"AK\"}}]}",
                "secret-key is missing",
            ),
            ("{\"targetPath\":\"/t\",\"runtimeOptions\":{\"uid\":\"root\"}}", "runtimeOptions.uid"),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"options\":{\"metadata-ttl\":\"soon\"}}]}",
                "options.metadata-ttl",
            ),
            (
                "{\"targetPath\":\"/t\",\"mounts\":[{\"mountPoint\":\"a\",\"options\":{\"near-server\":\"maybe\"}}]}",
                "options.near-server: \"maybe\" is not one of auto, yes, no",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", plan(text, None).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains('\n'), "not one line: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_reported_once_and_fluid_keys_ignored() {
        let text = "{\"targetPath\":\"/t\",\"runtimeOptions\":{\"bogus\":\"1\",\"fluid.x\":\"y\"},\"mounts\":[{\"mountPoint\":\"a\",\"options\":{\"whatever\":\"1\",\"uid\":\"5\",\"fluid.fuse.hostvolume\":\"/h\"}}]}";
        let p = plan(text, None).unwrap();
        assert_eq!(p.unknown_options.len(), 3, "{:?}", p.unknown_options);
        assert!(p.unknown_options.iter().any(|u| u.contains("runtimeOptions.bogus")));
        assert!(p.unknown_options.iter().any(|u| u.contains("options.uid") && u.contains("spec.fuse.options")));
    }

    #[test]
    fn access_modes_decide_read_only() {
        let modes = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(read_only_from(Some(&modes(&["ReadOnlyMany"])), None));
        assert!(!read_only_from(Some(&modes(&["ReadWriteMany"])), Some("ro")));
        assert!(!read_only_from(Some(&modes(&["ReadOnlyMany", "ReadWriteOncePod"])), None));
        assert!(read_only_from(None, Some("uid=1,ro")));
        assert!(!read_only_from(None, Some("uid=1")));
        assert!(!read_only_from(None, None));
        assert_eq!(
            parse_mount_options("b=2,ro, a=1 ,c"),
            BTreeMap::from([
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), String::new()),
                ("ro".to_string(), String::new())
            ])
        );
    }

    #[test]
    fn secret_files_follow_kubelet_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let ts = dir.path().join("..2026_01_01_00_00_00.000000001");
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("ak"), "AKV\n").unwrap();
        std::fs::write(ts.join("sk"), "SKV\r\n").unwrap();
        std::os::unix::fs::symlink(&ts, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/ak", dir.path().join("ak")).unwrap();
        std::os::unix::fs::symlink("..data/sk", dir.path().join("sk")).unwrap();
        let text = format!(
            "{{\"targetPath\":\"/t\",\"mounts\":[{{\"mountPoint\":\"b\",\"options\":{{\"access-key\":\"{0}/ak\",\"secret-key\":\"{0}/sk\"}}}}]}}",
            dir.path().display()
        );
        let p = plan(&text, None).unwrap();
        assert_eq!(p.mounts[0].s3.credentials.static_keys().unwrap(), Some(("AKV".into(), "SKV".into())));
    }
}
