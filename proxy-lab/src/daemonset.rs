//! The agent as the shipped DaemonSet runs it, for the lab: the overlays under
//! `deploy/kubernetes/` rendered with `kubectl kustomize`, the DaemonSet read with the real
//! k8s-openapi types, and its container turned into what a kubelet and a container runtime
//! would start on a lab node ([`ContainerRun`]): the command line (the image's ENTRYPOINT from
//! `deploy/Containerfile` unless the container sets `command`), the environment, the volume
//! mounts with the files a kubeadm cluster's ConfigMaps hold, the capability set and the
//! probes. Anything the manifest asks for that the lab cannot reproduce is an error naming it,
//! never silently dropped.
//!
//! [`launch_argv`] then starts it in a node's namespace: `ip netns exec` gives it a mount
//! namespace of its own, in which a shell builds a root file system like the container's (a
//! tmpfs with the host's `/usr`, `/proc`, a read-only sysfs, `/dev`, the agent binary at the
//! ENTRYPOINT's path, every volume bind-mounted at its `mountPath`), makes it read-only when
//! `readOnlyRootFilesystem` says so, and `chroot`s into it, then `setpriv` keeps exactly the
//! container's capabilities (and no_new_privs) and `env -i` sets exactly its environment
//! before exec'ing the command line unchanged. Nothing of it is visible outside that mount
//! namespace.
//!
//! Pure logic here, except [`render_overlay`] (runs kubectl) and [`materialize`] (writes the
//! volume files).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, HTTPGetAction, Probe as K8sProbe, Volume},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;

/// Where the service account volume goes in every pod that does not opt out
/// (`automountServiceAccountToken`).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `PATH` of the runtime image (distroless sets the Debian default).
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities a root process of a container gets from the runtime when the manifest
/// does not drop them all (containerd's and CRI-O's default set).
const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The repository's root (where `deploy/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize deploy/kubernetes/overlays/<overlay>`: the multi-document YAML a user
/// applies.
pub fn render_overlay(root: &Path, overlay: &str) -> Result<String> {
    let dir = root.join("deploy/kubernetes/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .context("running `kubectl kustomize` (Debian package kubectl)")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The one DaemonSet of a rendered stream, decoded with k8s-openapi's type.
pub fn daemonset_of(rendered: &str) -> Result<DaemonSet> {
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = serde_yaml::Value::deserialize(doc).context("rendered YAML")?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("DaemonSet") {
            found.push(serde_yaml::from_value::<DaemonSet>(v).context("decoding the DaemonSet")?);
        }
    }
    ensure!(
        found.len() == 1,
        "expected one DaemonSet in the rendered overlay, found {}",
        found.len()
    );
    Ok(found.remove(0))
}

/// What the image gives a container that does not override it: the last stage's exec-form
/// `ENTRYPOINT` and `CMD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// [`Image`] from a Containerfile's text (exec form only: the JSON array).
pub fn image_of(containerfile: &str) -> Result<Image> {
    let mut img = Image {
        entrypoint: Vec::new(),
        cmd: Vec::new(),
    };
    for line in containerfile.lines() {
        let line = line.trim();
        if line.starts_with("FROM ") {
            // A new stage starts from its base's (here: unknown, so none).
            img.entrypoint.clear();
            img.cmd.clear();
        }
        for (word, slot) in [("ENTRYPOINT", &mut img.entrypoint), ("CMD", &mut img.cmd)] {
            if let Some(rest) = line.strip_prefix(word).filter(|r| r.starts_with(' ')) {
                *slot = serde_json::from_str(rest.trim())
                    .with_context(|| format!("{word} is not in exec (JSON array) form: {line}"))?;
            }
        }
    }
    ensure!(!img.entrypoint.is_empty(), "the image has no ENTRYPOINT");
    Ok(img)
}

/// What the kubelet knows about the node and cluster the pod lands on.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub node_name: String,
    pub node_ip: String,
    /// ConfigMaps of the pod's namespace.
    pub config_maps: Vec<ConfigMap>,
    /// The node's path for a hostPath volume's `path` (the lab's per-node bpffs for
    /// `/sys/fs/bpf`, ...). A hostPath missing here is an error.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// The files of the service account volume (`token`, `ca.crt`, `namespace`).
    pub service_account: BTreeMap<String, String>,
    /// The `kubernetes` Service's ClusterIP (`KUBERNETES_SERVICE_HOST`).
    pub kubernetes_service_ip: String,
}

