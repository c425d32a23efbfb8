//! A fault-injecting HTTP/1.1 proxy for tests, on loopback only.
//!
//! `Proxy::start(upstream)` listens on `127.0.0.1:0` and forwards each client
//! connection to `upstream` over a connection of its own, on a small tokio
//! runtime owned by the proxy (dropped with it). Point bucketfs's
//! `--endpoint-url` at [`Proxy::endpoint`] and change [`Mode`] at any time
//! with [`Proxy::set_mode`]; the mode is read when a request arrives, when its
//! response head arrives, and before each piece of a response body is sent.
//!
//! It understands just enough HTTP/1.1 to know where messages end: the
//! request line and headers, `Content-Length` and `Transfer-Encoding: chunked`
//! bodies, bodiless responses (HEAD, 1xx, 204, 304) and read-until-close
//! responses. Requests on one connection are sequential (keep-alive, no
//! pipelining); a request body is read whole before it is forwarded, so a
//! request can be resent once when an idle upstream connection turns out to
//! be closed. `Expect: 100-continue` is answered by the proxy itself.
//!
//! Byte counts of `ResetMidBody` and `Truncate` are response *body* bytes
//! (after the header block, chunk framing included): `after_bytes: 0` cuts
//! right after the headers. Both apply to every response while the mode is
//! set; a response shorter than `after_bytes` passes whole.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest request or response head, and largest buffered request body.
const MAX_HEAD: usize = 64 << 10;
const MAX_REQUEST_BODY: usize = 64 << 20;
const READ_CHUNK: usize = 64 << 10;

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything unchanged.
    Pass,
    /// Wait this long before forwarding each request.
    Delay(Duration),
    /// Answer the next `remaining` requests with `503 Slow Down` (S3's
    /// throttling error) and `Connection: close`, without forwarding them;
    /// with `remaining: 0` it is the same as `Pass`.
    Error503 { remaining: u32 },
    /// Forward responses, but reset the connection (RST: `SO_LINGER` 0, then
    /// close) after `after_bytes` bytes of a response body.
    ResetMidBody { after_bytes: u64 },
    /// Forward responses, but close the connection cleanly (FIN) after
    /// `after_bytes` bytes of a response body.
    Truncate { after_bytes: u64 },
    /// Accept connections and read requests, but forward nothing (not even
    /// the rest of a response in flight) until the mode changes.
    Freeze,
    /// Reset new connections at once and reset every open one.
    Down,
    /// A slow link that keeps moving: response bodies are forwarded `bytes`
    /// at a time with a pause of `every` before each piece, and request
    /// bodies are read from the client the same way.
    Trickle { bytes: usize, every: Duration },
    /// Answer a ListObjectsV2 asking for more than 1,000 keys per page with
    /// `400 InvalidArgument`, as some S3-compatible servers do; forward the
    /// rest.
    RefuseLargeListPages,
    /// Forward the next `remaining` requests of this HTTP method that the
    /// server answers with success, then reset the client's connection
    /// instead of sending the answer: a request applied whose answer was
    /// lost on the way back.
    LoseAnswers { method: &'static str, remaining: u32 },
    /// Answer the next `remaining` ListObjectsV2 requests with status 200
    /// and an `InternalError` document for a body (S3 may report errors that
    /// way once it has sent its status); forward the rest.
    ListErrorIn200 { remaining: u32 },
}

/// A snapshot of the proxy's counters.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub connections: u64,
    /// Requests seen (forwarded or not), by HTTP method.
    pub requests: BTreeMap<String, u64>,
    /// Bytes forwarded client to server, and server to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub injected_503: u64,
    /// LIST requests refused for their page size.
    pub refused_pages: u64,
    /// LIST requests answered 200 with an error document.
    pub errors_in_200: u64,
    pub resets: u64,
    pub truncations: u64,
    /// Answers to applied requests that were never sent back.
    pub lost_answers: u64,
    /// Requests held while frozen.
    pub frozen: u64,
    /// Connections reset because the proxy was down.
    pub refused: u64,
}

impl Stats {
    pub fn requests_total(&self) -> u64 {
        self.requests.values().sum()
    }

    pub fn requests_of(&self, method: &str) -> u64 {
        self.requests.get(method).copied().unwrap_or(0)
    }

