//! The translation itself: objects grouped per service, each group translated on its own,
//! then the cross-group steps (key claims, health checks, ClusterIP set); and the incremental
//! [`Translator`] that reuses the groups whose objects did not change.
use super::*;
use k8s_openapi::Metadata;

/// The kinds of entries, in the order they claim keys (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Kind {
    pub(super) const fn flag(self) -> u32 {
        match self {
            Kind::ClusterIp => svc_flags::CLUSTER_IP,
            Kind::NodePort => svc_flags::NODE_PORT,
            Kind::LoadBalancer => svc_flags::LOAD_BALANCER,
            Kind::ExternalIp => svc_flags::EXTERNAL_IP,
        }
    }

    pub(super) const fn name(self) -> &'static str {
        match self {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
            Kind::ExternalIp => "externalIP",
        }
    }
}

impl<S, E> Clone for Input<'_, S, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S, E> Copy for Input<'_, S, E> {}

/// An entry (and its INTERNAL twin) a service wants, before keys are claimed.
#[derive(Clone, Debug)]
pub(super) struct Wanted {
    pub(super) kind: Kind,
    pub(super) object: String,
    pub(super) field: String,
    pub(super) key: ServiceKey,
    pub(super) external: DesiredService,
    pub(super) internal: Option<DesiredService>,
}

/// Translates the API objects into the desired map contents.
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(input: &Input<S, E>) -> Translation {
    let node = NodeView {
        name: input.node_name,
        zone: input.node_zone.filter(|z| !z.is_empty()),
        ip: input.node_ip,
    };
    let groups = group_objects(input.services, input.slices);
    let outs: Vec<GroupOut> = groups
        .values()
        .map(|g| translate_group(&g.services, &g.slices, &node, input.nodeport_addresses))
        .collect();
    assemble(outs.iter())
}

/// `(namespace, name)` of a service group or an object, owned.
pub(super) type GroupKey = (String, String);

/// The objects of one service group, each kind sorted by namespace/name (stable, so
/// duplicates keep their listed order).
pub(super) struct Group<'a, S, E> {
    pub(super) services: Vec<&'a S>,
    pub(super) slices: Vec<&'a E>,
}

/// Sorts the objects into service groups, in namespace/name order. EndpointSlices without a
/// service label or of another address type than IPv4 belong to none (they are not used).
pub(super) fn group_objects<'a, S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &'a [S],
    slices: &'a [E],
) -> BTreeMap<(&'a str, &'a str), Group<'a, S, E>> {
    let mut groups: BTreeMap<(&str, &str), Group<S, E>> = BTreeMap::new();
    let sorted = sorted_by_id(services, |s: &S| &s.borrow().metadata);
    for svc in sorted {
        groups
            .entry(object_id(&svc.borrow().metadata))
            .or_insert_with(|| Group {
                services: Vec::new(),
                slices: Vec::new(),
            })
            .services
            .push(svc);
    }
    let sorted = sorted_by_id(slices, |s: &E| &s.borrow().metadata);
    for slice in sorted {
        let s = slice.borrow();
        let Some(service) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if s.address_type != ADDRESS_TYPE_IPV4 {
            continue;
        }
        groups
            .entry((namespace(&s.metadata), service.as_str()))
            .or_insert_with(|| Group {
                services: Vec::new(),
                slices: Vec::new(),
            })
            .slices
            .push(slice);
    }
    groups
}

