//! [`ObjectStore`] over aws-sdk-s3.
//!
//! Choices that matter for S3-compatible servers:
//! - path-style addressing whenever an endpoint is given (MinIO, SeaweedFS);
//! - request checksums only "when required": MinIO-derived servers reject the
//!   SDK's default CRC trailers on some requests;
//! - a custom CA bundle adds to the platform roots instead of replacing them;
//! - every attempt has a timeout, so a frozen server gives an error, not a hang;
//!   the SDK's standard retry (exponential backoff with jitter) handles 5xx,
//!   throttling, timeouts and broken connections.
//!
//! Credentials come from the standard AWS chain, or from key files (or
//! literals) given by the user. Key files are re-read when a request is
//! denied, so a rotated Kubernetes Secret works without a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as SdkPart};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use tracing::{info, warn};

use super::{BodyStream, CompletedPart, ListPage, ObjectMeta, ObjectStore, PutCondition, StoreError};
use crate::spec::{CredentialSource, S3Settings};

/// How long one body chunk may take to arrive before the read is abandoned.
const BODY_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// See the module documentation.
pub struct S3Store {
    bucket: String,
    settings: S3Settings,
    /// The client and its generation, bumped whenever it is rebuilt.
    client: RwLock<(Client, u64)>,
    /// The keys the current client was built with, when they come from files
    /// or literals; compared after a denial to detect a rotation.
    keys: tokio::sync::Mutex<Option<(String, String)>>,
    /// Keys asked for per LIST page when the caller sets no limit; drops to
    /// S3's 1,000 if the server rejects more.
    page_keys: AtomicI32,
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
        Ok(Self {
            bucket: bucket.to_string(),
            settings,
            client: RwLock::new((client, 0)),
            keys: tokio::sync::Mutex::new(keys),
            page_keys: AtomicI32::new(LIST_PAGE_KEYS),
        })
    }

    fn client(&self) -> (Client, u64) {
        self.client.read().unwrap_or_else(|e| e.into_inner()).clone()
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
                *self.client.write().unwrap_or_else(|e| e.into_inner()) = (client, used + 1);
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
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(settings.request_timeout)
                .build(),
        );
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
        SdkError::TimeoutError(_) => StoreError::Network("request timed out".to_string()),
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
                        let read = tokio::time::timeout(self.settings.request_timeout, ByteStream::new(body).collect());
                        let error = match read.await {
                            Ok(Ok(bytes)) => match super::list_xml::parse(&bytes.into_bytes()) {
                                Err(e) if e.is_transient() => e,
                                done => return done,
                            },
                            Ok(Err(e)) => StoreError::Network(format!("reading a LIST reply: {e}")),
                            Err(_) => StoreError::Network("timed out reading a LIST reply".to_string()),
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
        let out =
            self.call("head", |c| async move {
                c.head_object().bucket(&self.bucket).key(key).send().await.map_err(map_err)
            })
            .await?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or("").to_string(),
            last_modified: system_time(out.last_modified()),
        })
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
        let stream = futures::stream::unfold(Some(out.body), |body| async move {
            let mut body: ByteStream = body?;
            match tokio::time::timeout(BODY_CHUNK_TIMEOUT, body.try_next()).await {
                Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(body))),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => Some((Err(StoreError::Network(format!("reading body: {}", error_chain(&e)))), None)),
                Err(_) => Some((Err(StoreError::Network("reading body timed out".to_string())), None)),
            }
        });
        Ok(Box::pin(stream))
    }

    async fn put(&self, key: &str, body: Bytes, cond: PutCondition) -> Result<String, StoreError> {
        let out = self
            .call("put", |c| {
                let body = body.clone();
                let cond = cond.clone();
                async move {
                    let mut req = c.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(body));
                    req = match cond {
                        PutCondition::None => req,
                        PutCondition::IfAbsent => req.if_none_match("*"),
                        PutCondition::IfMatch(e) => req.if_match(e),
                    };
                    req.send().await.map_err(map_err)
                }
            })
            .await?;
        Ok(out.e_tag().unwrap_or("").to_string())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call("delete", |c| async move {
            c.delete_object().bucket(&self.bucket).key(key).send().await.map(|_| ()).map_err(map_err)
        })
        .await
    }

    async fn copy(&self, from: &str, to: &str) -> Result<String, StoreError> {
        let out = self
            .call("copy", |c| async move {
                c.copy_object()
                    .bucket(&self.bucket)
                    .key(to)
                    .copy_source(self.copy_source(from))
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await?;
        Ok(out.copy_object_result().and_then(|r| r.e_tag()).unwrap_or("").to_string())
    }

    async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        let out = self
            .call("create_multipart", |c| async move {
                c.create_multipart_upload().bucket(&self.bucket).key(key).send().await.map_err(map_err)
            })
            .await?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Server { status: 200, message: "no upload id in CreateMultipartUpload".into() })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError> {
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
                        .send()
                        .await
                        .map_err(map_err)
                }
            })
            .await?;
        Ok(CompletedPart { number, etag: out.e_tag().unwrap_or("").to_string() })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        from: &str,
        start: u64,
        end: u64,
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
                    req.send().await.map_err(map_err)
                }
            })
            .await?;
        Ok(out.e_tag().unwrap_or("").to_string())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.call("abort_multipart", |c| async move {
            c.abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await
                .map(|_| ())
                .map_err(map_err)
        })
        .await
    }
}

/// Shared handle to a store, as the file system holds it.
pub type SharedStore = Arc<dyn ObjectStore>;
