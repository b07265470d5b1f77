#!/usr/bin/env python3
"""Checks what Herald ships for deployment, offline:

- the Helm chart renders with each values file in deploy/helm/herald/ci/, lints clean, and
  every object it renders (and every CRD in its crds/) is valid against the Kubernetes
  schemas of the versions in KUBERNETES_VERSIONS, strictly (unknown fields are errors);
- values that must be refused are refused, with the message a user needs;
- the Prometheus operator's ServiceMonitor and PodMonitor and cert-manager's Certificate and
  Issuer, which kubernetes-validate does not know, are checked against the small schemas
  below (the fields the chart uses, as monitoring.coreos.com/v1's and cert-manager.io/v1's
  CRDs define them; unknown fields are errors);
- mutual TLS holds together: each pod mounts the Secret its Certificate writes, the
  clients' ipam_server_name is a name of herald-ipam's certificate, each certificate names
  the identity herald-ipam allows its component's calls, and plaintext is allowed only when
  tls.enabled is false;
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


def _cert_manager_metadata():
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }


# cert-manager.io/v1's Go durations and key usages (its Certificate CRD's enum).
_DURATION = {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(h|m|s|ms))+$"}
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]

CERTIFICATE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _cert_manager_metadata(),
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            # cert-manager refuses a Certificate that names nothing.
            "anyOf": [{"required": ["commonName"]}, {"required": ["dnsNames"]}, {"required": ["uris"]}],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "isCA": {"type": "boolean"},
                "commonName": {"type": "string", "maxLength": 64},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "uris": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*://"}},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
            },
        },
    },
}

ISSUER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Issuer"},
        "metadata": _cert_manager_metadata(),
        "spec": {
            "type": "object",
            "additionalProperties": False,
            # One kind of issuer each.
            "oneOf": [{"required": ["selfSigned"]}, {"required": ["ca"]}],
            "properties": {
                "selfSigned": {"type": "object", "additionalProperties": False, "properties": {}},
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["secretName"],
                    "properties": {"secretName": {"type": "string", "minLength": 1}},
                },
            },
        },
    },
}

# Kinds whose schema is not part of Kubernetes (the Prometheus operator's, cert-manager's):
# kubernetes-validate does not know them, so they are checked against these instead. Any
# other unknown kind fails.
FOREIGN_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("endpoints"),
    "PodMonitor": _monitor_schema("podMetricsEndpoints"),
    "Certificate": CERTIFICATE_SCHEMA,
    "Issuer": ISSUER_SCHEMA,
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


# Each component: its workload and settings ConfigMap (release "herald"), the settings file's
# name, and the identity its certificate must name for herald-ipam to allow its calls
# (crates/tls/src/identity.rs, services/ipam/src/authz.rs).
COMPONENTS = {
    "ipam": ("herald-ipam", "herald-ipam.yaml", None),
    "watcher": ("herald-cluster-watcher", "herald-cluster-watcher.yaml", "spiffe://{td}/herald/watcher"),
    "speaker": ("herald-route-speaker", "herald-route-speaker.yaml", "spiffe://{td}/herald/speaker"),
}


def check_tls(source, values, objects):
    """Mutual TLS holds together in what one values file renders."""
    tls = values["tls"]
    td = tls["trustDomain"]
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj.get("kind"), {})[obj["metadata"]["name"]] = obj
    certificates = by_kind.get("Certificate", {})
    settings = {}
    for component, (name, file, _) in COMPONENTS.items():
        config_map = by_kind.get("ConfigMap", {}).get(name)
        if config_map is None:
            fail(f"{source}: no ConfigMap {name}")
            return
        settings[component] = yaml.safe_load(config_map["data"][file]) or {}
    ipam = settings["ipam"]
    if not tls["enabled"]:
        if ipam.get("allow_plaintext") is not True:
            fail(f"{source}: tls.enabled=false but herald-ipam's settings do not allow plaintext")
        for component, s in settings.items():
            for key in ("tls_cert", "tls_key", "tls_ca", "tls_client_ca", "ipam_server_name"):
                if key in s:
                    fail(f"{source}: tls.enabled=false but {component}'s settings set {key}")
        if certificates:
            fail(f"{source}: tls.enabled=false but Certificates are rendered: {sorted(certificates)}")
        print(f"ok   {source}: plaintext only as asked (tls.enabled=false)")
        return
    if "allow_plaintext" in ipam:
        fail(f"{source}: mutual TLS is on but herald-ipam's settings carry allow_plaintext")
    if ipam.get("trust_domain") != td:
        fail(f"{source}: herald-ipam's trust_domain is {ipam.get('trust_domain')!r}, not tls.trustDomain {td!r}")
    server_cert = None
    for component, (name, file, identity) in COMPONENTS.items():
        s = settings[component]
        keys = ["tls_cert", "tls_key", "tls_client_ca" if component == "ipam" else "tls_ca"]
        missing = [k for k in keys if not s.get(k)]
        if missing:
            fail(f"{source}: {component}'s settings lack {missing}")
            continue
        if component != "ipam" and not str(s.get("ipam_endpoint", "")).startswith("https://"):
            fail(f"{source}: {component} calls herald-ipam at {s.get('ipam_endpoint')!r}, not https://")
        # The files the settings name are in the Secret the pod mounts.
        workload = next((w for kind in ("Deployment", "StatefulSet", "DaemonSet")
                         for w in [by_kind.get(kind, {}).get(name)] if w), None)
        if workload is None:
            fail(f"{source}: no workload {name}")
            continue
        pod = workload["spec"]["template"]["spec"]
        volume = next((v for v in pod.get("volumes", []) if v["name"] == "tls"), None)
        mount = next((m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == "tls"), None)
        if volume is None or mount is None or "secret" not in volume:
            fail(f"{source}: {name} mounts no certificate Secret")
            continue
        files = {os.path.join(mount["mountPath"], i["path"]) for i in volume["secret"].get("items", [])}
        for k in keys:
            if s[k] not in files:
                fail(f"{source}: {component}'s {k} {s[k]!r} is not a file of the Secret it mounts ({sorted(files)})")
        secret = volume["secret"]["secretName"]
        if tls["source"] == "existingSecret":
            if secret != tls["existingSecrets"][component]:
                fail(f"{source}: {name} mounts {secret!r}, not tls.existingSecrets.{component}")
            continue
        cert = next((c for c in certificates.values() if c["spec"]["secretName"] == secret), None)
        if cert is None:
            fail(f"{source}: {name} mounts {secret!r}, which no Certificate writes")
            continue
        if identity and identity.format(td=td) not in cert["spec"].get("uris", []):
            fail(f"{source}: {component}'s certificate does not name {identity.format(td=td)}: {cert['spec']}")
        usage = "server auth" if component == "ipam" else "client auth"
        if usage not in cert["spec"].get("usages", []):
            fail(f"{source}: {component}'s certificate is not for {usage}")
        if component == "ipam":
            server_cert = cert
        issuer = cert["spec"]["issuerRef"]
        given = tls["certManager"]["issuerRef"]
        if given.get("name"):
            if issuer != given:
                fail(f"{source}: {cert['metadata']['name']} is issued by {issuer}, not tls.certManager.issuerRef {given}")
        elif issuer.get("kind") != "Issuer" or issuer["name"] not in by_kind.get("Issuer", {}):
            fail(f"{source}: {cert['metadata']['name']} names an issuer the chart does not render: {issuer}")
    if server_cert is not None:
        for component in ("watcher", "speaker"):
            wanted = settings[component].get("ipam_server_name")
            if wanted not in server_cert["spec"].get("dnsNames", []):
                fail(f"{source}: {component} expects herald-ipam's certificate to name {wanted!r}; it names {server_cert['spec'].get('dnsNames')}")
    print(f"ok   {source}: mutual TLS ({tls['source']}) holds together")


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
        objects = []
        for template, text in sorted(render(chart, values, source).items()):
            for obj in documents(text):
                count += 1
                kinds.add(obj.get("kind"))
                objects.append(obj)
                validate(f"{source} {template}", obj)
        check_tls(source, chart.merge_values(values), objects)
        # The "full" file turns every option on: the monitors and dashboards are rendered.
        if path.endswith("full-values.yaml"):
            for kind in ["PodMonitor", "ServiceMonitor", "ConfigMap", "Certificate"]:
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
        ({"tls": {"source": "vault"}}, "source"),
        ({"ipam": {"databaseSecret": {"name": "db"}}, "tls": {"source": "existingSecret", "existingSecrets": {"ipam": "a", "watcher": "b"}}},
         "tls.existingSecrets.speaker is required"),
        ({"ipam": {"databaseSecret": {"name": "db"}, "settings": {"allow_plaintext": True}}}, "allow_plaintext"),
        ({"tls": {"certManager": {"duration": "90 days"}}}, "duration"),
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
    # The stack, and the override that turns mutual TLS on.
    for name in ["docker-compose.yml", "docker-compose.mtls.yml"]:
        result = subprocess.run(
            ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", os.path.join(ROOT, name)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            fail(f"{name}: {result.stdout.strip()} {result.stderr.strip()}")
        else:
            print(f"ok   {name} against the Compose specification")
    check_compose_tls()


def check_compose_tls():
    """The override's certificate files are the ones deploy/compose/tls/issue.sh writes, and
    every service calling herald-ipam does so over https with a certificate."""
    with open(os.path.join(ROOT, "deploy", "compose", "tls", "issue.sh")) as f:
        script = f.read()
    issued = {"ca"} | {line.split()[1] for line in script.splitlines() if line.startswith("issue ")}
    with open(os.path.join(ROOT, "docker-compose.mtls.yml")) as f:
        override = yaml.safe_load(f)
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        base = yaml.safe_load(f)
    source = "docker-compose.mtls.yml"
    for name, service in override["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            if key.startswith("HERALD_TLS_"):
                stem = os.path.basename(value).rsplit(".", 1)[0]
                if not value.startswith("/tls/") or stem not in issued:
                    fail(f"{source}: {name}'s {key}={value} is not a file issue.sh writes ({sorted(issued)})")
    for name, service in base["services"].items():
        if "HERALD_IPAM_ENDPOINT" in service.get("environment", {}):
            env = override["services"].get(name, {}).get("environment", {})
            if not str(env.get("HERALD_IPAM_ENDPOINT", "")).startswith("https://") or "HERALD_TLS_CERT" not in env:
                fail(f"{source}: {name} still calls herald-ipam without a certificate")
    ipam = override["services"]["ipam"]["environment"]
    if ipam.get("HERALD_ALLOW_PLAINTEXT") != "false" or "HERALD_TLS_CLIENT_CA" not in ipam:
        fail(f"{source}: herald-ipam does not require client certificates")
    print(f"ok   {source}: every caller of herald-ipam has a certificate issue.sh writes")


check_chart()
check_dashboards()
check_compose()
if failures:
    print(f"{len(failures)} failure(s)")
    sys.exit(1)
