//! The Kubernetes source: Services, EndpointSlices (all namespaces) and this node's Node object,
//! each watched with a kube-runtime watcher into an in-memory store.
//!
//! The stores only feed snapshots; the agent's one writer (`sync::reconcile`) turns a
//! snapshot into map writes. The contract, following client-go's informers and kube-proxy:
//!
//! - **Nothing before the initial lists.** [`KubeSource::next_snapshot`] returns nothing until
//!   every watch has reported its initial list (`InitDone`), so a start against an unreachable
//!   API server leaves the pinned maps (and the traffic they carry) untouched.
//! - **Relists keep the old state until the new list is complete.** The store's writer buffers
//!   a relist and swaps it in at `InitDone`, so a 410 Gone never exposes an empty store.
//! - **Errors are never fatal.** Each is logged, counted in [`SourceStats`] and retried with
//!   kube-runtime's `default_backoff()` (0.8 s doubling to 30 s, jittered). One case kube-runtime
//!   2.0 does not recover from by itself: an HTTP 410 status answering the *watch request* (rather
//!   than a watch `ERROR` event) makes it re-watch from the same expired resourceVersion for
//!   ever; we restart the watcher, which relists, as client-go's reflector does.
//! - **Rate-limited, not delayed.** A change after a quiet spell is served at once (after the
//!   events already received are taken in); further changes within
//!   [`KubeSourceOptions::debounce`] of that snapshot are folded into the next one, as
//!   kube-proxy's `minSyncPeriod` does. So one edit reaches the maps in milliseconds and a
//!   burst costs at most one snapshot per interval.
//! - **An unreadable object is skipped, not fatal.** Objects are decoded one by one
//!   ([`Lenient`]): one object that does not fit the schema (a missing required field, a string
//!   where a number belongs) is reported as a rejected object while every other object of the
//!   list is used. With plain typed watchers one such object fails the whole list, for ever.
use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use log::{info, warn};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use tokio::{sync::watch, task::JoinHandle};

use super::{Snapshot, manifests::Objects};

/// Set in every pod (and so in the agent's DaemonSet pod) to the API server's address.
pub const IN_CLUSTER_ENV: &str = "KUBERNETES_SERVICE_HOST";

