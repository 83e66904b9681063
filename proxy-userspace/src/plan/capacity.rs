//! The capacity check: which services fit the maps, admitted whole and smallest first, and an
//! issue for each one left out.
use super::*;
/// What the maps can hold, in the units [`fit_capacity`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service-map entries: one per service entry plus one per backend slot.
    pub service_entries: usize,
    /// Backend-map entries.
    pub backends: usize,
    /// Service IDs (one per service entry): the counter map's size minus the reserved ID 0.
    pub service_ids: usize,
    /// ClusterIP-map entries.
    pub cluster_ips: usize,
    /// Source-range (LPM) entries: one per range and LoadBalancer entry.
    pub source_ranges: usize,
}

/// Admits whole Service objects into the desired state while they fit every map, smallest
/// first (so one huge or hostile object cannot crowd out many small ones), and removes the
/// rest (their entries and ClusterIPs), returning one issue per removed object that names what
/// did not fit and the flag that sizes it. No object is ever half programmed: a service port
/// with more endpoints than a service entry can index ([`MAX_BACKENDS_PER_SERVICE`]) rejects
/// its whole Service.
///
/// Counted per object: service-map entries (entry + slots), service IDs, backends (distinct
/// addresses across objects, including serving+terminating ones kept for established flows),
/// ClusterIPs (distinct, with `cluster_ips` holding any not tied to an entry up front), and
/// source ranges. A plan also holds old and new entries side by side for a moment
/// (make-before-break), so running within a few percent of capacity can make a write fail,
/// which is reported and retried.
pub fn fit_capacity(
    desired: &mut Desired,
    cluster_ips: &mut BTreeSet<Ipv4Addr>,
    cap: &Capacity,
) -> Vec<crate::translate::Issue> {
    if fits_whole(desired, cluster_ips, cap) {
        return Vec::new();
    }
    // Object of a desired entry: its name up to the port name (`ns/name:port`).
    let object_of = |d: &DesiredService| -> String {
        let base = d.name.split(':').next().unwrap_or_default();
        format!("Service {base}")
    };
    #[derive(Default)]
    struct Need {
        keys: Vec<ServiceKey>,
        entries: usize,
        ranges: usize,
        backends: HashSet<BackendAddr>,
        vips: BTreeSet<Ipv4Addr>,
        too_many: Option<usize>,
    }
    let mut needs: BTreeMap<String, Need> = BTreeMap::new();
    for (key, d) in desired.iter() {
        let n = needs.entry(object_of(d)).or_default();
        n.keys.push(*key);
        n.entries += 1 + d.backends.len();
        n.backends.extend(d.backends.iter().copied());
        n.backends.extend(d.terminating.iter().copied());
        if d.flags & svc_flags::SOURCE_RANGES != 0 {
            n.ranges += d.source_ranges.len();
        }
        if d.flags & svc_flags::CLUSTER_IP != 0 && cluster_ips.contains(&key.ip) {
            n.vips.insert(key.ip);
        }
        if d.backends.len() > MAX_BACKENDS_PER_SERVICE {
            n.too_many = Some(d.backends.len());
        }
    }
    let tied: BTreeSet<Ipv4Addr> = needs
        .values()
        .flat_map(|n| n.vips.iter().copied())
        .collect();
    let mut used_vips: BTreeSet<Ipv4Addr> = cluster_ips.difference(&tied).copied().collect();
    let mut order: Vec<(&String, &Need)> = needs.iter().collect();
    order.sort_by_key(|(name, n)| (n.entries, *name));
    let (mut used_entries, mut used_ids, mut used_ranges) = (0usize, 0usize, 0usize);
    let mut used_backends: HashSet<BackendAddr> = HashSet::new();
    let mut issues = Vec::new();
    let mut rejected_vips = BTreeSet::new();
    for (object, n) in order {
        let new_backends = n.backends.difference(&used_backends).count();
        let new_vips = n.vips.difference(&used_vips).count();
        let mut short = Vec::new();
        let mut check = |what: &str, need: usize, used: usize, cap: usize, flag: &str| {
            if need > 0 && used + need > cap {
                short.push(format!(
                    "{need} {what} (only {} of {cap} left; {flag})",
                    cap.saturating_sub(used)
                ));
            }
        };
        check(
            "service map entries",
            n.entries,
            used_entries,
            cap.service_entries,
            "--service-map-entries",
        );
        check(
            "service IDs",
            n.keys.len(),
            used_ids,
            cap.service_ids,
            "--max-services",
        );
        check(
            "backends",
            new_backends,
            used_backends.len(),
            cap.backends,
            "--max-backends",
        );
        check(
            "ClusterIPs",
            new_vips,
            used_vips.len(),
            cap.cluster_ips,
            "--max-cluster-ips",
        );
        check(
            "source ranges",
            n.ranges,
            used_ranges,
            cap.source_ranges,
            "--max-source-ranges",
        );
        let message = if let Some(count) = n.too_many {
            Some(format!(
                "a port has {count} endpoints, more than the {MAX_BACKENDS_PER_SERVICE} a \
                 service entry can hold; the service is skipped"
            ))
        } else if !short.is_empty() {
            Some(format!(
                "does not fit the maps: needs {}; the service is skipped (raise the flag \
                 named, or remove other services)",
                short.join(", ")
            ))
        } else {
            None
        };
        match message {
            Some(message) => {
                for k in &n.keys {
                    desired.remove(k);
                }
                rejected_vips.extend(n.vips.iter().copied());
                issues.push(crate::translate::Issue {
                    object: object.clone(),
                    field: String::new(),
                    message,
                });
            }
            None => {
                used_entries += n.entries;
                used_ids += n.keys.len();
                used_ranges += n.ranges;
                used_backends.extend(n.backends.iter().copied());
                used_vips.extend(n.vips.iter().copied());
            }
        }
    }
    // A ClusterIP shared with an admitted object stays.
    cluster_ips.retain(|ip| !rejected_vips.contains(ip) || used_vips.contains(ip));
    issues
}

