//! Applying a plan: the [`MapWriter`] the datapath implements, [`apply_plan`] keeping the
//! model exact at every step, and [`MemMaps`], an in-memory writer for tests and `trace`.
use super::*;
/// Writes to the maps. Slots and service entries both go through
/// `put_service`/`delete_service`. Deleting a key that is not there is `Ok`.
///
/// The ClusterIP and source-range methods have default implementations that fail with
/// [`ExtWriteError::Unsupported`], so writers written before those maps existed keep
/// compiling (and fail loudly, never silently, when a plan needs them). Their error type is
/// [`ExtWriteError`] because a default cannot build a `Self::Error`; a writer's own error
/// goes in [`ExtWriteError::Map`] (`?` converts it), and [`apply_plan`] unwraps it again so
/// [`ApplyError::source`] is the writer's error type either way.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Self::Error>;
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Self::Error>;
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// `put_backend` for each entry, in order: one batch syscall where the writer has one.
    /// On failure, how many were written before it.
    fn put_backends(&mut self, entries: &[(u32, Backend4)]) -> Result<(), (usize, Self::Error)> {
        for (i, (id, b)) in entries.iter().enumerate() {
            self.put_backend(*id, b).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// `put_service` for each entry, in order (see `put_backends`).
    fn put_services(
        &mut self,
        entries: &[(Svc4Key, Svc4Value)],
    ) -> Result<(), (usize, Self::Error)> {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.put_service(k, v).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// `LB4_VIP_V1[addr_be] = v`.
    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = (addr_be, v);
        Err(ExtWriteError::Unsupported { op: "put_vip" })
    }
    /// Removes `LB4_VIP_V1[addr_be]`.
    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = addr_be;
        Err(ExtWriteError::Unsupported { op: "delete_vip" })
    }
    /// `LB4_SRC_V2[k] = 1`.
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = k;
        Err(ExtWriteError::Unsupported {
            op: "put_src_range",
        })
    }
    /// Zeroes the per-service counters of `svc_id` (`LB4_SCNT_V1`), before the ID is
    /// published. Writers without a counter map (in-memory ones) have nothing to reset.
    fn reset_service_counter(&mut self, svc_id: u32) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = svc_id;
        Ok(())
    }
    /// Removes `LB4_SRC_V2[k]`.
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = k;
        Err(ExtWriteError::Unsupported {
            op: "delete_src_range",
        })
    }
}

/// The error of the [`MapWriter`] methods that have a default implementation.
#[derive(Debug, thiserror::Error)]
pub enum ExtWriteError<E> {
    /// The writer's own error.
    #[error(transparent)]
    Map(#[from] E),
    /// The writer does not implement this method.
    #[error(
        "this map writer does not implement {op}; it needs the ClusterIP and source-range maps \
         (LB4_VIP_V1, LB4_SRC_V2)"
    )]
    Unsupported { op: &'static str },
}

impl<E: std::error::Error + Send + Sync + 'static> ExtWriteError<E> {
    /// The writer's error as itself, so callers can match it by type.
    pub(super) fn boxed(self) -> Box<dyn std::error::Error + Send + Sync> {
        match self {
            ExtWriteError::Map(e) => Box::new(e),
            other => Box::new(other),
        }
    }
}

/// How many writes of each kind [`apply_plan`] made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub put_backends: usize,
    pub put_slots: usize,
    pub put_services: usize,
    pub delete_slots: usize,
    pub delete_services: usize,
    pub delete_backends: usize,
    pub put_vips: usize,
    pub delete_vips: usize,
    pub put_src_ranges: usize,
    pub delete_src_ranges: usize,
}

impl ApplyStats {
    pub fn total(&self) -> usize {
        self.put_backends
            + self.put_slots
            + self.put_services
            + self.delete_slots
            + self.delete_services
            + self.delete_backends
            + self.put_vips
            + self.delete_vips
            + self.put_src_ranges
            + self.delete_src_ranges
    }

