//! The `mount.fuse3` calling convention: `bucketfs SOURCE MOUNTPOINT -o OPTS`.
//!
//! `mount -t fuse.bucketfs SOURCE DIR -o ...` and `/etc/fstab` lines of type
//! `fuse.bucketfs` run `mount.fuse3`, which runs `bucketfs SOURCE DIR -o
//! opt,opt,...` and waits for it to return. Such a command line is rewritten
//! here into `bucketfs mount SOURCE DIR --opt ... --background` before clap
//! sees it: every long option of `bucketfs mount` is an `-o` key (spelt with
//! `-` or `_`), and the generic mount options that `mount(8)` and
//! `mount.fuse3` pass along are ignored or mapped.

use std::ffi::{OsStr, OsString};

use clap::CommandFactory;

use crate::cli::Cli;

/// Generic options of `mount(8)`, `systemd` and `mount.fuse3` that mean
/// nothing to bucketfs: ignored. `nodev` and `nosuid` are always on; the
/// `dev` and `suid` that `mount.fuse3` adds when run as root are ignored;
/// `default_permissions` is always on; atime options do not apply (atime is
/// not stored).
const IGNORED: &[&str] = &[
    "_netdev",
    "nofail",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "auto",
    "noauto",
    "defaults",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "async",
    "sync",
    "dirsync",
    "default_permissions",
    "allow_root",
];

/// Prefixes of ignored `key=value` options: systemd's `x-systemd.*` and other
/// `x-` options, `comment=`, and the fsname/subtype that `mount.fuse3` may
/// pass (bucketfs sets both itself).
const IGNORED_PREFIXES: &[&str] = &["x-", "comment=", "fsname=", "subtype="];

/// Subcommand names (and clap's own words) that mean "not the mount.fuse3 form".
fn is_subcommand(word: &OsStr) -> bool {
    let Some(word) = word.to_str() else { return false };
    word == "help" || Cli::command().get_subcommands().any(|c| c.get_name() == word)
}

/// If `args` (the whole argv, program name first) is a `mount.fuse3` call,
/// the equivalent `bucketfs mount ...` argv; `None` otherwise. An option
/// that bucketfs does not know is an error naming it.
pub fn rewrite(args: &[OsString]) -> Option<Result<Vec<OsString>, String>> {
    let first = args.get(1)?;
    if first.as_encoded_bytes().starts_with(b"-") || is_subcommand(first) {
        return None;
    }
    let mut positionals = Vec::new();
    let mut opts = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let bytes = a.as_encoded_bytes();
        if bytes == b"-o" {
            opts.push(args.get(i + 1)?.to_str()?.to_string());
            i += 2;
            continue;
        }
        if let Some(rest) = bytes.strip_prefix(b"-o") {
            opts.push(std::str::from_utf8(rest).ok()?.to_string());
        } else if bytes.starts_with(b"-") {
            return None;
        } else {
            positionals.push(a.clone());
        }
        i += 1;
    }
    if positionals.len() != 2 {
        return None;
    }
    let mut out = vec![args[0].clone(), "mount".into(), positionals[0].clone(), positionals[1].clone()];
    match translate(&opts) {
        Ok(flags) => {
            out.extend(flags.into_iter().map(OsString::from));
            Some(Ok(out))
        }
        Err(e) => Some(Err(e)),
    }
}

