//! Where Services, EndpointSlices and Nodes come from: a manifests directory (polled and
//! watched with inotify) or the Kubernetes API (watched). Both produce a [`Snapshot`], the
//! type this room owns and the sync step consumes.
pub mod dirwatch;
pub mod kube;
pub mod manifests;
pub mod triggers;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{debug, warn};

use self::kube::{KubeSource, KubeSourceOptions, SourceConfig};

/// The objects a source holds at one moment, and the objects it could not read (each a
/// message naming the object and the problem).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: manifests::Objects,
    pub unreadable: Vec<String>,
}

/// Reads a manifests directory into a snapshot. Bad files/documents/objects are in
/// `unreadable`; only an unreadable directory is an error.
pub fn load_manifests(dir: &Path) -> Result<Snapshot> {
    let (objects, errors) = manifests::load_dir(dir)?;
    Ok(Snapshot {
        objects,
        unreadable: errors.iter().map(ToString::to_string).collect(),
    })
}

/// How a [`Source`] read its last snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub took: Duration,
    /// Manifest files parsed (changed) and reused (unchanged).
    pub parsed: usize,
    pub reused: usize,
}

/// Where snapshots come from: a manifests directory (polled) or the Kubernetes API (watched).
pub enum Source {
    Manifests {
        dir: PathBuf,
        /// The fallback to `watch`: inotify misses changes made on other machines (network
        /// file systems) and cannot watch a directory that does not exist.
        poll: tokio::time::Interval,
        /// inotify on the directory: an edit is read at once, not at the next poll. `None`
        /// while the directory is missing (set up again at a poll).
        watch: Option<dirwatch::DirWatch>,
        /// Fingerprint of the directory when it was last read; `None` forces a read.
        last: Option<u64>,
        /// The files' objects as last parsed: only changed files are parsed again.
        cache: manifests::DirCache,
        /// How the last read went.
        read: ReadStats,
    },
    Kube(Box<KubeSource>),
}

impl Source {
    /// The source `--manifests`, `--kubeconfig` and `--master` select (see
    /// [`kube::select_source`]); the Kubernetes watches start at once. `poll` is the manifests directory's poll interval.
    pub async fn select(
        manifests: Option<&Path>,
        kubeconfig: Option<&Path>,
        master: Option<&str>,
        node_name: &str,
        poll: Duration,
    ) -> Result<Self> {
        let host = std::env::var(kube::IN_CLUSTER_ENV).ok();
        let cfg = kube::select_source(manifests, kubeconfig, master, host.as_deref())?;
        let kube = |client| {
            let opts = KubeSourceOptions::new(node_name.to_owned());
            Self::Kube(Box::new(KubeSource::start(client, &opts)))
        };
        Ok(match cfg {
            SourceConfig::Manifests(dir) => {
                // Like an unreachable API server: start anyway (the pinned datapath keeps
                // forwarding, nothing is pruned) and keep retrying until it appears.
                if !dir.is_dir() {
                    warn!(
                        "--manifests {}: not a directory (yet); keeping the programmed state \
                         and retrying",
                        dir.display()
                    );
                }
                Self::manifests(dir, poll)
            }
            SourceConfig::Kubeconfig(path) => kube(kube::client_for(Some(&path), master).await?),
            SourceConfig::Master(url) => kube(kube::client_for(None, Some(&url)).await?),
            SourceConfig::InCluster => kube(kube::client(None).await?),
        })
    }

    pub fn manifests(dir: PathBuf, poll: Duration) -> Self {
        Self::Manifests {
            dir,
            poll: tokio::time::interval(poll),
            watch: None,
            last: None,
            cache: manifests::DirCache::new(),
            read: ReadStats::default(),
        }
    }

    /// How the read of the last snapshot went (for the Kubernetes API, whose objects arrive
    /// parsed, only the time taken to collect them from the watch stores).
    pub fn read_stats(&self) -> ReadStats {
        match self {
            Self::Manifests { read, .. } => *read,
            Self::Kube(k) => ReadStats {
                took: k.snapshot_took,
                ..ReadStats::default()
            },
        }
    }

    /// The next snapshot to reconcile: when the manifests changed, or (Kubernetes) when
    /// every watch has listed and a store changed. Cancel safe.
    pub async fn next_snapshot(&mut self) -> Snapshot {
        match self {
            Self::Kube(k) => k.next_snapshot().await,
            Self::Manifests {
                dir,
                poll,
                watch,
                last,
                cache,
                read,
            } => loop {
                match watch {
                    Some(w) => tokio::select! {
                        _ = poll.tick() => {}
                        r = w.changed() => if let Err(e) = r {
                            debug!("{}: inotify watch ended ({e}); polling", dir.display());
                            *watch = None;
                        },
                    },
                    None => {
                        poll.tick().await;
                        // Set up before the read below, so no change falls in between.
                        *watch = dirwatch::DirWatch::new(dir)
                            .map_err(|e| {
                                debug!("{}: no inotify watch ({e}); polling", dir.display())
                            })
                            .ok();
                    }
                }
                let fp = match manifests::fingerprint(dir) {
                    Ok(fp) => fp,
                    Err(e) => {
                        warn!("reading {}: {e}", dir.display());
                        continue;
                    }
                };
                if *last == Some(fp) {
                    continue;
                }
                let started = Instant::now();
                match cache.load(dir) {
                    Ok((objects, unreadable, stats)) => {
                        *last = Some(fp);
                        *read = ReadStats {
                            took: started.elapsed(),
                            parsed: stats.parsed,
                            reused: stats.reused,
                        };
                        return Snapshot {
                            objects,
                            unreadable,
                        };
                    }
                    Err(e) => warn!("{e:#}"),
                }
            },
        }
    }

    /// The last snapshot could not be applied: produce one again even without a change.
    pub fn retry(&mut self) {
        match self {
            Self::Kube(k) => k.retry(),
            Self::Manifests { last, .. } => *last = None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Manifests { dir, .. } => write!(f, "manifests from {}", dir.display()),
            Self::Kube(_) => write!(f, "the Kubernetes API"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// The agent's manifests source reads an edit at once (inotify), long before the next poll,
    /// and falls back to polling while the directory is gone.
    #[tokio::test]
    async fn manifests_source_reads_edits_without_waiting_for_the_poll() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("m");
        fs::create_dir(&dir).expect("mkdir");
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
            )
        };
        fs::write(dir.join("svc.yaml"), svc("10.96.0.1")).expect("write");
        let mut source = Source::manifests(dir.clone(), Duration::from_secs(3600));
        let first = tokio::time::timeout(Duration::from_secs(2), source.next_snapshot())
            .await
            .expect("the first read is immediate");
        assert_eq!(first.objects.services.len(), 1);
        for ip in ["10.96.0.2", "10.96.0.3"] {
            let start = std::time::Instant::now();
            fs::write(dir.join(".svc.tmp"), svc(ip)).expect("write");
            fs::rename(dir.join(".svc.tmp"), dir.join("svc.yaml")).expect("rename");
            let snap = tokio::time::timeout(Duration::from_secs(2), source.next_snapshot())
                .await
                .expect("an edit is read without waiting for the hourly poll");
            let got = snap.objects.services[0]
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.clone());
            assert_eq!(got.as_deref(), Some(ip));
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{:?}",
                start.elapsed()
            );
        }
    }
}