/// The objects by namespace/name (stable). The sources list them sorted already, which one
/// pass confirms, so the sort is usually skipped.
fn sorted_by_id<T>(objects: &[T], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<&T> {
    let mut sorted: Vec<&T> = objects.iter().collect();
    if !sorted.is_sorted_by(|a, b| object_id(meta(a)) <= object_id(meta(b))) {
        sorted.sort_by(|a, b| object_id(meta(a)).cmp(&object_id(meta(b))));
    }
    sorted
}

/// What one service group contributes, before it is related to the other groups.
#[derive(Clone, Debug, Default)]
pub(super) struct GroupOut {
    /// The problems of the group's slices, with each slice's namespace/name (all slices'
    /// problems come first, in that order).
    pub(super) slice_issues: Vec<(GroupKey, Issue)>,
    pub(super) services: Vec<ServiceOut>,
}

/// What one Service contributes.
#[derive(Clone, Debug, Default)]
pub(super) struct ServiceOut {
    pub(super) issues: Vec<Issue>,
    pub(super) cluster_ips: Vec<Ipv4Addr>,
    pub(super) wanted: Vec<Wanted>,
    /// `(field, healthCheckNodePort, check)`, claimed in [`assemble`].
    pub(super) health_check: Option<(String, u16, HealthCheck)>,
    /// `Service ns/name`, for the issue of a healthCheckNodePort clash.
    pub(super) object: String,
}

/// Translates one service group: its services (sorted) and their slices (sorted). Depends on
/// nothing else but the node.
pub(super) fn translate_group<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[&S],
    slices: &[&E],
    node: &NodeView,
    nodeport_addresses: &[Ipv4Addr],
) -> GroupOut {
    let mut out = GroupOut::default();
    let mut views = Vec::with_capacity(slices.len());
    for slice in slices {
        let slice = (*slice).borrow();
        let mut issues = Vec::new();
        let mut ctx = Ctx {
            object: format!("EndpointSlice {}", display_id(&slice.metadata)),
            issues: &mut issues,
        };
        views.push(slice_view(slice, &mut ctx));
        let (ns, name) = object_id(&slice.metadata);
        out.slice_issues.extend(
            issues
                .into_iter()
                .map(|i| ((ns.to_owned(), name.to_owned()), i)),
        );
    }
    for svc in services {
        let svc = (*svc).borrow();
        let mut issues = Vec::new();
        let mut ctx = Ctx {
            object: format!("Service {}", display_id(&svc.metadata)),
            issues: &mut issues,
        };
        let Some(view) = service_view(svc, &mut ctx) else {
            out.services.push(ServiceOut {
                issues,
                ..Default::default()
            });
            continue;
        };
        let mut local_ready: BTreeSet<(Ipv4Addr, u16)> = BTreeSet::new();
        let mut wanted = Vec::new();
        for port in &view.ports {
            let candidates = port_endpoints(&views, port);
            local_ready.extend(
                candidates
                    .iter()
                    .filter(|(_, ep)| ep.ready && node.is_local(ep))
                    .map(|(b, _)| (b.ip, b.port)),
            );
            let sets = EndpointSets::new(&candidates, node);
            wanted.extend(port_entries(
                &view,
                port,
                &sets,
                nodeport_addresses,
                node.ip,
                &ctx.object,
            ));
        }
        let health_check = view.health_check_node_port.as_ref().map(|(field, port)| {
            (
                field.clone(),
                *port,
                HealthCheck {
                    service: format!("{}/{}", view.namespace, view.name),
                    local_endpoints: local_ready.len(),
                },
            )
        });
        let object = ctx.object;
        out.services.push(ServiceOut {
            issues,
            cluster_ips: view.cluster_ips,
            wanted,
            health_check,
            object,
        });
    }
    out
}

