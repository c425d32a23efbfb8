//! The host's side of a mount: reading the mount table, the backing
//! device's readahead in sysfs, lazy unmount, and cleaning the dead mount a
//! killed instance left behind. Nothing here knows about the file system or
//! FUSE requests; `mount.rs` and the probe use it.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The FUSE file system name of bucketfs mounts (the mount table's source).
pub const FSNAME: &str = "bucketfs";

pub fn lazy_unmount(path: &Path) -> bool {
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
