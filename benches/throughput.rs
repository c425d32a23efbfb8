//! Throughput through a real bucketfs mount on a SeaweedFS S3 server, each
//! workload next to a raw aws-sdk-s3 baseline measured in the same run.
//!
//! `cargo bench --bench throughput` (add `-- FILTER` for a subset). Every S3
//! request of the mounts and of the raw baselines goes through a counting
//! proxy on 127.0.0.1; `BUCKETFS_BENCH_DELAY_MS=20` makes it hold each request
//! back 20 ms ("latency mode"). The summary (rates, ratios bucketfs/raw,
//! request counts and sizes, peak RSS) is printed and written to
//! `target/criterion-summary.txt` (`criterion-summary-delay<N>ms.txt` in
//! latency mode, `-pinned` added with `BUCKETFS_SERVER_CPU`).
//!
//! Workloads (sizes in bench mode; `cargo test --benches` runs each once on
//! small data as a smoke test):
//! - `seq_read`: a 1 GiB object read with 1 MiB reads by 1 reader, and by 4
//!   threads, each reading its own quarter concurrently (1 GiB in total);
//!   raw: ranged GETs of 8 MiB, 16 in flight, over the whole object.
//! - `rand_read_4KiB`, `rand_read_256KiB`: preads at random aligned offsets
//!   of the 1 GiB object, one at a time; raw: GETs of the same ranges, one at
//!   a time.
//! - `small_files`: 1,000 objects of 16 KiB opened and read whole, by 1 and
//!   by 8 threads; raw: whole-object GETs, 1 and 8 in flight.
//! - `reread`: a 256 MiB object read twice, the second pass measured, as is
//!   (kernel page cache) and after `POSIX_FADV_DONTNEED` (bucketfs's own
//!   block cache); raw: as for `seq_read`.
//! - `ls_l`: what GNU `ls -l` asks of the file system, without its output
//!   (checked with strace): getdents batches, each entry lstat'ed and its ACL
//!   looked up as it arrives, of a 10,000-object directory; raw: a paged
//!   ListObjectsV2 (1,000 per page, and bucketfs's 5,000).
//!
//! Every bucketfs iteration runs on a fresh mount (started outside the timed
//! section), so no iteration is served from a previous one's caches.
//!
//! Knobs: `BUCKETFS_SERVER_CPU=N` runs the server on CPU N alone and the
//! bench, its proxy and its mounts on the other CPUs (the server stands in
//! for another machine; unpinned, on a 2-core host, it shares the cores
//! with the client side it is compared against),
//! `BUCKETFS_BENCH_RAW_INFLIGHT` (16), `BUCKETFS_BENCH_RAW_CHUNK_MIB` (8),
//! `BUCKETFS_BENCH_MOUNT_ARGS` (extra `bucketfs mount` arguments),
//! `BUCKETFS_BENCH_LOG` (bucketfs's RUST_LOG, default `bucketfs=info`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};

use bucketfs::store::s3::LIST_PAGE_KEYS;
use support::proxy::{Counts, Proxy, human_bytes};
use support::{RESULTS, cpu_ms, data_at, raw_get, raw_list, raw_ranges, record, splitmix, vm_hwm_kib};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const BIG: &str = "seq/big.bin";
const REREAD: &str = "reread/file.bin";
const SMALL_DIR: &str = "small";
const LS_DIR: &str = "dir10k";
const BIG_SEED: u64 = 1;
const REREAD_SEED: u64 = 2;

/// Sizes of the data sets and of the work per iteration.
struct Sizes {
    big: u64,
    reread: u64,
    small_count: usize,
    small_size: u64,
    ls_entries: usize,
    rand_ops_4k: usize,
    rand_ops_256k: usize,
}

