#!/usr/bin/env bash
# The GPU checks of the open issues (speed, SIM, evaluation), in priority order, as one prepared script for a
# device session (~10 minutes on one H200; each step has its own time limit, and a failed step does not stop the
# rest). Every `largessl bench` result is one JSON line in $OUT/results.jsonl; the whole log is $OUT/log.
#
#   bash benchmarks/gpu_checks.sh              # on the device: $OUT set by the device tool
#   SMOKE=1 OUT=/tmp/out bash benchmarks/gpu_checks.sh    # on a CPU: the same steps on the debug recipes, tiny
#
# Needs on the device: the wheels in .whl/ (deepspeed, hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, webdataset, braceexpand; `pip wheel --no-deps ... -w .whl`), carried; optionally a checkout
# of facebookresearch/mae in .peer/mae (carried) for the side-by-side. Tracking is off (no MLflow there).
set -uo pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SMOKE=${SMOKE:-0}
if [ -d .whl ] && [ "$SMOKE" = 0 ]; then pip install -q --no-deps .whl/*.whl; fi
L() { python -m largessl "$@"; }
step() {  # step NAME LIMIT_S COMMAND...: run it, say how it ended
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@"; local code=$?
  echo "=== $name: exit $code"
}
nvidia-smi > "$OUT/env.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/env.txt"
python -c "import torch, timm, deepspeed; print(torch.__version__, timm.__version__, deepspeed.__version__)" >> "$OUT/env.txt"
git log -1 --format=%H >> "$OUT/env.txt" 2>/dev/null || true

# ImageNet-size JPEGs (500 x 375, ~110 KB) from the bundled images, as shards; the bundled val set as shards
data=/tmp/gpu-checks; rm -rf "$data"; per_class=$([ "$SMOKE" = 1 ] && echo 5 || echo 50)
step jpegs 120 python benchmarks/imagenet_size_jpegs.py demo/imagenette-mini/train "$data/big" --per-class "$per_class"
step shards 120 python -m data_tools imagefolder "$data/big" "$data/shards" --split train --workers 8
step shards-val 60 python -m data_tools imagefolder demo/imagenette-mini/val "$data/shards" --split val

if [ "$SMOKE" = 1 ]; then
  B=debug/mae_vit_tiny; H=debug/mae_vit_tiny; CAE=debug/cae_vit_tiny; DINO=debug/dino_vit_tiny; SIM=debug/sim_vit_tiny
  n=(--steps 2 --warmup 1); mb() { echo "data.micro_batch_size=8 optim.global_batch_size=8"; }; workers=1
else
  B=pretrain/mae_vitb16; H=pretrain/mae_vith14; CAE=pretrain/cae_vith14; DINO=pretrain/dino_vitb16
  SIM=pretrain/sim_vitb16; n=(--steps 20 --warmup 5); mb() { echo "data.micro_batch_size=$1 optim.global_batch_size=$1"; }
  workers=16
fi
common=(data.train="$data/shards" data.val="$data/shards" tracking.enabled=false)
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python -m largessl bench "$@" --json "$OUT/$name.json"
  [ -f "$OUT/$name.json" ] && { printf '{"check": "%s", "result": ' "$name"; cat "$OUT/$name.json" | tr -d '\n';
                                 echo "}"; } >> "$OUT/results.jsonl"
  rm -f "$OUT/$name.json"
}

# 1. compute ceilings (issue 17): MAE ViT-B/16 and ViT-H/14 at ZeRO-2, ViT-H at ZeRO-3
# shellcheck disable=SC2046
bench mae_b_synthetic 150 --config $B --synthetic "${n[@]}" "${common[@]}" $(mb 256) distributed.zero_stage=2
# shellcheck disable=SC2046
bench mae_h_synthetic 200 --config $H --synthetic "${n[@]}" "${common[@]}" $(mb 96) distributed.zero_stage=2
# shellcheck disable=SC2046
bench mae_h_zero3 200 --config $H --synthetic "${n[@]}" "${common[@]}" $(mb 96) distributed.zero_stage=3
# 2. the input pipeline alone: CPU decode at 16 workers, then the GPU path
# shellcheck disable=SC2046
bench data_cpu_decode 120 --config $B --data-only "${n[@]}" "${common[@]}" $(mb 256) data.num_workers=$workers
# shellcheck disable=SC2046
bench data_gpu_decode 120 --config $B --data-only "${n[@]}" "${common[@]}" $(mb 256) data.num_workers=$workers \
  data.decode=gpu
# 3. MAE ViT-B/16 end to end on the JPEG shards, both decode paths
# shellcheck disable=SC2046
bench mae_b_cpu_decode 150 --config $B "${n[@]}" "${common[@]}" $(mb 256) data.num_workers=$workers
# shellcheck disable=SC2046
bench mae_b_gpu_decode 150 --config $B "${n[@]}" "${common[@]}" $(mb 256) data.num_workers=$workers data.decode=gpu
# 4. the official MAE code beside ours
if [ -f .peer/mae/models_mae.py ] && [ "$SMOKE" = 0 ]; then
  step side_by_side 200 python benchmarks/mae_side_by_side.py --mae-repo .peer/mae --batch 256 --json \
    "$OUT/side_by_side.json" "${common[@]}" data.num_workers=$workers
fi
# 5. the other methods' ceilings: CAE ViT-H/14, DINO ViT-B/16 (2 x 224 + 10 x 96), SIM ViT-B/16
# shellcheck disable=SC2046
bench cae_h_synthetic 200 --config $CAE --synthetic "${n[@]}" "${common[@]}" $(mb 64)
# shellcheck disable=SC2046
bench dino_b_synthetic 200 --config $DINO --synthetic "${n[@]}" "${common[@]}" $(mb 64)
# shellcheck disable=SC2046
bench sim_b_synthetic 200 --config $SIM --synthetic "${n[@]}" "${common[@]}" $(mb 128) distributed.zero_stage=2
# 6. SIM's loss: the released n x n diagonal against ours, memory at micro-batch 128 (issue 15)
step sim_loss_memory 120 python - <<'EOF' | tee -a "$OUT/results.jsonl"
import json, torch
from largessl.objectives.sim import unigrad_loss
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
n, d = (128 * 196, 768) if device.type == "cuda" else (8 * 36, 192)
def peak(fn):
    if device.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    p = torch.randn(n, d, device=device, requires_grad=True); t = torch.randn(n, d, device=device)
    c = t.T @ t / n
    fn(p, t, c).backward()
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
released = lambda p, t, c: (((p - t) ** 2).sum(-1).mean() + 0.02 * torch.diagonal(p @ c @ p.T).mean()) / d
ours = lambda p, t, c: unigrad_loss(p, t, c, 0.02)["loss"]
print(json.dumps({"check": "sim_loss_memory", "tokens": n, "dim": d, "released_nxn_gib": peak(released),
                  "ours_gib": peak(ours)}))
EOF
# 7. the GPU input path of the colour-augmented methods (issue 17): DINO and SIM, workers only vs CPU decode
for m in DINO SIM; do
  r=${!m}; lower=$(echo "$m" | tr 'A-Z' 'a-z')
  # shellcheck disable=SC2046
  bench "data_cpu_decode_$lower" 120 --config "$r" --data-only "${n[@]}" "${common[@]}" $(mb 64) \
    data.num_workers=$workers
  # shellcheck disable=SC2046
  bench "data_gpu_decode_$lower" 120 --config "$r" --data-only "${n[@]}" "${common[@]}" $(mb 64) \
    data.num_workers=$workers data.decode=gpu
done
# 8. the speed switches, each against the same synthetic MAE ViT-B/16 run of step 1 (kept only where they help)
# shellcheck disable=SC2046
bench mae_b_fused_adamw 150 --config $B --synthetic "${n[@]}" "${common[@]}" $(mb 256) distributed.zero_stage=2 \
  optim.fused=true
# shellcheck disable=SC2046
bench mae_b_compiled 300 --config $B --synthetic "${n[@]}" "${common[@]}" $(mb 256) distributed.zero_stage=2 \
  model.compile=true
echo "=== done ($(date +%T))"
