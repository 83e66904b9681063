//! A loopback fake Kubernetes API server for Services, EndpointSlices and Nodes, speaking the
//! wire protocol kube-rs's client and kube-runtime's watcher use (HTTP/1.1, JSON):
//!
//! - discovery as the real server's legacy (unaggregated) form, enough for kubectl: `/version`,
//!   `/api` (`APIVersions`), `/apis` (`APIGroupList`), `/api/v1` and `/apis/discovery.k8s.io/v1`
//!   (`APIResourceList`s naming the three kinds, verbs get/list/watch);
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (and the namespaced collections `/api/v1/namespaces/NS/services`, ..., and single objects
//!   `.../NAME`): a `*List` with `metadata.resourceVersion`, `limit`/`continue` paging, `labelSelector`
//!   (`key`, `!key`, `key=value`, `key!=value`) and `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`);
//! - the same with `watch=true&resourceVersion=RV`: a chunked stream of newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` events after RV,
//!   bookmarks only with `allowWatchBookmarks=true`, ended after `timeoutSeconds`;
//! - 410 Gone for a resourceVersion older than the compaction horizon, either as the HTTP
//!   status of the watch request or (like the real watch cache) as an `ERROR` event carrying
//!   a `Status` with code 410; injected list failures (any status);
//! - faults: abrupt disconnects (TCP RST) of every open connection, slow streams (each event
//!   line split over several chunks with pauses), the whole server stopped and started again
//!   on the same port with its state intact.
//!
//! Resource versions are one global counter, like etcd's revision.
//!
//! The integration tests (`tests/kube_source.rs`) drive it directly; `ebpf-proxy-lab lab-apiserver`
//! ([`run_lab`]) serves a manifests directory through it, so the lab's agents can run in
//! Kubernetes mode.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

/// How a too-old resourceVersion on a watch request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneMode {
    /// HTTP 200 and a watch `ERROR` event with a 410 `Status` (what the watch cache does).
    WatchEvent,
    /// HTTP 410 with a `Status` body.
    HttpStatus,
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct KindState {
    /// `(namespace, name)` -> object.
    objects: BTreeMap<(String, String), Value>,
    log: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    horizon: u64,
}

struct State {
    rv: u64,
    kinds: HashMap<Kind, KindState>,
    gone_mode: GoneMode,
    /// Statuses the next list requests of a kind fail with, in order.
    fail_lists: HashMap<Kind, Vec<u16>>,
    /// Pause between the pieces of an event line; `None` writes each line in one chunk.
    slow: Option<Duration>,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change to the logs (wakes watch streams).
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch with a 410 `ERROR` event.
    expire: watch::Sender<u64>,
    /// Bumped to reset every open connection.
    kill: watch::Sender<u64>,
}

/// The fake API server. Dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl FakeApiServer {
    /// Serving on a free loopback port.
    pub async fn start() -> Self {
        let s = Self::stopped().await;
        s.resume().await;
        s
    }

    /// Not serving yet (connections are refused) on a port reserved for [`resume`](Self::resume).
    pub async fn stopped() -> Self {
        let probe = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = probe.local_addr().expect("local addr");
        drop(probe);
        Self::new(addr, 1)
    }

    /// Serving on `addr`, with resourceVersions starting after `first_rv`. Watches from an
    /// older resourceVersion get 410 Gone, as from an API server whose history was compacted:
    /// a restarted server given a larger `first_rv` makes its clients relist rather than miss
    /// events.
    pub async fn serve(addr: SocketAddr, first_rv: u64) -> io::Result<Self> {
        let mut s = Self::new(addr, first_rv);
        let listener = TcpListener::bind(addr).await?;
        s.addr = listener.local_addr()?;
        s.accept_on(listener);
        Ok(s)
    }

    fn new(addr: SocketAddr, first_rv: u64) -> Self {
        let mut kinds = HashMap::new();
        for k in Kind::ALL {
            kinds.insert(
                k,
                KindState {
                    horizon: first_rv,
                    ..Default::default()
                },
            );
        }
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: first_rv,
                    kinds,
                    gone_mode: GoneMode::WatchEvent,
                    fail_lists: HashMap::new(),
                    slow: None,
                    requests: Vec::new(),
                }),
                changed: watch::channel(0).0,
                expire: watch::channel(0).0,
                kill: watch::channel(0).0,
            }),
            addr,
            accept: Mutex::new(None),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming this server, as a YAML string.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url()
        )
    }

    /// Starts (again) listening on the same port, with the state it had.
    pub async fn resume(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.accept_on(listener);
    }

    fn accept_on(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_conn(shared.clone(), stream));
            }
        });
        *self.accept.lock().expect("lock") = Some(task);
    }

    /// Stops listening and resets every open connection: the API server process died.
    pub fn stop(&self) {
        if let Some(t) = self.accept.lock().expect("lock").take() {
            t.abort();
        }
        self.disconnect_all();
    }

    /// Resets (TCP RST) every open connection, in the middle of whatever it was sending.
    pub fn disconnect_all(&self) {
        self.shared.kill.send_modify(|v| *v += 1);
    }

    /// Ends every open watch with an `ERROR` event carrying a 410 `Status`.
    pub fn expire_watches(&self) {
        self.shared.expire.send_modify(|v| *v += 1);
    }

    /// Forgets the history: a watch from any resourceVersion before now gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        let rv = st.rv;
        for ks in st.kinds.values_mut() {
            ks.horizon = rv;
            ks.log.clear();
        }
    }

    pub fn set_gone_mode(&self, mode: GoneMode) {
        self.lock().gone_mode = mode;
    }

    /// The next `statuses.len()` list requests for `kind` fail with these HTTP statuses.
    pub fn fail_next_lists(&self, kind: Kind, statuses: &[u16]) {
        self.lock()
            .fail_lists
            .entry(kind)
            .or_default()
            .extend_from_slice(statuses);
    }

    /// Splits each event line into pieces sent `pause` apart (`None`: whole lines).
    pub fn set_slow(&self, pause: Option<Duration>) {
        self.lock().slow = pause;
    }

    /// Request lines seen so far (`GET /path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Creates or replaces an object (ADDED or MODIFIED). Typed objects go through serde.
    pub fn apply<T: serde::Serialize>(&self, kind: Kind, obj: &T) {
        self.apply_raw(kind, serde_json::to_value(obj).expect("serializable"));
    }

    /// Creates or replaces an object given as JSON, however malformed beyond its metadata.
    pub fn apply_raw(&self, kind: Kind, mut obj: Value) {
        let (ns, name) = key_of(kind, &obj);
        {
            let mut st = self.lock();
            st.rv += 1;
            let rv = st.rv;
            let meta = obj
                .as_object_mut()
                .expect("an object")
                .entry("metadata")
                .or_insert_with(|| json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("resourceVersion".into(), json!(rv.to_string()));
                if kind.namespaced() {
                    m.insert("namespace".into(), json!(ns));
                }
                m.entry("uid")
                    .or_insert_with(|| json!(format!("uid-{}-{ns}-{name}", kind.name())));
            }
            let ks = st.kinds.get_mut(&kind).expect("kind");
            let type_ = if ks.objects.contains_key(&(ns.clone(), name.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            ks.objects.insert((ns, name), obj.clone());
            ks.log.push(Event {
                rv,
                type_,
                object: with_type(kind, obj),
            });
        }
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Deletes an object (DELETED with its last state). No-op if absent.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        {
            let mut st = self.lock();
            st.rv += 1;
            let rv = st.rv;
            let ns = if kind.namespaced() { namespace } else { "" };
            let ks = st.kinds.get_mut(&kind).expect("kind");
            let Some(mut obj) = ks.objects.remove(&(ns.to_owned(), name.to_owned())) else {
                return;
            };
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            ks.log.push(Event {
                rv,
                type_: "DELETED",
                object: with_type(kind, obj),
            });
        }
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Sends a BOOKMARK at a fresh resourceVersion to every watch of `kind` that allows them.
    pub fn bookmark(&self, kind: Kind) {
        {
            let mut st = self.lock();
            st.rv += 1;
            let rv = st.rv;
            st.kinds.get_mut(&kind).expect("kind").log.push(Event {
                rv,
                type_: "BOOKMARK",
                object: json!({
                    "kind": kind.name(),
                    "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}
                }),
            });
        }
        self.shared.changed.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("fake API state lock")
    }
}

fn key_of(kind: Kind, obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    let ns = if kind.namespaced() {
        meta["namespace"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_owned()
    } else {
        String::new()
    };
    (ns, name)
}

fn with_type(kind: Kind, mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.insert("kind".into(), json!(kind.name()));
        m.insert("apiVersion".into(), json!(kind.api_version()));
    }
    obj
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn reason_of(code: u16) -> &'static str {
    match code {
        410 => "Expired",
        404 => "NotFound",
        403 => "Forbidden",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

// ---- HTTP ------------------------------------------------------------------------------------

struct Request {
    path: String,
    query: HashMap<String, String>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_request(head: &str) -> Option<Request> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    if method != "GET" {
        return None;
    }
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        path: path.to_owned(),
        query,
    })
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn respond_json(stream: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason_of(code),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.flush().await;
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await?;
    stream.flush().await
}

/// One connection: one request, then close (`Connection: close`), or a reset on `kill`.
async fn serve_conn(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut kill = shared.kill.subscribe();
    kill.borrow_and_update();
    let work = async {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let first = head.lines().next().unwrap_or_default().to_owned();
        shared
            .state
            .lock()
            .expect("lock")
            .requests
            .push(first.trim_end_matches(" HTTP/1.1").to_owned());
        let Some(req) = parse_request(&head) else {
            respond_json(
                &mut stream,
                405,
                &status(405, "MethodNotAllowed", "GET only"),
            )
            .await;
            return;
        };
        let watch = req
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1");
        match route(&req.path) {
            Route::Discovery(doc) => respond_json(&mut stream, 200, &doc).await,
            Route::Collection(kind, ns) => {
                // A namespaced collection is the cluster-wide one with a namespace selector.
                let mut req = req;
                if let Some(ns) = ns {
                    let sel = req.query.entry("fieldSelector".into()).or_default();
                    if !sel.is_empty() {
                        sel.push(',');
                    }
                    sel.push_str("metadata.namespace=");
                    sel.push_str(&ns);
                }
                if watch {
                    serve_watch(&shared, &mut stream, kind, &req).await;
                } else {
                    serve_list(&shared, &mut stream, kind, &req).await;
                }
            }
            Route::Object(kind, ns, name) => {
                let obj = shared.state.lock().expect("lock").kinds[&kind]
                    .objects
                    .get(&(ns, name.clone()))
                    .map(|o| with_type(kind, o.clone()));
                match obj {
                    Some(o) => respond_json(&mut stream, 200, &o).await,
                    None => {
                        let what = kind.path().rsplit('/').next().unwrap_or_default();
                        let msg = format!("{what} \"{name}\" not found");
                        respond_json(&mut stream, 404, &status(404, "NotFound", &msg)).await;
                    }
                }
            }
            Route::NotFound => {
                let msg = format!(
                    "the server could not find the requested resource {}",
                    req.path
                );
                respond_json(&mut stream, 404, &status(404, "NotFound", &msg)).await;
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = kill.changed() => {
            // An abrupt end: RST, not an orderly close.
            // Linger 0 does not block: the close sends RST and discards unsent data.
            #[expect(deprecated, reason = "SO_LINGER 0 is the point: an abrupt reset")]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    }
}

// ---- routes and discovery -------------------------------------------------------------------

/// What a request path names.
#[derive(Debug, PartialEq)]
enum Route {
    /// A discovery document (`/version`, `/api`, `/apis`, `/api/v1`,
    /// `/apis/discovery.k8s.io/v1`), as the real server's legacy (unaggregated) discovery.
    Discovery(Value),
    /// A collection: cluster-wide, or in one namespace.
    Collection(Kind, Option<String>),
    /// One object: (kind, namespace (`""` for Nodes), name).
    Object(Kind, String, String),
    NotFound,
}

/// Routes `path` (no query) the way the API server does for the three kinds served. Pure.
fn route(path: &str) -> Route {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => return Route::Discovery(version_doc()),
        "/api" => {
            return Route::Discovery(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": []}));
        }
        "/apis" => return Route::Discovery(api_group_list()),
        "/api/v1" => return Route::Discovery(resource_list("v1")),
        "/apis/discovery.k8s.io/v1" => {
            return Route::Discovery(resource_list("discovery.k8s.io/v1"));
        }
        _ => {}
    }
    for kind in Kind::ALL {
        // `/api/v1` + `services`, `/apis/discovery.k8s.io/v1` + `endpointslices`, ...
        let (prefix, plural) = kind.path().rsplit_once('/').unwrap_or_default();
        let Some(rest) = path.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let named = match (kind.namespaced(), parts.as_slice()) {
            (_, [p]) if *p == plural => return Route::Collection(kind, None),
            (false, [p, name]) if *p == plural => (String::new(), *name),
            (true, ["namespaces", ns, p]) if *p == plural => {
                return Route::Collection(kind, Some((*ns).to_owned()));
            }
            (true, ["namespaces", ns, p, name]) if *p == plural => ((*ns).to_owned(), *name),
            _ => continue,
        };
        return Route::Object(kind, named.0, named.1.to_owned());
    }
    Route::NotFound
}

/// `/version`.
fn version_doc() -> Value {
    json!({
        "major": "1", "minor": "34", "gitVersion": "v1.34.0-lab", "gitCommit": "",
        "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "",
        "compiler": "gc", "platform": "linux/amd64"
    })
}

/// `/apis`: the groups other than the core group (here: discovery.k8s.io).
fn api_group_list() -> Value {
    let gv = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroupList", "apiVersion": "v1",
        "groups": [{"name": "discovery.k8s.io", "versions": [gv], "preferredVersion": gv}]
    })
}

/// The `APIResourceList` of `group_version`: the kinds served there, read-only verbs.
fn resource_list(group_version: &str) -> Value {
    let resources: Vec<Value> = Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == group_version)
        .map(|k| {
            let plural = k.path().rsplit('/').next().unwrap_or_default();
            let short: &[&str] = match k {
                Kind::Service => &["svc"],
                Kind::Node => &["no"],
                Kind::EndpointSlice => &[],
            };
            json!({
                "name": plural, "singularName": k.name().to_lowercase(),
                "namespaced": k.namespaced(), "kind": k.name(),
                "verbs": ["get", "list", "watch"], "shortNames": short
            })
        })
        .collect();
    let mut doc = json!({"kind": "APIResourceList", "groupVersion": group_version,
        "resources": resources});
    // The core group's list has no apiVersion; the named groups' have "v1".
    if group_version != "v1" {
        doc["apiVersion"] = json!("v1");
    }
    doc
}

// ---- selectors ---------------------------------------------------------------------------

fn matches_labels(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = obj["metadata"]["labels"].as_object();
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(|v| v.as_str());
    sel.split(',').all(|term| {
        let term = term.trim();
        if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim_end_matches('=')) == Some(v)
        } else {
            get(term).is_some()
        }
    })
}

fn matches_fields(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        match k {
            "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        }
    })
}

fn selected(obj: &Value, req: &Request) -> bool {
    matches_labels(obj, req.query.get("labelSelector"))
        && matches_fields(obj, req.query.get("fieldSelector"))
}

// ---- list ---------------------------------------------------------------------------------

async fn serve_list(shared: &Shared, stream: &mut TcpStream, kind: Kind, req: &Request) {
    let (code, body) = {
        let mut st = shared.state.lock().expect("lock");
        let injected = st.fail_lists.get_mut(&kind).and_then(|q| {
            if q.is_empty() {
                None
            } else {
                Some(q.remove(0))
            }
        });
        if let Some(code) = injected {
            let msg = if code == 410 {
                "The provided continue parameter is too old; please restart the list".to_owned()
            } else {
                format!("injected failure {code}")
            };
            (code, status(code, reason_of(code), &msg))
        } else {
            let limit: usize = req
                .query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            // Continue token: "<rv>/<namespace>/<name>" of the last item sent.
            let cont = req.query.get("continue").filter(|c| !c.is_empty());
            let (list_rv, after) = match cont {
                Some(c) => {
                    let mut p = c.splitn(3, '/');
                    let rv = p.next().and_then(|r| r.parse().ok()).unwrap_or(st.rv);
                    let ns = p.next().unwrap_or_default().to_owned();
                    let name = p.next().unwrap_or_default().to_owned();
                    (rv, Some((ns, name)))
                }
                None => (st.rv, None),
            };
            let ks = &st.kinds[&kind];
            let mut items = Vec::new();
            let mut next = None;
            // From just after the continue token's item: no page walks the pages before it.
            let from = match &after {
                Some(a) => std::ops::Bound::Excluded(a.clone()),
                None => std::ops::Bound::Unbounded,
            };
            for (key, obj) in ks.objects.range((from, std::ops::Bound::Unbounded)) {
                if !selected(obj, req) {
                    continue;
                }
                if items.len() == limit {
                    next = Some(format!("{list_rv}/{}/{}", key.0, key.1));
                    // The token names the last item *sent*.
                    break;
                }
                items.push((key.clone(), obj.clone()));
            }
            let cont = next.map(|_| {
                let (ns, name) = &items.last().expect("a full page").0;
                format!("{list_rv}/{ns}/{name}")
            });
            let mut meta = json!({"resourceVersion": list_rv.to_string()});
            if let Some(c) = cont {
                meta["continue"] = json!(c);
            }
            let items: Vec<Value> = items.into_iter().map(|(_, o)| o).collect();
            (
                200,
                json!({
                    "kind": format!("{}List", kind.name()),
                    "apiVersion": kind.api_version(),
                    "metadata": meta,
                    "items": items,
                }),
            )
        }
    };
    respond_json(stream, code, &body).await;
}

// ---- watch --------------------------------------------------------------------------------

fn event_line(type_: &str, object: &Value) -> Vec<u8> {
    let mut line = json!({"type": type_, "object": object})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

async fn write_event(stream: &mut TcpStream, line: &[u8], slow: Option<Duration>) -> bool {
    match slow {
        None => write_chunk(stream, line).await.is_ok(),
        Some(pause) => {
            // Three pieces per line: the client must reassemble lines across chunks.
            let third = line.len().div_ceil(3).max(1);
            for piece in line.chunks(third) {
                if write_chunk(stream, piece).await.is_err() {
                    return false;
                }
                tokio::time::sleep(pause).await;
            }
            true
        }
    }
}

async fn serve_watch(shared: &Shared, stream: &mut TcpStream, kind: Kind, req: &Request) {
    let mut changed = shared.changed.subscribe();
    let mut expire = shared.expire.subscribe();
    expire.borrow_and_update();
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        req.query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let rv_param = req
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();

    // Where to start, or 410.
    let (mut cursor, initial, gone) = {
        let st = shared.state.lock().expect("lock");
        let ks = &st.kinds[&kind];
        match rv_param.parse::<u64>() {
            Ok(rv) if rv != 0 => {
                if rv < ks.horizon {
                    (rv, Vec::new(), Some((st.gone_mode, rv, ks.horizon)))
                } else {
                    (rv, Vec::new(), None)
                }
            }
            // "" or "0": the current objects as ADDED, then changes.
            _ => (
                st.rv,
                ks.objects
                    .values()
                    .filter(|o| selected(o, req))
                    .map(|o| with_type(kind, o.clone()))
                    .collect(),
                None,
            ),
        }
    };
    if let Some((mode, rv, horizon)) = gone {
        let msg = format!("too old resource version: {rv} ({horizon})");
        match mode {
            GoneMode::HttpStatus => {
                respond_json(stream, 410, &status(410, "Expired", &msg)).await;
            }
            GoneMode::WatchEvent => {
                if start_stream(stream).await {
                    let line = event_line("ERROR", &status(410, "Expired", &msg));
                    let _ = write_chunk(stream, &line).await;
                    let _ = write_chunk(stream, b"").await;
                }
            }
        }
        return;
    }
    if !start_stream(stream).await {
        return;
    }
    let slow = shared.state.lock().expect("lock").slow;
    for obj in &initial {
        if !write_event(stream, &event_line("ADDED", obj), slow).await {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        changed.borrow_and_update();
        let (events, last, slow) = {
            let st = shared.state.lock().expect("lock");
            let log = &st.kinds[&kind].log;
            let events: Vec<Event> = log
                .iter()
                .filter(|e| e.rv > cursor)
                .filter(|e| {
                    if e.type_ == "BOOKMARK" {
                        bookmarks
                    } else {
                        selected(&e.object, req)
                    }
                })
                .cloned()
                .collect();
            // Events that are filtered out still move the cursor.
            let last = log.last().map_or(cursor, |e| e.rv.max(cursor));
            (events, last, st.slow)
        };
        for e in &events {
            if !write_event(stream, &event_line(e.type_, &e.object), slow).await {
                return;
            }
        }
        cursor = last;
        tokio::select! {
            r = changed.changed() => { if r.is_err() { return; } }
            _ = expire.changed() => {
                let msg = format!("too old resource version: {cursor}");
                let line = event_line("ERROR", &status(410, "Expired", &msg));
                let _ = write_chunk(stream, &line).await;
                let _ = write_chunk(stream, b"").await;
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                // The server-side timeout: an orderly end of the stream.
                let _ = write_chunk(stream, b"").await;
                return;
            }
        }
    }
}

async fn start_stream(stream: &mut TcpStream) -> bool {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.is_ok() && stream.flush().await.is_ok()
}

// ---- lab-apiserver ------------------------------------------------------------------------

/// The annotation the EndpointSlice controller stamps with the time of the change that made it
/// rewrite a slice (a pod or Service change); kube-proxy measures network programming latency
/// from it.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Options of `ebpf-proxy-lab lab-apiserver`.
#[derive(clap::Args, Debug, Clone)]
pub struct LabApiArgs {
    /// The manifests directory to serve (the format `run --manifests` reads). Changes to it
    /// become ADDED/MODIFIED/DELETED watch events.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// Address to listen on, e.g. 10.240.0.1:6443 (port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Write a kubeconfig naming this server here (atomically, once listening).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig_out: Option<PathBuf>,
    /// How often the directory is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub poll_interval_ms: u64,
    /// How often every watch that allows them gets a BOOKMARK.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub bookmark_interval_ms: u64,
}

/// What a manifests directory holds, as the API serves it: (kind, namespace, name) -> object.
pub type Served = BTreeMap<(Kind, String, String), Value>;

/// The objects of a manifests directory as API objects (namespace `""` for Nodes).
pub fn served_objects(objects: &proxy_userspace::source::manifests::Objects) -> Served {
    let mut out = Served::new();
    let mut put = |kind: Kind, v: serde_json::Result<Value>| {
        if let Ok(v) = v {
            let (ns, name) = key_of(kind, &v);
            out.insert((kind, ns, name), v);
        }
    };
    for s in &objects.services {
        put(Kind::Service, serde_json::to_value(&**s));
    }
    for s in &objects.slices {
        put(Kind::EndpointSlice, serde_json::to_value(&**s));
    }
    for n in &objects.nodes {
        put(Kind::Node, serde_json::to_value(n));
    }
    out
}

/// One change to make on the server.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Apply(Kind, Value),
    Delete(Kind, String, String),
}

/// The changes that turn what the server serves (`old`, as read from the directory last
/// time) into `new`: new and changed objects are applied, missing ones deleted. Unchanged
/// objects produce nothing, so an unchanged directory produces no watch event. A changed
/// EndpointSlice without its own trigger-time annotation gets one (what the EndpointSlice
/// controller writes): `changed_at` of it, the modification time of its file. A restarted
/// server so stamps an unchanged slice as the previous run did, and its clients see no change.
pub fn changes(old: &Served, new: &Served, changed_at: impl Fn(&Value) -> String) -> Vec<Change> {
    let mut out = Vec::new();
    for (k, v) in new {
        if old.get(k) == Some(v) {
            continue;
        }
        let now = changed_at(v);
        let mut v = v.clone();
        if k.0 == Kind::EndpointSlice
            && v["metadata"]["annotations"][LAST_CHANGE_TRIGGER_TIME].is_null()
        {
            let meta = v
                .as_object_mut()
                .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
            if let Some(m) = meta.and_then(|m| m.as_object_mut()) {
                let ann = m.entry("annotations").or_insert_with(|| json!({}));
                if let Some(a) = ann.as_object_mut() {
                    a.insert(LAST_CHANGE_TRIGGER_TIME.into(), json!(now));
                }
            }
        }
        out.push(Change::Apply(k.0, v));
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(Change::Delete(k.0, k.1.clone(), k.2.clone()));
        }
    }
    out
}

impl FakeApiServer {
    /// Makes `changes` (each one watch event).
    pub fn make(&self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Apply(kind, v) => self.apply_raw(kind, v),
                Change::Delete(kind, ns, name) => self.delete(kind, &ns, &name),
            }
        }
    }
}

