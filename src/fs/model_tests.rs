//! Reference-model test: random sequences of create, write, append,
//! truncate, rename, unlink, mkdir and rmdir are applied to the file system
//! (over the in-memory store) and to a tiny model of a directory tree; after
//! every operation the outcomes must agree, and at the end both the mounted
//! view and the bucket's objects must equal the model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::namespace::Kind;
use super::{Fs, FsError, MountPoint};
use crate::spec::FsSettings;
use crate::store::memory::MemoryStore;

const DIRS: [&str; 3] = ["", "d0", "d1"];
const NAMES: [&str; 3] = ["f0", "f1", "f2"];

#[derive(Clone, Debug)]
enum Op {
    Create(usize, usize, Vec<u8>),
    Append(usize, usize, Vec<u8>),
    Write(usize, usize, u16, Vec<u8>),
    Truncate(usize, usize, u16),
    Rename(usize, usize, usize, usize),
    Unlink(usize, usize),
    Mkdir(usize),
    Rmdir(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DIRS.len();
    let n = 0..NAMES.len();
    let data = prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (d.clone(), n.clone(), data.clone()).prop_map(|(d, n, v)| Op::Create(d, n, v)),
        (d.clone(), n.clone(), data.clone()).prop_map(|(d, n, v)| Op::Append(d, n, v)),
        (d.clone(), n.clone(), 0u16..400, data).prop_map(|(d, n, o, v)| Op::Write(d, n, o, v)),
        (d.clone(), n.clone(), 0u16..400).prop_map(|(d, n, l)| Op::Truncate(d, n, l)),
        (d.clone(), n.clone(), d.clone(), n.clone()).prop_map(|(a, b, c, e)| Op::Rename(a, b, c, e)),
        (d.clone(), n).prop_map(|(d, n)| Op::Unlink(d, n)),
        (1..DIRS.len()).prop_map(Op::Mkdir),
        (1..DIRS.len()).prop_map(Op::Rmdir),
    ]
}

fn path(d: usize, n: usize) -> String {
    if DIRS[d].is_empty() { NAMES[n].to_string() } else { format!("{}/{}", DIRS[d], NAMES[n]) }
}

#[derive(Default, Debug)]
struct Model {
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Model {
    fn dir_exists(&self, d: usize) -> bool {
        d == 0 || self.dirs.contains(DIRS[d])
    }

    /// Applies `op`; returns whether it succeeds.
    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Create(d, n, v) => {
                if !self.dir_exists(*d) {
                    return false;
                }
                self.files.insert(path(*d, *n), v.clone());
            }
            Op::Append(d, n, v) => match self.files.get_mut(&path(*d, *n)) {
                Some(f) if self.dirs.contains(DIRS[*d]) || *d == 0 => f.extend_from_slice(v),
                _ => return false,
            },
            Op::Write(d, n, off, v) => match self.files.get_mut(&path(*d, *n)) {
                Some(_) if v.is_empty() => {}
                Some(f) => {
                    let end = *off as usize + v.len();
                    if f.len() < end {
                        f.resize(end, 0);
                    }
                    f[*off as usize..end].copy_from_slice(v);
                }
                None => return false,
            },
            Op::Truncate(d, n, len) => match self.files.get_mut(&path(*d, *n)) {
                Some(f) => f.resize(*len as usize, 0),
                None => return false,
            },
            Op::Rename(d, n, d2, n2) => {
                if !self.dir_exists(*d2) {
                    return false;
                }
                let Some(v) = self.files.remove(&path(*d, *n)) else {
                    return false;
                };
                self.files.insert(path(*d2, *n2), v);
            }
            Op::Unlink(d, n) => return self.files.remove(&path(*d, *n)).is_some(),
            Op::Mkdir(d) => return self.dirs.insert(DIRS[*d].to_string()),
            Op::Rmdir(d) => {
                let prefix = format!("{}/", DIRS[*d]);
                if !self.dirs.contains(DIRS[*d]) || self.files.keys().any(|k| k.starts_with(&prefix)) {
                    return false;
                }
                self.dirs.remove(DIRS[*d]);
            }
        }
        true
    }
}

struct Harness {
    fs: Arc<Fs>,
    pid: u32,
}

impl Harness {
    async fn dir(&self, d: usize) -> Result<u64, FsError> {
        if d == 0 { Ok(1) } else { Ok(self.fs.lookup(1, DIRS[d]).await?.ino) }
    }

    async fn file(&self, d: usize, n: usize) -> Result<u64, FsError> {
        let parent = self.dir(d).await?;
        let a = self.fs.lookup(parent, NAMES[n]).await?;
        if a.kind == Kind::Dir { Err(FsError::IsDir) } else { Ok(a.ino) }
    }

    /// Opens, runs `f` on the handle, flushes and releases like close(2).
    async fn with_open(&self, ino: u64, flags: i32, data: &[(u64, &[u8])]) -> Result<(), FsError> {
        let (fh, _) = self.fs.open(ino, flags, self.pid).await?;
        self.finish(fh, data).await
    }

