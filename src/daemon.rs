//! `--background`: the mount is served by a child process, started before any
//! thread exists, and the command returns once the mount answers.
//!
//! The parent re-runs its own binary with the same arguments and
//! `BUCKETFS_READY_FD` naming the write end of a pipe. The child (in a new
//! session, stdin and stdout on /dev/null, stderr on a second pipe) mounts as
//! in the foreground, checks that the mount point answers, writes one byte to
//! the ready pipe and moves its stderr to /dev/null; its logs go to
//! `--log-file` or syslog. The parent then exits 0. If the child exits
//! first, the parent prints what it wrote to stderr (the same one-line error
//! as a foreground mount) and exits with its code, 2 for a mount that cannot
//! start.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::mount::EXIT_START;

/// The environment variable that names the ready pipe in the child.
pub const READY_FD_ENV: &str = "BUCKETFS_READY_FD";
/// How long the parent waits for the child: the bucket check has 15 s,
/// credential lookups and mounting get the rest.
const START_WAIT: Duration = Duration::from_secs(60);

/// In the background child: the write end of the ready pipe, taken out of the
/// environment so that nothing started later inherits it. Call first thing
/// in `main`, while the process has one thread.
pub fn take_ready_fd() -> Option<Ready> {
    let value = std::env::var(READY_FD_ENV).ok()?;
    // SAFETY: called while the process has a single thread.
    unsafe { std::env::remove_var(READY_FD_ENV) };
    let fd: RawFd = value.parse().ok()?;
    // SAFETY: fcntl on an fd number; fails harmlessly if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the parent passed this fd to us, open and ours alone.
    Some(Ready(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The child's promise to tell the parent when the mount answers.
pub struct Ready(OwnedFd);

impl Ready {
    /// Tells the parent the mount is up, and detaches stdout and stderr from
    /// it (logs go to the log file or syslog).
    pub fn notify(self) {
        // SAFETY: writes one byte from a valid buffer to our own fd.
        unsafe { libc::write(self.0.as_raw_fd(), b"R".as_ptr().cast(), 1) };
        drop(self);
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the background child with `args` (argv without the program name)
/// and waits until the mount at `mountpoint` answers or the child fails.
/// Returns the exit code for the parent.
pub fn start(args: &[OsString], mountpoint: &Path) -> i32 {
    let fail = |msg: String| {
        eprintln!("bucketfs: {msg}");
        EXIT_START
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find the bucketfs binary to start in the background: {e}")),
    };
    let (ready_r, ready_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot create a pipe: {e}")),
    };
    let w = ready_w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args).env(READY_FD_ENV, w.to_string()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: fcntl and setsid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(w, libc::F_SETFD, 0) != 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the background process: {e}")),
    };
    drop(ready_w);
    let mut stderr = child.stderr.take().expect("piped stderr");
    let collector = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    match wait_readable(&ready_r, START_WAIT) {
        Ok(true) => {
            let mut byte = [0u8; 1];
            // SAFETY: reads into a valid one-byte buffer from our own fd.
            let n = unsafe { libc::read(ready_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
            if n == 1 {
                return 0;
            }
        }
        Ok(false) => {
            let _ = child.kill();
            let _ = child.wait();
            return fail(format!(
                "the mount at {} did not become ready within {}s; see the log",
                mountpoint.display(),
                START_WAIT.as_secs()
            ));
        }
        Err(e) => return fail(format!("waiting for the background process: {e}")),
    }
    // The child closed the pipe without saying it is ready: it exited.
    let status = child.wait();
    let text = collector.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let code = status.ok().and_then(|s| s.code()).filter(|c| *c != 0).unwrap_or(EXIT_START);
    if text.trim().is_empty() {
        eprintln!("bucketfs: the background mount at {} exited with code {code}; see the log", mountpoint.display());
    } else {
        eprint!("{text}");
        if !text.ends_with('\n') {
            eprintln!();
        }
    }
    code
}

/// True when `fd` has data or EOF within `timeout`.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> std::io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