/// A resourceVersion larger than any an earlier run of this server handed out: microseconds
/// since the epoch (a run makes far fewer than a million changes a second). Clients of a
/// restarted server then get 410 Gone for their old resourceVersion and relist.
fn first_resource_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// `ebpf-proxy-lab lab-apiserver`: serves a manifests directory over the list/watch protocol
/// until SIGINT/SIGTERM. An unreadable directory or file is logged and the last good state
/// kept (like an API server whose objects nobody changes).
pub async fn run_lab(args: LabApiArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};

    let server = FakeApiServer::serve(args.listen, first_resource_version())
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let mut served = Served::new();
    let mut last_fp = None;
    sync_dir(&server, &args.manifests, &mut served, &mut last_fp);
    if let Some(path) = &args.kubeconfig_out {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, server.kubeconfig())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing the kubeconfig {}", path.display()))?;
    }
    log::info!(
        "lab-apiserver serving {} at {} ({} objects)",
        args.manifests.display(),
        server.url(),
        served.len()
    );
    let mut poll = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(10)));
    let mut bookmarks =
        tokio::time::interval(Duration::from_millis(args.bookmark_interval_ms.max(100)));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = poll.tick() => sync_dir(&server, &args.manifests, &mut served, &mut last_fp),
            _ = bookmarks.tick() => {
                for k in Kind::ALL {
                    server.bookmark(k);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
}

/// Re-reads the directory if its fingerprint changed and turns the difference into events.
fn sync_dir(
    server: &FakeApiServer,
    dir: &std::path::Path,
    served: &mut Served,
    last_fp: &mut Option<u64>,
) {
    let fp = match proxy_userspace::source::manifests::fingerprint(dir) {
        Ok(fp) => fp,
        Err(e) => {
            log::warn!("reading {}: {e}; serving the last state", dir.display());
            return;
        }
    };
    if *last_fp == Some(fp) {
        return;
    }
    let (files, errors) = match proxy_userspace::source::manifests::load_dir_by_file(dir) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("{e}; serving the last state");
            return;
        }
    };
    for e in &errors {
        log::warn!("{e}");
    }
    *last_fp = Some(fp);
    let mut new = Served::new();
    // (kind, namespace, name) -> when its file was written.
    let mut written = BTreeMap::new();
    for f in &files {
        let at = f.modified.unwrap_or_else(std::time::SystemTime::now);
        for (k, v) in served_objects(&f.objects) {
            written.insert(k.clone(), at);
            new.insert(k, v);
        }
    }
    let c = changes(served, &new, |v| {
        let (ns, name) = key_of(Kind::EndpointSlice, v);
        let at = written
            .get(&(Kind::EndpointSlice, ns, name))
            .copied()
            .unwrap_or_else(std::time::SystemTime::now);
        k8s_openapi::chrono::DateTime::<k8s_openapi::chrono::Utc>::from(at)
            .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true)
    });
    if !c.is_empty() {
        log::info!("{}: {} changes", dir.display(), c.len());
        server.make(c);
    }
    *served = new;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, ip: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default",
               "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": [{"addresses": [ip]}]})
    }

    fn served(objs: &[(Kind, Value)]) -> Served {
        objs.iter()
            .map(|(k, v)| {
                let (ns, name) = key_of(*k, v);
                ((*k, ns, name), v.clone())
            })
            .collect()
    }

    #[test]
    fn paths_route_as_on_the_api_server() {
        let svc = |ns: Option<&str>| Route::Collection(Kind::Service, ns.map(str::to_owned));
        assert_eq!(route("/api/v1/services"), svc(None));
        assert_eq!(
            route("/api/v1/namespaces/default/services"),
            svc(Some("default"))
        );
        assert_eq!(
            route("/api/v1/namespaces/default/services/web"),
            Route::Object(Kind::Service, "default".into(), "web".into())
        );
        assert_eq!(
            route("/api/v1/nodes/node1"),
            Route::Object(Kind::Node, String::new(), "node1".into())
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"),
            Route::Collection(Kind::EndpointSlice, Some("kube-system".into()))
        );
        for nope in [
            "/api/v1/namespaces/default/nodes",
            "/api/v1/pods",
            "/api/v1/nodes/a/b",
            "/apis/discovery.k8s.io/v1/services",
        ] {
            assert_eq!(route(nope), Route::NotFound, "{nope}");
        }
        let Route::Discovery(core) = route("/api/v1") else {
            panic!("no /api/v1")
        };
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(names, ["services", "nodes"]);
        assert!(core.get("apiVersion").is_none(), "{core}");
        let Route::Discovery(groups) = route("/apis/") else {
            panic!("no /apis")
        };
        assert_eq!(groups["groups"][0]["name"], "discovery.k8s.io");
    }

    #[test]
    fn directory_changes_become_events() {
        let node = json!({"metadata": {"name": "node1"}});
        let a = served(&[
            (Kind::EndpointSlice, slice("s", "10.0.0.1")),
            (Kind::Node, node.clone()),
        ]);
        let at = |t: &'static str| move |_: &Value| t.to_owned();
        assert!(changes(&a, &a, at("T")).is_empty(), "unchanged: no event");

        let b = served(&[
            (Kind::EndpointSlice, slice("s", "10.0.0.2")),
            (Kind::Node, node),
        ]);
        let c = changes(&a, &b, at("2026-01-01T00:00:00.000001Z"));
        assert_eq!(c.len(), 1, "{c:?}");
        let Change::Apply(Kind::EndpointSlice, v) = &c[0] else {
            panic!("{c:?}")
        };
        assert_eq!(v["endpoints"][0]["addresses"][0], "10.0.0.2");
        assert_eq!(
            v["metadata"]["annotations"][LAST_CHANGE_TRIGGER_TIME], "2026-01-01T00:00:00.000001Z",
            "a changed slice carries its trigger time"
        );

        let empty = Served::new();
        let d = changes(&b, &empty, at("T"));
        assert_eq!(
            d,
            vec![
                Change::Delete(Kind::EndpointSlice, "default".into(), "s".into()),
                Change::Delete(Kind::Node, String::new(), "node1".into()),
            ]
        );
    }

    #[test]
    fn an_explicit_trigger_time_is_kept() {
        let mut s = slice("s", "10.0.0.1");
        s["metadata"]["annotations"] = json!({LAST_CHANGE_TRIGGER_TIME: "2020-01-01T00:00:00Z"});
        let c = changes(&Served::new(), &served(&[(Kind::EndpointSlice, s)]), |_| {
            "NOW".to_owned()
        });
        let Change::Apply(_, v) = &c[0] else {
            panic!("{c:?}")
        };
        assert_eq!(
            v["metadata"]["annotations"][LAST_CHANGE_TRIGGER_TIME],
            "2020-01-01T00:00:00Z"
        );
    }
}
