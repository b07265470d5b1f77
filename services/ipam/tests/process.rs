//! The real `herald-ipam` process: where its settings come from (defaults < file <
//! environment < flags), how it refuses bad ones, and that it stops when told even when
//! nobody reads its logs any more.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{START_TIMEOUT, Server};
use herald_test_support::{ChildProcess, free_port, run_to_exit};

/// How long a binary may take to refuse its settings: it must not start serving first.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);
/// A stop after SIGTERM with nothing in flight; the README promises 5 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);

/// The example settings file shipped under `deploy/`.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/herald-ipam.toml")
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the binary with `args` expecting a refusal at start: non-zero exit, and the
/// message on stderr, returned.
fn refused(dir: &Path, args: &[&str]) -> String {
    let mut command = ipam_command(dir);
    command.args(args);
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "herald-ipam {args:?} started: {message}"
    );
    message
}

fn ipam_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
    command
        .current_dir(dir)
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_LISTEN")
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_LOG_FORMAT");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_it_after_the_reader_of_its_stderr_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    let mut command = ipam_command(dir.path());
    command
        .args(["--listen", &addr.to_string()])
        .stderr(Stdio::from(writer));
    let mut server = Server {
        addr,
        process: ChildProcess::spawn("herald-ipam", command),
        dir: PathBuf::from(dir.path()),
        database_url: None,
    };
    server.wait_serving(START_TIMEOUT).await;
    // A log shipper restarting, or `herald-ipam | head` after ten lines.
    drop(reader);
    let started = Instant::now();
    let status = server.process.terminate(STOP_TIMEOUT).unwrap();
    assert_ne!(
        status.signal(),
        Some(9),
        "herald-ipam ignored SIGTERM with its stderr closed and was killed"
    );
    assert!(started.elapsed() < STOP_TIMEOUT, "{:?}", started.elapsed());
    assert!(status.success(), "{status:?}");
}

#[test]
fn print_config_shows_flags_over_environment_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = example();
    let print = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = ipam_command(dir.path());
        command
            .arg("--config")
            .arg(&file)
            .arg("--print-config")
            .args(args)
            .envs(env.iter().copied());
        let output = run_to_exit(command, REFUSE_TIMEOUT);
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    // The file alone over the defaults.
    let from_file = print(&[], &[]);
    assert!(
        from_file.contains("listen = \"0.0.0.0:50051\"\n"),
        "{from_file}"
    );
    assert!(from_file.contains("log_format = \"json\"\n"), "{from_file}");
    assert!(
        from_file.contains("# database_url is not set"),
        "{from_file}"
    );
    // The environment over the file; a flag over both.
    let layered = print(
        &[
            ("HERALD_LOG_FORMAT", "plain"),
            ("HERALD_LISTEN", "127.0.0.1:1111"),
        ],
        &["--listen", "127.0.0.1:2222"],
    );
    assert!(
        layered.contains("listen = \"127.0.0.1:2222\"\n"),
        "{layered}"
    );
    assert!(layered.contains("log_format = \"plain\"\n"), "{layered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_where_the_flag_says_with_the_log_format_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (env_port, flag_port) = (free_port(), free_port());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{flag_port}").parse().unwrap();
    let log = dir.path().join("herald-ipam.log");
    let mut command = ipam_command(dir.path());
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_LISTEN", format!("127.0.0.1:{env_port}"))
        .args(["--listen", &addr.to_string()])
        .stderr(std::fs::File::create(&log).unwrap());
    let mut server = Server {
        addr,
        process: ChildProcess::spawn("herald-ipam", command),
        dir: PathBuf::from(dir.path()),
        database_url: None,
    };
    server.wait_serving(START_TIMEOUT).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", env_port)).is_err(),
        "also listening on the environment's port {env_port}"
    );
    server.process.terminate(STOP_TIMEOUT);
    // The example file asks for JSON logs and neither layer above it says otherwise.
    let logs = std::fs::read_to_string(&log).unwrap();
    let first = logs.lines().next().unwrap_or_default();
    assert!(first.starts_with('{'), "not a JSON log line: {first}");
    assert!(logs.contains(&addr.to_string()), "{logs}");
}

