#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared script, for a session that is lent a device
# machine (an NVIDIA H100/H200 with no internet, a plain python3 with numpy, pytest and
# tokenizers; see /work/.library/device/README.md). Device time is short (15 minutes for
# everything, the machine's start included; at most 10 minutes a call), so everything is
# built here first and the first call does the most that fits.
#
# Here, once:     bash benches/gpu_session.sh prepare
#     (the Vulkan loader .debs into .gl/, the wheel into target/wheels/, wgpu-py and its
#     needs for Python 3.12 into .whl/, the web-rwkv runner in benches/peers/target/release/)
# There, via the device tool's `run` with timeout_s 600, carry [".gl", ".whl",
# "target/wheels", "benches/peers/target/release/rwkv-gpu-peers"]:
#     bash benches/gpu_session.sh all      # the first call: smoke bench peers sampling matvec chunks coop split, in that order, until DEADLINE
#     bash benches/gpu_session.sh STEP...  # any of the steps below, in the order given (a second call: the ones `all` skipped)
# Steps:
#     smoke    the golden tests, then the kernels against NumPy through wgpu-py for SMOKE_S (120) s, on the GPU
#     tests    the whole test suite on the GPU (not in `all`)
#     bench    pp512/tg128 (+ argmax, x1-x64 direct and through the Engine, profile, bound) at 2.9B, fp16/nf4/int8
#     peers    compare.py at 2.9B against web-rwkv 0.10.20
#     matvec   tg64 fp16/nf4 under each matvec workgroup shape the tuner times, twice in turn
#     chunks   pp512 fp16/int8 in chunks of 256 and of 512 tokens (the GPU default), A B A B
#     coop     pp512 fp16/int8 on cooperative matrices vs the SIMT kernel, A B A B
#     split    tg64 fp16/nf4 with the decode value projection split 1, 2, 4 ways, twice in turn
#     sampling tg64 x1 and x16 through the Engine drawing on the host and on the device, twice in turn
# DEADLINE (seconds, default 540) bounds the whole run: a step starts only if its estimate
# fits in what is left, and every command is cut at what is left, so the script always
# ends on its own inside the call's 600 s and packs what it has. The summary lines are
# printed (the call returns the output's last 12,000 characters) and written to
# $OUT/summary.txt; every log and JSON goes into $OUT/logs.tar.gz (the device tool brings
# back at most 8 files). SHAPE=0.1b (etc.) overrides the 2.9B shape; PYTHON picks the
# interpreter (a local dry run: PYTHON=.venv/bin/python SHAPE=0.1b ... smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${SHAPE:-2.9b}
out=${OUT:-out}
python=${PYTHON:-python3}
deadline=${DEADLINE:-540}
summary="$out/summary.txt"

say() { echo "$*" | tee -a "$summary"; }
left() { echo $((deadline - SECONDS)); }
pack() { tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true; }

# $OUT and the log folder, once the arguments are known to be steps (a usage error
# leaves nothing behind); the logs are packed however the script ends.
open_output() {
    mkdir -p "$out"
    logs=$(mktemp -d /tmp/gpu_session.XXXXXX)
    : > "$summary"
    trap pack EXIT
}

# Runs a command cut at the time left; its stdout into $logs/$1.json, stderr into .err.
# On failure, the end of its stderr goes into the summary and the step goes on.
run_logged() {
    local name=$1
    shift
    local budget
    budget=$(left)
    if [ "$budget" -lt 10 ]; then
        [ -n "${out_of_time:-}" ] || say "  out of time at $name (${budget}s left): the rest is skipped"
        out_of_time=1
        return 1
    fi
    if ! timeout "$budget" "$@" > "$logs/$name.json" 2> "$logs/$name.err"; then
        say "  $name: failed or cut at ${budget}s:"
        tail -5 "$logs/$name.err" | sed 's/^/    /' | tee -a "$summary"
        return 1
    fi
}

