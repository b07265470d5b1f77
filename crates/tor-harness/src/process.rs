//! Starting, querying and stopping the router daemons: everything that touches processes,
//! ports and files lives here, so the per-router modules only render configs and parse output.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a single CLI query (`gobgp`, `birdc`, `vtysh`) may take before we call the
/// daemon hung; generous because 100k-route dumps on a busy 2-core machine take seconds.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `stop` waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long `Drop` waits after SIGTERM; shorter than `STOP_GRACE` because `Drop` blocks.
const DROP_GRACE: Duration = Duration::from_millis(500);

/// A binary the harness needs, with the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binary {
    pub path: &'static str,
    pub package: &'static str,
}

impl Binary {
    /// Resolves the binary, or fails with a message that says how to install it.
    pub(crate) fn resolve(self) -> Result<PathBuf> {
        let candidate = Path::new(self.path);
        if candidate.is_absolute() {
            if candidate.is_file() {
                return Ok(candidate.to_path_buf());
            }
        } else if let Some(found) = find_in_path(self.path) {
            return Ok(found);
        }
        bail!(
            "`{}` not found: the ToR test peers need the Debian package `{}` \
             (install it with `apt-get install -y {}`)",
            self.path,
            self.package,
            self.package
        )
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Picks a free TCP port on 127.0.0.1 by binding port 0 and releasing it.
///
/// Another process can grab the port between release and the daemon's bind; `Tor::start`
/// retries on that rare race instead of holding the socket (daemons cannot inherit it).
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// True when some socket listens on TCP `port` (any address), read from /proc so that
/// checking does not open a BGP connection the daemon would see as a new neighbor.
pub(crate) fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        let Ok(file) = File::open(table) else {
            return false;
        };
        BufReader::new(file)
            .lines()
            .skip(1)
            .map_while(Result::ok)
            .any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1).unwrap_or_default();
                let state = fields.nth(1).unwrap_or_default();
                let local_port = local
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                // 0A is TCP_LISTEN in the kernel's state numbering.
                state == "0A" && local_port == Some(port)
            })
    })
}

/// Whether daemons can be dropped to `nobody`: only when we are root and `setpriv` works.
/// Checked once per process by running `setpriv ... true`.
pub(crate) fn run_as_nobody() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        std::env::var_os("HERALD_TOR_AS_ROOT").is_none() && setpriv_works(&NOBODY_ARGS)
    })
}

/// Whether `setpriv --pdeathsig` works, so a daemon dies with the thread that started
/// it even when the test process is SIGKILLed (a CI timeout) and no `Drop` runs.
fn parent_death_signal() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| setpriv_works(&PDEATHSIG_ARGS))
}

fn setpriv_works(args: &[&str]) -> bool {
    Command::new("setpriv")
        .args(args)
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

const PDEATHSIG_ARGS: [&str; 2] = ["--pdeathsig", "KILL"];

const NOBODY_ARGS: [&str; 5] = ["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"];

/// Keeps CAP_NET_ADMIN across the switch to `nobody` (ambient capability): BIRD's BFD
/// sockets set SO_PRIORITY 7, which needs it. BIRD has no `protocol kernel`, so the
/// capability cannot reach the kernel's routes.
const NET_ADMIN_ARGS: [&str; 4] = ["--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"];

/// Whom a daemon runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User {
    /// `nobody` when we are root (the default for every ToR).
    Nobody,
    /// `nobody` keeping CAP_NET_ADMIN.
    NobodyWithNetAdmin,
    /// Whoever we are: the daemon switches users itself (FRR's zebra and bfdd refuse to
    /// start without their capabilities and drop to the `frr` user on their own).
    Own,
}

/// A private working directory for one daemon; `nobody` must be able to write its sockets
/// and pid files there.
pub(crate) fn work_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating the daemon's temp dir")?;
    // FRR's daemons with BFD run as the `frr` user, which must write here too; the dir
    // holds nothing secret.
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))
            .context("opening the temp dir to nobody")?;
    }
    Ok(dir)
}

/// One daemon process we started. Dropping it kills the process by its PID.
#[derive(Debug)]
pub(crate) struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `program args...` in `dir`, as `nobody` when possible, with stdout and
    /// stderr going to `<dir>/<name>.log`.
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        dir: &Path,
    ) -> Result<Daemon> {
        Daemon::spawn_with(name, program, args, dir, User::Nobody)
    }

    /// As [`Daemon::spawn`], as `user`.
    pub(crate) fn spawn_with(
        name: &'static str,
        program: &Path,
        args: &[String],
        dir: &Path,
        user: User,
    ) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // setpriv execs the daemon, so the PID we get is the daemon's own. The parent-death
        // signal fires when the spawning *thread* exits: fine for tokio workers and test
        // threads, which outlive the Tor they start.
        let nobody = user != User::Own && run_as_nobody();
        let pdeathsig = parent_death_signal();
        let mut command = if nobody || pdeathsig {
            let mut command = Command::new("setpriv");
            if nobody {
                command.args(NOBODY_ARGS);
                if user == User::NobodyWithNetAdmin {
                    command.args(NET_ADMIN_ARGS);
                }
            }
            if pdeathsig {
                command.args(PDEATHSIG_ARGS);
            }
            command.arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        tracing::debug!(daemon = name, pid = child.id(), "started");
        Ok(Daemon {
            name,
            child: Some(child),
            log,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the exit status if the daemon has already exited.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// The daemon's whole log.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(15);
        lines[start..].join("\n")
    }

    /// SIGTERM, then SIGKILL after a grace period; always by the PID we started.
    pub(crate) async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, Signal::SIGTERM);
        // A frozen daemon only acts on SIGTERM once it runs again.
        signal(&child, Signal::SIGCONT);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a frozen daemon keeps its TCP sessions open
    /// but sends nothing, so its peers notice only when their hold timer expires.
    pub(crate) fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            signal(
                child,
                if frozen {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGCONT
                },
            );
        }
    }

    /// SIGKILL at once (no NOTIFICATION reaches the peer), by PID.
    pub(crate) fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, Signal::SIGTERM);
        signal(&child, Signal::SIGCONT);
        let deadline = Instant::now() + DROP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        tracing::debug!(daemon = self.name, "killed on drop");
    }
}

/// Runs a query CLI to completion with a timeout and returns its stdout.
pub(crate) async fn run_query(program: &Path, args: &[String]) -> Result<String> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(QUERY_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            anyhow!(
                "`{} {}` did not answer within {QUERY_TIMEOUT:?}",
                program.display(),
                args.join(" ")
            )
        })?
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "`{} {}` failed ({}): {}{}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    String::from_utf8(output.stdout).context("query output is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_package() {
        let missing = Binary {
            path: "herald-no-such-router",
            package: "herald-router-pkg",
        };
        let message = format!(
            "{:#}",
            missing.resolve().expect_err("the binary does not exist")
        );
        assert!(
            message.contains("apt-get install -y herald-router-pkg"),
            "{message}"
        );
    }

    #[test]
    fn sees_a_listening_port() -> Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        assert!(is_listening(port));
        drop(listener);
        assert!(!is_listening(port));
        Ok(())
    }
}