/// Relates the groups (in namespace/name order) to each other: the issues in order, the
/// ClusterIP set, healthCheckNodePort clashes, and who claims each key (see the module docs).
pub(super) fn assemble<'a>(groups: impl Iterator<Item = &'a GroupOut> + Clone) -> Translation {
    let mut slice_issues: Vec<&(GroupKey, Issue)> =
        groups.clone().flat_map(|g| &g.slice_issues).collect();
    slice_issues.sort_by(|a, b| a.0.cmp(&b.0));
    let mut issues: Vec<Issue> = slice_issues.into_iter().map(|(_, i)| i.clone()).collect();
    let mut cluster_ips = BTreeSet::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    let mut wanted: Vec<&Wanted> = Vec::new();
    for svc in groups.flat_map(|g| &g.services) {
        issues.extend(svc.issues.iter().cloned());
        cluster_ips.extend(svc.cluster_ips.iter().copied());
        wanted.extend(&svc.wanted);
        if let Some((field, hc_port, check)) = &svc.health_check {
            match health_checks.get(hc_port) {
                Some(other) => issues.push(Issue {
                    object: svc.object.clone(),
                    field: field.clone(),
                    message: format!(
                        "healthCheckNodePort {hc_port} is already used by {}; no health check \
                         is served for this service",
                        other.service
                    ),
                }),
                None => {
                    health_checks.insert(*hc_port, check.clone());
                }
            }
        }
    }

    // Claim keys kind by kind (stable: services stay in namespace/name order within a kind).
    wanted.sort_by_key(|w| w.kind);
    let mut desired = Desired::new();
    for w in wanted {
        let internal_key = w.key.internal();
        let taken = desired
            .get(&w.key)
            .or_else(|| w.internal.as_ref().and_then(|_| desired.get(&internal_key)));
        if let Some(other) = taken {
            issues.push(Issue {
                object: w.object.clone(),
                field: w.field.clone(),
                message: format!(
                    "{} is already used by {}; this {} entry is skipped",
                    w.key,
                    other.name,
                    w.kind.name()
                ),
            });
            continue;
        }
        desired.insert(w.key, w.external.clone());
        if let Some(internal) = &w.internal {
            desired.insert(internal_key, internal.clone());
        }
    }
    Translation {
        desired,
        issues,
        cluster_ips,
        health_checks,
    }
}

/// [`translate`] that remembers each service group's result and computes a group again only
/// when its objects or the node changed: the agent's translation, where one edit among 10^4
/// services costs one group plus the cheap steps over all of them.
///
/// An object is the same as last time when it is the same allocation (the sources hand out
/// unchanged objects again, shared) or, failing that, equal by value; so a stale result is
/// never served, whatever the caller passes.
/// What of the node a translation depends on: name, zone, NodePort addresses, primary address.
type NodeInputs = (String, Option<String>, Vec<Ipv4Addr>, Option<Ipv4Addr>);

/// Services and EndpointSlices as handed in.
type SharedObjects = (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>);

#[derive(Debug, Default)]
pub struct Translator {
    /// The node the cached results were computed for.
    pub(super) node: Option<NodeInputs>,
    /// The last input, when each kind was strictly in namespace/name order (as the sources
    /// list it): the next input is then compared with it side by side, by pointer, and only
    /// the groups of the objects that differ are regrouped and translated.
    pub(super) last: Option<SharedObjects>,
    pub(super) groups: BTreeMap<GroupKey, CachedGroup>,
    pub(super) stats: TranslatorStats,
    /// The last result, with what it takes to patch it in place.
    pub(super) out: Option<Assembled>,
    /// How the last result differs from the one before (`None` after the first).
    pub(super) delta: Option<Delta>,
}

/// A translation and its claim counts, so a change to groups that share no key with any other
/// group can be patched in without assembling every group again.
#[derive(Debug, Default)]
pub(super) struct Assembled {
    pub(super) t: Translation,
    /// How many entries (external and internal keys) of all groups want each key: 1 for a
    /// key nobody else wants.
    pub(super) wanters: HashMap<ServiceKey, u32>,
    /// How many services list each ClusterIP.
    pub(super) vip_refs: HashMap<Ipv4Addr, u32>,
}

/// What changed between two consecutive results of a [`Translator`]: enough to plan the change
/// without comparing the two desired states entry by entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Every key whose entry was added, removed or changed, with the entry it had before
    /// (`None`: a new key).
    pub old: BTreeMap<ServiceKey, Option<DesiredService>>,
    pub vips_added: BTreeSet<Ipv4Addr>,
    pub vips_removed: BTreeSet<Ipv4Addr>,
}