# Prints one line per row whose test starts with $2 (tg rows of one sequence, or pp).
rows() {
    "$python" - "$@" <<'EOF' | tee -a "$summary"
import json, sys
path, prefix, label = sys.argv[1], sys.argv[2], sys.argv[3]
data = json.load(open(path))
info = data["info"]
for r in data["rows"]:
    if r["test"].startswith(prefix) and " x" not in r["test"]:
        share = "" if r["fraction_of_bound"] is None else f" ({100 * r['fraction_of_bound']:.0f}% of bound)"
        print(f"  {label} {r['dtype']} {r['test']}: {r['mean']:.1f} ± {r['std']:.1f} t/s{share} | "
              f"chunks {info['chunk_tokens']}, {info['matmul_kernel']}")
EOF
}

setup_device() {
    # The machine has the NVIDIA driver but no Vulkan loader: unpack the carried one.
    if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    # The wheel, wgpu-py (the kernel tests' second WebGPU stack) and its needs travel as
    # wheels; an interpreter that already has rwkv_gpu (a local dry run) keeps its own.
    if ! "$python" -c "import rwkv_gpu" 2>/dev/null; then
        # shellcheck disable=SC2046
        "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site target/wheels/rwkv_gpu-*.whl \
            $(ls .whl/*.whl 2>/dev/null)
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
    "$python" -c "import rwkv_gpu, json; print(json.dumps(rwkv_gpu.adapters(), indent=1))" > "$logs/adapters.json"
    "$python" - "$logs/adapters.json" <<'EOF' | tee -a "$summary"
import json, sys
for a in json.load(open(sys.argv[1])):
    print(f"adapter: {a}")
EOF
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory --format=csv > "$logs/nvidia-smi.csv" 2>&1 || true
}

# The golden outputs (under the device's own kernel choices, every matvec shape, each
# chunk size), then the kernels against NumPy through wgpu-py for at most SMOKE_S seconds
# (default 120; the whole file took 7 min on lavapipe), before any figure is believed.
step_smoke() {
    say "== smoke: golden outputs, then kernels against NumPy ($(left)s left)"
    timeout "$(left)" "$python" -m pytest tests/test_golden.py -q -p no:cacheprovider -x \
        > "$logs/smoke-golden.log" 2>&1 || true
    tail -3 "$logs/smoke-golden.log" | sed 's/^/  golden: /' | tee -a "$summary"
    local cap=${SMOKE_S:-120}
    [ "$cap" -le "$(left)" ] || cap=$(left)
    timeout "$cap" "$python" -m pytest tests/test_kernels.py -q -p no:cacheprovider -x \
        > "$logs/smoke-kernels.log" 2>&1 || true
    if grep -qE "[0-9]+ (passed|failed|error)" "$logs/smoke-kernels.log"; then
        tail -3 "$logs/smoke-kernels.log" | sed 's/^/  kernels: /' | tee -a "$summary"
    else
        # Cut at the cap: count the progress characters (. passed, s skipped, F failed).
        local counts
        counts=$(grep -E '^[.sFExX]+' "$logs/smoke-kernels.log" | sed 's/ *\[.*//' | tr -d '\n' | fold -w1 | sort | uniq -c | tr '\n' ' ')
        say "  kernels: cut at ${cap}s; so far (count, mark): ${counts:-none}"
    fi
}

step_tests() {
    say "== tests: the suite on the GPU ($(left)s left)"
    # test_tokenizer compares with the official package, which is not there; the HTTP
    # server tests need openai, uvicorn and schemathesis, which it lacks, and run no kernel
    # that the rest does not.
    timeout "$(left)" "$python" -m pytest tests -q -p no:cacheprovider -x --ignore tests/test_tokenizer.py \
        --ignore tests/test_server.py --ignore tests/test_server_fuzz.py --ignore tests/test_nginx.py \
        > "$logs/tests.log" 2>&1 || true
    tail -5 "$logs/tests.log" | tee -a "$summary"
}