    pub(super) fn count(&mut self, op: &Op) {
        match op {
            Op::PutBackend { .. } => self.put_backends += 1,
            Op::PutSlot { .. } => self.put_slots += 1,
            Op::PutService { .. } => self.put_services += 1,
            Op::DeleteSlot { .. } => self.delete_slots += 1,
            Op::DeleteService { .. } => self.delete_services += 1,
            Op::DeleteBackend { .. } => self.delete_backends += 1,
            Op::PutVip { .. } => self.put_vips += 1,
            Op::DeleteVip { .. } => self.delete_vips += 1,
            Op::PutSrcRange { .. } => self.put_src_ranges += 1,
            Op::DeleteSrcRange { .. } => self.delete_src_ranges += 1,
        }
    }
}

/// A map write failed. The writes before it were made and recorded in the state, so the next
/// plan starts from the truth; nothing after it was attempted.
#[derive(Debug, thiserror::Error)]
#[error(
    "BPF map update {} of {total} failed ({op}); the {index} before it were applied and the next sync retries the rest",
    index + 1
)]
pub struct ApplyError {
    /// 0-based position of the failed op in the plan.
    pub index: usize,
    pub total: usize,
    pub op: Op,
    /// The writes made before the failure.
    pub applied: ApplyStats,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Performs the plan's writes in order, recording each successful one in `state`. Stops at
/// the first failure.
#[expect(
    clippy::result_large_err,
    reason = "the error is built once per failed sync and read whole by the caller"
)]
pub fn apply_plan<W: MapWriter>(
    state: &mut MapState,
    plan: &Plan,
    w: &mut W,
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    // Before any entry publishes a new ID: a new service never inherits a predecessor's counts.
    for id in fresh_service_ids(state, plan) {
        if let Err(e) = w.reset_service_counter(id) {
            // Counters only: programming the service matters more than its statistics.
            log::warn!("could not zero the packet counters of service ID {id}: {e}");
        }
    }
    let ops = &plan.ops;
    let mut index = 0;
    while index < ops.len() {
        // A run of puts into one map goes in one batch, written in the plan's order (what a
        // reader can observe is the same as one write at a time).
        let run = put_run(&ops[index..]);
        let (done, result) = if run > 1 {
            put_batch(w, &ops[index..index + run])
        } else {
            let r = apply_one(w, &ops[index]);
            (usize::from(r.is_ok()), r)
        };
        for op in &ops[index..index + done] {
            state.apply(op);
            stats.count(op);
        }
        index += done;
        if let Err(e) = result {
            return Err(ApplyError {
                index,
                total: ops.len(),
                op: ops[index],
                applied: stats,
                source: e.boxed(),
            });
        }
    }
    Ok(stats)
}

/// How many ops from the start of `ops` are puts into the same map (backends, or service
/// entries: slots and headers alike). 0 or 1 means no run.
fn put_run(ops: &[Op]) -> usize {
    let kind = |op: &Op| match op {
        Op::PutBackend { .. } => 1,
        Op::PutSlot { .. } | Op::PutService { .. } => 2,
        _ => 0,
    };
    match ops.first().map(kind) {
        Some(k) if k != 0 => ops.iter().take_while(|op| kind(op) == k).count(),
        _ => 0,
    }
}

/// Writes a run of puts (see [`put_run`]): how many were written, and the error that stopped
/// it, if any.
fn put_batch<W: MapWriter>(w: &mut W, run: &[Op]) -> (usize, Result<(), ExtWriteError<W::Error>>) {
    let result = if let Op::PutBackend { .. } = run[0] {
        let entries: Vec<(u32, Backend4)> = run
            .iter()
            .filter_map(|op| match op {
                Op::PutBackend { id, backend } => Some((*id, *backend)),
                _ => None,
            })
            .collect();
        w.put_backends(&entries)
    } else {
        let entries: Vec<(Svc4Key, Svc4Value)> = run
            .iter()
            .filter_map(|op| match op {
                Op::PutSlot { key, value } | Op::PutService { key, value } => Some((*key, *value)),
                _ => None,
            })
            .collect();
        w.put_services(&entries)
    };
    match result {
        Ok(()) => (run.len(), Ok(())),
        Err((done, e)) => (done, Err(ExtWriteError::Map(e))),
    }
}

