//! Offline checks of the Kubernetes manifests in `profiles/` and of
//! `docker/Dockerfile` (docs/fluid.md). No cluster, FUSE or S3 server needed.
//!
//! - Every YAML document under `profiles/` parses.
//! - Every `data.fluid.io` document validates against the `openAPIV3Schema`
//!   of Fluid's CRD for its kind and version (`tests/data/fluid-crds/`), with
//!   a small structural-schema validator written here. Unknown fields are
//!   errors, as with `kubectl apply` (strict field validation).
//! - Core kinds (Pod, Job, Deployment, Service, Secret) get minimal checks.
//! - The manifests agree with each other and with bucketfs: PVC names,
//!   profile names, secret references, the FUSE fsname, `bucketfs fluid`.
//! - The Dockerfile builds a Debian image with the tools Fluid runs, both
//!   from its Rust build stage and from a binary built outside
//!   (`runtime-prebuilt`). scripts/container-e2e.sh builds and runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::{Value, json};

/// The only Fluid API version the CRDs in tests/data/fluid-crds serve.
const FLUID_API_VERSION: &str = "data.fluid.io/v1alpha1";
const FLUID_GROUP: &str = "data.fluid.io";
/// The label that makes Fluid's webhook inject the FUSE sidecar.
const INJECT_LABEL: &str = "serverless.fluid.io/inject";

/// Core kinds the manifests may use, with their apiVersion. There is no
/// offline schema for them, so they get the minimal checks below; add a kind
/// here (and its checks) before using it in profiles/.
const CORE_KINDS: &[(&str, &str)] =
    &[("Pod", "v1"), ("Service", "v1"), ("Secret", "v1"), ("Job", "batch/v1"), ("Deployment", "apps/v1")];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// Fails the test with every problem found, not just the first.
fn finish(what: &str, problems: Vec<String>) {
    if !problems.is_empty() {
        panic!("{what}: {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "));
    }
}

// ---------------------------------------------------------------------------
// Loading YAML
// ---------------------------------------------------------------------------

/// Every document of a YAML stream, converted to JSON values. Empty documents
/// (only comments, or nothing between two `---`) come back as `Null`, so that
/// the numbering matches the file. Duplicate keys are errors.
fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let yaml = serde_yaml_ng::Value::deserialize(de).map_err(|e| format!("document {}: {e}", i + 1))?;
        let value =
            serde_json::to_value(&yaml).map_err(|e| format!("document {}: not representable as JSON: {e}", i + 1))?;
        docs.push(value);
    }
    Ok(docs)
}

/// `*.yaml` / `*.yml` files under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("read_dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    out
}

/// One non-empty YAML document of a manifest file.
struct Doc {
    /// `profiles/minio.yaml#2`: file and 1-based document number.
    origin: String,
    value: Value,
}

impl Doc {
    fn str_at(&self, pointer: &str) -> &str {
        self.value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
    }
    fn kind(&self) -> &str {
        self.str_at("/kind")
    }
    fn api_version(&self) -> &str {
        self.str_at("/apiVersion")
    }
    fn name(&self) -> &str {
        self.str_at("/metadata/name")
    }
    /// Namespace as kubectl applies it (without `-n`): `default` if unset.
    fn namespace(&self) -> &str {
        match self.str_at("/metadata/namespace") {
            "" => "default",
            ns => ns,
        }
    }
    fn is(&self, api_version: &str, kind: &str) -> bool {
        self.api_version() == api_version && self.kind() == kind
    }
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} {:?})", self.origin, self.kind(), self.name())
    }
}

fn load_docs(dir: &Path) -> Result<Vec<Doc>, Vec<String>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let files = yaml_files(dir);
    if files.is_empty() {
        errors.push(format!("no YAML files under {}", relative(dir)));
    }
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: {e}", relative(&file)));
                continue;
            }
        };
        match parse_yaml_documents(&text) {
            Ok(values) => {
                for (i, value) in values.into_iter().enumerate() {
                    if !value.is_null() {
                        docs.push(Doc { origin: format!("{}#{}", relative(&file), i + 1), value });
                    }
                }
            }
            Err(e) => errors.push(format!("{}: {e}", relative(&file))),
        }
    }
    if errors.is_empty() { Ok(docs) } else { Err(errors) }
}

static PROFILES: LazyLock<Result<Vec<Doc>, Vec<String>>> = LazyLock::new(|| load_docs(&root().join("profiles")));

/// All documents under profiles/; fails the test if one does not parse.
fn profiles() -> &'static [Doc] {
    match &*PROFILES {
        Ok(docs) => docs,
        Err(errors) => {
            finish("parsing profiles/", errors.clone());
            unreachable!()
        }
    }
}

fn of_kind<'a>(docs: &'a [Doc], kind: &'a str) -> impl Iterator<Item = &'a Doc> + 'a {
    docs.iter().filter(move |d| d.is(FLUID_API_VERSION, kind))
}

/// `openAPIV3Schema` of every served CRD version, by (apiVersion, kind).
static CRD_SCHEMAS: LazyLock<BTreeMap<(String, String), Value>> = LazyLock::new(|| {
    let dir = root().join("tests/data/fluid-crds");
    let docs = load_docs(&dir).unwrap_or_else(|e| panic!("{}", e.join("\n")));
    let mut schemas = BTreeMap::new();
    for doc in docs.iter().filter(|d| d.kind() == "CustomResourceDefinition") {
        let group = doc.str_at("/spec/group");
        let kind = doc.str_at("/spec/names/kind");
        let versions = doc.value.pointer("/spec/versions").and_then(Value::as_array);
        for version in versions.into_iter().flatten() {
            if version.get("served") == Some(&Value::Bool(false)) {
                continue;
            }
            let name = version.get("name").and_then(Value::as_str).unwrap_or("");
            let schema = version
                .pointer("/schema/openAPIV3Schema")
                .unwrap_or_else(|| panic!("{doc}: version {name} has no openAPIV3Schema"));
            schemas.insert((format!("{group}/{name}"), kind.to_string()), schema.clone());
        }
    }
    for kind in ["Dataset", "ThinRuntime", "ThinRuntimeProfile"] {
        assert!(
            schemas.contains_key(&(FLUID_API_VERSION.to_string(), kind.to_string())),
            "tests/data/fluid-crds has no {FLUID_API_VERSION} schema for {kind}"
        );
    }
    schemas
});

