//! A store that fails on purpose: it wraps another store and fails, delays,
//! hangs or breaks off chosen operations, picked by name, by count or by
//! chance (from a seed, so a failing run can be repeated). The file-system
//! core's cleanup paths (a failed upload, a failed copy, an abort that fails
//! too, a server that stops answering) are tested through it without root,
//! a mount or a server.
//!
//! Operation names are those of the metrics: `list`, `head`, `get`, `put`,
//! `delete`, `copy`, `create_multipart`, `upload_part`, `upload_part_copy`,
//! `complete_multipart`, `abort_multipart`, `list_multipart_uploads`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    BodyStream, CompletedPart, ListPage, ObjectAttrs, ObjectMeta, ObjectStore, OpenUpload, PutCondition, StoreError,
};
use crate::sync::Mutex;

/// What a rule does to a call it picks.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The call fails with this error.
    Fail(StoreError),
    /// The call waits this long, then goes through.
    Delay(Duration),
    /// The call waits this long, then fails with this error.
    FailAfter(Duration, StoreError),
    /// The call never answers (until its caller gives up on it).
    Hang,
    /// A GET answers, then its body breaks off after the first chunk.
    BreakBody,
    /// A HEAD, LIST or PUT goes through at once, but its answer is held back until the
    /// test lets it go (`notify_one`): it then tells what the object was
    /// when the server read it.
    HeldAnswer(Arc<tokio::sync::Notify>),
}

/// Which calls a [`Fault`] applies to.
#[derive(Clone, Debug)]
pub struct Rule {
    pub op: &'static str,
    pub fault: Fault,
    /// Calls of `op` let through before the rule starts.
    pub after: u64,
    /// Calls it applies to once started (`u64::MAX`: all).
    pub times: u64,
    /// Chance that a call it could apply to is picked (1.0: every one).
    pub probability: f64,
    seen: u64,
    applied: u64,
}

impl Rule {
    /// Every call of `op`.
    pub fn always(op: &'static str, fault: Fault) -> Self {
        Self { op, fault, after: 0, times: u64::MAX, probability: 1.0, seen: 0, applied: 0 }
    }

    /// Call number `n` (0-based) of `op`, once.
    pub fn nth(op: &'static str, n: u64, fault: Fault) -> Self {
        Self { after: n, times: 1, ..Self::always(op, fault) }
    }

    /// Calls of `op` with chance `p` each.
    pub fn sometimes(op: &'static str, p: f64, fault: Fault) -> Self {
        Self { probability: p, ..Self::always(op, fault) }
    }
}

struct State {
    rules: Vec<Rule>,
    rng: u64,
    injected: u64,
}

/// See the module documentation.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Mutex<State>,
    /// HEADs running now, and the most that ever ran at once.
    heads: std::sync::atomic::AtomicUsize,
    most_heads: std::sync::atomic::AtomicUsize,
}

/// One HEAD running (see [`FaultyStore::most_heads_at_once`]).
struct HeadRunning<'a>(&'a FaultyStore);

impl Drop for HeadRunning<'_> {
    fn drop(&mut self) {
        self.0.heads.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64) -> Self {
        Self {
            inner,
            state: Mutex::new(State { rules: Vec::new(), rng: seed | 1, injected: 0 }),
            heads: Default::default(),
            most_heads: Default::default(),
        }
    }

    /// The most HEADs that were running at once, delays included.
    pub fn most_heads_at_once(&self) -> usize {
        self.most_heads.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn head_running(&self) -> HeadRunning<'_> {
        let now = self.heads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.most_heads.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        HeadRunning(self)
    }

    pub fn add(&self, rule: Rule) {
        self.state.lock().rules.push(rule);
    }

    /// Removes every rule: the store behaves again.
    pub fn clear(&self) {
        self.state.lock().rules.clear();
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().injected
    }

    /// The fault to apply to this call of `op`, if any.
    fn pick(&self, op: &str) -> Option<Fault> {
        let mut st = self.state.lock();
        let State { rules, rng, injected } = &mut *st;
        for rule in rules.iter_mut().filter(|r| r.op == op) {
            rule.seen += 1;
            if rule.seen <= rule.after || rule.applied >= rule.times {
                continue;
            }
            // xorshift64: reproducible from the seed, no dependency.
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            if rule.probability < 1.0 && (*rng >> 11) as f64 / (1u64 << 53) as f64 >= rule.probability {
                continue;
            }
            rule.applied += 1;
            *injected += 1;
            return Some(rule.fault.clone());
        }
        None
    }

    /// Applies the fault for `op` before the call: an error, a delay or a hang.
    async fn before(&self, op: &str) -> Result<Option<Fault>, StoreError> {
        match self.pick(op) {
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            Some(Fault::FailAfter(d, e)) => {
                tokio::time::sleep(d).await;
                Err(e)
            }
            Some(Fault::Hang) => std::future::pending().await,
            other => Ok(other),
        }
    }
}