impl Assembled {
    /// A full assembly of `groups`, with its claim counts.
    fn new<'a>(groups: impl Iterator<Item = &'a GroupOut> + Clone) -> Self {
        let mut a = Assembled {
            t: assemble(groups.clone()),
            ..Default::default()
        };
        for svc in groups.flat_map(|g| &g.services) {
            a.count(svc, true);
        }
        a
    }

    /// Adds (or takes away) one service's claims and ClusterIPs to the counts.
    fn count(&mut self, svc: &ServiceOut, add: bool) {
        fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K, add: bool) {
            if add {
                *m.entry(k).or_default() += 1;
            } else if let Some(n) = m.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&k);
                }
            }
        }
        for w in &svc.wanted {
            bump(&mut self.wanters, w.key, add);
            if w.internal.is_some() {
                bump(&mut self.wanters, w.key.internal(), add);
            }
        }
        for ip in &svc.cluster_ips {
            bump(&mut self.vip_refs, *ip, add);
        }
    }

    /// Replaces the contributions of changed groups (`old` outs by `new` ones) in place, when
    /// that gives what [`assemble`] would: no issue and no health check in either, and no key
    /// of theirs wanted by any other entry (so no claim is contested). `None` (nothing
    /// touched) otherwise.
    fn patch(&mut self, old: &[GroupOut], new: &[&GroupOut]) -> Option<Delta> {
        let plain = |g: &GroupOut| {
            g.slice_issues.is_empty()
                && g.services
                    .iter()
                    .all(|s| s.issues.is_empty() && s.health_check.is_none())
        };
        if !old.iter().all(plain) || !new.iter().all(|g| plain(g)) {
            return None;
        }
        let keys = |gs: &mut dyn Iterator<Item = &GroupOut>| -> HashMap<ServiceKey, u32> {
            let mut m = HashMap::new();
            for w in gs.flat_map(|g| &g.services).flat_map(|s| &s.wanted) {
                *m.entry(w.key).or_default() += 1;
                if w.internal.is_some() {
                    *m.entry(w.key.internal()).or_default() += 1;
                }
            }
            m
        };
        let (was, will) = (keys(&mut old.iter()), keys(&mut new.iter().copied()));
        let contested = was.keys().chain(will.keys()).any(|k| {
            let others = (self.wanters.get(k).copied().unwrap_or(0))
                .saturating_sub(was.get(k).copied().unwrap_or(0));
            // Contested before (its issue is in the list) or after.
            others > 0
                || was.get(k).copied().unwrap_or(0) > 1
                || will.get(k).copied().unwrap_or(0) > 1
        });
        if contested {
            return None;
        }

        let mut delta = Delta::default();
        let vips: BTreeSet<Ipv4Addr> = old
            .iter()
            .chain(new.iter().copied())
            .flat_map(|g| &g.services)
            .flat_map(|s| s.cluster_ips.iter().copied())
            .collect();
        let had: BTreeSet<Ipv4Addr> = vips
            .iter()
            .copied()
            .filter(|ip| self.t.cluster_ips.contains(ip))
            .collect();
        for svc in old.iter().flat_map(|g| &g.services) {
            self.count(svc, false);
            for w in &svc.wanted {
                let keys = [Some(w.key), w.internal.as_ref().map(|_| w.key.internal())];
                for k in keys.into_iter().flatten() {
                    let v = self.t.desired.remove(&k);
                    delta.old.entry(k).or_insert(v);
                }
            }
        }
        for svc in new.iter().flat_map(|g| &g.services) {
            self.count(svc, true);
            for w in &svc.wanted {
                let internal = w.internal.as_ref().map(|i| (w.key.internal(), i));
                for (k, v) in [(w.key, &w.external)].into_iter().chain(internal) {
                    delta.old.entry(k).or_insert(None);
                    self.t.desired.insert(k, v.clone());
                }
            }
        }
        delta.old.retain(|k, v| v.as_ref() != self.t.desired.get(k));
        for ip in vips {
            let has = self.vip_refs.contains_key(&ip);
            match (had.contains(&ip), has) {
                (false, true) => {
                    self.t.cluster_ips.insert(ip);
                    delta.vips_added.insert(ip);
                }
                (true, false) => {
                    self.t.cluster_ips.remove(&ip);
                    delta.vips_removed.insert(ip);
                }
                _ => {}
            }
        }
        Some(delta)
    }
}