    async fn finish(&self, fh: u64, data: &[(u64, &[u8])]) -> Result<(), FsError> {
        let mut result = Ok(());
        for (off, bytes) in data {
            if let Err(e) = self.fs.write(fh, *off, bytes).await {
                result = Err(e);
                break;
            }
        }
        let flushed = self.fs.flush(fh, self.pid).await;
        self.fs.release(fh).await;
        result.and(flushed)
    }

    async fn apply(&self, op: &Op) -> Result<(), FsError> {
        match op {
            Op::Create(d, n, v) => {
                let parent = self.dir(*d).await?;
                match self.fs.lookup(parent, NAMES[*n]).await {
                    Ok(a) => self.with_open(a.ino, libc::O_WRONLY | libc::O_TRUNC, &[(0, v)]).await,
                    Err(FsError::NotFound) => {
                        let (_, fh) = self.fs.create(parent, NAMES[*n], libc::O_WRONLY, self.pid).await?;
                        self.finish(fh, &[(0, v)]).await
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Append(d, n, v) => {
                let ino = self.file(*d, *n).await?;
                let size = self.fs.getattr(ino).await?.size;
                self.with_open(ino, libc::O_WRONLY | libc::O_APPEND, &[(size, v)]).await
            }
            Op::Write(d, n, off, v) => {
                let ino = self.file(*d, *n).await?;
                self.with_open(ino, libc::O_RDWR, &[(*off as u64, v)]).await
            }
            Op::Truncate(d, n, len) => {
                let ino = self.file(*d, *n).await?;
                self.fs.setattr(ino, Some(*len as u64), None).await.map(|_| ())
            }
            Op::Rename(d, n, d2, n2) => {
                let (from, to) = (self.dir(*d).await?, self.dir(*d2).await?);
                self.file(*d, *n).await?;
                self.fs.rename(from, NAMES[*n], to, NAMES[*n2], 0).await
            }
            Op::Unlink(d, n) => {
                let parent = self.dir(*d).await?;
                self.fs.unlink(parent, NAMES[*n]).await
            }
            Op::Mkdir(d) => self.fs.mkdir(1, DIRS[*d]).await.map(|_| ()),
            Op::Rmdir(d) => self.fs.rmdir(1, DIRS[*d]).await,
        }
    }

    async fn read_all(&self, ino: u64) -> Vec<u8> {
        let (fh, _) = self.fs.open(ino, libc::O_RDONLY, self.pid).await.unwrap();
        let size = self.fs.getattr(ino).await.unwrap().size;
        let data = self.fs.read(fh, 0, size as u32 + 10).await.unwrap().to_vec();
        self.fs.release(fh).await;
        data
    }

    /// The tree as the file system shows it.
    async fn snapshot(&self) -> Model {
        let mut m = Model::default();
        let mut stack = vec![(1u64, String::new())];
        while let Some((ino, prefix)) = stack.pop() {
            let fh = self.fs.opendir(ino).unwrap();
            let mut items = Vec::new();
            loop {
                let got = self.fs.readdir(fh, items.len() as u64).await.unwrap();
                if got.is_empty() {
                    break;
                }
                items.extend(got);
            }
            self.fs.releasedir(fh);
            for item in items.iter().skip(2) {
                let p = if prefix.is_empty() { item.name.clone() } else { format!("{prefix}/{}", item.name) };
                match item.attr.kind {
                    Kind::Dir => {
                        m.dirs.insert(p.clone());
                        let a = self.fs.lookup(ino, &item.name).await.unwrap();
                        stack.push((a.ino, p));
                    }
                    Kind::File => {
                        let a = self.fs.lookup(ino, &item.name).await.unwrap();
                        m.files.insert(p, self.read_all(a.ino).await);
                    }
                }
            }
        }
        m
    }
}

fn run(ops: Vec<Op>, ttl: Duration) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let mount = Arc::new(MountPoint {
            name: "model".into(),
            store: store.clone(),
            prefix: String::new(),
            read_only: false,
            ttl,
            source_id: "memory".into(),
        });
        let settings = FsSettings { memory_limit: 16 << 20, ..FsSettings::default() };
        let h =
            Harness { fs: Arc::new(Fs::new(settings, vec![(Vec::new(), mount)]).unwrap()), pid: std::process::id() };
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            let expect = model.apply(op);
            let got = h.apply(op).await;
            prop_assert_eq!(got.is_ok(), expect, "op {} {:?}: fs said {:?}", i, op, got);
        }
        let seen = h.snapshot().await;
        prop_assert_eq!(&seen.files, &model.files);
        prop_assert_eq!(&seen.dirs, &model.dirs);
        // The bucket holds exactly the model: files as objects, dirs as markers.
        let mut objects = BTreeMap::new();
        for k in store.keys() {
            objects.insert(k.clone(), store.body(&k).unwrap().to_vec());
        }
        let mut want: BTreeMap<String, Vec<u8>> = model.files.clone();
        for d in &model.dirs {
            want.insert(format!("{d}/"), Vec::new());
        }
        prop_assert_eq!(objects, want);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn file_system_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, Duration::from_secs(60))?;
    }

    #[test]
    fn file_system_matches_model_without_caching(ops in prop::collection::vec(op(), 1..25)) {
        run(ops, Duration::ZERO)?;
    }
}

