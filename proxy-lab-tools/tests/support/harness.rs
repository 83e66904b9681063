//! The agent's control loop as `ebpf-proxy run` drives it (a [`Source`] -> [`Reconciler`] ->
//! map writer), with in-memory maps that record every write, so tests can watch what the
//! datapath would see.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use proxy_common::{Backend4, SrcRange4Key, Svc4Key, Svc4Value, VipValue};
use proxy_userspace::{
    datapath::MapSizes,
    plan::{ExtWriteError, MapState, MapWriter, MemMaps},
    serve::metrics::Metrics,
    source::{
        Source,
        kube::{self as kube_source, KubeSource, KubeSourceOptions, SourceStats},
        triggers::TriggerTimes,
    },
    sync::{Context, Reconciler, RejectionLog},
    translate::{BackendAddr, ServiceKey},
};
use tokio::task::JoinHandle;

/// The maps as a reader sees them: service -> sorted backends.
pub type View = BTreeMap<ServiceKey, Vec<BackendAddr>>;

#[derive(Default)]
pub struct Inner {
    pub state: MapState,
    pub maps: MemMaps,
    /// Every reconciliation that was applied.
    pub syncs: usize,
    /// Service entries (slot 0) deleted, in order.
    pub deleted_services: Vec<Svc4Key>,
    /// Problems found after any write: a service entry whose slots or backends are missing.
    pub broken: Vec<String>,
    /// Rejected objects of the last reconciliation.
    pub rejected: BTreeMap<String, Vec<String>>,
    /// Warn lines the rejection log emitted, over the whole run.
    pub warned: Vec<String>,
}

/// Checks the maps after every single write: what a packet arriving at that moment sees.
struct Recording<'a> {
    maps: &'a mut MemMaps,
    deleted: &'a mut Vec<Svc4Key>,
    broken: &'a mut Vec<String>,
}

impl Recording<'_> {
    fn check(&mut self) {
        for b in self.maps.broken_services() {
            self.broken.push(b);
        }
    }
}

impl MapWriter for Recording<'_> {
    type Error = Infallible;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Infallible> {
        self.maps.put_backend(id, b)?;
        self.check();
        Ok(())
    }
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Infallible> {
        self.maps.put_service(k, v)?;
        self.check();
        Ok(())
    }
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Infallible> {
        if k.slot == 0 {
            self.deleted.push(*k);
        }
        self.maps.delete_service(k)?;
        self.check();
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.maps.delete_backend(id)?;
        self.check();
        Ok(())
    }
    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<Infallible>> {
        self.maps.put_vip(addr_be, v)
    }
    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<Infallible>> {
        self.maps.delete_vip(addr_be)
    }
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.maps.put_src_range(k)
    }
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.maps.delete_src_range(k)
    }
}

pub struct Harness {
    pub inner: Arc<Mutex<Inner>>,
    pub stats: Arc<SourceStats>,
    /// The agent's metrics (network programming latency is observed as `run` does).
    pub metrics: Metrics,
    task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    /// Starts the Kubernetes source from a kubeconfig file (the `--kubeconfig` path), on
    /// maps that already hold `initial` (a restart onto pinned maps).
    pub async fn start(kubeconfig: &Path, node: &str, initial: MemMaps) -> Self {
        Self::start_with_master(Some(kubeconfig), None, node, initial).await
    }

    /// [`start`](Self::start) with `--master` (overriding the kubeconfig's server, or alone).
    pub async fn start_with_master(
        kubeconfig: Option<&Path>,
        master: Option<&str>,
        node: &str,
        initial: MemMaps,
    ) -> Self {
        let _ = env_logger::builder()
            .is_test(true)
            .filter_level(log::LevelFilter::Info)
            .parse_default_env()
            .try_init();
        let client = kube_source::client_for(kubeconfig, master)
            .await
            .expect("client from kubeconfig / --master");
        let source = KubeSource::start(client, &KubeSourceOptions::new(node));
        let stats = source.stats();
        let (state, warnings) = initial.state();
        assert!(warnings.is_empty(), "{warnings:?}");
        let inner = Arc::new(Mutex::new(Inner {
            state,
            maps: initial,
            ..Default::default()
        }));
        let metrics = Metrics::new(None, MapSizes::default(), false);
        let task = tokio::spawn(run_loop(
            Source::Kube(Box::new(source)),
            Context::new(node),
            inner.clone(),
            metrics.clone(),
        ));
        Self {
            inner,
            stats,
            metrics,
            task,
        }
    }

    pub fn view(&self) -> View {
        view_of(&self.inner.lock().expect("lock").state)
    }

    pub fn syncs(&self) -> usize {
        self.inner.lock().expect("lock").syncs
    }

    /// Waits until `cond` holds for the maps' view, or panics with `what` and the view.
    pub async fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&View) -> bool) {
        let start = Instant::now();
        loop {
            let v = self.view();
            if cond(&v) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; maps hold {v:#?}; source \
                     stats {:?}",
                    self.stats.values()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn maps(&self) -> MemMaps {
        self.inner.lock().expect("lock").maps.clone()
    }
}

pub fn view_of(state: &MapState) -> View {
    state
        .services()
        .iter()
        .map(|(k, s)| {
            let mut b: Vec<BackendAddr> = s
                .backend_ids
                .iter()
                .filter_map(|id| state.backends().get(id).copied())
                .collect();
            b.sort();
            (*k, b)
        })
        .collect()
}

/// `ebpf-proxy run`'s sync arm, with the in-memory writer.
async fn run_loop(mut source: Source, ctx: Context, inner: Arc<Mutex<Inner>>, metrics: Metrics) {
    let mut log = RejectionLog::default();
    let mut triggers = TriggerTimes::new(SystemTime::now());
    // As the agent: each service's translation is remembered between snapshots.
    let mut reconciler = Reconciler::new();
    loop {
        let snapshot = source.next_snapshot().await;
        triggers.note(&snapshot.objects.slices);
        let mut g = inner.lock().expect("lock");
        let Inner {
            state,
            maps,
            deleted_services,
            broken,
            ..
        } = &mut *g;
        let mut w = Recording {
            maps,
            deleted: deleted_services,
            broken,
        };
        match reconciler.reconcile(&snapshot, &ctx, state, &mut w) {
            Ok(s) => {
                let warned = log.report(&s.rejected);
                g.warned.extend(warned);
                g.rejected = s.rejected;
                g.syncs += 1;
                for t in triggers.programmed() {
                    metrics.observe_network_programming(t);
                }
            }
            Err(e) => {
                eprintln!("reconcile failed: {e:#}");
                source.retry();
            }
        }
    }
}

/// `ip:port/tcp`, the entry a ClusterIP gets.
pub fn key(ip: &str, port: u16) -> ServiceKey {
    ServiceKey::external(
        ip.parse().expect("ip"),
        port,
        proxy_userspace::abi::Protocol::Tcp,
    )
}

pub fn backend(ip: &str, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip.parse().expect("ip"),
        port,
        protocol: proxy_userspace::abi::Protocol::Tcp,
    }
}

/// `(count, sum)` of a histogram in the metrics text, e.g.
/// `kubeproxy_network_programming_duration_seconds`.
pub fn histogram(text: &str, name: &str) -> (u64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name}_{suffix} in:\n{text}"))
    };
    (value("count") as u64, value("sum"))
}
