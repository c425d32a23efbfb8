//! [`ObjectStore`] over aws-sdk-s3.
//!
//! Choices that matter for S3-compatible servers:
//! - path-style addressing whenever an endpoint is given (MinIO, SeaweedFS);
//! - request checksums only "when required": MinIO-derived servers reject the
//!   SDK's default CRC trailers on some requests;
//! - a custom CA bundle adds to the platform roots instead of replacing them;
//! - the SDK's standard retry (exponential backoff with jitter) handles 5xx,
//!   throttling, timeouts and broken connections.
//!
//! # Timeouts
//!
//! A frozen server (connections accepted, no byte ever sent) must give an
//! error in bounded time, while a slow transfer that keeps moving must never
//! be cut. One timeout on a whole request cannot do both: it either kills a
//! 5 GiB GET on a slow link or leaves a person at a shell waiting minutes.
//! So there are three bounds per attempt, each on a phase that a healthy
//! server finishes quickly whatever the size of the transfer:
//!
//! - **connect** (`--connect-timeout`, 3 s): opening the TCP/TLS connection;
//! - **first byte** (`--first-byte-timeout`, 5 s): from the start of the
//!   attempt (connecting included) to the response headers. It is the SDK's
//!   operation attempt timeout, which for a GET and a LIST ends at the
//!   headers, because their bodies are read here, not by the SDK;
//! - **idle** (`--idle-timeout`, 10 s): a pause in a response body. Every
//!   chunk of a GET or LIST body must arrive within it after the previous
//!   one; the body as a whole has no bound. (The SDK's own stalled-stream
//!   protection does the same with other numbers; it is turned off so there
//!   is one rule.)
//!
//! Requests whose first byte legitimately comes late get longer attempt
//! bounds, derived from the first-byte timeout:
//!
//! - uploads (PutObject, UploadPart): the SDK's attempt timeout covers
//!   sending the body (so does aws-smithy's hyper `read_timeout`, which wraps
//!   the whole exchange up to the response headers), so the bound grows with
//!   the body: first byte + size at [`MIN_UPLOAD_RATE`];
//! - CompleteMultipartUpload, CopyObject and UploadPartCopy, which a server
//!   may answer only once it has assembled or copied the data (AWS sends the
//!   headers early and the body late, and the SDK reads that body inside the
//!   attempt): at least [`SLOW_ANSWER_TIMEOUT`].
//!
//! `--request-timeout`, when given, replaces all of these attempt bounds with
//! one (the behaviour before the split).
//!
//! Retries use the SDK's standard retry with its 2.1 backoff: 50 ms × 2^n,
//! jittered, before retrying a timeout or a 5xx (1 s × 2^n for throttling).
//! With the defaults, a frozen server fails a request after at most
//! 4 attempts × 5 s + (50 + 100 + 200) ms = 20.4 s; a server that drops
//! connection attempts after 4 × 3 s + 0.35 s = 12.4 s. A request that timed
//! out in every attempt marks the server silent, and until it answers
//! something, requests get one attempt (5 s). That matters because one
//! operation may be several requests in a row: a lookup sends its HEAD and
//! LIST at once, but when revalidating a cached name fails the kernel looks
//! the name up a second time. So a `cat` on a frozen server gets `EIO` within
//! 20.4 s + 5 s = 25.4 s. A body that stops mid-way fails after 10 s of
//! silence (a GET body is not retried: the reader gets `EIO` and the next
//! read asks again).
//!
//! # Lost answers
//!
//! A request can be applied by the server and its answer lost on the way
//! back; the SDK then sends it again. For a conditional upload the retry is
//! refused by its own earlier attempt (`If-None-Match`, `If-Match`, or a
//! multipart upload already completed). So a refused upload is checked
//! against the object: an ETag that is the MD5 of this very body (of these
//! parts) means it is stored. A retried CreateMultipartUpload may have left
//! an upload nobody knows of, so the strays it may have made are aborted;
//! so are those of a start that got no answer at all, once the server
//! answers (see [`super::strays`]).
//!
//! Credentials come from the standard AWS chain, or from key files (or
//! literals) given by the user. Key files are re-read when a request is
//! denied, so a rotated Kubernetes Secret works without a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as SdkPart, MetadataDirective};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextMut, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::{RetryConfig, RetrySpec};
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{
    BodyStream, CompletedPart, ListPage, ObjectAttrs, ObjectMeta, ObjectStore, OpenUpload, PutCondition, StoreError,
    hex,
};
use crate::spec::{CredentialSource, NearServer, S3Settings};

/// The slowest upload an attempt is given time for: an upload attempt may
/// take the first-byte timeout plus its size at this rate (8 MiB: 128 s).
/// Parts are sent a few at a time, so a link of a few Mbit/s stays above it.
pub const MIN_UPLOAD_RATE: u64 = 64 << 10;
/// The least time per attempt a server is given to answer
/// CompleteMultipartUpload, CopyObject and UploadPartCopy (up to 5 GiB).
pub const SLOW_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// What a request's attempt bound is derived from (see the module docs).
#[derive(Clone, Copy, Debug)]
enum Bound {
    /// Answered at once by a healthy server: the first-byte timeout.
    Quick,
    /// Sends a body of this many bytes.
    Upload(u64),
    /// Answered once the server has assembled or copied data.
    SlowAnswer,
}

/// Bodies this small are sent with the client's quick bound (the first-byte
/// timeout): at [`MIN_UPLOAD_RATE`] they take at most a second more, and a
/// per-request override of the bound costs about as much CPU as a small PUT.
const SMALL_BODY: u64 = MIN_UPLOAD_RATE;