/// Turns `-o` option lists into `bucketfs mount` flags; adds `--background`
/// unless `foreground` is among them.
pub fn translate(opts: &[String]) -> Result<Vec<String>, String> {
    let cli = Cli::command();
    let mount = cli.find_subcommand("mount").expect("the mount subcommand");
    let mut flags = Vec::new();
    let mut read_only = false;
    let mut no_exec = false;
    let mut background = true;
    for opt in opts.iter().flat_map(|o| o.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() || IGNORED.contains(&opt) || IGNORED_PREFIXES.iter().any(|p| opt.starts_with(p)) {
            continue;
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let long = key.replace('_', "-");
        match (long.as_str(), value) {
            ("ro", None) => read_only = true,
            ("rw", None) => read_only = false,
            ("noexec", None) => no_exec = true,
            ("exec", None) => no_exec = false,
            ("foreground", None) => background = false,
            ("background", None) => background = true,
            ("read-only", None) => read_only = true,
            ("no-exec", None) => no_exec = true,
            ("help" | "version", _) => return Err(format!("unknown mount option {key:?}")),
            _ => {
                let Some(arg) = mount.get_arguments().find(|a| !a.is_positional() && a.get_long() == Some(&long))
                else {
                    return Err(format!("unknown mount option {key:?}"));
                };
                match (arg.get_action().takes_values(), value) {
                    (true, Some(v)) => flags.push(format!("--{long}={v}")),
                    (true, None) => return Err(format!("mount option {key:?} needs a value: {key}=...")),
                    (false, None) => flags.push(format!("--{long}")),
                    (false, Some(_)) => return Err(format!("mount option {key:?} takes no value")),
                }
            }
        }
    }
    if read_only {
        flags.push("--read-only".into());
    }
    if no_exec {
        flags.push("--no-exec".into());
    }
    if background {
        flags.push("--background".into());
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    fn rewritten(s: &str) -> Option<Result<String, String>> {
        rewrite(&argv(s))
            .map(|r| r.map(|v| v.iter().map(|a| a.to_str().unwrap().to_string()).collect::<Vec<_>>().join(" ")))
    }

    #[test]
    fn subcommands_and_flags_are_left_to_clap() {
        assert_eq!(rewritten("bucketfs mount b /mnt"), None);
        assert_eq!(rewritten("bucketfs check b"), None);
        assert_eq!(rewritten("bucketfs --help"), None);
        assert_eq!(rewritten("bucketfs help mount"), None);
        assert_eq!(rewritten("bucketfs completions bash"), None);
        assert_eq!(rewritten("bucketfs"), None);
        // Not two positionals: clap reports it.
        assert_eq!(rewritten("bucketfs b"), None);
        assert_eq!(rewritten("bucketfs b /mnt extra"), None);
        assert_eq!(rewritten("bucketfs b /mnt -f"), None);
    }

    #[test]
    fn the_mount_fuse_form_becomes_a_background_mount() {
        assert_eq!(rewritten("bucketfs b /mnt").unwrap().unwrap(), "bucketfs mount b /mnt --background");
        // What mount(8) and mount.fuse3 pass for an fstab line with `user,_netdev,...`.
        assert_eq!(
            rewritten(
                "bucketfs s3://b/p /mnt/x -o ro,noatime,noexec,nosuid,nodev,endpoint-url=http://127.0.0.1:9000,allow_other,memory_limit=1G,dev,suid"
            )
            .unwrap()
            .unwrap(),
            "bucketfs mount s3://b/p /mnt/x --endpoint-url=http://127.0.0.1:9000 --allow-other --memory-limit=1G --read-only --no-exec --background"
        );
        assert_eq!(
            rewritten("bucketfs b /mnt -o _netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30,noauto,user,defaults,rw")
                .unwrap()
                .unwrap(),
            "bucketfs mount b /mnt --background"
        );
        assert_eq!(
            rewritten("bucketfs b /mnt -oforeground,metadata_ttl=5s -o region=eu-1,read_only,log-file=/var/log/b.log")
                .unwrap()
                .unwrap(),
            "bucketfs mount b /mnt --metadata-ttl=5s --region=eu-1 --log-file=/var/log/b.log --read-only"
        );
        // The last of ro and rw wins.
        assert_eq!(rewritten("bucketfs b /mnt -o ro,rw").unwrap().unwrap(), "bucketfs mount b /mnt --background");
        // Values keep their `=` and commas split options.
        assert_eq!(
            rewritten("bucketfs b /mnt -o access_key_file=/etc/b/ak,secret-key-file=/etc/b/sk,uid=1000,file_mode=0600")
                .unwrap()
                .unwrap(),
            "bucketfs mount b /mnt --access-key-file=/etc/b/ak --secret-key-file=/etc/b/sk --uid=1000 --file-mode=0600 --background"
        );
    }

    #[test]
    fn unknown_or_malformed_options_are_named() {
        let err = |s: &str| rewritten(s).unwrap().unwrap_err();
        assert_eq!(err("bucketfs b /mnt -o ro,bogus"), "unknown mount option \"bogus\"");
        // The value of an unknown option is not repeated (it may be a secret).
        assert_eq!(err("bucketfs b /mnt -o secret_key=hunter2"), "unknown mount option \"secret_key\"");
        assert!(!err("bucketfs b /mnt -o secret_key=hunter2").contains("hunter2"));
        assert_eq!(err("bucketfs b /mnt -o help"), "unknown mount option \"help\"");
        assert_eq!(err("bucketfs b /mnt -o region"), "mount option \"region\" needs a value: region=...");
        assert_eq!(err("bucketfs b /mnt -o allow_other=1"), "mount option \"allow_other\" takes no value");
        // Positional arguments are not options.
        assert_eq!(err("bucketfs b /mnt -o source=x"), "unknown mount option \"source\"");
    }
}
