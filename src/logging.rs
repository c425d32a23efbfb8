//! Log setup: tracing to stderr, a file or syslog, as text or JSON, at
//! `--log-level` unless `RUST_LOG` says otherwise. Secrets never reach a log:
//! credentials are held in types whose `Debug` output is redacted, and no
//! code logs them.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where logs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    /// Appended to this file.
    File(PathBuf),
    /// The local syslog socket, `/dev/log` (journald on systemd machines).
    Syslog,
}

/// The local syslog socket.
pub const SYSLOG_SOCKET: &str = "/dev/log";

/// Logs to stderr.
pub fn init(level: &str, format: LogFormat) {
    let _ = init_to(level, format, &LogTarget::Stderr);
}

/// Logs to `target`. Fails only when a log file cannot be opened.
pub fn init_to(level: &str, format: LogFormat, target: &LogTarget) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        // Our own crate at the requested level, dependencies one step quieter.
        let deps = match level {
            "trace" | "debug" => "info",
            _ => "warn",
        };
        // fuser warns about expected events (unmounting an already unmounted
        // file system); its errors still show. aws-config warns with whole
        // debug dumps when a provider it tries finds nothing; when that
        // matters, the mount's own one-line error says so.
        EnvFilter::new(format!("{deps},fuser=error,aws_config=error,bucketfs={level}"))
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match target {
        LogTarget::Stderr => {
            let builder = builder.with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
            match format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            }
        }
        LogTarget::File(path) => {
            let file = std::sync::Arc::new(open_log_file(path)?);
            let builder = builder.with_writer(file).with_ansi(false);
            match format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            }
        }
        LogTarget::Syslog => {
            // syslog adds the time and the program name.
            let builder = builder.with_writer(Syslog::new(SYSLOG_SOCKET)).with_ansi(false).without_time();
            match format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            }
        }
    };
    Ok(())
}

/// Opens (creates) a log file for appending.
pub fn open_log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))
}

/// Sends each log line as one datagram to `/dev/log`, RFC 3164 style, with
/// the daemon facility and a severity from the level.
struct Syslog {
    path: PathBuf,
    socket: Mutex<Option<UnixDatagram>>,
    pid: u32,
}

impl Syslog {
    fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), socket: Mutex::new(None), pid: std::process::id() }
    }

    fn send(&self, severity: u8, message: &[u8]) {
        const DAEMON: u8 = 3;
        let text = String::from_utf8_lossy(message);
        let line = format!("<{}>bucketfs[{}]: {}", DAEMON * 8 + severity, self.pid, text.trim_end());
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        // Once more with a new connection if syslog was restarted.
        for _ in 0..2 {
            if socket.is_none() {
                *socket = UnixDatagram::unbound().and_then(|s| s.connect(&self.path).map(|_| s)).ok();
            }
            match socket.as_ref().map(|s| s.send(line.as_bytes())) {
                Some(Ok(_)) => return,
                Some(Err(_)) => *socket = None,
                None => return,
            }
        }
    }
}

/// One log line on its way to syslog: sent when dropped.
struct SyslogLine<'a> {
    syslog: &'a Syslog,
    severity: u8,
    buf: Vec<u8>,
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.syslog.send(self.severity, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine { syslog: self, severity: 6, buf: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        let severity = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        SyslogLine { syslog: self, severity, buf: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_lines_are_datagrams_with_facility_and_severity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let syslog = Syslog::new(&path);
        let mut line = syslog.make_writer();
        line.write_all(b"INFO mounted s3://b/ ").unwrap();
        line.write_all(b"at /mnt\n").unwrap();
        drop(line);
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        let want = format!("<30>bucketfs[{}]: INFO mounted s3://b/ at /mnt", std::process::id());
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want);
        // A missing socket loses the line and nothing else.
        drop(server);
        std::fs::remove_file(&path).unwrap();
        let mut line = syslog.make_writer();
        line.write_all(b"lost").unwrap();
        drop(line);
    }
}
