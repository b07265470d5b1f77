//! The real `herald-route-speaker` process: where its settings come from (defaults < file
//! < environment < flags), how it refuses bad ones, and that it stops when told even when
//! nobody reads its logs any more.

mod common;

use std::io::BufRead;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FakeRouting, FakeState};
use herald_test_support::{ChildProcess, free_port, run_to_exit};

/// How long the binary may take to refuse its settings.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);
/// A stop after SIGTERM with no BGP session to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);

/// The example settings file shipped under `deploy/`.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/herald-route-speaker.toml")
}

fn speaker_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-route-speaker"));
    for var in [
        "HERALD_CONFIG",
        "HERALD_NODE_NAME",
        "HERALD_IPAM_ENDPOINT",
        "HERALD_ROUTER_ID",
        "HERALD_REPORT_INTERVAL",
        "HERALD_SHUTDOWN_INTENT",
        "HERALD_SHUTDOWN_DRAIN",
        "HERALD_SHUTDOWN_LOCAL_PREF",
        "HERALD_SHUTDOWN_PREPEND",
        "HERALD_LOG_FORMAT",
    ] {
        command.env_remove(var);
    }
    command
}

/// Where nothing listens: the speaker keeps retrying (and logging) until told to stop.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[test]
fn sigterm_stops_it_after_the_reader_of_its_stderr_is_gone() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let mut command = speaker_command();
    command
        .args(["--node-name", "n1", "--ipam-endpoint", &nowhere()])
        .stderr(Stdio::from(writer));
    let mut process = ChildProcess::spawn("herald-route-speaker", command);
    // Read until it has started, then go away as a log shipper that restarts would.
    let mut lines = std::io::BufReader::new(reader).lines();
    let deadline = Instant::now() + REFUSE_TIMEOUT;
    let started = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("route speaker starting") => break true,
            Some(Ok(_)) if Instant::now() < deadline => {}
            _ => break false,
        }
    };
    assert!(started, "the speaker never said it started");
    drop(lines);
    // Its retries against the missing IPAM now write to a pipe nobody reads.
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let status = process.terminate(STOP_TIMEOUT).expect("an exit status");
    assert_ne!(
        status.signal(),
        Some(9),
        "herald-route-speaker ignored SIGTERM with its stderr closed and was killed"
    );
    assert!(asked.elapsed() < STOP_TIMEOUT, "{:?}", asked.elapsed());
    assert!(status.success(), "{status:?}");
}

#[test]
fn an_ipam_endpoint_without_a_scheme_is_refused_at_start() {
    for (how, mut command) in [("flag", speaker_command()), ("env", speaker_command())] {
        command.args(["--node-name", "n1"]);
        if how == "flag" {
            command.args(["--ipam-endpoint", "127.0.0.1:50051"]);
        } else {
            command.env("HERALD_IPAM_ENDPOINT", "127.0.0.1:50051");
        }
        let output = run_to_exit(command, REFUSE_TIMEOUT);
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{how}: {message}");
        assert!(message.contains("`ipam_endpoint`"), "{how}: {message}");
        assert!(message.contains("scheme"), "{how}: {message}");
        assert!(
            message.contains("http://127.0.0.1:50051"),
            "{how}: {message}"
        );
    }
}

#[test]
fn a_missing_node_name_and_a_bad_duration_are_refused() {
    let output = run_to_exit(speaker_command(), REFUSE_TIMEOUT);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{message}");
    assert!(message.contains("`node_name`"), "{message}");

    let mut command = speaker_command();
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_REPORT_INTERVAL", "10 parsecs");
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{message}");
    for part in [
        "`report_interval`",
        "\"10 parsecs\"",
        "HERALD_REPORT_INTERVAL",
        "duration",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
}

#[test]
fn print_config_shows_flags_over_environment_over_the_file() {
    let mut command = speaker_command();
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_REPORT_INTERVAL", "1500ms")
        .env("HERALD_NODE_NAME", "from-env")
        .args(["--node-name", "from-flag", "--print-config"]);
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    for line in [
        "node_name = \"from-flag\"",
        "report_interval = \"1s 500ms\"",
        "ipam_endpoint = \"http://127.0.0.1:50051\"",
        "log_format = \"json\"",
        "# router_id is not set",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line:?} not in {printed}"
        );
    }
}

#[test]
fn follows_the_endpoint_of_the_environment_as_the_node_of_the_flag() {
    let fake = FakeRouting::start(0, FakeState::new());
    let mut command = speaker_command();
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_IPAM_ENDPOINT", fake.endpoint())
        .args(["--node-name", "node-from-flag"]);
    let mut process = ChildProcess::spawn("herald-route-speaker", command);
    let deadline = Instant::now() + REFUSE_TIMEOUT;
    while fake.state.watch_calls("node-from-flag") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fake.state.watch_calls("node-from-flag") > 0,
        "no WatchNodeRoutes for the flag's node at the environment's endpoint"
    );
    assert_eq!(
        fake.state.watch_calls("node-1"),
        0,
        "the file's node_name was used"
    );
    process.terminate(STOP_TIMEOUT);
}
