//! Reading Kubernetes objects from a directory of manifests (the agent's offline/static mode
//! and the tests' fixtures).
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read, in sorted
//! order (hidden files and subdirectories are skipped, so editor lock files and the `..data`
//! machinery of a mounted ConfigMap stay out). A file may hold several YAML documents separated
//! by `---`, and a document may be a `kind: List` (or `ServiceList`, ...) whose `items` are
//! objects. Services, EndpointSlices and Nodes are kept; other kinds are skipped with a debug
//! log. A bad file or document is reported as a [`ManifestError`] naming the file, document,
//! object and field, and never stops the other objects from loading.
//!
//! Like `kubectl apply`, a namespaced object without `metadata.namespace` lands in `default`.
//!
//! Services and EndpointSlices are held by [`Arc`]: a [`DirCache`] re-parses only the files
//! that changed and hands out the other files' objects again without copying them, and
//! `translate::Translator` recognises an object it has seen
//! by pointer before comparing contents.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// The namespace `kubectl apply` uses for an object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// File name extensions read as manifests (compared case-insensitively).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// A YAML stream cannot resynchronise after a syntax error; this also bounds the number of
/// documents read from one file should the parser keep reporting the same error.
const MAX_DOCUMENTS_PER_FILE: usize = 100_000;

/// The objects the agent uses, in file order. Services and EndpointSlices are shared (see
/// the module docs); the few Nodes are not.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Node>,
}

impl Objects {
    /// Appends `other`'s objects (the services and slices are shared, not copied).
    pub fn extend_from(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
    }
}

/// The directory itself could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read manifest directory {}: {source}", dir.display())]
pub struct LoadError {
    pub dir: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One file, document or object that could not be used. The others still load.
#[derive(Debug)]
pub struct ManifestError {
    /// The file, as the directory path joined with the file name.
    pub file: PathBuf,
    /// 1-based document number in a multi-document file; `None` for file-level problems.
    pub document: Option<usize>,
    /// 0-based index into the `items` of a `List` document.
    pub item: Option<usize>,
    /// `"Service default/hostnames"`, when the kind (and name) could be read.
    pub object: Option<String>,
    pub problem: ManifestProblem,
}

/// What was wrong, by type; see [`ManifestError`] for where.
#[derive(Debug, thiserror::Error)]
pub enum ManifestProblem {
    #[error("cannot read file: {0}")]
    Read(#[source] io::Error),
    /// The text is not valid YAML/JSON; the rest of the file is skipped, as a YAML stream cannot
    /// be resynchronised after a syntax error.
    #[error("syntax error (rest of file skipped): {0}")]
    Syntax(#[source] serde_yaml::Error),
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(&'static str),
    /// A field does not fit the object's schema. `field` is the path inside the object, e.g.
    /// `spec.ports[0].port`; empty when the problem is the object as a whole.
    #[error("{}{source}", field_prefix(.field))]
    Field {
        field: String,
        #[source]
        source: serde_yaml::Error,
    },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(doc) = self.document {
            write!(f, " doc {doc}")?;
        }
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ManifestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.problem)
    }
}

/// Loads every manifest in `dir`. Fails only when the directory cannot be listed; every bad
/// file, document or object is returned as a [`ManifestError`] next to the good objects.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<ManifestError>), LoadError> {
    let (files, errors) = load_dir_by_file(dir)?;
    let mut objects = Objects::default();
    for f in files {
        objects.services.extend(f.objects.services);
        objects.slices.extend(f.objects.slices);
        objects.nodes.extend(f.objects.nodes);
    }
    Ok((objects, errors))
}

/// The objects of one manifest file and when it was last modified.
#[derive(Clone, Debug)]
pub struct FileObjects {
    pub file: PathBuf,
    pub modified: Option<std::time::SystemTime>,
    pub objects: Objects,
}

/// [`load_dir`], file by file (`ebpf-proxy-lab lab-apiserver` dates each object's last change by
/// its file).
pub fn load_dir_by_file(dir: &Path) -> Result<(Vec<FileObjects>, Vec<ManifestError>), LoadError> {
    let files = manifest_files(dir).map_err(|source| LoadError {
        dir: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let meta = fs::metadata(&file).ok();
        out.push(load_file(file, meta.as_ref(), &mut errors));
    }
    Ok((out, errors))
}

/// Reads and parses one manifest file. `meta` is the file's metadata taken before reading it.
fn load_file(
    file: PathBuf,
    meta: Option<&fs::Metadata>,
    errors: &mut Vec<ManifestError>,
) -> FileObjects {
    let modified = meta.and_then(|m| m.modified().ok());
    let mut objects = Objects::default();
    match fs::read_to_string(&file) {
        Ok(text) => load_text(&file, &text, &mut objects, errors),
        Err(e) => errors.push(ManifestError {
            file: file.clone(),
            document: None,
            item: None,
            object: None,
            problem: ManifestProblem::Read(e),
        }),
    }
    FileObjects {
        file,
        modified,
        objects,
    }
}

/// What identifies one version of a file without reading it: length, modification and change
/// times and inode (the same facts as [`fingerprint`]). A file whose metadata cannot be read
/// has none and is always read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileStamp {
    len: u64,
    mtime: Option<i128>,
    #[cfg(unix)]
    inode: (u64, u64, i64, i64),
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            mtime: meta
                .modified()
                .ok()
                .map(|t| match t.duration_since(UNIX_EPOCH) {
                    Ok(d) => d.as_nanos() as i128,
                    Err(e) => -(e.duration().as_nanos() as i128),
                }),
            #[cfg(unix)]
            inode: {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
            },
        }
    }
}