/// What changed from `old` to `new`, found by comparing them entry by entry.
pub fn compare(old: &Translation, new: &Translation) -> Delta {
    let mut delta = Delta::default();
    let (mut a, mut b) = (old.desired.iter().peekable(), new.desired.iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((x, _)), Some((y, _))) => x.cmp(y),
        };
        let o = (order != std::cmp::Ordering::Greater)
            .then(|| a.next())
            .flatten();
        let n = (order != std::cmp::Ordering::Less)
            .then(|| b.next())
            .flatten();
        match (o, n) {
            (Some((_, x)), Some((_, y))) if x == y => {}
            (Some((k, x)), _) => {
                delta.old.insert(*k, Some(x.clone()));
            }
            (None, Some((k, _))) => {
                delta.old.insert(*k, None);
            }
            (None, None) => {}
        }
    }
    delta.vips_added = new
        .cluster_ips
        .difference(&old.cluster_ips)
        .copied()
        .collect();
    delta.vips_removed = old
        .cluster_ips
        .difference(&new.cluster_ips)
        .copied()
        .collect();
    delta
}

#[derive(Debug)]
pub(super) struct CachedGroup {
    pub(super) services: Vec<Arc<Service>>,
    pub(super) slices: Vec<Arc<EndpointSlice>>,
    pub(super) out: GroupOut,
}

/// How the last [`Translator::translate`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranslatorStats {
    /// Service groups computed (new or changed).
    pub translated: usize,
    /// Service groups whose result was reused.
    pub reused: usize,
}