/// Holds an answer back for [`Fault::HeldAnswer`].
async fn late(fault: Option<Fault>) {
    if let Some(Fault::HeldAnswer(gate)) = fault {
        gate.notified().await;
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn check_bucket(&self) -> Result<(), StoreError> {
        self.before("list").await?;
        self.inner.check_bucket().await
    }

    async fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError> {
        let fault = self.before("list").await?;
        let answer = self.inner.list(prefix, delimited, token, max_keys).await;
        late(fault).await;
        answer
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let _running = self.head_running();
        let fault = self.before("head").await?;
        let answer = self.inner.head(key).await;
        late(fault).await;
        answer
    }

    async fn head_attrs(&self, key: &str) -> Result<(ObjectMeta, ObjectAttrs), StoreError> {
        let _running = self.head_running();
        let fault = self.before("head").await?;
        let answer = self.inner.head_attrs(key).await;
        late(fault).await;
        answer
    }

    fn is_near(&self) -> bool {
        self.inner.is_near()
    }

    fn refusals(&self) -> &crate::store::Refusals {
        self.inner.refusals()
    }

    async fn get_range(&self, key: &str, etag: Option<&str>, start: u64, end: u64) -> Result<BodyStream, StoreError> {
        let fault = self.before("get").await?;
        let body = self.inner.get_range(key, etag, start, end).await?;
        Ok(match fault {
            Some(Fault::BreakBody) => {
                let broken = StoreError::Network("the body broke off (injected)".into());
                Box::pin(body.take(1).chain(futures::stream::once(async move { Err(broken) })))
            }
            _ => body,
        })
    }

    async fn put(&self, key: &str, body: Bytes, cond: PutCondition) -> Result<String, StoreError> {
        let fault = self.before("put").await?;
        let answer = self.inner.put(key, body, cond).await;
        late(fault).await;
        answer
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        cond: PutCondition,
        attrs: &ObjectAttrs,
    ) -> Result<String, StoreError> {
        let fault = self.before("put").await?;
        let answer = self.inner.put_with(key, body, cond, attrs).await;
        late(fault).await;
        answer
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.before("delete").await?;
        self.inner.delete(key).await
    }

    async fn copy(&self, from: &str, to: &str, if_match: Option<&str>) -> Result<String, StoreError> {
        self.before("copy").await?;
        self.inner.copy(from, to, if_match).await
    }

    async fn copy_replace(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttrs,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        self.before("copy").await?;
        self.inner.copy_replace(from, to, attrs, if_match).await
    }

    async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        self.before("create_multipart").await?;
        self.inner.create_multipart(key).await
    }

    async fn create_multipart_with(&self, key: &str, attrs: &ObjectAttrs) -> Result<String, StoreError> {
        self.before("create_multipart").await?;
        self.inner.create_multipart_with(key, attrs).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        self.before("upload_part").await?;
        self.inner.upload_part(key, upload_id, number, body).await
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
        self.before("upload_part_copy").await?;
        self.inner.upload_part_copy(key, upload_id, number, from, start, end, if_match).await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> Result<String, StoreError> {
        self.before("complete_multipart").await?;
        self.inner.complete_multipart(key, upload_id, parts, cond).await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.before("abort_multipart").await?;
        self.inner.abort_multipart(key, upload_id).await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StoreError> {
        self.before("list_multipart_uploads").await?;
        self.inner.list_multipart_uploads(prefix).await
    }
}