/// One file as last parsed by a [`DirCache`].
#[derive(Debug)]
struct CachedFile {
    stamp: FileStamp,
    objects: Objects,
    /// Its problems, as [`ManifestError`] messages.
    errors: Vec<String>,
}

/// How a [`DirCache::load`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Files read and parsed (new or changed since the last load).
    pub parsed: usize,
    /// Files whose objects were reused (same length, times and inode as last time).
    pub reused: usize,
}

/// [`load_dir`] for a directory that is read again and again (the agent's manifests source):
/// a file is parsed again only when its [`fingerprint`] facts (length, times, inode) changed;
/// the others' objects are handed out again, shared. Errors are given as messages, since
/// those of an unchanged file are repeated from the parse that found them.
#[derive(Debug, Default)]
pub struct DirCache {
    files: HashMap<PathBuf, CachedFile>,
}

impl DirCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The directory's objects and problems, as [`load_dir`] would give them.
    pub fn load(&mut self, dir: &Path) -> Result<(Objects, Vec<String>, CacheStats), LoadError> {
        let files = manifest_files(dir).map_err(|source| LoadError {
            dir: dir.to_owned(),
            source,
        })?;
        let mut stats = CacheStats::default();
        let mut next = HashMap::with_capacity(files.len());
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for file in files {
            // Taken before the read: a write racing with it changes the stamp, so the file is
            // read again at the next load.
            let meta = fs::metadata(&file).ok();
            let stamp = meta.as_ref().map(FileStamp::of);
            let old = self.files.remove(&file);
            let (objects_of, errors_of) = match (old, stamp) {
                (Some(c), Some(stamp)) if c.stamp == stamp => {
                    stats.reused += 1;
                    (c.objects, c.errors)
                }
                _ => {
                    stats.parsed += 1;
                    let mut errs = Vec::new();
                    let f = load_file(file.clone(), meta.as_ref(), &mut errs);
                    (f.objects, errs.iter().map(ToString::to_string).collect())
                }
            };
            objects.extend_from(&objects_of);
            errors.extend(errors_of.iter().cloned());
            // Without metadata there is nothing to recognise the file by: read it every time.
            if let Some(stamp) = stamp {
                next.insert(
                    file,
                    CachedFile {
                        stamp,
                        objects: objects_of,
                        errors: errors_of,
                    },
                );
            }
        }
        // Files that are gone are dropped with the old map.
        self.files = next;
        Ok((objects, errors, stats))
    }
}

/// A cheap change detector for polling: a hash of the name, length, modification time (and on
/// Unix inode and change time) of every manifest file. Any edit, rename, addition or removal
/// changes it (up to the file system's timestamp resolution). A file whose metadata cannot be
/// read contributes its error kind, so it does not hide the others.
pub fn fingerprint(dir: &Path) -> io::Result<u64> {
    let mut h = DefaultHasher::new();
    let files = manifest_files(dir)?;
    files.len().hash(&mut h);
    for file in files {
        file.file_name().hash(&mut h);
        match fs::metadata(&file) {
            Ok(meta) => FileStamp::of(&meta).hash(&mut h),
            Err(e) => format!("{:?}", e.kind()).hash(&mut h),
        }
    }
    Ok(h.finish())
}

