//! Concurrent stress at the `Fs` level, with a deadlock watchdog.
//!
//! Phase one, chaos: tasks run random lookup, getattr, read, write, truncate,
//! rename (files and directories), unlink, mkdir and rmdir on a few shared
//! names, over a store that fails a share of its calls. Nothing is checked
//! but that every operation ends within a bound (a std thread watches, so a
//! deadlock on a lock, which would stop tokio's timers too, is still caught)
//! and that nothing panics.
//!
//! Phase two, model: the store behaves; each task works on its own files,
//! concurrently with the others, and keeps a model of them. At the end the
//! tree equals the models, and in both phases the budget's reservations are
//! back to zero and no multipart upload is left open.
//!
//! The seed and the time bound come from `BUCKETFS_STRESS_SEED` and
//! `BUCKETFS_STRESS_SECS` (defaults: a fixed seed, 20 seconds).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fault_tests::{assert_clean, setup};
use super::namespace::Kind;
use super::{Fs, FsError};
use crate::store::StoreError;
use crate::store::faulty::{Fault, Rule};

const TASKS: usize = 8;
/// An operation running longer than this is taken for a deadlock.
const STUCK: Duration = Duration::from_secs(30);
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const DIRS: [&str; 2] = ["x", "y"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Per task: when its current operation started (ms since `epoch`, 0 when idle).
struct Watchdog {
    epoch: Instant,
    busy: Vec<AtomicU64>,
    what: Vec<std::sync::Mutex<String>>,
}

impl Watchdog {
    fn start() -> Arc<Self> {
        let w = Arc::new(Self {
            epoch: Instant::now(),
            busy: (0..TASKS).map(|_| AtomicU64::new(0)).collect(),
            what: (0..TASKS).map(|_| std::sync::Mutex::new(String::new())).collect(),
        });
        let watched = Arc::downgrade(&w);
        std::thread::spawn(move || {
            while let Some(w) = watched.upgrade() {
                let now = w.epoch.elapsed().as_millis() as u64;
                for (t, b) in w.busy.iter().enumerate() {
                    let since = b.load(Ordering::Acquire);
                    if since != 0 && now.saturating_sub(since) > STUCK.as_millis() as u64 {
                        let what = w.what[t].lock().map(|s| s.clone()).unwrap_or_default();
                        // Straight to the standard error: the test harness
                        // captures `eprintln!`, and the abort would lose it.
                        let message = format!("stress: task {t} stuck for over {STUCK:?} in {what}: a deadlock\n");
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
                        std::process::abort();
                    }
                }
                drop(w);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        w
    }

    async fn run<T>(&self, task: usize, what: String, op: impl std::future::Future<Output = T>) -> T {
        *self.what[task].lock().unwrap() = what;
        self.busy[task].store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
        let out = op.await;
        self.busy[task].store(0, Ordering::Release);
        out
    }
}

async fn dir_ino(fs: &Fs, path: &[&str]) -> Result<u64, FsError> {
    let mut ino = 1;
    for p in path {
        let a = fs.lookup(ino, p).await?;
        if a.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        ino = a.ino;
    }
    Ok(ino)
}

async fn write_file(fs: &Fs, parent: u64, name: &str, data: &[u8], append: bool) -> Result<(), FsError> {
    let pid = std::process::id();
    let (fh, offset) = match fs.lookup(parent, name).await {
        Ok(a) if a.kind == Kind::File => {
            let flags = if append { libc::O_WRONLY | libc::O_APPEND } else { libc::O_WRONLY | libc::O_TRUNC };
            let size = if append { fs.getattr(a.ino).await?.size } else { 0 };
            (fs.open(a.ino, flags, pid).await?.0, size)
        }
        Ok(_) => return Err(FsError::IsDir),
        Err(FsError::NotFound) => (fs.create(parent, name, libc::O_WRONLY, pid).await?.1, 0),
        Err(e) => return Err(e),
    };
    let wrote = fs.write(fh, offset, data).await;
    let flushed = fs.flush(fh, pid).await;
    fs.release(fh).await;
    wrote.map(|_| ()).and(flushed)
}

async fn read_file(fs: &Fs, ino: u64) -> Result<Vec<u8>, FsError> {
    let (fh, _) = fs.open(ino, libc::O_RDONLY, std::process::id()).await?;
    let size = fs.getattr(ino).await;
    // In pieces of 1 MiB, as the kernel asks.
    let mut data = Vec::new();
    let result = match size {
        Ok(_) => loop {
            match fs.read(fh, data.len() as u64, 1 << 20).await {
                Ok(d) if d.is_empty() => break Ok(()),
                Ok(d) => data.extend_from_slice(&d.to_vec()),
                Err(e) => break Err(e),
            }
        },
        Err(e) => Err(e),
    };
    fs.release(fh).await;
    result.map(|_| data)
}

fn payload(rng: &mut StdRng) -> Vec<u8> {
    // Mostly small files; now and then one that goes out in several parts.
    let len = if rng.random_bool(0.05) { rng.random_range(9 << 20..18 << 20) } else { rng.random_range(0..4096) };
    let byte: u8 = rng.random();
    vec![byte; len]
}

/// One random operation on the shared names; its outcome does not matter.
async fn chaos_op(fs: &Arc<Fs>, rng: &mut StdRng) -> String {
    let d = DIRS[rng.random_range(0..DIRS.len())];
    let n = NAMES[rng.random_range(0..NAMES.len())];
    let n2 = NAMES[rng.random_range(0..NAMES.len())];
    let choice = rng.random_range(0..11);
    let data = payload(rng);
    let what = format!("op {choice} on {d}/{n}");
    let _ = async {
        let parent = if rng.random_bool(0.5) { 1 } else { dir_ino(fs, &[d]).await? };
        match choice {
            0 => fs.lookup(parent, n).await.map(|_| ()),
            1 => {
                let a = fs.lookup(parent, n).await?;
                fs.getattr(a.ino).await.map(|_| ())
            }
            2 => {
                let a = fs.lookup(parent, n).await?;
                read_file(fs, a.ino).await.map(|_| ())
            }
            3 => write_file(fs, parent, n, &data, false).await,
            4 => write_file(fs, parent, n, &data, true).await,
            5 => {
                let a = fs.lookup(parent, n).await?;
                fs.setattr(a.ino, Some(data.len() as u64 / 2), None).await.map(|_| ())
            }
            6 => fs.rename(parent, n, 1, n2, 0).await,
            7 => fs.unlink(parent, n).await,
            8 => fs.mkdir(1, d).await.map(|_| ()),
            9 => fs.rmdir(1, d).await,
            _ => {
                let other = DIRS[(DIRS.iter().position(|x| *x == d).unwrap_or(0) + 1) % DIRS.len()];
                fs.rename(1, d, 1, other, 0).await
            }
        }
    }
    .await;
    what
}

#[test]
fn concurrent_operations_never_hang_and_leave_nothing_behind() {
    let seed = env_u64("BUCKETFS_STRESS_SEED", 15);
    let secs = env_u64("BUCKETFS_STRESS_SECS", 20);
    eprintln!("stress: seed {seed}, {secs} s (BUCKETFS_STRESS_SEED, BUCKETFS_STRESS_SECS)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let s = setup(48 << 20, seed);
        let fail = || Fault::Fail(StoreError::Server { status: 500, message: "injected".into() });
        for op in ["head", "list", "get", "put", "upload_part", "complete_multipart", "copy", "delete"] {
            s.faults.add(Rule::sometimes(op, 0.03, fail()));
        }
        s.faults.add(Rule::sometimes("get", 0.02, Fault::BreakBody));
        s.faults.add(Rule::sometimes("head", 0.05, Fault::Delay(Duration::from_millis(20))));
        s.faults.add(Rule::sometimes("upload_part", 0.05, Fault::Delay(Duration::from_millis(50))));
        let watchdog = Watchdog::start();
        let phase = Duration::from_secs(secs) / 2;

        // Phase one: chaos on shared names.
        let deadline = Instant::now() + phase;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (fs, watchdog) = (s.fs.clone(), watchdog.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(t as u64));
                let mut ops = 0u64;
                while Instant::now() < deadline && ops < 2_000 {
                    let mut op_rng = StdRng::seed_from_u64(rng.random());
                    watchdog.run(t, format!("chaos op {ops}"), chaos_op(&fs, &mut op_rng)).await;
                    ops += 1;
                }
                ops
            }));
        }
        let mut chaos_ops = 0;
        for t in tasks {
            chaos_ops += t.await.expect("a chaos task panicked");
        }
        eprintln!("stress: {chaos_ops} chaos operations, {} faults injected", s.faults.injected());
        assert_clean(&s).await;

        // Phase two: each task on its own files, checked against a model.
        s.faults.clear();
        let deadline = Instant::now() + phase;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (fs, watchdog) = (s.fs.clone(), watchdog.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (0x5eed << 8) ^ t as u64);
                let dir = format!("t{t}");
                let parent = watchdog.run(t, format!("mkdir {dir}"), fs.mkdir(1, &dir)).await.unwrap().ino;
                let mut model: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
                let mut log = Vec::new();
                let mut ops = 0u64;
                while Instant::now() < deadline && ops < 500 {
                    let n = NAMES[rng.random_range(0..NAMES.len())];
                    let n2 = NAMES[rng.random_range(0..NAMES.len())];
                    let data = payload(&mut rng);
                    let choice = rng.random_range(0..5);
                    let what = format!("model op {choice} on {dir}/{n}");
                    let got = watchdog
                        .run(t, what.clone(), async {
                            match choice {
                                0 => write_file(&fs, parent, n, &data, false).await,
                                1 => write_file(&fs, parent, n, &data, true).await,
                                2 => match fs.lookup(parent, n).await {
                                    Ok(a) => fs.setattr(a.ino, Some(data.len() as u64 / 3), None).await.map(|_| ()),
                                    Err(e) => Err(e),
                                },
                                3 => fs.rename(parent, n, parent, n2, 0).await,
                                _ => fs.unlink(parent, n).await,
                            }
                        })
                        .await;
                    let expect_ok = match choice {
                        0 => {
                            model.insert(n, data.clone());
                            true
                        }
                        1 => {
                            model.entry(n).or_default().extend_from_slice(&data);
                            true
                        }
                        2 => match model.get_mut(n) {
                            Some(f) => {
                                f.resize(data.len() / 3, 0);
                                true
                            }
                            None => false,
                        },
                        3 => match model.remove(n) {
                            Some(f) => {
                                model.insert(n2, f);
                                true
                            }
                            None => false,
                        },
                        _ => model.remove(n).is_some(),
                    };
                    assert_eq!(got.is_ok(), expect_ok, "task {t}, {what}: {got:?}");
                    log.push(format!("{what} -> {n2} len {} ok {}", data.len(), got.is_ok()));
                    ops += 1;
                }
                (parent, model, log)
            }));
        }
        let mut models = Vec::new();
        for t in tasks {
            models.push(t.await.expect("a model task panicked"));
        }
        for (t, (parent, model, log)) in models.into_iter().enumerate() {
            for n in NAMES {
                let seen = match s.fs.lookup(parent, n).await {
                    Ok(a) => Some(
                        read_file(&s.fs, a.ino)
                            .await
                            .unwrap_or_else(|e| panic!("t{t}/{n}: read: {e}; the task's operations: {log:#?}")),
                    ),
                    Err(FsError::NotFound) => None,
                    Err(e) => panic!("t{t}/{n}: {e}"),
                };
                assert_eq!(seen.as_ref().map(Vec::len), model.get(n).map(Vec::len), "t{t}/{n}: size");
                assert!(seen.as_ref() == model.get(n), "t{t}/{n}: content differs from the model");
                let stored = s.mem.body(&format!("t{t}/{n}"));
                assert!(stored.as_deref() == model.get(n).map(|v| &v[..]), "t{t}/{n}: the object differs");
            }
        }
        assert_clean(&s).await;
        drop(watchdog);
    });
}