/// One op's write.
fn apply_one<W: MapWriter>(w: &mut W, op: &Op) -> Result<(), ExtWriteError<W::Error>> {
    match op {
        Op::PutBackend { id, backend } => w.put_backend(*id, backend).map_err(ExtWriteError::Map),
        Op::PutSlot { key, value } | Op::PutService { key, value } => {
            w.put_service(key, value).map_err(ExtWriteError::Map)
        }
        Op::DeleteSlot { key } | Op::DeleteService { key } => {
            w.delete_service(key).map_err(ExtWriteError::Map)
        }
        Op::DeleteBackend { id } => w.delete_backend(*id).map_err(ExtWriteError::Map),
        Op::PutVip { addr_be, value } => w.put_vip(*addr_be, value),
        Op::DeleteVip { addr_be } => w.delete_vip(*addr_be),
        Op::PutSrcRange { key } => w.put_src_range(key),
        Op::DeleteSrcRange { key } => w.delete_src_range(key),
    }
}

/// The service IDs `plan` publishes that no entry of `state` uses yet (new or reused IDs),
/// in order: their per-service counters must start from zero.
pub fn fresh_service_ids(state: &MapState, plan: &Plan) -> Vec<u32> {
    let mut seen = HashSet::new();
    plan.ops
        .iter()
        .filter_map(|op| match op {
            Op::PutService { value, .. } => Some(value.svc_id),
            _ => None,
        })
        .filter(|id| !state.svc_id_used(*id) && seen.insert(*id))
        .collect()
}

/// In-memory maps, for tests and dry runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemMaps {
    pub services: BTreeMap<Svc4Key, Svc4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub vips: BTreeMap<u32, VipValue>,
    pub src_ranges: HashMap<SrcRange4Key, u8>,
}

impl MemMaps {
    /// The model of these maps, as an agent restarting on them would build it.
    pub fn state(&self) -> (MapState, Vec<String>) {
        MapState::from_maps(
            self.services.iter().map(|(k, v)| (*k, *v)),
            self.backends.iter().map(|(k, v)| (*k, *v)),
            self.vips.iter().map(|(k, v)| (*k, *v)),
            self.src_ranges.iter().map(|(k, v)| (*k, *v)),
        )
    }

    /// Every service entry a reader cannot use as flagged, as messages: slots `1..=count`
    /// that do not all lead to an existing backend, or `TWO_SCOPES` without the internal
    /// entry. Empty when a reader can use every service.
    pub fn broken_services(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            if k.scope == scope::EXTERNAL
                && v.flags & svc_flags::TWO_SCOPES != 0
                && !self.services.contains_key(&k.with_scope(scope::INTERNAL))
            {
                out.push(format!(
                    "{}: TWO_SCOPES without its internal entry",
                    fmt_key(k)
                ));
            }
            for s in 1..=v.count {
                match self.services.get(&Svc4Key { slot: s, ..*k }) {
                    None => out.push(format!("{}: slot {s} of {} missing", fmt_key(k), v.count)),
                    Some(sv) if !self.backends.contains_key(&sv.backend_id) => {
                        out.push(format!(
                            "{}: slot {s} -> missing backend {}",
                            fmt_key(k),
                            sv.backend_id
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        out
    }
}

impl MapWriter for MemMaps {
    type Error = Infallible;

    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Infallible> {
        self.backends.insert(id, *b);
        Ok(())
    }

    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Infallible> {
        self.services.insert(*k, *v);
        Ok(())
    }

    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Infallible> {
        self.services.remove(k);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.backends.remove(&id);
        Ok(())
    }

    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<Infallible>> {
        self.vips.insert(addr_be, *v);
        Ok(())
    }

    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<Infallible>> {
        self.vips.remove(&addr_be);
        Ok(())
    }

    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.src_ranges.insert(*k, SRC_RANGE_ALLOWED);
        Ok(())
    }

    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.src_ranges.remove(k);
        Ok(())
    }
}
