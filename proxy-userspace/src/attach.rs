//! Keeping the pod programs attached to every port of the pod bridge.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::programs::{TcAttachType, tc::SchedClassifierLinkId};
use log::{info, warn};
use proxy_common::programs;

use crate::{datapath::Datapath, netlink::Iface};

/// The links we hold, per bridge port. Dropping a link id's owner (the program) detaches.
#[derive(Default)]
pub struct Attachments {
    ports: BTreeMap<Iface, [SchedClassifierLinkId; 2]>,
}

impl Attachments {
    pub fn ports(&self) -> impl Iterator<Item = &Iface> {
        self.ports.keys()
    }

    /// Attaches to new ports and forgets vanished ones (the kernel already removed their
    /// links with the device). Errors on one port are logged; the others still get attached.
    pub fn sync(&mut self, dp: &mut Datapath, current: &[Iface]) -> usize {
        let gone: Vec<Iface> = self
            .ports
            .keys()
            .filter(|p| !current.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(ids) = self.ports.remove(&p) {
                for (name, id) in [programs::POD_INGRESS, programs::POD_EGRESS]
                    .into_iter()
                    .zip(ids)
                {
                    // Taking the link out and dropping it releases our reference; the
                    // device is gone, so there is nothing left to detach.
                    if let Ok(prog) = dp.program_mut(name) {
                        let _ = prog.take_link(id);
                    }
                }
                info!("bridge port {} (ifindex {}) is gone", p.name, p.index);
            }
        }
        let mut attached = 0;
        for p in current {
            if self.ports.contains_key(p) {
                continue;
            }
            match attach_port(dp, p) {
                Ok(ids) => {
                    info!(
                        "attached {} and {} to bridge port {}",
                        programs::POD_INGRESS,
                        programs::POD_EGRESS,
                        p.name
                    );
                    self.ports.insert(p.clone(), ids);
                    attached += 1;
                }
                Err(e) => warn!("bridge port {}: {e:#}", p.name),
            }
        }
        attached
    }
}

fn attach_port(dp: &mut Datapath, p: &Iface) -> Result<[SchedClassifierLinkId; 2]> {
    let ing = dp
        .program_mut(programs::POD_INGRESS)?
        .attach(&p.name, TcAttachType::Ingress)
        .with_context(|| {
            format!(
                "attaching {} to tc ingress of {}",
                programs::POD_INGRESS,
                p.name
            )
        })?;
    let eg = match dp
        .program_mut(programs::POD_EGRESS)?
        .attach(&p.name, TcAttachType::Egress)
    {
        Ok(id) => id,
        Err(e) => {
            // Keep the pair consistent: half a datapath would translate one direction only.
            let _ = dp.program_mut(programs::POD_INGRESS)?.detach(ing);
            return Err(e).with_context(|| {
                format!(
                    "attaching {} to tc egress of {}",
                    programs::POD_EGRESS,
                    p.name
                )
            });
        }
    };
    Ok([ing, eg])
}