fn crd_schema(api_version: &str, kind: &str) -> Option<&'static Value> {
    CRD_SCHEMAS.get(&(api_version.to_string(), kind.to_string()))
}

// ---------------------------------------------------------------------------
// Structural-schema validator (the OpenAPI v3 subset that CRDs use)
// ---------------------------------------------------------------------------

/// `path.key`, or `path["key"]` for keys such as label names that hold dots
/// or slashes.
fn child_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() { "<root>" } else { path }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key) == Some(&Value::Bool(true))
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

/// A value as an error message shows it: its JSON type and the value.
fn describe(v: &Value) -> String {
    let ty = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => return "an array".to_string(),
        Value::Object(_) => return "an object".to_string(),
    };
    format!("{ty} {v}")
}

/// Validates `value` (at `path`, e.g. `spec.mounts[0]`) against a structural
/// schema node and appends one `path: message` per problem to `errors`.
///
/// Supported: `type` (object, array, string, integer, number, boolean),
/// `x-kubernetes-int-or-string`, `nullable`, `enum`, `required`,
/// `properties`, `additionalProperties` (schema or bool),
/// `x-kubernetes-preserve-unknown-fields`, `items`, `minLength`,
/// `maxLength`, `minimum`, `maximum`, `minItems`, `maxItems`. A field that
/// `properties` does not list is an error, unless the node has
/// `additionalProperties` or preserves unknown fields: kubectl rejects it
/// (strict field validation) and the API server would prune it. Not
/// evaluated: `pattern`, `format`, `x-kubernetes-validations` (CEL).
fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = shown(path);
    if value.is_null() {
        if !flag(schema, "nullable") {
            errors.push(format!(
                "{at}: null (a key with no value) is not allowed here; the API server \
                 drops it silently, so remove the key or give it a value"
            ));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(is_integer(value) || value.is_string()) {
            errors.push(format!("{at}: expected an integer or a string, found {}", describe(value)));
        }
        return;
    }
    for keyword in ["anyOf", "oneOf", "allOf", "not"] {
        if schema.get(keyword).is_some() {
            errors.push(format!(
                "{at}: the schema uses `{keyword}`, which this validator does not \
                 support outside x-kubernetes-int-or-string (extend tests/profiles.rs)"
            ));
            return;
        }
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => is_integer(value),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => {
                errors.push(format!("{at}: unsupported schema type {other:?}"));
                return;
            }
        };
        if !ok {
            errors.push(format!("{at}: expected {ty}, found {}", describe(value)));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let allowed: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(format!("{at}: {} is not one of the allowed values [{}]", describe(value), allowed.join(", ")));
    }
    let limit = |key: &str| schema.get(key).and_then(Value::as_f64);
    match value {
        Value::String(s) => {
            let len = s.chars().count() as f64;
            if let Some(min) = limit("minLength").filter(|&m| len < m) {
                errors.push(format!("{at}: {s:?} is shorter than minLength {min}"));
            }
            if let Some(max) = limit("maxLength").filter(|&m| len > m) {
                errors.push(format!("{at}: {s:?} is longer than maxLength {max}"));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = limit("minimum").filter(|&m| n < m) {
                errors.push(format!("{at}: {n} is less than minimum {min}"));
            }
            if let Some(max) = limit("maximum").filter(|&m| n > m) {
                errors.push(format!("{at}: {n} is greater than maximum {max}"));
            }
        }
        Value::Array(items) => {
            let len = items.len() as f64;
            if let Some(min) = limit("minItems").filter(|&m| len < m) {
                errors.push(format!("{at}: {len} item(s), fewer than minItems {min}"));
            }
            if let Some(max) = limit("maxItems").filter(|&m| len > m) {
                errors.push(format!("{at}: {len} item(s), more than maxItems {max}"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_schema(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => check_object(schema, map, path, errors),
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_object(schema: &Value, map: &serde_json::Map<String, Value>, path: &str, errors: &mut Vec<String>) {
    let properties = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(field) {
                errors.push(format!("{}: missing required field", child_path(path, field)));
            }
        }
    }
    for (key, value) in map {
        let child = child_path(path, key);
        if let Some(field_schema) = properties.and_then(|p| p.get(key)) {
            check_schema(field_schema, value, &child, errors);
            continue;
        }
        match schema.get("additionalProperties") {
            Some(Value::Bool(true)) => {}
            Some(extra @ Value::Object(_)) => check_schema(extra, value, &child, errors),
            Some(Value::Bool(false)) => errors.push(format!("{child}: unknown field (additionalProperties: false)")),
            _ if flag(schema, "x-kubernetes-preserve-unknown-fields") => {}
            _ => errors.push(format!("{child}: unknown field{}", known_fields_hint(key, properties))),
        }
    }
}

/// "; did you mean `mountPoint`?" or the list of fields allowed here.
fn known_fields_hint(key: &str, properties: Option<&serde_json::Map<String, Value>>) -> String {
    let Some(properties) = properties.filter(|p| !p.is_empty()) else {
        return " (this object allows no fields)".to_string();
    };
    let squash = |s: &str| s.to_ascii_lowercase().replace(['-', '_'], "");
    if let Some(close) = properties.keys().find(|k| squash(k) == squash(key)) {
        return format!("; did you mean `{close}`?");
    }
    let names: Vec<&str> = properties.keys().map(String::as_str).collect();
    format!("; allowed here: {}", names.join(", "))
}

/// The part of ObjectMeta that manifests write. The API server validates a
/// root `metadata` itself; a CRD's schema only says `type: object`.
fn object_meta_schema(require_name: bool) -> Value {
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let mut schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "generateName": {"type": "string"},
            "namespace": {"type": "string", "minLength": 1},
            "labels": string_map,
            "annotations": string_map,
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "ownerReferences": {
                "type": "array",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        }
    });
    if require_name {
        schema["required"] = json!(["name"]);
    }
    schema
}

/// Validates a whole custom resource against its CRD's schema, with the root
/// `metadata` checked as ObjectMeta.
fn validate_custom_resource(schema: &Value, doc: &Value) -> Vec<String> {
    let mut schema = schema.clone();
    schema["properties"]["metadata"] = object_meta_schema(true);
    let mut errors = Vec::new();
    check_schema(&schema, doc, "", &mut errors);
    errors
}

// ---------------------------------------------------------------------------
// Name syntax
// ---------------------------------------------------------------------------

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Name syntax and label values of a `metadata` (root or pod template).
fn check_metadata_syntax(doc: &Doc, meta: &Value, path: &str, problems: &mut Vec<String>) {
    if let Some(name) = meta.get("name").and_then(Value::as_str) {
        let ok = match doc.kind() {
            // Service names must be DNS-1035 labels; Fluid names the Services
            // and DaemonSets it creates after the Dataset/ThinRuntime.
            "Service" | "Dataset" | "ThinRuntime" => is_dns1035_label(name),
            _ => is_dns1123_subdomain(name),
        };
        if !ok {
            problems.push(format!("{doc}: {path}.name {name:?} is not a valid name for a {}", doc.kind()));
        }
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (key, value) in labels {
            if let Some(v) = value.as_str().filter(|v| !is_label_value(v)) {
                problems.push(format!(
                    "{doc}: {}: {v:?} is not a valid label value",
                    child_path(&format!("{path}.labels"), key)
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Pod templates of core workloads
// ---------------------------------------------------------------------------

/// A pod as a workload describes it.
struct PodTemplate<'a> {
    /// Where the pod spec is, for messages: `spec` or `spec.template.spec`.
    path: &'static str,
    metadata: Option<&'a Value>,
    spec: &'a Value,
}

impl PodTemplate<'_> {
    fn label(&self, key: &str) -> Option<&Value> {
        self.metadata?.get("labels")?.get(key)
    }
    /// `persistentVolumeClaim.claimName` of every volume.
    fn claim_names(&self) -> Vec<&str> {
        self.spec
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.pointer("/persistentVolumeClaim/claimName"))
            .filter_map(Value::as_str)
            .collect()
    }
}

fn pod_template(doc: &Doc) -> Option<PodTemplate<'_>> {
    match doc.kind() {
        "Pod" => Some(PodTemplate { path: "spec", metadata: doc.value.get("metadata"), spec: doc.value.get("spec")? }),
        "Job" | "Deployment" => Some(PodTemplate {
            path: "spec.template.spec",
            metadata: doc.value.pointer("/spec/template/metadata"),
            spec: doc.value.pointer("/spec/template/spec")?,
        }),
        _ => None,
    }
}

fn check_pod_spec(doc: &Doc, pod: &PodTemplate<'_>, problems: &mut Vec<String>) {
    let path = pod.path;
    if let Some(meta) = pod.metadata.filter(|_| path != "spec") {
        let meta_path = "spec.template.metadata";
        let mut errors = Vec::new();
        check_schema(&object_meta_schema(false), meta, meta_path, &mut errors);
        problems.extend(errors.into_iter().map(|e| format!("{doc}: {e}")));
        check_metadata_syntax(doc, meta, meta_path, problems);
    }
    let volumes: BTreeSet<&str> = pod
        .spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    match pod.spec.get("containers").and_then(Value::as_array) {
        Some(c) if !c.is_empty() => {}
        _ => problems.push(format!("{doc}: {path}.containers must be a non-empty list")),
    }
    let mut names = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        let containers = pod.spec.get(list).and_then(Value::as_array);
        for (i, container) in containers.into_iter().flatten().enumerate() {
            let at = format!("{path}.{list}[{i}]");
            match container.get("name").and_then(Value::as_str) {
                Some(name) if is_dns1123_label(name) => {
                    if !names.insert(name) {
                        problems.push(format!("{doc}: {at}.name {name:?} is used twice"));
                    }
                }
                Some(name) => problems.push(format!("{doc}: {at}.name {name:?} is not a DNS-1123 label")),
                None => problems.push(format!("{doc}: {at}.name: missing (containers need a name)")),
            }
            match container.get("image").and_then(Value::as_str) {
                Some(image) if !image.trim().is_empty() => {}
                _ => problems.push(format!("{doc}: {at}.image: missing (containers need an image)")),
            }
            let mounts = container.get("volumeMounts").and_then(Value::as_array);
            for (j, mount) in mounts.into_iter().flatten().enumerate() {
                let name = mount.get("name").and_then(Value::as_str).unwrap_or("");
                if !volumes.contains(name) {
                    problems
                        .push(format!("{doc}: {at}.volumeMounts[{j}].name {name:?} names no volume in {path}.volumes"));
                }
                if mount.get("mountPath").and_then(Value::as_str).is_none() {
                    problems.push(format!("{doc}: {at}.volumeMounts[{j}].mountPath: missing"));
                }
            }
        }
    }
}

/// Minimal checks of a core-kind document; no schema is available offline.
fn check_core_doc(doc: &Doc, problems: &mut Vec<String>) {
    let v = &doc.value;
    match doc.kind() {
        "Pod" | "Job" | "Deployment" => match pod_template(doc) {
            Some(pod) => {
                check_pod_spec(doc, &pod, problems);
                if doc.kind() == "Job" {
                    let policy = pod.spec.get("restartPolicy").and_then(Value::as_str);
                    if !matches!(policy, Some("Never" | "OnFailure")) {
                        problems.push(format!(
                            "{doc}: spec.template.spec.restartPolicy must be Never or OnFailure for a Job"
                        ));
                    }
                }
                if doc.kind() == "Deployment" {
                    match v.pointer("/spec/selector/matchLabels").and_then(Value::as_object) {
                        Some(selector) if !selector.is_empty() => {
                            for (key, want) in selector {
                                if pod.label(key) != Some(want) {
                                    problems.push(format!(
                                        "{doc}: spec.selector.matchLabels[{key:?}] does not match the template's labels"
                                    ));
                                }
                            }
                        }
                        _ => problems
                            .push(format!("{doc}: spec.selector.matchLabels: missing (apps/v1 needs a selector)")),
                    }
                }
            }
            None => problems.push(format!("{doc}: no pod spec (spec / spec.template.spec)")),
        },
        "Service" => match v.pointer("/spec/ports").and_then(Value::as_array) {
            Some(ports) if !ports.is_empty() => {
                for (i, port) in ports.iter().enumerate() {
                    if !port.get("port").is_some_and(is_integer) {
                        problems.push(format!("{doc}: spec.ports[{i}].port must be an integer"));
                    }
                }
            }
            _ => problems.push(format!("{doc}: spec.ports must be a non-empty list")),
        },
        "Secret" => {
            let mut keys = 0;
            for field in ["data", "stringData"] {
                match v.get(field) {
                    None => {}
                    Some(Value::Object(map)) => {
                        for (key, value) in map {
                            keys += 1;
                            if !value.is_string() {
                                problems.push(format!(
                                    "{doc}: {}: values must be strings, found {}",
                                    child_path(field, key),
                                    describe(value)
                                ));
                            }
                        }
                    }
                    Some(other) => {
                        problems.push(format!("{doc}: {field}: expected an object, found {}", describe(other)))
                    }
                }
            }
            if keys == 0 {
                problems.push(format!("{doc}: neither data nor stringData holds a key"));
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Tests of profiles/
// ---------------------------------------------------------------------------

/// Parts 1 and 2: every document parses; every Fluid document validates
/// against its CRD; every document is of a kind this file knows.
#[test]
fn profiles_parse_and_validate_against_fluid_crds() {
    let docs = profiles();
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    for doc in docs {
        let (api_version, kind) = (doc.api_version(), doc.kind());
        if api_version.is_empty() || kind.is_empty() {
            problems.push(format!("{doc}: apiVersion and kind are required"));
            continue;
        }
        if doc.name().is_empty() {
            problems.push(format!("{doc}: metadata.name is required"));
        }
        let key = (kind.to_string(), doc.namespace().to_string(), doc.name().to_string());
        if let Some(first) = seen.insert(key, doc.origin.clone()) {
            problems.push(format!("{doc}: the same object is also defined in {first}"));
        }
        if api_version.split('/').next() == Some(FLUID_GROUP) {
            match crd_schema(api_version, kind) {
                Some(schema) => problems
                    .extend(validate_custom_resource(schema, &doc.value).into_iter().map(|e| format!("{doc}: {e}"))),
                None => problems.push(format!("{doc}: no CRD in tests/data/fluid-crds serves {kind} in {api_version}")),
            }
            if let Some(meta) = doc.value.get("metadata") {
                check_metadata_syntax(doc, meta, "metadata", &mut problems);
            }
            // The Dataset CRD's only CEL rule (x-kubernetes-validations).
            if kind == "Dataset" {
                let mounts = doc.value.pointer("/spec/mounts").and_then(Value::as_array);
                let allow_empty = doc.value.pointer("/spec/allowEmptyMounts") == Some(&Value::Bool(true));
                if mounts.is_none_or(Vec::is_empty) && !allow_empty {
                    problems.push(format!(
                        "{doc}: spec.mounts: Mounts must have at least one item unless AllowEmptyMounts is true"
                    ));
                }
            }
        } else if !CORE_KINDS.iter().any(|&(k, _)| k == kind) {
            problems.push(format!(
                "{doc}: kind {kind} has no check in tests/profiles.rs (known: {:?} and Fluid's CRDs)",
                CORE_KINDS.iter().map(|&(k, _)| k).collect::<Vec<_>>()
            ));
        }
    }
    for kind in ["Dataset", "ThinRuntime", "ThinRuntimeProfile"] {
        if of_kind(docs, kind).next().is_none() {
            problems.push(format!("profiles/ holds no {kind}"));
        }
    }
    finish("profiles/ against Fluid's CRDs", problems);
}

/// Part 3: core kinds, PVC names, the sidecar label.
#[test]
fn core_manifests_are_well_formed() {
    let docs = profiles();
    let mut problems = Vec::new();
    let datasets: BTreeSet<(&str, &str)> = of_kind(docs, "Dataset").map(|d| (d.namespace(), d.name())).collect();
    let mut sidecars = 0;
    for doc in docs {
        let Some(&(_, api_version)) = CORE_KINDS.iter().find(|&&(k, _)| k == doc.kind()) else {
            continue;
        };
        if doc.api_version() != api_version {
            problems.push(format!("{doc}: apiVersion must be {api_version:?}, found {:?}", doc.api_version()));
        }
        let mut errors = Vec::new();
        check_schema(
            &object_meta_schema(true),
            doc.value.get("metadata").unwrap_or(&Value::Null),
            "metadata",
            &mut errors,
        );
        problems.extend(errors.into_iter().map(|e| format!("{doc}: {e}")));
        if let Some(meta) = doc.value.get("metadata") {
            check_metadata_syntax(doc, meta, "metadata", &mut problems);
        }
        check_core_doc(doc, &mut problems);

        let Some(pod) = pod_template(doc) else {
            continue;
        };
        // Fluid creates the PVC with the Dataset's name, in its namespace.
        for claim in pod.claim_names() {
            if !datasets.contains(&(doc.namespace(), claim)) {
                problems.push(format!(
                    "{doc}: claimName {claim:?} is not the name of a Dataset in namespace {:?} in profiles/",
                    doc.namespace()
                ));
            }
        }
        let inject = pod.label(INJECT_LABEL);
        let sidecar = doc.name().contains("sidecar") || doc.origin.contains("sidecar");
        if sidecar {
            sidecars += 1;
            if inject != Some(&json!("true")) {
                problems.push(format!(
                    "{doc}: a sidecar workload needs the pod label {INJECT_LABEL}: \"true\" (a string), found {inject:?}"
                ));
            }
            if pod.claim_names().is_empty() {
                problems.push(format!("{doc}: a sidecar workload must use a Dataset's PVC"));
            }
        } else if inject.is_some() && pod.claim_names().is_empty() {
            problems.push(format!("{doc}: has {INJECT_LABEL} but uses no Dataset PVC"));
        }
    }
    if sidecars == 0 {
        problems.push("profiles/ holds no sidecar-mode example (a Pod/Job named *sidecar*)".to_string());
    }
    finish("core manifests in profiles/", problems);
}

/// Part 4: the ThinRuntimeProfile runs `bucketfs fluid` and matches the fsname.
#[test]
fn thinruntimeprofile_runs_bucketfs_fluid() {
    let docs = profiles();
    let mut problems = Vec::new();
    let profiles: Vec<&Doc> = of_kind(docs, "ThinRuntimeProfile").collect();
    assert!(!profiles.is_empty(), "profiles/ holds no ThinRuntimeProfile");
    for doc in profiles {
        let fs_type = doc.str_at("/spec/fileSystemType");
        if fs_type != bucketfs::mount::FSNAME {
            problems.push(format!(
                "{doc}: spec.fileSystemType is {fs_type:?}; Fluid looks for it in the mountinfo line, \
                 so it must be the FUSE fsname {:?} (src/mount.rs FSNAME)",
                bucketfs::mount::FSNAME
            ));
        }
        let argv: Vec<&str> = ["/spec/fuse/command", "/spec/fuse/args"]
            .iter()
            .filter_map(|p| doc.value.pointer(p).and_then(Value::as_array))
            .flatten()
            .map(|a| a.as_str().unwrap_or(""))
            .collect();
        let program = argv.first().map(|p| p.rsplit('/').next().unwrap_or(p));
        if program != Some("bucketfs") || argv.get(1) != Some(&"fluid") {
            problems.push(format!("{doc}: spec.fuse.command (+ args) must run `bucketfs fluid`, found {argv:?}"));
        }
        match doc.value.pointer("/spec/fuse/lifecycle/preStop") {
            Some(Value::Object(hook)) => {
                let command = hook.get("exec").and_then(|e| e.get("command")).and_then(Value::as_array);
                let has_handler = command.is_some_and(|c| !c.is_empty())
                    || ["httpGet", "tcpSocket", "sleep"].iter().any(|h| hook.contains_key(*h));
                if !has_handler {
                    problems.push(format!("{doc}: spec.fuse.lifecycle.preStop has no handler (exec.command)"));
                }
            }
            _ => problems.push(format!(
                "{doc}: spec.fuse.lifecycle.preStop is missing (sidecar mode stops the FUSE container with it)"
            )),
        }
        if doc.value.pointer("/spec/fuse/image").and_then(Value::as_str).is_none_or(str::is_empty) {
            problems.push(format!("{doc}: spec.fuse.image is missing"));
        }
        // docs/fluid.md: a profile's options replace Fluid's MOUNT_OPTIONS
        // (and "ro") and never reach config.json.
        if doc.value.pointer("/spec/fuse/options").is_some() {
            problems
                .push(format!("{doc}: spec.fuse.options must not be set in the profile; put them in the ThinRuntime"));
        }
    }
    finish("ThinRuntimeProfile", problems);
}

/// Part 5: Datasets, ThinRuntimes, profiles and Secrets refer to each other.
#[test]
fn fluid_objects_reference_each_other() {
    let docs = profiles();
    let mut problems = Vec::new();
    let profile_names: BTreeSet<&str> = of_kind(docs, "ThinRuntimeProfile").map(Doc::name).collect();
    let runtimes: BTreeSet<(&str, &str)> = of_kind(docs, "ThinRuntime").map(|d| (d.namespace(), d.name())).collect();
    let datasets: BTreeSet<(&str, &str)> = of_kind(docs, "Dataset").map(|d| (d.namespace(), d.name())).collect();
    for doc in of_kind(docs, "ThinRuntime") {
        let profile = doc.str_at("/spec/profileName");
        if !profile_names.contains(profile) {
            problems.push(format!(
                "{doc}: spec.profileName {profile:?} names no ThinRuntimeProfile in profiles/ (have {profile_names:?})"
            ));
        }
        if !datasets.contains(&(doc.namespace(), doc.name())) {
            problems.push(format!("{doc}: no Dataset of the same name and namespace serves it"));
        }
    }
    let secrets: BTreeMap<(&str, &str), &Doc> =
        docs.iter().filter(|d| d.is("v1", "Secret")).map(|d| ((d.namespace(), d.name()), d)).collect();
    for doc in of_kind(docs, "Dataset") {
        if !runtimes.contains(&(doc.namespace(), doc.name())) {
            problems.push(format!(
                "{doc}: no ThinRuntime named {:?} in namespace {:?} (Fluid binds a Dataset to the runtime of the same name)",
                doc.name(),
                doc.namespace()
            ));
        }
        // Every secretKeyRef names a Secret (and key) in profiles/.
        let shared = doc.value.pointer("/spec/sharedEncryptOptions").and_then(Value::as_array);
        let mounts = doc.value.pointer("/spec/mounts").and_then(Value::as_array);
        let per_mount =
            mounts.into_iter().flatten().filter_map(|m| m.get("encryptOptions").and_then(Value::as_array)).flatten();
        for option in shared.into_iter().flatten().chain(per_mount) {
            let Some(secret_ref) = option.pointer("/valueFrom/secretKeyRef") else {
                continue;
            };
            let name = secret_ref.get("name").and_then(Value::as_str).unwrap_or("");
            let key = secret_ref.get("key").and_then(Value::as_str).unwrap_or("");
            match secrets.get(&(doc.namespace(), name)) {
                None => problems.push(format!("{doc}: secretKeyRef {name:?} names no Secret in profiles/")),
                Some(secret) => {
                    let has_key =
                        ["/data/", "/stringData/"].iter().any(|p| secret.value.pointer(&format!("{p}{key}")).is_some());
                    if !has_key {
                        problems.push(format!("{doc}: secretKeyRef key {key:?} is not in {secret}"));
                    }
                }
            }
        }
    }
    finish("references between Fluid objects", problems);
}

// ---------------------------------------------------------------------------
// Part 6: docker/Dockerfile
// ---------------------------------------------------------------------------

/// Tools Fluid runs inside the FUSE container (docs/fluid.md), and the Debian
/// packages that provide each. On bookworm `umount` ships in `mount`.
const FLUID_TOOLS: &[(&str, &[&str])] = &[
    ("bash", &["bash"]),
    ("cat", &["coreutils"]),
    ("grep", &["grep"]),
    ("expr", &["coreutils"]),
    ("date", &["coreutils"]),
    ("sleep", &["coreutils"]),
    ("test", &["coreutils"]),
    ("umount", &["mount", "util-linux"]),
    ("df", &["coreutils"]),
    ("ls", &["coreutils"]),
    ("wc", &["coreutils"]),
];

struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

/// Instructions with continuation lines joined; comments and blank lines
/// (also inside continuations) dropped, as Docker does.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (body, continues) = match line.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (line, false),
        };
        let (_, full) = pending.get_or_insert_with(|| (i + 1, String::new()));
        if !full.is_empty() {
            full.push(' ');
        }
        full.push_str(body);
        if !continues && let Some((line, full)) = pending.take() {
            let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
            instructions.push(Instruction {
                line,
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_string(),
            });
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    // ARGs before the first FROM may be used in FROM lines: their defaults
    // are what a build without --build-arg uses.
    let mut global_args: Vec<(String, String)> = Vec::new();
    for ins in instructions {
        if ins.keyword == "ARG" && stages.is_empty() {
            let (name, default) = ins.args.split_once('=').unwrap_or((&ins.args, ""));
            global_args.push((name.trim().to_string(), default.trim().trim_matches('"').to_string()));
        } else if ins.keyword == "FROM" {
            let mut args = ins.args.clone();
            for (name, default) in &global_args {
                args = args.replace(&format!("${{{name}}}"), default).replace(&format!("${name}"), default);
            }
            let words: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let name = match words.as_slice() {
                [_, r#as, name, ..] if r#as.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage { image: words.first().unwrap_or(&"").to_string(), name, instructions: Vec::new() });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(ins);
        }
    }
    stages
}

/// Words of each simple command of a shell line (split at `&&`, `||`, `;`, `|`).
fn shell_commands(script: &str) -> Vec<Vec<String>> {
    script
        .replace("&&", "\n")
        .replace("||", "\n")
        .replace([';', '|'], "\n")
        .lines()
        .map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Packages named by `apt-get install` in a RUN line.
fn apt_installed(script: &str) -> BTreeSet<String> {
    let mut packages = BTreeSet::new();
    for words in shell_commands(script) {
        let Some(apt) = words.iter().position(|w| w == "apt-get" || w == "apt") else {
            continue;
        };
        let Some(install) = words[apt..].iter().position(|w| w == "install") else {
            continue;
        };
        for word in &words[apt + install + 1..] {
            if !word.starts_with('-') {
                let name = word.split('=').next().unwrap_or(word);
                packages.insert(name.to_string());
            }
        }
    }
    packages
}

/// `1.95` → [1, 95]; `None` unless all parts are numbers.
fn version_parts(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse().ok()).collect()
}

const DEBIAN_CODENAMES: &[&str] = &["buster", "bullseye", "bookworm", "trixie", "forky"];

fn debian_codename(tag: &str) -> Option<&str> {
    tag.split('-').find(|p| DEBIAN_CODENAMES.contains(p))
}

#[test]
fn dockerfile_builds_bucketfs_image_with_fluid_tools() {
    let path = root().join("docker/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("read docker/Dockerfile");
    let stages = parse_dockerfile(&text);
    let mut problems = Vec::new();
    let Some((last, builders)) = stages.split_last() else {
        panic!("docker/Dockerfile has no FROM");
    };
    // A stage FROM an earlier stage inherits its image and instructions.
    let flatten = |stage: &Stage| -> Stage {
        let mut chain = vec![stage];
        while let Some(parent) = stages.iter().find(|s| s.name.as_deref() == Some(chain.last().unwrap().image.as_str()))
        {
            if chain.len() > stages.len() {
                break;
            }
            chain.push(parent);
        }
        let root = chain.last().unwrap();
        Stage {
            image: root.image.clone(),
            name: stage.name.clone(),
            instructions: chain
                .iter()
                .rev()
                .flat_map(|s| &s.instructions)
                .map(|i| Instruction { line: i.line, keyword: i.keyword.clone(), args: i.args.clone() })
                .collect(),
        }
    };
    // The default target (the last stage) is the users' two-stage build.
    let runtime = &flatten(last);

    // Multi-stage: a rust: build stage, a debian: runtime stage.
    let build = builders.iter().enumerate().find(|(_, s)| s.image.starts_with("rust:"));
    if build.is_none() {
        problems.push("no build stage FROM rust:<version>-<debian codename> (the RUST_IMAGE default)".to_string());
    }
    if !runtime.image.starts_with("debian:") {
        problems.push(format!("the final (runtime) stage must be based on debian:, found {:?}", runtime.image));
    }
    // A runtime-prebuilt stage takes a binary built outside (the build
    // context holds only `bucketfs`): the same base and tools, the binary
    // copied from the context to the same place.
    match stages.iter().find(|s| s.name.as_deref() == Some("runtime-prebuilt")).map(flatten) {
        None => problems.push("no `runtime-prebuilt` stage for a binary built outside the image".to_string()),
        Some(prebuilt) => {
            if prebuilt.image != runtime.image {
                problems.push(format!(
                    "runtime-prebuilt is based on {:?}, the default runtime on {:?}",
                    prebuilt.image, runtime.image
                ));
            }
            let shared = |i: &Instruction| i.keyword != "COPY" && i.keyword != "RUN" || i.args.contains("apt-get");
            let base_of = |s: &Stage| s.instructions.iter().filter(|i| shared(i)).map(|i| i.line).collect::<Vec<_>>();
            if base_of(&prebuilt) != base_of(runtime) {
                problems.push("runtime-prebuilt and the default runtime do not share their base stage".to_string());
            }
            let from_context = prebuilt.instructions.iter().any(|i| {
                i.keyword == "COPY"
                    && !i.args.contains("--from")
                    && i.args.split_whitespace().next() == Some("bucketfs")
                    && i.args.split_whitespace().last() == Some("/usr/local/bin/bucketfs")
            });
            if !from_context {
                problems.push(
                    "runtime-prebuilt does not COPY bucketfs from the context to /usr/local/bin/bucketfs".to_string(),
                );
            }
        }
    }
    if let Some((index, build)) = build {
        let tag = build.image.trim_start_matches("rust:");
        // The image's rustc must be new enough for Cargo.toml's rust-version.
        let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("read Cargo.toml");
        let wanted = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("rust-version"))
            .map(|l| l.trim_start_matches([' ', '=']).trim().trim_matches('"'))
            .and_then(version_parts);
        let have = version_parts(tag.split('-').next().unwrap_or(""));
        match (have, wanted) {
            (Some(have), Some(wanted)) if have >= wanted => {}
            (have, wanted) => problems.push(format!(
                "FROM {}: pin a rust image at least as new as Cargo.toml's rust-version ({wanted:?}, image {have:?})",
                build.image
            )),
        }
        // A binary built against a newer glibc does not run on an older one.
        let runtime_codename = debian_codename(runtime.image.trim_start_matches("debian:"));
        if debian_codename(tag).is_none() || debian_codename(tag) != runtime_codename {
            problems.push(format!(
                "FROM {} and FROM {}: the build image must name the runtime's Debian release",
                build.image, runtime.image
            ));
        }
        // The runtime stage copies the binary out of the build stage.
        let from_build = |a: &str| {
            a.split_whitespace().any(|w| {
                w.strip_prefix("--from=").is_some_and(|f| Some(f) == build.name.as_deref() || f == index.to_string())
            })
        };
        let copies = runtime
            .instructions
            .iter()
            .any(|i| i.keyword == "COPY" && from_build(&i.args) && i.args.contains("bucketfs"));
        if !copies {
            problems.push("the runtime stage does not COPY --from the rust stage the bucketfs binary".to_string());
        }
    }

    // ENTRYPOINT ["…/bucketfs", "fluid"], in exec form.
    match runtime.instructions.iter().rfind(|i| i.keyword == "ENTRYPOINT") {
        None => problems.push("the runtime stage has no ENTRYPOINT".to_string()),
        Some(entry) => match serde_json::from_str::<Vec<String>>(&entry.args) {
            Ok(argv) => {
                let program = argv.first().map(|p| p.rsplit('/').next().unwrap_or(p));
                if program != Some("bucketfs") || argv[1..] != ["fluid".to_string()] {
                    problems.push(format!("line {}: ENTRYPOINT must be `bucketfs fluid`, found {argv:?}", entry.line));
                }
                let copied_there = runtime.instructions.iter().any(|i| {
                    i.keyword == "COPY" && i.args.split_whitespace().last() == argv.first().map(String::as_str)
                });
                if !copied_there {
                    problems.push(format!("ENTRYPOINT runs {:?}, but no COPY puts the binary there", argv.first()));
                }
            }
            Err(_) => problems
                .push(format!("line {}: ENTRYPOINT must use the exec (JSON) form, found {}", entry.line, entry.args)),
        },
    }

    // The runtime stage installs a package for every tool Fluid runs.
    let runs: Vec<&Instruction> = runtime.instructions.iter().filter(|i| i.keyword == "RUN").collect();
    let installed: BTreeSet<String> = runs.iter().flat_map(|i| apt_installed(&i.args)).collect();
    if installed.is_empty() {
        problems.push("the runtime stage has no `apt-get install` line".to_string());
    }
    for &(tool, packages) in FLUID_TOOLS.iter().chain([("fusermount3", &["fuse3"][..])].iter()) {
        if !packages.iter().any(|p| installed.contains(*p)) {
            problems.push(format!(
                "`{tool}` is needed in the FUSE container, but apt-get install names none of {packages:?} (installs {installed:?})"
            ));
        }
    }
    // And the build fails if one of them is missing (docs/fluid.md).
    let checked = runs.iter().any(|i| {
        i.args.contains("command -v")
            && FLUID_TOOLS.iter().all(|(tool, _)| i.args.split_whitespace().any(|w| w.trim_end_matches(';') == *tool))
    });
    if !checked {
        problems.push("no RUN in the runtime stage checks `command -v` for every Fluid tool".to_string());
    }
    finish("docker/Dockerfile", problems);
}

// ---------------------------------------------------------------------------
// Part 7: the validator catches errors
// ---------------------------------------------------------------------------

const GOOD_DATASET: &str = r#"
# a comment, as in profiles/
apiVersion: data.fluid.io/v1alpha1
kind: Dataset
metadata:
  name: demo
  labels:
    team: storage
spec:
  accessModes: ["ReadWriteMany"]
  mounts:
  - mountPoint: s3://bucket/prefix
    name: demo
    readOnly: true
    options:
      region: us-east-1
"#;

fn dataset_errors(yaml: &str) -> Vec<String> {
    let docs = parse_yaml_documents(yaml).expect("test YAML parses");
    assert_eq!(docs.len(), 1, "one document");
    let schema = crd_schema(FLUID_API_VERSION, "Dataset").expect("Dataset schema");
    validate_custom_resource(schema, &docs[0])
}

/// Replaces `from` (which must occur) in GOOD_DATASET.
fn broken_dataset(from: &str, to: &str) -> String {
    assert!(GOOD_DATASET.contains(from), "{from:?} not in GOOD_DATASET");
    GOOD_DATASET.replacen(from, to, 1)
}

#[track_caller]
fn assert_single_error(errors: &[String], expected: &str) {
    assert!(
        errors.len() == 1 && errors[0].starts_with(expected),
        "expected one error starting with {expected:?}, got {errors:#?}"
    );
}

#[test]
fn validator_accepts_a_good_dataset() {
    assert_eq!(dataset_errors(GOOD_DATASET), Vec::<String>::new());
}

#[test]
fn validator_rejects_unknown_fields() {
    let errors = dataset_errors(&broken_dataset("    readOnly: true", "    readonly: true"));
    assert_single_error(&errors, "spec.mounts[0].readonly: unknown field; did you mean `readOnly`?");

    let errors = dataset_errors(&broken_dataset("spec:\n", "spec:\n  bucket: x\n"));
    assert_single_error(&errors, "spec.bucket: unknown field; allowed here: accessModes,");

    let errors = dataset_errors(&broken_dataset("kind: Dataset\n", "kind: Dataset\nextra: 1\n"));
    assert_single_error(&errors, "extra: unknown field");

    // Root metadata is checked as ObjectMeta, not as a bare object.
    let errors = dataset_errors(&broken_dataset("  name: demo\n  labels", "  name: demo\n  nmespace: x\n  labels"));
    assert_single_error(&errors, "metadata.nmespace: unknown field; allowed here:");
}

#[test]
fn validator_rejects_missing_required_fields() {
    let errors = dataset_errors(&broken_dataset("  - mountPoint: s3://bucket/prefix\n    name", "  - name"));
    assert_single_error(&errors, "spec.mounts[0].mountPoint: missing required field");

    let errors = dataset_errors(&broken_dataset("  name: demo\n  labels", "  labels"));
    assert_single_error(&errors, "metadata.name: missing required field");
}

#[test]
fn validator_rejects_wrong_types() {
    let errors = dataset_errors(&broken_dataset("readOnly: true", "readOnly: \"yes\""));
    assert_single_error(&errors, "spec.mounts[0].readOnly: expected boolean, found string \"yes\"");

    let errors = dataset_errors(&broken_dataset("region: us-east-1", "region: 1"));
    assert_single_error(&errors, "spec.mounts[0].options.region: expected string, found integer 1");

    let errors = dataset_errors(&broken_dataset("[\"ReadWriteMany\"]", "ReadWriteMany"));
    assert_single_error(&errors, "spec.accessModes: expected array, found string");

    let errors = dataset_errors(&broken_dataset("team: storage", "team: true"));
    assert_single_error(&errors, "metadata.labels.team: expected string, found boolean true");

    let errors = dataset_errors(&broken_dataset("    options:\n      region: us-east-1\n", "    options:\n"));
    assert_single_error(&errors, "spec.mounts[0].options: null");
}

#[test]
fn validator_checks_enum_and_min_length() {
    let errors = dataset_errors(&broken_dataset("spec:\n", "spec:\n  placement: Sometimes\n"));
    assert_single_error(&errors, "spec.placement: string \"Sometimes\" is not one of the allowed values");

    let errors = dataset_errors(&broken_dataset("s3://bucket/prefix", "s3:/"));
    assert_single_error(&errors, "spec.mounts[0].mountPoint: \"s3:/\" is shorter than minLength 5");
}

#[test]
fn validator_handles_int_or_string_preserve_and_additional_properties() {
    let schema = json!({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                     "properties": {"n": {"type": "integer", "minimum": 1}}},
            "closed": {"type": "object", "additionalProperties": false},
            "open": {"type": "object", "additionalProperties": true},
            "list": {"type": "array", "items": {"type": "number"}}
        }
    });
    let check = |value: Value| {
        let mut errors = Vec::new();
        check_schema(&schema, &value, "", &mut errors);
        errors
    };
    let good = json!({"port": 80, "free": {"n": 1, "x": [1]}, "closed": {}, "open": {"a": 1}, "list": [1, 2.5]});
    assert_eq!(check(good), Vec::<String>::new());
    assert_eq!(check(json!({"port": "http"})), Vec::<String>::new());
    assert_single_error(&check(json!({"port": true})), "port: expected an integer or a string, found boolean true");
    assert_single_error(&check(json!({"free": {"n": 0}})), "free.n: 0 is less than minimum 1");
    assert_single_error(&check(json!({"closed": {"a": 1}})), "closed.a: unknown field (additionalProperties: false)");
    assert_single_error(&check(json!({"list": [1, "2"]})), "list[1]: expected number, found string \"2\"");
    assert_single_error(&check(json!({"open": {"serverless.fluid.io/inject": 1}, "x": 1})), "x: unknown field");
}

#[test]
fn yaml_streams_keep_document_numbers_and_reject_duplicate_keys() {
    // A comment before the first `---` is no document; `---` `---` is an empty one.
    let docs = parse_yaml_documents("# only a comment\n---\na: 1\n---\n---\nb: [x]\n").unwrap();
    assert_eq!(docs, vec![json!({"a": 1}), Value::Null, json!({"b": ["x"]})]);
    let err = parse_yaml_documents("a: 1\na: 2\n").unwrap_err();
    assert!(err.contains("duplicate"), "{err}");
}

#[test]
fn dockerfile_parser_joins_continuations_and_reads_apt_lines() {
    let stages = parse_dockerfile(
        "# c\nFROM rust:1.95-bookworm AS build\nRUN true\nFROM debian:bookworm-slim\n\
         RUN apt-get update \\\n # inner comment\n && apt-get install -y --no-install-recommends \\\n   bash coreutils=9.1 \\\n && rm -rf x\n",
    );
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("build"));
    assert_eq!(stages[1].image, "debian:bookworm-slim");
    let run = &stages[1].instructions[0];
    assert_eq!((run.keyword.as_str(), run.line), ("RUN", 5));
    let installed: Vec<String> = apt_installed(&run.args).into_iter().collect();
    assert_eq!(installed, ["bash", "coreutils"]);

    let stages = parse_dockerfile(
        "ARG RUST_IMAGE=rust:1.95-bookworm\nARG BASE_IMAGE=\"debian:bookworm-slim\"\n\
         FROM ${RUST_IMAGE} AS build\nFROM $BASE_IMAGE AS base\nFROM base AS runtime\n",
    );
    let images: Vec<&str> = stages.iter().map(|s| s.image.as_str()).collect();
    assert_eq!(images, ["rust:1.95-bookworm", "debian:bookworm-slim", "base"]);
}
