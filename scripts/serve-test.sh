#!/usr/bin/env bash
# `fusec serve` against the official OpenAI Python client: makes a venv under target/,
# installs the pinned `openai` package (a failed install fails the script), starts two
# servers of the bundled tiny model on free ports (one paced by --step-delay-ms, for
# the disconnect test), runs scripts/serve_client_test.py, and stops the servers.
#
#   FUSEC_BIN   the fusec binary to serve with (default: cargo build's, target/debug/fusec:
#               the tiny model needs no optimised build, and cargo test has built it)
set -euo pipefail
cd "$(dirname "$0")/.."

openai_version="3.60.0"
target="${CARGO_TARGET_DIR:-target}"
venv="$target/serve-venv"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check "openai==$openai_version"
fi

if [ -z "${FUSEC_BIN:-}" ]; then
    cargo build --quiet --bin fusec
    FUSEC_BIN="$target/debug/fusec"
fi

logs=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$logs"
}
trap cleanup EXIT

# Starts a server on a free port in the background (in this shell, so that cleanup
# knows its pid).
start() {
    local name=$1
    shift
    "$FUSEC_BIN" serve examples/tiny-chat/model.toml --port 0 "$@" >"$logs/$name.log" 2>&1 &
    pids+=($!)
}

# Prints the URL of a started server once it listens.
url_of() {
    local log="$logs/$1.log" url
    for _ in $(seq 600); do
        url=$(grep -o 'http://[0-9.]*:[0-9]*' "$log" 2>/dev/null | head -1 || true)
        if [ -n "$url" ]; then
            echo "$url"
            return 0
        fi
        if grep -qi 'error' "$log" 2>/dev/null; then
            echo "error: fusec serve exited:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "error: fusec serve did not start in 60 s:" >&2
    cat "$log" >&2
    return 1
}

# The 64-request test runs with fewer KV blocks than 16 full sequences need, so that
# sequences are preempted and recomputed along the way.
start base --kv-blocks 40 --token-budget 48 --prefill-chunk 8
start paced --step-delay-ms 20
base=$(url_of base)
paced=$(url_of paced)
"$venv/bin/python" scripts/serve_client_test.py "$base" "$paced"
