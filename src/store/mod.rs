//! The object-store boundary.
//!
//! Everything above this module speaks in keys, byte ranges and ETags; nothing
//! above it knows about HTTP. [`ObjectStore`] is implemented by [`s3::S3Store`]
//! (aws-sdk-s3, for real servers) and [`memory::MemoryStore`] (in-process, for
//! unit and property tests), so the file-system core runs unchanged over both.
//!
//! One store serves one bucket; keys are full keys inside that bucket. Mount
//! prefixes are the file system's business, not the store's.

pub mod faulty;
pub mod list_xml;
pub mod memory;
pub mod s3;
pub mod strays;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

/// What a listing or a HEAD knows about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// The ETag exactly as the server sent it (quotes included), so it can be
    /// echoed back in `If-Match`.
    pub etag: String,
    pub last_modified: SystemTime,
}

/// What a HEAD knows about an object beyond [`ObjectMeta`], and what an
/// upload or a copy sets: the Content-Type and the user metadata. Listings
/// carry neither.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectAttrs {
    pub content_type: Option<String>,
    /// User metadata: names without `x-amz-meta-`, in lower case.
    pub metadata: BTreeMap<String, String>,
}

impl ObjectAttrs {
    /// Attributes with only a Content-Type.
    pub fn typed(content_type: Option<String>) -> Self {
        Self { content_type, metadata: BTreeMap::new() }
    }

    /// The bytes S3 counts against its 2 KB user-metadata limit: names (with
    /// the `x-amz-meta-` prefix left out, as AWS counts them) and values.
    pub fn metadata_len(&self) -> usize {
        self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Lower-case hex of `bytes`: digests as S3's ETags and the disk cache's
/// file names spell them.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One page of a ListObjectsV2 answer.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes, each ending with the delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page, if the listing is truncated.
    pub next: Option<String>,
}

/// A body arriving in chunks, so readers can be served before a large ranged
/// GET has finished.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// Preconditions on a write, used to turn a concurrent overwrite by another
/// client into an error instead of a silent loss.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PutCondition {
    /// Write unconditionally.
    #[default]
    None,
    /// Only if no object exists under the key (`If-None-Match: *`).
    IfAbsent,
    /// Only if the current object has this ETag (`If-Match`).
    IfMatch(String),
}

/// A part of a multipart upload that has been sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    pub number: i32,
    pub etag: String,
}

/// A multipart upload that was created and neither completed nor aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: SystemTime,
}

/// Why a store operation failed. Mapped to an errno at the FUSE edge only.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("no such key")]
    NotFound,
    #[error("no such bucket")]
    NoSuchBucket,
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// If-Match / If-None-Match did not hold: the object changed or exists.
    #[error("precondition failed (the object was changed by another client)")]
    PreconditionFailed,
    #[error("requested range not satisfiable")]
    InvalidRange,
    /// The server could not be reached, or the connection broke or timed out.
    #[error("network error: {0}")]
    Network(String),
    /// The server answered with an error status.
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    /// A prefetch stopped because the handle it read ahead for was closed;
    /// a reader waiting for one of its blocks fetches the block itself.
    #[error("prefetch cancelled: its handle was closed")]
    Cancelled,
}

impl StoreError {
    /// True for failures that may go away by themselves (network, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Network(_) => true,
            StoreError::Server { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A server that has answered a request (headers received, a refusal
/// included) within this is near: at most a LAN away. S3 takes several
/// milliseconds or more to answer even within its region.
pub const NEAR_ANSWER: std::time::Duration = std::time::Duration::from_millis(3);
/// The same for an endpoint on this host, whose server may be slower to
/// answer than a LAN's (SeaweedFS takes about 2 ms for a HEAD) but is not
/// far: slower still, it is a proxy to somewhere else, and that is far.
pub const NEAR_ANSWER_ON_HOST: std::time::Duration = std::time::Duration::from_millis(10);

/// Conditions a server was found to refuse (a 400 or 501), remembered per
/// store, that is per mount's bucket: requests to it then go without them,
/// and other mounts keep theirs. Each is warned about once.
#[derive(Debug, Default)]
pub struct Refusals {
    conditional_writes: std::sync::atomic::AtomicBool,
    copy_conditions: std::sync::atomic::AtomicBool,
}

impl Refusals {
    /// `If-Match` and `If-None-Match` on PUTs and multipart completions.
    pub fn conditional_writes(&self) -> bool {
        !self.conditional_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn refuse_conditional_writes(&self, store: &str) {
        if !self.conditional_writes.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "{store}: the server rejects conditional writes; concurrent changes by other clients will not be \
                 detected"
            );
        }
    }

    /// `x-amz-copy-source-if-match` on copies (renames, metadata changes).
    pub fn copy_conditions(&self) -> bool {
        self.conditional_writes() && !self.copy_conditions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `why`: what the server did.
    pub fn refuse_copy_conditions(&self, store: &str, why: &str) {
        if !self.copy_conditions.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "{store}: the server {why}; copies go without it, so a file another client replaces during a \
                 rename may show its previous size for a metadata TTL"
            );
        }
    }
}

/// Runs a write `f` with condition `cond`, or without it where `store`'s
/// server refuses conditional writes; and, when the server rejects the
/// condition (400, 501), once more without it, which `store` then remembers.
pub async fn with_condition<T, F, Fut>(store: &dyn ObjectStore, cond: PutCondition, f: F) -> Result<T, StoreError>
where
    F: Fn(PutCondition) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let refusals = store.refusals();
    let cond = if refusals.conditional_writes() { cond } else { PutCondition::None };
    match f(cond.clone()).await {
        Err(StoreError::Server { status: 400 | 501, .. }) if cond != PutCondition::None => {
            refusals.refuse_conditional_writes(&store.describe());
            f(PutCondition::None).await
        }
        other => other,
    }
}

