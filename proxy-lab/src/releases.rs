//! Past releases as the upgrade test needs them: the list (the repository's `RELEASES` file,
//! which reaches every clone where a tag may not), which of them upgrades are tested from
//! ([`UPGRADE_TESTED`]), and building a release's agent from its own commit into a cache.
//!
//! A release is built by its own `cargo xtask build` in a copy of its tree (`git archive`
//! of the commit) under `~/.cache/ebpf-proxy/releases/<name>-<sha>/`:
//!
//! ```text
//! <name>-<sha>/src/          the commit's tree (extracted once; `src/target` -> ../target)
//! <name>-<sha>/target/       CARGO_TARGET_DIR: kept, so a rebuild is incremental
//! <name>-<sha>/bin/ebpf-proxy   the agent (its eBPF object embedded), copied last
//! <name>-<sha>.lock          flock(2): concurrent runs wait instead of clashing
//! ```
//!
//! A cold build takes about 8 minutes on 2 cores; a cached one is reused in milliseconds.
//! `cargo xtask build-release NAME` builds one; `cargo xtask test` builds every release in
//! [`UPGRADE_TESTED`] first and passes each agent's path in [`bin_env_var`] (e.g.
//! `EBPF_PROXY_V0_1_0_BIN`).
use std::{
    fs,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// The `RELEASES` file, as compiled in (the tests and xtask agree on it without a path).
pub const RELEASES_FILE: &str = include_str!("../../RELEASES");

/// Releases the upgrade test (`proxy-lab/tests/upgrade.rs`) upgrades from, each named in
/// `RELEASES`. `cargo xtask test` builds each of them before the tests run.
pub const UPGRADE_TESTED: &[&str] = &["v0.1.0"];

/// `ebpf-proxy run` flags the lab passes today that a release does not know, so the lab leaves
/// them out when it starts that release's agent (see `Cluster::start_agent`). Each entry:
/// (release, [(flag, takes a value)]). v0.1.0 knows every flag the lab passes (`--manifests`,
/// `--kubeconfig`, `--node-name`, `--bpffs`, `--cgroup-path`, `--cluster-cidr`, `--xdp-mode`)
/// but `--pod-bridge-interface` (it called it `--pod-bridge`, default `cbr0`, which is the
/// bridge lab's bridge anyway) and `--tc-attach` (passed with `EBPF_PROXY_LAB_TC_ATTACH`; it
/// had TCX only): the upgrade test checks this against the release's own `run --help`.
pub const UNKNOWN_RUN_FLAGS: &[(&str, &[(&str, bool)])] = &[(
    "v0.1.0",
    &[("--pod-bridge-interface", true), ("--tc-attach", true)],
)];

/// What the agent binary is called in a release's `bin/` directory.
pub const AGENT_BIN: &str = "ebpf-proxy";

/// One line of `RELEASES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// e.g. `v0.1.0`.
    pub name: String,
    /// The full commit id (40 hex digits).
    pub sha: String,
}

impl Release {
    /// `<name>-<sha>`: the release's cache directory name.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.name, self.sha)
    }

    /// The `run` flags of today's lab this release does not know ([`UNKNOWN_RUN_FLAGS`]).
    pub fn unknown_run_flags(&self) -> &'static [(&'static str, bool)] {
        UNKNOWN_RUN_FLAGS
            .iter()
            .find(|(n, _)| *n == self.name)
            .map_or(&[], |(_, f)| f)
    }
}

/// Parses `RELEASES` text: `<name> <sha>` per line, `#` comments and blank lines ignored.
pub fn parse(text: &str) -> Result<Vec<Release>> {
    let mut out: Vec<Release> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(sha), None) = (words.next(), words.next(), words.next()) else {
            bail!(
                "RELEASES line {}: expected `<name> <commit sha>`, got {line:?}",
                i + 1
            );
        };
        ensure!(
            sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "RELEASES line {}: {sha:?} is not a full commit id (use `git rev-parse {sha}`)",
            i + 1
        );
        ensure!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "RELEASES line {}: release name {name:?} must be letters, digits, '.', '_' or '-'",
            i + 1
        );
        ensure!(
            !out.iter().any(|r| r.name == name),
            "RELEASES line {}: {name} listed twice",
            i + 1
        );
        out.push(Release {
            name: name.to_owned(),
            sha: sha.to_ascii_lowercase(),
        });
    }
    Ok(out)
}

