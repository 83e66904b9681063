//! The agent exactly as the shipped DaemonSet runs it, on the lab's nodes: each overlay of
//! `deploy/kubernetes/overlays` rendered with `kubectl kustomize`, its DaemonSet read with the
//! k8s-openapi types, and the container started on each node as a kubelet and container
//! runtime would ([`proxy_lab::daemonset`]): the image's ENTRYPOINT (deploy/Containerfile)
//! with the manifest's args, exactly its environment (`fieldRef spec.nodeName` resolved), its
//! volumes (kubeadm's `kube-proxy` ConfigMap, its kubeconfig's server the lab API server; the
//! service account volume; the node's bpffs and cgroup for the hostPaths; the emptyDir), a
//! read-only root, and only the capabilities the manifest grants. Then: the command line and
//! environment are unchanged, the probes the manifest declares answer 200, the services from
//! the lab API server are programmed, and a pod's ClusterIP connections work.
//!
//! An arg the agent rejects, a volume it cannot do without, a missing capability, or probes
//! on other ports than the agent listens on all fail here. Needs root.
use std::time::Duration;

use proxy_lab::{
    cluster::{API_SERVER_ADDR, CLUSTER_IP, Cluster, DaemonSetAgent, SERVICE_PORT},
    daemonset::{self as ds, ContainerRun},
    lab::{LabSpec, NODES},
};

/// Brings the lab up with agents run as `overlay`'s DaemonSet and checks them.
fn run_overlay(overlay: &str) {
    let root = ds::repo_root();
    let rendered = ds::render_overlay(&root, overlay).expect("kubectl kustomize");
    let daemonset = ds::daemonset_of(&rendered).expect("the DaemonSet");
    let containerfile =
        std::fs::read_to_string(root.join("deploy/Containerfile")).expect("Containerfile");
    let image = ds::image_of(&containerfile).expect("the image's ENTRYPOINT");
    let (ip, port) = API_SERVER_ADDR;
    let kube_proxy = ds::kubeadm_kube_proxy_configmap(
        &root.join("proxy-userspace/tests/data/kubeadm"),
        &format!("http://{ip}:{port}"),
    )
    .expect("kubeadm's kube-proxy ConfigMap");
    let container = &daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0];
    let manifest_args = container.args.clone().unwrap_or_default();
    let container_ports: Vec<i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();

    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    let agent = DaemonSetAgent {
        daemonset: daemonset.clone(),
        image: image.clone(),
        config_maps: vec![kube_proxy],
    };
    let c = Cluster::up_kube_daemonset(
        &proxy_lab::cluster::test_binaries(),
        &spec,
        &eps,
        agent,
        &|m| eprintln!("{overlay}: {m}"),
    )
    .unwrap_or_else(|e| panic!("{overlay}: the DaemonSet's agents program the service: {e:#}"));

    for n in NODES {
        let run = c.container_run(n).expect("container run");
        let pid = c.agent_pid(n).expect("agent pid");
        check_process(&c, n, pid, &run, overlay);
        // The manifest's args, unchanged, after the image's ENTRYPOINT.
        assert_eq!(run.argv[..image.entrypoint.len()], image.entrypoint[..]);
        assert_eq!(
            run.argv[image.entrypoint.len()..],
            manifest_args[..],
            "{overlay}: the args are the manifest's"
        );

        // Every probe, as the kubelet sends it, answers 200; the ports agree with the
        // container's declared ports.
        assert!(!run.probes.is_empty(), "{overlay}: the manifest has probes");
        for p in &run.probes {
            assert!(
                container_ports.contains(&i32::from(p.port)),
                "{overlay}: {} probe port {} is not a container port {container_ports:?}",
                p.kind,
                p.port
            );
            let mut last = None;
            for _ in 0..50 {
                match c.http_get(n, &p.url()) {
                    Ok((200, _)) => {
                        last = None;
                        break;
                    }
                    r => last = Some(r),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                last.is_none(),
                "{overlay}: node{n} {} probe {}: {last:?}\n{}",
                p.kind,
                p.url(),
                c.agent_log(n)
            );
        }

        let log = c.agent_log(n);
        assert!(
            log.contains("with the Kubernetes API"),
            "{overlay}: node{n} reads the API server named by the ConfigMap's kubeconfig: {log}"
        );
        let want = format!("node node{n} addresses: [{}]", proxy_lab::lab::node_ip(n));
        c.wait_agent_log(n, &want, Duration::from_secs(10))
            .expect("the node's addresses from its Node object");

        // `kubectl exec ds/ebpf-proxy -- ebpf-proxy inspect status`: in the container's
        // namespaces and root, the status file the agent wrote on its emptyDir.
        let inspect_status = || -> serde_json::Value {
            let pid = pid.to_string();
            let argv = [
                "nsenter",
                "-t",
                &pid,
                "-m",
                "-n",
                "-r",
                "-w",
                &run.argv[0],
                "inspect",
                "status",
                "--json",
            ];
            let out = c
                .lab
                .exec(&c.lab.node_ns(n), &argv)
                .expect("inspect status");
            assert!(
                out.status.success(),
                "{overlay}: inspect status in the container: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("status JSON")
        };
        // Written at most once a second after a sync.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut st = inspect_status();
        while st["agent"]["node_name"].is_null() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            st = inspect_status();
        }
        assert_eq!(
            st["agent"]["node_name"],
            format!("node{n}"),
            "{overlay}: the agent's status file is written in its container: {st:#}"
        );
        assert_eq!(st["agent_running"], true, "{st:#}");
    }

    // /metrics where the args put it, else kube-proxy's default (the kubeadm config leaves
    // metricsBindAddress empty).
    let metrics = manifest_args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-bind-address="))
        .unwrap_or("127.0.0.1:10249");
    for n in NODES {
        let (code, text) = c
            .http_get(n, &format!("http://{metrics}/metrics"))
            .expect("metrics");
        assert_eq!(
            code, 200,
            "{overlay}: node{n} /metrics on {metrics}: {text}"
        );
    }

    // A pod's connections through the ClusterIP, from both nodes.
    let vip = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    for pod in ["client", "hostnames-c"] {
        let p = c.probe(pod, &vip, false, 30).expect("probe");
        assert_eq!(p.ok(), 30, "{overlay}: from {pod}: {:?}", p.0);
        let u = c.probe(pod, &vip, true, 10).expect("udp probe");
        assert_eq!(u.ok(), 10, "{overlay}: UDP from {pod}: {:?}", u.0);
    }
}