/// The operations bucketfs needs from an object store.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A short name for logs, such as `s3://bucket`. Never contains secrets.
    fn describe(&self) -> String;

    /// Checks that the bucket exists and that the credentials may use it.
    async fn check_bucket(&self) -> Result<(), StoreError>;

    /// Re-reads credentials from wherever they come from (key files).
    async fn reload_credentials(&self) {}

    /// One page of ListObjectsV2 under `prefix`, with `/` as delimiter when
    /// `delimited` is true.
    async fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError>;

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError>;

    /// HEAD with the object's Content-Type and user metadata (the same one
    /// request). Stores that keep none answer empty attributes.
    async fn head_attrs(&self, key: &str) -> Result<(ObjectMeta, ObjectAttrs), StoreError> {
        Ok((self.head(key).await?, ObjectAttrs::default()))
    }

    /// Bytes `start..end` of `key`. With `etag`, the read carries `If-Match`
    /// and fails with [`StoreError::PreconditionFailed`] if the object changed.
    async fn get_range(&self, key: &str, etag: Option<&str>, start: u64, end: u64) -> Result<BodyStream, StoreError>;

    /// True if the server is near: it has answered requests within
    /// [`NEAR_ANSWER`] (a LAN away), or within [`NEAR_ANSWER_ON_HOST`] from
    /// this host. Readers size their prefetch GETs by it (see `fs::read`).
    fn is_near(&self) -> bool {
        false
    }

    /// The conditions this store's server was found to refuse.
    fn refusals(&self) -> &Refusals;

    /// Single-request upload. Returns the new ETag.
    async fn put(&self, key: &str, body: Bytes, cond: PutCondition) -> Result<String, StoreError>;

    /// [`Self::put`] setting the Content-Type and user metadata.
    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        cond: PutCondition,
        attrs: &ObjectAttrs,
    ) -> Result<String, StoreError> {
        let _ = attrs;
        self.put(key, body, cond).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Server-side copy of a whole object (up to 5 GiB). With `if_match`,
    /// the copy fails with [`StoreError::PreconditionFailed`] unless the
    /// source has that ETag (it copies the version the caller knows).
    /// Returns the new ETag.
    async fn copy(&self, from: &str, to: &str, if_match: Option<&str>) -> Result<String, StoreError>;

    /// Server-side copy (up to 5 GiB) that replaces the Content-Type and
    /// user metadata (`MetadataDirective: REPLACE`); `from` may be `to`,
    /// which is how an object's metadata is changed. With `if_match`, the
    /// copy fails with [`StoreError::PreconditionFailed`] unless the source
    /// has that ETag. Returns the new ETag.
    async fn copy_replace(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttrs,
        if_match: Option<&str>,
    ) -> Result<String, StoreError>;

    async fn create_multipart(&self, key: &str) -> Result<String, StoreError>;

    /// [`Self::create_multipart`] setting the object's Content-Type and
    /// user metadata (which the completed object carries).
    async fn create_multipart_with(&self, key: &str, attrs: &ObjectAttrs) -> Result<String, StoreError> {
        let _ = attrs;
        self.create_multipart(key).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError>;

    /// UploadPartCopy: bytes `start..end` of `from` become part `number`;
    /// with `if_match`, only if `from` has that ETag, so that parts copied
    /// one by one all come from one version.
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
    ) -> Result<CompletedPart, StoreError>;

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> Result<String, StoreError>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;

    /// Every multipart upload under `prefix` that is still open (created, and
    /// neither completed nor aborted), all pages, ordered by key.
    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StoreError>;
}

/// Reads a whole body stream into one buffer.
pub async fn collect_body(mut body: BodyStream) -> Result<Bytes, StoreError> {
    use futures::StreamExt;
    let mut first: Option<Bytes> = None;
    let mut buf: Option<bytes::BytesMut> = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        match (&mut first, &mut buf) {
            (None, None) => first = Some(chunk),
            (Some(f), None) => {
                let mut b = bytes::BytesMut::with_capacity(f.len() + chunk.len());
                b.extend_from_slice(f);
                b.extend_from_slice(&chunk);
                first = None;
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, buf) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}