    /// Every fault injected so far.
    pub fn faults(&self) -> u64 {
        self.injected_503 + self.resets + self.truncations + self.frozen + self.refused + self.lost_answers
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    injected_503: AtomicU64,
    refused_pages: AtomicU64,
    errors_in_200: AtomicU64,
    resets: AtomicU64,
    truncations: AtomicU64,
    lost_answers: AtomicU64,
    frozen: AtomicU64,
    refused: AtomicU64,
    requests: Mutex<BTreeMap<String, u64>>,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    counters: Counters,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Takes one 503 from the current burst, if there is one.
    fn take_503(&self) -> bool {
        self.mode.send_if_modified(|m| match m {
            Mode::Error503 { remaining } if *remaining > 0 => {
                *remaining -= 1;
                true
            }
            _ => false,
        })
    }

    /// Takes one lost answer to a `method` request from a `LoseAnswers`
    /// run, if there is one.
    fn take_lost_answer(&self, method: &str) -> bool {
        self.mode.send_if_modified(|m| match m {
            Mode::LoseAnswers { method: lost, remaining } if *remaining > 0 && *lost == method => {
                *remaining -= 1;
                true
            }
            _ => false,
        })
    }

    /// Takes one answer from a `ListErrorIn200` run, if there is one.
    fn take_error_in_200(&self) -> bool {
        self.mode.send_if_modified(|m| match m {
            Mode::ListErrorIn200 { remaining } if *remaining > 0 => {
                *remaining -= 1;
                true
            }
            _ => false,
        })
    }

    /// Waits while frozen; returns the mode then in force.
    async fn thaw(&self, count: bool) -> Mode {
        let mut rx = self.mode.subscribe();
        let mode = *rx.borrow_and_update();
        if mode != Mode::Freeze {
            return mode;
        }
        if count {
            bump(&self.counters.frozen, 1);
        }
        match rx.wait_for(|m| *m != Mode::Freeze).await {
            Ok(m) => *m,
            Err(_) => Mode::Down, // the proxy is gone
        }
    }
}

/// See the module documentation.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (a loopback address) in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> Proxy {
        assert!(upstream.ip().is_loopback(), "the proxy is for loopback only");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared { upstream, mode, counters: Counters::default() });
        let s = shared.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("proxy listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                bump(&s.counters.connections, 1);
                tokio::spawn(handle(stream, s.clone()));
            }
        });
        Proxy { addr, shared, runtime: Some(runtime) }
    }

    /// `http://127.0.0.1:PORT`, for `--endpoint-url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            connections: get(&c.connections),
            requests: c.requests.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            injected_503: get(&c.injected_503),
            refused_pages: get(&c.refused_pages),
            errors_in_200: get(&c.errors_in_200),
            resets: get(&c.resets),
            truncations: get(&c.truncations),
            lost_answers: get(&c.lost_answers),
            frozen: get(&c.frozen),
            refused: get(&c.refused),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How a connection ends.
enum End {
    /// FIN to the client.
    Close,
    /// RST to the client.
    Reset,
}

async fn handle(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut rx = shared.mode.subscribe();
    if *rx.borrow_and_update() == Mode::Down {
        bump(&shared.counters.refused, 1);
        let _ = stream.set_zero_linger();
        return;
    }
    let mut client = Conn::new(stream);
    let end = tokio::select! {
        r = serve(&mut client, &shared) => r.unwrap_or(End::Close),
        _ = rx.wait_for(|m| *m == Mode::Down) => {
            bump(&shared.counters.refused, 1);
            End::Reset
        }
    };
    match end {
        End::Reset => {
            let _ = client.stream.set_zero_linger();
        }
        End::Close => {
            let _ = client.stream.shutdown().await;
        }
    }
}

