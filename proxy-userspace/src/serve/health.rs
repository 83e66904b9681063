//! Health: `/healthz` and `/livez` (kube-proxy's semantics, on `--healthz-bind-address`,
//! default 0.0.0.0:10256) and the healthCheckNodePort responders of externalTrafficPolicy=Local
//! services.
//!
//! kube-proxy's rule, kept here: the proxy is unhealthy only when an update has been queued
//! for longer than the health timeout without being applied, or (our addition, as the brief
//! of a datapath proxy demands) when the datapath is not attached. An unreachable API server
//! alone is *not* unhealthy: nothing is queued, and the programmed state keeps serving.
//! `/healthz` additionally reports `nodeEligible` (false while the node is being deleted or
//! is tainted `ToBeDeletedByClusterAutoscaler`, as kube-proxy 1.30+ does so load balancers
//! drain it; set from the Node object on every sync); `/livez` ignores it.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use log::{info, warn};
use tokio::task::JoinHandle;

use super::http::{self, Response};

/// `kubeproxy_proxy_healthz_total{code}` / `kubeproxy_proxy_livez_total{code}`: answers by
/// HTTP status.
pub type ProbeCounter = prometheus_client::metrics::family::Family<
    Vec<(String, String)>,
    prometheus_client::metrics::counter::Counter,
>;

/// kube-proxy's default: twice the default sync period (30 s).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    oldest_pending: Option<Instant>,
    last_updated: Option<SystemTime>,
    attached: bool,
    node_eligible: bool,
}

/// The agent's health, shared between the control loop (writer) and the HTTP server.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    state: Arc<Mutex<State>>,
    timeout: Duration,
    /// Counts `/healthz` and `/livez` answers by status (set by [`Self::count_probes`]).
    probes: Option<(ProbeCounter, ProbeCounter)>,
}

/// A health verdict and what it is based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    /// Why unhealthy (empty when healthy).
    pub reason: String,
    pub last_updated: Option<SystemTime>,
    pub node_eligible: bool,
}