/// Label selector kube-proxy uses for Services and EndpointSlices: services handed to another
/// proxy and headless services are never listed (the translation ignores them anyway).
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Where the agent's objects come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// An API server named by a kubeconfig file (`--kubeconfig`; `--master`, if given,
    /// overrides its server).
    Kubeconfig(PathBuf),
    /// `--master` without `--kubeconfig`: that URL with no credentials, as kube-proxy (which
    /// then does not fall back to the in-cluster configuration).
    Master(String),
    /// The API server of the cluster the agent runs in (service account token, CA and the
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` environment).
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "no source of Service and EndpointSlice objects: pass --kubeconfig PATH (a Kubernetes \
         API server) or --manifests DIR (a directory of manifests), or run in a pod \
         ({IN_CLUSTER_ENV} set) to use the in-cluster configuration"
    )]
    NoSource,
    #[error("--manifests and --kubeconfig are mutually exclusive: pick one source")]
    BothSources,
    #[error("reading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "in-cluster configuration (from {IN_CLUSTER_ENV}/KUBERNETES_SERVICE_PORT and the \
         service account files): {0}; pass --kubeconfig to use a kubeconfig instead"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("--master {url:?}: {reason}")]
    Master { url: String, reason: String },
    #[error("creating the Kubernetes client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// Chooses the source from the flags and the environment: `--manifests`, else
/// `--kubeconfig`, else `--master` alone, else the in-cluster configuration when
/// `in_cluster_host` (the value of `KUBERNETES_SERVICE_HOST`) is set and not empty.
pub fn select_source(
    manifests: Option<&Path>,
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    in_cluster_host: Option<&str>,
) -> Result<SourceConfig, SourceError> {
    match (manifests, kubeconfig) {
        (Some(_), Some(_)) => Err(SourceError::BothSources),
        (Some(dir), None) => Ok(SourceConfig::Manifests(dir.to_owned())),
        (None, Some(path)) => Ok(SourceConfig::Kubeconfig(path.to_owned())),
        (None, None) if master.is_some_and(|m| !m.trim().is_empty()) => {
            Ok(SourceConfig::Master(master.unwrap_or_default().to_owned()))
        }
        (None, None) if in_cluster_host.is_some_and(|h| !h.is_empty()) => {
            Ok(SourceConfig::InCluster)
        }
        (None, None) => Err(SourceError::NoSource),
    }
}

/// Builds a client for a kubeconfig file, or the in-cluster configuration with `None`.
/// Nothing is sent to the API server yet.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    client_for(kubeconfig, None).await
}

/// [`client`] with kube-proxy's `--master`: the API server URL, overriding the kubeconfig's
/// server; with no kubeconfig, that URL alone (no credentials), not the in-cluster
/// configuration. A bare `host:port` means https.
pub async fn client_for(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Client, SourceError> {
    let master = match master.map(str::trim).filter(|m| !m.is_empty()) {
        Some(m) => {
            let url = crate::cmd::config::master_url(m).map_err(|reason| SourceError::Master {
                url: m.to_owned(),
                reason,
            })?;
            let uri = url.parse().map_err(|e| SourceError::Master {
                url: m.to_owned(),
                reason: format!("{e}"),
            })?;
            Some(uri)
        }
        None => None,
    };
    let config = match (kubeconfig, master) {
        (None, Some(uri)) => kube::Config::new(uri),
        (Some(path), master) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| SourceError::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            let mut config =
                kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| SourceError::Kubeconfig {
                        path: path.to_owned(),
                        source,
                    })?;
            if let Some(uri) = master {
                config.cluster_url = uri;
            }
            config
        }
        (None, None) => kube::Config::incluster().map_err(SourceError::InCluster)?,
    };
    let url = config.cluster_url.to_string();
    Client::try_from(config).map_err(|source| SourceError::Client {
        url,
        source: Box::new(source),
    })
}

/// An API object decoded leniently: the metadata (enough to key it in a store), and the typed
/// object or why it could not be decoded.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    pub metadata: ObjectMeta,
    /// Shared: a snapshot hands the same allocation out (no copy of every object).
    pub object: Result<Arc<K>, String>,
}

impl<K> Resource for Lenient<K>
where
    K: Resource<DynamicType = ()>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(d)?;
        // managedFields is often the largest part of an object and never used here.
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        let metadata = value
            .get("metadata")
            .map(|m| ObjectMeta::deserialize(m).unwrap_or_else(|_| fallback_meta(m)))
            .unwrap_or_default();
        // Typed without path tracking first (it costs on every field); the path, for the
        // message, only for an object that does not decode.
        let object = match K::deserialize(&value) {
            Ok(k) => Ok(Arc::new(k)),
            Err(_) => serde_path_to_error::deserialize::<_, K>(value)
                .map(Arc::new)
                .map_err(|e| format!("{}: {}", e.path(), e.inner())),
        };
        Ok(Self { metadata, object })
    }
}

/// The identifying strings of a metadata object that does not decode as a whole.
fn fallback_meta(m: &serde_json::Value) -> ObjectMeta {
    let s = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    ObjectMeta {
        name: s("name"),
        namespace: s("namespace"),
        resource_version: s("resourceVersion"),
        uid: s("uid"),
        ..Default::default()
    }
}

/// Counters the metrics endpoint reads. All monotonic except `synced`.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Errors any watch reported: failed lists, failed watch requests, broken streams, watch
    /// `ERROR` events (410 Gone included). Each is retried.
    pub watch_errors: AtomicU64,
    /// Relists after the initial one (410 Gone, or a watch that could not be resumed).
    pub relists: AtomicU64,
    /// Watch events applied to the stores (initial list items included).
    pub events: AtomicU64,
    /// Snapshots handed to the writer.
    pub snapshots: AtomicU64,
    /// Every watch has reported its initial list.
    pub synced: AtomicBool,
}

/// A copy of [`SourceStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStatsValues {
    pub watch_errors: u64,
    pub relists: u64,
    pub events: u64,
    pub snapshots: u64,
    pub synced: bool,
}

impl SourceStats {
    pub fn values(&self) -> SourceStatsValues {
        SourceStatsValues {
            watch_errors: self.watch_errors.load(Ordering::Relaxed),
            relists: self.relists.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            synced: self.synced.load(Ordering::Relaxed),
        }
    }
}

