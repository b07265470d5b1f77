#!/usr/bin/env python3
"""Checks what Herald ships for deployment, offline:

- the Helm chart renders with each values file in deploy/helm/herald/ci/, lints clean, and
  every object it renders (and every CRD in its crds/) is valid against the Kubernetes
  schemas of the versions in KUBERNETES_VERSIONS, strictly (unknown fields are errors);
- values that must be refused are refused, with the message a user needs;
- docker-compose.yml is valid against the Compose specification.

Needs PyPI's helm-python-sdk (Helm's library, no helm binary), kubernetes-validate and
check-jsonschema; scripts/test.sh installs them when missing. Exits non-zero naming each
failure.
"""
import glob
import os
import subprocess
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "deploy", "helm", "herald")
# Two minor versions the chart supports: the oldest and the newest the binaries are built
# against are checked.
KUBERNETES_VERSIONS = ["1.33.0", "1.35.0"]
# Kinds whose schema is not part of Kubernetes (the Prometheus operator's): rendered only
# when asked for, checked for shape by their own tests, skipped here.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

failures = []


def fail(what):
    failures.append(what)
    print(f"FAIL {what}")


def documents(text):
    return [d for d in yaml.safe_load_all(text) if d]


def validate(source, obj):
    kind = obj.get("kind", "?")
    name = obj.get("metadata", {}).get("name", "?")
    if kind in FOREIGN_KINDS:
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{source}: {kind}/{name} is not valid for Kubernetes {version}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{source}: no Kubernetes {version} schema for {obj.get('apiVersion')} {kind}")


def render(chart, values, source):
    try:
        return chart.render(values, name="herald", namespace="herald-system", is_install=True)
    except helm.HelmError as e:
        fail(f"{source}: does not render: {e}")
        return {}


def check_chart():
    chart = helm.Chart.load(CHART)
    values_files = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    if not values_files:
        fail("no values files in deploy/helm/herald/ci")
    for path in values_files:
        source = os.path.relpath(path, ROOT)
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        try:
            chart.validate_schema(chart.merge_values(values))
        except helm.HelmError as e:
            fail(f"{source}: refused by values.schema.json: {e}")
            continue
        report = helm.lint(CHART, values, strict=True, namespace="herald-system")
        for message in report.get("messages", []):
            if message.get("severity", 0) >= 2:
                fail(f"{source}: helm lint: {message.get('path')}: {message.get('error')}")
        count = 0
        for template, text in sorted(render(chart, values, source).items()):
            for obj in documents(text):
                count += 1
                validate(f"{source} {template}", obj)
        print(f"ok   {source}: {count} objects")
    for path in sorted(glob.glob(os.path.join(CHART, "crds", "*.yaml"))):
        for obj in documents(open(path).read()):
            validate(os.path.relpath(path, ROOT), obj)
        print(f"ok   {os.path.relpath(path, ROOT)}")

    # What must be refused, and the words the refusal must carry.
    refusals = [
        ({}, "ipam.databaseSecret.name is required"),
        ({"ipam": {"store": "sqlite"}}, "store"),
        ({"ipam": {"store": "embedded", "replica": 2}}, "replica"),
        ({"networkPolicy": {"nodeCIDRs": ["10.0.0.0"]}}, "nodeCIDRs"),
    ]
    for values, words in refusals:
        try:
            chart.validate_schema(chart.merge_values(values))
            chart.render(values, name="herald", namespace="herald-system", is_install=True)
        except helm.HelmError as e:
            if words not in str(e):
                fail(f"values {values} were refused without naming {words!r}: {e}")
            else:
                print(f"ok   refused {values}")
            continue
        fail(f"values {values} were accepted")


def check_compose():
    result = subprocess.run(
        ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", os.path.join(ROOT, "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        fail(f"docker-compose.yml: {result.stdout.strip()} {result.stderr.strip()}")
    else:
        print("ok   docker-compose.yml against the Compose specification")


check_chart()
check_compose()
if failures:
    print(f"{len(failures)} failure(s)")
    sys.exit(1)
