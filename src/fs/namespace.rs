//! Mapping between S3 keys and file names: pure functions, no I/O.
//!
//! Rules (the same ones mountpoint-s3 documents, plus logged warnings):
//! - every key under a directory's prefix is a file, every common prefix a
//!   directory; no marker objects are needed;
//! - the zero-byte `dir/` marker of the directory itself is not an entry;
//! - when `a` and `a/...` both exist, the directory wins and the file is hidden;
//! - a component that cannot be a file name (empty, `.`, `..`, longer than
//!   255 bytes, containing NUL) is skipped;
//! - `name_$folder$` (the directory object of s3fs and old S3 tools) is the
//!   directory `name`; `name/` markers (goofys, rclone, the S3 console) are
//!   directories like any common prefix.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use crate::store::ObjectMeta;

/// Longest file name Linux accepts, in bytes.
pub const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    File,
    Dir,
}

/// One entry of a directory, as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// For files: size, ETag and mtime from the listing.
    pub size: u64,
    pub etag: Option<String>,
    pub mtime: SystemTime,
}

impl Entry {
    pub fn dir(name: &str) -> Self {
        Entry { name: name.to_string(), kind: Kind::Dir, size: 0, etag: None, mtime: SystemTime::UNIX_EPOCH }
    }

    pub fn file(name: &str, meta: &ObjectMeta) -> Self {
        Entry {
            name: name.to_string(),
            kind: Kind::File,
            size: meta.size,
            etag: Some(meta.etag.clone()),
            mtime: meta.last_modified,
        }
    }
}

/// Why a key was left out of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// The key's name is not a valid file name.
    InvalidName { key: String },
    /// A file hidden by a directory of the same name.
    ShadowedByDir { key: String },
}

/// Checks that `name` can be a file name.
pub fn valid_name(name: &str) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > NAME_MAX
        || name.contains('\0')
        || name.contains('/'))
}

/// Builds a directory's entries from a delimited listing of `prefix`
/// (all pages concatenated). Returns the entries sorted by name, and what was
/// skipped, for the caller to log.
pub fn entries_from_listing(prefix: &str, objects: &[ObjectMeta], prefixes: &[String]) -> (Vec<Entry>, Vec<Skipped>) {
    let mut listing = PagedEntries::new(prefix);
    let mut entries = listing.page(objects, prefixes);
    entries.extend(listing.finish());
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (entries, listing.skipped)
}

/// Turns a delimited listing into entries page by page, so a directory can
/// be shown while its later pages are still being listed.
///
/// A file `a` is hidden by a directory `a/`, which S3's key order may put on
/// a later page (`a-b`, `a.txt` sort between them). A file is therefore held
/// back until the listing has passed the place where `a/` would be, or ends.
/// Directories are final at once. A name is given out only once.
#[derive(Debug)]
pub struct PagedEntries {
    prefix: String,
    /// Names given out, and what they were given out as (a directory hides
    /// a file of its name).
    given: HashMap<String, Kind>,
    /// Files a later page could still hide; never given out yet.
    held: BTreeMap<String, Entry>,
    /// The greatest key or common prefix listed so far.
    last: String,
    /// What was left out, for the caller to log.
    pub skipped: Vec<Skipped>,
}

impl PagedEntries {
    pub fn new(prefix: &str) -> Self {
        PagedEntries {
            prefix: prefix.to_string(),
            given: HashMap::new(),
            held: BTreeMap::new(),
            last: String::new(),
            skipped: Vec::new(),
        }
    }

