//! Network programming latency: the EndpointSlice trigger-time annotations of each snapshot
//! (from either source), reported once the change they carry has been written to the maps.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The annotation the EndpointSlice controller sets to the time of the change (pod or
/// Service) that made it write the slice.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Network programming latency the way kube-proxy measures it
/// (`kubeproxy_network_programming_duration_seconds`, `pkg/proxy/endpointschangetracker.go`):
/// from an EndpointSlice's [`LAST_CHANGE_TRIGGER_TIME`] to the moment a reconciliation that
/// includes the change has written the maps. As in kube-proxy, only EndpointSlice changes
/// carry trigger times (Service changes do not); trigger times from before the agent started
/// are ignored (a restart would otherwise report hours); a deleted slice drops the pending
/// times of its service (its annotation dates from its last update, not from the deletion).
///
/// Snapshots fold the changes of one debounce interval (after a snapshot), so a slice rewritten
/// twice within it reports the later trigger time only. Each trigger time is reported once: a slice whose
/// annotation did not change (a relist, a resync, another field changed) adds nothing.
#[derive(Debug)]
pub struct TriggerTimes {
    start: SystemTime,
    /// Trigger-time annotation of each slice in the last snapshot: (namespace, name) ->
    /// (service, annotation).
    seen: HashMap<(String, String), (String, Option<String>)>,
    /// Not yet programmed: (namespace, service) -> trigger times.
    pending: BTreeMap<(String, String), Vec<SystemTime>>,
    /// The slices last noted by [`note_shared`](Self::note_shared), when strictly sorted by
    /// namespace/name: the next call then visits only the slices that differ.
    last: Option<Vec<Arc<EndpointSlice>>>,
}

impl TriggerTimes {
    /// Trigger times before `start` (the agent's start) are ignored.
    pub fn new(start: SystemTime) -> Self {
        Self {
            start,
            seen: HashMap::new(),
            pending: BTreeMap::new(),
            last: None,
        }
    }

    /// [`note`](Self::note) for the slices of a source, which lists them sorted and hands
    /// unchanged ones out again as the same allocation: only the slices that differ from the
    /// last call are visited.
    pub fn note_shared(&mut self, slices: &[Arc<EndpointSlice>]) {
        use crate::translate::{diff_sorted, strictly_sorted};
        let diff = self.last.as_deref().and_then(|l| diff_sorted(l, slices));
        let walked = diff.is_some();
        match diff {
            Some(diff) => {
                for (old, new) in diff {
                    match new {
                        Some(n) => self.note_one(&n),
                        None => {
                            if let Some(o) = old {
                                self.forget(&id(&o));
                            }
                        }
                    }
                }
            }
            None => self.note(slices),
        }
        // Sorted where it changed and unchanged elsewhere: still strictly sorted.
        self.last = (walked || strictly_sorted(slices)).then(|| slices.to_vec());
    }

    /// One slice of a snapshot, new or changed.
    fn note_one(&mut self, s: &EndpointSlice) {
        let key = id(s);
        let Some(svc) = service_of(s) else {
            // No longer used (kube-proxy keys trigger times by service).
            self.forget(&key);
            return;
        };
        let ann = annotation(s);
        let changed = self.seen.get(&key).is_none_or(|(_, old)| *old != ann);
        if changed
            && let Some(t) = ann.as_deref().and_then(parse_trigger_time)
            && t > self.start
        {
            self.pending
                .entry((key.0.clone(), svc.clone()))
                .or_default()
                .push(t);
        }
        self.seen.insert(key, (svc, ann));
    }

    /// A slice left the snapshot: its service's pending times go with it.
    fn forget(&mut self, key: &(String, String)) {
        if let Some((svc, _)) = self.seen.remove(key) {
            self.pending.remove(&(key.0.clone(), svc));
        }
    }