/// What a mounted path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountSource {
    /// Files (name -> content): a ConfigMap or the service account volume.
    Files(BTreeMap<String, String>),
    /// A path of the node.
    Host(PathBuf),
    /// An emptyDir: a fresh directory per pod.
    EmptyDir,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The volume's name.
    pub volume: String,
    pub path: String,
    pub source: MountSource,
    pub read_only: bool,
}

/// An httpGet probe as the kubelet sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    /// `liveness`, `readiness` or `startup`.
    pub kind: &'static str,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpProbe {
    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// The container as the runtime would start it on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRun {
    /// Command line (program first), `$(VAR)` references expanded.
    pub argv: Vec<String>,
    /// The whole environment, in order.
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Capability names without `CAP_` (upper case); `None`: privileged (all of them).
    pub capabilities: Option<Vec<String>>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    pub probes: Vec<HttpProbe>,
}

impl ContainerRun {
    /// `CapEff` as /proc/PID/status shows it for these capabilities (`None`: privileged).
    pub fn capability_mask(&self) -> Result<Option<u64>> {
        let Some(caps) = &self.capabilities else {
            return Ok(None);
        };
        let mut mask = 0u64;
        for c in caps {
            mask |= 1 << capability_number(c)?;
        }
        Ok(Some(mask))
    }
}

/// The number of a capability by its Kubernetes name (`NET_ADMIN`, `BPF`, ...).
pub fn capability_number(name: &str) -> Result<u32> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let n = name.trim_start_matches("CAP_").to_ascii_uppercase();
    NAMES
        .iter()
        .position(|c| *c == n)
        .map(|i| i as u32)
        .with_context(|| format!("unknown capability {name:?}"))
}

