//! `--posix-metadata` through real mounts: modes, owners, times, symlinks
//! and xattrs stored in object metadata in s3fs's format, read back after a
//! remount and by the S3 client; tools that lean on them (cp -p, rsync -a,
//! git, tar); buckets written by other tools; name-length errors.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;

const POSIX: &[&str] = &["--posix-metadata", "--metadata-ttl", "0"];

/// Runs a shell command; returns (success, stdout + stderr).
fn try_sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn head_meta(bucket: &str, key: &str) -> (HashMap<String, String>, Option<String>) {
    let srv = server();
    let out = srv.block_on(srv.client.head_object().bucket(bucket).key(key).send()).expect("head");
    (out.metadata().cloned().unwrap_or_default(), out.content_type().map(str::to_string))
}

/// Whether the server keeps user metadata on `dir/` marker objects, where
/// s3fs and bucketfs keep a directory's. AWS S3 and MinIO do; SeaweedFS
/// stores markers as directories of its filer and drops it.
fn markers_keep_metadata(bucket: &str) -> bool {
    let srv = server();
    let req = srv.client.put_object().bucket(bucket).key("probe-marker/").metadata("mode", "16877");
    srv.block_on(req.body(Vec::new().into()).send()).unwrap();
    let kept = head_meta(bucket, "probe-marker/").0.contains_key("mode");
    srv.block_on(srv.client.delete_object().bucket(bucket).key("probe-marker/").send()).unwrap();
    kept
}

/// `ls -ln` with the columns' padding squeezed to one space.
fn ls_ln(dir: &Path) -> String {
    let out = sh(&format!("ls -ln {}", p(dir)));
    out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n").collect()
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

#[test]
fn chmod_chown_utimes_are_stored_and_read_back_after_a_remount() {
    let srv = server();
    let bucket = srv.bucket("posix-attrs");
    {
        let m = Mount::start(&bucket, POSIX);
        std::fs::write(m.path("f.txt"), "hello\n").unwrap();
        std::fs::create_dir(m.path("d")).unwrap();
        let f = p(&m.path("f.txt"));
        let d = p(&m.path("d"));
        sh(&format!("chmod 0640 {f} && chown 1234:5678 {f} && touch -m -d '2001-02-03 04:05:06.123456789' {f}"));
        sh(&format!("chmod 0700 {d} && chown 42:43 {d} && touch -m -d '2002-01-01 00:00:00' {d}"));
        let md = std::fs::metadata(m.path("f.txt")).unwrap();
        assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o640, 1234, 5678));
    }
    // What the S3 client sees: s3fs's headers.
    let (meta, ct) = head_meta(&bucket, "f.txt");
    assert_eq!(meta.get("mode").map(String::as_str), Some("33184"), "{meta:?}"); // S_IFREG | 0640
    assert_eq!(meta.get("uid").map(String::as_str), Some("1234"));
    assert_eq!(meta.get("gid").map(String::as_str), Some("5678"));
    assert_eq!(meta.get("mtime").map(String::as_str), Some("981173106.123456789"));
    assert_eq!(ct.as_deref(), Some("text/plain"));
    let dir_metadata = markers_keep_metadata(&bucket);
    if dir_metadata {
        let (dmeta, _) = head_meta(&bucket, "d/");
        assert_eq!(dmeta.get("mode").map(String::as_str), Some("16832"), "{dmeta:?}"); // S_IFDIR | 0700
    }

    let m = Mount::start(&bucket, POSIX);
    let md = std::fs::metadata(m.path("f.txt")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o640, 1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), (981_173_106, 123_456_789));
    assert_eq!(std::fs::read(m.path("f.txt")).unwrap(), b"hello\n");
    let dd = std::fs::metadata(m.path("d")).unwrap();
    assert!(dd.is_dir());
    if dir_metadata {
        assert_eq!((dd.mode() & 0o7777, dd.uid(), dd.gid(), dd.mtime()), (0o700, 42, 43, 1_009_843_200));
    }
    // `ls -l` shows the same (through READDIRPLUS).
    let ls = ls_ln(&m.mountpoint);
    assert!(ls.lines().any(|l| l.starts_with("-rw-r----- 1 1234 5678 6 ")), "{ls}");
    assert!(!dir_metadata || ls.lines().any(|l| l.starts_with("drwx------ 2 42 43 ")), "{ls}");
}

