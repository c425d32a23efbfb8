use std::path::PathBuf;

use clap::Parser;
use tracing::{info, warn};

use bucketfs::cli::{CheckArgs, Cli, Command, FluidArgs, MountArgs, ProbeArgs, WarmArgs};
use bucketfs::logging::LogFormat;
use bucketfs::mount::{self, ConfigWatch, EXIT_START, MountRequest};
use bucketfs::{fluid, probe};

fn main() {
    limit_malloc_arenas();
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    let code = match cli.command {
        Command::Mount(args) => run_mount(args),
        Command::Fluid(args) => run_fluid(args),
        Command::Probe(args) => run_probe(args),
        Command::Warm(args) => run_warm(args),
        Command::Check(args) => run_check(*args),
    };
    std::process::exit(code);
}

/// Two malloc arenas instead of glibc's default of eight per core: blocks are
/// allocated by the runtime's threads and freed by whichever thread evicts
/// them, and memory freed into one arena cannot serve another, so many
/// arenas hold freed blocks beyond the memory budget (measured: peak RSS with
/// one sequential reader 613 MiB with the default, 561 MiB with two, at the
/// same speed). `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called first
        // thing in main, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

fn fail_start(e: anyhow::Error) -> i32 {
    eprintln!("bucketfs: {e:#}");
    EXIT_START
}

fn run_mount(args: Box<MountArgs>) -> i32 {
    bucketfs::logging::init(&args.log.log_level, args.log.log_format);
    let (settings, spec) = match args.to_specs() {
        Ok(v) => v,
        Err(e) => return fail_start(e),
    };
    mount::run(MountRequest {
        mountpoint: args.mountpoint.clone(),
        settings,
        mounts: vec![spec],
        check_first: true,
        metrics_addr: args.metrics_addr,
        watch: None,
    })
}

fn run_fluid(args: FluidArgs) -> i32 {
    let path = match fluid::find_config(args.config.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail_start(e),
    };
    let mount_options = std::env::var("MOUNT_OPTIONS").ok();
    let plan = match fluid::load(&path, mount_options.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail_start(e),
    };
    let level = plan.log_level.clone().unwrap_or(args.log.log_level.clone());
    let format = match plan.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => args.log.log_format,
    };
    bucketfs::logging::init(&level, format);
    info!("Fluid config {}: {} mount(s) at {}", path.display(), plan.mounts.len(), plan.target_path.display());
    for key in &plan.unknown_options {
        warn!("ignoring unknown option {key}");
    }
    if plan.read_only_by_access_mode {
        info!("the dataset's access modes are read-only: serving every mount read-only");
    }
    let target: PathBuf = plan.target_path.clone();
    mount::clean_stale_mount(&target);
    if let Err(e) = std::fs::create_dir_all(&target) {
        return fail_start(anyhow::anyhow!("cannot create targetPath {}: {e}", target.display()));
    }
    mount::run(MountRequest {
        mountpoint: target,
        settings: plan.settings,
        mounts: plan.mounts,
        check_first: false,
        metrics_addr: plan.metrics_addr,
        watch: Some(ConfigWatch { path, mount_options }),
    })
}

fn run_probe(args: ProbeArgs) -> i32 {
    let target = match args.path {
        Some(p) => p,
        None => match fluid::find_config(args.config.as_deref()).and_then(|p| fluid::target_path(&p)) {
            Ok(t) => t,
            Err(e) => match std::env::var_os("MOUNT_POINT") {
                Some(mp) => PathBuf::from(mp),
                None => {
                    eprintln!("bucketfs probe: {e:#}");
                    return 1;
                }
            },
        },
    };
    match probe::check(&target, args.timeout) {
        Ok(()) => {
            println!("ok: {} is mounted by bucketfs and answers", target.display());
            0
        }
        Err(e) => {
            eprintln!("bucketfs probe: {e}");
            1
        }
    }
}

fn run_warm(args: WarmArgs) -> i32 {
    use std::io::IsTerminal;
    let progress = !args.quiet && std::io::stderr().is_terminal();
    let s = bucketfs::warm::warm(&args.paths, args.jobs, progress);
    println!(
        "warmed {} files, {:.1} MiB in {:.1}s ({:.1} MB/s){}",
        s.files,
        s.bytes as f64 / (1 << 20) as f64,
        s.seconds,
        s.mb_per_s(),
        if s.failed > 0 { format!(", {} failed", s.failed) } else { String::new() }
    );
    if s.failed > 0 { 1 } else { 0 }
}

fn run_check(args: CheckArgs) -> i32 {
    use bucketfs::check::{Report, check_local, check_mount};
    let mut report = Report::default();
    let (specs, mountpoint) = match &args.source {
        Some(source) => match args.s3.spec(source, false, bucketfs::spec::DEFAULT_METADATA_TTL) {
            Ok(spec) => {
                report.pass("configuration", format!("source {}", spec.source));
                (vec![spec], args.mountpoint.clone())
            }
            Err(e) => {
                report.fail("configuration", format!("{e:#}"), "use BUCKET, BUCKET/PREFIX or s3://BUCKET/PREFIX");
                (Vec::new(), None)
            }
        },
        None => {
            let loaded = fluid::find_config(args.config.as_deref())
                .and_then(|p| fluid::load(&p, std::env::var("MOUNT_OPTIONS").ok().as_deref()).map(|plan| (p, plan)));
            match loaded {
                Ok((p, plan)) => {
                    report.pass(
                        "configuration",
                        format!("{}: {} mount(s) at {}", p.display(), plan.mounts.len(), plan.target_path.display()),
                    );
                    for u in &plan.unknown_options {
                        report.pass("configuration", format!("unknown option {u} will be ignored"));
                    }
                    (plan.mounts, Some(plan.target_path))
                }
                Err(e) => {
                    report.fail(
                        "configuration",
                        format!("{e:#}"),
                        "fix the field named above in the Dataset or ThinRuntime",
                    );
                    (Vec::new(), None)
                }
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bucketfs check: {e}");
            return 1;
        }
    };
    if args.abort_incomplete_uploads {
        if !report.ok() {
            println!("{}", report.text());
            return 1;
        }
        let ok = rt.block_on(async {
            let mut ok = true;
            for spec in &specs {
                ok &= bucketfs::check::abort_incomplete_uploads_of(spec, args.older_than, args.dry_run).await;
            }
            ok
        });
        return if ok { 0 } else { 1 };
    }
    rt.block_on(async {
        for spec in &specs {
            check_mount(&mut report, spec, args.write_test).await;
        }
    });
    if let Some(mp) = mountpoint {
        check_local(&mut report, &mp);
    }
    println!("{}", report.text());
    if report.ok() {
        println!("all checks passed");
        0
    } else {
        1
    }
}