step_bench() {
    say "== bench: $shape, profile, batches 1-64 ($(left)s left)"
    for dtype in fp16 nf4 int8; do
        run_logged "bench-$dtype" "$python" -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -r 3 --profile \
            --batch 1,4,16,64 --json || continue
        "$python" - "$logs/bench-$dtype.json" <<'EOF' | tee -a "$summary"
import json, sys
data = json.load(open(sys.argv[1]))
info = data["info"]
print(f"{info['adapter']} | {info['model']} | copy {info['copy_bandwidth'] / 1e9:.0f} GB/s | bound {info['tg_bound']:.1f} t/s")
print(f"  prefill matrices: {info['matmul_kernel_note']} | chunks of {info['chunk_tokens']} | draws on the {info['sample_on']}")
print(f"  kernel choices ({info['tuning']}): nf4 by {info['nf4_lookup']}, value projection split {info['split_k']}, "
      f"matvec {info['matvec_lanes']} lanes x {info['matvec_rows']} rows x {info['matvec_depth']} deep by "
      f"{info['matvec_reduction']}")
for r in data["rows"]:
    share = "" if r["fraction_of_bound"] is None else f" ({100 * r['fraction_of_bound']:.0f}% of bound)"
    extra = "" if r.get("dispatches_per_layer") is None else (
        f" | {r['dispatches_per_layer']:.1f} dispatches/layer, host {r['host_us_per_submission']:.0f} us/submission")
    print(f"  {r['dtype']} {r['test']}: {r['mean']:.2f} ± {r['std']:.2f} {r['unit']}{share}{extra}")
for test, kernels in (info.get("kernel_profile") or {}).items():
    if not kernels:
        continue
    total = sum(k["us"] for k in kernels.values())
    print(f"  {test} GPU time per kernel ({total:.0f} us in all; the 10 longest):")
    for name, k in list(kernels.items())[:10]:
        rate = f", {k['bytes'] / (k['us'] * 1e3):.3g} GB/s" if k["bytes"] and k["us"] else ""
        print(f"    {name}: {k['calls']} dispatches, {k['us']:.0f} us{rate}")
reads = info.get("ffn_value_reads")
if reads:
    print(f"  ffn value reads: {100 * reads['zero_inputs']:.0f}% zero inputs, "
          f"{reads['bytes_per_token'] / reads['dense_bytes_per_token']:.2f} of the dense bytes")
EOF
    done
}

step_peers() {
    say "== peers: web-rwkv 0.10.20 side by side, $shape ($(left)s left)"
    run_logged peers "$python" benches/peers/compare.py --shape "$shape" -p 512 -n 128 -r 3 --dtypes fp16,int8,nf4 \
        --chunks 128,256 || return 0
    tee -a "$summary" < "$logs/peers.json"
}

# An A/B: for each dtype, every setting in turn, twice (A B A B), each a fresh bench
# process on the same random model; prints the rows whose test starts with $2.
# Usage: ab STEP TEST "DTYPES" "BENCH ARGS" "LABEL VAR=value..." ...
ab() {
    local step=$1 test=$2 dtypes=$3 args=$4
    shift 4
    local dtype round setting label vars name
    for dtype in $dtypes; do
        for round in 1 2; do
            for setting in "$@"; do
                read -r label vars <<< "$setting"
                name="$step-$dtype-$label-$round"
                # shellcheck disable=SC2086
                run_logged "$name" env $vars "$python" -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" $args -r 3 \
                    --json && rows "$logs/$name.json" "$test" "$step $label"
            done
        done
    done
}

# The matrix-vector kernel's workgroups (variants.rs MatvecShape) fixed in turn: what the
# tuner chooses between at load, as whole tg rows. Tuning off, so that the rest is the
# device's defaults (no split, NF4 by table); the tree reduction is forced by turning
# subgroups off (only the matvec and the cooperative prefill kernel use them; -p 16 stays
# on the matvec). Labels: lanes-rows-depth-reduction.
step_matvec() {
    say "== matvec: workgroup shapes, tg64, tuning off ($(left)s left)"
    local off="RWKV_GPU_TUNE=off RWKV_GPU_MATVEC_LANES"
    ab matvec tg "fp16 nf4" "-p 16 -n 64" \
        "wide-8-1-sg $off=wide RWKV_GPU_MATVEC_ROWS=8" "widest-8-1-sg $off=widest RWKV_GPU_MATVEC_ROWS=8" \
        "wide-8-2-sg $off=wide RWKV_GPU_MATVEC_ROWS=8 RWKV_GPU_MATVEC_DEPTH=2" \
        "widest-8-2-sg $off=widest RWKV_GPU_MATVEC_ROWS=8 RWKV_GPU_MATVEC_DEPTH=2" \
        "wide-4-1-sg $off=wide RWKV_GPU_MATVEC_ROWS=4" "widest-4-1-sg $off=widest RWKV_GPU_MATVEC_ROWS=4" \
        "wide-8-1-tree $off=wide RWKV_GPU_MATVEC_ROWS=8 RWKV_GPU_NO_SUBGROUPS=1"
}

