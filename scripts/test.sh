#!/usr/bin/env bash
# Installs the test needs and runs every test: Rust unit tests (kernel sources checked
# by naga, no GPU needed) and pytest on whatever Vulkan adapter is present (lavapipe in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

echo "== lint: rustfmt, clippy, ruff, mypy, type stubs against the built module" >&2
cargo fmt --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo clippy --release --features python --all-targets -- -D warnings
.venv/bin/ruff check python tests benches scripts fuzz tools
.venv/bin/python -m mypy
.venv/bin/python -m mypy.stubtest rwkv_gpu._core

echo "== cargo test" >&2
cargo test --release

echo "== pytest" >&2
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider
code=$?
set -e
if [ "$code" = 5 ]; then
    echo "error: pytest collected no tests" >&2
fi
[ "$code" = 0 ] || exit "$code"

echo "== package" >&2
bash scripts/check_package.sh
