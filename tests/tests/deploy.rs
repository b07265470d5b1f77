//! What Herald ships for deployment: the Helm chart (rendered with each values file in
//! `deploy/helm/herald/ci/`, linted, every object validated against two Kubernetes
//! versions' schemas, bad values refused), its CRDs, and docker-compose.yml against the
//! Compose specification. The checks are `scripts/check-deploy.py`, run offline with
//! Helm's library and the schemas from PyPI (scripts/test.sh installs them).

use std::path::Path;
use std::process::Command;

#[test]
fn chart_crds_and_compose_file_validate_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new("python3")
        .arg(root.join("scripts/check-deploy.py"))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        output.status.success(),
        "scripts/check-deploy.py failed:\n{stdout}\n{stderr}"
    );
    // The checks ran, not merely a script that found nothing to do.
    for expected in [
        "ci/default-values.yaml",
        "ci/embedded-values.yaml",
        "ci/full-values.yaml",
        "ci/tls-off-values.yaml",
        "ci/existing-secret-values.yaml",
        "mutual TLS (certManager) holds together",
        "docker-compose.yml",
        "docker-compose.mtls.yml",
    ] {
        assert!(
            stdout.contains(expected),
            "no check of {expected}:\n{stdout}"
        );
    }
}