#[test]
fn a_missing_settings_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let message = refused(dir.path(), &["--config", "/nonexistent/herald-ipam.toml"]);
    assert!(
        message.contains("/nonexistent/herald-ipam.toml"),
        "{message}"
    );
    assert!(message.contains("No such file"), "{message}");
}

#[test]
fn an_unparsable_settings_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\nlog_format = \n").unwrap();
    let message = refused(dir.path(), &["--config", file.to_str().unwrap()]);
    assert!(message.contains(file.to_str().unwrap()), "{message}");
    assert!(
        message.contains("TOML") && message.contains("line 2"),
        "{message}"
    );
}

#[test]
fn an_unknown_key_is_refused_in_toml_and_yaml() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("typo.toml", "lisen = \"0.0.0.0:50051\"\n"),
        ("typo.yaml", "lisen: 0.0.0.0:50051\n"),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let message = refused(dir.path(), &["--config", file.to_str().unwrap()]);
        assert!(message.contains("unknown key `lisen`"), "{message}");
        assert!(message.contains(file.to_str().unwrap()), "{message}");
        assert!(message.contains("0.0.0.0:50051"), "{message}");
    }
}

#[test]
fn a_bad_value_is_refused_naming_key_value_origin_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"0.0.0.0\"\n").unwrap();
    let message = refused(dir.path(), &["--config", file.to_str().unwrap()]);
    for part in [
        "`listen`",
        "\"0.0.0.0\"",
        file.to_str().unwrap(),
        "invalid socket address",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // A database URL that can never work, from the environment.
    let mut command = ipam_command(dir.path());
    command.env("HERALD_DATABASE_URL", "mysql://herald@db/herald");
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(message.contains("`database_url`"), "{message}");
    assert!(message.contains("HERALD_DATABASE_URL"), "{message}");
    // A value outside a closed set is told the values it may take.
    let message = refused(dir.path(), &["--route-engine", "bogus"]);
    for part in [
        "`route_engine`",
        "\"bogus\"",
        "--route-engine",
        "`incremental` or `full`",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // A long value is cut, not echoed whole.
    let long = "x".repeat(100_000);
    let message = refused(dir.path(), &["--listen", &long]);
    assert!(message.len() < 1_000, "{} bytes", message.len());
    assert!(message.contains("--listen"), "{message}");
}

#[test]
fn the_database_password_never_shows() {
    const PASSWORD: &str = "hunter2-secret";
    let dir = tempfile::tempdir().unwrap();
    // --print-config, whichever layer the URL comes from.
    let file = dir.path().join("secret.toml");
    let url = format!("postgres://herald:{PASSWORD}@127.0.0.1:1/herald");
    std::fs::write(&file, format!("database_url = \"{url}\"\n")).unwrap();
    let mut command = ipam_command(dir.path());
    command.arg("--config").arg(&file).arg("--print-config");
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains("postgres://herald:REDACTED@127.0.0.1:1/herald"),
        "{printed}"
    );
    assert!(!printed.contains(PASSWORD), "{printed}");
    // A URL refused for its syntax (the port) is echoed without its password.
    let bad = format!("postgres://herald:{PASSWORD}@127.0.0.1:999999/herald");
    let message = refused(dir.path(), &["--database-url", &bad]);
    assert!(message.contains("`database_url`"), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");
    // The logs of a server that tries a database that does not answer, until it has said
    // something about it.
    let log = dir.path().join("herald-ipam.log");
    let mut command = ipam_command(dir.path());
    command
        .env("HERALD_DATABASE_URL", &url)
        .env("RUST_LOG", "debug")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stderr(std::fs::File::create(&log).unwrap());
    let mut process = ChildProcess::spawn("herald-ipam", command);
    let deadline = Instant::now() + START_TIMEOUT;
    let said_something = || {
        let logs = std::fs::read_to_string(&log).unwrap();
        logs.contains("127.0.0.1:1") || logs.contains("store")
    };
    while Instant::now() < deadline && !said_something() {
        std::thread::sleep(Duration::from_millis(50));
    }
    process.terminate(STOP_TIMEOUT);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        said_something(),
        "nothing logged about the database: {logs}"
    );
    assert!(!logs.contains(PASSWORD), "{logs}");
}
