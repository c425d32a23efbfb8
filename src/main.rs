use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use tracing::{info, warn};

use bucketfs::cli::{CheckArgs, Cli, Command, FluidArgs, ManArgs, MountArgs, ProbeArgs, WarmArgs};
use bucketfs::daemon::{self, Ready};
use bucketfs::logging::{LogFormat, LogTarget};
use bucketfs::mount::{self, ConfigWatch, EXIT_START, MountRequest};
use bucketfs::{fluid, fstab, probe};

fn main() {
    limit_malloc_arenas();
    // Before anything else, while this is the only thread.
    let ready = daemon::take_ready_fd();
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    // `bucketfs SOURCE MOUNTPOINT -o OPTS`, as mount.fuse3 runs it.
    match fstab::rewrite(&argv) {
        Some(Ok(rewritten)) => argv = rewritten,
        Some(Err(e)) => {
            eprintln!("bucketfs: {e}");
            std::process::exit(EXIT_START);
        }
        None => {}
    }
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| e.exit());
    let code = match cli.command {
        Command::Mount(args) => run_mount(args, &argv, ready),
        Command::Fluid(args) => run_fluid(args),
        Command::Probe(args) => run_probe(args),
        Command::Warm(args) => run_warm(args),
        Command::Check(args) => run_check(*args),
        Command::Completions(args) => {
            clap_complete::generate(args.shell, &mut Cli::command(), "bucketfs", &mut std::io::stdout());
            0
        }
        Command::Man(args) => run_man(args),
    };
    std::process::exit(code);
}

fn run_man(args: ManArgs) -> i32 {
    let mut cmd = Cli::command();
    cmd.build();
    if let Some(dir) = &args.dir {
        return match clap_mangen::generate_to(cmd, dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bucketfs man: {}: {e}", dir.display());
                1
            }
        };
    }
    let page = match &args.command {
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                eprintln!("bucketfs man: no command {name:?}");
                return 2;
            }
        },
        None => cmd,
    };
    match clap_mangen::Man::new(page).render(&mut std::io::stdout()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bucketfs man: {e}");
            1
        }
    }
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

fn run_mount(args: Box<MountArgs>, argv: &[OsString], ready: Option<Ready>) -> i32 {
    if args.background && ready.is_none() {
        // Report what can be checked here before starting the server process.
        if let Err(e) = args.to_specs() {
            return fail_start(e);
        }
        if let Some(path) = &args.log.log_file
            && let Err(e) = bucketfs::logging::open_log_file(path)
        {
            return fail_start(e);
        }
        if args.log.log_file.is_none() && !std::path::Path::new(bucketfs::logging::SYSLOG_SOCKET).exists() {
            eprintln!(
                "bucketfs: no syslog at {}: the background mount's logs are discarded (use --log-file)",
                bucketfs::logging::SYSLOG_SOCKET
            );
        }
        return daemon::start(&argv[1..], &args.mountpoint);
    }
    let target = match (&args.log.log_file, &ready) {
        (Some(path), _) => LogTarget::File(path.clone()),
        (None, Some(_)) => LogTarget::Syslog,
        (None, None) => LogTarget::Stderr,
    };
    if let Err(e) = bucketfs::logging::init_to(&args.log.log_level, args.log.log_format, &target) {
        return fail_start(e);
    }
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
        on_ready: ready.map(|r| Box::new(move || r.notify()) as Box<dyn FnOnce() + Send>),
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
    let target = args.log.log_file.clone().map_or(LogTarget::Stderr, LogTarget::File);
    if let Err(e) = bucketfs::logging::init_to(&level, format, &target) {
        return fail_start(e);
    }
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
        on_ready: None,
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