/// Every release in the repository's `RELEASES`.
pub fn releases() -> Result<Vec<Release>> {
    parse(RELEASES_FILE)
}

/// The release called `name`, from `RELEASES`.
pub fn release(name: &str) -> Result<Release> {
    let all = releases()?;
    all.iter()
        .find(|r| r.name == name)
        .cloned()
        .with_context(|| {
            format!(
                "no release {name:?} in RELEASES (known: {})",
                all.iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The environment variable that carries release `name`'s agent path to the tests:
/// `EBPF_PROXY_V0_1_0_BIN` for `v0.1.0`.
pub fn bin_env_var(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("EBPF_PROXY_{up}_BIN")
}

/// `$EBPF_PROXY_RELEASE_CACHE`, else `~/.cache/ebpf-proxy/releases`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("EBPF_PROXY_RELEASE_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/ebpf-proxy/releases")
}

/// Where a release's built agent lives in the cache (it may not exist yet).
pub fn cached_agent(rel: &Release) -> PathBuf {
    cache_root()
        .join(rel.dir_name())
        .join("bin")
        .join(AGENT_BIN)
}

/// An exclusive `flock` on a file, released on drop (and by the kernel if the process dies).
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path, say: &dyn Fn(&str)) -> Result<Self> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let fd = f.as_raw_fd();
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            say(&format!(
                "waiting for another build holding {}",
                path.display()
            ));
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                bail!(
                    "flock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(Self(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor (closing it would release it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Extracts `sha`'s tree from the repository at `repo` into `dest` (`git archive | tar -x`).
/// CI's clone has the full history, so any release commit is there.
fn extract(repo: &Path, sha: &str, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", sha])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let stdout = archive.stdout.take().context("git archive stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .stdin(stdout)
        .status()
        .context("running tar -x")?;
    let git = archive.wait().context("waiting for git archive")?;
    if !git.success() {
        bail!(
            "`git archive {sha}` in {} failed ({git}): is the commit in this clone? \
             (`git fetch --unshallow` for a shallow clone)",
            repo.display()
        );
    }
    if !tar.success() {
        bail!("tar -x into {} failed ({tar})", dest.display());
    }
    Ok(())
}

/// Runs `cmd`, printing a line every 30 s while it runs (a cold release build is quiet for
/// minutes at a time).
fn run_with_heartbeat(cmd: &mut Command, what: &str, say: &dyn Fn(&str)) -> Result<()> {
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let mut next = Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() >= next {
            say(&format!(
                "{what}: still building ({}s; a cold build takes about 8 min)",
                start.elapsed().as_secs()
            ));
            next += Duration::from_secs(30);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!("{what}: {cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds release `rel`'s agent from the repository at `repo` (any clone or worktree holding
/// the commit) into the cache, or reuses it; returns the agent's path. Holds a lock on the
/// release for the whole build, so concurrent callers wait and then reuse its result.
pub fn build(repo: &Path, rel: &Release, say: &dyn Fn(&str)) -> Result<PathBuf> {
    let root = cache_root();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let dir = root.join(rel.dir_name());
    let bin_dir = dir.join("bin");
    let agent = bin_dir.join(AGENT_BIN);
    let stamp = bin_dir.join(".complete");
    let what = format!("release {}", rel.name);
    let _lock = FileLock::acquire(&root.join(format!("{}.lock", rel.dir_name())), say)?;
    if agent.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == rel.sha) {
        say(&format!("{what}: cached agent {}", agent.display()));
        return Ok(agent);
    }
    let started = Instant::now();
    let src = dir.join("src");
    let target = dir.join("target");
    if !src.join("Cargo.toml").is_file() {
        let tmp = dir.join("src.tmp");
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_dir_all(&src);
        say(&format!(
            "{what}: extracting commit {} into {}",
            rel.sha,
            src.display()
        ));
        check_tools()?;
        extract(repo, &rel.sha, &tmp)?;
        // The release's xtask reads its eBPF object from `<workspace>/target`: point that at
        // the cache's target directory, which outlives re-extractions.
        std::os::unix::fs::symlink("../target", tmp.join("target"))
            .context("linking src/target to the cache's target directory")?;
        fs::rename(&tmp, &src).with_context(|| format!("renaming to {}", src.display()))?;
    }
    fs::create_dir_all(&target)?;
    say(&format!(
        "{what}: building with its own `cargo xtask build` in {} (a cold build takes about \
         8 min on 2 cores; later runs reuse it)",
        src.display()
    ));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&src)
        .args(["xtask", "build"])
        .env("CARGO_TARGET_DIR", &target)
        // Not the tree's settings: the release builds as it was released.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    run_with_heartbeat(&mut cmd, &what, say)?;
    let built = target.join("release").join(AGENT_BIN);
    ensure!(
        built.is_file(),
        "{what}: {} was not produced by its `cargo xtask build`",
        built.display()
    );
    fs::create_dir_all(&bin_dir)?;
    let _ = fs::remove_file(&stamp);
    let tmp = bin_dir.join(format!(".{AGENT_BIN}.tmp"));
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, &agent)?;
    let mut f = fs::File::create(&stamp)?;
    writeln!(f, "{}", rel.sha)?;
    say(&format!(
        "{what}: built {} in {}s",
        agent.display(),
        started.elapsed().as_secs()
    ));
    Ok(agent)
}

/// Checks that `git` and `tar` are there (the extraction runs them), naming the fix.
fn check_tools() -> Result<()> {
    for p in ["git", "tar"] {
        crate::programs::ensure_known(p.as_ref())?;
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ensure!(ok, "`{p}` is missing: run `cargo xtask bootstrap`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_releases_file_parses_and_names_every_tested_release() {
        let all = releases().expect("RELEASES parses");
        assert!(!all.is_empty());
        for name in UPGRADE_TESTED {
            let r = release(name).expect("tested release listed");
            assert_eq!(r.sha.len(), 40);
        }
        for (name, _) in UNKNOWN_RUN_FLAGS {
            release(name).expect("flag table names a listed release");
        }
        assert_eq!(
            release("v0.1.0").expect("v0.1.0").sha,
            "b5b90b9e645bee98515a6d131a023a4e988580c6"
        );
    }

    #[test]
    fn malformed_lines_are_refused() {
        struct Case {
            name: &'static str,
            input: &'static str,
            ok: bool,
        }
        let sha = "b5b90b9e645bee98515a6d131a023a4e988580c6";
        let cases = [
            Case {
                name: "comments and blanks",
                input: "# x\n\n  \nv1 b5b90b9e645bee98515a6d131a023a4e988580c6\n",
                ok: true,
            },
            Case {
                name: "short sha",
                input: "v1 b5b90b9\n",
                ok: false,
            },
            Case {
                name: "extra word",
                input: "v1 b5b90b9e645bee98515a6d131a023a4e988580c6 x\n",
                ok: false,
            },
            Case {
                name: "duplicate",
                input: "v1 b5b90b9e645bee98515a6d131a023a4e988580c6\nv1 b5b90b9e645bee98515a6d131a023a4e988580c6\n",
                ok: false,
            },
            Case {
                name: "name with a slash",
                input: "v/1 b5b90b9e645bee98515a6d131a023a4e988580c6\n",
                ok: false,
            },
        ];
        for c in cases {
            let r = parse(c.input);
            assert_eq!(r.is_ok(), c.ok, "{}: {r:?}", c.name);
            if let Ok(v) = r {
                assert_eq!(v[0].sha, sha, "{}", c.name);
            }
        }
    }

    #[test]
    fn env_var_names() {
        assert_eq!(bin_env_var("v0.1.0"), "EBPF_PROXY_V0_1_0_BIN");
        assert_eq!(bin_env_var("v1.2.3-rc1"), "EBPF_PROXY_V1_2_3_RC1_BIN");
    }
}
