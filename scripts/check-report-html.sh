#!/usr/bin/env bash
# Renders the HTML form of `fusec report` in a real headless browser (Debian's
# chromium) and checks that its charts are drawn: four inline SVGs, circles on the
# roofline, rects in the stacked bars, polylines in the two sweeps. Saves the page,
# the DOM chromium built from it, and a screenshot under target/report-check/.
#
# Chromium is installed with apt-get when it is missing. Where that is impossible (no
# root, no network) the check is skipped LOUDLY, and fails when FUSEC_REQUIRE_TOOLS is
# set (as .ci/run sets it), so that CI never passes without having drawn the page.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
out="${REPORT_CHECK_DIR:-target/report-check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

skip() {
    echo "################################################################" >&2
    echo "## SKIPPED check-report-html: $*" >&2
    echo "################################################################" >&2
    if [ -n "${FUSEC_REQUIRE_TOOLS:-}" ]; then
        echo "check-report-html: FAIL: FUSEC_REQUIRE_TOOLS is set" >&2
        exit 1
    fi
    exit 0
}
fail() {
    echo "check-report-html: FAIL: $*" >&2
    exit 1
}

find_chromium() {
    for c in chromium chromium-browser google-chrome; do
        if command -v "$c" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

chrome="$(find_chromium || true)"
if [ -z "$chrome" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        skip "chromium is not installed and apt-get cannot install it here (needs root and apt)"
    fi
    echo "installing chromium with apt-get (about 2 minutes)..."
    if ! timeout 900 apt-get update -q >"$out/apt.log" 2>&1 \
        || ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q chromium >>"$out/apt.log" 2>&1; then
        tail -5 "$out/apt.log" >&2 || true
        skip "apt-get could not install chromium (see $out/apt.log)"
    fi
    chrome="$(find_chromium || true)"
    [ -n "$chrome" ] || skip "chromium installed but not found on PATH"
fi
echo "browser: $("$chrome" --version 2>/dev/null | tail -1)"

page="$out/report.html"
cargo run --quiet --bin fusec -- report examples/llama-3-8b.toml \
    --gpu h100-sxm --precision fp8 --format html --out "$page" --force >/dev/null

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-background-networking
    --disable-component-update --disable-sync --no-first-run
    --user-data-dir="$profile" --hide-scrollbars)

timeout 120 "$chrome" "${flags[@]}" --dump-dom "file://$page" >"$out/dom.html" 2>"$out/chromium.log" \
    || fail "chromium --dump-dom failed (see $out/chromium.log)"
timeout 120 "$chrome" "${flags[@]}" --window-size=1280,2600 --screenshot="$out/report.png" \
    "file://$page" >>"$out/chromium.log" 2>&1 \
    || fail "chromium --screenshot failed (see $out/chromium.log)"

# The elements of one chart: the lines from its <svg id="..."> to its </svg>.
chart() {
    sed -n "/<svg[^>]*id=\"$1\"/,/<\/svg>/p" "$out/dom.html"
}
# How many <tag> elements chart $1 holds.
count() {
    chart "$1" | grep -o "<$2[ >]" | wc -l | tr -d ' '
}
# Fails unless chart $1 holds at least $3 <$2> elements.
expect() {
    local n
    n="$(count "$1" "$2")"
    [ "$n" -ge "$3" ] || fail "chart #$1 has $n <$2> elements, expected at least $3"
    echo "ok: #$1 draws $n <$2>"
}

grep -q '<h1>fusec report: llama-3-8b on h100-sxm</h1>' "$out/dom.html" \
    || fail "the page did not render its title"
for id in roofline step-bars context-sweep batch-sweep; do
    [ "$(grep -c "<svg[^>]*id=\"$id\"" "$out/dom.html")" = 1 ] || fail "no <svg id=\"$id\">"
done
# 3 variants: every variant has kernels with FLOPs on the roofline, a bar of at least
# two segments, and a line in each sweep.
expect roofline circle 12
expect roofline polyline 2
expect step-bars rect 8
expect context-sweep polyline 3
expect context-sweep circle 9
expect batch-sweep polyline 3
for v in eager fused 'fused+fp8'; do
    grep -q "<th>$v</th>" "$out/dom.html" || fail "no column for variant $v"
done
grep -q '\$/M tokens' "$out/dom.html" || fail "no cost per million tokens"
grep -qi '<script' "$out/dom.html" && fail "the page has a script"
grep -Eq '(src|href)="(https?:)?//' "$out/dom.html" && fail "the page links outside itself"

size=$(wc -c <"$out/report.png" | tr -d ' ')
[ "$size" -gt 50000 ] || fail "the screenshot is only $size bytes: was anything drawn?"
echo "ok: screenshot $out/report.png ($size bytes)"
echo "check-report-html: passed in $(($(date +%s) - start)) s"