/// The same object: the same allocation, or equal.
pub fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same result as [`translate`] of `input`; [`delta`](Self::delta) tells how it
    /// differs from the previous one.
    pub fn translate(
        &mut self,
        input: &Input<'_, Arc<Service>, Arc<EndpointSlice>>,
    ) -> &Translation {
        let previous = self.out.take();
        let (out, delta) = self.translate_inner(input, previous);
        self.delta = delta;
        &self.out.insert(out).t
    }

    /// The last result (empty before the first), and how it differs from the one before
    /// (`None` after the first).
    pub fn output(&self) -> (&Translation, Option<&Delta>) {
        static EMPTY: Translation = Translation {
            desired: BTreeMap::new(),
            issues: Vec::new(),
            cluster_ips: BTreeSet::new(),
            health_checks: BTreeMap::new(),
        };
        (
            self.out.as_ref().map_or(&EMPTY, |o| &o.t),
            self.delta.as_ref(),
        )
    }

    fn translate_inner(
        &mut self,
        input: &Input<'_, Arc<Service>, Arc<EndpointSlice>>,
        previous: Option<Assembled>,
    ) -> (Assembled, Option<Delta>) {
        let node_inputs = (
            input.node_name.to_owned(),
            input.node_zone.map(str::to_owned),
            input.nodeport_addresses.to_vec(),
            input.node_ip,
        );
        if self.node.as_ref() != Some(&node_inputs) {
            self.groups.clear();
            self.last = None;
            self.node = Some(node_inputs);
        }
        let node = NodeView {
            name: input.node_name,
            zone: input.node_zone.filter(|z| !z.is_empty()),
            ip: input.node_ip,
        };
        let last = self.last.take();
        if let Some((services, slices)) = &last
            && let Some(changed) = changed_groups(services, slices, input)
        {
            // `diff_sorted` checked the order around every changed object; the others keep
            // the strict order they had, so the input is strictly sorted too.
            self.last = Some((input.services.to_vec(), input.slices.to_vec()));
            let (keys, old) = self.regroup(&changed, &node, input.nodeport_addresses);
            if let Some(mut prev) = previous {
                let new: Vec<&GroupOut> = keys
                    .iter()
                    .filter_map(|k| self.groups.get(k))
                    .map(|c| &c.out)
                    .collect();
                if let Some(delta) = prev.patch(&old, &new) {
                    return (prev, Some(delta));
                }
                return self.assemble_all(Some(prev));
            }
            return self.assemble_all(None);
        }
        self.last = (strictly_sorted(input.services) && strictly_sorted(input.slices))
            .then(|| (input.services.to_vec(), input.slices.to_vec()));
        let mut stats = TranslatorStats::default();
        // Both in namespace/name order: walked side by side, an unchanged group keeps its key
        // and entry without a lookup or a copy.
        let mut old = std::mem::take(&mut self.groups).into_iter().peekable();
        for ((ns, name), g) in group_objects(input.services, input.slices) {
            // Groups before this one in `old` are gone from the input.
            while old
                .peek()
                .is_some_and(|((ons, oname), _)| (ons.as_str(), oname.as_str()) < (ns, name))
            {
                old.next();
            }
            let (key, cached) = match old
                .next_if(|((ons, oname), _)| (ons.as_str(), oname.as_str()) == (ns, name))
            {
                Some((key, c)) => (key, Some(c)),
                None => ((ns.to_owned(), name.to_owned()), None),
            };
            let cached = cached.filter(|c| {
                c.services.len() == g.services.len()
                    && c.slices.len() == g.slices.len()
                    && c.services.iter().zip(&g.services).all(|(a, b)| same(a, b))
                    && c.slices.iter().zip(&g.slices).all(|(a, b)| same(a, b))
            });
            let entry = match cached {
                Some(mut c) => {
                    stats.reused += 1;
                    // Keep the caller's allocations: next time they compare by pointer.
                    c.services = g.services.iter().map(|s| Arc::clone(s)).collect();
                    c.slices = g.slices.iter().map(|s| Arc::clone(s)).collect();
                    c
                }
                None => {
                    stats.translated += 1;
                    CachedGroup {
                        out: translate_group(
                            &g.services,
                            &g.slices,
                            &node,
                            input.nodeport_addresses,
                        ),
                        services: g.services.iter().map(|s| Arc::clone(s)).collect(),
                        slices: g.slices.iter().map(|s| Arc::clone(s)).collect(),
                    }
                }
            };
            self.groups.insert(key, entry);
        }
        self.stats = stats;
        self.assemble_all(previous)
    }

    /// Every group assembled afresh, and what changed since `previous`.
    fn assemble_all(&self, previous: Option<Assembled>) -> (Assembled, Option<Delta>) {
        let out = Assembled::new(self.groups.values().map(|c| &c.out));
        let delta = previous.map(|p| compare(&p.t, &out.t));
        (out, delta)
    }

    /// How the last translation went.
    pub fn stats(&self) -> TranslatorStats {
        self.stats
    }

    /// Rebuilds and translates the groups `changed` names, from their cached members and the
    /// changed objects; the other groups are kept as they are. Returns the groups' keys and
    /// their results before.
    fn regroup(
        &mut self,
        changed: &Changed,
        node: &NodeView,
        nodeport_addresses: &[Ipv4Addr],
    ) -> (BTreeSet<GroupKey>, Vec<GroupOut>) {
        let mut old = Vec::new();
        let mut keys: BTreeSet<GroupKey> = BTreeSet::new();
        keys.extend(
            changed
                .services
                .iter()
                .flat_map(|(o, n)| [o, n])
                .flatten()
                .map(|s| owned(object_id(&s.metadata))),
        );
        keys.extend(
            changed
                .slices
                .iter()
                .flat_map(|(o, n)| [o, n])
                .flatten()
                .filter_map(|s| slice_group(s).map(owned)),
        );
        for key in &keys {
            let (mut services, mut slices) = match self.groups.remove(key) {
                Some(c) => {
                    old.push(c.out);
                    (c.services, c.slices)
                }
                None => Default::default(),
            };
            merge_members(&mut services, &changed.services, |s| {
                Some(owned(object_id(&s.metadata))) == Some(key.clone())
            });
            merge_members(&mut slices, &changed.slices, |s| {
                slice_group(s).map(owned).as_ref() == Some(key)
            });
            if services.is_empty() && slices.is_empty() {
                continue;
            }
            let out = translate_group(
                &services.iter().collect::<Vec<_>>(),
                &slices.iter().collect::<Vec<_>>(),
                node,
                nodeport_addresses,
            );
            self.groups.insert(
                key.clone(),
                CachedGroup {
                    services,
                    slices,
                    out,
                },
            );
        }
        self.stats = TranslatorStats {
            translated: keys.len(),
            reused: self.groups.len().saturating_sub(keys.len()),
        };
        (keys, old)
    }
}

