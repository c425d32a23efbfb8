//! `bucketfs fluid` against the Fluid ThinRuntime contract (docs/fluid.md),
//! through real FUSE mounts on a real S3 server, with kubelet-style config
//! and secret directories.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A fake FUSE container: `/etc/fluid/config`, `/etc/fluid/secrets/<s>` and
/// the runtime-mnt parent, all under one temp dir.
struct FluidEnv {
    dir: tempfile::TempDir,
    config_dir: PathBuf,
    secrets: PathBuf,
    target: PathBuf,
    generation: u32,
}

impl FluidEnv {
    fn new(name: &str) -> FluidEnv {
        let dir = tempfile::tempdir().unwrap();
        let config_dir = dir.path().join("etc/fluid/config");
        std::fs::create_dir_all(&config_dir).unwrap();
        let secrets = dir.path().join("etc/fluid/secrets/minio-secret");
        std::fs::create_dir_all(&secrets).unwrap();
        // dirname(targetPath) exists (a hostPath); targetPath itself does not.
        let parent = dir.path().join(format!("runtime-mnt/thin/default/{name}"));
        std::fs::create_dir_all(&parent).unwrap();
        let target = parent.join("thin-fuse");
        let mut env = FluidEnv { dir, config_dir, secrets, target, generation: 0 };
        env.write_secrets(ACCESS_KEY, SECRET_KEY);
        env
    }

    /// Swaps a directory's content the way kubelet does: a new timestamped
    /// directory, `..data_tmp` pointing at it, renamed over `..data`.
    fn kubelet_swap(&mut self, dir: &Path, files: &[(&str, String)]) {
        self.generation += 1;
        let ts = format!("..2026_01_01_00_00_{:02}.{:09}", self.generation, self.generation);
        std::fs::create_dir(dir.join(&ts)).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(&ts).join(name), content).unwrap();
        }
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
            }
        }
    }

    fn write_secrets(&mut self, ak: &str, sk: &str) {
        let dir = self.secrets.clone();
        self.kubelet_swap(&dir, &[("minio-access-key", format!("{ak}\n")), ("minio-access-secret", format!("{sk}\n"))]);
    }

    fn write_config(&mut self, json: &str) {
        let dir = self.config_dir.clone();
        self.kubelet_swap(&dir, &[("config.json", json.to_string())]);
    }

    fn config_path(&self) -> PathBuf {
        self.config_dir.join("config.json")
    }

    fn key_path(&self, k: &str) -> String {
        self.secrets.join(k).to_str().unwrap().to_string()
    }

    /// The goofys-flow config: one minio:// mount with file credentials.
    fn minio_config(&self, bucket: &str, endpoint: &str, modes: &str) -> String {
        format!(
            r#"{{"mounts":[{{"mountPoint":"minio://{bucket}","options":{{"minio-access-key":"{}","minio-access-secret":"{}","minio-url":"{endpoint}"}},"name":"minio"}}],"targetPath":"{}","accessModes":[{modes}]}}"#,
            self.key_path("minio-access-key"),
            self.key_path("minio-access-secret"),
            self.target.display()
        )
    }

    fn start(&self) -> Mount {
        let log_dir = tempfile::tempdir().unwrap();
        let args = vec!["fluid".to_string(), "--config".into(), self.config_path().to_str().unwrap().into()];
        let target = self.target.to_str().unwrap().to_string();
        Mount::spawn(
            log_dir,
            self.target.clone(),
            &args,
            &[("MOUNT_POINT", target.as_str()), ("FLUID_RUNTIME_TYPE", "thin"), ("MOUNT_OPTIONS", "ro")],
        )
    }

    fn run_expect_exit(&self) -> (i32, String) {
        let out = Command::new(bucketfs())
            .args(["fluid", "--config", self.config_path().to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn goofys_flow_mounts_at_target_root_and_passes_fluid_checks() {
    let srv = server();
    let bucket = srv.bucket("fluid-demo");
    srv.put(&bucket, "testfile", "hello fluid\n");
    srv.put(&bucket, "dir/nested", "n");
    let mut env = FluidEnv::new("demo");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let mut m = env.start();

    // CSI check_mount.sh: a mountinfo line with targetPath and the type, then stat.
    let lines = mountinfo_at(&env.target);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("bucketfs"), "{}", lines[0]);
    assert!(std::fs::metadata(&env.target).unwrap().is_dir());
    // Fluid's sidecar post-start check, with bash and the same greps.
    let parent = env.target.parent().unwrap();
    let check = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/check-mount.sh"))
        .args([parent.to_str().unwrap(), "bucketfs", "testfile"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));

    // The bucket is at the root of targetPath, as with goofys.
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "hello fluid\n");
    // The app sees it through a bind mount, as CSI hands it over (read-only for ROX).
    let app = env.dir.path().join("pod-volume");
    std::fs::create_dir(&app).unwrap();
    sh(&format!(
        "mount --bind {} {} && mount -o remount,bind,ro {}",
        env.target.display(),
        app.display(),
        app.display()
    ));
    let read = std::fs::read_to_string(app.join("dir/nested"));
    let write = std::fs::write(app.join("new"), "x");
    sh(&format!("umount {}", app.display()));
    assert_eq!(read.unwrap(), "n");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    // Read-only dataset: the FUSE mount itself refuses writes (sidecar mode has no ro bind).
    let err = std::fs::write(env.target.join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // `bucketfs probe` agrees.
    let probe =
        Command::new(bucketfs()).args(["probe", "--config", env.config_path().to_str().unwrap()]).output().unwrap();
    assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));

    assert_eq!(m.signal_and_wait(libc::SIGTERM), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&env.target).is_empty());
    let probe =
        Command::new(bucketfs()).args(["probe", "--config", env.config_path().to_str().unwrap()]).output().unwrap();
    assert_eq!(probe.status.code(), Some(1));
    let log = m.log_text();
    assert!(!log.contains(SECRET_KEY) && !log.contains(ACCESS_KEY), "a secret reached the log:\n{log}");
}