/// The manifest files in `dir`, sorted by name. Symlinks are followed when deciding whether an
/// entry is a file; an entry whose target cannot be read is listed so the reader reports it.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !has_manifest_extension(name) {
            continue;
        }
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => continue,
            _ => files.push(path),
        }
    }
    files.sort();
    Ok(files)
}

fn has_manifest_extension(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty() && EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e))
    })
}

/// Parses the documents of one file. JSON is read by the YAML parser too: YAML is a superset
/// of JSON for the documents Kubernetes uses, and one parser gives one set of error messages.
fn load_text(file: &Path, text: &str, objects: &mut Objects, errors: &mut Vec<ManifestError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        if document > MAX_DOCUMENTS_PER_FILE {
            break;
        }
        let at = Location {
            file,
            document,
            item: None,
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(at.error(None, ManifestProblem::Syntax(e)));
                break;
            }
        };
        load_value(at, value, objects, errors);
    }
}

#[derive(Clone, Copy)]
struct Location<'a> {
    file: &'a Path,
    document: usize,
    item: Option<usize>,
}

impl Location<'_> {
    fn error(self, object: Option<String>, problem: ManifestProblem) -> ManifestError {
        ManifestError {
            file: self.file.to_owned(),
            document: Some(self.document),
            item: self.item,
            object,
            problem,
        }
    }
}

fn load_value(
    at: Location<'_>,
    mut value: Value,
    objects: &mut Objects,
    errors: &mut Vec<ManifestError>,
) {
    if value.is_null() {
        return; // an empty document, e.g. after a trailing `---`
    }
    if !value.is_mapping() {
        errors.push(at.error(
            None,
            ManifestProblem::NotAnObject("the document is not a mapping"),
        ));
        return;
    }
    let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        errors.push(at.error(
            None,
            ManifestProblem::NotAnObject("`kind` is missing or not a string"),
        ));
        return;
    };
    // A `List` (kubectl's generic list) or `<Kind>List` (what `kubectl get -o yaml` of one
    // kind gives) carries the objects in `items`.
    if at.item.is_none() && kind.ends_with("List") {
        match value.get_mut("items").map(std::mem::take) {
            Some(Value::Sequence(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    load_value(
                        Location {
                            item: Some(i),
                            ..at
                        },
                        item,
                        objects,
                        errors,
                    );
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => errors.push(at.error(
                Some(kind),
                ManifestProblem::NotAnObject("`items` of a list is not a sequence"),
            )),
        }
        return;
    }
    match kind.as_str() {
        "Service" => {
            default_namespace(&mut value);
            if let Some(o) = typed(at, &kind, value, errors) {
                objects.services.push(Arc::new(o));
            }
        }
        "EndpointSlice" => {
            default_namespace(&mut value);
            if let Some(o) = typed(at, &kind, value, errors) {
                objects.slices.push(Arc::new(o));
            }
        }
        "Node" => {
            if let Some(o) = typed(at, &kind, value, errors) {
                objects.nodes.push(o);
            }
        }
        _ => log::debug!(
            "{} doc {}{}: ignoring {} {}",
            at.file.display(),
            at.document,
            at.item.map(|i| format!(" items[{i}]")).unwrap_or_default(),
            kind,
            object_name(&value),
        ),
    }
}

/// Deserializes one object, naming the failing field through `serde_path_to_error`.
fn typed<T: DeserializeOwned>(
    at: Location<'_>,
    kind: &str,
    value: Value,
    errors: &mut Vec<ManifestError>,
) -> Option<T> {
    let object = format!("{kind} {}", object_name(&value));
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(obj) => Some(obj),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            errors.push(at.error(
                Some(object),
                ManifestProblem::Field {
                    field,
                    source: e.into_inner(),
                },
            ));
            None
        }
    }
}

/// Sets `metadata.namespace` to `default` when it is absent or empty, as `kubectl apply` does.
/// Leaves malformed metadata alone so deserialization reports it.
fn default_namespace(value: &mut Value) {
    let Some(meta) = value.get_mut("metadata").and_then(Value::as_mapping_mut) else {
        return;
    };
    let missing = match meta.get("namespace") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if missing {
        meta.insert("namespace".into(), DEFAULT_NAMESPACE.into());
    }
}