/// Options of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeSourceOptions {
    /// Only this Node object is watched (field selector `metadata.name`).
    pub node_name: String,
    /// The least time between two snapshots: changes within it of the last snapshot are
    /// folded into the next one.
    pub debounce: Duration,
}

impl KubeSourceOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            debounce: Duration::from_millis(100),
        }
    }
}

const WATCHES: usize = 3;
const SERVICES: usize = 0;
const SLICES: usize = 1;
const NODES: usize = 2;
const WATCH_NAMES: [&str; WATCHES] = ["Services", "EndpointSlices", "Node"];

/// What the watch tasks tell the snapshot side: which watches have listed, and a generation
/// bumped on every change to a store.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    synced: [bool; WATCHES],
    generation: u64,
}

/// The watches and their stores. Dropping it stops the watches.
pub struct KubeSource {
    services: Store<Lenient<Service>>,
    slices: Store<Lenient<EndpointSlice>>,
    nodes: Store<Lenient<Node>>,
    progress: watch::Receiver<Progress>,
    stats: Arc<SourceStats>,
    debounce: Duration,
    /// A store changed since the last snapshot.
    dirty: bool,
    /// A snapshot is due even without a change (the last one could not be applied).
    retry: bool,
    /// When the last snapshot was taken.
    last_snapshot: Option<std::time::Instant>,
    /// How long taking the last snapshot from the stores took.
    pub(super) snapshot_took: Duration,
    tasks: Vec<JoinHandle<()>>,
    /// The objects handed out by the last snapshot, sorted: an unchanged object is handed
    /// out again, shared, so the translation recognises it without comparing it.
    kept: std::sync::Mutex<(Kept<Service>, Kept<EndpointSlice>)>,
    /// What the watches changed since the last snapshot, per watch.
    changed: Arc<std::sync::Mutex<[Dirty; 3]>>,
}

/// An object's place in a snapshot: namespace, name.
type Id = (Option<String>, Option<String>);

fn id_of(m: &ObjectMeta) -> Id {
    (m.namespace.clone(), m.name.clone())
}

/// The objects one watch changed (added, modified or deleted) since the last snapshot.
#[derive(Debug, Default)]
struct Dirty {
    /// A (re)list replaced the store: any object may have changed.
    all: bool,
    ids: std::collections::BTreeSet<Id>,
}

/// One kind's objects as the last snapshot handed them out, in namespace/name order, so the
/// next snapshot only places the objects that changed (one lookup and one binary search each)
/// instead of sorting the whole store again.
struct Kept<K> {
    entries: Vec<KeptEntry<K>>,
    /// `entries` mirrors the store as of the last snapshot (false before the first).
    valid: bool,
}

impl<K> Default for Kept<K> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            valid: false,
        }
    }
}

struct KeptEntry<K> {
    id: Id,
    /// The store's entry (kept alive, so its address identifies it: the store replaces an
    /// entry's allocation on every change).
    store: Arc<Lenient<K>>,
    /// The object handed out, or why it cannot be.
    out: Result<Arc<K>, String>,
}