#[test]
fn several_mounts_share_one_session_with_read_only_subtrees() {
    let srv = server();
    let a = srv.bucket("fluid-a");
    let b = srv.bucket("fluid-b");
    srv.put(&a, "train/x.bin", "images");
    srv.put(&a, "other", "no");
    srv.put(&b, "run-42/ckpt", "weights");
    let mut env = FluidEnv::new("multi");
    let opts = format!(
        r#""options":{{"access-key":"{}","secret-key":"{}","endpoint":"{}"}}"#,
        env.key_path("minio-access-key"),
        env.key_path("minio-access-secret"),
        srv.endpoint
    );
    let cfg = format!(
        r#"{{"mounts":[{{"mountPoint":"s3://{a}/train","name":"imagenet","path":"/imagenet","readOnly":true,{opts}}},{{"mountPoint":"s3://{b}/run-42",{opts},"name":"ckpt"}}],"targetPath":"{}","accessModes":["ReadWriteMany"]}}"#,
        env.target.display()
    );
    env.write_config(&cfg);
    let _m = env.start();
    assert_eq!(mountinfo_at(&env.target).len(), 1, "one FUSE session for all mounts");
    let mut names: Vec<String> =
        std::fs::read_dir(&env.target).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ckpt", "imagenet"]);
    assert_eq!(std::fs::read_to_string(env.target.join("imagenet/x.bin")).unwrap(), "images");
    assert_eq!(std::fs::read_to_string(env.target.join("ckpt/ckpt")).unwrap(), "weights");
    assert!(std::fs::metadata(env.target.join("imagenet/other")).is_err());
    let err = std::fs::write(env.target.join("imagenet/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn kill_nine_then_restart_cleans_the_stale_mount() {
    let srv = server();
    let bucket = srv.bucket("fluid-crash");
    srv.put(&bucket, "testfile", "still here");
    let mut env = FluidEnv::new("crash");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let mut m = env.start();
    assert_eq!(m.signal_and_wait(libc::SIGKILL), None);
    // The mount is now dead: stat says ENOTCONN once cached attributes expire.
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::metadata(&env.target).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
    }));
    let m2 = env.start();
    assert!(wait_until(Duration::from_secs(10), || { std::fs::read_to_string(env.target.join("testfile")).is_ok() }));
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "still here");
    assert_eq!(mountinfo_at(&env.target).len(), 1, "exactly one live entry");
    assert!(m2.log_text().contains("dead mount"), "{}", m2.log_text());
    drop(m);
}

#[test]
fn external_umount_exits_zero() {
    let srv = server();
    let bucket = srv.bucket("fluid-umount");
    srv.put(&bucket, "testfile", "x");
    let mut env = FluidEnv::new("umount");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let mut m = env.start();
    // Fluid's default preStop: `umount <targetPath>`, no shell.
    assert!(Command::new("umount").arg(&env.target).status().unwrap().success());
    assert_eq!(m.wait_exit(), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&env.target).is_empty());
}

