//! The laptop user's mount: `/etc/fstab` and `mount -t fuse.bucketfs` (the
//! `mount.fuse3` calling convention), `--background`, a first run against a
//! local server with no AWS configuration, mounting as a non-root user with
//! `fusermount3`, and the generated completions and man page.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Unprivileged uid and gid for the non-root tests (`nobody`).
const NOBODY: u32 = 65534;

/// A mount started in the background: unmounted lazily on drop if a test
/// failed before unmounting it, and its server process waited for.
struct Background {
    mountpoint: PathBuf,
}

impl Background {
    fn mounted(&self) -> bool {
        !mountinfo_at(&self.mountpoint).is_empty()
    }

    /// Waits until no bucketfs process serves this mount point any more.
    fn wait_gone(&self) -> bool {
        wait_until(Duration::from_secs(20), || server_pids(&self.mountpoint).is_empty())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for _ in 0..8 {
            if !self.mounted() {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
        for pid in server_pids(&self.mountpoint) {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.wait_gone();
    }
}

/// bucketfs processes whose command line names `mountpoint`.
fn server_pids(mountpoint: &Path) -> Vec<i32> {
    let needle = mountpoint.to_str().unwrap();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("bucketfs")) && args.iter().any(|a| a == needle) {
            pids.push(pid);
        }
    }
    pids
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A temp dir with the key files and an empty `mnt`, usable by every user.
fn workdir() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (a, s) = server().key_files(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (dir, mnt, a, s)
}

#[test]
fn fstab_mount_through_mount_fuse_with_o_options() {
    let srv = server();
    let bucket = srv.bucket("fstab");
    srv.put(&bucket, "docs/hello.txt", "hello from fstab");
    let (dir, mnt, a, s) = workdir();
    let log = dir.path().join("bucketfs.log");
    let bin = bucketfs();
    // What an fstab line `BUCKET MNT fuse.bucketfs OPTS 0 0` runs: mount(8)
    // calls mount.fuse3, which runs `bucketfs BUCKET MNT -o OPTS` and waits.
    // mount(8) gives helpers no PATH, so bucketfs is named here by the
    // `PROGRAM#SOURCE` form of the same helper.
    let opts = format!(
        "endpoint_url={},access_key_file={},secret-key-file={},log_file={},metadata_ttl=5s,_netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30,noauto,user",
        srv.endpoint,
        a.display(),
        s.display(),
        log.display()
    );
    let guard = Background { mountpoint: mnt.clone() };
    let started = Instant::now();
    // Under `timeout`: a helper that does not return would hang mount(8) forever.
    let out = run(Command::new("timeout")
        .args(["60", "mount", "-t"])
        .arg("fuse")
        .arg(format!("{bin}#{bucket}/docs"))
        .arg(&mnt)
        .arg("-o")
        .arg(&opts));
    assert!(
        out.status.success(),
        "mount failed: {}{}",
        text(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // mount returned because the mount answers, not because a server was started.
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(guard.mounted(), "mount returned 0 but nothing is mounted at {}", mnt.display());
    assert_eq!(std::fs::read_to_string(mnt.join("hello.txt")).unwrap(), "hello from fstab");
    let line = mountinfo_at(&mnt).join("\n");
    // `user` makes mount(8) add noexec (and nosuid, nodev): mapped, not ignored.
    assert!(line.contains("noexec") && line.contains("nosuid") && line.contains("nodev"), "{line}");
    assert_eq!(server_pids(&mnt).len(), 1, "one background server");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&format!("mounted s3://{bucket}/docs/ at {}", mnt.display())), "{logged}");
    // umount ends the background server, with exit as in the foreground.
    let out = run(Command::new("umount").arg(&mnt));
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
    assert!(guard.wait_gone(), "the background server outlived its mount");
    assert!(std::fs::read_to_string(&log).unwrap().contains("was unmounted; exiting"));
    assert!(!std::fs::read_to_string(&log).unwrap().contains(SECRET_KEY));

    // `mount.fuse3 SOURCE MNT -t fuse.bucketfs -o ...`, which finds `bucketfs`
    // on PATH as mount -t fuse.bucketfs does with an installed binary; `ro`.
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::os::unix::fs::symlink(bin, bin_dir.join("bucketfs")).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let opts = format!(
        "ro,endpoint-url={},access-key-file={},secret_key_file={},log-file={}",
        srv.endpoint,
        a.display(),
        s.display(),
        log.display()
    );
    let out = run(Command::new("timeout")
        .args(["60", "mount.fuse3"])
        .arg(&bucket)
        .arg(&mnt)
        .args(["-t", "fuse.bucketfs", "-o"])
        .arg(&opts)
        .env("PATH", &path));
    assert!(out.status.success(), "mount.fuse3: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(mnt.join("docs/hello.txt")).unwrap(), "hello from fstab");
    let err = std::fs::write(mnt.join("new.txt"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(mountinfo_at(&mnt).join("").contains(" ro,"), "{:?}", mountinfo_at(&mnt));
    let out = run(Command::new("umount").arg(&mnt));
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
    assert!(guard.wait_gone());

    // `-o foreground`: runs until unmounted, as `bucketfs mount` does.
    let mut child = Command::new(bin)
        .arg(&bucket)
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "foreground,endpoint_url={},access_key_file={},secret_key_file={}",
            srv.endpoint,
            a.display(),
            s.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || guard.mounted()));
    assert!(child.try_wait().unwrap().is_none(), "-o foreground returned");
    assert!(run(Command::new("umount").arg(&mnt)).status.success());
    assert_eq!(wait_child(&mut child, Duration::from_secs(20)), Some(0));
}

/// Runs `bucketfs ARGS` and returns (exit code, stderr).
fn bucketfs_run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut cmd = Command::new(bucketfs());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    (out.status.code(), text(&out.stderr), started.elapsed())
}

#[test]
fn a_background_mount_that_fails_exits_2_with_the_foreground_line() {
    let srv = server();
    let (dir, mnt, a, s) = workdir();
    let log = dir.path().join("bg.log");
    let guard = Background { mountpoint: mnt.clone() };
    let (mp, a, s, log) = (mnt.to_str().unwrap(), a.to_str().unwrap(), s.to_str().unwrap(), log.to_str().unwrap());
    let keys = ["--access-key-file", a, "--secret-key-file", s];
    for (endpoint, bucket, expect) in [
        (srv.endpoint.as_str(), "no-such-bucket-here", "bucketfs: bucket \"no-such-bucket-here\" does not exist at"),
        ("http://127.0.0.1:1", "any", "bucketfs: cannot reach http://127.0.0.1:1 for bucket \"any\""),
    ] {
        let base: Vec<&str> =
            ["mount", bucket, mp, "--endpoint-url", endpoint, "--max-attempts", "1"].into_iter().chain(keys).collect();
        let (fg_code, fg_err, _) = bucketfs_run(&base, &[]);
        let bg: Vec<&str> = base.iter().copied().chain(["--background", "--log-file", log]).collect();
        let (code, err, took) = bucketfs_run(&bg, &[]);
        assert_eq!(code, Some(2), "{err}");
        assert_eq!(fg_code, Some(2), "{fg_err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with(expect), "{err}");
        assert_eq!(err, fg_err, "background and foreground report differently");
        assert!(took < Duration::from_secs(30), "took {took:?}");
        assert!(!guard.mounted());
        assert!(server_pids(&mnt).is_empty(), "a background server is left running");
    }
    // The mount.fuse3 form: an unknown option is named, and nothing starts.
    let (code, err, _) =
        bucketfs_run(&["bucket", mp, "-o", &format!("ro,endpoint_url={},no_such_option=1", srv.endpoint)], &[]);
    assert_eq!(code, Some(2));
    assert_eq!(err, "bucketfs: unknown mount option \"no_such_option\"\n");
    // A log file that cannot be written is reported before going to the background.
    let (code, err, _) = bucketfs_run(
        &["mount", "b", mp, "--endpoint-url", &srv.endpoint, "--background", "--log-file", "/nonexistent/dir/log"],
        &[],
    );
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot open log file /nonexistent/dir/log"), "{err}");
    drop(dir);
}

#[test]
fn a_first_run_with_an_endpoint_and_no_aws_config_is_quiet() {
    let srv = server();
    let bucket = srv.bucket("first-run");
    srv.put(&bucket, "f", "x");
    let (dir, mnt, _, _) = workdir();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let home = home.to_str().unwrap();
    let guard = Background { mountpoint: mnt.clone() };
    let mp = mnt.to_str().unwrap();
    // A new user: keys in the environment, no ~/.aws, no region, default log level.
    let clean = |cmd: &mut Command| {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", home);
    };
    let mut cmd = Command::new(bucketfs());
    cmd.args(["mount", &bucket, mp, "--endpoint-url", &srv.endpoint])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    clean(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(20), || guard.mounted()), "not mounted");
    assert!(started.elapsed() < Duration::from_secs(5), "slow start: {:?}", started.elapsed());
    assert_eq!(std::fs::read_to_string(mnt.join("f")).unwrap(), "x");
    assert!(run(Command::new("umount").arg(&mnt)).status.success());
    assert_eq!(wait_child(&mut child, Duration::from_secs(20)), Some(0));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!stderr.contains("IMDS") && !stderr.contains("WARN"), "a new user sees:\n{stderr}");
    assert_eq!(lines.len(), 2, "a new user sees:\n{stderr}");
    assert!(lines[0].contains(&format!("mounted s3://{bucket}/ at {mp}")), "{stderr}");
    assert!(lines[1].contains("was unmounted; exiting"), "{stderr}");

    // No credentials anywhere: one line that says so, at once.
    let mut cmd = Command::new(bucketfs());
    cmd.args(["mount", &bucket, mp, "--endpoint-url", &srv.endpoint]);
    clean(&mut cmd);
    let started = Instant::now();
    let out = run(&mut cmd);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("bucketfs: no S3 credentials found for bucket \"{bucket}\"")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(!guard.mounted());
}

/// Makes the machine usable by FUSE users as a desktop distribution ships
/// it: /dev/fuse open to all, `user_allow_other` in /etc/fuse.conf.
fn allow_unprivileged_fuse() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the non-root test switches users, so it runs as root");
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user_allow_other") {
        std::fs::write("/etc/fuse.conf", format!("{conf}\nuser_allow_other\n")).unwrap();
    }
    let helper = std::fs::metadata("/usr/bin/fusermount3").expect("fusermount3 (apt install fuse3)");
    assert!(helper.permissions().mode() & 0o4000 != 0, "fusermount3 is not setuid root");
}