/// Kubernetes' `$(VAR)` expansion of command, args and env values: a defined variable is
/// replaced, `$$` is a literal `$`, anything else stays as written. Pure.
pub fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(t) = tail.strip_prefix('$') {
            out.push('$');
            rest = t;
        } else if let Some((name, after)) = tail.strip_prefix('(').and_then(|t| t.split_once(')'))
            && let Some((_, v)) = vars.iter().rev().find(|(k, _)| k == name)
        {
            out.push_str(v);
            rest = after;
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// The single container of `ds` as it would run on the node of `ctx`. Errors name whatever
/// the lab cannot reproduce.
pub fn container_run(ds: &DaemonSet, image: &Image, ctx: &NodeContext) -> Result<ContainerRun> {
    let name = ds.metadata.name.clone().unwrap_or_default();
    let namespace = ds
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no pod template spec")?;
    ensure!(
        pod.host_network == Some(true),
        "the pod is not hostNetwork: the lab runs it in the node's network namespace"
    );
    ensure!(
        pod.init_containers.as_ref().is_none_or(Vec::is_empty),
        "init containers are not modelled"
    );
    let [c] = pod.containers.as_slice() else {
        bail!("{} containers: one is modelled", pod.containers.len());
    };

    // The environment: the image's, the kubelet's (HOSTNAME, the `kubernetes` Service), then
    // the container's in order, each value expanded against the ones before it.
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), IMAGE_PATH.into()),
        // hostNetwork: the node's hostname.
        ("HOSTNAME".into(), ctx.node_name.clone()),
    ];
    ensure!(
        c.env_from.as_ref().is_none_or(Vec::is_empty),
        "envFrom is not modelled"
    );
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                let f = from.field_ref.as_ref().with_context(|| {
                    format!(
                        "env {}: only fieldRef sources can be resolved in the lab: {from:?}",
                        e.name
                    )
                })?;
                match f.field_path.as_str() {
                    "spec.nodeName" => ctx.node_name.clone(),
                    "metadata.namespace" => namespace.clone(),
                    "metadata.name" => format!("{name}-{}", ctx.node_name),
                    "spec.serviceAccountName" => {
                        pod.service_account_name.clone().unwrap_or_default()
                    }
                    // hostNetwork: the pod's IP is the node's.
                    "status.hostIP" | "status.podIP" => ctx.node_ip.clone(),
                    other => bail!("env {}: fieldRef {other} cannot be resolved", e.name),
                }
            }
            (Some(v), None) => expand(v, &env),
            (None, None) => String::new(),
        };
        env.push((e.name.clone(), value));
    }
    // Service links for the `kubernetes` Service (always injected).
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", ctx.kubernetes_service_ip.clone()),
        ("KUBERNETES_SERVICE_PORT", "443".into()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443".into()),
        (
            "KUBERNETES_PORT",
            format!("tcp://{}:443", ctx.kubernetes_service_ip),
        ),
    ] {
        env.push((k.into(), v));
    }

    let (command, args) = match (&c.command, &c.args) {
        (Some(cmd), args) => (cmd.clone(), args.clone().unwrap_or_default()),
        (None, Some(args)) => (image.entrypoint.clone(), args.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let argv: Vec<String> = command
        .iter()
        .chain(&args)
        .map(|a| expand(a, &env))
        .collect();

    let volumes: BTreeMap<&str, &Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        ensure!(
            m.sub_path.is_none() && m.sub_path_expr.is_none(),
            "volumeMount {}: subPath is not modelled",
            m.name
        );
        let v = volumes
            .get(m.name.as_str())
            .with_context(|| format!("volumeMount {} names no volume", m.name))?;
        mounts.push(Mount {
            volume: m.name.clone(),
            path: m.mount_path.clone(),
            source: volume_source(v, ctx)?,
            read_only: m.read_only == Some(true),
        });
    }
    if pod.automount_service_account_token != Some(false) {
        mounts.push(Mount {
            volume: "kube-api-access".into(),
            path: SERVICE_ACCOUNT_DIR.into(),
            source: MountSource::Files(ctx.service_account.clone()),
            read_only: true,
        });
    }

    let sc = c.security_context.clone().unwrap_or_default();
    let capabilities = if sc.privileged == Some(true) {
        None
    } else {
        let caps = sc.capabilities.unwrap_or_default();
        let drop = caps.drop.unwrap_or_default();
        let mut set: Vec<String> = if drop.iter().any(|d| d == "ALL") {
            Vec::new()
        } else {
            RUNTIME_DEFAULT_CAPS
                .iter()
                .map(|c| (*c).to_owned())
                .filter(|c| !drop.contains(c))
                .collect()
        };
        for a in caps.add.unwrap_or_default() {
            capability_number(&a)?;
            if !set.contains(&a) {
                set.push(a);
            }
        }
        Some(set)
    };
    ensure!(
        sc.run_as_user.unwrap_or(0) == 0 && sc.run_as_group.unwrap_or(0) == 0,
        "the container runs as a non-root user: not modelled (the image is USER 0:0)"
    );

    let mut probes = Vec::new();
    for (kind, p) in [
        ("liveness", &c.liveness_probe),
        ("readiness", &c.readiness_probe),
        ("startup", &c.startup_probe),
    ] {
        if let Some(p) = p {
            probes.push(http_probe(kind, p, c, ctx)?);
        }
    }

    Ok(ContainerRun {
        argv,
        env,
        mounts,
        // Privileged containers may escalate; otherwise the field's default is true too,
        // so only an explicit false sets no_new_privs.
        no_new_privs: sc.privileged != Some(true) && sc.allow_privilege_escalation == Some(false),
        read_only_root: sc.read_only_root_filesystem == Some(true),
        capabilities,
        probes,
    })
}