struct Env {
    srv: &'static common::Server,
    proxy: Proxy,
    bucket: String,
    keys: (PathBuf, PathBuf),
    _keys_dir: tempfile::TempDir,
    raw: aws_sdk_s3::Client,
    rt: tokio::runtime::Runtime,
    sizes: Sizes,
    delay_ms: u64,
    test_mode: bool,
    raw_inflight: usize,
    raw_chunk: u64,
    mount_args: Vec<String>,
    log: String,
    uploaded: Mutex<HashSet<&'static str>>,
    iteration: std::sync::atomic::AtomicU64,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// `cargo bench` passes `--bench`; `cargo test --benches` and `-- --test` do not
/// run benchmarks, only each routine once.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn delay_ms() -> u64 {
    env_u64("BUCKETFS_BENCH_DELAY_MS", 0)
}

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let test_mode = test_mode();
        let delay_ms = delay_ms();
        let srv = common::server();
        let proxy = Proxy::start(srv.s3_port, Duration::from_millis(delay_ms));
        let bucket = srv.bucket("bench");
        let keys_dir = tempfile::tempdir().unwrap();
        let keys = srv.key_files(keys_dir.path());
        let raw = common::raw_client(&proxy.endpoint());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let sizes = if test_mode {
            Sizes {
                big: 16 * MIB,
                reread: 4 * MIB,
                small_count: 20,
                small_size: 16 * KIB,
                ls_entries: 150,
                rand_ops_4k: 8,
                rand_ops_256k: 4,
            }
        } else {
            Sizes {
                big: GIB,
                reread: 256 * MIB,
                small_count: 1000,
                small_size: 16 * KIB,
                ls_entries: 10_000,
                rand_ops_4k: if delay_ms > 0 { 64 } else { 256 },
                rand_ops_256k: if delay_ms > 0 { 32 } else { 64 },
            }
        };
        let mount_args = std::env::var("BUCKETFS_BENCH_MOUNT_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Env {
            srv,
            proxy,
            bucket,
            keys,
            _keys_dir: keys_dir,
            raw,
            rt,
            sizes,
            delay_ms,
            test_mode,
            raw_inflight: env_u64("BUCKETFS_BENCH_RAW_INFLIGHT", 16) as usize,
            raw_chunk: env_u64("BUCKETFS_BENCH_RAW_CHUNK_MIB", 8) * MIB,
            mount_args,
            log: std::env::var("BUCKETFS_BENCH_LOG").unwrap_or_else(|_| "bucketfs=info".into()),
            uploaded: Mutex::new(HashSet::new()),
            iteration: Default::default(),
        }
    })
}

impl Env {
    /// Uploads a data set once, straight to the server (not through the proxy).
    fn ensure(&self, name: &'static str) {
        let mut done = self.uploaded.lock().unwrap();
        if done.contains(name) {
            return;
        }
        let t = Instant::now();
        match name {
            BIG => self.put_large(BIG, BIG_SEED, self.sizes.big),
            REREAD => self.put_large(REREAD, REREAD_SEED, self.sizes.reread),
            SMALL_DIR => {
                let objects = (0..self.sizes.small_count)
                    .map(|i| {
                        let key = format!("{SMALL_DIR}/f{i:05}");
                        (key, data_at(100 + i as u64, 0, self.sizes.small_size as usize))
                    })
                    .collect();
                self.srv.put_many(&self.bucket, objects);
            }
            LS_DIR => {
                let objects = (0..self.sizes.ls_entries)
                    .map(|i| (format!("{LS_DIR}/e{i:05}"), format!("{i}\n").into_bytes()))
                    .collect();
                self.srv.put_many(&self.bucket, objects);
            }
            _ => unreachable!("unknown data set {name}"),
        }
        eprintln!("[bench] uploaded {name} in {:.1?}", t.elapsed());
        done.insert(name);
    }