#[test]
fn sigterm_with_an_open_file_unmounts_and_exits_zero() {
    let srv = server();
    let bucket = srv.bucket("fluid-busy");
    srv.put(&bucket, "testfile", "busy");
    let mut env = FluidEnv::new("busy");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let mut m = env.start();
    let open = std::fs::File::open(env.target.join("testfile")).unwrap();
    assert_eq!(m.signal_and_wait(libc::SIGTERM), Some(0), "{}", m.log_text());
    assert!(mountinfo_at(&env.target).is_empty());
    drop(open);
}

#[test]
fn healthy_foreign_mount_is_left_alone() {
    let srv = server();
    let bucket = srv.bucket("fluid-foreign");
    srv.put(&bucket, "testfile", "first");
    let mut env = FluidEnv::new("foreign");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let first = env.start();
    let second = env.start_over();
    assert_eq!(mountinfo_at(&env.target).len(), 2, "the healthy mount must stay");
    assert!(second.log_text().contains("already mounted"), "{}", second.log_text());
    drop(second);
    assert_eq!(mountinfo_at(&env.target).len(), 1);
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "first");
    drop(first);
}

impl FluidEnv {
    /// Starts a second instance on a target that is already mounted.
    fn start_over(&self) -> Mount {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("bucketfs.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bucketfs())
            .args(["fluid", "--config", self.config_path().to_str().unwrap()])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "bucketfs=debug")
            .spawn()
            .unwrap();
        let baseline = mount_ids(&self.target);
        assert!(wait_until(Duration::from_secs(20), || mountinfo_at(&self.target).len() == 2));
        Mount { child: Some(child), baseline, dir: log_dir, mountpoint: self.target.clone(), log }
    }
}

