//! The real `herald-cluster-watcher` process: where its settings come from (defaults <
//! file < environment < flags) and how it refuses bad ones, before it touches Kubernetes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{CLUSTER, Lab, ours};
use herald_fake_kube::SERVICES;
use herald_test_support::{ChildProcess, run_to_exit};

/// How long the binary may take to refuse its settings or print them.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

/// The example settings file shipped under `deploy/`.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/herald-cluster-watcher.toml")
}

/// The binary with no HERALD_ variable of the test's environment, and no cluster: a
/// refusal must come before any Kubernetes client is built.
fn watcher_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-cluster-watcher"));
    for (var, _) in std::env::vars() {
        if var.starts_with("HERALD_") {
            command.env_remove(var);
        }
    }
    command.env("KUBECONFIG", "/nonexistent/kubeconfig");
    command
}

fn refused(command: Command) -> String {
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    let message = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{message}");
    message
}

#[test]
fn print_config_shows_flags_over_environment_over_the_file() {
    let mut command = watcher_command();
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_CLUSTER_ID", "from-env")
        .env("HERALD_WORKERS", "7")
        .args(["--workers", "9", "--default-class", "--print-config"]);
    let output = run_to_exit(command, REFUSE_TIMEOUT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    for line in [
        "cluster_id = \"from-env\"",
        "workers = 9",
        "default_class = true",
        "resync_seconds = 300",
        "log_format = \"json\"",
        "load_balancer_class = \"herald.io/bgp\"",
        "# identity is not set",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line:?} not in {printed}"
        );
    }
}

#[test]
fn an_ipam_endpoint_without_a_scheme_is_refused_at_start() {
    let mut command = watcher_command();
    command.args(["--ipam-endpoint", "herald-ipam.herald.svc:50051"]);
    let message = refused(command);
    assert!(message.contains("`ipam_endpoint`"), "{message}");
    assert!(message.contains("scheme"), "{message}");
    assert!(message.contains("--ipam-endpoint"), "{message}");
}

#[test]
fn bad_values_and_unknown_keys_in_the_file_are_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, text, expect) in [
        (
            "typo.yaml",
            "workres: 4\n",
            &["unknown key `workres`", "typo.yaml"][..],
        ),
        (
            "bad.toml",
            "workers = \"many\"\n",
            &["`workers`", "\"many\"", "bad.toml"][..],
        ),
        (
            "lease.toml",
            "lease_duration_seconds = 5\nlease_grace_seconds = 5\n",
            &["`lease_grace_seconds`", "lease.toml", "less than"][..],
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write the settings file");
        let mut command = watcher_command();
        command.arg("--config").arg(&file);
        let message = refused(command);
        for part in expect {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
    }
}

/// The example file's `ipam_endpoint` and `cluster_id` are overridden by the environment
/// and a flag: the Service's address is allocated in the flag's cluster at the
/// environment's herald-ipam.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocates_at_the_endpoint_of_the_environment_in_the_cluster_of_the_flag() {
    let lab = Lab::start(&[("lab", &["172.16.0.240/28"])]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = dir.path().join("kubeconfig");
    lab.fake
        .write_kubeconfig(&kubeconfig, "herald-system")
        .expect("write the kubeconfig");
    let mut command = watcher_command();
    command
        .arg("--config")
        .arg(example())
        .env("HERALD_IPAM_ENDPOINT", lab.ipam.endpoint())
        .args(["--cluster-id", CLUSTER, "--identity", "w-cfg"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST");
    let _watcher = ChildProcess::spawn("herald-cluster-watcher", command);
    lab.fake
        .create(SERVICES, ours("default", "from-settings"))
        .expect("create the Service");
    let held = lab
        .ipam
        .wait_allocations("the Service allocated in the flag's cluster", |a| {
            a.len() == 1
        })
        .await;
    assert_eq!(
        held[0].owner.as_ref().map(|o| o.cluster_id.as_str()),
        Some(CLUSTER)
    );
}
