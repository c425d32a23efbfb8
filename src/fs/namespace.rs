//! Mapping between S3 keys and file names: pure functions, no I/O.
//!
//! Rules (the same ones mountpoint-s3 documents, plus logged warnings):
//! - every key under a directory's prefix is a file, every common prefix a
//!   directory; no marker objects are needed;
//! - the zero-byte `dir/` marker of the directory itself is not an entry;
//! - when `a` and `a/...` both exist, the directory wins and the file is hidden;
//! - a component that cannot be a file name (empty, `.`, `..`, longer than
//!   255 bytes, containing NUL) is skipped.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::store::ObjectMeta;

/// Longest file name Linux accepts, in bytes.
pub const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    let mut skipped = Vec::new();
    let mut entries: BTreeMap<&str, Entry> = BTreeMap::new();
    for p in prefixes {
        let Some(name) = p.strip_prefix(prefix).and_then(|n| n.strip_suffix('/')) else {
            continue;
        };
        if valid_name(name) {
            entries.insert(name, Entry::dir(name));
        } else {
            skipped.push(Skipped::InvalidName { key: p.clone() });
        }
    }
    for o in objects {
        let Some(name) = o.key.strip_prefix(prefix) else {
            continue;
        };
        if name.is_empty() {
            continue; // the directory's own marker
        }
        if !valid_name(name) {
            // A key such as `dir//` is listed as an object by some servers.
            skipped.push(Skipped::InvalidName { key: o.key.clone() });
            continue;
        }
        match entries.get(name) {
            Some(e) if e.kind == Kind::Dir => skipped.push(Skipped::ShadowedByDir { key: o.key.clone() }),
            _ => {
                entries.insert(name, Entry::file(name, o));
            }
        }
    }
    (entries.into_values().collect(), skipped)
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
            let store = MemoryStore::new();
            for k in &keys {
                store.insert(k, "x");
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let all = rt.block_on(list_all(&store, prefix, page));
            let (entries, _) = entries_from_listing(prefix, &all.objects, &all.prefixes);
            let got: Vec<(String, Kind)> = entries.into_iter().map(|e| (e.name, e.kind)).collect();
            prop_assert_eq!(got, model(&keys, prefix));
        }
    }
}
