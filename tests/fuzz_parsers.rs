//! Property-based fuzzing of every parser that sees user or Fluid input:
//! `fluid::plan` (on arbitrary text, arbitrary JSON, and JSON shaped like a
//! Fluid config), `Source`, the size/duration/TTL/mode parsers,
//! `MOUNT_OPTIONS`, and the key-to-name mapping of listings.
//!
//! Properties: nothing panics; an error is one non-empty line (it ends up in
//! a Kubernetes event or a terminal); a `plan` error names what it is about;
//! what parses successfully is well-formed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

use bucketfs::fluid::{self, parse_mount_options, plan};
use bucketfs::fs::namespace::{self, Kind, entries_from_listing};
use bucketfs::spec::{self, Source};
use bucketfs::store::ObjectMeta;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failing inputs are printed; no regression files in the tree.
        failure_persistence: None,
        // ChaCha, the default, dominates the run time in a debug build.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        // Bounded shrinking, so a failure is reported quickly.
        max_shrink_time: 5_000,
        ..ProptestConfig::default()
    }
}

/// What a `plan` error may be about (see src/fluid.rs): every message
/// starts with, or contains, one of these.
const PLAN_FIELDS: [&str; 6] = ["JSON", "targetPath", "runtimeOptions", "mounts", "mount ", "accessModes"];

/// The error as `bucketfs` prints it, checked to be one non-empty line.
fn one_line(what: &str, input: &str, e: &anyhow::Error) -> Result<String, TestCaseError> {
    let msg = format!("{e:#}");
    prop_assert!(!msg.trim().is_empty(), "{what}({input:?}): empty error");
    prop_assert!(!msg.contains('\n') && !msg.contains('\r'), "{what}({input:?}): error is not one line: {msg:?}");
    Ok(msg)
}

fn check_plan(text: &str, mount_options: Option<&str>) -> Result<(), TestCaseError> {
    match plan(text, mount_options) {
        Err(e) => {
            let msg = one_line("plan", text, &e)?;
            prop_assert!(PLAN_FIELDS.iter().any(|f| msg.contains(f)), "plan({text:?}): error names no field: {msg}");
        }
        Ok(p) => {
            prop_assert!(p.target_path.is_absolute());
            let mut paths = BTreeSet::new();
            for m in &p.mounts {
                prop_assert!(!m.source.bucket.is_empty());
                prop_assert!(m.source.prefix.is_empty() || m.source.prefix.ends_with('/'));
                prop_assert!(m.s3.max_attempts >= 1);
                prop_assert!(!p.settings.read_only || m.read_only);
                for c in &m.path {
                    prop_assert!(namespace::valid_name(c), "mount path component {c:?}");
                }
                prop_assert!(paths.insert(m.path.clone()), "two mounts at {:?}", m.path);
            }
            if p.mounts.len() > 1 {
                prop_assert!(p.mounts.iter().all(|m| !m.path.is_empty()));
            }
            for a in &p.mounts {
                for b in &p.mounts {
                    prop_assert!(
                        !(a.path.len() < b.path.len() && b.path.starts_with(&a.path)),
                        "mount {:?} inside {:?}",
                        b.path,
                        a.path
                    );
                }
            }
        }
    }
    Ok(())
}

// ----- strategies -----

/// A string matching `pattern`, compiled once (a `&str` strategy would
/// parse its regex again for every case).
fn re(pattern: &str) -> BoxedStrategy<String> {
    proptest::string::string_regex(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}")).boxed()
}

/// A secret file that exists, and an empty one.
fn secret_files() -> &'static (String, String) {
    static FILES: OnceLock<(String, String)> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bucketfs-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let full = dir.join("key");
        let empty = dir.join("empty");
        std::fs::write(&full, "AKIAFUZZ\n").unwrap();
        std::fs::write(&empty, "").unwrap();
        (full.to_str().unwrap().to_string(), empty.to_str().unwrap().to_string())
    })
}