pub fn rfc3339(t: SystemTime) -> String {
    // Seconds precision, UTC, without a date library: days since the epoch to a civil date.
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                oldest_pending: None,
                last_updated: None,
                attached: false,
                node_eligible: true,
            })),
            timeout,
            probes: None,
        }
    }

    /// Counts every `/healthz` and `/livez` answer by status code in these families.
    pub fn count_probes(&mut self, healthz: ProbeCounter, livez: ProbeCounter) {
        self.probes = Some((healthz, livez));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that is not programmed yet (kube-proxy's `QueuedUpdate`).
    pub fn queued_update(&self) {
        self.lock().oldest_pending.get_or_insert_with(Instant::now);
    }

    /// Everything queued so far is programmed (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    /// Whether the programs are attached to the datapath.
    pub fn set_attached(&self, attached: bool) {
        self.lock().attached = attached;
    }

    /// False while this node is being deleted (only `/healthz` reports it).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn status_at(&self, now: Instant) -> HealthStatus {
        let s = self.lock();
        let mut reason = String::new();
        if !s.attached {
            reason = "the datapath programs are not attached".into();
        } else if let Some(t) = s.oldest_pending {
            let age = now.saturating_duration_since(t);
            if age > self.timeout {
                reason = format!(
                    "an update has been pending for {:.0?} (limit {:.0?})",
                    age, self.timeout
                );
            }
        }
        HealthStatus {
            healthy: reason.is_empty(),
            reason,
            last_updated: s.last_updated,
            node_eligible: s.node_eligible,
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status_at(Instant::now())
    }

    /// The `/healthz` (with node eligibility) or `/livez` response.
    pub fn response(&self, with_node_eligibility: bool) -> Response {
        let st = self.status();
        let mut body = serde_json::json!({
            "lastUpdated": st.last_updated.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(SystemTime::now()),
        });
        if with_node_eligibility {
            body["nodeEligible"] = serde_json::Value::Bool(st.node_eligible);
        }
        if !st.healthy {
            body["reason"] = serde_json::Value::String(st.reason.clone());
        }
        let ok = st.healthy && (!with_node_eligibility || st.node_eligible);
        let code = if ok { 200 } else { 503 };
        if let Some((healthz, livez)) = &self.probes {
            let family = if with_node_eligibility {
                healthz
            } else {
                livez
            };
            family
                .get_or_create(&vec![("code".to_owned(), code.to_string())])
                .inc();
        }
        Response::json(code, body.to_string())
    }

    /// The HTTP handler: `/healthz`, `/livez`, else 404.
    pub fn handler(&self) -> http::Handler {
        let h = self.clone();
        Arc::new(move |r| match r.path.as_str() {
            "/healthz" => h.response(true),
            "/livez" => h.response(false),
            _ => Response::text(404, "404 page not found\n"),
        })
    }

    /// Binds `addr` and serves `/healthz` and `/livez` in the background.
    pub async fn serve(&self, addr: SocketAddr) -> Result<JoinHandle<()>> {
        let l = http::bind(addr, "health (--healthz-bind-address)").await?;
        info!("serving /healthz and /livez on {}", l.local_addr()?);
        Ok(tokio::spawn(http::serve(l, self.handler())))
    }
}

/// One externalTrafficPolicy=Local service's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckService {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// The healthCheckNodePort responders: one listener per port, answering any path with
/// kube-proxy's body, 200 when the node has local endpoints (and the proxy is healthy), 503
/// otherwise. An external load balancer uses this to send traffic only to nodes with local
/// endpoints.
pub struct HealthCheckResponders {
    bind_ip: IpAddr,
    proxy: ProxyHealth,
    services: Arc<Mutex<BTreeMap<u16, HealthCheckService>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthCheckResponders {
    /// Responders listening on `bind_ip` (0.0.0.0: every node address).
    pub fn new(bind_ip: IpAddr, proxy: ProxyHealth) -> Self {
        Self {
            bind_ip,
            proxy,
            services: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// The response for `port` (what a request to it gets).
    pub fn response(
        services: &Mutex<BTreeMap<u16, HealthCheckService>>,
        proxy: &ProxyHealth,
        port: u16,
    ) -> Response {
        let svcs = services.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = svcs.get(&port) else {
            return Response::text(503, "no service on this health check port\n");
        };
        let healthy = proxy.status().healthy;
        let body = serde_json::json!({
            "service": {"namespace": s.namespace, "name": s.name},
            "localEndpoints": s.local_endpoints,
            "serviceProxyHealthy": healthy,
        });
        let ok = s.local_endpoints > 0 && healthy;
        Response::json(if ok { 200 } else { 503 }, body.to_string())
    }

    /// Makes the responders match `desired` (health check port -> service): starts listeners
    /// for new ports, stops those of ports gone, updates counts in place. A port that cannot
    /// be bound is logged and retried on the next call. Returns the ports now served.
    pub async fn sync(&mut self, desired: BTreeMap<u16, HealthCheckService>) -> Vec<u16> {
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = desired.clone();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !desired.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(h) = self.listeners.remove(&p) {
                h.abort();
                info!("stopped the health check responder on port {p}");
            }
        }
        for (&port, s) in &desired {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind_ip, port);
            match http::bind(addr, "healthCheckNodePort").await {
                Ok(l) => {
                    let (svcs, proxy) = (self.services.clone(), self.proxy.clone());
                    let handler: http::Handler =
                        Arc::new(move |_| Self::response(&svcs, &proxy, port));
                    self.listeners
                        .insert(port, tokio::spawn(http::serve(l, handler)));
                    info!(
                        "health check responder for {}/{} on {addr}",
                        s.namespace, s.name
                    );
                }
                Err(e) => warn!("{e:#}"),
            }
        }
        self.listeners.keys().copied().collect()
    }

    /// Convenience for the `(port, local_endpoint_count)` view.
    pub async fn sync_counts(&mut self, ports: &[(u16, String, String, usize)]) -> Vec<u16> {
        self.sync(
            ports
                .iter()
                .map(|(p, ns, name, n)| {
                    (
                        *p,
                        HealthCheckService {
                            namespace: ns.clone(),
                            name: name.clone(),
                            local_endpoints: *n,
                        },
                    )
                })
                .collect(),
        )
        .await
    }
}

impl Drop for HealthCheckResponders {
    fn drop(&mut self) {
        for h in self.listeners.values() {
            h.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn kube_proxy_semantics() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(!h.status_at(t0).healthy, "not attached yet");
        h.set_attached(true);
        assert!(h.status_at(t0).healthy, "attached, nothing pending");
        // An update queued (e.g. a watch event) and not applied: healthy until the timeout.
        h.queued_update();
        assert!(
            h.status_at(Instant::now() + Duration::from_secs(59))
                .healthy
        );
        let late = h.status_at(Instant::now() + Duration::from_secs(61));
        assert!(!late.healthy);
        assert!(late.reason.contains("pending"), "{}", late.reason);
        // A second queued update does not reset the age of the oldest one.
        h.queued_update();
        assert!(
            !h.status_at(Instant::now() + Duration::from_secs(61))
                .healthy
        );
        h.updated();
        assert!(
            h.status_at(Instant::now() + Duration::from_secs(3600))
                .healthy
        );
        assert!(h.status().last_updated.is_some());
        // No updates at all for an hour (API server unreachable, nothing queued): healthy.
        h.set_attached(false);
        assert!(h.status().reason.contains("not attached"));
    }

    #[test]
    fn rfc3339_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[tokio::test]
    async fn healthz_and_livez_over_http() {
        let mut h = ProxyHealth::new(Duration::from_millis(50));
        let (healthz, livez) = (ProbeCounter::default(), ProbeCounter::default());
        h.count_probes(healthz.clone(), livez.clone());
        let l = http::bind((Ipv4Addr::LOCALHOST, 0).into(), "test")
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(http::serve(l, h.handler()));
        let (code, body) = http::get(addr, "/healthz").await.unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("not attached"), "{body}");
        h.set_attached(true);
        h.updated();
        for path in ["/healthz", "/livez", "/healthz?verbose"] {
            let (code, body) = http::get(addr, path).await.unwrap();
            assert_eq!(code, 200, "{path}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(v["lastUpdated"].as_str().unwrap().ends_with('Z'), "{body}");
            assert_eq!(
                v.get("nodeEligible").is_some(),
                path.starts_with("/healthz")
            );
        }
        h.set_node_eligible(false);
        assert_eq!(http::get(addr, "/healthz").await.unwrap().0, 503);
        assert_eq!(http::get(addr, "/livez").await.unwrap().0, 200);
        h.queued_update();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(http::get(addr, "/livez").await.unwrap().0, 503);
        assert_eq!(http::get(addr, "/nope").await.unwrap().0, 404);
        let n = |f: &ProbeCounter, code: &str| {
            f.get_or_create(&vec![("code".to_owned(), code.to_owned())])
                .get()
        };
        // /healthz: 503 (not attached), 200 twice (plain and ?verbose), 503 (node not eligible).
        assert_eq!((n(&healthz, "200"), n(&healthz, "503")), (2, 2));
        assert_eq!((n(&livez, "200"), n(&livez, "503")), (2, 1));
        task.abort();
    }

    #[tokio::test]
    async fn health_check_node_ports_answer_with_local_endpoint_counts() {
        let proxy = ProxyHealth::new(Duration::from_secs(60));
        proxy.set_attached(true);
        let mut r = HealthCheckResponders::new(Ipv4Addr::LOCALHOST.into(), proxy.clone());
        // Free ports picked by the kernel.
        let pick = || {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (p1, p2) = (pick(), pick());
        let svc = |name: &str, n| ("default".to_owned(), name.to_owned(), n);
        let served = r
            .sync_counts(&[
                (p1, svc("web", 2).0, svc("web", 2).1, 2),
                (p2, svc("db", 0).0, svc("db", 0).1, 0),
            ])
            .await;
        assert_eq!(served.len(), 2);
        let at = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let (code, body) = http::get(at(p1), "/").await.unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["serviceProxyHealthy"], true);
        let (code, body) = http::get(at(p2), "/healthz").await.unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"localEndpoints\":0"), "{body}");

        // Counts change in place; a removed port stops answering.
        r.sync_counts(&[(p2, "default".into(), "db".into(), 1)])
            .await;
        assert_eq!(http::get(at(p2), "/").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(http::get(at(p1), "/").await.is_err(), "port {p1} closed");
        // An unhealthy proxy makes every responder fail.
        proxy.set_attached(false);
        assert_eq!(http::get(at(p2), "/").await.unwrap().0, 503);
    }
}