#[test]
fn malformed_configs_exit_2_and_mount_nothing() {
    let srv = server();
    let bucket = srv.bucket("fluid-bad");
    let mut env = FluidEnv::new("bad");
    let missing_secret =
        env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"").replace("minio-access-secret\"}", "nope\"}");
    let cases = [
        ("this is not json".to_string(), "not valid JSON"),
        (r#"{"mounts":[]}"#.to_string(), "targetPath"),
        (format!(r#"{{"mounts":[{{"mountPoint":"minio://"}}],"targetPath":"{}"}}"#, env.target.display()), "mounts[0]"),
        (missing_secret.replace(&env.key_path("minio-access-secret"), &env.key_path("nope")), "does not exist"),
    ];
    for (cfg, want) in cases {
        env.write_config(&cfg);
        let (code, err) = env.run_expect_exit();
        assert_eq!(code, 2, "{cfg}: {err}");
        assert!(err.contains(want), "{cfg}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(mountinfo_at(&env.target).is_empty());
    }
    // No config at all.
    let out = Command::new(bucketfs()).args(["fluid", "--config", "/nonexistent/config.json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.json"));
}

#[test]
fn rotated_secret_works_without_restart() {
    let srv = server();
    let bucket = srv.bucket("fluid-rotate");
    srv.put(&bucket, "testfile", "rotated");
    let mut env = FluidEnv::new("rotate");
    env.write_secrets(ACCESS_KEY, "an-old-secret-that-was-revoked");
    let cfg = env.minio_config(&bucket, &srv.endpoint, "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    // Fluid mode mounts without waiting for the server.
    let m = env.start();
    let err = std::fs::read_to_string(env.target.join("testfile")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // Kubelet refreshes the Secret volume; the next denied request re-reads it.
    env.write_secrets(ACCESS_KEY, SECRET_KEY);
    std::thread::sleep(Duration::from_millis(1100)); // the negative lookup expires
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "rotated");
    let log = m.log_text();
    assert!(log.contains("credentials changed"), "{log}");
    assert!(!log.contains("an-old-secret-that-was-revoked") && !log.contains(SECRET_KEY), "secret in log:\n{log}");
}

#[test]
fn unreachable_server_mounts_promptly_and_fails_operations_with_eio() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut env = FluidEnv::new("down");
    let cfg = env.minio_config("somebucket", &format!("http://127.0.0.1:{port}"), "\"ReadOnlyMany\"");
    env.write_config(&cfg);
    let start = std::time::Instant::now();
    let m = env.start();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(std::fs::metadata(&env.target).unwrap().is_dir(), "getattr of the root answers");
    let err = std::fs::read_dir(&env.target).and_then(|mut d| d.next().transpose()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(wait_until(Duration::from_secs(10), || m.log_text().contains("list failed")), "{}", m.log_text());
}

/// The goofys flow's single mount sits at the root. Adding a second mount
/// moves it to /<name> (docs/fluid.md); removing it again moves it back. Names
/// looked up before a move must not resolve after it.
#[test]
fn config_swap_between_root_and_named_layouts() {
    let srv = server();
    let a = srv.bucket("layout-a");
    let b = srv.bucket("layout-b");
    srv.put(&a, "testfile", "A");
    srv.put(&b, "in-b", "B");
    let mut env = FluidEnv::new("layout");
    let one = env.minio_config(&a, &srv.endpoint, "\"ReadOnlyMany\"");
    let second = one
        .replace(&format!("minio://{a}"), &format!("minio://{b}"))
        .replace("\"name\":\"minio\"", "\"name\":\"extra\"");
    let mounts =
        |cfg: &str| cfg.split_once("\"mounts\":[").unwrap().1.split_once("],\"targetPath\"").unwrap().0.to_string();
    let both = one.replace(&mounts(&one), &format!("{},{}", mounts(&one), mounts(&second)));
    env.write_config(&one);
    let m = env.start();
    let id = mount_ids(&env.target);
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "A");

    env.write_config(&both);
    assert!(wait_until(Duration::from_secs(15), || env.target.join("extra/in-b").exists()), "{}", m.log_text());
    assert_eq!(std::fs::read_to_string(env.target.join("minio/testfile")).unwrap(), "A");
    assert!(!env.target.join("testfile").exists(), "the old root entry still resolves");

    env.write_config(&one);
    assert!(wait_until(Duration::from_secs(15), || env.target.join("testfile").exists()), "{}", m.log_text());
    assert!(!env.target.join("extra").exists(), "the removed mount's directory still resolves");
    assert!(!env.target.join("minio").exists(), "the old mount directory still resolves");
    assert_eq!(std::fs::read_to_string(env.target.join("testfile")).unwrap(), "A");
    assert_eq!(mount_ids(&env.target), id, "the FUSE mount was replaced");
}

#[test]
fn config_swap_changes_mounts_without_remounting() {
    let srv = server();
    let a = srv.bucket("reload-a");
    let b = srv.bucket("reload-b");
    srv.put(&a, "in-a", "A");
    srv.put(&b, "in-b", "B");
    let mut env = FluidEnv::new("reload");
    let mount = |bucket: &str, name: &str| {
        format!(
            r#"{{"mountPoint":"s3://{bucket}","name":"{name}","path":"/{name}","options":{{"endpoint":"{}","access-key":"{}","secret-key":"{}"}}}}"#,
            srv.endpoint,
            env.key_path("minio-access-key"),
            env.key_path("minio-access-secret")
        )
    };
    let config = |mounts: &[String]| {
        format!(
            r#"{{"mounts":[{}],"targetPath":"{}","accessModes":["ReadOnlyMany"]}}"#,
            mounts.join(","),
            env.target.display()
        )
    };
    let (ma, mb) = (mount(&a, "a"), mount(&b, "b"));
    let one = config(std::slice::from_ref(&ma));
    let both = config(&[ma.clone(), mb.clone()]);
    let only_b = config(std::slice::from_ref(&mb));
    env.write_config(&one);
    let m = env.start();
    let id = mount_ids(&env.target);
    assert_eq!(std::fs::read_to_string(env.target.join("a/in-a")).unwrap(), "A");

    env.write_config(&both);
    assert!(wait_until(Duration::from_secs(15), || env.target.join("b/in-b").exists()), "{}", m.log_text());
    assert_eq!(std::fs::read_to_string(env.target.join("b/in-b")).unwrap(), "B");
    assert_eq!(std::fs::read_to_string(env.target.join("a/in-a")).unwrap(), "A");
    assert_eq!(mount_ids(&env.target), id, "the FUSE mount was replaced");

    // A broken update is ignored; the mounts keep working.
    env.write_config("{ not json");
    assert!(wait_until(Duration::from_secs(15), || m.log_text().contains("ignored")), "{}", m.log_text());
    assert_eq!(std::fs::read_to_string(env.target.join("b/in-b")).unwrap(), "B");

    env.write_config(&only_b);
    assert!(wait_until(Duration::from_secs(15), || !env.target.join("a").exists()), "{}", m.log_text());
    assert_eq!(std::fs::read_to_string(env.target.join("b/in-b")).unwrap(), "B");
    assert_eq!(mount_ids(&env.target), id);
}