const TRICKY: &[&str] = &[
    "",
    " ",
    "true",
    "false",
    "yes",
    "off",
    "1",
    "0",
    "-1",
    "0644",
    "0o755",
    "+777",
    "999",
    "07777",
    "17777",
    "4294967296",
    "512MiB",
    "1.5G",
    "1e300",
    "1e19",
    "18446744073709551616",
    "NaN",
    "inf",
    "-0",
    ".",
    "20s",
    "500ms",
    "1h 2m",
    "indefinite",
    "minimal",
    "soon",
    "s3://b/p",
    "minio://my-bucket",
    "s3://",
    "gs://b",
    "b//c",
    "b/../c",
    "b/./c",
    "b\\c",
    "/etc/fluid/secrets/x/y",
    "/etc/fluid/secrets/x\ny",
    "/tmp/no-such-bucketfs-file",
    "/tmp/a\nb",
    "/no/such/dir/file",
    "http://127.0.0.1:9/",
    "ReadWriteMany",
    "a\nb",
    "\u{0}",
    "ünïcødé",
    "日本語",
    "😀",
    "\u{202e}rtl",
];

fn tricky_string() -> BoxedStrategy<String> {
    let (full, empty) = secret_files().clone();
    prop_oneof![
        6 => prop::sample::select(TRICKY).prop_map(String::from),
        3 => re("[0-9]{0,25}(\\.[0-9]{0,4})?(e[+-]?[0-9]{1,3})?( ?(ms|s|m|h|d|y|B|KiB|MiB|G|TB|x))?"),
        2 => re("[ -~]{0,16}"),
        2 => any::<String>().prop_map(|s| s.chars().take(16).collect()),
        1 => re("(/[ab.\n]{0,3}){1,3}"),
        1 => re("[a-z]{256,300}"),
        1 => Just(full),
        1 => Just(empty),
    ]
    .boxed()
}

fn key_string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => re("[a-zA-Z-]{0,12}"),
        1 => any::<String>().prop_map(|s| s.chars().take(8).collect()),
        1 => prop::sample::select(TRICKY).prop_map(String::from),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key_string(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

const OPTION_KEYS: &[&str] = &[
    "minio-url",
    "endpoint",
    "url",
    "endpoint-url",
    "minio-access-key",
    "minio-access-secret",
    "access-key",
    "secret-key",
    "access-key-id",
    "secret-access-key",
    "metadata-ttl",
    "attr-timeout",
    "stat-cache-ttl",
    "region",
    "path-style",
    "force-path-style",
    "ca-bundle",
    "connect-timeout",
    "first-byte-timeout",
    "idle-timeout",
    "request-timeout",
    "max-attempts",
    "uid",
    "gid",
    "file-mode",
    "dir-mode",
    "allow-other",
    "memory-limit",
    "read-ahead",
    "log-level",
    "log-format",
    "read-only",
    "ro",
    "rw",
    "fluid.fuse.hostvolume",
];

fn option_map() -> BoxedStrategy<Value> {
    let key = prop_oneof![
        5 => prop::sample::select(OPTION_KEYS).prop_map(String::from),
        1 => key_string(),
    ];
    let value = prop_oneof![
        8 => tricky_string().prop_map(Value::String),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => number(),
        1 => Just(Value::Null),
        1 => json_value(),
    ];
    prop::collection::btree_map(key, value, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())).boxed()
}

/// `Some(v)` puts `key: v` in the object.
fn put(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.to_string(), v);
    }
}

fn mount_value() -> BoxedStrategy<Value> {
    let string_or_any = |s: BoxedStrategy<String>| prop_oneof![9 => s.prop_map(Value::String), 1 => json_value()];
    let mount_point = string_or_any(
        prop_oneof![
            Just("b".to_string()),
            Just("s3://bucket/prefix".to_string()),
            Just("minio://b/".to_string()),
            re("[a-c]{1,2}(/[a-c./]{0,4})?"),
            tricky_string(),
        ]
        .boxed(),
    );
    let name = string_or_any(prop_oneof![re("[ab\n.]{0,2}"), tricky_string()].boxed());
    let path = string_or_any(prop_oneof![re("(/[ab\n.]{0,2}){0,3}/?"), tricky_string()].boxed());
    let read_only = prop_oneof![3 => any::<bool>().prop_map(Value::Bool), 1 => json_value()];
    let options = prop_oneof![9 => option_map(), 1 => json_value()];
    (
        prop::option::weighted(0.9, mount_point),
        prop::option::of(options),
        prop::option::of(name),
        prop::option::of(path),
        prop::option::weighted(0.3, read_only),
        prop::collection::btree_map(key_string(), json_value(), 0..2),
    )
        .prop_map(|(mount_point, options, name, path, read_only, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            put(&mut m, "mountPoint", mount_point);
            put(&mut m, "options", options);
            put(&mut m, "name", name);
            put(&mut m, "path", path);
            put(&mut m, "readOnly", read_only);
            Value::Object(m)
        })
        .boxed()
}