/// Serves requests on one client connection until it ends.
async fn serve(client: &mut Conn, shared: &Shared) -> io::Result<End> {
    let mut upstream: Option<Conn> = None;
    loop {
        let Some(head) = client.read_head().await? else {
            return Ok(End::Close);
        };
        let req = Head::parse(&head)?;
        let method = req.method().to_string();
        {
            let mut m = shared.counters.requests.lock().unwrap_or_else(|e| e.into_inner());
            *m.entry(method.clone()).or_default() += 1;
        }
        if req.expects_continue() {
            client.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let pace = match shared.mode() {
            Mode::Trickle { bytes, every } => Some((bytes.max(1), every)),
            _ => None,
        };
        let body = client.read_request_body(&req, pace).await?;
        match shared.thaw(true).await {
            Mode::Down => return Ok(End::Reset),
            Mode::Delay(d) => tokio::time::sleep(d).await,
            _ => {}
        }
        if shared.take_503() {
            bump(&shared.counters.injected_503, 1);
            client.stream.write_all(&slow_down(&method)).await?;
            return Ok(End::Close);
        }
        if is_list(req.target()) && shared.take_error_in_200() {
            bump(&shared.counters.errors_in_200, 1);
            client.stream.write_all(&internal_error_in_200()).await?;
            continue;
        }
        if shared.mode() == Mode::RefuseLargeListPages && large_list_page(req.target()) {
            bump(&shared.counters.refused_pages, 1);
            client.stream.write_all(&invalid_max_keys()).await?;
            continue;
        }
        // Send the request; once more on a fresh connection if a reused one
        // turns out to be closed before any response byte.
        let mut response = None;
        for _ in 0..2 {
            let reused = upstream.is_some();
            if upstream.is_none() {
                upstream = Some(Conn::new(TcpStream::connect(shared.upstream).await?));
            }
            let up = upstream.as_mut().unwrap_or_else(|| unreachable!());
            let sent = async {
                up.stream.write_all(&head).await?;
                up.stream.write_all(&body).await?;
                up.read_head().await
            }
            .await;
            match sent {
                Ok(Some(h)) => {
                    response = Some(h);
                    break;
                }
                Ok(None) | Err(_) if reused => upstream = None,
                Ok(None) => return Ok(End::Close),
                Err(e) => return Err(e),
            }
        }
        let Some(mut resp_head) = response else {
            return Ok(End::Close);
        };
        bump(&shared.counters.bytes_up, (head.len() + body.len()) as u64);
        let up = upstream.as_mut().unwrap_or_else(|| unreachable!());
        // Interim responses: forward, unless the proxy already sent its own 100.
        loop {
            let resp = Head::parse(&resp_head)?;
            if !(100..200).contains(&resp.status()) {
                break;
            }
            if !req.expects_continue() {
                client.stream.write_all(&resp_head).await?;
            }
            resp_head = up.read_head().await?.ok_or_else(|| eof("upstream closed after an interim response"))?;
        }
        let resp = Head::parse(&resp_head)?;
        let framing = resp.response_framing(&method);
        if resp.status() / 100 == 2 && shared.take_lost_answer(&method) {
            // The server has answered that it applied the request.
            bump(&shared.counters.lost_answers, 1);
            return Ok(End::Reset);
        }
        let cut = match shared.thaw(false).await {
            Mode::Down => return Ok(End::Reset),
            Mode::ResetMidBody { after_bytes } => Some((after_bytes, End::Reset)),
            Mode::Truncate { after_bytes } => Some((after_bytes, End::Close)),
            _ => None,
        };
        client.stream.write_all(&resp_head).await?;
        bump(&shared.counters.bytes_down, resp_head.len() as u64);
        let mut sink = Sink { dst: &mut client.stream, shared, sent: 0, cut };
        if let Some(end) = up.copy_body(framing, &mut sink).await? {
            match end {
                End::Reset => bump(&shared.counters.resets, 1),
                End::Close => bump(&shared.counters.truncations, 1),
            }
            return Ok(end);
        }
        if framing == Framing::UntilClose || resp.closes() || req.closes() {
            return Ok(End::Close);
        }
    }
}

/// True for a ListObjectsV2 request target.
fn is_list(target: &str) -> bool {
    target.split_once('?').is_some_and(|(_, query)| query.split('&').any(|p| p == "list-type=2"))
}

/// True for a ListObjectsV2 request target asking for more than 1,000 keys.
fn large_list_page(target: &str) -> bool {
    let Some((_, query)) = target.split_once('?') else { return false };
    let mut pairs = query.split('&').filter_map(|p| p.split_once('='));
    is_list(target) && pairs.any(|(k, v)| k == "max-keys" && v.parse::<u64>().is_ok_and(|n| n > 1000))
}

/// An S3 error document with `status` (e.g. `200 OK`, `400 Bad Request`).
fn error_document(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: fault-proxy\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A 200 whose body is an error document.
fn internal_error_in_200() -> Vec<u8> {
    error_document("200 OK", "InternalError", "We encountered an internal error. Please try again.")
}

/// The answer of servers that allow at most 1,000 keys per LIST page.
fn invalid_max_keys() -> Vec<u8> {
    error_document("400 Bad Request", "InvalidArgument", "max-keys must be between 1 and 1000")
}

/// The canned throttling answer.
fn slow_down(method: &str) -> Vec<u8> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><Resource>/</Resource><RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>";
    let mut out = format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: fault-proxy\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed request or response head.
struct Head {
    start: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> io::Result<Head> {
        let text = std::str::from_utf8(raw).map_err(|_| bad("head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let start: Vec<String> = lines.next().unwrap_or("").splitn(3, ' ').map(str::to_string).collect();
        if start.len() < 2 {
            return Err(bad("malformed start line"));
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Head { start, headers })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn method(&self) -> &str {
        &self.start[0]
    }

    /// The request target (path and query) of a request head.
    fn target(&self) -> &str {
        self.start.get(1).map_or("", String::as_str)
    }

    fn status(&self) -> u16 {
        self.start[1].parse().unwrap_or(0)
    }

    fn expects_continue(&self) -> bool {
        self.has_token("expect", "100-continue")
    }

    fn closes(&self) -> bool {
        self.has_token("connection", "close")
    }

    fn length(&self) -> io::Result<Option<u64>> {
        self.header("content-length").map(|v| v.parse().map_err(|_| bad("bad Content-Length"))).transpose()
    }

    fn request_framing(&self) -> io::Result<Framing> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(match self.length()? {
            Some(n) => Framing::Length(n),
            None => Framing::None,
        })
    }

    fn response_framing(&self, method: &str) -> Framing {
        let status = self.status();
        if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            return Framing::None;
        }
        if self.has_token("transfer-encoding", "chunked") {
            return Framing::Chunked;
        }
        match self.length() {
            Ok(Some(n)) => Framing::Length(n),
            _ => Framing::UntilClose,
        }
    }
}

/// Where response bytes go: the client, with the mode's cut applied.
struct Sink<'a> {
    dst: &'a mut TcpStream,
    shared: &'a Shared,
    sent: u64,
    cut: Option<(u64, End)>,
}

impl Sink<'_> {
    /// Sends `data`, or the part of it before the cut; returns how the
    /// connection must end when the cut is reached.
    async fn send(&mut self, data: &[u8]) -> io::Result<Option<End>> {
        let mode = self.shared.thaw(false).await;
        if mode == Mode::Down {
            return Ok(Some(End::Reset));
        }
        if let Mode::Trickle { bytes, every } = mode {
            for piece in data.chunks(bytes.max(1)) {
                tokio::time::sleep(every).await;
                if let Some(end) = self.send_now(piece).await? {
                    return Ok(Some(end));
                }
            }
            return Ok(None);
        }
        self.send_now(data).await
    }

    /// [`Sink::send`] without pacing.
    async fn send_now(&mut self, data: &[u8]) -> io::Result<Option<End>> {
        let mut n = data.len();
        let mut limit_reached = false;
        if let Some((after, _)) = &self.cut
            && self.sent + n as u64 >= *after
            && !data.is_empty()
        {
            n = (*after - self.sent) as usize;
            limit_reached = true;
        }
        self.dst.write_all(&data[..n]).await?;
        self.sent += n as u64;
        bump(&self.shared.counters.bytes_down, n as u64);
        if limit_reached && n < data.len() {
            return Ok(self.cut.take().map(|(_, end)| end));
        }
        Ok(None)
    }
}

/// A stream with a read buffer.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Conn { stream, buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Bytes up to and including `delim`; `None` on a clean end of stream
    /// before any byte.
    async fn read_until(&mut self, delim: &[u8], max: usize) -> io::Result<Option<BytesMut>> {
        let mut searched = 0;
        loop {
            if let Some(pos) = find(&self.buf[searched..], delim) {
                return Ok(Some(self.buf.split_to(searched + pos + delim.len())));
            }
            searched = self.buf.len().saturating_sub(delim.len() - 1);
            if self.buf.len() > max {
                return Err(bad("line or head too long"));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() { Ok(None) } else { Err(eof("stream ended inside a head or line")) };
            }
        }
    }

    async fn read_head(&mut self) -> io::Result<Option<BytesMut>> {
        self.read_until(b"\r\n\r\n", MAX_HEAD).await
    }

    async fn read_line(&mut self) -> io::Result<BytesMut> {
        self.read_until(b"\r\n", MAX_HEAD).await?.ok_or_else(|| eof("stream ended before a line"))
    }

    /// Up to `max` bytes; `None` at end of stream.
    async fn read_some(&mut self, max: usize) -> io::Result<Option<BytesMut>> {
        if self.buf.is_empty() && !self.fill().await? {
            return Ok(None);
        }
        let n = self.buf.len().min(max);
        Ok(Some(self.buf.split_to(n)))
    }

    /// A whole request body (as sent, chunk framing included); with `pace`,
    /// at most that many bytes per pause for a `Content-Length` body.
    async fn read_request_body(&mut self, head: &Head, pace: Option<(usize, Duration)>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match head.request_framing()? {
            Framing::Length(n) => {
                if n as usize > MAX_REQUEST_BODY {
                    return Err(bad("request body too large for the proxy"));
                }
                while (out.len() as u64) < n {
                    let want = (n - out.len() as u64) as usize;
                    let max = match pace {
                        Some((bytes, every)) => {
                            tokio::time::sleep(every).await;
                            bytes
                        }
                        None => READ_CHUNK,
                    };
                    let piece = self.read_some(want.min(max)).await?.ok_or_else(|| eof("request body cut short"))?;
                    out.extend_from_slice(&piece);
                }
            }
            Framing::Chunked => loop {
                let line = self.read_line().await?;
                out.extend_from_slice(&line);
                let size = chunk_size(&line)?;
                if size == 0 {
                    loop {
                        let t = self.read_line().await?;
                        out.extend_from_slice(&t);
                        if &t[..] == b"\r\n" {
                            break;
                        }
                    }
                    break;
                }
                let mut left = size + 2;
                while left > 0 {
                    let piece = self
                        .read_some(left.min(READ_CHUNK as u64) as usize)
                        .await?
                        .ok_or_else(|| eof("request chunk cut short"))?;
                    left -= piece.len() as u64;
                    out.extend_from_slice(&piece);
                }
                if out.len() > MAX_REQUEST_BODY {
                    return Err(bad("request body too large for the proxy"));
                }
            },
            Framing::None | Framing::UntilClose => {}
        }
        Ok(out)
    }

    /// Copies one response body to `sink`; `Some(end)` when the sink cut it.
    async fn copy_body(&mut self, framing: Framing, sink: &mut Sink<'_>) -> io::Result<Option<End>> {
        match framing {
            Framing::None => Ok(None),
            Framing::Length(n) => self.copy_exact(n, sink).await,
            Framing::UntilClose => {
                while let Some(piece) = self.read_some(READ_CHUNK).await? {
                    if let Some(end) = sink.send(&piece).await? {
                        return Ok(Some(end));
                    }
                }
                Ok(None)
            }
            Framing::Chunked => loop {
                let line = self.read_line().await?;
                if let Some(end) = sink.send(&line).await? {
                    return Ok(Some(end));
                }
                let size = chunk_size(&line)?;
                if size == 0 {
                    loop {
                        let t = self.read_line().await?;
                        if let Some(end) = sink.send(&t).await? {
                            return Ok(Some(end));
                        }
                        if &t[..] == b"\r\n" {
                            return Ok(None);
                        }
                    }
                }
                if let Some(end) = self.copy_exact(size + 2, sink).await? {
                    return Ok(Some(end));
                }
            },
        }
    }

    async fn copy_exact(&mut self, mut left: u64, sink: &mut Sink<'_>) -> io::Result<Option<End>> {
        while left > 0 {
            let piece = self
                .read_some(left.min(READ_CHUNK as u64) as usize)
                .await?
                .ok_or_else(|| eof("upstream body cut short"))?;
            left -= piece.len() as u64;
            if let Some(end) = sink.send(&piece).await? {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }
}

fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let text = std::str::from_utf8(line).map_err(|_| bad("chunk size is not UTF-8"))?;
    let hex = text.trim().split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))
}