/// The bound on one attempt of a request of kind `bound`; `None` for none.
fn attempt_timeout(settings: &S3Settings, bound: Bound) -> Option<Duration> {
    if let Some(t) = settings.request_timeout {
        return (!t.is_zero()).then_some(t);
    }
    let first = settings.first_byte_timeout;
    if first.is_zero() {
        return None;
    }
    Some(match bound {
        Bound::Quick => first,
        Bound::Upload(len) => first + Duration::from_secs_f64(len as f64 / MIN_UPLOAD_RATE as f64),
        Bound::SlowAnswer => first.max(SLOW_ANSWER_TIMEOUT),
    })
}

/// How a request ended when the server sent nothing in time: the start of
/// the message of [`StoreError::Network`] for attempt and connect timeouts.
const TIMED_OUT: &str = "request timed out";

fn timed_out(e: &StoreError) -> bool {
    matches!(e, StoreError::Network(m) if m.starts_with(TIMED_OUT))
}

/// How near the server is, told by how quickly it answers: near once
/// [`QUICK_ANSWERS`] requests have succeeded within [`super::NEAR_ANSWER`]
/// ([`super::NEAR_ANSWER_ON_HOST`] for an endpoint on this host). Only
/// successes count: a refusal may come from a front end nearer than the
/// data. It never goes back: a near server that is slow for a while is still
/// near. AWS's own endpoints are never near: S3 serves each connection at a
/// bounded rate, and a quick answer (S3 Express) does not change that.
/// `--near-server yes|no` sets it instead.
struct Nearness {
    /// `None`: never near.
    within: Option<Duration>,
    quick: std::sync::atomic::AtomicU32,
}

/// Quick answers it takes for a server to count as near.
const QUICK_ANSWERS: u32 = 3;

impl Nearness {
    fn new(endpoint: Option<&str>, mode: NearServer) -> Self {
        let host = endpoint.and_then(host_of);
        let within = match mode {
            NearServer::No => None,
            NearServer::Yes => Some(super::NEAR_ANSWER),
            // No endpoint: AWS S3.
            NearServer::Auto => match host.as_deref() {
                None => None,
                Some(h) if is_aws(h) => None,
                Some(h) if on_this_host(h) => Some(super::NEAR_ANSWER_ON_HOST),
                Some(_) => Some(super::NEAR_ANSWER),
            },
        };
        let quick = if mode == NearServer::Yes { QUICK_ANSWERS } else { 0 };
        Self { within, quick: quick.into() }
    }

    /// Notes a successful answer after `took`. True when that answer made
    /// the server near. Once near, nothing is counted (no write per request).
    fn answered(&self, took: Duration) -> bool {
        self.within.is_some_and(|w| took <= w)
            && !self.is_near()
            && self.quick.fetch_add(1, Ordering::Relaxed) + 1 == QUICK_ANSWERS
    }

    fn is_near(&self) -> bool {
        self.quick.load(Ordering::Relaxed) >= QUICK_ANSWERS
    }
}