/// The process as started: its command line and environment exactly, its capabilities (and
/// no_new_privs), its root file system read-only.
fn check_process(c: &Cluster, n: u8, pid: u32, run: &ContainerRun, overlay: &str) {
    let proc_file = |f: &str| {
        std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_else(|e| panic!("/proc/{pid}/{f}: {e}"))
    };
    let split = |b: Vec<u8>| -> Vec<String> {
        b.split(|c| *c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    assert_eq!(
        split(proc_file("cmdline")),
        run.argv,
        "{overlay}: node{n}: the command line as the manifest gives it"
    );
    let env: Vec<String> = run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(
        split(proc_file("environ")),
        env,
        "{overlay}: node{n}: exactly the container's environment"
    );
    assert!(
        env.contains(&format!("NODE_NAME=node{n}")),
        "{overlay}: fieldRef spec.nodeName resolved: {env:?}"
    );
    let status = String::from_utf8_lossy(&proc_file("status")).into_owned();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
    };
    match run.capability_mask().expect("capabilities") {
        Some(mask) => {
            for k in ["CapEff", "CapPrm", "CapBnd"] {
                assert_eq!(
                    u64::from_str_radix(&field(k), 16).expect("hex"),
                    mask,
                    "{overlay}: node{n}: {k} is the manifest's set {:?}",
                    run.capabilities
                );
            }
            println!(
                "{overlay}: node{n}: the agent runs with CapEff {} ({:?}) only",
                field("CapEff"),
                run.capabilities
            );
        }
        None => println!(
            "{overlay}: node{n}: privileged (CapEff {})",
            field("CapEff")
        ),
    }
    assert_eq!(
        field("NoNewPrivs"),
        if run.no_new_privs { "1" } else { "0" },
        "{overlay}: node{n}: allowPrivilegeEscalation"
    );
    if run.read_only_root {
        // The root the agent sees is read-only: /run outside its emptyDir cannot be written.
        let out = c
            .lab
            .exec(
                &c.lab.node_ns(n),
                &[
                    "nsenter",
                    "-t",
                    &pid.to_string(),
                    "-m",
                    "-r",
                    "touch",
                    "/run/probe-write",
                ],
            )
            .expect("touch");
        assert!(
            !out.status.success(),
            "{overlay}: node{n}: the container's root is read-only"
        );
    }
}

#[test]
fn the_replace_kube_proxy_daemonset_runs_in_the_lab() {
    run_overlay("replace-kube-proxy");
}

#[test]
fn the_side_by_side_daemonset_runs_in_the_lab() {
    run_overlay("side-by-side");
}

#[test]
fn the_privileged_daemonset_runs_in_the_lab() {
    run_overlay("privileged");
}
