//! `bucketfs warm PATH...`: reads files or whole trees through a mount so
//! their blocks land in the cache (memory, and the disk cache when the mount
//! has `--cache-dir`): the Fluid analogue of a DataLoad.
//!
//! Files are read in parallel by a fixed pool of threads, with a progress bar
//! on a terminal, and a one-line summary at the end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// What a warm-up did.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    pub bytes: u64,
    pub failed: usize,
    pub seconds: f64,
}

impl Summary {
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes as f64 / 1e6 / self.seconds } else { 0.0 }
    }
}

/// Every regular file under `paths`, with its size.
fn collect(paths: &[PathBuf], errors: &mut Vec<String>) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => match std::fs::read_dir(&p) {
                Ok(entries) => stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path()))),
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            },
            Ok(m) if m.is_file() => out.push((p, m.len())),
            Ok(_) => {}
            Err(e) => errors.push(format!("{}: {e}", p.display())),
        }
    }
    out
}

fn read_file(path: &Path, bytes: &AtomicU64, bar: &ProgressBar) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        bar.inc(n as u64);
    }
}

/// Reads everything under `paths` with `jobs` threads.
pub fn warm(paths: &[PathBuf], jobs: usize, progress: bool) -> Summary {
    let started = Instant::now();
    let mut errors = Vec::new();
    let files = collect(paths, &mut errors);
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let queue = Arc::new(std::sync::Mutex::new(files));
    let bytes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(errors));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            let (queue, bytes, done, failed, bar) =
                (queue.clone(), bytes.clone(), done.clone(), failed.clone(), bar.clone());
            s.spawn(move || {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((path, _)) = next else { break };
                    match read_file(&path, &bytes, &bar) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{}: {e}", path.display()))
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let errors = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for e in &errors {
        eprintln!("bucketfs warm: {e}");
    }
    Summary {
        files: done.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
        failed: errors.len(),
        seconds: started.elapsed().as_secs_f64(),
    }
}
