#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared script, for a session that is lent a device
# machine (an NVIDIA H100/H200 with no internet, a plain python3 with numpy, pytest and
# tokenizers; see /work/.library/device/README.md). Device time is short (15 minutes for
# everything), so everything is built here first and each call does one thing.
#
# Here, once:     bash benches/gpu_session.sh prepare
#     (the Vulkan loader .debs into .gl/, the wheel into target/wheels/, wgpu-py and its
#     needs for Python 3.12 into .whl/, the web-rwkv runner in benches/peers/target/release/)
# There, via the device tool's `run`, carry [".gl", ".whl", "target/wheels",
# "benches/peers/target/release/rwkv-gpu-peers"]:
#     bash benches/gpu_session.sh tests    # the test suite on the GPU (driver shader bugs; kernels against NumPy through wgpu-py), ~3 min
#     bash benches/gpu_session.sh bench    # pp512/tg128 (+ argmax, x1-x64 direct and through the Engine, profile, bound) at 2.9B, fp16/int8/nf4
#     bash benches/gpu_session.sh peers    # compare.py at 2.9B against web-rwkv 0.10.20
#     bash benches/gpu_session.sh coop     # pp512 fp16/int8 on cooperative matrices vs the SIMT kernel, A B A B
#     bash benches/gpu_session.sh split    # tg64 fp16/nf4 with the decode value projection split 1, 2, 4 ways, twice in turn
#     bash benches/gpu_session.sh matvec   # tg64 fp16/nf4 under each matvec workgroup shape the tuner times, twice in turn
#     bash benches/gpu_session.sh chunks   # pp512 fp16/int8 in chunks of 256 and of 512 tokens (the GPU default), A B A B
# Each writes its logs and tables under $OUT (or out/ when OUT is unset).
# SHAPE=0.1b (etc.) overrides the 2.9B shape.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shape=${SHAPE:-2.9b}
out=${OUT:-out}
mkdir -p "$out"

