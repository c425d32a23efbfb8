use clap::Parser;

use bucketfs::cli::{Cli, Command};
use bucketfs::mount::{self, EXIT_START, MountRequest};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help and version to stdout with code 0, errors with code 2.
            e.exit();
        }
    };
    let code = match cli.command {
        Command::Mount(args) => {
            bucketfs::logging::init(&args.log.log_level, args.log.log_format);
            match args.to_specs() {
                Ok((settings, spec)) => {
                    if !args.read_only {
                        tracing::info!("writes are not supported yet: mounting read-only");
                    }
                    mount::run(MountRequest {
                        mountpoint: args.mountpoint.clone(),
                        settings,
                        mounts: vec![spec],
                        check_first: true,
                    })
                }
                Err(e) => {
                    eprintln!("bucketfs: {e:#}");
                    EXIT_START
                }
            }
        }
    };
    std::process::exit(code);
}
