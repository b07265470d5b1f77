#!/bin/sh
# The compose stack's one-shot set-up: the lab of the README through herald-ipam's gRPC API
# (grpcurl, by reflection), in the shapes of Herald's custom resources: the pool, the two
# nodes, the BGP peer and advertisement, and one Service's address. Every call is
# idempotent, so the job can run again.
set -eu
ipam=ipam:50051
# With mutual TLS (docker-compose.mtls.yml mounts the certificates at /tls), the job calls
# as the watcher, whose part it plays here; else in plaintext.
if [ -f /tls/watcher.crt ]; then
    call() { grpcurl -cacert /tls/ca.crt -cert /tls/watcher.crt -key /tls/watcher.key \
        -servername ipam -d "$2" "$ipam" "$1"; }
else
    call() { grpcurl -plaintext -d "$2" "$ipam" "$1"; }
fi

# HeraldIPPool "lab". Creating it again reports that it exists; anything else is an error.
if ! out=$(call herald.ipam.v1.Ipam/CreatePool \
    '{"pool": {"name": "lab", "addresses": ["172.16.0.240/28"]}}' 2>&1); then
    case "$out" in *AlreadyExists*) echo "pool lab exists" ;; *) echo "$out" >&2; exit 1 ;; esac
fi

# The nodes, as the watcher would register them from Kubernetes Nodes.
for n in 1 2; do
    call herald.routing.v1.Routing/UpsertNode \
        "{\"name\": \"node-$n\", \"addresses\": [\"10.89.0.1$n\"], \"ready\": true, \"labels\": {\"bgp-peer\": \"true\"}}"
done

# HeraldBGPPeer "tor" and HeraldBGPAdvertisement "lab" (every pool as /32s, to every peer).
call herald.routing.v1.Routing/SetBgpPolicy '{"local_asn": 65010,
  "peers": [{"name": "tor", "address": "10.89.0.2", "asn": 65001,
             "node_selector": {"match_labels": {"bgp-peer": "true"}}}],
  "advertisements": [{}]}'

# The lab Service default/lb-nginx-service (TCP/80): 172.16.0.241, at the ToR via both nodes.
call herald.ipam.v1.Ipam/Allocate '{"owner": {"cluster_id": "lab", "namespace": "default",
  "name": "lb-nginx-service", "uid": "5f1c8a7e"}, "ports": [{"protocol": "TCP", "port": 80}]}'
