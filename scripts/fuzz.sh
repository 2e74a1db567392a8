#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz on nightly, from the
# corpus in fuzz/corpus (which grows), and prints the executions each reached. A crash is
# written to fuzz/artifacts/<target>/; commit it: tests/fuzz_corpus.rs replays it in every
# `cargo test`. Inputs are capped at 64 KiB and a single allocation at 64 MiB: no input of
# that size may make the readers allocate more (a header claiming terabytes must be refused).
# Usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint state_file tokenizer sampler)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log=$(mktemp)
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -max_len=65536 \
        -malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=10 -artifact_prefix="fuzz/artifacts/$t/" 2>&1 | tee "$log" | grep -E "^(#[0-9]+ +DONE|==|SUMMARY|artifact_prefix)" || true
    runs=$(grep -oE "^#[0-9]+" "$log" | tail -1 | tr -d '#')
    echo "$t: ${runs:-0} executions in ${seconds}s"
    rm -f "$log"
    # Keep what the repository holds small: the inputs that add coverage, under 8 KiB
    # (the seeds whatever their size; cmin would rename them to their hashes).
    seeds=$(mktemp -d)
    cp "fuzz/corpus/$t"/seed-* "$seeds"/ 2>/dev/null || true
    cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" -- -max_len=65536 >/dev/null 2>&1 || true
    find "fuzz/corpus/$t" -type f -size +8k -delete
    cp "$seeds"/seed-* "fuzz/corpus/$t"/ 2>/dev/null || true
    rm -rf "$seeds"
done
