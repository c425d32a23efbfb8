//! A counting (and optionally delaying) TCP proxy for HTTP/1.1 S3 traffic.
//!
//! Every connection is relayed byte for byte to the upstream server. A new
//! request is recognised as client bytes that follow server bytes (or open a
//! connection) and start with an HTTP request line; HTTP/1.1 keep-alive
//! without pipelining (what the AWS SDK's hyper client does) means each
//! request starts after the previous response, so this sees every request.
//! Each new request is held back `delay` before its first byte is forwarded:
//! a per-request latency, not a per-packet one. Request heads are parsed to
//! count methods (HEAD, ListObjectsV2, ranged GET, ...) and range sizes.
//!
//! Server-to-client bytes are moved with splice(2) through a pipe, so the
//! proxy costs little CPU on large reads; a copy loop is the fallback.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (inclusive) of the range-size histogram buckets.
pub const RANGE_BUCKETS: [(u64, &str); 9] = [
    (4 << 10, "<=4KiB"),
    (64 << 10, "<=64KiB"),
    (128 << 10, "<=128KiB"),
    (256 << 10, "<=256KiB"),
    (1 << 20, "<=1MiB"),
    (4 << 20, "<=4MiB"),
    (8 << 20, "<=8MiB"),
    (16 << 20, "<=16MiB"),
    (u64::MAX, ">16MiB"),
];

/// Request counters; all monotonic. Take a [`Counts`] snapshot before and
/// after a measured section and subtract.
#[derive(Default)]
pub struct Stats {
    head: AtomicU64,
    list: AtomicU64,
    get_range: AtomicU64,
    get_full: AtomicU64,
    put: AtomicU64,
    other: AtomicU64,
    range_bytes: AtomicU64,
    hist: [AtomicU64; RANGE_BUCKETS.len()],
    bytes_down: AtomicU64,
    connections: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub head: u64,
    pub list: u64,
    pub get_range: u64,
    pub get_full: u64,
    pub put: u64,
    pub other: u64,
    pub range_bytes: u64,
    pub hist: [u64; RANGE_BUCKETS.len()],
    pub bytes_down: u64,
    pub connections: u64,
    /// CPU time (user + system) over the section, in ms, of the bucketfs
    /// process, of the S3 server, and of this bench process (proxy included).
    /// Filled by the caller, not by the proxy.
    pub cpu_fs_ms: u64,
    pub cpu_server_ms: u64,
    pub cpu_bench_ms: u64,
}

impl Counts {
    pub fn since(&self, before: &Counts) -> Counts {
        let mut hist = [0; RANGE_BUCKETS.len()];
        for (i, h) in hist.iter_mut().enumerate() {
            *h = self.hist[i] - before.hist[i];
        }
        Counts {
            head: self.head - before.head,
            list: self.list - before.list,
            get_range: self.get_range - before.get_range,
            get_full: self.get_full - before.get_full,
            put: self.put - before.put,
            other: self.other - before.other,
            range_bytes: self.range_bytes - before.range_bytes,
            hist,
            bytes_down: self.bytes_down - before.bytes_down,
            connections: self.connections - before.connections,
            cpu_fs_ms: self.cpu_fs_ms.saturating_sub(before.cpu_fs_ms),
            cpu_server_ms: self.cpu_server_ms.saturating_sub(before.cpu_server_ms),
            cpu_bench_ms: self.cpu_bench_ms.saturating_sub(before.cpu_bench_ms),
        }
    }

    pub fn add(&mut self, o: &Counts) {
        self.head += o.head;
        self.list += o.list;
        self.get_range += o.get_range;
        self.get_full += o.get_full;
        self.put += o.put;
        self.other += o.other;
        self.range_bytes += o.range_bytes;
        for (h, x) in self.hist.iter_mut().zip(o.hist) {
            *h += x;
        }
        self.bytes_down += o.bytes_down;
        self.connections += o.connections;
        self.cpu_fs_ms += o.cpu_fs_ms;
        self.cpu_server_ms += o.cpu_server_ms;
        self.cpu_bench_ms += o.cpu_bench_ms;
    }

    /// One line: request counts per kind and the ranged GETs' sizes, divided by `per`.
    pub fn describe(&self, per: u64) -> String {
        let per = per.max(1) as f64;
        let f = |x: u64| {
            let v = x as f64 / per;
            if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") }
        };
        let mut s = format!(
            "HEAD {} | LIST {} | ranged GET {} | full GET {} | other {}",
            f(self.head),
            f(self.list),
            f(self.get_range),
            f(self.get_full),
            f(self.put + self.other)
        );
        if let Some(mean) = self.range_bytes.checked_div(self.get_range) {
            s += &format!(" | mean range {} | sizes:", human_bytes(mean));
            for (i, (_, label)) in RANGE_BUCKETS.iter().enumerate() {
                if self.hist[i] > 0 {
                    s += &format!(" {label}:{}", f(self.hist[i]));
                }
            }
        }
        s += &format!(
            " | new connections {} | bytes from server {}",
            f(self.connections),
            human_bytes((self.bytes_down as f64 / per) as u64)
        );
        let secs = |ms: u64| format!("{:.2}", ms as f64 / 1000.0 / per);
        s += " | CPU s: ";
        if self.cpu_fs_ms > 0 {
            s += &format!("bucketfs {}, ", secs(self.cpu_fs_ms));
        }
        s += &format!("server {}, bench+proxy {}", secs(self.cpu_server_ms), secs(self.cpu_bench_ms));
        s
    }
}

pub fn human_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let x = n as f64;
    if x >= K * K * K {
        format!("{:.2} GiB", x / (K * K * K))
    } else if x >= K * K {
        format!("{:.1} MiB", x / (K * K))
    } else if x >= K {
        format!("{:.1} KiB", x / K)
    } else {
        format!("{n} B")
    }
}