#[test]
fn cp_p_keeps_times_and_a_second_rsync_transfers_nothing() {
    let srv = server();
    let bucket = srv.bucket("posix-rsync");
    let m = Mount::start(&bucket, POSIX);
    let src = tempfile::tempdir().unwrap();
    for i in 0..40 {
        let dir = src.path().join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    sh(&format!("touch -d '2010-05-06 07:08:09' {}/d0/f0.txt", p(src.path())));
    sh(&format!("cp -p {}/d0/f0.txt {}", p(src.path()), p(&m.path("copied.txt"))));
    assert_eq!(std::fs::metadata(m.path("copied.txt")).unwrap().mtime(), 1_273_129_689);

    let dst = p(&m.path("tree"));
    let first = sh(&format!("rsync -a --stats {}/ {dst}/", p(src.path())));
    assert!(first.contains("Number of regular files transferred: 40"), "{first}");
    let second = sh(&format!("rsync -a --stats {}/ {dst}/", p(src.path())));
    assert!(second.contains("Number of regular files transferred: 0"), "{second}");
    let diff = sh(&format!("diff -r {}/ {dst}/ && echo same", p(src.path())));
    assert!(diff.contains("same"), "{diff}");
}

#[test]
fn symlinks_create_read_follow_rename_unlink() {
    let srv = server();
    let bucket = srv.bucket("posix-links");
    let m = Mount::start(&bucket, POSIX);
    std::fs::write(m.path("target.txt"), "pointed at\n").unwrap();
    std::os::unix::fs::symlink("target.txt", m.path("link")).unwrap();
    assert_eq!(std::fs::read_link(m.path("link")).unwrap(), Path::new("target.txt"));
    assert!(std::fs::symlink_metadata(m.path("link")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(m.path("link")).unwrap(), "pointed at\n");
    // s3fs's format: the body is the target, the mode has S_IFLNK.
    assert_eq!(srv.get(&bucket, "link").unwrap(), b"target.txt");
    assert_eq!(head_meta(&bucket, "link").0.get("mode").map(String::as_str), Some("41471"));
    std::fs::rename(m.path("link"), m.path("link2")).unwrap();
    assert_eq!(std::fs::read_link(m.path("link2")).unwrap(), Path::new("target.txt"));
    assert!(std::fs::symlink_metadata(m.path("link")).is_err());
    std::fs::remove_file(m.path("link2")).unwrap();
    assert!(std::fs::symlink_metadata(m.path("link2")).is_err());
    assert_eq!(srv.get(&bucket, "link2"), None);
    // Hard links and special files are refused with EPERM.
    let err = std::fs::hard_link(m.path("target.txt"), m.path("hard")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let (ok, out) = try_sh(&format!("mkfifo {}", p(&m.path("fifo"))));
    assert!(!ok && out.contains("not permitted"), "{out}");
    let (ok, out) = try_sh(&format!("mknod {} c 1 3", p(&m.path("dev"))));
    assert!(!ok && out.contains("not permitted"), "{out}");
}

#[test]
fn user_xattrs_set_get_list_remove() {
    let srv = server();
    let bucket = srv.bucket("posix-xattr");
    let m = Mount::start(&bucket, POSIX);
    std::fs::write(m.path("f"), "x").unwrap();
    let f = p(&m.path("f"));
    sh(&format!("setfattr -n user.colour -v blue {f} && setfattr -n user.size -v 0xff00 {f}"));
    assert_eq!(sh(&format!("getfattr --only-values -n user.colour {f}")), "blue");
    let all = sh(&format!("getfattr -d {f}"));
    assert!(all.contains("user.colour=\"blue\"") && all.contains("user.size=0s/wA="), "{all}");
    // s3fs's header, as the S3 client sees it (s3fs leaves `/` unescaped).
    let header = head_meta(&bucket, "f").0.remove("xattr").unwrap();
    assert_eq!(header, "%7B%22user.colour%22%3A%22Ymx1ZQ%3D%3D%22%2C%22user.size%22%3A%22/wA%3D%22%7D");
    sh(&format!("setfattr -x user.colour {f}"));
    let all = sh(&format!("getfattr -d {f}"));
    assert!(!all.contains("colour") && all.contains("user.size"), "{all}");
    let (ok, out) = try_sh(&format!("getfattr -n user.colour {f}"));
    assert!(!ok && out.contains("No such attribute"), "{out}");
    // Other namespaces are not stored.
    let (ok, out) = try_sh(&format!("setfattr -n trusted.x -v 1 {f}"));
    assert!(!ok && out.contains("not supported"), "{out}");
    // Over S3's 2 KB of metadata: E2BIG alone, ENOSPC with what is there.
    let (ok, out) = try_sh(&format!("setfattr -n user.big -v {} {f}", "x".repeat(3000)));
    assert!(!ok && out.contains("Argument list too long"), "{out}");
    let (ok, out) = try_sh(&format!(
        "setfattr -n user.a -v {} {f} && setfattr -n user.b -v {} {f}",
        "a".repeat(1000),
        "b".repeat(1000)
    ));
    assert!(!ok && out.contains("No space left"), "{out}");
    // A directory keeps its xattrs on its marker.
    if markers_keep_metadata(&bucket) {
        std::fs::create_dir(m.path("d")).unwrap();
        let d = p(&m.path("d"));
        sh(&format!("setfattr -n user.k -v v {d}"));
        assert_eq!(sh(&format!("getfattr --only-values -n user.k {d}")), "v");
    }
}

#[test]
fn a_bucket_written_by_s3fs_reads_back_with_modes_owners_times_and_symlinks() {
    let srv = server();
    let bucket = srv.bucket("posix-s3fs");
    let put = |key: &str, body: &str, ct: Option<&str>, meta: &[(&str, &str)]| {
        let mut req = srv
            .client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(body.as_bytes().to_vec()))
            .set_content_type(ct.map(str::to_string));
        for (k, v) in meta {
            req = req.metadata(*k, *v);
        }
        srv.block_on(req.send()).unwrap();
    };
    put(
        "script.sh",
        "#!/bin/sh\n",
        Some("application/x-sh"),
        &[("mode", "33261"), ("uid", "1000"), ("gid", "100"), ("mtime", "1600000000")],
    );
    put("rclone.txt", "r", None, &[("mtime", "1606223458.4385817")]);
    put(
        "ln",
        "script.sh",
        Some("application/octet-stream"),
        &[("mode", "41471"), ("uid", "1000"), ("gid", "100"), ("mtime", "1600000001")],
    );
    put("dir/", "", Some("application/x-directory"), &[("mode", "16872"), ("uid", "7"), ("gid", "8")]);
    put("dir/inner", "i", None, &[]);
    // s3fs's older directory object: no slash, marked by its Content-Type.
    put("olddir", "", Some("application/x-directory"), &[("mode", "16877")]);
    let m = Mount::start(&bucket, POSIX);
    let s = std::fs::metadata(m.path("script.sh")).unwrap();
    assert_eq!((s.mode(), s.uid(), s.gid(), s.mtime()), (33261, 1000, 100, 1_600_000_000));
    let r = std::fs::metadata(m.path("rclone.txt")).unwrap();
    assert_eq!((r.mtime(), r.mtime_nsec()), (1_606_223_458, 438_581_700));
    let l = std::fs::symlink_metadata(m.path("ln")).unwrap();
    assert!(l.file_type().is_symlink());
    assert_eq!(std::fs::read_link(m.path("ln")).unwrap(), Path::new("script.sh"));
    assert_eq!(std::fs::read(m.path("ln")).unwrap(), b"#!/bin/sh\n");
    let d = std::fs::metadata(m.path("dir")).unwrap();
    assert!(d.is_dir());
    if markers_keep_metadata(&bucket) {
        assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o750, 7, 8));
    }
    assert!(std::fs::metadata(m.path("olddir")).unwrap().is_dir());
    // `ls -l` agrees (entries handed out by READDIRPLUS).
    let ls = ls_ln(&m.mountpoint);
    assert!(ls.lines().any(|l| l.starts_with("lrwxrwxrwx 1 1000 100 9 ") && l.ends_with("ln -> script.sh")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("-rwxr-xr-x 1 1000 100 10 ")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("d") && l.ends_with(" olddir")), "{ls}");
    // rmdir removes the older directory object too, and a renamed
    // directory keeps its metadata and its files'.
    std::fs::remove_dir(m.path("olddir")).unwrap();
    std::fs::rename(m.path("dir"), m.path("dir2")).unwrap();
    drop(m);
    let m = Mount::start(&bucket, POSIX);
    assert!(!m.path("olddir").exists());
    assert_eq!(std::fs::read(m.path("dir2/inner")).unwrap(), b"i");
    if markers_keep_metadata(&bucket) {
        let d = std::fs::metadata(m.path("dir2")).unwrap();
        assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o750, 7, 8));
    }
    let s = std::fs::metadata(m.path("script.sh")).unwrap();
    assert_eq!((s.mode(), s.uid()), (33261, 1000));
}