impl<K: Resource<DynamicType = ()> + Clone> KeptEntry<K> {
    fn new(store: Arc<Lenient<K>>) -> Self {
        let out = match &store.object {
            Ok(k) => Ok(Arc::clone(k)),
            Err(e) => Err(format!(
                "{} {}: cannot be decoded ({e}); the object is skipped",
                K::kind(&()),
                display_name(&store.metadata)
            )),
        };
        Self {
            id: id_of(&store.metadata),
            store,
            out,
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("progress", &*self.progress.borrow())
            .field("stats", &self.stats.values())
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// Starts the three watches (on the current tokio runtime). Returns at once; the first
    /// snapshot comes when every watch has listed.
    pub fn start(client: Client, opts: &KubeSourceOptions) -> Self {
        let stats = Arc::new(SourceStats::default());
        let (tx, progress) = watch::channel(Progress::default());
        let tx = Arc::new(tx);
        let labels = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let node_cfg =
            watcher::Config::default().fields(&format!("metadata.name={}", opts.node_name));

        let dirty: Arc<std::sync::Mutex<[Dirty; 3]>> = Arc::default();
        let (services, w_services) = reflector::store();
        let (slices, w_slices) = reflector::store();
        let (nodes, w_nodes) = reflector::store();
        let tasks = vec![
            tokio::spawn(run_watch(
                Api::<Lenient<Service>>::all(client.clone()),
                labels.clone(),
                w_services,
                SERVICES,
                tx.clone(),
                stats.clone(),
                dirty.clone(),
            )),
            tokio::spawn(run_watch(
                Api::<Lenient<EndpointSlice>>::all(client.clone()),
                labels,
                w_slices,
                SLICES,
                tx.clone(),
                stats.clone(),
                dirty.clone(),
            )),
            tokio::spawn(run_watch(
                Api::<Lenient<Node>>::all(client),
                node_cfg,
                w_nodes,
                NODES,
                tx,
                stats.clone(),
                dirty.clone(),
            )),
        ];
        // At info: an operator whose agent programs nothing wants to see what it waits for.
        info!(
            "waiting for the initial lists of {} from the API server before programming anything \
             (the pinned datapath keeps forwarding meanwhile)",
            WATCH_NAMES.join(", ")
        );
        Self {
            services,
            slices,
            nodes,
            progress,
            stats,
            debounce: opts.debounce,
            dirty: false,
            retry: false,
            last_snapshot: None,
            snapshot_took: Duration::ZERO,
            tasks,
            kept: Default::default(),
            changed: dirty,
        }
    }

    /// The counters, shared with the watch tasks.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }

    /// Every watch has reported its initial list.
    pub fn is_synced(&self) -> bool {
        self.progress.borrow().synced.iter().all(|s| *s)
    }

    /// Asks for another snapshot even if nothing changes (the last one failed to apply).
    pub fn retry(&mut self) {
        self.retry = true;
    }

    /// Waits until every watch has listed and something changed since the last snapshot (or
    /// [`retry`](Self::retry) was called), and until the debounce interval since the last
    /// snapshot has passed, and returns the stores' contents. Cancel safe: a change seen by a
    /// cancelled call is not lost.
    pub async fn next_snapshot(&mut self) -> Snapshot {
        loop {
            if self.progress.has_changed().unwrap_or(false) {
                self.progress.borrow_and_update();
                self.dirty = true;
            }
            if self.is_synced() && (self.dirty || self.retry) {
                let due = self.last_snapshot.map(|t| t + self.debounce);
                match due.filter(|d| *d > std::time::Instant::now()) {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    // Lets the watch tasks store the events that arrived with this one.
                    None => tokio::task::yield_now().await,
                }
                self.last_snapshot = Some(std::time::Instant::now());
                // Changes made while waiting are in this snapshot.
                self.progress.borrow_and_update();
                self.dirty = false;
                self.retry = false;
                self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let snap = self.snapshot();
                self.snapshot_took = started.elapsed();
                return snap;
            }
            // `changed` marks the new value seen, so remember it here.
            match self.progress.changed().await {
                Ok(()) => self.dirty = true,
                // The watch tasks are gone (only when the runtime shuts down).
                Err(_) => std::future::pending::<()>().await,
            }
        }
    }

    /// The stores' contents now, sorted by namespace/name. Objects that could not be decoded
    /// are listed in `unreadable`.
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        let Objects {
            services,
            slices,
            nodes,
        } = &mut snap.objects;
        let [d_services, d_slices, _] = std::mem::take(&mut *lock(&self.changed));
        let mut kept = lock(&self.kept);
        let (k_services, k_slices) = &mut *kept;
        collect(
            &self.services,
            k_services,
            d_services,
            services,
            &mut snap.unreadable,
        );
        collect(
            &self.slices,
            k_slices,
            d_slices,
            slices,
            &mut snap.unreadable,
        );
        let mut node_objects = Vec::new();
        let all = Dirty {
            all: true,
            ..Dirty::default()
        };
        collect(
            &self.nodes,
            &mut Kept::default(),
            all,
            &mut node_objects,
            &mut snap.unreadable,
        );
        nodes.extend(node_objects.into_iter().map(Arc::unwrap_or_clone));
        snap.unreadable.sort();
        snap
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The store's objects, sorted by namespace/name, into `out` (and `unreadable`). Only the
/// objects `dirty` names are looked up again when `kept` is valid; otherwise the whole store is
/// listed and sorted. Either way an unchanged store entry is handed out as the same object.
fn collect<K>(
    store: &Store<Lenient<K>>,
    kept: &mut Kept<K>,
    dirty: Dirty,
    out: &mut Vec<Arc<K>>,
    unreadable: &mut Vec<String>,
) where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    if dirty.all || !kept.valid {
        let mut objs = store.state();
        objs.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        // Store entry address -> the kept entry (alive until the matching is done).
        let mut before: HashMap<usize, KeptEntry<K>> = std::mem::take(&mut kept.entries)
            .into_iter()
            .map(|e| (Arc::as_ptr(&e.store) as usize, e))
            .collect();
        kept.entries = objs
            .into_iter()
            .map(|o| match before.remove(&(Arc::as_ptr(&o) as usize)) {
                Some(e) => e,
                None => KeptEntry::new(o),
            })
            .collect();
        kept.valid = true;
    } else {
        for id in dirty.ids {
            let Some(name) = &id.1 else { continue };
            let mut key = reflector::ObjectRef::<Lenient<K>>::new(name);
            if let Some(ns) = &id.0 {
                key = key.within(ns);
            }
            let now = store.get(&key);
            let at = kept.entries.binary_search_by(|e| e.id.cmp(&id));
            match (at, now) {
                (Ok(i), Some(o)) if !Arc::ptr_eq(&kept.entries[i].store, &o) => {
                    kept.entries[i] = KeptEntry::new(o);
                }
                (Ok(i), None) => {
                    kept.entries.remove(i);
                }
                (Err(i), Some(o)) => kept.entries.insert(i, KeptEntry::new(o)),
                _ => {}
            }
        }
    }
    out.reserve(kept.entries.len());
    for e in &kept.entries {
        match &e.out {
            Ok(k) => out.push(Arc::clone(k)),
            Err(msg) => unreadable.push(msg.clone()),
        }
    }
}

fn display_name(m: &ObjectMeta) -> String {
    let name = m.name.as_deref().unwrap_or("<unnamed>");
    match m.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// A 410 Gone answered to the watch request as an HTTP status: kube-runtime 2.0 keeps
/// re-watching from the same expired resourceVersion for ever, so the watcher is restarted
/// (a relist). A 410 `ERROR` event inside a watch stream is handled by kube-runtime itself.
fn gone_on_watch_request(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::WatchStartFailed(kube::Error::Api(r))
            | watcher::Error::WatchFailed(kube::Error::Api(r)) if r.code == 410
    )
}

/// One watch, for ever: events into the store writer, progress to the snapshot side.
async fn run_watch<K>(
    api: Api<Lenient<K>>,
    cfg: watcher::Config,
    mut writer: reflector::store::Writer<Lenient<K>>,
    index: usize,
    progress: Arc<watch::Sender<Progress>>,
    stats: Arc<SourceStats>,
    dirty: Arc<std::sync::Mutex<[Dirty; 3]>>,
) where
    K: Resource<DynamicType = ()> + Clone + fmt::Debug + DeserializeOwned + Send + Sync + 'static,
{
    let what = WATCH_NAMES[index];
    let mut listed = false;
    loop {
        let mut stream = pin!(watcher(api.clone(), cfg.clone()).default_backoff());
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    // After the store has it, so a snapshot that sees the mark sees the change.
                    match &event {
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                            lock(&dirty)[index].ids.insert(id_of(&o.metadata));
                        }
                        // The store was swapped for the new list.
                        watcher::Event::InitDone => lock(&dirty)[index].all = true,
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                    }
                    match event {
                        watcher::Event::Init => {
                            if listed {
                                stats.relists.fetch_add(1, Ordering::Relaxed);
                                info!(
                                    "relisting {what} (the store keeps its contents until the list completes)"
                                );
                            }
                        }
                        watcher::Event::InitApply(_) => {
                            stats.events.fetch_add(1, Ordering::Relaxed);
                        }
                        watcher::Event::InitDone => {
                            if !listed {
                                info!("{what}: initial list done");
                            }
                            listed = true;
                            progress.send_modify(|p| {
                                p.synced[index] = true;
                                p.generation += 1;
                            });
                            let all = progress.borrow().synced.iter().all(|s| *s);
                            stats.synced.store(all, Ordering::Relaxed);
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            stats.events.fetch_add(1, Ordering::Relaxed);
                            progress.send_modify(|p| p.generation += 1);
                        }
                    }
                }
                Err(e) => {
                    stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    if gone_on_watch_request(&e) {
                        warn!("watching {what}: {e}: the resourceVersion expired; relisting");
                        break;
                    }
                    warn!(
                        "watching {what}: {e}{}; retrying with backoff",
                        source_chain(&e)
                    );
                }
            }
        }
        // Only after a 410 on the watch request (the backoff stream never ends by itself).
        // A short pause keeps a server that answers every watch with 410 from being hammered.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `" (root cause)"` when the innermost source of an error is not already in its message,