/// JSON shaped like a Fluid ThinRuntime config, with random holes and types.
fn fluid_config() -> BoxedStrategy<Value> {
    let target = prop_oneof![
        6 => prop_oneof![Just("/t".to_string()), Just("/runtime-mnt/thin/ns/ds/thin-fuse".to_string()), tricky_string()]
            .prop_map(Value::String),
        1 => json_value(),
    ];
    let mounts = prop_oneof![
        9 => prop::collection::vec(mount_value(), 0..4).prop_map(Value::Array),
        1 => json_value(),
    ];
    let runtime = prop_oneof![9 => option_map(), 1 => json_value()];
    let mode = prop_oneof![
        Just("ReadOnlyMany".to_string()),
        Just("ReadWriteMany".to_string()),
        Just("ReadWriteOncePod".to_string()),
        tricky_string(),
    ];
    let modes = prop_oneof![
        9 => prop::collection::vec(mode.prop_map(Value::String), 0..3).prop_map(Value::Array),
        1 => json_value(),
    ];
    (
        prop::option::weighted(0.9, target),
        prop::option::weighted(0.9, mounts),
        prop::option::of(runtime),
        prop::option::of(modes),
        prop::collection::btree_map(key_string(), json_value(), 0..2),
    )
        .prop_map(|(target, mounts, runtime, modes, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            put(&mut m, "targetPath", target);
            put(&mut m, "mounts", mounts);
            put(&mut m, "runtimeOptions", runtime);
            put(&mut m, "accessModes", modes);
            Value::Object(m)
        })
        .boxed()
}

fn mount_options() -> BoxedStrategy<Option<String>> {
    prop::option::of(prop_oneof![
        Just("ro".to_string()),
        Just("uid=1000,gid=1000,ro,allow-other".to_string()),
        re("[a-z=, 0-9-]{0,30}"),
        prop::collection::vec((prop::sample::select(OPTION_KEYS), prop::option::of(tricky_string())), 0..4).prop_map(
            |kv| kv
                .into_iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
    ])
    .boxed()
}

/// A key component: empty, dots, long, unicode, NUL.
fn component() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        re("[ab]{1,2}"),
        re("[ab]{1,2}"),
        Just("é".to_string()),
        Just("日本".to_string()),
        Just("x".repeat(255)),
        Just("y".repeat(256)),
        Just("ü".repeat(127)),
        Just("ü".repeat(128)),
        Just("a\0b".to_string()),
        prop::collection::vec(any::<char>(), 1..5).prop_map(|c| c.into_iter().collect()),
    ]
    .boxed()
}

fn key_path() -> BoxedStrategy<String> {
    prop::collection::vec(component(), 1..4).prop_map(|c| c.join("/")).boxed()
}

fn meta(key: String) -> ObjectMeta {
    ObjectMeta { key, size: 7, etag: "\"e\"".into(), last_modified: SystemTime::UNIX_EPOCH }
}