# Prefill chunks of 256 tokens (the CPU drivers' size) against 512 (the GPUs'), on
# whichever prefill kernel the load chose.
step_chunks() {
    say "== chunks: pp512 in chunks of 256 and 512 ($(left)s left)"
    ab chunks pp "fp16 int8" "-p 512 -n 8" "256 RWKV_GPU_CHUNK_TOKENS=256" "512 RWKV_GPU_CHUNK_TOKENS=512"
}

# The prefill kernel on matrix units (where the check at load passes) against the SIMT one.
step_coop() {
    say "== coop: pp512 on cooperative matrices and on the SIMT kernel ($(left)s left)"
    ab coop pp "fp16 int8" "-p 512 -n 8" "coop RWKV_GPU_NO_COOP_MATRIX=0" "simt RWKV_GPU_NO_COOP_MATRIX=1"
}

# Split-K decode (src/model/ops.rs Split) fixed at 1, 2 and 4 parts (tuning off: the rest
# is the device's defaults).
step_split() {
    say "== split: the decode value projection in 1, 2, 4 parts, tg64, tuning off ($(left)s left)"
    ab split tg "fp16 nf4" "-p 16 -n 64" "1 RWKV_GPU_TUNE=off RWKV_GPU_SPLIT_K=1" \
        "2 RWKV_GPU_TUNE=off RWKV_GPU_SPLIT_K=2" "4 RWKV_GPU_TUNE=off RWKV_GPU_SPLIT_K=4"
}

# Where generation draws its tokens (shaders/sample.wgsl against src/sampler.rs), on a
# random model of $shape (top_p 0.85, the expensive draw): one sequence
# is the close case (a draw's ~12 passes over the row in one workgroup against 256 KiB
# read back and ~0.3 ms of host arithmetic); at 16 the host's draws grow 16-fold.
# host and device in turn, twice (A B A B); each prints ms a step.
step_sampling() {
    say "== sampling: steps of 1 and 16 sequences drawing on the host and on the device ($(left)s left)"
    local batch round place name
    for batch in 1 16; do
        for round in 1 2; do
            for place in host device; do
                name="sampling-$batch-$place-$round"
                run_logged "$name" env RWKV_GPU_SAMPLE_ON=$place "$python" benches/draw_place.py --shape "$shape" \
                    --batch "$batch" --tokens 32 || continue
                say "  x$batch $place ($round): $(cat "$logs/$name.json")"
            done
        done
    done
}

prepare() {
    grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >> .git/info/exclude
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update -qq
    # shellcheck disable=SC2086
    (cd .gl && apt-get $o download libvulkan1)
    [ -x .venv/bin/maturin ] || bash scripts/install.sh test
    rm -rf target/wheels
    # The portable build (as scripts/install.sh): glibc 2.28+, whatever that machine runs.
    PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin build --release --zig --compatibility manylinux_2_28 -o target/wheels
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    rm -rf .whl
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d .whl wgpu==0.32.0 cffi==2.0.0 pycparser==3.12 rendercanvas==2.7.2
    (cd benches/peers && cargo update -p serde --precise 1.0.228 && cargo build --release)
    ls -la .gl .whl target/wheels benches/peers/target/release/rwkv-gpu-peers
}

usage() {
    echo "usage: bash benches/gpu_session.sh prepare | all | STEP... (smoke tests bench peers sampling matvec chunks coop split)" >&2
    exit 2
}

[ $# -ge 1 ] || usage
if [ "$1" = prepare ]; then
    prepare
    exit 0
fi
steps=("$@")
[ "$1" = all ] && steps=(smoke bench peers sampling matvec chunks coop split)
for step in "${steps[@]}"; do
    case "$step" in
    smoke | tests | bench | peers | sampling | matvec | chunks | coop | split) ;;
    *) usage ;;
    esac
done
open_output
setup_device
for step in "${steps[@]}"; do
    if [ "$(left)" -lt 30 ]; then
        say "== $step: skipped, $(left)s left"
        continue
    fi
    # A step whose last run failed says so in the summary; the next step still runs.
    "step_$step" || true
done
say "== done in ${SECONDS}s; logs in $out/logs.tar.gz"