/// `readdir` answers about as many entries as the kernel's buffer took last
/// time: twice as many after an answer fitted, what fitted after one did not
/// (and no more from then on); every entry is handed out once, in order,
/// whatever the kernel took.
#[test]
fn readdir_batches_follow_what_the_kernel_took() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let names: Vec<String> = (0..3000).map(|i| format!("f{i:05}")).collect();
        for n in &names {
            store.insert(n, "x");
        }
        let mount = Arc::new(MountPoint {
            name: "batches".into(),
            store,
            prefix: String::new(),
            read_only: true,
            ttl: Duration::from_secs(60),
            source_id: "memory".into(),
        });
        let fs = Arc::new(Fs::new(FsSettings::default(), vec![(Vec::new(), mount)]).unwrap());
        let fh = fs.opendir(1).unwrap();
        // The first call starts the listing and answers `.` and `..`; let
        // the listing finish, so later answer sizes depend on the batch alone.
        let mut seen: Vec<String> = fs.readdir(fh, 0).await.unwrap().iter().map(|i| i.name.clone()).collect();
        // Entries past `..` may already be in when the first call answers.
        let first = seen.len();
        for _ in 0..10_000 {
            if matches!(fs.readdir_now(fh, 3002), Some(Ok(v)) if v.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // What the "kernel" takes per call, and the answer sizes seen.
        let capacity = |call: usize| if call == 4 { 100 } else { 1000 };
        let mut sizes = Vec::new();
        loop {
            let got = fs.readdir(fh, seen.len() as u64).await.unwrap();
            if got.is_empty() {
                break;
            }
            let fitted = got.len().min(capacity(sizes.len()));
            fs.readdir_fitted(fh, got.len(), fitted);
            sizes.push(got.len());
            seen.extend(got.into_iter().take(fitted).map(|i| i.name.clone()));
        }
        fs.releasedir(fh);
        assert_eq!(&seen[..2], [".", ".."]);
        assert_eq!(&seen[2..], &names[..]);
        // 64, then doubling while everything fits; 100 of 1,024 fitted, so
        // 100 from then on.
        assert_eq!(&sizes[..7], [64, 128, 256, 512, 1024, 100, 100]);
        assert_eq!(sizes.len(), 5 + (3002 - first - 960 - 100).div_ceil(100));
    });
}

/// An open keeps the kernel's page cache unless the cache may hold other
/// bytes than the version opened: concurrent first opens all keep it (an
/// open that does not would make the kernel drop pages another handle has
/// just read); a changed object, or pages a writer put there, are dropped.
#[test]
fn opens_keep_the_page_cache_only_when_it_holds_the_version_opened() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        store.insert("f", "first");
        let mount = Arc::new(MountPoint {
            name: "keep".into(),
            store: store.clone(),
            prefix: String::new(),
            read_only: false,
            ttl: Duration::ZERO,
            source_id: "memory".into(),
        });
        let fs = Arc::new(Fs::new(FsSettings::default(), vec![(Vec::new(), mount)]).unwrap());
        let h = Harness { fs: fs.clone(), pid: std::process::id() };
        let ino = fs.lookup(1, "f").await.unwrap().ino;
        let open = |flags| {
            let fs = fs.clone();
            async move { fs.open(ino, flags, std::process::id()).await.unwrap() }
        };
        // Two first opens at once, then another while both are open.
        let ((a, keep_a), (b, keep_b)) = tokio::join!(open(libc::O_RDONLY), open(libc::O_RDONLY));
        let (c, keep_c) = open(libc::O_RDONLY).await;
        assert!(keep_a && keep_b && keep_c);
        for fh in [a, b, c] {
            fs.release(fh).await;
        }
        // Another client replaced the object.
        store.insert("f", "second");
        let (fh, keep) = open(libc::O_RDONLY).await;
        assert!(!keep, "a changed object must not be read from old pages");
        fs.release(fh).await;
        // A writer is open: its pages are not any object version yet.
        let (w, _) = open(libc::O_WRONLY | libc::O_TRUNC).await;
        fs.write(w, 0, b"third").await.unwrap();
        let (fh, keep) = open(libc::O_RDONLY).await;
        assert!(!keep);
        fs.release(fh).await;
        h.finish(w, &[]).await.unwrap();
        // Uploaded: the pages hold exactly the new version.
        let (fh, keep) = open(libc::O_RDONLY).await;
        assert!(keep);
        fs.release(fh).await;
        assert_eq!(h.read_all(ino).await, b"third");
    });
}
