//! The conntrack tables from userspace: the sweeper that removes expired flows (and so frees
//! their reply tuples and SNAT ports), the listing `inspect` and `/metrics` read, and the
//! migration of an earlier release's table.
//!
//! Two tables hold a flow's two entries: `CT4` (answered flows, a plain hash nothing evicts)
//! and `CT4_NEW` (unanswered, LRU). The datapath never expires anything; the sweeper scans a
//! bounded number of entries per run from where the last run stopped, judges each flow on both
//! of its entries (`conntrack::expired`), re-reads it just before deleting (a packet may have
//! touched it since), and deletes both entries.
use std::{
    borrow::BorrowMut,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{Ct4Key, Ct4Value, ct_flags, maps};

use super::sys;
use crate::conntrack::{State, Timeouts, expired};

/// One conntrack table: typed access, plus its own descriptor for resumable key walks.
pub struct CtTable<T> {
    map: HashMap<T, Ct4Key, Ct4Value>,
    fd: OwnedFd,
}

impl CtTable<MapData> {
    /// Opens a pinned table.
    pub fn from_pin(path: &Path) -> Result<Self, MapError> {
        let md = MapData::from_pin(path)?;
        let fd = dup(&md)?;
        Ok(Self {
            map: HashMap::try_from(Map::HashMap(md))?,
            fd,
        })
    }
}

impl<'a> CtTable<&'a mut MapData> {
    /// A table of a loaded object (hash or LRU hash).
    pub fn from_map(m: &'a mut Map) -> Result<Self, MapError> {
        let fd = match &*m {
            Map::HashMap(md) | Map::LruHashMap(md) => dup(md)?,
            _ => {
                return Err(MapError::InvalidMapType {
                    map_type: 0, // not a hash map; the name is in the caller's error
                });
            }
        };
        Ok(Self {
            map: HashMap::try_from(m)?,
            fd,
        })
    }
}

fn dup(md: &MapData) -> Result<OwnedFd, MapError> {
    md.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
    })
}

impl<T: BorrowMut<MapData>> CtTable<T> {
    pub fn get(&self, k: &Ct4Key) -> Option<Ct4Value> {
        self.map.get(k, 0).ok()
    }

    pub fn remove(&mut self, k: &Ct4Key) -> bool {
        self.map.remove(k).is_ok()
    }

    pub fn insert(&mut self, k: &Ct4Key, v: &Ct4Value, flags: u64) -> Result<(), MapError> {
        self.map.insert(k, v, flags)
    }

    /// Every entry (a full walk: for listings, not for the sweeper).
    pub fn entries(&self) -> Vec<(Ct4Key, Ct4Value)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    /// Up to `max` keys after `after` (`None`: from the start). The second value is true when
    /// the walk reached the end of the table.
    fn keys_after(&self, after: Option<Ct4Key>, max: usize) -> (Vec<Ct4Key>, bool) {
        let mut out = Vec::with_capacity(max.min(4096));
        let mut cur = after;
        while out.len() < max {
            let mut next = Ct4Key::new(0, 0, 0, 0, 0);
            let key_bytes = cur.as_ref().map(as_bytes);
            let more = sys::map_next_key(self.fd.as_fd(), key_bytes, as_bytes_mut(&mut next));
            match more {
                Ok(true) => {
                    out.push(next);
                    cur = Some(next);
                }
                Ok(false) | Err(_) => return (out, true),
            }
        }
        (out, false)
    }
}

fn as_bytes(k: &Ct4Key) -> &[u8] {
    // SAFETY: Ct4Key is repr(C) plain integers with explicit padding (aya::Pod).
    unsafe { core::slice::from_raw_parts((k as *const Ct4Key).cast(), size_of::<Ct4Key>()) }
}

fn as_bytes_mut(k: &mut Ct4Key) -> &mut [u8] {
    // SAFETY: as above; any bit pattern is a valid Ct4Key.
    unsafe { core::slice::from_raw_parts_mut((k as *mut Ct4Key).cast(), size_of::<Ct4Key>()) }
}

/// Both tables of the node.
pub struct CtTables<T> {
    pub answered: CtTable<T>,
    pub new: CtTable<T>,
}

impl CtTables<MapData> {
    /// The pinned tables under `pin_dir` (the sweeper's own descriptors).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            answered: CtTable::from_pin(&pin_dir.join(maps::CT4))?,
            new: CtTable::from_pin(&pin_dir.join(maps::CT4_NEW))?,
        })
    }
}

/// A conntrack entry as listed: which table holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub key: Ct4Key,
    pub value: Ct4Value,
    pub answered: bool,
}

impl<T: BorrowMut<MapData>> CtTables<T> {
    /// A flow entry, answered table first (as the datapath looks).
    pub fn get(&self, k: &Ct4Key) -> Option<(Ct4Value, bool)> {
        self.answered
            .get(k)
            .map(|v| (v, true))
            .or_else(|| self.new.get(k).map(|v| (v, false)))
    }

    /// Every entry of both tables.
    pub fn entries(&self) -> Vec<CtEntry> {
        let a = self
            .answered
            .entries()
            .into_iter()
            .map(|(key, value)| CtEntry {
                key,
                value,
                answered: true,
            });
        let n = self.new.entries().into_iter().map(|(key, value)| CtEntry {
            key,
            value,
            answered: false,
        });
        a.chain(n).collect()
    }

    fn remove_everywhere(&mut self, k: &Ct4Key) {
        self.answered.remove(k);
        self.new.remove(k);
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub scanned: usize,
    /// Flows removed, by the state they expired in.
    pub removed: Vec<(State, u64)>,
    /// Entries whose other half was gone (evicted from the unanswered table's LRU, or a
    /// flow the datapath took over), removed: a half flow cannot be translated both ways.
    pub orphans: u64,
    /// Both tables were walked to their end during this run.
    pub wrapped: bool,
}

impl SweepStats {
    pub fn removed_total(&self) -> u64 {
        self.removed.iter().map(|(_, n)| n).sum()
    }

