//! Child processes for end-to-end tests: started by the test, stopped by their PID when
//! the handle drops (also when the test panics), SIGTERM first and SIGKILL after a grace.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Waits until something accepts TCP connections on `addr`, for at most `timeout`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub struct ChildProcess {
    name: String,
    child: Option<Child>,
}

impl ChildProcess {
    /// Starts `command` with its output inherited, so `cargo test` shows it on failure.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        // Herald's binaries serve an admin listener on a fixed port by default; tests
        // run many at once, so each gets a free port unless the test chose one.
        if !command
            .get_envs()
            .any(|(key, _)| key == "HERALD_ADMIN_LISTEN")
        {
            command.env("HERALD_ADMIN_LISTEN", "127.0.0.1:0");
        }
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({command:?}): {e}"));
        Self {
            name: name.to_string(),
            child: Some(child),
        }
    }

    /// The name it was started under, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) by its PID: a frozen process keeps its
    /// sockets open and sends nothing, like a hung node.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child
            && let Ok(pid) = i32::try_from(child.id())
        {
            signal(
                pid,
                if frozen {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGCONT
                },
            );
        }
    }

    /// SIGKILL, as a crash would: no clean-up runs in the child.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait up to `grace` for the exit status, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = i32::try_from(child.id()).ok()?;
        signal(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "{} did not exit within {grace:?} of SIGTERM; killing it",
            self.name
        );
        let _ = child.kill();
        child.wait().ok()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

fn signal(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
}

/// The path of a workspace binary (e.g. `herald-ipam`) for tests of *other* packages,
/// which Cargo gives no `CARGO_BIN_EXE_` for. It lives beside the test executable's
/// `deps/` folder. It is (re)built first when it is missing (a `-p`-scoped test run) or
/// older than a workspace source file: a test that ran yesterday's binary against today's
/// code would prove nothing. Checked once per binary per test process.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("a target/<profile>/deps layout");
    let path = profile_dir.join(name);
    // Held across the build so that concurrent tests wait for one build, not start several.
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if checked.iter().any(|n| n == name) {
        return path;
    }
    let built_at = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let stale = built_at.is_none_or(|built| newest_source_change().is_some_and(|src| src > built));
    if stale {
        let release = profile_dir.file_name().is_some_and(|p| p == "release");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // From the workspace's root: a test runs in its own package's directory, where
        // `--bin` finds only that package's binaries.
        cargo
            .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .args(["build", "--bin", name]);
        if release {
            cargo.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target_dir);
        }
        let status = cargo
            .status()
            .unwrap_or_else(|e| panic!("run cargo build --bin {name}: {e}"));
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    checked.push(name.to_string());
    path
}

/// The newest modification time among the workspace's build inputs (Rust sources,
/// manifests, protos, migrations), or `None` when the tree cannot be read.
fn newest_source_change() -> Option<std::time::SystemTime> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut newest = std::fs::metadata(root.join("Cargo.lock"))
        .and_then(|m| m.modified())
        .ok();
    let mut pending: Vec<std::path::PathBuf> = ["crates", "services", "proto", "migrations"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    // Bounded: a source tree of a few thousand entries, never the target directory.
    let mut visited = 0usize;
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > 100_000 {
                return newest;
            }
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if !matches!(
                    path.file_name().and_then(|n| n.to_str()),
                    Some("target" | ".git" | "node_modules")
                ) {
                    pending.push(path);
                }
                continue;
            }
            let input = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("rs" | "proto" | "sql" | "toml")
            );
            if input && let Ok(modified) = meta.modified() {
                newest = Some(newest.map_or(modified, |n| n.max(modified)));
            }
        }
    }
    newest
}