fn volume_source(v: &Volume, ctx: &NodeContext) -> Result<MountSource> {
    if let Some(cm) = &v.config_map {
        let want = cm.name.as_str();
        let found = ctx
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(want));
        let Some(found) = found else {
            ensure!(
                cm.optional == Some(true),
                "volume {}: ConfigMap {want} does not exist: the pod would not start",
                v.name
            );
            return Ok(MountSource::Files(BTreeMap::new()));
        };
        let data = found.data.clone().unwrap_or_default();
        let files = match &cm.items {
            None => data,
            Some(items) => items
                .iter()
                .map(|i| {
                    let content = data.get(&i.key).cloned().with_context(|| {
                        format!("volume {}: ConfigMap {want} has no key {}", v.name, i.key)
                    })?;
                    Ok((i.path.clone(), content))
                })
                .collect::<Result<_>>()?,
        };
        return Ok(MountSource::Files(files));
    }
    if let Some(hp) = &v.host_path {
        let p = ctx.host_paths.get(&hp.path).with_context(|| {
            format!(
                "volume {}: hostPath {} has no lab equivalent (add it to the node's host paths)",
                v.name, hp.path
            )
        })?;
        return Ok(MountSource::Host(p.clone()));
    }
    if v.empty_dir.is_some() {
        return Ok(MountSource::EmptyDir);
    }
    bail!(
        "volume {}: only configMap, hostPath and emptyDir volumes are modelled: {v:?}",
        v.name
    )
}

fn http_probe(
    kind: &'static str,
    p: &K8sProbe,
    c: &Container,
    ctx: &NodeContext,
) -> Result<HttpProbe> {
    let HTTPGetAction {
        host,
        path,
        port,
        scheme,
        ..
    } = p
        .http_get
        .clone()
        .with_context(|| format!("{kind} probe: only httpGet probes are modelled"))?;
    ensure!(
        scheme.as_deref().is_none_or(|s| s == "HTTP"),
        "{kind} probe: scheme {scheme:?} is not modelled"
    );
    let port = match port {
        IntOrString::Int(n) => u16::try_from(n)?,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .with_context(|| format!("{kind} probe: no container port named {name}"))?,
    };
    Ok(HttpProbe {
        kind,
        // Without a host, the kubelet probes the pod's IP: the node's, with hostNetwork.
        host: host.unwrap_or_else(|| ctx.node_ip.clone()),
        port,
        path: path.unwrap_or_else(|| "/".into()),
    })
}

/// kubeadm's `kube-system/kube-proxy` ConfigMap from the files `kubeadm init` writes
/// (`proxy-userspace/tests/data/kubeadm/`), with the kubeconfig's `server` (the
/// control-plane endpoint) set to `server`. Everything else unchanged.
pub fn kubeadm_kube_proxy_configmap(fixtures: &Path, server: &str) -> Result<ConfigMap> {
    let read = |f: &str| {
        let p = fixtures.join(f);
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let config = read("config.conf")?;
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&read("kubeconfig.conf")?)?;
    let clusters = kc
        .get_mut("clusters")
        .and_then(|c| c.as_sequence_mut())
        .context("kubeconfig.conf has no clusters")?;
    for c in clusters {
        c["cluster"]["server"] = server.into();
    }
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kube-proxy", "namespace": "kube-system",
                     "labels": {"app": "kube-proxy"}},
        "data": {"config.conf": config, "kubeconfig.conf": serde_yaml::to_string(&kc)?},
    });
    Ok(serde_json::from_value(cm)?)
}

/// A bind mount of the launch: `source` (a host path) at `target` in the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Writes the file volumes (and creates the emptyDirs) of `run` under `dir` (one directory
/// per volume) and returns every mount as a bind from a host path.
pub fn materialize(run: &ContainerRun, dir: &Path) -> Result<Vec<Bind>> {
    let mut binds = Vec::new();
    for m in &run.mounts {
        let source = match &m.source {
            MountSource::Host(p) => p.clone(),
            MountSource::EmptyDir | MountSource::Files(_) => {
                let d = dir.join(&m.volume);
                fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                if let MountSource::Files(files) = &m.source {
                    for (name, content) in files {
                        ensure!(!name.contains('/'), "volume {}: file {name:?}", m.volume);
                        fs::write(d.join(name), content)?;
                    }
                }
                d
            }
        };
        binds.push(Bind {
            source,
            target: m.path.clone(),
            read_only: m.read_only,
        });
    }
    Ok(binds)
}