/// so a log line says why a request failed (e.g. "Connection refused").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut root = None;
    let mut cur = e.source();
    while let Some(s) = cur {
        root = Some(s);
        cur = s.source();
    }
    match root.map(|r| r.to_string()) {
        Some(r) if !e.to_string().contains(&r) => format!(" ({r})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_selection() {
        let dir = Path::new("/m");
        let kc = Path::new("/kc");
        assert_eq!(
            select_source(Some(dir), None, None, Some("10.0.0.1")).ok(),
            Some(SourceConfig::Manifests(dir.into()))
        );
        assert_eq!(
            select_source(None, Some(kc), None, Some("10.0.0.1")).ok(),
            Some(SourceConfig::Kubeconfig(kc.into()))
        );
        assert_eq!(
            select_source(None, None, None, Some("10.0.0.1")).ok(),
            Some(SourceConfig::InCluster)
        );
        assert!(matches!(
            select_source(None, None, None, Some("")),
            Err(SourceError::NoSource)
        ));
        assert!(matches!(
            select_source(None, None, None, None),
            Err(SourceError::NoSource)
        ));
        assert!(matches!(
            select_source(Some(dir), Some(kc), None, None),
            Err(SourceError::BothSources)
        ));
        // --master: overrides the kubeconfig's server; alone, it is the source (kube-proxy
        // does not fall back to the in-cluster configuration then); ignored with manifests.
        let m = Some("https://10.0.0.1:6443");
        assert_eq!(
            select_source(None, Some(kc), m, Some("10.0.0.1")).ok(),
            Some(SourceConfig::Kubeconfig(kc.into()))
        );
        assert_eq!(
            select_source(None, None, m, Some("10.0.0.1")).ok(),
            Some(SourceConfig::Master("https://10.0.0.1:6443".into()))
        );
        assert_eq!(
            select_source(Some(dir), None, m, None).ok(),
            Some(SourceConfig::Manifests(dir.into()))
        );
        assert!(matches!(
            select_source(None, None, Some(" "), None),
            Err(SourceError::NoSource)
        ));
        let msg = SourceError::NoSource.to_string();
        assert!(
            msg.contains("--kubeconfig") && msg.contains("--manifests"),
            "{msg}"
        );
    }

    #[test]
    fn lenient_keeps_metadata_of_an_undecodable_object() {
        // A port number as a string does not fit the schema.
        let v = serde_json::json!({
            "metadata": {"name": "bad", "namespace": "ns", "resourceVersion": "7",
                         "managedFields": [{"manager": "x"}]},
            "spec": {"ports": [{"port": "eighty"}]}
        });
        let l: Lenient<Service> = serde_json::from_value(v).expect("lenient never fails");
        assert_eq!(l.metadata.name.as_deref(), Some("bad"));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
        let err = l.object.expect_err("a string port does not decode");
        assert!(err.contains("port"), "{err}");

        let ok: Lenient<Service> =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "good"}}))
                .expect("decodes");
        assert!(ok.object.is_ok());
    }

    #[test]
    fn lenient_metadata_fallback() {
        // `labels` must be a map; the name still keys the object.
        let v = serde_json::json!({"metadata": {"name": "x", "labels": 5, "resourceVersion": "3"}});
        let l: Lenient<Service> = serde_json::from_value(v).expect("lenient never fails");
        assert_eq!(l.metadata.name.as_deref(), Some("x"));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("3"));
        assert!(l.object.is_err());
    }
}
