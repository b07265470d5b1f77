#!/bin/sh
# Computes the images' sizes where no Docker daemon can build them (README, "Images"):
# the runtime stage's root filesystem, made the way the Dockerfile's base is (Debian 12
# minbase from debootstrap, reduced as the official -slim images are: no documentation but
# copyright files, no manuals, info pages or locales; then ca-certificates as the
# Dockerfile installs it), plus the stripped release binaries built as the Dockerfile
# builds them. Uncompressed sizes, computed, not measured from a built image.
# Needs root, debootstrap and Debian's package mirror; takes a few minutes.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target-image}
work=$(mktemp -d)
trap 'umount "$work/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT

CARGO_TARGET_DIR=$target CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --manifest-path "$root/Cargo.toml" \
    --bin herald-ipam --bin herald-route-speaker --bin herald-cluster-watcher

debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
cd "$work/rootfs"
rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/*
find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/groff/* usr/share/lintian/*
cat >etc/dpkg/dpkg.cfg.d/slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
EOF
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
base=$(du -sb . | cut -f1)
cp /etc/resolv.conf etc/resolv.conf
mount -t proc proc proc
chroot . sh -c 'apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ca-certificates >/dev/null 2>&1 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb'
umount proc
rm etc/resolv.conf
runtime=$(du -sb . | cut -f1)
echo "base (bookworm minbase, slimmed): $(mb "$base")"
echo "runtime stage (+ ca-certificates): $(mb "$runtime")"
all=0
for bin in herald-ipam herald-route-speaker herald-cluster-watcher; do
    size=$(stat -c %s "$target/release/$bin")
    all=$((all + size))
    echo "$bin: binary $(mb "$size"), image $(mb $((runtime + size)))"
done
echo "herald (all three, the chart's image): binaries $(mb "$all"), image $(mb $((runtime + all)))"
