#!/usr/bin/env bash
# GPU check: build the CUDA executor, check it against the CPU executor on the tiny
# fixture, then time eager, fused and fused-FP8 decode of an 8B-shaped and a
# 1B-shaped Llama with random weights (tokens/s, achieved GB/s, MBU against a copy
# bandwidth measured in the same run), and PyTorch eager decode of the same shapes
# where torch is installed; then the ptxas table of every kernel and, where Nsight
# Compute is installed, `ncu` on the GEMV and attention kernels. Needs an NVIDIA GPU (sm_80 or newer) and its driver;
# NVRTC comes from the CUDA toolkit or, failing that, from pip wheels (the `nvidia-cuda-nvrtc-cu12` wheels, as in .ci/run).
# Runs in about 10 minutes with ncu, under 8 without; every phase has its own time
# limit. The lines to copy into BENCHMARKS.md are the bench lines (tokens/s, GB/s, MBU
# against the copy measured here), the ptxas tables and the ncu DRAM throughputs.
#
#   scripts/gpu-check.sh [--steps N] [--context N]
#
# On a machine without crates.io, build the check where cargo works
# (`cargo build --release -p fusec-cuda --features cuda --example gpu_check`) and
# point GPU_CHECK_BIN at target/release/examples/gpu_check: the build is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=20
context=4096
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --context) context="$2"; shift 2 ;;
        *) echo "usage: $0 [--steps N] [--context N]" >&2; exit 2 ;;
    esac
done

start=$SECONDS
phase() { echo; echo "== $1 ($((SECONDS - start)) s)"; }

phase "GPU"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
    echo "no NVIDIA GPU or driver here: nothing to check" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader

phase "NVRTC"
if [ -z "${FUSEC_NVRTC:-}" ]; then
    nvcc_bin=$(command -v nvcc || true)
    cuda_home=""
    for c in "${CUDA_HOME:-}" "${nvcc_bin:+$(dirname "$(dirname "$nvcc_bin")")}" /usr/local/cuda; do
        if [ -n "$c" ] && compgen -G "$c/lib64/libnvrtc.so*" >/dev/null; then
            cuda_home="$c"
            break
        fi
    done
    if [ -n "$cuda_home" ]; then
        export CUDA_HOME="$cuda_home"
        # libnvrtc opens its builtins library by name, and ptxas gives the tables below.
        export LD_LIBRARY_PATH="$cuda_home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export PATH="$PATH:$cuda_home/bin"
        echo "NVRTC from the CUDA toolkit in $cuda_home"
    else
        venv="${CARGO_TARGET_DIR:-target}/cuda-venv"
        { [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"; }
        "$venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia
        # ptxas, for the per-kernel register and occupancy tables.
        export PATH="$PATH:$site/cuda_nvcc/bin"
        export FUSEC_NVRTC="$site/cuda_nvrtc/lib/libnvrtc.so.12"
        export FUSEC_CUDA_INCLUDE="$site/cuda_runtime/include"
        export LD_LIBRARY_PATH="$site/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "NVRTC from pip wheels: $FUSEC_NVRTC"
    fi
fi

if [ -n "${GPU_CHECK_BIN:-}" ]; then
    check="$GPU_CHECK_BIN"
    echo "using the prebuilt $check"
else
    phase "build (release, --features cuda)"
    timeout 240 cargo build --release --features cuda
    timeout 240 cargo build --release -p fusec-cuda --features cuda --example gpu_check
    check="${CARGO_TARGET_DIR:-target}/release/examples/gpu_check"
fi

phase "fixture: GPU against the CPU executor"
# A mismatch is reported and the timings still run: one device session sees both.
timeout 150 "$check" fixture || echo "FIXTURE FAILED (exit $?)"

phase "copy bandwidth"
timeout 60 "$check" copy || echo "copy failed (exit $?)"

# A 1B-shaped Llama (Llama 3.2 1B's dimensions), written next to the build.
one_b="${CARGO_TARGET_DIR:-target}/llama-1b-shape.toml"
cat >"$one_b" <<'TOML'
[model]
name = "llama-1b-shape"
architecture = "llama"
hidden_size = 2048
num_layers = 16
num_heads = 32
num_kv_heads = 8
head_dim = 64
intermediate_size = 8192
vocab_size = 128256
rope_theta = 500000.0
rms_norm_eps = 1e-5
max_seq_len = 8192
tie_word_embeddings = true
dtype = "bf16"

[target]
gpu = "h100-sxm"
TOML

phase "fusec decode: random weights, batch 1, context $context, $steps timed steps"
for model in examples/llama-3-8b.toml "$one_b"; do
    for variant in eager fused fused-fp8 fused-int8 fused-int4; do
        timeout 90 "$check" bench "$model" "$variant" --context "$context" --steps "$steps" ||
            echo "bench $model $variant failed (exit $?)"
    done
done

phase "ptxas: registers, spills, shared memory and occupancy per kernel (8B, bf16, fp8, int8 and int4)"
fusec_bin="${CARGO_TARGET_DIR:-target}/release/fusec"
if [ -x "$fusec_bin" ]; then
    for p in bf16 fp8 int8 int4; do
        out="${CARGO_TARGET_DIR:-target}/gpu-check/8b-$p"
        timeout 60 "$fusec_bin" compile examples/llama-3-8b.toml --precision "$p" --emit ptx --out "$out" >/dev/null &&
            cat "$out/kernels.sm_90.resources.txt" || echo "ptx for $p failed (exit $?)"
    done
else
    echo "no $fusec_bin (prebuilt check binary only): skipped"
fi

phase "ncu: the GEMV and attention kernels of one fused decode step (8B, bf16 and fp8)"
# Achieved DRAM throughput against the peak (SpeedOfLight), and what limits the memory
# pipeline, for the kernels the cost model treats as bandwidth-bound.
if command -v ncu >/dev/null 2>&1; then
    for variant in fused fused-fp8; do
        timeout 240 ncu --kernel-name regex:'gemv|decode_attention' --launch-skip 20 --launch-count 6 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            "$check" bench examples/llama-3-8b.toml "$variant" --context "$context" --steps 1 2>&1 |
            grep -E '^  [a-z_0-9]+|fusec_k|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per Thread|Theoretical Occupancy' ||
            echo "ncu $variant failed (exit $?)"
    done
else
    echo "ncu is not installed: skipped"
fi

phase "PyTorch eager decode of the same shapes"
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    timeout 150 python3 - "$context" "$steps" <<'PY' || echo "PyTorch comparison failed (exit $?)"
# Hugging Face LlamaForCausalLM's eager decode step, op for op (RMSNorm in f32, RoPE
# with rotate_half, the KV cache grown by cat, repeat_kv, matmul-softmax attention),
# written with plain torch so that it needs no transformers; random bf16 weights.
import sys
import time

import torch

context, steps = int(sys.argv[1]), int(sys.argv[2])
dev = torch.device("cuda")
torch.manual_seed(0)

def copy_bw():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best

def rms(x, w, eps=1e-5):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def run(name, hidden, layers, heads, kv, hd, inter, vocab, tied):
    dt = torch.bfloat16
    r = lambda *s: (torch.rand(*s, device=dev, dtype=dt) - 0.5) * 0.1
    L = [dict(n1=torch.ones(hidden, device=dev, dtype=dt), q=r(heads * hd, hidden), k=r(kv * hd, hidden),
              v=r(kv * hd, hidden), o=r(hidden, heads * hd), n2=torch.ones(hidden, device=dev, dtype=dt),
              g=r(inter, hidden), u=r(inter, hidden), d=r(hidden, inter)) for _ in range(layers)]
    emb = r(vocab, hidden)
    head = emb if tied else r(vocab, hidden)
    norm = torch.ones(hidden, device=dev, dtype=dt)
    past = context - 1
    cache = [(r(1, kv, past, hd), r(1, kv, past, hd)) for _ in range(layers)]
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    mask = torch.zeros(1, 1, 1, context, device=dev, dtype=dt)
    ids = torch.tensor([[7]], device=dev)

    def step():
        pos = torch.tensor([[past]], device=dev)
        freqs = (inv[None, :, None].expand(1, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        e = torch.cat((freqs, freqs), dim=-1)
        cos, sin = e.cos().to(dt)[:, None], e.sin().to(dt)[:, None]
        x = emb[ids]
        for w, (pk, pv) in zip(L, cache):
            n = rms(x, w["n1"])
            q = (n @ w["q"].T).view(1, 1, heads, hd).transpose(1, 2)
            k = (n @ w["k"].T).view(1, 1, kv, hd).transpose(1, 2)
            v = (n @ w["v"].T).view(1, 1, kv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat((pk, k), dim=-2)
            v = torch.cat((pv, v), dim=-2)
            rep = heads // kv
            k = k[:, :, None].expand(1, kv, rep, context, hd).reshape(1, heads, context, hd)
            v = v[:, :, None].expand(1, kv, rep, context, hd).reshape(1, heads, context, hd)
            s = (q @ k.transpose(2, 3)) * hd ** -0.5 + mask
            p = torch.softmax(s.float(), dim=-1).to(dt)
            a = (p @ v).transpose(1, 2).reshape(1, 1, heads * hd)
            x = x + a @ w["o"].T
            n = rms(x, w["n2"])
            x = x + (torch.nn.functional.silu(n @ w["g"].T) * (n @ w["u"].T)) @ w["d"].T
        logits = rms(x, norm) @ head.T
        return logits.argmax(-1)

    with torch.no_grad():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt_step = (time.perf_counter() - t) / steps
    weights = sum(x.numel() for w in L for x in w.values()) + emb.numel() + (0 if tied else head.numel()) + hidden
    floor = 2 * weights + 2 * layers * 2 * kv * hd * context
    print(f"{name:<14} torch eager bf16 B=1 ctx={context}: {dt_step * 1e3:8.2f} ms/step, {1 / dt_step:8.1f} tok/s, "
          f"floor {floor / 1e9:6.2f} GB, MBU {100 * floor / dt_step / bw:5.1f}% of {bw / 1e9:.0f} GB/s copy "
          f"[{torch.cuda.get_device_name()}, torch {torch.__version__}]")
    del L, emb, head, cache
    torch.cuda.empty_cache()

bw = copy_bw()
run("llama-3-8b", 4096, 32, 32, 8, 128, 14336, 128256, False)
run("llama-1b-shape", 2048, 16, 32, 8, 64, 8192, 128256, True)
PY
else
    echo "torch with CUDA is not installed: skipped"
fi

phase "done"