/// The host an endpoint URL names, without an IPv6 address's brackets.
fn host_of(endpoint: &str) -> Option<String> {
    let host = endpoint.parse::<http::Uri>().ok()?.host()?.to_string();
    Some(host.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// True if `host` is `localhost` or a loopback address.
fn on_this_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// True if `host` is one of AWS's (`….amazonaws.com`, in China `….com.cn`).
fn is_aws(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn")
}

/// The retry policy: the SDK's standard retry with its 2.1 backoff, which
/// waits 50 ms × 2^n (jittered) before retrying a timeout or a 5xx, and
/// 1 s × 2^n before retrying throttling (503 SlowDown).
fn retry_config(max_attempts: u32) -> RetryConfig {
    RetryConfig::standard().with_retry_spec(RetrySpec::v2_1()).with_max_attempts(max_attempts)
}

/// Why a response body could not be read to its end.
#[derive(Debug)]
enum BodyError {
    /// No byte for the whole idle timeout.
    Idle(Duration),
    /// The connection broke or the body was cut short.
    Broken(String),
}

impl BodyError {
    fn into_store(self, what: &str) -> StoreError {
        match self {
            BodyError::Idle(t) => StoreError::Network(format!("{what}: no bytes for {t:?} (--idle-timeout)")),
            BodyError::Broken(e) => StoreError::Network(format!("{what}: {e}")),
        }
    }
}

/// The next chunk of a response body; fails once `idle` passes without one
/// (`idle` zero: no bound).
async fn next_chunk(body: &mut ByteStream, idle: Duration) -> Result<Option<Bytes>, BodyError> {
    let next = body.try_next();
    let got = if idle.is_zero() {
        next.await
    } else {
        tokio::time::timeout(idle, next).await.map_err(|_| BodyError::Idle(idle))?
    };
    got.map_err(|e| BodyError::Broken(error_chain(&e)))
}

/// A whole LIST reply body, each chunk within `idle` of the previous one.
async fn read_list_body(body: SdkBody, idle: Duration) -> Result<Bytes, BodyError> {
    let mut body = ByteStream::new(body);
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = next_chunk(&mut body, idle).await? {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// See the module documentation.
pub struct S3Store {
    bucket: String,
    settings: S3Settings,
    /// The clients and their generation, bumped whenever they are rebuilt.
    client: Arc<RwLock<Clients>>,
    /// The keys the current client was built with, when they come from files
    /// or literals; compared after a denial to detect a rotation.
    keys: tokio::sync::Mutex<Option<(String, String)>>,
    /// Keys asked for per LIST page when the caller sets no limit; drops to
    /// S3's 1,000 if the server rejects more.
    page_keys: AtomicI32,
    /// Set when a request timed out in every attempt; cleared by any answer
    /// from the server. While set, requests get one attempt (see `client`).
    silent: AtomicBool,
    /// How near the server is, from its answers: see [`ObjectStore::is_near`].
    nearness: Nearness,
    refusals: super::Refusals,
    /// Starts of multipart uploads that got no answer, and this store's open
    /// uploads, to abort what those starts left (see [`super::strays`]).
    strays: Arc<super::strays::StrayStarts>,
}

/// The client, the same with one attempt per request, and their generation.
///
/// Two clients rather than a per-request override: an override rebuilds the
/// request's runtime configuration, which costs about as much CPU as the
/// rest of a HEAD, and a listing with `--posix-metadata` sends one HEAD per
/// entry.
#[derive(Clone)]
struct Clients {
    normal: Client,
    one_attempt: Client,
    generation: u64,
}

impl Clients {
    fn new(normal: Client, generation: u64) -> Self {
        let one_attempt = Client::from_conf(normal.config().to_builder().retry_config(retry_config(1)).build());
        Clients { normal, one_attempt, generation }
    }
}

/// Keys asked for per LIST page. AWS S3, MinIO and most servers answer at
/// most 1,000 whatever is asked; servers that allow more (SeaweedFS does)
/// then need fewer round trips for a large directory.
pub const LIST_PAGE_KEYS: i32 = 5_000;
/// The page size every S3 server accepts.
const S3_PAGE_KEYS: i32 = 1000;

impl S3Store {
    /// Builds the client. Reads key files, but sends no request.
    pub async fn new(bucket: &str, settings: S3Settings) -> anyhow::Result<Self> {
        let keys = settings.credentials.static_keys()?;
        let client = build_client(&settings, keys.clone()).await?;
        let nearness = Nearness::new(settings.endpoint.as_deref(), settings.near_server);
        Ok(Self {
            nearness,
            bucket: bucket.to_string(),
            settings,
            client: Arc::new(RwLock::new(Clients::new(client, 0))),
            keys: tokio::sync::Mutex::new(keys),
            page_keys: AtomicI32::new(LIST_PAGE_KEYS),
            silent: AtomicBool::new(false),
            refusals: Default::default(),
            strays: Default::default(),
        })
    }

    /// The per-request config of a request that is not quick: its attempt
    /// bound.
    fn op_config(&self, bound: Bound) -> aws_sdk_s3::config::Builder {
        let mut b = aws_sdk_s3::config::Builder::default();
        if let Some(t) = attempt_timeout(&self.settings, bound) {
            b = b.timeout_config(TimeoutConfig::builder().operation_attempt_timeout(t).build());
        }
        b
    }

    /// The client to use now, and its generation: a single attempt per
    /// request while the server is silent. A server that let a request time
    /// out in every attempt is not given the full round of attempts again
    /// until it answers something: the kernel asks twice when revalidating a
    /// cached name fails, and a walk of a tree asks once per entry, so a
    /// frozen server would otherwise cost the whole retry budget again for
    /// each.
    fn client(&self) -> (Client, u64) {
        let c = self.client.read().unwrap_or_else(|e| e.into_inner());
        let client = if self.silent.load(Ordering::Relaxed) { &c.one_attempt } else { &c.normal };
        (client.clone(), c.generation)
    }

    /// After a denial by the client of generation `used`: re-reads the key
    /// files and, if they changed, rebuilds the client. Returns true when a
    /// retry is worth it (including when another request already rebuilt it).
    async fn reload_keys(&self, used: u64) -> bool {
        if matches!(self.settings.credentials, CredentialSource::Chain) {
            return false;
        }
        // One reload at a time; later callers see the new generation.
        let mut keys = self.keys.lock().await;
        if self.client().1 != used {
            return true;
        }
        let fresh = match self.settings.credentials.static_keys() {
            Ok(k) => k,
            Err(e) => {
                warn!(bucket = %self.bucket, "re-reading credentials failed: {e:#}");
                return false;
            }
        };
        if *keys == fresh {
            return false;
        }
        match build_client(&self.settings, fresh.clone()).await {
            Ok(client) => {
                info!(bucket = %self.bucket, "credentials changed on disk; using the new keys");
                *self.client.write().unwrap_or_else(|e| e.into_inner()) = Clients::new(client, used + 1);
                *keys = fresh;
                true
            }
            Err(e) => {
                warn!(bucket = %self.bucket, "rebuilding the S3 client failed: {e:#}");
                false
            }
        }
    }

    /// Runs `op`, and once more with re-read credentials if it was denied.
    /// Every attempt is counted in the metrics under `name`.
    async fn call<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let (client, generation) = self.client();
        let started = std::time::Instant::now();
        let result = op(client).await;
        crate::metrics::record_request(name, started, &result);
        if result.is_ok() && self.nearness.answered(started.elapsed()) {
            tracing::debug!(bucket = %self.bucket, "the server is near (it answers within {:?}): sequential reads prefetch in GETs of up to 32 MiB", self.nearness.within.unwrap_or_default());
        }
        match &result {
            Err(e) if timed_out(e) => {
                if !self.silent.swap(true, Ordering::Relaxed) {
                    warn!(bucket = %self.bucket, "the server sent nothing in time; one attempt per request until it answers");
                }
            }
            Err(StoreError::Network(_)) => {}
            _ => {
                if self.silent.swap(false, Ordering::Relaxed) {
                    info!(bucket = %self.bucket, "the server answers again");
                }
            }
        }
        match result {
            Err(StoreError::AccessDenied(_)) if self.reload_keys(generation).await => {
                let started = std::time::Instant::now();
                let result = op(self.client().0).await;
                crate::metrics::record_request(name, started, &result);
                result
            }
            other => other,
        }
    }

    /// After a conditional PUT was refused: the object's ETag if it holds
    /// exactly `body` with `attrs`' metadata. That is an earlier attempt of
    /// the same PUT that the server applied but whose answer was lost: the
    /// SDK's retry, or the writer's next try after a failed close, then
    /// meets the object it stored itself, and is refused by its own
    /// condition. A single PutObject's ETag is the MD5 of its body (not
    /// under SSE-KMS or SSE-C, where nothing matches and the refusal stands).
    /// Empty bodies stay refused: a `dir/` marker or an empty file that
    /// exists already is the conflict itself (`mkdir`'s `EEXIST`), whoever
    /// made it.
    async fn stored_already(&self, key: &str, body: &Bytes, attrs: &ObjectAttrs) -> Option<String> {
        use md5::{Digest, Md5};
        let (meta, stored) = self.head_for_check(key).await?;
        let same = meta.size == body.len() as u64
            && meta.etag.trim_matches('"').eq_ignore_ascii_case(&hex(&Md5::digest(body)))
            && stored.metadata == attrs.metadata
            && attrs.content_type.as_ref().is_none_or(|ours| stored.content_type.as_ref() == Some(ours));
        if same {
            info!(bucket = %self.bucket, key, "an upload was refused by its own earlier attempt, stored but unanswered; the object holds this upload");
        }
        same.then_some(meta.etag)
    }

    /// The HEAD of [`Self::stored_already`] and [`Self::completed_already`].
    /// A failure other than a missing object gets a log line of its own: the
    /// refusal then stands without the check having said why.
    async fn head_for_check(&self, key: &str) -> Option<(ObjectMeta, ObjectAttrs)> {
        match self.head_attrs(key).await {
            Ok(found) => Some(found),
            Err(StoreError::NotFound) => None,
            Err(e) => {
                warn!(bucket = %self.bucket, key, "cannot check whether a refused upload was stored by an earlier attempt: {e}");
                None
            }
        }
    }

    /// After a completion failed: the object's ETag if it was completed
    /// from exactly these parts, as [`Self::stored_already`] does for a
    /// PUT. A multipart object's ETag is the MD5 of its parts' MD5s (their
    /// ETags), then `-` and the number of parts.
    async fn completed_already(&self, key: &str, parts: &[CompletedPart]) -> Option<String> {
        let expected = multipart_etag(parts)?;
        let (meta, _) = self.head_for_check(key).await?;
        let same = meta.etag.trim_matches('"').eq_ignore_ascii_case(&expected);
        if same {
            info!(bucket = %self.bucket, key, "a multipart upload's completion failed on a retry, but its earlier attempt had completed it");
        }
        same.then_some(meta.etag)
    }

    /// After a CreateMultipartUpload with an attempt that got no answer (or
    /// a server error): that attempt may have created an upload nobody
    /// would ever complete or abort. Such strays are the other uploads of
    /// the same key that the server started at most `took` (plus a second
    /// of timestamp rounding) before `ours`; they are aborted. Start times
    /// may be whole seconds (SeaweedFS), and the listing's order is not the
    /// start order there (it lists by upload ID), so a stray can carry the
    /// same time as ours and be listed after it. Another client starting an
    /// upload of the same key in that window, or in the same second just
    /// after ours, would lose its upload, which is far less likely than a
    /// lost answer. Errors here are logged and leave things as they were.
    async fn abort_strays(&self, key: &str, ours: &str, took: Duration) {
        let uploads = match self.list_multipart_uploads(key).await {
            Ok(u) => u,
            Err(e) => return warn!(bucket = %self.bucket, key, "cannot look for multipart uploads a retry left: {e}"),
        };
        // A server that gives no start times gives nothing to tell strays by.
        let Some(mine) = uploads.iter().find(|u| u.upload_id == ours && u.initiated > SystemTime::UNIX_EPOCH) else {
            return;
        };
        let window = took + Duration::from_secs(1);
        for stray in uploads.iter().filter(|u| {
            u.key == key
                && u.upload_id != ours
                && u.initiated <= mine.initiated
                && mine.initiated.duration_since(u.initiated).unwrap_or_default() <= window
        }) {
            match self.abort_multipart(key, &stray.upload_id).await {
                Ok(()) => info!(bucket = %self.bucket, key, "aborted a multipart upload that a retried start had left"),
                Err(e) => warn!(bucket = %self.bucket, key, "cannot abort a multipart upload a retry left: {e}"),
            }
        }
    }

    fn copy_source(&self, key: &str) -> String {
        format!("{}/{}", self.bucket, encode_key(key))
    }
}

async fn build_client(settings: &S3Settings, keys: Option<(String, String)>) -> anyhow::Result<Client> {
    let region = settings.region.clone().unwrap_or_else(|| "us-east-1".to_string());
    let mut builder = match keys {
        Some((access, secret)) => aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(Credentials::new(access, secret, None, None, "bucketfs-keys")),
        None => {
            let loader = aws_config::defaults(BehaviorVersion::latest());
            let loader = match (&settings.region, &settings.endpoint) {
                (Some(r), _) => loader.region(Region::new(r.clone())),
                // Not AWS: no instance metadata probe for a region or for
                // credentials (see `chain_without_imds`).
                (None, Some(_)) => loader.region(region_without_imds()).credentials_provider(chain_without_imds()),
                (None, None) => loader
                    .region(aws_config::meta::region::RegionProviderChain::default_provider().or_else("us-east-1")),
            };
            aws_sdk_s3::config::Builder::from(&loader.load().await)
        }
    };
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    if let Some(path) = &settings.ca_bundle {
        builder = builder.http_client(https_client_with_ca(path)?);
    }
    let builder = builder
        .force_path_style(settings.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(retry_config(settings.max_attempts))
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
    let mut timeouts = TimeoutConfig::builder();
    if !settings.connect_timeout.is_zero() {
        timeouts = timeouts.connect_timeout(settings.connect_timeout);
    }
    if let Some(t) = attempt_timeout(settings, Bound::Quick) {
        timeouts = timeouts.operation_attempt_timeout(t);
    }
    let builder = builder.timeout_config(timeouts.build());
    Ok(Client::from_conf(builder.build()))
}

/// With an endpoint URL and no `--region`: `AWS_REGION` or the profile's,
/// else `us-east-1`; the instance metadata service is not asked.
fn region_without_imds() -> aws_config::meta::region::RegionProviderChain {
    use aws_config::environment::region::EnvironmentVariableRegionProvider;
    use aws_config::profile::ProfileFileRegionProvider;
    aws_config::meta::region::RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new())
        .or_else("us-east-1")
}

/// The standard credential chain without its last step, EC2 instance
/// metadata: environment, profile files, web identity, container
/// credentials. Used with an endpoint URL (MinIO and the like), where asking
/// the metadata service only costs time and warnings.
fn chain_without_imds() -> aws_config::meta::credentials::CredentialsProviderChain {
    use aws_config::ecs::EcsCredentialsProvider;
    use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
    use aws_config::profile::ProfileFileCredentialsProvider;
    use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
    aws_config::meta::credentials::CredentialsProviderChain::first_try(
        "Environment",
        EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else("Profile", ProfileFileCredentialsProvider::builder().build())
    .or_else("WebIdentityToken", WebIdentityTokenCredentialsProvider::builder().build())
    .or_else("EcsContainer", EcsCredentialsProvider::builder().build())
}

fn https_client_with_ca(path: &PathBuf) -> anyhow::Result<aws_smithy_runtime_api::client::http::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read CA bundle {}: {e}", path.display()))?;
    let context = TlsContext::builder()
        .with_trust_store(TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|e| anyhow::anyhow!("invalid CA bundle {}: {e}", path.display()))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
        .tls_context(context)
        .build_https())
}

/// The ETag S3 gives an object completed from `parts` (without quotes):
/// the MD5 of the parts' MD5s, `-`, the number of parts. `None` when a
/// part's ETag is not an MD5.
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::{Digest, Md5};
    let mut digests = Md5::new();
    for part in parts {
        let md5 = part.etag.trim_matches('"');
        if md5.len() != 32 || !md5.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        for i in (0..32).step_by(2) {
            digests.update([u8::from_str_radix(&md5[i..i + 2], 16).ok()?]);
        }
    }
    Some(format!("{}-{}", hex(&digests.finalize()), parts.len()))
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/`.
fn encode_key(key: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    utf8_percent_encode(key, KEEP).to_string()
}

/// Maps an SDK error to a [`StoreError`], keeping the cause for the log line.
fn map_err<E, R>(err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status();
            let code = ctx.err().code().unwrap_or("");
            let message = ctx.err().message().unwrap_or("").to_string();
            match (status, code) {
                (_, "NoSuchBucket") => StoreError::NoSuchBucket,
                (_, "NoSuchKey") | (404, _) => StoreError::NotFound,
                (403, _) | (_, "AccessDenied") | (_, "InvalidAccessKeyId") | (_, "SignatureDoesNotMatch") => {
                    StoreError::AccessDenied(if code.is_empty() { format!("HTTP {status}") } else { code.to_string() })
                }
                (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed,
                (416, _) => StoreError::InvalidRange,
                _ => StoreError::Server {
                    status,
                    message: if message.is_empty() { code.to_string() } else { format!("{code}: {message}") },
                },
            }
        }
        SdkError::TimeoutError(_) => StoreError::Network(TIMED_OUT.to_string()),
        SdkError::DispatchFailure(e) if e.is_timeout() => {
            StoreError::Network(format!("{TIMED_OUT}: {}", error_chain(&err)))
        }
        _ => StoreError::Network(error_chain(&err)),
    }
}

/// "outer: inner: innermost" from an error's source chain, without the
/// Debug dumps some SDK errors add.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// The HTTP status of a raw response, for error mapping.
pub trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::client::orchestrator::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Takes the body of a successful ListObjectsV2 reply away from the SDK,
/// which then decodes an empty listing; `list_xml` reads the real one (see
/// there why). Error replies stay with the SDK, which maps them as usual.
#[derive(Debug, Default, Clone)]
struct TakeListBody(Arc<Mutex<Option<SdkBody>>>);

const EMPTY_LISTING: &str = r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult></ListBucketResult>"#;

impl Intercept for TakeListBody {
    fn name(&self) -> &'static str {
        "TakeListBody"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = context.response_mut();
        if response.status().is_success() {
            let body = std::mem::replace(response.body_mut(), SdkBody::from(EMPTY_LISTING));
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
        }
        Ok(())
    }
}

/// Set when an attempt of one request ended without an answer, or with a
/// server error other than throttling: the server may have applied it.
#[derive(Debug, Default, Clone)]
struct Unanswered(Arc<AtomicBool>);

impl Intercept for Unanswered {
    fn name(&self) -> &'static str {
        "Unanswered"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let status = context.response().map(|r| r.status().as_u16());
        if status.is_none_or(|s| s >= 500 && s != 503) {
            self.0.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// User metadata as the SDK sends it (`x-amz-meta-` + name); none when empty,
/// so requests without metadata are exactly as before.
fn sdk_metadata(attrs: &ObjectAttrs) -> Option<std::collections::HashMap<String, String>> {
    (!attrs.metadata.is_empty()).then(|| attrs.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok()).unwrap_or(SystemTime::UNIX_EPOCH)
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    async fn reload_credentials(&self) {
        let generation = self.client().1;
        self.reload_keys(generation).await;
    }

    async fn check_bucket(&self) -> Result<(), StoreError> {
        self.call("list", |c| async move {
            // HEAD cannot tell a missing bucket from other 404s, so list one key.
            c.list_objects_v2().bucket(&self.bucket).max_keys(1).send().await.map(|_| ()).map_err(map_err)
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError> {
        let send = |max_keys: Option<i32>| {
            let token = token.clone();
            self.call("list", move |c| {
                let token = token.clone();
                async move {
                    // The SDK retries failed requests; a body broken off
                    // after a good status, or a 200 carrying an error, is
                    // ours to retry.
                    let mut attempt = 1;
                    loop {
                        let taken = TakeListBody::default();
                        c.list_objects_v2()
                            .bucket(&self.bucket)
                            .prefix(prefix)
                            .set_delimiter(delimited.then(|| "/".to_string()))
                            .set_continuation_token(token.clone())
                            .set_max_keys(max_keys)
                            .customize()
                            .interceptor(taken.clone())
                            .send()
                            .await
                            .map_err(map_err)?;
                        let body = taken.0.lock().unwrap_or_else(|p| p.into_inner()).take();
                        let body = body.ok_or_else(|| StoreError::Network("LIST reply without a body".to_string()))?;
                        let error = match read_list_body(body, self.settings.idle_timeout).await {
                            Ok(bytes) => match super::list_xml::parse(&bytes) {
                                Err(e) if e.is_transient() => e,
                                done => return done,
                            },
                            // A server silent for the whole idle timeout is
                            // not asked again: that would multiply the wait.
                            Err(e @ BodyError::Idle(_)) => return Err(e.into_store("reading a LIST reply")),
                            Err(e) => e.into_store("reading a LIST reply"),
                        };
                        if attempt >= self.settings.max_attempts {
                            return Err(error);
                        }
                        warn!("{error}; asking again");
                        tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
                        attempt += 1;
                    }
                }
            })
        };
        let page_keys = self.page_keys.load(Ordering::Relaxed);
        match send(max_keys.or(Some(page_keys))).await {
            Err(StoreError::Server { status: 400, message }) if max_keys.is_none() && page_keys > S3_PAGE_KEYS => {
                info!("the server refused LIST pages of {page_keys} keys ({message}); asking for {S3_PAGE_KEYS}");
                self.page_keys.store(S3_PAGE_KEYS, Ordering::Relaxed);
                send(Some(S3_PAGE_KEYS)).await
            }
            other => other,
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        Ok(self.head_attrs(key).await?.0)
    }

    async fn head_attrs(&self, key: &str) -> Result<(ObjectMeta, ObjectAttrs), StoreError> {
        let out =
            self.call("head", |c| async move {
                c.head_object().bucket(&self.bucket).key(key).send().await.map_err(map_err)
            })
            .await?;
        let meta = ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or("").to_string(),
            last_modified: system_time(out.last_modified()),
        };
        let attrs = ObjectAttrs {
            content_type: out.content_type().map(str::to_string),
            metadata: out
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect())
                .unwrap_or_default(),
        };
        Ok((meta, attrs))
    }

    async fn get_range(&self, key: &str, etag: Option<&str>, start: u64, end: u64) -> Result<BodyStream, StoreError> {
        if end <= start {
            return Ok(Box::pin(futures::stream::empty()));
        }
        tracing::trace!(key, start, len = end - start, "ranged GET");
        let out = self
            .call("get", |c| async move {
                c.get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .range(format!("bytes={}-{}", start, end - 1))
                    .set_if_match(etag.map(str::to_string))
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await?;
        let idle = self.settings.idle_timeout;
        let stream = futures::stream::unfold(Some(out.body), move |body| async move {
            let mut body: ByteStream = body?;
            match next_chunk(&mut body, idle).await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                Ok(None) => None,
                Err(e) => Some((Err(e.into_store("reading body")), None)),
            }
        });
        Ok(Box::pin(stream))
    }

    fn is_near(&self) -> bool {
        self.nearness.is_near()
    }

    fn refusals(&self) -> &super::Refusals {
        &self.refusals
    }

    async fn put(&self, key: &str, body: Bytes, cond: PutCondition) -> Result<String, StoreError> {
        self.put_with(key, body, cond, &ObjectAttrs::default()).await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        cond: PutCondition,
        attrs: &ObjectAttrs,
    ) -> Result<String, StoreError> {
        let bound = Bound::Upload(body.len() as u64);
        let out = self
            .call("put", |c| {
                let body = body.clone();
                let cond = cond.clone();
                let upload_bound = (body.len() as u64 > SMALL_BODY).then(|| self.op_config(bound));
                async move {
                    let mut req = c
                        .put_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .body(ByteStream::from(body))
                        .set_content_type(attrs.content_type.clone())
                        .set_metadata(sdk_metadata(attrs));
                    req = match cond {
                        PutCondition::None => req,
                        PutCondition::IfAbsent => req.if_none_match("*"),
                        PutCondition::IfMatch(e) => req.if_match(e),
                    };
                    match upload_bound {
                        Some(bound) => req.customize().config_override(bound).send().await,
                        None => req.send().await,
                    }
                    .map_err(map_err)
                }
            })
            .await;
        match out {
            Ok(out) => Ok(out.e_tag().unwrap_or("").to_string()),
            Err(StoreError::PreconditionFailed) if !body.is_empty() && !matches!(cond, PutCondition::None) => {
                self.stored_already(key, &body, attrs).await.ok_or(StoreError::PreconditionFailed)
            }
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call("delete", |c| async move {
            c.delete_object().bucket(&self.bucket).key(key).send().await.map(|_| ()).map_err(map_err)
        })
        .await
    }

    async fn copy(&self, from: &str, to: &str, if_match: Option<&str>) -> Result<String, StoreError> {
        let out = self
            .call("copy", |c| async move {
                c.copy_object()
                    .bucket(&self.bucket)
                    .key(to)
                    .copy_source(self.copy_source(from))
                    .set_copy_source_if_match(if_match.map(str::to_string))
                    .customize()
                    .config_override(self.op_config(Bound::SlowAnswer))
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await?;
        Ok(out.copy_object_result().and_then(|r| r.e_tag()).unwrap_or("").to_string())
    }

    async fn copy_replace(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttrs,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let out = self
            .call("copy", |c| async move {
                c.copy_object()
                    .bucket(&self.bucket)
                    .key(to)
                    .copy_source(self.copy_source(from))
                    .metadata_directive(MetadataDirective::Replace)
                    .set_content_type(attrs.content_type.clone())
                    .set_metadata(sdk_metadata(attrs))
                    .set_copy_source_if_match(if_match.map(str::to_string))
                    .customize()
                    .config_override(self.op_config(Bound::SlowAnswer))
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await?;
        Ok(out.copy_object_result().and_then(|r| r.e_tag()).unwrap_or("").to_string())
    }

    async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        self.create_multipart_with(key, &ObjectAttrs::default()).await
    }

    async fn create_multipart_with(&self, key: &str, attrs: &ObjectAttrs) -> Result<String, StoreError> {
        let (unanswered, started, sent) = (Unanswered::default(), std::time::Instant::now(), SystemTime::now());
        let starting = self.strays.starting(key);
        let out = self
            .call("create_multipart", |c| {
                let unanswered = unanswered.clone();
                async move {
                    c.create_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .set_content_type(attrs.content_type.clone())
                        .set_metadata(sdk_metadata(attrs))
                        .customize()
                        .interceptor(unanswered)
                        .send()
                        .await
                        .map_err(map_err)
                }
            })
            .await;
        let id = match out.map(|o| o.upload_id().map(str::to_string)) {
            Ok(Some(id)) => id,
            Ok(None) => {
                return Err(StoreError::Server {
                    status: 200,
                    message: "no upload id in CreateMultipartUpload".into(),
                });
            }
            Err(e) if unanswered.0.load(Ordering::Relaxed) => {
                if starting.unanswered(sent) {
                    tokio::spawn(look_for_strays(self.client.clone(), self.bucket.clone(), self.strays.clone()));
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        starting.made(&id);
        if unanswered.0.load(Ordering::Relaxed) {
            self.abort_strays(key, &id, started.elapsed()).await;
        }
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        let bound = Bound::Upload(body.len() as u64);
        let out = self
            .call("upload_part", |c| {
                let body = body.clone();
                async move {
                    c.upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .body(ByteStream::from(body))
                        .customize()
                        .config_override(self.op_config(bound))
                        .send()
                        .await
                        .map_err(map_err)
                }
            })
            .await?;
        Ok(CompletedPart { number, etag: out.e_tag().unwrap_or("").to_string() })
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        from: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<CompletedPart, StoreError> {
        let out = self
            .call("upload_part_copy", |c| async move {
                c.upload_part_copy()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .copy_source(self.copy_source(from))
                    .copy_source_range(format!("bytes={}-{}", start, end - 1))
                    .set_copy_source_if_match(if_match.map(str::to_string))
                    .customize()
                    .config_override(self.op_config(Bound::SlowAnswer))
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await?;
        Ok(CompletedPart { number, etag: out.copy_part_result().and_then(|r| r.e_tag()).unwrap_or("").to_string() })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> Result<String, StoreError> {
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts.iter().map(|p| SdkPart::builder().part_number(p.number).e_tag(&p.etag).build()).collect(),
            ))
            .build();
        let out = self
            .call("complete_multipart", |c| {
                let upload = upload.clone();
                let cond = cond.clone();
                async move {
                    let mut req = c
                        .complete_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .multipart_upload(upload);
                    req = match cond {
                        PutCondition::None => req,
                        PutCondition::IfAbsent => req.if_none_match("*"),
                        PutCondition::IfMatch(e) => req.if_match(e),
                    };
                    req.customize().config_override(self.op_config(Bound::SlowAnswer)).send().await.map_err(map_err)
                }
            })
            .await;
        let etag = match out {
            Ok(out) => Ok(out.e_tag().unwrap_or("").to_string()),
            // The server answered, but maybe to a retry of a completion it
            // had applied: the upload is gone (404) or the condition fails.
            Err(e @ (StoreError::PreconditionFailed | StoreError::NotFound)) => {
                self.completed_already(key, &parts).await.ok_or(e)
            }
            Err(e) => Err(e),
        };
        if etag.is_ok() {
            self.strays.finished(upload_id);
        }
        etag
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let aborted = self.call("abort_multipart", |c| abort_upload(c, &self.bucket, key, upload_id)).await;
        if matches!(aborted, Ok(()) | Err(StoreError::NotFound)) {
            self.strays.finished(upload_id);
        }
        aborted
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StoreError> {
        list_uploads(|markers| {
            self.call("list_multipart_uploads", move |c| list_uploads_page(c, &self.bucket, prefix, markers.clone()))
        })
        .await
    }
}

/// AbortMultipartUpload.
async fn abort_upload(c: Client, bucket: &str, key: &str, upload_id: &str) -> Result<(), StoreError> {
    c.abort_multipart_upload().bucket(bucket).key(key).upload_id(upload_id).send().await.map(|_| ()).map_err(map_err)
}

/// Key and upload-ID markers of a ListMultipartUploads page.
type UploadMarkers = (Option<String>, Option<String>);

/// One page of ListMultipartUploads under `prefix`, from `markers` on.
async fn list_uploads_page(
    c: Client,
    bucket: &str,
    prefix: &str,
    markers: UploadMarkers,
) -> Result<aws_sdk_s3::operation::list_multipart_uploads::ListMultipartUploadsOutput, StoreError> {
    c.list_multipart_uploads()
        .bucket(bucket)
        .prefix(prefix)
        .set_key_marker(markers.0)
        .set_upload_id_marker(markers.1)
        .send()
        .await
        .map_err(map_err)
}

/// Every open upload, page by page (`page` sends one), sorted by key and
/// start time.
async fn list_uploads<F, Fut>(page: F) -> Result<Vec<OpenUpload>, StoreError>
where
    F: Fn(UploadMarkers) -> Fut,
    Fut: std::future::Future<
            Output = Result<aws_sdk_s3::operation::list_multipart_uploads::ListMultipartUploadsOutput, StoreError>,
        >,
{
    let mut open = Vec::new();
    let mut markers: UploadMarkers = (None, None);
    loop {
        let out = page(markers.clone()).await?;
        for u in out.uploads() {
            let (Some(key), Some(id)) = (u.key(), u.upload_id()) else { continue };
            open.push(OpenUpload {
                key: key.to_string(),
                upload_id: id.to_string(),
                initiated: system_time(u.initiated()),
            });
        }
        let next = (out.next_key_marker().map(str::to_string), out.next_upload_id_marker().map(str::to_string));
        // Some servers leave IsTruncated out; a page that does not move
        // the markers is the last either way.
        if !out.is_truncated().unwrap_or(false) || next.0.is_none() || next == markers {
            break;
        }
        markers = next;
    }
    open.sort_by(|a, b| (&a.key, a.initiated).cmp(&(&b.key, b.initiated)));
    Ok(open)
}

/// The task that aborts what unanswered starts left (see
/// [`super::strays`]): one per store at a time, ending when nothing is
/// pending. It sends its requests itself, one attempt each, with the
/// store's current client (keys may be reloaded meanwhile).
async fn look_for_strays(clients: Arc<RwLock<Clients>>, bucket: String, strays: Arc<super::strays::StrayStarts>) {
    use super::strays::{FIRST_LOOK, MAX_WAIT};
    let mut wait = FIRST_LOOK;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_WAIT);
        let (due, expired) = strays.due(SystemTime::now());
        for key in expired {
            warn!(
                bucket,
                key,
                "gave up looking for a multipart upload that a start without an answer may have left; list-multipart-uploads shows it"
            );
        }
        if due.is_empty() {
            return;
        }
        let client = clients.read().unwrap_or_else(|e| e.into_inner()).one_attempt.clone();
        for d in due {
            let listed = list_uploads(|markers| list_uploads_page(client.clone(), &bucket, &d.key, markers)).await;
            let Ok(uploads) = listed else { continue };
            let Some(found) = strays.strays(&d, &uploads) else { continue };
            let mut all_aborted = true;
            for id in found {
                match abort_upload(client.clone(), &bucket, &d.key, &id).await {
                    Ok(()) => {
                        info!(bucket, key = d.key, "aborted a multipart upload that a start without an answer had left")
                    }
                    Err(e) => {
                        all_aborted = false;
                        debug!(bucket, key = d.key, "aborting a multipart upload a start without an answer left: {e}")
                    }
                }
            }
            if all_aborted {
                strays.looked(&d);
            }
        }
    }
}

/// Shared handle to a store, as the file system holds it.
pub type SharedStore = Arc<dyn ObjectStore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_near_after_three_quick_answers() {
        let ms = Duration::from_millis;
        let far = Nearness::new(Some("http://10.0.0.5:9000"), NearServer::Auto);
        for took in [ms(1), ms(4), ms(2), ms(20)] {
            assert!(!far.answered(took));
        }
        assert!(!far.is_near(), "two quick answers of four");
        assert!(far.answered(ms(3)), "the third quick answer makes it near, once");
        assert!(far.is_near() && !far.answered(ms(1)) && far.is_near());
        let on_host = Nearness::new(Some("http://127.0.0.1:8333"), NearServer::Auto);
        for took in [ms(9), ms(10), ms(11)] {
            assert!(!on_host.is_near());
            on_host.answered(took);
        }
        assert!(!on_host.is_near(), "11 ms is not quick for a server on this host");
        on_host.answered(ms(5));
        assert!(on_host.is_near());
    }

    #[test]
    fn aws_is_never_near_unless_told_and_the_option_decides() {
        let ms = Duration::from_millis;
        let quick = |n: &Nearness| {
            for _ in 0..5 {
                n.answered(ms(1));
            }
            n.is_near()
        };
        for aws in [
            None,
            Some("https://s3.us-east-1.amazonaws.com"),
            Some("https://b.s3express-use1-az4.us-east-1.amazonaws.com"),
        ] {
            assert!(!quick(&Nearness::new(aws, NearServer::Auto)), "{aws:?}");
            assert!(Nearness::new(aws, NearServer::Yes).is_near(), "{aws:?}: yes is near from the start");
        }
        assert!(!quick(&Nearness::new(Some("http://127.0.0.1:9000"), NearServer::No)));
        assert!(quick(&Nearness::new(Some("http://minio.lan:9000"), NearServer::Auto)));
    }

    #[test]
    fn an_endpoint_on_this_host_is_told_by_its_host() {
        for near in [
            "http://127.0.0.1:9000",
            "http://localhost:8333/",
            "https://LOCALHOST",
            "http://[::1]:9000",
            "http://127.8.0.1",
        ] {
            assert!(host_of(near).is_some_and(|h| on_this_host(&h)), "{near}");
        }
        for far in
            ["https://s3.us-east-1.amazonaws.com", "http://10.0.0.5:9000", "http://[2001:db8::1]:9000", "not a url", ""]
        {
            assert!(!host_of(far).is_some_and(|h| on_this_host(&h)), "{far}");
        }
        assert!(is_aws("s3.eu-west-1.AMAZONAWS.com") && is_aws("s3.cn-north-1.amazonaws.com.cn"));
        assert!(!is_aws("amazonaws.com.example.org") && !is_aws("minio.local"));
    }

    #[test]
    fn a_multipart_etag_is_the_md5_of_its_parts_md5s() {
        // md5("a"), md5("b"); the expected value computed with Python's hashlib.
        let parts = [
            CompletedPart { number: 1, etag: "\"0cc175b9c0f1b6a831c399e269772661\"".into() },
            CompletedPart { number: 2, etag: "92EB5FFEE6AE2FEC3AD71C777531578F".into() },
        ];
        assert_eq!(multipart_etag(&parts).as_deref(), Some("96e024ba2074fe77e8e965ba43a704be-2"));
        let kms = [CompletedPart { number: 1, etag: "\"not-an-md5\"".into() }];
        assert_eq!(multipart_etag(&kms), None);
        let odd = [CompletedPart { number: 1, etag: "zz".repeat(16) }];
        assert_eq!(multipart_etag(&odd), None);
        let signed = [CompletedPart { number: 1, etag: "+1".repeat(16) }];
        assert_eq!(multipart_etag(&signed), None);
    }
}
