//! Planning: what the service and backend maps hold + what they should hold -> the ordered map
//! writes that get from one to the other without a reader ever seeing a broken service.
//!
//! [`MapState`] mirrors the maps exactly, entry by entry, including entries that do not fit the
//! model (left over by a crash, an older agent, or a plan that stopped half way). That is what
//! lets [`plan`] compare every entry it wants with the entry that is there, write only the
//! differences, and delete everything else; and lets [`apply_plan`] stop at any error with the
//! model still describing the maps.
//!
//! [`plan_changes`] is the same plan for a model that holds exactly what the last plan
//! brought it to, given the keys and backends that changed since: it visits only those
//! (backends shared between services are reference counted in [`BackendRefs`], IDs in use
//! are answered by `MapState`'s indexes) and writes the same maps as [`plan`], which stays the
//! reference (`sync::Reconciler` falls back to it, and a test compares the two).
//!
//! Besides the service and backend maps it plans the ClusterIP set (`LB4_VIP_V1`: every
//! ClusterIP, so a hit on an unused port is rejected) and the loadBalancerSourceRanges trie
//! (`LB4_SRC_V2`, keyed by the service ID of the EXTERNAL entry carrying
//! `svc_flags::SOURCE_RANGES`).
//!
//! Ordering (make before break): new backends, then new source ranges, then slots, then
//! service entries (so a count only grows after its slots exist and only shrinks after the
//! slots below it are final; a `SOURCE_RANGES` flag only appears once its ranges exist; and
//! INTERNAL-scope entries before EXTERNAL ones, so `TWO_SCOPES` never points at a missing
//! twin), then new ClusterIPs, then slots above the new counts, then removed services (entry
//! first, so the count disappears before its slots), then source ranges no entry uses any
//! more, then removed ClusterIPs, then unreferenced backends (a backend listed in some entry's
//! `DesiredService::terminating` counts as referenced, so a draining endpoint's established
//! flows keep their backend until it stops serving or vanishes). At every step, each slot
//! `1..=count` of every service entry points at an existing backend, and every EXTERNAL entry
//! with `TWO_SCOPES` has its INTERNAL twin. While a service's ranges change, old and new ones
//! are both allowed for a moment (never neither).
//!
//! IDs: backend IDs are shared by every service slot leading to the same address, start at 1,
//! and are not reused within a run (a flow tracked with a deleted backend's ID never lands on a
//! new backend). A service keeps its ID for its life. Both allocators skip IDs in use, so they
//! stay correct should they ever wrap.
//!
//! Slot layout: a backend that stays keeps its slot when it can; removed backends' slots are
//! refilled with new ones, then with backends from above the new count. That keeps writes
//! proportional to the change (one endpoint replaced in a 1000-endpoint service is one slot
//! write) instead of shifting every slot after a removal. The datapath picks slots uniformly,
//! so the order of backends in slots carries no meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::net::Ipv4Addr;

use proxy_common::{
    Backend4, SrcRange4Key, Svc4Key, Svc4Value, VipValue, backend_flags, scope, sizes, svc_flags,
    vip_flags,
};

use crate::abi::{self, Protocol};
use crate::translate::{BackendAddr, Desired, DesiredService, ServiceKey};

mod apply;
mod capacity;
mod diff;
mod entries;
mod state;

// The room's API is flat (`plan::plan`, `plan::MapState`, ...); the files split it by
// concern. The globs also give the files each other's `pub(super)` items.
pub use apply::*;
pub use capacity::*;
pub use diff::*;
pub use entries::*;
pub use state::*;

#[cfg(test)]
mod tests;