#[test]
fn git_clone_is_clean_and_tar_extracts_without_differences() {
    let srv = server();
    let bucket = srv.bucket("posix-tools");
    let m = Mount::start(&bucket, POSIX);
    let work = tempfile::tempdir().unwrap();
    let w = p(work.path());
    sh(&format!(
        "cd {w} && git init -q repo && cd repo && mkdir -p src/sub && echo a > a.txt && echo b > src/b.rs && \
         printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh && echo c > src/sub/c && ln -s a.txt alink && \
         git add -A && git -c user.email=t@e -c user.name=t commit -qm init"
    ));
    let (ok, out) = try_sh(&format!("git clone -q {w}/repo {}", p(&m.path("clone"))));
    assert!(ok, "{out}");
    let status = sh(&format!("cd {} && git status --porcelain && echo done", p(&m.path("clone"))));
    assert_eq!(status, "done\n", "git status is not clean");
    assert!(std::fs::symlink_metadata(m.path("clone/alink")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::metadata(m.path("clone/run.sh")).unwrap().mode() & 0o777, 0o755);

    sh(&format!("cd {w} && tar cf t.tar -C repo --exclude .git ."));
    std::fs::create_dir(m.path("x")).unwrap();
    let (ok, out) = try_sh(&format!("tar xf {w}/t.tar -C {}", p(&m.path("x"))));
    assert!(ok, "{out}");
    let (ok, out) = try_sh(&format!("tar df {w}/t.tar -C {}", p(&m.path("x"))));
    assert!(ok && out.is_empty(), "tar d found differences: {out}");
}

#[test]
fn names_too_long_and_content_types_without_the_option() {
    let srv = server();
    let bucket = srv.bucket("posix-names");
    let m = Mount::start(&bucket, &[]);
    let long = "n".repeat(256);
    let err = std::fs::write(m.path(&long), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    let err = std::fs::create_dir(m.path(&long)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    // A key over S3's 1,024 bytes, of names that each fit.
    let mut dir = m.mountpoint.clone();
    for i in 0..4 {
        dir = dir.join(format!("{i}{}", "d".repeat(250)));
        std::fs::create_dir(&dir).unwrap();
    }
    let err = std::fs::write(dir.join("f".repeat(100)), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
    std::fs::write(m.path("notes.txt"), "x").unwrap();
    std::fs::write(m.path("page.html"), "x").unwrap();
    assert_eq!(head_meta(&bucket, "notes.txt").1.as_deref(), Some("text/plain"));
    assert_eq!(head_meta(&bucket, "page.html").1.as_deref(), Some("text/html"));
    // Without the option, nothing else is stored, and xattrs stay unsupported.
    assert!(head_meta(&bucket, "notes.txt").0.is_empty());
    let (ok, out) = try_sh(&format!("setfattr -n user.a -v 1 {}", p(&m.path("notes.txt"))));
    assert!(!ok && out.contains("not supported"), "{out}");
}

/// Runs `cmd` as user `uid` (group `uid`, no other groups).
fn sh_as(uid: u32, cmd: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups", "sh", "-c", cmd])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn default_permissions_enforces_the_stored_modes_and_owners() {
    use std::os::unix::fs::PermissionsExt;
    let srv = server();
    let bucket = srv.bucket("posix-perms");
    let m = Mount::start(&bucket, &["--posix-metadata", "--metadata-ttl", "0", "--allow-other"]);
    // The test's temporary directory is private; others must reach the mount.
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = p(&m.path("secret.txt"));
    std::fs::write(&f, "secret\n").unwrap();
    sh(&format!("chown 1234:1234 {f} && chmod 0600 {f}"));
    let (ok, out) = sh_as(65534, &format!("cat {f}"));
    assert!(!ok && out.contains("Permission denied"), "another user read a 0600 file: {out}");
    let (ok, out) = sh_as(1234, &format!("cat {f}"));
    assert!(ok && out == "secret\n", "the owner could not read: {out}");
    let (ok, out) = sh_as(1234, &format!("echo more >> {f}"));
    assert!(ok, "the owner could not append: {out}");
    // The modes are the stored ones: after a remount, still enforced.
    drop(m);
    let m = Mount::start(&bucket, &["--posix-metadata", "--metadata-ttl", "0", "--allow-other"]);
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = p(&m.path("secret.txt"));
    let (ok, out) = sh_as(65534, &format!("cat {f}"));
    assert!(!ok && out.contains("Permission denied"), "after a remount another user read a 0600 file: {out}");
    sh(&format!("chmod 0644 {f}"));
    let (ok, out) = sh_as(65534, &format!("cat {f}"));
    assert!(ok && out == "secret\nmore\n", "a 0644 file was not readable: {out}");
    let (ok, _) = sh_as(65534, &format!("echo x >> {f}"));
    assert!(!ok, "another user wrote to a 0644 file");
}

/// chmod of a file open for writing is stored when it is closed; a `stat`
/// meanwhile asks the server (the TTL is 0), whose metadata is older, and
/// still shows the new mode. Of two descriptors, the first close stores the
/// chmod (a copy onto itself: a new ETag), and what is written through the
/// second after that is stored by its close, with the mode.
#[test]
fn chmod_of_an_open_file_survives_a_stat_before_close() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let srv = server();
    let bucket = srv.bucket("posix-open-chmod");
    srv.put(&bucket, "f", "x");
    let m = Mount::start(&bucket, POSIX);
    let first = std::fs::OpenOptions::new().write(true).open(m.path("f")).unwrap();
    let mut second = std::fs::OpenOptions::new().append(true).open(m.path("f")).unwrap();
    std::fs::set_permissions(m.path("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    for _ in 0..3 {
        let mode = std::fs::metadata(m.path("f")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o600, "stat while the file is open");
    }
    drop(first);
    let (meta, _) = head_meta(&bucket, "f");
    assert_eq!(meta.get("mode").map(String::as_str), Some("33152"), "stored by the close: {meta:?}");
    second.write_all(b"yz").unwrap();
    drop(second);
    assert_eq!(server().get(&bucket, "f").unwrap(), b"xyz", "{}", m.log_text());
    let (meta, _) = head_meta(&bucket, "f");
    assert_eq!(meta.get("mode").map(String::as_str), Some("33152"), "{meta:?}");
    assert_eq!(std::fs::metadata(m.path("f")).unwrap().mode() & 0o7777, 0o600);
}