/// Whether everything fits even counted without sharing (every backend and ClusterIP as
/// often as entries name them): then [`fit_capacity`] would admit every object, and this
/// answers it with sums instead of per-object sets, so a sync far from the limits does not
/// pay for the check.
pub fn fits_whole(desired: &Desired, cluster_ips: &BTreeSet<Ipv4Addr>, cap: &Capacity) -> bool {
    let (mut entries, mut backends, mut ranges) = (0usize, 0usize, 0usize);
    for d in desired.values() {
        if d.backends.len() > MAX_BACKENDS_PER_SERVICE {
            return false;
        }
        entries += 1 + d.backends.len();
        backends += d.backends.len() + d.terminating.len();
        if d.flags & svc_flags::SOURCE_RANGES != 0 {
            ranges += d.source_ranges.len();
        }
    }
    entries <= cap.service_entries
        && desired.len() <= cap.service_ids
        && backends <= cap.backends
        && cluster_ips.len() <= cap.cluster_ips
        && ranges <= cap.source_ranges
}

/// Backends written with `backend_flags::TERMINATING`: serving+terminating endpoints kept only
/// for their established flows ([`DesiredService::terminating`]), and the slots of services
/// left with nothing but serving+terminating endpoints (`svc_flags::TERMINATING_FALLBACK`).
/// The datapath's session affinity skips a terminating affine backend unless its service is in
/// that fallback.
///
/// The flag is per backend, and backends are shared by address: one that some service still
/// uses as a ready endpoint (slices disagreeing for a moment) is not flagged, so affinity to a
/// ready endpoint is never lost; the terminating side then keeps affinity a little longer.
pub(super) fn terminating_backends(desired: &Desired) -> HashSet<BackendAddr> {
    let mut terminating = HashSet::new();
    let mut ready = HashSet::new();
    for ds in desired.values() {
        terminating.extend(ds.terminating.iter().copied());
        if ds.flags & svc_flags::TERMINATING_FALLBACK != 0 {
            terminating.extend(ds.backends.iter().copied());
        } else {
            ready.extend(ds.backends.iter().copied());
        }
    }
    terminating.retain(|b| !ready.contains(b));
    terminating
}