// ----- properties -----

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn plan_on_arbitrary_text(text in prop_oneof![
        any::<String>(),
        re("[\\[\\]{}\",:0-9a-zA-Z/ \n\\\\.-]{0,60}"),
        re("\\{\"targetPath\": ?\"[ -~]{0,10}\"(, ?\"[a-zA-Z]{0,12}\": ?[\\[\\]{}\"0-9a-z:,]{0,20})?\\}"),
    ], opts in mount_options()) {
        check_plan(&text, opts.as_deref())?;
    }

    #[test]
    fn plan_on_arbitrary_json(v in json_value(), opts in mount_options()) {
        check_plan(&v.to_string(), opts.as_deref())?;
    }

    #[test]
    fn plan_on_fluid_shaped_json(v in fluid_config(), opts in mount_options(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
        check_plan(&text, opts.as_deref())?;
    }

    /// Fluid-shaped text cut or damaged at a random place.
    #[test]
    fn plan_on_damaged_fluid_json(v in fluid_config(), at in any::<prop::sample::Index>(),
                                  junk in prop_oneof![Just(""), Just("}"), Just("\""), Just("\\"), Just("\u{0}"), Just(",")]) {
        let text = v.to_string();
        let mut cut = at.index(text.len() + 1);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let damaged = format!("{}{junk}{}", &text[..cut], &text[cut..].get(1..).unwrap_or(""));
        check_plan(&damaged, None)?;
    }

    #[test]
    fn mount_options_never_panic(s in prop_oneof![any::<String>(), re("[a-z=, \t-]{0,40}")]) {
        let ro = fluid::read_only_from(None, Some(&s));
        let opts = parse_mount_options(&s);
        prop_assert_eq!(ro, opts.contains_key("ro"));
        for (k, v) in &opts {
            prop_assert!(!k.contains(',') && !v.contains(','), "{:?}={:?}", k, v);
            prop_assert_eq!(k.trim(), k.as_str());
            prop_assert_eq!(v.trim(), v.as_str());
        }
    }

    #[test]
    fn sources_parse_or_fail_in_one_line(s in prop_oneof![
        any::<String>(),
        tricky_string(),
        re("((s3|minio|gs|)://)?[a-z. \\\\]{0,6}(/[a-z.]{0,3}){0,4}/?"),
    ]) {
        match s.parse::<Source>() {
            Err(e) => {
                one_line("Source::from_str", &s, &e)?;
            }
            Ok(src) => {
                prop_assert!(!src.bucket.is_empty());
                prop_assert!(src.prefix.is_empty() || src.prefix.ends_with('/'));
                if !src.prefix.is_empty() {
                    for c in src.prefix.trim_end_matches('/').split('/') {
                        prop_assert!(namespace::valid_name(c), "prefix component {:?} of {:?}", c, s);
                    }
                }
                let again: Source = src.to_string().parse().map_err(|e| {
                    TestCaseError::fail(format!("{s:?} parsed to {src} which does not parse: {e:#}"))
                })?;
                prop_assert_eq!(again, src);
            }
        }
    }

    #[test]
    fn sizes_durations_ttls_modes(s in tricky_string()) {
        match spec::parse_size(&s) {
            Ok(_) => {}
            Err(e) => { one_line("parse_size", &s, &e)?; }
        }
        match spec::parse_duration(&s) {
            Ok(_) => {}
            Err(e) => { one_line("parse_duration", &s, &e)?; }
        }
        match spec::parse_ttl(&s) {
            Ok(_) => {}
            Err(e) => { one_line("parse_ttl", &s, &e)?; }
        }
        match spec::parse_mode(&s) {
            Ok(m) => prop_assert!(m <= 0o7777),
            Err(e) => { one_line("parse_mode", &s, &e)?; }
        }
    }

    #[test]
    fn listings_give_valid_unique_names(
        prefix in prop_oneof![Just(String::new()), Just("a/".to_string()), key_path().prop_map(|k| format!("{k}/"))],
        objects in prop::collection::vec((key_path(), any::<bool>(), any::<bool>()), 0..24),
        prefixes in prop::collection::vec((key_path(), any::<bool>()), 0..12),
    ) {
        let under = |k: &str, inside: bool| if inside { format!("{prefix}{k}") } else { k.to_string() };
        let objects: Vec<ObjectMeta> = objects
            .iter()
            .map(|(k, inside, slash)| meta(format!("{}{}", under(k, *inside), if *slash { "/" } else { "" })))
            .collect();
        let prefixes: Vec<String> = prefixes.iter().map(|(k, inside)| format!("{}/", under(k, *inside))).collect();
        let (entries, skipped) = entries_from_listing(&prefix, &objects, &prefixes);

        // The model: direct children only, directories win.
        let mut want: BTreeMap<String, Kind> = BTreeMap::new();
        for o in &objects {
            if let Some(name) = o.key.strip_prefix(prefix.as_str())
                && namespace::valid_name(name)
            {
                want.insert(name.to_string(), Kind::File);
            }
        }
        for p in &prefixes {
            if let Some(name) = p.strip_prefix(prefix.as_str()).and_then(|n| n.strip_suffix('/'))
                && namespace::valid_name(name)
            {
                want.insert(name.to_string(), Kind::Dir);
            }
        }
        let got: BTreeMap<String, Kind> = entries.iter().map(|e| (e.name.clone(), e.kind)).collect();
        prop_assert_eq!(got.len(), entries.len(), "duplicate names");
        for e in &entries {
            prop_assert!(namespace::valid_name(&e.name), "invalid name {:?}", e.name);
            prop_assert!(!e.name.contains('/'));
        }
        prop_assert!(entries.windows(2).all(|w| w[0].name < w[1].name), "not sorted");
        prop_assert_eq!(got, want);
        let invalid_under_prefix = objects
            .iter()
            .filter_map(|o| o.key.strip_prefix(prefix.as_str()))
            .filter(|n| !n.is_empty() && !namespace::valid_name(n))
            .count();
        prop_assert!(skipped.len() >= invalid_under_prefix);
    }
}