/// `cmd` as uid and gid `NOBODY`, with no supplementary groups.
fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .env("HOME", "/nonexistent");
    cmd
}

#[test]
fn a_non_root_user_mounts_and_unmounts_with_fusermount3() {
    allow_unprivileged_fuse();
    let srv = server();
    let bucket = srv.bucket("non-root");
    srv.put(&bucket, "shared.txt", "for everyone");
    let (dir, mnt, a, s) = workdir();
    std::os::unix::fs::chown(&mnt, Some(NOBODY), Some(NOBODY)).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::os::unix::fs::chown(&logs, Some(NOBODY), Some(NOBODY)).unwrap();
    let log = logs.join("bucketfs.log");
    let guard = Background { mountpoint: mnt.clone() };
    let mount_as_nobody = |extra: &[&str]| {
        let out = run(as_nobody(bucketfs())
            .args(["mount", &bucket])
            .arg(&mnt)
            .args(["--endpoint-url", &srv.endpoint, "--access-key-file"])
            .arg(&a)
            .arg("--secret-key-file")
            .arg(&s)
            .arg("--log-file")
            .arg(&log)
            .arg("--background")
            .args(extra));
        assert!(
            out.status.success(),
            "mount as uid {NOBODY} failed: {}{}",
            text(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(guard.mounted());
        let line = mountinfo_at(&mnt).join("");
        assert!(line.contains(&format!("user_id={NOBODY}")), "not mounted by the user: {line}");
        // The server runs as the user.
        let pid = server_pids(&mnt)[0];
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534")),
            "{status}"
        );
    };
    let unmount_as_nobody = || {
        let out = run(as_nobody("fusermount3").arg("-u").arg(&mnt));
        assert!(out.status.success(), "fusermount3 -u: {}", text(&out.stderr));
        assert!(!guard.mounted());
        assert!(guard.wait_gone(), "the server outlived fusermount3 -u");
    };

    mount_as_nobody(&[]);
    // The user reads and writes; files are theirs.
    let out = run(as_nobody("sh")
        .arg("-c")
        .arg(format!("cat {m}/shared.txt && echo mine > {m}/mine.txt && stat -c %u {m}/mine.txt", m = mnt.display())));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("for everyone{NOBODY}\n"));
    assert_eq!(srv.get(&bucket, "mine.txt").unwrap(), b"mine\n");
    // Without --allow-other, nobody else (not even root) gets in.
    let err = std::fs::read_dir(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    unmount_as_nobody();
    assert!(std::fs::read_to_string(&log).unwrap().contains("was unmounted; exiting"));

    // --allow-other, permitted by user_allow_other: another user reads.
    mount_as_nobody(&["--allow-other"]);
    assert_eq!(std::fs::read_to_string(mnt.join("shared.txt")).unwrap(), "for everyone");
    assert!(mountinfo_at(&mnt).join("").contains("allow_other"));
    unmount_as_nobody();
    drop(dir);
}

#[test]
fn completions_and_man_pages_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(Command::new(bucketfs()).args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("--endpoint-url") && script.contains("mount"), "{shell}: {script}");
        let file = dir.path().join(format!("bucketfs.{shell}"));
        std::fs::write(&file, &script).unwrap();
        // Each script parses in its shell, where the shell is installed (bash is).
        if shell == "bash" || Command::new("which").arg(shell).output().is_ok_and(|o| o.status.success()) {
            let out = run(Command::new(shell).arg("-n").arg(&file));
            assert!(out.status.success(), "{shell} -n: {}", text(&out.stderr));
        }
    }
    // Sourced in bash, it completes subcommands and mount options.
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(bucketfs mount --endpo); COMP_CWORD=2; COMP_LINE='bucketfs mount --endpo'; COMP_POINT=${{#COMP_LINE}}; _bucketfs bucketfs --endpo mount; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.path().join("bucketfs.bash").display()
    )));
    assert!(text(&out.stdout).contains("--endpoint-url"), "{}{}", text(&out.stdout), text(&out.stderr));

    let out = run(Command::new(bucketfs()).arg("man"));
    assert!(out.status.success());
    let roff = text(&out.stdout);
    assert!(roff.starts_with(".ie") || roff.contains(".TH bucketfs"), "{roff}");
    let out = run(Command::new(bucketfs()).args(["man", "mount"]));
    assert!(out.status.success());
    let page = dir.path().join("bucketfs-mount.1");
    std::fs::write(&page, &out.stdout).unwrap();
    // man renders it: the options and the fstab form are there.
    let out = run(Command::new("man").arg("-l").arg(&page).env("MANWIDTH", "100").env("MANPAGER", "cat"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rendered = text(&out.stdout);
    for want in ["--endpoint-url", "--background", "--log-file", "fuse.bucketfs", "-o"] {
        assert!(rendered.contains(want), "{want} missing from the rendered page:\n{rendered}");
    }
    let pages = dir.path().join("pages");
    std::fs::create_dir(&pages).unwrap();
    assert!(run(Command::new(bucketfs()).args(["man", "--dir"]).arg(&pages)).status.success());
    for name in ["bucketfs.1", "bucketfs-mount.1", "bucketfs-fluid.1", "bucketfs-completions.1"] {
        assert!(pages.join(name).exists(), "{name} not written");
    }
}
