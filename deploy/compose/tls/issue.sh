#!/bin/sh
# Certificates for the compose stack with mutual TLS (docker-compose.mtls.yml; README,
# "Docker Compose"): a throwaway CA and, signed by it, herald-ipam's server certificate,
# one certificate per speaker naming its node, and the watcher identity the lab job uses
# (it registers the nodes and the Service as the watcher would). Written into
# deploy/compose/tls/certs/; run again to start over with a new CA.
set -eu
cd "$(dirname "$0")"
td=${HERALD_TRUST_DOMAIN:-herald.local}
rm -rf certs && mkdir certs && cd certs
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=herald-compose-ca -keyout ca.key -out ca.crt 2>/dev/null
issue() { # name subjectAltName
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
        -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf 'subjectAltName=%s\n' "$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm "$1.csr" "$1.ext"
}
issue ipam DNS:ipam,DNS:localhost,IP:127.0.0.1
issue node-1 "URI:spiffe://$td/herald/speaker/node/node-1"
issue node-2 "URI:spiffe://$td/herald/speaker/node/node-2"
issue watcher "URI:spiffe://$td/herald/watcher"
issue operator "URI:spiffe://$td/herald/operator"
rm -f ca.srl
# The containers run as UID 65532 (Herald) and others, not as you: the keys of this
# throwaway lab CA are made readable to them. Never do this with keys that matter.
chmod 0644 ./*.key
echo "certificates for trust domain $td in $(pwd)"
