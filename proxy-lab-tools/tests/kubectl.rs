//! The lab API server checked with a real client: Debian's `kubectl` discovers the API
//! (`/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1`, `/version`), lists Services,
//! EndpointSlices and Nodes (cluster-wide, in a namespace, one object), and watches Services
//! through the fake API server, seeing the changes this test makes. Every kubectl run is
//! bounded (`--request-timeout`, and `timeout` around it). Needs `kubectl` (bootstrap installs
//! it) but not root.
mod support;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use support::{
    fakeapi::{FakeApiServer, Kind},
    objects::{node, service, slice, strs},
};

/// `kubectl` on `kubeconfig`, killed after 30 s whatever happens, each request bounded by
/// `request_timeout`, and its discovery cache beside the kubeconfig (not in $HOME).
fn kubectl_cmd(kubeconfig: &Path, request_timeout: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args(["30", "kubectl", "--kubeconfig"])
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(kubeconfig.with_file_name("kube-cache"))
        .arg(format!("--request-timeout={request_timeout}"))
        .stdin(Stdio::null());
    c
}

/// `kubectl ARGS...` to completion: stdout, or a panic with stderr.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl_cmd(kubeconfig, "10s")
        .args(args)
        .output()
        .expect("running kubectl (Debian package kubectl; `cargo xtask bootstrap` installs it)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_lists_and_watches_through_the_lab_api_server() {
    let api = FakeApiServer::start().await;
    let port = [("http", 80, "TCP")];
    api.apply_raw(Kind::Node, node("node1", "192.0.2.1"));
    api.apply_raw(Kind::Node, node("node2", "192.0.2.2"));
    let add_service =
        |ns: &str, name: &str, ip: &str| api.apply_raw(Kind::Service, service(ns, name, ip, &port));
    add_service("default", "web", "10.96.0.10");
    add_service("kube-system", "dns", "10.96.0.53");
    api.apply_raw(
        Kind::EndpointSlice,
        slice("default", "web-abc", "web", &port, &strs(&["10.76.0.5"])),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).expect("kubeconfig");

    let kc2 = kc.clone();
    tokio::task::spawn_blocking(move || {
        let kc = kc2.as_path();
        let v: serde_json::Value =
            serde_json::from_str(&kubectl(kc, &["version", "-o", "json"])).expect("version JSON");
        assert_eq!(v["serverVersion"]["major"], "1", "{v}");

        assert_eq!(
            lines(&kubectl(kc, &["get", "services", "-A", "-o", "name"])),
            // In key order (namespace, then name), as etcd lists them.
            ["service/web", "service/dns"]
        );
        // The namespaced collection, by its short name from discovery.
        assert_eq!(
            lines(&kubectl(kc, &["get", "svc", "-n", "default", "-o", "name"])),
            ["service/web"]
        );
        assert_eq!(
            lines(&kubectl(kc, &["get", "endpointslices", "-A", "-o", "name"])),
            ["endpointslice.discovery.k8s.io/web-abc"]
        );
        assert_eq!(
            lines(&kubectl(kc, &["get", "nodes", "-o", "name"])),
            ["node/node1", "node/node2"]
        );
        // One object, a field of it.
        let ip = kubectl(
            kc,
            &[
                "get",
                "node",
                "node2",
                "-o",
                "jsonpath={.status.addresses[0].address}",
            ],
        );
        assert_eq!(ip, "192.0.2.2");
        // The default (table) output, from a server that answers plain lists.
        let table = kubectl(kc, &["get", "svc", "-n", "kube-system"]);
        assert!(table.contains("dns"), "{table}");
        let missing = kubectl_cmd(kc, "10s")
            .args(["get", "svc", "nope", "-n", "default"])
            .output()
            .expect("kubectl");
        assert!(!missing.status.success());
        let err = String::from_utf8_lossy(&missing.stderr);
        assert!(err.contains("NotFound") && err.contains("nope"), "{err}");
    })
    .await
    .expect("kubectl lists");

    // A watch: the initial list as ADDED, then what the test changes, as it happens. The
    // request timeout ends the watch (exit 0); `timeout` bounds it in any case.
    let mut child = kubectl_cmd(&kc, "8s")
        .args([
            "get",
            "svc",
            "-n",
            "default",
            "--watch",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.metadata.name} {.object.spec.clusterIP}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl get -w");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("kubectl -w: no line for {what} within 10 s: {e}"))
    };
    assert_eq!(next("the initial list"), "ADDED web 10.96.0.10");
    add_service("default", "api", "10.96.0.11");
    // Another namespace's change is not this watch's.
    add_service("kube-system", "m", "10.96.0.12");
    assert_eq!(next("a new Service"), "ADDED api 10.96.0.11");
    api.delete(Kind::Service, "default", "web");
    assert_eq!(next("a deleted Service"), "DELETED web 10.96.0.10");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("kubectl -w exit");
    assert!(
        status.status.success(),
        "kubectl -w ends at its request timeout: {}\n{}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.is_empty(), "nothing else was watched: {rest:?}");
    // kubectl used the legacy discovery documents, and the namespaced paths.
    let reqs = api.requests();
    for path in [
        "GET /api?",
        "GET /apis?",
        "GET /api/v1?",
        "GET /apis/discovery.k8s.io/v1?",
        "GET /api/v1/namespaces/default/services?",
    ] {
        assert!(
            reqs.iter().any(|r| r.starts_with(path)),
            "{path}: {reqs:#?}"
        );
    }
}
