#!/usr/bin/env python3
"""Checks what Herald ships for deployment, offline:

- the Helm chart renders with each values file in deploy/helm/herald/ci/, lints clean, and
  every object it renders (and every CRD in its crds/) is valid against the Kubernetes
  schemas of the versions in KUBERNETES_VERSIONS, strictly (unknown fields are errors);
- values that must be refused are refused, with the message a user needs;
- the Prometheus operator's ServiceMonitor and PodMonitor, which kubernetes-validate does
  not know, are checked against the small schemas below (the fields the chart uses, as the
  operator's monitoring.coreos.com/v1 CRDs define them; unknown fields are errors);
- the chart's copies of the Grafana dashboards are the same as deploy/grafana/*.json;
- docker-compose.yml is valid against the Compose specification.

Needs PyPI's helm-python-sdk (Helm's library, no helm binary), kubernetes-validate and
check-jsonschema; scripts/test.sh installs them when missing. Exits non-zero naming each
failure.
"""
import glob
import json
import os
import subprocess
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "deploy", "helm", "herald")
# Two minor versions the chart supports: the oldest and the newest the binaries are built
# against are checked.
KUBERNETES_VERSIONS = ["1.33.0", "1.35.0"]

def _monitor_schema(endpoints_key):
    """monitoring.coreos.com/v1's ServiceMonitor or PodMonitor, as far as the chart uses it."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    endpoint = {
        "type": "object",
        "additionalProperties": False,
        "required": ["port"],
        "properties": {
            "port": {"type": "string", "minLength": 1},
            "path": {"type": "string", "pattern": "^/"},
            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "labels": string_map,
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": string_map},
                    },
                    endpoints_key: {"type": "array", "minItems": 1, "items": endpoint},
                },
            },
        },
    }


# Kinds whose schema is not part of Kubernetes (the Prometheus operator's): kubernetes-validate
# does not know them, so they are checked against these instead. Any other unknown kind fails.
FOREIGN_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("endpoints"),
    "PodMonitor": _monitor_schema("podMetricsEndpoints"),
}

failures = []


def fail(what):
    failures.append(what)
    print(f"FAIL {what}")


def documents(text):
    return [d for d in yaml.safe_load_all(text) if d]


def validate(source, obj):
    kind = obj.get("kind", "?")
    name = obj.get("metadata", {}).get("name", "?")
    if kind in FOREIGN_SCHEMAS:
        try:
            jsonschema.validate(obj, FOREIGN_SCHEMAS[kind])
        except jsonschema.ValidationError as e:
            fail(f"{source}: {kind}/{name} is not a valid {kind}: {e.message} at {list(e.path)}")
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
        kinds = set()
        for template, text in sorted(render(chart, values, source).items()):
            for obj in documents(text):
                count += 1
                kinds.add(obj.get("kind"))
                validate(f"{source} {template}", obj)
        # The "full" file turns every option on: the monitors and dashboards are rendered.
        if path.endswith("full-values.yaml"):
            for kind in ["PodMonitor", "ServiceMonitor", "ConfigMap"]:
                if kind not in kinds:
                    fail(f"{source}: renders no {kind}")
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
        ({"monitoring": {"interval": "often"}}, "interval"),
        ({"dashboards": {"enable": True}}, "enable"),
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


def check_dashboards():
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "deploy", "grafana", "*.json")))
    copies = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CHART, "dashboards", "*.json")))
    if shipped != copies:
        fail(f"deploy/helm/herald/dashboards has {copies}, deploy/grafana has {shipped}")
        return
    for name in shipped:
        with open(os.path.join(ROOT, "deploy", "grafana", name)) as a, open(os.path.join(CHART, "dashboards", name)) as b:
            if json.load(a) != json.load(b):
                fail(f"deploy/helm/herald/dashboards/{name} differs from deploy/grafana/{name}: copy it again")
                continue
    print(f"ok   the chart's dashboards are deploy/grafana's ({len(shipped)})")


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
check_dashboards()
check_compose()
if failures:
    print(f"{len(failures)} failure(s)")
    sys.exit(1)
