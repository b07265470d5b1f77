//! A private, throwaway Postgres cluster (initdb in a temporary directory, the server on a
//! free loopback port) that a test owns and may crash and restart, unlike the shared
//! server of `HERALD_TEST_DATABASE_URL`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_test_support::{ChildProcess, free_port};

/// How long the server may take to accept connections after a start (crash recovery
/// included).
const START: Duration = Duration::from_secs(60);

pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` user when we are root: initdb and the server
    /// refuse to run as root.
    user: Option<(u32, u32)>,
    server: Option<ChildProcess>,
    _dir: tempfile::TempDir,
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The newest installed server's bin directory (Debian layout, as scripts/test.sh finds it).
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "Postgres server binaries under /usr/lib/postgresql (scripts/test.sh installs them)",
        )
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("a Postgres server under /usr/lib/postgresql/*/bin")
}

impl PrivatePostgres {
    /// initdb (trust auth, user `postgres`) and start the server.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let user = (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])));
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut pg = Self {
            bin: pg_bin(),
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            port: free_port(),
            user,
            server: None,
            _dir: dir,
        };
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(&pg.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server().await;
        pg
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command.stdin(Stdio::null());
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (after a crash it recovers first) and waits until it answers.
    pub async fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut server = self.command("postgres");
        server
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.data.display()))
            // Nothing here must survive a power cut, only a crash of the server.
            .args(["-c", "fsync=off"])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.server = Some(ChildProcess::spawn("postgres", server));
        let deadline = Instant::now() + START;
        while Instant::now() < deadline {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "private Postgres not ready within {START:?}:\n{}",
            self.log()
        );
    }

    /// Stops the server as a crash would (`pg_ctl -m immediate`: every backend exits at
    /// once, the next start recovers from the WAL).
    pub fn crash(&mut self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut server) = self.server.take() {
            // Already gone; this reaps it.
            server.kill9();
        }
    }

    /// Runs one query through psql, answering rows of `|`-separated fields.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let out = Command::new("psql")
            .args([
                &self.url(),
                "-X",
                "-A",
                "-t",
                "-F",
                "|",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("psql (Debian package postgresql-client)");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.server.is_some() {
            // SIGTERM (what dropping the handle sends) waits for clients to leave; the
            // cluster is thrown away, so stop it at once.
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