fn q(s: impl AsRef<str>) -> String {
    format!("'{}'", s.as_ref().replace('\'', r"'\''"))
}

/// The command (program first) that starts `run` as its container would, to be run as root
/// in the node's network namespace by `ip netns exec` (which gives it a mount namespace of
/// its own): builds the container's root at `rootfs` (an empty directory), with `agent` at
/// the command's path and `binds` mounted, then chroots into it, keeps only the container's
/// capabilities and exec's `run.argv` with exactly `run.env`. Pure.
pub fn launch_argv(
    run: &ContainerRun,
    rootfs: &Path,
    agent: &Path,
    binds: &[Bind],
) -> Result<Vec<String>> {
    let program = run.argv.first().context("empty command")?;
    ensure!(
        program.starts_with('/') && program.len() > 1,
        "the command {program:?} is not an absolute path"
    );
    let r = rootfs.display().to_string();
    let mut s = String::from("set -e\n");
    let w = &mut s;
    writeln!(w, "R={}", q(&r))?;
    // The image: the host's /usr (merged-/usr layout), read-only.
    writeln!(w, "mount -t tmpfs -o mode=0755 rootfs \"$R\"")?;
    writeln!(w, "cd \"$R\"")?;
    writeln!(w, "mkdir -p usr proc sys dev etc tmp run var")?;
    writeln!(w, "mount --bind /usr usr && mount -o remount,bind,ro usr")?;
    writeln!(
        w,
        "ln -s usr/lib lib && ln -s usr/lib64 lib64 && ln -s usr/bin bin && ln -s usr/sbin sbin"
    )?;
    // What the runtime mounts: /proc (its sysctls read-only unless privileged), sysfs of
    // the node's network namespace (read-only unless privileged), /dev.
    writeln!(w, "mount -t proc proc proc")?;
    let privileged = run.capabilities.is_none();
    if !privileged {
        writeln!(
            w,
            "mount --bind proc/sys proc/sys && mount -o remount,bind,ro proc/sys"
        )?;
    }
    writeln!(
        w,
        "mount -t sysfs -o {} sysfs sys",
        if privileged { "rw" } else { "ro" }
    )?;
    writeln!(w, "mount --rbind /dev dev")?;
    // What the kubelet writes: /etc/hosts, /etc/hostname, /etc/resolv.conf (dnsPolicy
    // Default: the node's); the image's /etc/passwd.
    writeln!(w, "cp /etc/hosts /etc/resolv.conf etc/")?;
    writeln!(w, "cat /proc/sys/kernel/hostname > etc/hostname")?;
    writeln!(w, "echo 'root:x:0:0:root:/root:/sbin/nologin' > etc/passwd")?;
    writeln!(w, "echo 'root:x:0:' > etc/group")?;
    // The program at its path: a tmpfs over its directory holds a mount point for it.
    let dir = match program.rsplit_once('/') {
        Some((d, _)) if !d.is_empty() => d,
        _ => "/",
    };
    writeln!(w, "mkdir -p \"$R\"{}", q(dir))?;
    writeln!(w, "mount -t tmpfs -o mode=0755 image-bin \"$R\"{}", q(dir))?;
    writeln!(w, "touch \"$R\"{}", q(program))?;
    writeln!(
        w,
        "mount --bind {} \"$R\"{} && mount -o remount,bind,ro \"$R\"{}",
        q(agent.display().to_string()),
        q(program),
        q(program)
    )?;
    // The volumes.
    for b in binds {
        let src = q(b.source.display().to_string());
        let t = q(&b.target);
        writeln!(w, "mkdir -p \"$R\"{t}")?;
        writeln!(w, "mount --bind {src} \"$R\"{t}")?;
        if b.read_only {
            writeln!(w, "mount -o remount,bind,ro \"$R\"{t}")?;
        }
    }
    if run.read_only_root {
        writeln!(w, "mount -o remount,ro \"$R\"")?;
    }
    // chroot(1) changes to the new root (the image's WORKDIR, /).
    let mut exec = String::from("exec chroot \"$R\" /usr/bin/setpriv");
    if let Some(caps) = &run.capabilities {
        let keep: Vec<String> = caps
            .iter()
            .map(|c| format!("+{}", c.to_ascii_lowercase()))
            .collect();
        exec.push_str(" --inh-caps=-all --ambient-caps=-all --bounding-set=-all");
        for k in keep {
            exec.push(',');
            exec.push_str(&k);
        }
    }
    if run.no_new_privs {
        exec.push_str(" --no-new-privs");
    }
    exec.push_str(" -- /usr/bin/env -i");
    for (k, v) in &run.env {
        exec.push(' ');
        exec.push_str(&q(format!("{k}={v}")));
    }
    for a in &run.argv {
        exec.push(' ');
        exec.push_str(&q(a));
    }
    writeln!(w, "{exec}")?;
    Ok(vec!["sh".into(), "-c".into(), s])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ctx() -> NodeContext {
        NodeContext {
            node_name: "node1".into(),
            node_ip: "10.240.0.11".into(),
            config_maps: vec![
                kubeadm_kube_proxy_configmap(
                    &repo_root().join("proxy-userspace/tests/data/kubeadm"),
                    "http://10.240.0.1:6443",
                )
                .unwrap(),
            ],
            host_paths: [
                ("/sys/fs/bpf".to_owned(), PathBuf::from("/lab/bpffs")),
                ("/sys/fs/cgroup".to_owned(), PathBuf::from("/lab/cg")),
            ]
            .into(),
            service_account: [("token".to_owned(), "t".to_owned())].into(),
            kubernetes_service_ip: "10.96.0.1".into(),
        }
    }

    fn ds(yaml: &str) -> DaemonSet {
        daemonset_of(yaml).unwrap()
    }

    const DS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: x}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ebpf-proxy, namespace: kube-system}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      hostNetwork: true
      containers:
        - name: c
          image: i
          args: [run, --config=/var/lib/kube-proxy/config.conf, "--hostname-override=$(NODE_NAME)", "$$(NODE_NAME)"]
          env:
            - name: NODE_NAME
              valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
            - {name: GREETING, value: "on $(NODE_NAME)"}
          ports: [{name: healthz, containerPort: 10256}]
          readinessProbe: {httpGet: {path: /healthz, port: healthz, host: 127.0.0.1}}
          livenessProbe: {httpGet: {path: /livez, port: 10256}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL], add: [BPF, NET_ADMIN]}
          volumeMounts:
            - {name: bpffs, mountPath: /sys/fs/bpf}
            - {name: kube-proxy, mountPath: /var/lib/kube-proxy, readOnly: true}
      volumes:
        - {name: bpffs, hostPath: {path: /sys/fs/bpf}}
        - {name: kube-proxy, configMap: {name: kube-proxy}}