setup_device() {
    # The machine has the NVIDIA driver but no Vulkan loader: unpack the carried one.
    if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    # wgpu-py (the kernel tests' second WebGPU stack) and its needs travel as wheels.
    # shellcheck disable=SC2046
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site target/wheels/rwkv_gpu-*.whl \
        $(ls .whl/*.whl 2>/dev/null)
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
    python3 -c "import rwkv_gpu, json; print(json.dumps(rwkv_gpu.adapters(), indent=1))" | tee "$out/adapters.json"
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
}

case "$mode" in
prepare)
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
    ;;
tests)
    setup_device
    # Everything runs the real shaders on the GPU, the kernel tests through wgpu-py.
    # test_tokenizer compares with the official package, which is not there either.
    # The HTTP server tests need openai, uvicorn and schemathesis, which it lacks; they run no
    # kernel that the rest does not.
    python3 -m pytest tests -q -p no:cacheprovider -x --ignore tests/test_tokenizer.py --ignore tests/test_server.py \
        --ignore tests/test_server_fuzz.py --ignore tests/test_nginx.py 2>&1 | tee "$out/tests.log"
    ;;
bench)
    setup_device
    for dtype in fp16 int8 nf4; do
        python3 -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -r 3 --profile --batch 1,4,16,64 --json \
            > "$out/bench-$dtype.json" 2> "$out/bench-$dtype.err" || { tail -20 "$out/bench-$dtype.err"; exit 1; }
        python3 - "$out/bench-$dtype.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
info = data["info"]
print(f"{info['adapter']} | {info['model']} | copy {info['copy_bandwidth'] / 1e9:.0f} GB/s | bound {info['tg_bound']:.1f} t/s")
print(f"  prefill matrices: {info['matmul_kernel_note']}")
print(f"  kernel choices ({info['tuning']}): nf4 by {info['nf4_lookup']}, value projection split {info['split_k']}, "
      f"matvec {info['matvec_lanes']} lanes x {info['matvec_rows']} rows by {info['matvec_reduction']}")
for r in data["rows"]:
    share = "" if r["fraction_of_bound"] is None else f" ({100 * r['fraction_of_bound']:.0f}% of bound)"
    print(f"  {r['dtype']} {r['test']}: {r['mean']:.2f} ± {r['std']:.2f} {r['unit']}{share}")
EOF
    done
    ;;
peers)
    setup_device
    python3 benches/peers/compare.py --shape "$shape" -p 512 -n 128 -r 3 --dtypes fp16,int8,nf4 --chunks 128,256 \
        2> "$out/peers.err" | tee "$out/peers.md"
    ;;
coop)
    # The prefill kernel on matrix units against the SIMT one: each run loads the same
    # random model; A (cooperative matrices, where the check at load passes) then B
    # (RWKV_GPU_NO_COOP_MATRIX=1), twice.
    setup_device
    for dtype in fp16 int8; do
        for round in 1 2; do
            for mode in coop simt; do
                off=0
                [ "$mode" = simt ] && off=1
                RWKV_GPU_NO_COOP_MATRIX=$off python3 -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -p 512 -n 8 -r 3 \
                    --json > "$out/coop-$dtype-$mode-$round.json" 2> "$out/coop-$dtype-$mode-$round.err" \
                    || { tail -20 "$out/coop-$dtype-$mode-$round.err"; exit 1; }
                python3 - "$out/coop-$dtype-$mode-$round.json" "$mode" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
pp = [r for r in data["rows"] if r["test"].startswith("pp")][0]
print(f"{sys.argv[2]} {pp['dtype']} {pp['test']}: {pp['mean']:.1f} ± {pp['std']:.1f} t/s | {data['info']['matmul_kernel_note']}")
EOF
            done
        done
    done
    ;;
split)
    # Split-K decode (src/model/ops.rs Split) fixed at 1, 2 and 4 parts in turn, twice:
    # what the tuner chooses between at load, measured as whole tg rows (tuning off: the
    # rest is the device's defaults).
    setup_device
    for dtype in fp16 nf4; do
        for round in 1 2; do
            for parts in 1 2 4; do
                RWKV_GPU_TUNE=off RWKV_GPU_SPLIT_K=$parts python3 -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -p 16 -n 64 -r 3 \
                    --json > "$out/split-$dtype-$parts-$round.json" 2> "$out/split-$dtype-$parts-$round.err" \
                    || { tail -20 "$out/split-$dtype-$parts-$round.err"; exit 1; }
                python3 - "$out/split-$dtype-$parts-$round.json" "$parts" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data["rows"]:
    if r["test"].startswith("tg") and "x" not in r["test"]:
        print(f"split {sys.argv[2]} {r['dtype']} {r['test']}: {r['mean']:.1f} ± {r['std']:.1f} t/s")
EOF
            done
        done
    done
    ;;
matvec)
    # The matrix-vector kernel's workgroups (variants.rs MatvecShape) fixed in turn, twice:
    # what the tuner chooses between at load, measured as whole tg rows. Tuning off, so
    # that the rest is the device's defaults (no split, NF4 by table); the tree reduction
    # is forced by turning subgroups off (only the matvec and the cooperative prefill
    # kernel use them; -p 16 stays on the matvec).
    setup_device
    for dtype in fp16 nf4; do
        for round in 1 2; do
            for shape_of in wide,8,sg widest,8,sg wide,4,sg widest,4,sg wide,8,tree; do
                IFS=, read -r lanes rows reduce <<< "$shape_of"
                no_sg=0
                [ "$reduce" = tree ] && no_sg=1
                name="$dtype-$lanes-$rows-$reduce-$round"
                RWKV_GPU_TUNE=off RWKV_GPU_MATVEC_LANES=$lanes RWKV_GPU_MATVEC_ROWS=$rows RWKV_GPU_NO_SUBGROUPS=$no_sg \
                    python3 -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -p 16 -n 64 -r 3 --json \
                    > "$out/matvec-$name.json" 2> "$out/matvec-$name.err" || { tail -20 "$out/matvec-$name.err"; exit 1; }
                python3 - "$out/matvec-$name.json" "$shape_of" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data["rows"]:
    if r["test"].startswith("tg") and "x" not in r["test"]:
        share = "" if r["fraction_of_bound"] is None else f" ({100 * r['fraction_of_bound']:.0f}% of bound)"
        print(f"matvec {sys.argv[2]} {r['dtype']} {r['test']}: {r['mean']:.1f} ± {r['std']:.1f} t/s{share}")
EOF
            done
        done
    done
    ;;
chunks)
    # Prefill chunks of 256 tokens (the CPU drivers' size) against 512 (the GPUs'), on
    # whichever prefill kernel the load chose, A B A B.
    setup_device
    for dtype in fp16 int8; do
        for round in 1 2; do
            for chunk in 256 512; do
                name="$dtype-$chunk-$round"
                RWKV_GPU_CHUNK_TOKENS=$chunk python3 -m rwkv_gpu.bench --shape "$shape" --dtype "$dtype" -p 512 -n 8 -r 3 \
                    --json > "$out/chunks-$name.json" 2> "$out/chunks-$name.err" || { tail -20 "$out/chunks-$name.err"; exit 1; }
                python3 - "$out/chunks-$name.json" "$chunk" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
pp = [r for r in data["rows"] if r["test"].startswith("pp")][0]
print(f"chunks of {data['info']['chunk_tokens']}: {pp['dtype']} {pp['test']}: {pp['mean']:.1f} ± {pp['std']:.1f} t/s | {data['info']['matmul_kernel']}")
EOF
            done
        done
    done
    ;;
*)
    echo "usage: bash benches/gpu_session.sh prepare|tests|bench|peers|split|coop|matvec|chunks" >&2
    exit 2
    ;;
esac