/// `namespace/name`, `name`, or `<unnamed>`, read leniently from an untyped object.
fn object_name(value: &Value) -> String {
    let meta = value.get("metadata");
    let get = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match (get("namespace"), get("name")) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.to_owned(),
        (Some(ns), None) => format!("{ns}/<unnamed>"),
        (None, None) => "<unnamed>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: hostnames
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hostnames-abc
  labels:
    kubernetes.io/service-name: hostnames
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
ports:
- name: http
  port: 8080
";

    const NODE_JSON: &str =
        r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            fs::write(dir.path().join(name), text).expect("write fixture");
        }
        dir
    }

    /// What a load produced, reduced to comparable strings.
    #[derive(Debug, PartialEq)]
    struct Summary {
        services: Vec<String>,
        slices: Vec<String>,
        nodes: Vec<String>,
        /// Error messages with the temporary directory replaced by `DIR`.
        errors: Vec<String>,
    }

    fn summarize(dir: &Path, objects: &Objects, errors: &[ManifestError]) -> Summary {
        fn id(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
            match &m.namespace {
                Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or("")),
                None => m.name.clone().unwrap_or_default(),
            }
        }
        let prefix = dir.display().to_string();
        Summary {
            services: objects.services.iter().map(|o| id(&o.metadata)).collect(),
            slices: objects.slices.iter().map(|o| id(&o.metadata)).collect(),
            nodes: objects.nodes.iter().map(|o| id(&o.metadata)).collect(),
            errors: errors
                .iter()
                .map(|e| e.to_string().replace(&prefix, "DIR"))
                .collect(),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn load_dir_table() {
        struct Case {
            name: &'static str,
            input: Vec<(&'static str, String)>,
            expected: Summary,
        }
        let cases = vec![
            Case {
                name: "one object per file, all three kinds, json too",
                input: vec![
                    ("a-svc.yaml", SVC.into()),
                    ("b-slice.yml", SLICE.into()),
                    ("c-node.json", NODE_JSON.into()),
                ],
                expected: Summary {
                    services: strings(&["default/hostnames"]),
                    slices: strings(&["default/hostnames-abc"]),
                    nodes: strings(&["node-a"]),
                    errors: vec![],
                },
            },
            Case {
                name: "multi-document yaml with empty documents and an ignored kind",
                input: vec![(
                    "all.yaml",
                    format!(
                        "---\n{SVC}---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n{SLICE}---\n"
                    ),
                )],
                expected: Summary {
                    services: strings(&["default/hostnames"]),
                    slices: strings(&["default/hostnames-abc"]),
                    nodes: vec![],
                    errors: vec![],
                },
            },
            Case {
                name: "kind List and ServiceList with items",
                input: vec![
                    (
                        "list.yaml",
                        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: cm}}\n- {apiVersion: v1, kind: Service, metadata: {name: s1, namespace: kube-system}}\n".into(),
                    ),
                    (
                        "svclist.json",
                        r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s2"}}]}"#.into(),
                    ),
                    ("empty-list.yaml", "apiVersion: v1\nkind: List\nitems: []\n".into()),
                ],
                expected: Summary {
                    services: strings(&["kube-system/s1", "default/s2"]),
                    slices: vec![],
                    nodes: strings(&["n1"]),
                    errors: vec![],
                },
            },
            Case {
                name: "bad field names file, document, object and field; good documents still load",
                input: vec![(
                    "svc.yaml",
                    format!("{NODE_JSON}\n---\n{}", SVC.replace("port: 80", "port: x")),
                )],
                expected: Summary {
                    services: vec![],
                    slices: vec![],
                    nodes: strings(&["node-a"]),
                    errors: strings(&[
                        "DIR/svc.yaml doc 2 (Service default/hostnames): spec.ports[0].port: invalid type: string \"x\", expected i32",
                    ]),
                },
            },
            Case {
                name: "bad list item is reported with its index",
                input: vec![(
                    "list.yaml",
                    "kind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n- {apiVersion: v1, kind: Node, metadata: {name: n2, labels: [a]}}\n".into(),
                )],
                expected: Summary {
                    services: vec![],
                    slices: vec![],
                    nodes: strings(&["n1"]),
                    errors: strings(&[
                        "DIR/list.yaml doc 1 items[1] (Node n2): metadata.labels: invalid type: sequence, expected a map",
                    ]),
                },
            },
            Case {
                name: "wrong apiVersion, wrong field type, missing kind, scalar document",
                input: vec![(
                    "mixed.yaml",
                    format!(
                        "{}---\n{}---\nmetadata: {{name: x}}\n---\njust a string\n---\n{SVC}",
                        SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
                        SLICE.replace("addressType: IPv4", "addressType: [IPv4]"),
                    ),
                )],
                expected: Summary {
                    services: strings(&["default/hostnames"]),
                    slices: vec![],
                    nodes: vec![],
                    errors: strings(&[
                        // k8s-openapi checks apiVersion itself, outside the path tracking: no field.
                        "DIR/mixed.yaml doc 1 (EndpointSlice default/hostnames-abc): invalid value: string \"discovery.k8s.io/v1beta1\", expected discovery.k8s.io/v1",
                        "DIR/mixed.yaml doc 2 (EndpointSlice default/hostnames-abc): addressType: invalid type: sequence, expected a string",
                        "DIR/mixed.yaml doc 3: not a Kubernetes object: `kind` is missing or not a string",
                        "DIR/mixed.yaml doc 4: not a Kubernetes object: the document is not a mapping",
                    ]),
                },
            },
            Case {
                name: "syntax error skips the rest of that file only",
                input: vec![
                    ("a.yaml", format!("{SVC}---\nkind: [unclosed\n---\n{NODE_JSON}\n")),
                    ("b.json", NODE_JSON.into()),
                ],
                expected: Summary {
                    services: strings(&["default/hostnames"]),
                    slices: vec![],
                    nodes: strings(&["node-a"]),
                    errors: strings(&[
                        "DIR/a.yaml doc 2: syntax error (rest of file skipped): did not find expected ',' or ']' at line 13 column 1, while parsing a flow sequence at line 12 column 7",
                    ]),
                },
            },
            Case {
                name: "other files, hidden files and empty files are skipped",
                input: vec![
                    ("README.md", "kind: Service".into()),
                    (".#svc.yaml", SVC.into()),
                    ("svc.yaml.bak", SVC.into()),
                    ("empty.yaml", String::new()),
                    ("comments.yaml", "# nothing here\n".into()),
                ],
                expected: Summary { services: vec![], slices: vec![], nodes: vec![], errors: vec![] },
            },
            Case {
                name: "files are read in sorted order",
                input: vec![
                    ("b.yaml", SVC.replace("hostnames", "second")),
                    ("a.yaml", SVC.replace("hostnames", "first")),
                    ("c.YAML", SVC.replace("hostnames", "third")),
                ],
                expected: Summary {
                    // Sorted by byte order: upper-case sorts first.
                    services: strings(&["default/first", "default/second", "default/third"]),
                    slices: vec![],
                    nodes: vec![],
                    errors: vec![],
                },
            },
        ];
        for c in cases {
            let files: Vec<(&str, &str)> = c.input.iter().map(|(n, t)| (*n, t.as_str())).collect();
            let dir = dir_with(&files);
            let (objects, errors) = load_dir(dir.path()).expect(c.name);
            assert_eq!(
                summarize(dir.path(), &objects, &errors),
                c.expected,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn loaded_objects_keep_their_fields() {
        let dir = dir_with(&[("svc.yaml", SVC), ("slice.yaml", SLICE)]);
        let (objects, errors) = load_dir(dir.path()).expect("load");
        assert!(errors.is_empty(), "{errors:?}");
        let spec = objects.services[0].spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let ports = spec.ports.as_ref().expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), 80)
        );
        let slice = &objects.slices[0];
        assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(slice.endpoints[0].addresses, vec!["10.0.0.1".to_string()]);
    }

    #[test]
    fn errors_expose_their_parts_by_type() {
        let dir = dir_with(&[("svc.yaml", &SVC.replace("port: 80", "port: x"))]);
        let (_, errors) = load_dir(dir.path()).expect("load");
        let [e] = errors.as_slice() else {
            panic!("expected one error, got {errors:?}")
        };
        assert_eq!(e.file, dir.path().join("svc.yaml"));
        assert_eq!(e.document, Some(1));
        assert_eq!(e.object.as_deref(), Some("Service default/hostnames"));
        assert!(
            matches!(&e.problem, ManifestProblem::Field { field, .. } if field == "spec.ports[0].port"),
            "{e:?}"
        );
        assert!(std::error::Error::source(e).is_some());
    }

    #[test]
    fn unreadable_directory_is_a_load_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let err = load_dir(&missing).expect_err("missing dir");
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string()
                .starts_with("cannot read manifest directory "),
            "{err}"
        );
        assert!(fingerprint(&missing).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_file_is_reported_and_others_load() {
        let dir = dir_with(&[("a.yaml", SVC)]);
        std::os::unix::fs::symlink(dir.path().join("missing"), dir.path().join("dangling.yaml"))
            .expect("symlink");
        let (objects, errors) = load_dir(dir.path()).expect("load");
        assert_eq!(objects.services.len(), 1);
        let [e] = errors.as_slice() else {
            panic!("expected one error, got {errors:?}")
        };
        assert!(
            matches!(&e.problem, ManifestProblem::Read(io) if io.kind() == io::ErrorKind::NotFound)
        );
        assert_eq!(e.document, None);
        assert!(fingerprint(dir.path()).is_ok());
    }

    #[test]
    fn fingerprint_changes_with_the_manifests_only() {
        let dir = dir_with(&[("a.yaml", SVC)]);
        let fp = || fingerprint(dir.path()).expect("fingerprint");
        let first = fp();
        assert_eq!(fp(), first, "stable while nothing changes");

        fs::write(dir.path().join("notes.txt"), "x").expect("write");
        assert_eq!(fp(), first, "non-manifest files do not count");

        fs::write(dir.path().join("a.yaml"), format!("{SVC}\n")).expect("write");
        let edited = fp();
        assert_ne!(edited, first, "edit");

        fs::write(dir.path().join("b.json"), NODE_JSON).expect("write");
        let added = fp();
        assert_ne!(added, edited, "addition");

        fs::rename(dir.path().join("b.json"), dir.path().join("c.json")).expect("rename");
        let renamed = fp();
        assert_ne!(renamed, added, "rename");

        fs::remove_file(dir.path().join("c.json")).expect("remove");
        assert_ne!(fp(), renamed, "removal");
    }

    /// A DirCache gives what load_dir gives after every kind of edit, parsing only the files
    /// that changed and sharing the others' objects.
    #[test]
    fn dir_cache_reparses_changed_files_only() {
        let dir = dir_with(&[
            ("a.yaml", SVC),
            ("b.yaml", SLICE),
            ("c.yaml", &SVC.replace("port: 80", "port: x")),
        ]);
        let mut cache = DirCache::new();
        let check = |cache: &mut DirCache, parsed: usize, what: &str| -> Objects {
            let (objects, errors, stats) = cache.load(dir.path()).expect(what);
            let (fresh, fresh_errors) = load_dir(dir.path()).expect(what);
            let errors_now: Vec<String> = fresh_errors.iter().map(ToString::to_string).collect();
            assert_eq!(
                summarize(dir.path(), &objects, &[]),
                summarize(dir.path(), &fresh, &[]),
                "{what}"
            );
            assert_eq!(errors, errors_now, "{what}");
            assert_eq!(stats.parsed, parsed, "{what}: files parsed");
            objects
        };
        let first = check(&mut cache, 3, "first load");
        let again = check(&mut cache, 0, "unchanged");
        assert!(
            Arc::ptr_eq(&first.services[0], &again.services[0]),
            "shared"
        );
        assert!(Arc::ptr_eq(&first.slices[0], &again.slices[0]), "shared");

        // An edit of the same length: the times and inode still tell.
        let edited = SLICE.replace("10.0.0.1", "10.0.0.2");
        fs::write(dir.path().join(".b.tmp"), &edited).expect("write");
        fs::rename(dir.path().join(".b.tmp"), dir.path().join("b.yaml")).expect("rename");
        let after = check(&mut cache, 1, "edited slice");
        assert_eq!(after.slices[0].endpoints[0].addresses, ["10.0.0.2"]);
        assert!(Arc::ptr_eq(&first.services[0], &after.services[0]));

        // Fixed in place (same inode).
        fs::write(dir.path().join("c.yaml"), SVC.replace("hostnames", "fixed")).expect("write");
        let fixed = check(&mut cache, 1, "fixed file");
        assert_eq!(fixed.services.len(), 2);

        fs::rename(dir.path().join("a.yaml"), dir.path().join("d.yaml")).expect("rename");
        check(&mut cache, 1, "renamed");
        fs::remove_file(dir.path().join("d.yaml")).expect("remove");
        let removed = check(&mut cache, 0, "removed");
        assert_eq!(removed.services.len(), 1);
    }
}