"#;

    #[test]
    fn the_container_as_the_kubelet_runs_it() {
        let img = Image {
            entrypoint: vec!["/usr/local/bin/ebpf-proxy".into()],
            cmd: vec!["run".into(), "--help".into()],
        };
        let run = container_run(&ds(DS), &img, &ctx()).unwrap();
        assert_eq!(
            run.argv,
            [
                "/usr/local/bin/ebpf-proxy",
                "run",
                "--config=/var/lib/kube-proxy/config.conf",
                "--hostname-override=node1",
                "$(NODE_NAME)"
            ]
        );
        let env: BTreeMap<_, _> = run.env.iter().cloned().collect();
        assert_eq!(env["NODE_NAME"], "node1");
        assert_eq!(env["GREETING"], "on node1");
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(run.capability_mask().unwrap(), Some(1 << 39 | 1 << 12));
        assert!(run.no_new_privs && run.read_only_root);
        assert_eq!(
            run.probes.iter().map(HttpProbe::url).collect::<Vec<_>>(),
            [
                "http://10.240.0.11:10256/livez",
                "http://127.0.0.1:10256/healthz"
            ]
        );
        let kp = &run.mounts[1];
        let MountSource::Files(files) = &kp.source else {
            panic!("{kp:?}")
        };
        assert!(kp.read_only);
        assert!(files["kubeconfig.conf"].contains("server: http://10.240.0.1:6443"));
        assert!(files["kubeconfig.conf"].contains("tokenFile: /var/run/secrets"));
        assert!(files["config.conf"].contains("clusterCIDR: \"\""));
        assert_eq!(run.mounts[0].source, MountSource::Host("/lab/bpffs".into()));
        assert_eq!(run.mounts[2].path, SERVICE_ACCOUNT_DIR);

        // No command, no args: the image's ENTRYPOINT and CMD.
        let bare = DS.replace("args: [run, --config=/var/lib/kube-proxy/config.conf, \"--hostname-override=$(NODE_NAME)\", \"$$(NODE_NAME)\"]", "");
        let run = container_run(&ds(&bare), &img, &ctx()).unwrap();
        assert_eq!(run.argv, ["/usr/local/bin/ebpf-proxy", "run", "--help"]);
    }

    #[test]
    fn what_the_lab_cannot_reproduce_is_an_error() {
        let img = image_of("FROM x\nENTRYPOINT [\"/e\"]\n").unwrap();
        for (from, to, why) in [
            (
                "valueFrom: {fieldRef: {fieldPath: spec.nodeName}}",
                "valueFrom: {secretKeyRef: {name: s, key: k}}",
                "only fieldRef",
            ),
            ("spec.nodeName", "metadata.uid", "cannot be resolved"),
            (
                "path: /sys/fs/bpf}",
                "path: /lib/modules}",
                "no lab equivalent",
            ),
            ("name: kube-proxy}", "name: other}", "does not exist"),
            ("hostNetwork: true", "hostNetwork: false", "not hostNetwork"),
            ("add: [BPF", "add: [NOPE", "unknown capability"),
        ] {
            let y = DS.replace(from, to);
            assert_ne!(y, DS, "{from}");
            let e = container_run(&ds(&y), &img, &ctx()).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{from} -> {to}: {e:#}");
        }
    }

    #[test]
    fn the_shipped_containerfile_has_an_exec_form_entrypoint() {
        let text = fs::read_to_string(repo_root().join("deploy/Containerfile")).unwrap();
        let img = image_of(&text).unwrap();
        assert_eq!(img.entrypoint, ["/usr/local/bin/ebpf-proxy"]);
        assert!(image_of("FROM a\nENTRYPOINT /bin/sh -c x\n").is_err());
        assert!(
            image_of("FROM a\nENTRYPOINT [\"/a\"]\nFROM b\n").is_err(),
            "a later stage does not inherit an earlier stage's ENTRYPOINT"
        );
    }

    #[test]
    fn expansion_as_kubernetes_does_it() {
        let vars = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn the_launch_keeps_the_command_line_and_environment() {
        let img = image_of("FROM x\nENTRYPOINT [\"/usr/local/bin/ebpf-proxy\"]\n").unwrap();
        let run = container_run(&ds(DS), &img, &ctx()).unwrap();
        let binds = vec![Bind {
            source: "/lab/it's".into(),
            target: "/var/lib/kube-proxy".into(),
            read_only: true,
        }];
        let argv = launch_argv(&run, Path::new("/r"), Path::new("/t/ebpf-proxy"), &binds).unwrap();
        let script = &argv[2];
        assert!(script.contains("mount --bind '/lab/it'\\''s' \"$R\"'/var/lib/kube-proxy'"));
        assert!(script.contains("--bounding-set=-all,+bpf,+net_admin --no-new-privs"));
        assert!(script.contains("mount -o remount,ro \"$R\""), "{script}");
        assert!(script.ends_with(
            " '/usr/local/bin/ebpf-proxy' 'run' '--config=/var/lib/kube-proxy/config.conf' \
             '--hostname-override=node1' '$(NODE_NAME)'\n"
        ));
        assert!(script.contains("-- /usr/bin/env -i 'PATH="));
    }
}
