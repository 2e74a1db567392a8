#!/usr/bin/env bash
# Checks what users install: the wheel scripts/install.sh built is one abi3 wheel that
# auditwheel accepts as manylinux_2_28 (Linux), installs into a fresh virtual environment
# and gives the golden logits there; the sdist builds and a wheel builds from it.
# Run by scripts/test.sh after the tests; needs `bash scripts/install.sh test` first.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(target/wheels/rwkv_gpu-*.whl)
[ ${#wheels[@]} = 1 ] || { echo "error: expected one wheel in target/wheels, found ${#wheels[@]}" >&2; exit 1; }
wheel=${wheels[0]}
case "$wheel" in *-cp310-abi3-*) ;; *) echo "error: $wheel is not an abi3 wheel" >&2; exit 1 ;; esac
if [ "$(uname -s)" = Linux ]; then
    shown=$(.venv/bin/auditwheel show "$wheel")
    echo "$shown" >&2
    grep -q 'platform tag: "manylinux_2_28_x86_64"' <<<"$shown" \
        || { echo "error: auditwheel does not take $wheel as manylinux_2_28" >&2; exit 1; }
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv" 2>/dev/null || .venv/bin/python -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$wheel"
root=$PWD
(cd "$tmp" && "$tmp/venv/bin/python" - "$root/tests/data/tiny-rwkv7" <<'PY'
import sys, warnings
import numpy as np
warnings.simplefilter("ignore")
import rwkv_gpu
data = sys.argv[1]
cases = np.load(f"{data}/cases.npz")
model = rwkv_gpu.Model(f"{data}/model.safetensors")
got = model.forward(cases["prompt"], model.new_state(), all_logits=True)
assert np.abs(got - cases["prompt_logits"]).max() < 1e-3, "golden logits from the installed wheel"
print("installed wheel: golden logits match", file=sys.stderr)
PY
)
echo "== sdist" >&2
.venv/bin/maturin sdist -o "$tmp/sdist" >&2
# Built as pip would from PyPI (isolated, through our backend); the target folder is
# shared so that the crates compiled above are reused.
CARGO_TARGET_DIR="$PWD/target" .venv/bin/python -m pip wheel -q --no-deps "$tmp"/sdist/rwkv_gpu-*.tar.gz -w "$tmp/from-sdist"
ls "$tmp"/from-sdist/rwkv_gpu-*-cp310-abi3-*.whl >&2