    /// A large object, as a multipart upload of 64 MiB parts.
    fn put_large(&self, key: &str, seed: u64, size: u64) {
        let part = 64 * MIB;
        if size <= part {
            self.srv.put(&self.bucket, key, data_at(seed, 0, size as usize));
            return;
        }
        let client = &self.srv.client;
        let bucket = &self.bucket;
        self.srv.block_on(async {
            use aws_sdk_s3::primitives::ByteStream;
            use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
            use futures::StreamExt;
            let up =
                client.create_multipart_upload().bucket(bucket).key(key).send().await.expect("create multipart upload");
            let id = up.upload_id().unwrap().to_string();
            let parts: Vec<(i32, u64)> = (0..size.div_ceil(part)).map(|i| (i as i32 + 1, i * part)).collect();
            let mut done: Vec<CompletedPart> = futures::stream::iter(parts)
                .map(|(n, off)| {
                    let id = id.clone();
                    async move {
                        let len = part.min(size - off) as usize;
                        let out = client
                            .upload_part()
                            .bucket(bucket)
                            .key(key)
                            .upload_id(id)
                            .part_number(n)
                            .body(ByteStream::from(data_at(seed, off, len)))
                            .send()
                            .await
                            .expect("upload part");
                        CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_string)).build()
                    }
                })
                .buffer_unordered(4)
                .collect()
                .await;
            done.sort_by_key(|p| p.part_number());
            client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(done)).build())
                .send()
                .await
                .expect("complete multipart upload");
        });
    }

    /// A fresh bucketfs mount of the bench bucket through the proxy.
    fn mount(&self) -> common::Mount {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut args: Vec<String> = vec![
            "mount".into(),
            self.bucket.clone(),
            mountpoint.to_str().unwrap().into(),
            "--endpoint-url".into(),
            self.proxy.endpoint(),
            "--access-key-file".into(),
            self.keys.0.to_str().unwrap().into(),
            "--secret-key-file".into(),
            self.keys.1.to_str().unwrap().into(),
        ];
        args.extend(self.mount_args.iter().cloned());
        common::Mount::spawn(dir, mountpoint, &args, &[("RUST_LOG", self.log.as_str())])
    }

    fn next_iteration(&self) -> u64 {
        self.iteration.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` timed, with the proxy's request counts over that time.
    /// Runs `f` timed, with the proxy's request counts and the CPU time of the
    /// bucketfs process `fs` (if any), of the server and of this process.
    fn timed<T>(&self, fs: Option<u32>, f: impl FnOnce() -> T) -> (Duration, Counts, T) {
        let snap = || {
            let mut c = self.proxy.stats.snapshot();
            c.cpu_fs_ms = fs.map_or(0, |p| cpu_ms(&p.to_string()));
            c.cpu_server_ms = cpu_ms(&self.srv.pid.to_string());
            c.cpu_bench_ms = cpu_ms("self");
            c
        };
        let before = snap();
        let t = Instant::now();
        let out = f();
        let took = t.elapsed();
        (took, snap().since(&before), out)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Reads `[start, end)` of an open file with 1 MiB preads; returns bytes read.
fn pread_range(file: &std::fs::File, start: u64, end: u64) -> u64 {
    let mut buf = vec![0u8; MIB as usize];
    let mut off = start;
    while off < end {
        let want = (end - off).min(MIB) as usize;
        let n = file.read_at(&mut buf[..want], off).expect("pread");
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    off - start
}

/// Checks a whole file against the data it was made from (test mode only).
fn verify(path: &Path, seed: u64, size: u64) {
    let got = std::fs::read(path).expect("read for verification");
    assert_eq!(got.len() as u64, size, "{}", path.display());
    assert!(got == data_at(seed, 0, size as usize), "{} differs from what was uploaded", path.display());
}

fn drop_page_cache(file: &std::fs::File) {
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// One bucketfs or raw configuration of a group: `one` runs an iteration and
/// returns (time, request counts, VmHWM in KiB or 0).
fn bench(
    g: &mut BenchmarkGroup<WallTime>,
    group: &str,
    id: &str,
    units: u64,
    bytes: bool,
    mut one: impl FnMut(&Env, u64) -> (Duration, Counts, u64),
) {
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let e = env();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let it = e.next_iteration();
                let (t, counts, hwm) = one(e, it);
                record(group, id, units, bytes, t, counts, hwm);
                total += t;
            }
            total
        })
    });
}

/// The raw baseline for reading all `size` bytes of `key`: ranged GETs of
/// `raw_chunk`, `raw_inflight` in flight.
fn bench_raw_whole(g: &mut BenchmarkGroup<WallTime>, group: &str, key: &'static str, size: u64) {
    bench(g, group, "raw/ranged_get", size, true, move |e, _| {
        e.ensure(key);
        let (t, c, n) =
            e.timed(None, || e.block_on(raw_ranges(&e.raw, &e.bucket, key, 0, size, e.raw_chunk, e.raw_inflight)));
        assert_eq!(n, size);
        (t, c, 0)
    });
}

fn configure(g: &mut BenchmarkGroup<WallTime>) {
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(2));
}

/// A group's name; latency mode gets its own names, so criterion's history of
/// one mode is not compared with the other.
fn group_name(base: String) -> String {
    match delay_ms() {
        0 => base,
        d => format!("{base}_delay{d}ms"),
    }
}

fn size_name(n: u64) -> String {
    if n >= GIB && n.is_multiple_of(GIB) {
        format!("{}GiB", n / GIB)
    } else if n >= MIB && n.is_multiple_of(MIB) {
        format!("{}MiB", n / MIB)
    } else {
        format!("{}KiB", n / KIB)
    }
}

/// Sizes are known before the environment (and the server) exists.
fn planned_sizes() -> (u64, u64, usize, usize) {
    if test_mode() { (16 * MIB, 4 * MIB, 20, 150) } else { (GIB, 256 * MIB, 1000, 10_000) }
}

fn seq_read(c: &mut Criterion) {
    let (big, _, _, _) = planned_sizes();
    let group = group_name(format!("seq_read_{}", size_name(big)));
    let mut g = c.benchmark_group(&group);
    configure(&mut g);
    g.throughput(Throughput::Bytes(big));
    bench_raw_whole(&mut g, &group, BIG, big);
    for readers in [1u64, 4] {
        let id =
            if readers == 1 { "bucketfs/1_reader".to_string() } else { format!("bucketfs/{readers}_readers_quarters") };
        bench(&mut g, &group, &id, big, true, move |e, _| {
            e.ensure(BIG);
            let m = e.mount();
            let path = m.path(BIG);
            let out = seq_once(e, &m, &path, readers);
            if e.test_mode {
                verify(&path, BIG_SEED, e.sizes.big);
            }
            out
        });
    }
    g.finish();
}

fn seq_once(e: &Env, m: &common::Mount, path: &Path, readers: u64) -> (Duration, Counts, u64) {
    let size = e.sizes.big;
    let files: Vec<std::fs::File> = (0..readers).map(|_| std::fs::File::open(path).expect("open")).collect();
    let quarter = size / readers;
    let (t, c, n) = e.timed(Some(m.pid()), || {
        std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let start = i as u64 * quarter;
                    let end = if i as u64 == readers - 1 { size } else { start + quarter };
                    s.spawn(move || pread_range(f, start, end))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
        })
    });
    assert_eq!(n, size);
    (t, c, vm_hwm_kib(m.pid()))
}

/// Random aligned offsets for iteration `it`.
fn random_offsets(it: u64, size: u64, bs: u64, n: usize) -> Vec<u64> {
    let slots = size / bs;
    (0..n as u64).map(|k| (splitmix(it.wrapping_mul(1_000_003) ^ k) % slots) * bs).collect()
}

fn rand_read(c: &mut Criterion) {
    let (big, _, _, _) = planned_sizes();
    for bs in [4 * KIB, 256 * KIB] {
        let group = group_name(format!("rand_read_{}", size_name(bs)));
        let mut g = c.benchmark_group(&group);
        configure(&mut g);
        // Bytes per iteration depend on the mode; criterion only needs a constant.
        let ops = |e: &Env| {
            if bs == 4 * KIB { e.sizes.rand_ops_4k } else { e.sizes.rand_ops_256k }
        };
        let units_guess = bs
            * if test_mode() {
                if bs == 4 * KIB { 8 } else { 4 }
            } else if bs == 4 * KIB {
                if delay_ms() > 0 { 64 } else { 256 }
            } else if delay_ms() > 0 {
                32
            } else {
                64
            };
        g.throughput(Throughput::Bytes(units_guess));
        bench(&mut g, &group, "raw/get_qd1", units_guess, true, move |e, it| {
            e.ensure(BIG);
            let offsets = random_offsets(it, big, bs, ops(e));
            let (t, c, n) = e.timed(None, || {
                e.block_on(async {
                    let mut n = 0;
                    for off in &offsets {
                        n += raw_get(&e.raw, &e.bucket, BIG, Some((*off, off + bs))).await;
                    }
                    n
                })
            });
            assert_eq!(n, bs * offsets.len() as u64);
            (t, c, 0)
        });
        bench(&mut g, &group, "bucketfs/pread_qd1", units_guess, true, move |e, it| {
            e.ensure(BIG);
            let m = e.mount();
            let file = std::fs::File::open(m.path(BIG)).expect("open");
            let offsets = random_offsets(it, big, bs, ops(e));
            let mut buf = vec![0u8; bs as usize];
            let (t, c, ()) = e.timed(Some(m.pid()), || {
                for off in &offsets {
                    file.read_exact_at(&mut buf, *off).expect("pread");
                }
            });
            if e.test_mode {
                let last = *offsets.last().unwrap();
                assert!(buf == data_at(BIG_SEED, last, bs as usize));
            }
            (t, c, vm_hwm_kib(m.pid()))
        });
        g.finish();
    }
}

fn small_files(c: &mut Criterion) {
    let (_, _, count, _) = planned_sizes();
    let size = 16 * KIB;
    let group = group_name(format!("small_files_{count}x{}", size_name(size)));
    let mut g = c.benchmark_group(&group);
    configure(&mut g);
    let total = size * count as u64;
    g.throughput(Throughput::Bytes(total));
    // With a per-request delay, one at a time is count x delay: only the parallel runs.
    let widths: &[usize] = if delay_ms() > 0 { &[8] } else { &[1, 8] };
    for &w in widths {
        bench(&mut g, &group, &format!("raw/get_qd{w}"), total, true, move |e, _| {
            e.ensure(SMALL_DIR);
            let (t, c, n) = e.timed(None, || {
                e.block_on(async {
                    use futures::StreamExt;
                    futures::stream::iter(0..e.sizes.small_count)
                        .map(|i| {
                            let key = format!("{SMALL_DIR}/f{i:05}");
                            async move { raw_get(&e.raw, &e.bucket, &key, None).await }
                        })
                        .buffer_unordered(w)
                        .fold(0u64, |a, n| async move { a + n })
                        .await
                })
            });
            assert_eq!(n, total);
            (t, c, 0)
        });
        let id = if w == 1 { "bucketfs/1_thread".to_string() } else { format!("bucketfs/{w}_threads") };
        bench(&mut g, &group, &id, total, true, move |e, _| {
            e.ensure(SMALL_DIR);
            let m = e.mount();
            let root = m.path(SMALL_DIR);
            let count = e.sizes.small_count;
            let (t, c, n) = e.timed(Some(m.pid()), || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..w)
                        .map(|k| {
                            let root = &root;
                            s.spawn(move || {
                                let mut buf = Vec::with_capacity(size as usize + 1);
                                let mut n = 0u64;
                                for i in (k..count).step_by(w) {
                                    buf.clear();
                                    let mut f =
                                        std::fs::File::open(root.join(format!("f{i:05}"))).expect("open small file");
                                    n += f.read_to_end(&mut buf).expect("read small file") as u64;
                                }
                                n
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
                })
            });
            assert_eq!(n, total);
            if e.test_mode {
                let got = std::fs::read(root.join("f00003")).unwrap();
                assert!(got == data_at(103, 0, size as usize));
            }
            (t, c, vm_hwm_kib(m.pid()))
        });
    }
    g.finish();
}

fn reread(c: &mut Criterion) {
    let (_, size, _, _) = planned_sizes();
    let group = group_name(format!("reread_{}", size_name(size)));
    let mut g = c.benchmark_group(&group);
    configure(&mut g);
    g.throughput(Throughput::Bytes(size));
    bench_raw_whole(&mut g, &group, REREAD, size);
    for (id, drop_pages) in [("bucketfs/second_pass", false), ("bucketfs/second_pass_no_page_cache", true)] {
        bench(&mut g, &group, id, size, true, move |e, _| {
            e.ensure(REREAD);
            let m = e.mount();
            let path = m.path(REREAD);
            {
                let first = std::fs::File::open(&path).expect("open");
                assert_eq!(pread_range(&first, 0, e.sizes.reread), e.sizes.reread);
            }
            let file = std::fs::File::open(&path).expect("open again");
            if drop_pages {
                drop_page_cache(&file);
            }
            let (t, c, n) = e.timed(Some(m.pid()), || pread_range(&file, 0, e.sizes.reread));
            assert_eq!(n, e.sizes.reread);
            if e.test_mode {
                verify(&path, REREAD_SEED, e.sizes.reread);
            }
            (t, c, vm_hwm_kib(m.pid()))
        });
    }
    g.finish();
}

fn ls_l(c: &mut Criterion) {
    let (_, _, _, entries) = planned_sizes();
    let group = group_name(format!("ls_l_{entries}"));
    let mut g = c.benchmark_group(&group);
    configure(&mut g);
    g.throughput(Throughput::Elements(entries as u64));
    // The ratio is taken against the first: pages of the default 1,000 keys.
    // bucketfs asks for LIST_PAGE_KEYS (servers that allow fewer answer
    // 1,000), so the same listing with pages of that size is measured too.
    let large = format!("raw/list_objects_v2_{LIST_PAGE_KEYS}_keys");
    for (id, max_keys) in [("raw/list_objects_v2", None), (large.as_str(), Some(LIST_PAGE_KEYS))] {
        bench(&mut g, &group, id, entries as u64, false, |e, _| {
            e.ensure(LS_DIR);
            let prefix = format!("{LS_DIR}/");
            let (t, c, n) = e.timed(None, || e.block_on(raw_list(&e.raw, &e.bucket, &prefix, max_keys)));
            assert_eq!(n, e.sizes.ls_entries as u64);
            (t, c, 0)
        });
    }
    bench(&mut g, &group, "bucketfs/readdir_lstat", entries as u64, false, |e, _| {
        e.ensure(LS_DIR);
        let m = e.mount();
        let dir = m.path(LS_DIR);
        let (t, c, n) = e.timed(Some(m.pid()), || ls_long(&dir));
        assert_eq!(n, e.sizes.ls_entries);
        (t, c, vm_hwm_kib(m.pid()))
    });
    g.finish();
}

/// What GNU `ls -l` (coreutils 9) asks of the file system, without its
/// output: entries are read in getdents batches, and each is taken in as it
/// comes: `lstat`, then `getxattr(system.posix_acl_access)`;
/// `lgetxattr(security.selinux)` only until the file system says it has no
/// such attributes (coreutils remembers that per device).
fn ls_long(dir: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = [0u8; 256];
    let mut selinux = true;
    let mut entries = 0;
    for entry in std::fs::read_dir(dir).expect("readdir") {
        let path = entry.expect("readdir entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        std::hint::black_box(meta.len());
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings and a buffer of the given size.
        unsafe {
            if selinux {
                let n = libc::lgetxattr(c.as_ptr(), c"security.selinux".as_ptr(), buf.as_mut_ptr().cast(), buf.len());
                let err = std::io::Error::last_os_error().raw_os_error();
                selinux = !(n < 0 && matches!(err, Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)));
            }
            libc::getxattr(c.as_ptr(), c"system.posix_acl_access".as_ptr(), std::ptr::null_mut(), 0);
        }
        entries += 1;
    }
    entries
}

/// A second `ls -l` on the same mount, after the metadata TTL (1 s) expired:
/// are entries revalidated one by one?
fn ls_after_ttl() -> Option<Counts> {
    let e = env();
    if !e.uploaded.lock().unwrap().contains(LS_DIR) {
        return None;
    }
    let m = e.mount();
    let dir = m.path(LS_DIR);
    ls_long(&dir);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, c, _) = e.timed(Some(m.pid()), || ls_long(&dir));
    Some(c)
}

fn summary(extra_ls: Option<Counts>) {
    let results = RESULTS.lock().unwrap();
    if results.is_empty() {
        return;
    }
    let e = env();
    let mut s = String::new();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "bucketfs benchmark summary, {date}; {} CPUs; per-request delay {} ms; raw = aws-sdk-s3 through the same proxy (whole-object reads: ranged GETs of {}, {} in flight); rates are medians over iterations, each bucketfs iteration on a fresh mount",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        e.delay_ms,
        human_bytes(e.raw_chunk),
        e.raw_inflight,
    );
    if let Some(cpu) = common::server_cpu() {
        let _ = writeln!(s, "server pinned to CPU {cpu}; bench, proxy and mounts on the other CPUs");
    }
    if !e.mount_args.is_empty() {
        let _ = writeln!(s, "bucketfs mount extra args: {}", e.mount_args.join(" "));
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<34} {:<36} {:>16} {:>16} {:>7} {:>5}",
        "group", "bucketfs", "bucketfs rate", "raw rate", "ratio", "n"
    );
    let groups: Vec<&String> = {
        let mut v: Vec<&String> = results.keys().map(|(g, _)| g).collect();
        v.dedup();
        v
    };
    let mut details = String::new();
    for group in groups {
        let raws: Vec<(&String, &support::Record)> = results
            .iter()
            .filter(|((g, id), _)| g == group && id.starts_with("raw/"))
            .map(|((_, id), r)| (id, r))
            .collect();
        for ((_, id), r) in results.iter().filter(|((g, _), _)| g == group) {
            let _ = writeln!(
                details,
                "  {group}/{id}: {} per iteration: {}",
                r.rate_text(),
                r.counts.describe(r.times.len() as u64)
            );
            if !id.starts_with("bucketfs/") {
                continue;
            }
            // The raw run with the same parallelism when there is one, else the only one.
            let width = id.split('/').nth(1).and_then(|x| x.split('_').next()).unwrap_or("");
            let raw = raws
                .iter()
                .find(|(rid, _)| rid.ends_with(&format!("qd{width}")))
                .or_else(|| raws.iter().find(|(rid, _)| !rid.contains("qd")))
                .or(raws.first());
            let (raw_rate, ratio) = match raw {
                Some((_, rr)) => (rr.rate_text(), format!("{:.2}", r.median_rate() / rr.median_rate().max(1e-9))),
                None => ("-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "{:<34} {:<36} {:>16} {:>16} {:>7} {:>5}",
                group,
                id.trim_start_matches("bucketfs/"),
                r.rate_text(),
                raw_rate,
                ratio,
                r.times.len()
            );
        }
    }
    let _ = writeln!(s);
    for ((group, id), r) in results.iter() {
        if r.hwm_kib > 0 && group.starts_with("seq_read") {
            let _ =
                writeln!(s, "Peak RSS (VmHWM) of bucketfs during {group}/{id}: {:.1} MiB", r.hwm_kib as f64 / 1024.0);
        }
    }
    for ((group, id), r) in results.iter() {
        if group.starts_with("ls_l")
            && id.starts_with("raw/list_objects_v2_")
            && let Some(fs) = results.get(&(group.clone(), "bucketfs/readdir_lstat".to_string()))
        {
            let ratio = fs.median_rate() / r.median_rate().max(1e-9);
            let _ = writeln!(s, "ls -l against {id}: {} vs {} ({ratio:.2})", fs.rate_text(), r.rate_text());
        }
        if group.starts_with("ls_l") && id.starts_with("bucketfs/") {
            let n = r.times.len().max(1) as u64;
            let _ = writeln!(
                s,
                "HEAD requests during ls -l (cold mount): {} per ls ({} LIST requests per ls)",
                r.counts.head / n,
                r.counts.list / n
            );
        }
    }
    if let Some(c) = extra_ls {
        let _ = writeln!(
            s,
            "HEAD requests during a second ls -l after the 1 s metadata TTL: {} ({} LIST requests)",
            c.head, c.list
        );
    }
    let _ = writeln!(s, "\nS3 requests per iteration, from the proxy:\n{details}");
    eprintln!("\n{s}");
    if e.test_mode {
        return;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let delay = if e.delay_ms > 0 { format!("-delay{}ms", e.delay_ms) } else { String::new() };
    let pinned = if common::server_cpu().is_some() { "-pinned" } else { "" };
    let name = format!("criterion-summary{delay}{pinned}.txt");
    let path = target.join(name);
    match std::fs::write(&path, &s) {
        Ok(()) => eprintln!("summary written to {}", path.display()),
        Err(err) => eprintln!("cannot write {}: {err}", path.display()),
    }
}

fn main() {
    if let Some(cpu) = common::server_cpu() {
        // Before any thread starts: everything this process starts inherits it.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        assert!(cpu < cpus && cpus > 1, "BUCKETFS_SERVER_CPU={cpu}: this host has CPUs 0..{cpus}");
        common::set_affinity((0..cpus).filter(|c| *c != cpu)).expect("sched_setaffinity");
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    seq_read(&mut c);
    rand_read(&mut c);
    small_files(&mut c);
    reread(&mut c);
    ls_l(&mut c);
    let extra = if ENV.get().is_some() { ls_after_ttl() } else { None };
    c.final_summary();
    if let Some(e) = ENV.get() {
        summary(extra);
        // The harness keeps the server's data dir; a bench run leaves 1.3 GiB there.
        unsafe { libc::kill(e.srv.pid as i32, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(&e.srv.dir);
    }
}
