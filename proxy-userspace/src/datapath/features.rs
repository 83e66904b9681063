//! Kernel features the datapath uses, probed at start: one log line per missing feature naming
//! what it costs (see docs/kernels.md). tc helpers are probed by loading a tiny program
//! (aya's `is_helper_supported`); what cannot be probed that way (TCX, XDP links, the
//! `sock_addr` hooks and their helpers, which need an attach type to load) goes by kernel
//! version, the same rule aya applies to TCX. Distribution kernels with backports (RHEL) may
//! have more than their version says.
use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
    util::KernelVersion,
};

/// One feature: its name, the kernel that brought it, and what its absence costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub since: (u32, u32),
    pub cost: &'static str,
}

/// Every feature we check, oldest first. The tc helpers marked `probe` are also probed.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "bpf_fib_lookup",
        since: (4, 18),
        cost: "none of the tc programs load: ebpf-proxy cannot run",
    },
    Feature {
        name: "bpf_redirect_neigh",
        since: (5, 10),
        cost: "none of the tc programs load: ebpf-proxy cannot run",
    },
    Feature {
        name: "recvmsg4/getpeername4 hooks",
        since: (5, 8),
        cost: "socket-level balancing (--socket-lb) cannot attach: use --socket-lb=off",
    },
    Feature {
        name: "bpf_get_netns_cookie in sock_addr",
        since: (5, 7),
        cost: "the socket programs do not load: use --socket-lb=off (pods and host use tc)",
    },
    Feature {
        name: "xdp bpf_link",
        since: (5, 9),
        cost: "no XDP fast path on the uplinks (tc ingress does everything)",
    },
    Feature {
        name: "bpf_set_retval",
        since: (5, 18),
        cost: "the socket programs do not load: use --socket-lb=off (pods and host use tc)",
    },
    Feature {
        name: "tcx",
        since: (6, 6),
        cost: "tc programs attached as netlink cls_bpf filters (--tc-attach=auto chooses it; \
               restarts still swap programs atomically)",
    },
];

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    pub kernel: (u32, u32, u32),
    /// Names of the features present.
    pub present: Vec<&'static str>,
}

impl Probed {
    /// Pure: the features of a kernel version, with probe results overriding the version rule
    /// (`overrides`: name and whether it was found).
    pub fn from_version(kernel: (u32, u32, u32), overrides: &[(&str, bool)]) -> Self {
        let present = FEATURES
            .iter()
            .filter(|f| {
                overrides
                    .iter()
                    .find(|(n, _)| *n == f.name)
                    .map_or((kernel.0, kernel.1) >= f.since, |(_, ok)| *ok)
            })
            .map(|f| f.name)
            .collect();
        Self { kernel, present }
    }

    pub fn has(&self, name: &str) -> bool {
        self.present.contains(&name)
    }

    /// The missing features, one line each: what and what it costs.
    pub fn missing(&self) -> Vec<String> {
        FEATURES
            .iter()
            .filter(|f| !self.has(f.name))
            .map(|f| {
                format!(
                    "no {} (kernel {}.{}.{} < {}.{}): {}",
                    f.name,
                    self.kernel.0,
                    self.kernel.1,
                    self.kernel.2,
                    f.since.0,
                    f.since.1,
                    f.cost
                )
            })
            .collect()
    }
}

/// Probes the running kernel.
pub fn probe() -> Probed {
    let v = KernelVersion::current()
        .map(|v| {
            let c = v.code();
            (c >> 16, (c >> 8) & 0xff, c & 0xff)
        })
        .unwrap_or((0, 0, 0));
    let tc = |h: BpfHelper| is_helper_supported(ProgramType::SchedClassifier, h).ok();
    let mut overrides = Vec::new();
    for (name, h) in [
        ("bpf_fib_lookup", BpfHelper::BPF_FUNC_fib_lookup),
        ("bpf_redirect_neigh", BpfHelper::BPF_FUNC_redirect_neigh),
    ] {
        if let Some(ok) = tc(h) {
            overrides.push((name, ok));
        }
    }
    Probed::from_version(v, &overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decide_and_probes_override() {
        let p = Probed::from_version((6, 18, 0), &[]);
        assert!(FEATURES.iter().all(|f| p.has(f.name)));
        assert!(p.missing().is_empty());
        let p = Probed::from_version((5, 15, 0), &[]);
        assert!(!p.has("tcx") && !p.has("bpf_set_retval"));
        assert!(p.has("bpf_redirect_neigh") && p.has("xdp bpf_link"));
        let m = p.missing();
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m.iter().any(|l| l.starts_with(
                "no tcx (kernel 5.15.0 < 6.6): tc programs attached as netlink cls_bpf filters"
            )),
            "{m:?}"
        );
        // RHEL 9 (5.14) backports: a probe finding the helper wins over the version.
        let p = Probed::from_version((5, 14, 0), &[("bpf_redirect_neigh", true)]);
        assert!(p.has("bpf_redirect_neigh"));
        let p = Probed::from_version((6, 1, 0), &[("bpf_fib_lookup", false)]);
        assert!(!p.has("bpf_fib_lookup"));
    }
}