impl Stats {
    pub fn snapshot(&self) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let mut hist = [0; RANGE_BUCKETS.len()];
        for (i, h) in hist.iter_mut().enumerate() {
            *h = l(&self.hist[i]);
        }
        Counts {
            head: l(&self.head),
            list: l(&self.list),
            get_range: l(&self.get_range),
            get_full: l(&self.get_full),
            put: l(&self.put),
            other: l(&self.other),
            range_bytes: l(&self.range_bytes),
            hist,
            bytes_down: l(&self.bytes_down),
            connections: l(&self.connections),
            ..Counts::default()
        }
    }

    fn record(&self, head: &[u8]) {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let range = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
            .and_then(|(_, v)| parse_range(v.trim()));
        let inc = |a: &AtomicU64| a.fetch_add(1, Ordering::SeqCst);
        match method {
            "HEAD" => inc(&self.head),
            "GET" if query.split('&').any(|p| p == "list-type=2") => inc(&self.list),
            "GET" if range.is_some() => {
                let len = range.unwrap_or_default();
                self.range_bytes.fetch_add(len, Ordering::SeqCst);
                let b = RANGE_BUCKETS.iter().position(|(max, _)| len <= *max).unwrap_or(RANGE_BUCKETS.len() - 1);
                inc(&self.hist[b]);
                inc(&self.get_range)
            }
            // The SDK tags GetObject with `?x-id=GetObject`.
            "GET" if query.split('&').all(|p| p.is_empty() || p.starts_with("x-id=")) => inc(&self.get_full),
            "PUT" | "POST" => inc(&self.put),
            _ => inc(&self.other),
        };
    }
}

/// `bytes=A-B` to its length; open-ended ranges count as 0.
fn parse_range(v: &str) -> Option<u64> {
    let r = v.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().unwrap_or(a.wrapping_sub(1));
    Some(b.wrapping_sub(a).wrapping_add(1))
}

fn looks_like_request(buf: &[u8]) -> bool {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method_len >= 3 && buf.get(method_len) == Some(&b' ')
}

/// The proxy: listens on 127.0.0.1 and relays to `upstream` (also loopback).
pub struct Proxy {
    pub port: u16,
    pub stats: Arc<Stats>,
}

impl Proxy {
    pub fn start(upstream_port: u16, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("bench-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                        continue;
                    };
                    st.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    relay(client, server, st.clone(), delay);
                }
            })
            .expect("spawn proxy");
        Proxy { port, stats }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn relay(client: TcpStream, server: TcpStream, stats: Arc<Stats>, delay: Duration) {
    // Set when server bytes were read since the last client bytes: the next
    // client bytes begin a new request.
    let server_spoke = Arc::new(AtomicBool::new(true));
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let spoke = server_spoke.clone();
    let st = stats.clone();
    std::thread::spawn(move || upstream(client, server, spoke, st, delay));
    std::thread::spawn(move || downstream(s2, c2, server_spoke, stats));
}

/// Client to server: detect, delay, parse and forward requests.
fn upstream(
    mut client: TcpStream,
    mut server: TcpStream,
    server_spoke: Arc<AtomicBool>,
    stats: Arc<Stats>,
    delay: Duration,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // The head of the request being received, until it is complete.
    let mut head: Option<Vec<u8>> = None;
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if server_spoke.swap(false, Ordering::SeqCst) && looks_like_request(data) {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            head = Some(Vec::new());
        }
        if let Some(h) = head.as_mut() {
            h.extend_from_slice(data);
            if let Some(end) = h.windows(4).position(|w| w == b"\r\n\r\n") {
                stats.record(&h[..end]);
                head = None;
            } else if h.len() > 64 * 1024 {
                stats.record(h);
                head = None;
            }
        }
        if server.write_all(data).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// Server to client: forward everything, noting that the server spoke.
fn downstream(mut server: TcpStream, mut client: TcpStream, server_spoke: Arc<AtomicBool>, stats: Arc<Stats>) {
    if !splice_loop(&server, &client, &server_spoke, &stats) {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            server_spoke.store(true, Ordering::SeqCst);
            stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    let _ = client.shutdown(Shutdown::Write);
    let _ = server.shutdown(Shutdown::Read);
}

/// Zero-copy relay. Returns false if splice is unavailable before any byte
/// moved (the caller then copies); true when the connection is done.
fn splice_loop(server: &TcpStream, client: &TcpStream, server_spoke: &AtomicBool, stats: &Stats) -> bool {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return false;
    }
    let (pr, pw) = (fds[0], fds[1]);
    unsafe { libc::fcntl(pw, libc::F_SETPIPE_SZ, 1 << 20) };
    let (sfd, cfd) = (server.as_raw_fd(), client.as_raw_fd());
    let mut moved_any = false;
    let result = loop {
        let n =
            unsafe { libc::splice(sfd, std::ptr::null_mut(), pw, std::ptr::null_mut(), 1 << 20, libc::SPLICE_F_MOVE) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break moved_any || err.raw_os_error() != Some(libc::EINVAL);
        }
        if n == 0 {
            break true;
        }
        moved_any = true;
        server_spoke.store(true, Ordering::SeqCst);
        stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        let mut left = n as usize;
        let mut failed = false;
        while left > 0 {
            let m =
                unsafe { libc::splice(pr, std::ptr::null_mut(), cfd, std::ptr::null_mut(), left, libc::SPLICE_F_MOVE) };
            if m < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if m <= 0 {
                failed = true;
                break;
            }
            left -= m as usize;
        }
        if failed {
            break true;
        }
    };
    unsafe {
        libc::close(pr);
        libc::close(pw);
    }
    result
}
