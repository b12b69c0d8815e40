#!/usr/bin/env bash
# Installs what building and testing Chaperone need, idempotently: each step is skipped when
# already done, so a second run takes about a second. Needs root (apt) on a fresh machine.
#
#   - LLVM 22 (matches nightly rustc's LLVM) for bpf-linker; libclang for pg_query's bindgen
#   - nightly rust-src (the eBPF crate is built with -Z build-std=core)
#   - bpf-linker built against LLVM 22 (without LLVM_PREFIX it picks LLVM 14 and fails)
#   - what the end-to-end tests run: curl, python3 (+ psycopg), PostgreSQL 15 server and clients
#     (psql, pgbench), iproute2 for test network namespaces, and a real OpenID Provider
#     (npm oidc-provider, pinned by tests/oidc/package-lock.json; needs node and npm)
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(llvm-22-dev libclang-dev curl python3 iproute2 postgresql-15 postgresql-client-15 python3-psycopg pgbouncer)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    log "rustup toolchain install nightly"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "rustup component add rust-src --toolchain nightly"
    rustup component add rust-src --toolchain nightly
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "cargo install bpf-linker $BPF_LINKER_VERSION (LLVM 22), about 70 s"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
        --no-default-features --features llvm-22
fi
if ! command -v npm >/dev/null; then
    log "apt-get install nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
OIDC_DIR="$(cd "$(dirname "$0")/../tests/oidc" && pwd)"
lock_sum="$(sha256sum "$OIDC_DIR/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$OIDC_DIR/node_modules/.chaperone-lock" 2>/dev/null)" != "$lock_sum" ]; then
    log "npm ci in tests/oidc (oidc-provider)"
    (cd "$OIDC_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_sum" >"$OIDC_DIR/node_modules/.chaperone-lock"
fi
log "ready"
