#!/bin/bash
# Wall time (best of 3) of commands that must fail at once, for each source tree given (run from the checkout:
# benchmarks/time_errors.sh OLD_TREE NEW_TREE; a tree is put first on PYTHONPATH; the venv is .venv).
# Needs a shard dataset at $SHARDS (default /tmp/w/shards: python -m data_tools imagefolder
# demo/imagenette-mini/train /tmp/w/shards --split train --samples-per-shard 128).
set -u
PY=${PY:-$PWD/.venv/bin/python}
SHARDS=${SHARDS:-/tmp/w/shards}
cases=(
  "-m largessl pretrain --config debug/mae_vit_tiny optm.base_lr=1"
  "-m largessl pretrain --config debug/mae_vit_tiny distributed.zero_stage=7"
  "-m largessl pretrain --config debug/mae_vit_tny"
  "-m largessl pretrain --config debug/mae_vit_tiny data.train=/no/such/dir"
  "-m largessl pretrain --config debug/mae_vit_tiny data.train=$SHARDS data.train_split=nope"
  "-m largessl pretrain --config pretrain/mae_vith14 --print-config"
  "-m largessl eval knn --checkpoint /tmp/nope --train $SHARDS --val $SHARDS"
  "-m data_tools bogus"
  "-m data_tools imagefolder /nonexistent /tmp/x"
)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for tree in "$@"; do
  echo "=== $tree ($(git -C "$tree" rev-parse --short HEAD 2>/dev/null))"
  for c in "${cases[@]}"; do
    best=999
    for _ in 1 2 3; do
      # shellcheck disable=SC2086
      (cd "$scratch" && PYTHONPATH=$tree /usr/bin/time -o "$scratch/t" -f %e "$PY" $c >"$scratch/out" 2>"$scratch/err")
      best=$(python3 -c "print(min($best, $(tail -1 "$scratch/t")))")
    done
    printf "%6.2f s  python %s\n          -> %s\n" "$best" "$c" "$(cat "$scratch/err" "$scratch/out" | head -1 | cut -c1-100)"
  done
done