#[test]
fn target_path_reader_never_panics_on_odd_files() {
    // `fluid::target_path` reads a file; feed it a few odd ones.
    let dir = tempfile::tempdir().unwrap();
    for (i, text) in ["", "{", "[]", "{\"targetPath\":5}", "{\"targetPath\":\"\"}", "\u{feff}{}"].iter().enumerate() {
        let p: PathBuf = dir.path().join(format!("c{i}.json"));
        std::fs::write(&p, text).unwrap();
        let e = fluid::target_path(&p).unwrap_err();
        let msg = format!("{e:#}");
        assert!(!msg.contains('\n') && !msg.is_empty(), "{text:?}: {msg}");
    }
}

/// Inputs the fuzzer found (or that follow the same pattern), kept as plain
/// tests so each one is reported by name with its exact input. Each must
/// give a one-line error naming its field, never a panic.
fn plan_problem(text: &str) -> Option<String> {
    let e = match std::panic::catch_unwind(|| plan(text, None)) {
        Err(_) => return Some(format!("plan panicked on {text:?}")),
        Ok(Ok(_)) => return Some(format!("plan accepted {text:?}")),
        Ok(Err(e)) => e,
    };
    let msg = format!("{e:#}");
    if msg.is_empty() || msg.contains('\n') {
        return Some(format!("plan({text:?}): error is not one line: {msg:?}"));
    }
    if !PLAN_FIELDS.iter().any(|f| msg.contains(f)) {
        return Some(format!("plan({text:?}): error names no field: {msg}"));
    }
    None
}

fn assert_no_problems(problems: Vec<String>) {
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn huge_durations_are_errors_not_panics() {
    let mut problems = Vec::new();
    for s in ["1e300", ".1e30", "18446744073709551616", "1e20"] {
        for (name, f) in
            [("parse_duration", spec::parse_duration as fn(&str) -> anyhow::Result<_>), ("parse_ttl", spec::parse_ttl)]
        {
            match std::panic::catch_unwind(|| f(s)) {
                Ok(Err(_)) => {}
                Ok(Ok(d)) => problems.push(format!("{name}({s:?}) = {d:?}, wanted an error")),
                Err(_) => problems.push(format!("{name}({s:?}) panicked")),
            }
        }
    }
    problems.extend(plan_problem(r#"{"targetPath":"/t","runtimeOptions":{"metadata-ttl":"1e300"}}"#));
    problems.extend(plan_problem(
        r#"{"targetPath":"/t","mounts":[{"mountPoint":"b","options":{"request-timeout":"1e20"}}]}"#,
    ));
    assert_no_problems(problems);
}

#[test]
fn option_keys_with_newlines_stay_on_one_line() {
    assert_no_problems(
        [
            r#"{"targetPath":"/t","runtimeOptions":{"a\nb":[1]}}"#,
            r#"{"targetPath":"/t","mounts":[{"mountPoint":"b","options":{"a\nb":{}}}]}"#,
        ]
        .into_iter()
        .filter_map(plan_problem)
        .collect(),
    );
}

#[test]
fn secret_paths_with_newlines_stay_on_one_line() {
    assert_no_problems(
        [
            r#"{"targetPath":"/t","mounts":[{"mountPoint":"b","options":{"access-key":"/etc/fluid/secrets/x\ny","secret-key":"s"}}]}"#,
            r#"{"targetPath":"/t","mounts":[{"mountPoint":"b","options":{"access-key":"AK","secret-key":"/tmp/x\ny"}}]}"#,
        ]
        .into_iter()
        .filter_map(plan_problem)
        .collect(),
    );
}

#[test]
fn mount_paths_with_newlines_stay_on_one_line() {
    assert_no_problems(
        [
            r#"{"targetPath":"/t","mounts":[{"mountPoint":"a","path":"/x\ny"},{"mountPoint":"b","path":"/x\ny"}]}"#,
            r#"{"targetPath":"/t","mounts":[{"mountPoint":"a","path":"/x\ny"},{"mountPoint":"b","path":"/x\ny/z"}]}"#,
        ]
        .into_iter()
        .filter_map(plan_problem)
        .collect(),
    );
}