    /// Notes the slices of a snapshot that is about to be reconciled.
    pub fn note<S: std::borrow::Borrow<EndpointSlice>>(&mut self, slices: &[S]) {
        let mut present = std::collections::HashSet::with_capacity(slices.len());
        for s in slices {
            let s = s.borrow();
            present.insert(id(s));
            self.note_one(s);
        }
        let gone: Vec<(String, String)> = self
            .seen
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.forget(&k);
        }
        // A list not handed in by `note_shared` is no base to walk against.
        self.last = None;
    }

    /// The reconciliation of the last noted snapshot wrote the maps: the trigger times it
    /// programmed, each returned once. After a failed one, call nothing: the times stay
    /// pending until a reconciliation succeeds.
    pub fn programmed(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.pending)
            .into_values()
            .flatten()
            .collect()
    }
}

/// A slice's namespace and name.
fn id(s: &EndpointSlice) -> (String, String) {
    (
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

/// The service a slice belongs to (its `kubernetes.io/service-name` label), if any.
fn service_of(s: &EndpointSlice) -> Option<String> {
    s.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .filter(|v| !v.is_empty())
        .cloned()
}

fn annotation(s: &EndpointSlice) -> Option<String> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
        .cloned()
}

/// RFC 3339 (the controller writes nanoseconds); `None` for anything else.
fn parse_trigger_time(s: &str) -> Option<SystemTime> {
    let t = k8s_openapi::chrono::DateTime::parse_from_rfc3339(s).ok()?;
    let nanos = t.timestamp_nanos_opt()?;
    let d = Duration::from_nanos(u64::try_from(nanos).ok()?);
    Some(SystemTime::UNIX_EPOCH + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger_slice(name: &str, svc: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": []
        });
        if let Some(t) = trigger {
            v["metadata"]["annotations"] = serde_json::json!({LAST_CHANGE_TRIGGER_TIME: t});
        }
        serde_json::from_value(v).expect("slice")
    }

    #[test]
    fn trigger_times_once_per_change_and_only_once_programmed() {
        // Both ways of noting: every slice, and only those that differ from the last call.
        check_trigger_times(|tt, s| tt.note(&s));
        check_trigger_times(|tt, s| {
            let shared: Vec<Arc<EndpointSlice>> = s.into_iter().map(Arc::new).collect();
            tt.note_shared(&shared)
        });
    }

    fn check_trigger_times(note: impl Fn(&mut TriggerTimes, Vec<EndpointSlice>)) {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        // The agent started at 1000 s.
        let mut tt = TriggerTimes::new(at(1000));
        let before = "1970-01-01T00:15:00Z"; // 900 s: before the start
        let t1 = "1970-01-01T00:16:41.5Z"; // 1001.5 s
        let t2 = "1970-01-01T00:16:42Z";
        note(
            &mut tt,
            vec![
                trigger_slice("a-1", "a", Some(before)),
                trigger_slice("b-1", "b", None),
                trigger_slice("c-1", "c", Some("not a time")),
            ],
        );
        assert!(tt.programmed().is_empty(), "nothing after the start yet");

        note(
            &mut tt,
            vec![
                trigger_slice("a-1", "a", Some(t1)),
                trigger_slice("b-1", "b", None),
            ],
        );
        // The reconciliation failed: nothing observed, the time stays pending; the retry
        // snapshot holds the same slices.
        note(
            &mut tt,
            vec![
                trigger_slice("a-1", "a", Some(t1)),
                trigger_slice("b-1", "b", None),
            ],
        );
        assert_eq!(
            tt.programmed(),
            vec![SystemTime::UNIX_EPOCH + Duration::from_millis(1_001_500)],
            "once, after the successful reconciliation"
        );
        note(
            &mut tt,
            vec![
                trigger_slice("a-1", "a", Some(t1)),
                trigger_slice("b-1", "b", None),
            ],
        );
        assert!(
            tt.programmed().is_empty(),
            "an unchanged annotation is not a change"
        );

        // A change, then the slice is deleted before it was programmed: dropped.
        note(
            &mut tt,
            vec![
                trigger_slice("a-1", "a", Some(t2)),
                trigger_slice("b-1", "b", Some(t2)),
            ],
        );
        note(&mut tt, vec![trigger_slice("b-1", "b", Some(t2))]);
        assert_eq!(tt.programmed(), vec![at(1002)], "only b's");
        // Slices without a service label are not tracked.
        let mut orphan = trigger_slice("x", "x", Some(t2));
        orphan.metadata.labels = None;
        note(&mut tt, vec![orphan]);
        assert!(tt.programmed().is_empty());
    }
}