    fn count(&mut self, s: State) {
        match self.removed.iter_mut().find(|(x, _)| *x == s) {
            Some((_, n)) => *n += 1,
            None => self.removed.push((s, 1)),
        }
    }
}

/// Resumable sweeps over both tables: each run looks at no more than `batch` entries per
/// table, starting where the previous run stopped.
#[derive(Debug, Default)]
pub struct Sweeper {
    cursors: [Option<Ct4Key>; 2],
    pub batch: usize,
}

impl Sweeper {
    pub fn new(batch: usize) -> Self {
        Self {
            cursors: [None, None],
            batch: batch.max(1),
        }
    }

    /// One bounded run at `now_ns` (CLOCK_MONOTONIC).
    pub fn run<T: BorrowMut<MapData>>(
        &mut self,
        ct: &mut CtTables<T>,
        t: &Timeouts,
        now_ns: u64,
    ) -> SweepStats {
        let mut st = SweepStats {
            wrapped: true,
            ..Default::default()
        };
        for (i, answered) in [(0, true), (1, false)] {
            let table = if answered { &ct.answered } else { &ct.new };
            let (keys, end) = table.keys_after(self.cursors[i], self.batch);
            self.cursors[i] = if end { None } else { keys.last().copied() };
            st.wrapped &= end;
            st.scanned += keys.len();
            for k in keys {
                match sweep_one(ct, t, now_ns, &k, answered) {
                    Swept::Expired(s) => st.count(s),
                    Swept::Orphan => st.orphans += 1,
                    Swept::Kept => {}
                }
            }
        }
        st
    }

    /// Runs until every entry has been looked at once (tests, `inspect --sweep`).
    pub fn run_all<T: BorrowMut<MapData>>(
        &mut self,
        ct: &mut CtTables<T>,
        t: &Timeouts,
        now_ns: u64,
    ) -> SweepStats {
        self.cursors = [None, None];
        let mut total = SweepStats::default();
        loop {
            let st = self.run(ct, t, now_ns);
            total.scanned += st.scanned;
            total.orphans += st.orphans;
            for (s, n) in st.removed {
                for _ in 0..n {
                    total.count(s);
                }
            }
            if st.wrapped {
                total.wrapped = true;
                return total;
            }
        }
    }
}

/// An entry alone this long is an orphan, not a flow being created (the datapath inserts a
/// flow's two entries microseconds apart).
const ORPHAN_GRACE_NS: u64 = 1_000_000_000;

enum Swept {
    Kept,
    Expired(State),
    Orphan,
}

/// Judges the flow of the entry at `k` and removes both of its entries if it expired.
fn sweep_one<T: BorrowMut<MapData>>(
    ct: &mut CtTables<T>,
    t: &Timeouts,
    now_ns: u64,
    k: &Ct4Key,
    answered: bool,
) -> Swept {
    let table = if answered { &ct.answered } else { &ct.new };
    let Some(own) = table.get(k) else {
        return Swept::Kept;
    };
    let pk = k.partner(&own);
    // The partner only counts if it points back here (a closed flow's tuple may have been
    // taken over by a new flow).
    let partner = ct.get(&pk).filter(|(pv, _)| pk.partner(pv) == *k);
    if partner.is_none() && now_ns.saturating_sub(own.last_seen_ns) > ORPHAN_GRACE_NS {
        if ct.get(k).map(|(v, _)| v.last_seen_ns) == Some(own.last_seen_ns) {
            ct.remove_everywhere(k);
            return Swept::Orphan;
        }
        return Swept::Kept;
    }
    let Some(state) = expired(
        t,
        now_ns,
        k.proto,
        &own,
        answered,
        partner.as_ref().map(|(v, a)| (v, *a)),
    ) else {
        return Swept::Kept;
    };
    // A packet may have touched the flow since it was read: then it lives on.
    let again = ct.get(k).map(|(v, _)| v.last_seen_ns);
    let partner_again = partner
        .and_then(|_| ct.get(&pk))
        .map(|(v, _)| v.last_seen_ns);
    if again != Some(own.last_seen_ns) || partner_again != partner.map(|(v, _)| v.last_seen_ns) {
        return Swept::Kept;
    }
    ct.remove_everywhere(k);
    if partner.is_some() {
        ct.remove_everywhere(&pk);
    }
    Swept::Expired(state)
}

/// What a migration copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub copied: usize,
    /// Already present in the new tables (copied before, or recreated by the new programs).
    pub present: usize,
    pub failed: usize,
}

/// Copies an earlier release's conntrack table (`maps::CT4_MIGRATE`, same key and value
/// layout) into the answered table, flagged `MIGRATED | ANSWERED`: its TCP state is unknown,
/// so it is treated as established until idle, and nothing evicts it. Entries the new tables
/// already hold are left alone (the new programs' state wins).
pub fn migrate<T: BorrowMut<MapData>>(old: &CtTable<MapData>, into: &mut CtTables<T>) -> Migrated {
    let mut m = Migrated::default();
    for (k, mut v) in old.entries() {
        if into.get(&k).is_some() {
            m.present += 1;
            continue;
        }
        v.flags |= ct_flags::MIGRATED | ct_flags::ANSWERED;
        // BPF_NOEXIST: never overwrite an entry the new programs created meanwhile.
        match into.answered.insert(&k, &v, 1) {
            Ok(()) => m.copied += 1,
            Err(_) if into.get(&k).is_some() => m.present += 1,
            Err(_) => m.failed += 1,
        }
    }
    m
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