fn owned((ns, name): (&str, &str)) -> GroupKey {
    (ns.to_owned(), name.to_owned())
}

/// The group an EndpointSlice belongs to (see [`group_objects`]), if any.
fn slice_group(s: &EndpointSlice) -> Option<(&str, &str)> {
    let service = s
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .filter(|n| !n.is_empty())?;
    (s.address_type == ADDRESS_TYPE_IPV4).then(|| (namespace(&s.metadata), service.as_str()))
}

/// Whether no two objects share or disorder a namespace/name.
pub(crate) fn strictly_sorted<T: Metadata<Ty = ObjectMeta>>(objects: &[Arc<T>]) -> bool {
    objects
        .windows(2)
        .all(|w| object_id(w[0].metadata()) < object_id(w[1].metadata()))
}

/// The objects that differ between two inputs: (old, new) pairs, `None` on the side where the
/// object is absent.
pub(crate) type Diff<T> = Vec<(Option<Arc<T>>, Option<Arc<T>>)>;

struct Changed {
    services: Diff<Service>,
    slices: Diff<EndpointSlice>,
}

/// `input` against the last (strictly sorted) input, or `None` when the input is not strictly
/// sorted where it changed, or changed so much that grouping it all is as cheap.
fn changed_groups(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    input: &Input<'_, Arc<Service>, Arc<EndpointSlice>>,
) -> Option<Changed> {
    let changed = Changed {
        services: diff_sorted(services, input.services)?,
        slices: diff_sorted(slices, input.slices)?,
    };
    (changed.services.len() + changed.slices.len() <= (services.len() + slices.len()) / 8 + 16)
        .then_some(changed)
}

/// Walks two inputs side by side: the same allocation at the same place is unchanged and costs
/// one pointer comparison; anything else is placed by namespace/name. `None` when `new` is not
/// strictly sorted around an object that changed (unchanged neighbours keep the order they had).
pub(crate) fn diff_sorted<T: Metadata<Ty = ObjectMeta> + PartialEq>(
    old: &[Arc<T>],
    new: &[Arc<T>],
) -> Option<Diff<T>> {
    fn id<T: Metadata<Ty = ObjectMeta>>(o: &Arc<T>) -> (&str, &str) {
        object_id(o.metadata())
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    let in_order = |j: usize| {
        (j == 0 || id(&new[j - 1]) < id(&new[j]))
            && new.get(j + 1).is_none_or(|n| id(&new[j]) < id(n))
    };
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {
                i += 1;
                j += 1;
                continue;
            }
            (Some(o), Some(n)) => id(o).cmp(&id(n)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        let o = (order != std::cmp::Ordering::Greater).then(|| {
            i += 1;
            old[i - 1].clone()
        });
        let n = if order == std::cmp::Ordering::Less {
            None
        } else {
            if !in_order(j) {
                return None;
            }
            j += 1;
            Some(new[j - 1].clone())
        };
        // Equal by value after all (a copy of an unchanged object): nothing to do.
        if let (Some(a), Some(b)) = (&o, &n)
            && **a == **b
        {
            continue;
        }
        out.push((o, n));
    }
    Some(out)
}

/// A group's members after `diff`: the old objects of the group leave, the new ones join,
/// kept in namespace/name order.
fn merge_members<T: Metadata<Ty = ObjectMeta>>(
    members: &mut Vec<Arc<T>>,
    diff: &Diff<T>,
    of_group: impl Fn(&T) -> bool,
) {
    for (o, n) in diff {
        if let Some(o) = o {
            members.retain(|m| {
                !Arc::ptr_eq(m, o) && object_id(m.metadata()) != object_id(o.metadata())
            });
        }
        if let Some(n) = n.as_ref().filter(|n| of_group(n)) {
            let at = members.partition_point(|m| object_id(m.metadata()) < object_id(n.metadata()));
            members.insert(at, n.clone());
        }
    }
}
