//! An in-process object store with S3's listing semantics, for unit and
//! property tests of the file-system core. It is deliberately simple: one
//! ordered map, ETags from a counter, multipart uploads kept in memory.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{
    BodyStream, CompletedPart, ListPage, ObjectAttrs, ObjectMeta, ObjectStore, OpenUpload, PutCondition, StoreError,
};

#[derive(Clone)]
struct Object {
    body: Bytes,
    etag: String,
    modified: SystemTime,
    attrs: ObjectAttrs,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Object>,
    /// Open multipart uploads by id: key, when created, parts sent.
    uploads: HashMap<String, (String, SystemTime, BTreeMap<i32, Bytes>)>,
    /// The attributes each open upload gives its object.
    upload_attrs: HashMap<String, ObjectAttrs>,
}

/// See the module documentation.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    counter: AtomicU64,
    /// Number of requests served, by operation, for tests that count traffic.
    pub requests: Mutex<HashMap<&'static str, u64>>,
    /// What [`ObjectStore::is_near`] reports (false by default).
    near: std::sync::atomic::AtomicBool,
    refusals: super::Refusals,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports the store as near, or not ([`ObjectStore::is_near`]).
    pub fn set_near(&self, near: bool) {
        self.near.store(near, Ordering::Relaxed);
    }

    fn count(&self, op: &'static str) {
        *self.requests.lock().unwrap().entry(op).or_default() += 1;
    }

    fn next_etag(&self) -> String {
        format!("\"{:032x}\"", self.counter.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Test helper: stores `body` under `key` unconditionally.
    pub fn insert(&self, key: &str, body: impl Into<Bytes>) -> String {
        self.insert_with(key, body, ObjectAttrs::default())
    }

    /// Test helper: stores `body` under `key` with `attrs`, unconditionally.
    pub fn insert_with(&self, key: &str, body: impl Into<Bytes>, attrs: ObjectAttrs) -> String {
        let etag = self.next_etag();
        let object = Object { body: body.into(), etag: etag.clone(), modified: SystemTime::now(), attrs };
        self.state.lock().unwrap().objects.insert(key.to_string(), object);
        etag
    }

    /// Test helper: the Content-Type and user metadata under `key`, if any.
    pub fn attrs(&self, key: &str) -> Option<ObjectAttrs> {
        self.state.lock().unwrap().objects.get(key).map(|o| o.attrs.clone())
    }

    /// Requests of operation `op` served so far.
    pub fn count_of(&self, op: &str) -> u64 {
        self.requests.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    /// Test helper: the body under `key`, if any.
    pub fn body(&self, key: &str) -> Option<Bytes> {
        self.state.lock().unwrap().objects.get(key).map(|o| o.body.clone())
    }

    /// Test helper: every key, in order.
    pub fn keys(&self) -> Vec<String> {
        self.state.lock().unwrap().objects.keys().cloned().collect()
    }

    /// Test helper: the multipart uploads created and neither completed nor
    /// aborted, as (key, upload id), ordered by key.
    pub fn open_uploads(&self) -> Vec<(String, String)> {
        let mut open: Vec<(String, String)> =
            self.state.lock().unwrap().uploads.iter().map(|(id, (key, _, _))| (key.clone(), id.clone())).collect();
        open.sort();
        open
    }

    /// Test helper: makes the upload `upload_id` look created at `when`.
    pub fn set_upload_initiated(&self, upload_id: &str, when: SystemTime) {
        if let Some(u) = self.state.lock().unwrap().uploads.get_mut(upload_id) {
            u.1 = when;
        }
    }

    fn check(state: &State, key: &str, cond: &PutCondition) -> Result<(), StoreError> {
        match (cond, state.objects.get(key)) {
            (PutCondition::IfAbsent, Some(_)) => Err(StoreError::PreconditionFailed),
            (PutCondition::IfMatch(e), Some(o)) if &o.etag != e => Err(StoreError::PreconditionFailed),
            (PutCondition::IfMatch(_), None) => Err(StoreError::PreconditionFailed),
            _ => Ok(()),
        }
    }

    fn meta(key: &str, o: &Object) -> ObjectMeta {
        ObjectMeta { key: key.to_string(), size: o.body.len() as u64, etag: o.etag.clone(), last_modified: o.modified }
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory://".to_string()
    }

    async fn check_bucket(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, StoreError> {
        self.count("list");
        let max = max_keys.unwrap_or(1000).max(1) as usize;
        let state = self.state.lock().unwrap();
        let start = match &token {
            Some(t) => Bound::Excluded(t.clone()),
            None => Bound::Included(prefix.to_string()),
        };
        let mut page = ListPage::default();
        let mut last: Option<String> = None;
        let mut iter = state.objects.range((start, Bound::Unbounded)).peekable();
        while let Some((key, obj)) = iter.next() {
            if !key.starts_with(prefix) {
                break;
            }
            if page.objects.len() + page.prefixes.len() >= max {
                page.next = last.clone();
                break;
            }
            let rest = &key[prefix.len()..];
            match rest.find('/').filter(|_| delimited) {
                Some(i) => {
                    let common = format!("{prefix}{}", &rest[..=i]);
                    // Skip every key sharing this common prefix.
                    while iter.peek().is_some_and(|(k, _)| k.starts_with(&common)) {
                        iter.next();
                    }
                    // The token must sort after every key under the prefix.
                    last = Some(format!("{common}\u{10FFFF}"));
                    page.prefixes.push(common);
                }
                None => {
                    page.objects.push(Self::meta(key, obj));
                    last = Some(key.clone());
                }
            }
        }
        Ok(page)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        self.count("head");
        let state = self.state.lock().unwrap();
        state.objects.get(key).map(|o| Self::meta(key, o)).ok_or(StoreError::NotFound)
    }

    async fn head_attrs(&self, key: &str) -> Result<(ObjectMeta, ObjectAttrs), StoreError> {
        self.count("head");
        let state = self.state.lock().unwrap();
        state.objects.get(key).map(|o| (Self::meta(key, o), o.attrs.clone())).ok_or(StoreError::NotFound)
    }

    fn is_near(&self) -> bool {
        self.near.load(Ordering::Relaxed)
    }

    fn refusals(&self) -> &super::Refusals {
        &self.refusals
    }

    async fn get_range(&self, key: &str, etag: Option<&str>, start: u64, end: u64) -> Result<BodyStream, StoreError> {
        self.count("get");
        let state = self.state.lock().unwrap();
        let obj = state.objects.get(key).ok_or(StoreError::NotFound)?;
        if etag.is_some_and(|e| e != obj.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let len = obj.body.len() as u64;
        if start >= len && !(start == 0 && len == 0) {
            return Err(StoreError::InvalidRange);
        }
        let body = obj.body.slice(start as usize..end.min(len) as usize);
        Ok(Box::pin(futures::stream::iter([Ok(body)])))
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
        self.count("put");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        Self::check(&state, key, &cond)?;
        let object = Object { body, etag: etag.clone(), modified: SystemTime::now(), attrs: attrs.clone() };
        state.objects.insert(key.to_string(), object);
        Ok(etag)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count("delete");
        self.state.lock().unwrap().objects.remove(key);
        Ok(())
    }

    async fn copy(&self, from: &str, to: &str, if_match: Option<&str>) -> Result<String, StoreError> {
        self.count("copy");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        // A copy keeps the source's metadata (`MetadataDirective: COPY`).
        let source = state.objects.get(from).ok_or(StoreError::NotFound)?;
        if if_match.is_some_and(|e| e != source.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let object = Object { etag: etag.clone(), modified: SystemTime::now(), ..source.clone() };
        state.objects.insert(to.to_string(), object);
        Ok(etag)
    }

    async fn copy_replace(
        &self,
        from: &str,
        to: &str,
        attrs: &ObjectAttrs,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        self.count("copy");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        let source = state.objects.get(from).ok_or(StoreError::NotFound)?;
        if if_match.is_some_and(|e| e != source.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let object =
            Object { body: source.body.clone(), etag: etag.clone(), modified: SystemTime::now(), attrs: attrs.clone() };
        state.objects.insert(to.to_string(), object);
        Ok(etag)
    }

    async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        self.create_multipart_with(key, &ObjectAttrs::default()).await
    }

    async fn create_multipart_with(&self, key: &str, attrs: &ObjectAttrs) -> Result<String, StoreError> {
        self.count("create_multipart");
        let id = format!("upload-{}", self.counter.fetch_add(1, Ordering::Relaxed));
        let mut state = self.state.lock().unwrap();
        state.uploads.insert(id.clone(), (key.to_string(), SystemTime::now(), BTreeMap::new()));
        state.upload_attrs.insert(id.clone(), attrs.clone());
        Ok(id)
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        self.count("upload_part");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        let upload = state.uploads.get_mut(upload_id).ok_or(StoreError::NotFound)?;
        upload.2.insert(number, body);
        Ok(CompletedPart { number, etag })
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_part_copy(
        &self,
        _key: &str,
        upload_id: &str,
        number: i32,
        from: &str,
        start: u64,
        end: u64,
        if_match: Option<&str>,
    ) -> Result<CompletedPart, StoreError> {
        self.count("upload_part_copy");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        let source = state.objects.get(from).ok_or(StoreError::NotFound)?;
        if if_match.is_some_and(|e| e != source.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let src = source.body.clone();
        if end > src.len() as u64 || start > end {
            return Err(StoreError::InvalidRange);
        }
        let upload = state.uploads.get_mut(upload_id).ok_or(StoreError::NotFound)?;
        upload.2.insert(number, src.slice(start as usize..end as usize));
        Ok(CompletedPart { number, etag })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> Result<String, StoreError> {
        self.count("complete_multipart");
        let etag = self.next_etag();
        let mut state = self.state.lock().unwrap();
        Self::check(&state, key, &cond)?;
        let (_, _, stored) = state.uploads.get(upload_id).ok_or(StoreError::NotFound)?;
        let stored = stored.clone();
        let mut body = BytesMut::new();
        for p in &parts {
            body.extend_from_slice(stored.get(&p.number).ok_or(StoreError::InvalidRange)?);
        }
        state.uploads.remove(upload_id);
        let attrs = state.upload_attrs.remove(upload_id).unwrap_or_default();
        // A multipart ETag, as S3 forms it, answered as stored.
        let etag = format!("{}-{}\"", &etag[..etag.len() - 1], parts.len());
        let object = Object { body: body.freeze(), etag: etag.clone(), modified: SystemTime::now(), attrs };
        state.objects.insert(key.to_string(), object);
        Ok(etag)
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.count("abort_multipart");
        let mut state = self.state.lock().unwrap();
        state.uploads.remove(upload_id);
        state.upload_attrs.remove(upload_id);
        Ok(())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StoreError> {
        self.count("list_multipart_uploads");
        let state = self.state.lock().unwrap();
        let mut open: Vec<OpenUpload> = state
            .uploads
            .iter()
            .filter(|(_, (key, _, _))| key.starts_with(prefix))
            .map(|(id, (key, initiated, _))| OpenUpload {
                key: key.clone(),
                upload_id: id.clone(),
                initiated: *initiated,
            })
            .collect();
        open.sort_by(|a, b| (&a.key, a.initiated).cmp(&(&b.key, b.initiated)));
        Ok(open)
    }
}