    /// Takes the next page (in S3's key order) and returns the entries that
    /// no later page can change, sorted by name.
    pub fn page(&mut self, objects: &[ObjectMeta], prefixes: &[String]) -> Vec<Entry> {
        let greatest = objects.iter().map(|o| o.key.as_str()).chain(prefixes.iter().map(String::as_str)).max();
        if let Some(g) = greatest
            && g > self.last.as_str()
        {
            self.last = g.to_string();
        }
        let mut out = Vec::new();
        for p in prefixes {
            let Some(name) = p.strip_prefix(&self.prefix).and_then(|n| n.strip_suffix('/')) else {
                continue;
            };
            if !valid_name(name) {
                self.skipped.push(Skipped::InvalidName { key: p.clone() });
            } else if !self.given.contains_key(name) {
                if self.held.remove(name).is_some() {
                    self.skipped.push(Skipped::ShadowedByDir { key: child_key(&self.prefix, name) });
                }
                self.given.insert(name.to_string(), Kind::Dir);
                out.push(Entry::dir(name));
            }
        }
        for o in objects {
            let Some(name) = o.key.strip_prefix(&self.prefix) else {
                continue;
            };
            if name.is_empty() {
                continue; // the directory's own marker
            }
            if !valid_name(name) {
                // A key such as `dir//` is listed as an object by some servers.
                self.skipped.push(Skipped::InvalidName { key: o.key.clone() });
                continue;
            }
            // `name_$folder$`: a directory object of s3fs and old S3 tools.
            if let Some(dir) = super::posix::folder_object_name(name).filter(|d| valid_name(d)) {
                if !matches!(self.given.get(dir), Some(Kind::Dir)) {
                    if self.held.remove(dir).is_some() || self.given.contains_key(dir) {
                        self.skipped.push(Skipped::ShadowedByDir { key: child_key(&self.prefix, dir) });
                    }
                    self.given.insert(dir.to_string(), Kind::Dir);
                    out.push(Entry::dir(dir));
                }
                continue;
            }
            match self.given.get(name) {
                Some(Kind::Dir) => self.skipped.push(Skipped::ShadowedByDir { key: o.key.clone() }),
                Some(Kind::File) => {} // listed twice: given out already
                None if dir_listed_by(&self.prefix, name, &self.last) => {
                    self.held.remove(name);
                    self.given.insert(name.to_string(), Kind::File);
                    out.push(Entry::file(name, o));
                }
                None => {
                    self.held.insert(name.to_string(), Entry::file(name, o));
                }
            }
        }
        // Files held from earlier pages that this page has passed.
        let (prefix, last) = (&self.prefix, &self.last);
        for (name, file) in self.held.extract_if(.., |name, _| dir_listed_by(prefix, name, last)) {
            self.given.insert(name, Kind::File);
            out.push(file);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// After the last page: every file still held.
    pub fn finish(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.held).into_values().collect()
    }
}

/// True if the directory `name/` inside `prefix` sorts at or before `last`,
/// the greatest key listed so far: had it existed, it was listed already.
fn dir_listed_by(prefix: &str, name: &str, last: &str) -> bool {
    let dir = prefix.bytes().chain(name.bytes()).chain(std::iter::once(b'/'));
    dir.cmp(last.bytes()) != std::cmp::Ordering::Greater
}

/// The key of `name` inside the directory whose prefix is `dir_prefix`.
pub fn child_key(dir_prefix: &str, name: &str) -> String {
    let mut k = String::with_capacity(dir_prefix.len() + name.len());
    k.push_str(dir_prefix);
    k.push_str(name);
    k
}

/// The prefix of directory `name` inside `dir_prefix`.
pub fn child_prefix(dir_prefix: &str, name: &str) -> String {
    let mut k = child_key(dir_prefix, name);
    k.push('/');
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{ListPage, ObjectStore};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta { key: key.into(), size: 1, etag: "\"e\"".into(), last_modified: SystemTime::UNIX_EPOCH }
    }

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("ünïcødé file+%.txt"));
        for bad in ["", ".", "..", "a/b", "x\0y"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&"x".repeat(255)));
        assert!(!valid_name(&"x".repeat(256)));
    }

    #[test]
    fn markers_of_other_tools_are_directories() {
        // goofys and rclone write `d/` markers; s3fs and old tools `e_$folder$`.
        let objects = [meta("p/a"), meta("p/d/"), meta("p/e_$folder$"), meta("p/_$folder$")];
        let prefixes = ["p/d/".to_string()];
        let (entries, _) = entries_from_listing("p/", &objects, &prefixes);
        let got: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(got, [("_$folder$", Kind::File), ("a", Kind::File), ("d", Kind::Dir), ("e", Kind::Dir)]);
    }

    #[test]
    fn directory_wins_marker_hidden_bad_names_skipped() {
        let objects = [meta("p/"), meta("p/a"), meta("p/b"), meta("p/."), meta(&format!("p/{}", "y".repeat(300)))];
        let prefixes = ["p/a/".to_string(), "p//".to_string(), "p/../".to_string(), "p/c/".to_string()];
        let (entries, skipped) = entries_from_listing("p/", &objects, &prefixes);
        let got: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(got, [("a", Kind::Dir), ("b", Kind::File), ("c", Kind::Dir)]);
        assert!(skipped.contains(&Skipped::ShadowedByDir { key: "p/a".into() }));
        assert_eq!(skipped.len(), 5);
    }

    async fn list_all(store: &MemoryStore, prefix: &str, page: i32) -> ListPage {
        let mut all = ListPage::default();
        let mut token = None;
        loop {
            let p = store.list(prefix, true, token, Some(page)).await.unwrap();
            all.objects.extend(p.objects);
            all.prefixes.extend(p.prefixes);
            token = p.next;
            if token.is_none() {
                return all;
            }
        }
    }

    /// The expected top-level view of `keys` under `prefix`, computed
    /// directly from the keys rather than from a delimited listing.
    fn model(keys: &BTreeSet<String>, prefix: &str) -> Vec<(String, Kind)> {
        let mut dirs = BTreeSet::new();
        let mut files = BTreeSet::new();
        for k in keys {
            let Some(rest) = k.strip_prefix(prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((c, _)) => {
                    if valid_name(c) {
                        dirs.insert(c.to_string());
                    }
                }
                None => {
                    if valid_name(rest) {
                        files.insert(rest.to_string());
                    }
                }
            }
        }
        let mut out: BTreeMap<String, Kind> = files.into_iter().map(|f| (f, Kind::File)).collect();
        for d in dirs {
            out.insert(d, Kind::Dir);
        }
        out.into_iter().collect()
    }

    /// A memory store holding `keys`, and a runtime to list it with.
    fn store_of(keys: &BTreeSet<String>) -> (MemoryStore, tokio::runtime::Runtime) {
        let store = MemoryStore::new();
        for k in keys {
            store.insert(k, "x");
        }
        (store, tokio::runtime::Builder::new_current_thread().build().unwrap())
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        // Small alphabet so clashes, markers and empty components are common.
        prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("/"), Just("."), Just("é"), Just("%+ ")], 1..7)
            .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn listing_matches_model(keys in prop::collection::btree_set(key_strategy(), 0..40),
                                 prefix in prop_oneof![Just(""), Just("a/"), Just("b/a/")],
                                 page in 1i32..5) {
            let (store, rt) = store_of(&keys);
            let all = rt.block_on(list_all(&store, prefix, page));
            let (entries, _) = entries_from_listing(prefix, &all.objects, &all.prefixes);
            let got: Vec<(String, Kind)> = entries.into_iter().map(|e| (e.name, e.kind)).collect();
            prop_assert_eq!(got, model(&keys, prefix));
        }

        /// Entries given out page by page, as `readdir` streams them, end
        /// up the same as the whole listing's, each name once, and a file
        /// is never given out before a later page could still hide it.
        #[test]
        fn paged_entries_match_model(keys in prop::collection::btree_set(key_strategy(), 0..40),
                                     prefix in prop_oneof![Just(""), Just("a/"), Just("b/a/")],
                                     page in 1i32..5) {
            let (store, rt) = store_of(&keys);
            let want = model(&keys, prefix);
            let mut paged = PagedEntries::new(prefix);
            let mut got: Vec<Entry> = Vec::new();
            let mut token = None;
            loop {
                let p = rt.block_on(store.list(prefix, true, token, Some(page))).unwrap();
                for e in paged.page(&p.objects, &p.prefixes) {
                    prop_assert!(want.contains(&(e.name.clone(), e.kind)), "{:?} given out early or wrongly", e);
                    got.push(e);
                }
                token = p.next;
                if token.is_none() {
                    break;
                }
            }
            got.extend(paged.finish());
            let mut names: Vec<(String, Kind)> = got.into_iter().map(|e| (e.name, e.kind)).collect();
            names.sort();
            prop_assert_eq!(names, want);
        }
    }
}
