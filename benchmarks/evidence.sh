#!/usr/bin/env bash
# The "does it learn" evidence of docs/benchmarks.md for one method: pretrain at a fixed budget, the same encoder at
# its random initialisation (one step at lr 0: the warm-up starts at 0), then for both the k-NN top-1 (paired, with
# an exact McNemar test, benchmarks/knn_paired.py) and the linear probe top-1 (`largessl eval linear`).
#
#   benchmarks/evidence.sh METHOD STEPS DATA [OUT]    # METHOD: mae | dino | cae | sim; DATA: a shard dataset with
#                                                     # train and val splits (Imagenette, docs/benchmarks.md)
#
# The pretraining runs are the method's debug recipe (ViT-Tiny) with 64 images per step; DINO at 64-px globals and
# 32-px locals as in docs/benchmarks.md. The probe: the method's linear recipe with SGD (LARS hardly moves a head in a
# few hundred steps), 256 images per step, PROBE_STEPS steps (default 150, 4 epochs of Imagenette). k-NN reads the
# recipe's feature ([cls]; CAE and SIM the mean patch token). Extra pretraining overrides: PRETRAIN_EXTRA="k=v ...".
set -euo pipefail
method=${1:?METHOD}; steps=${2:?STEPS}; data=${3:?DATA}; out=${4:-runs/evidence}
probe_steps=${PROBE_STEPS:-150}
common=(data.train="$data" data.val="$data" data.micro_batch_size=64 optim.global_batch_size=64 data.num_workers=1
        data.shuffle_buffer=1000 trainer.log_every=25 tracking.enabled=false run.output_dir="$out")
case "$method" in
  dino) extra=(model.image_size=64 objective.local_crop_size=32 objective.local_crops=6 optim.base_lr=5.0e-4
               optim.warmup_steps=60 objective.freeze_last_layer_steps=60 objective.norm_last_layer=false
               objective.warmup_teacher_temp=0.025 objective.teacher_temp=0.025); pool=cls ;;
  cae|sim) extra=(); pool=mean ;;
  mae) extra=(); pool=cls ;;
  *) echo "evidence.sh: METHOD must be mae, dino, cae or sim" >&2; exit 2 ;;
esac
# shellcheck disable=SC2206
extra+=(${PRETRAIN_EXTRA:-})
largessl pretrain --config "debug/${method}_vit_tiny" "${common[@]}" "${extra[@]}" trainer.max_steps="$steps" \
  trainer.ckpt_every="$steps" eval.knn_every=0 run.name="$method"
largessl pretrain --config "debug/${method}_vit_tiny" "${common[@]}" "${extra[@]}" trainer.max_steps=1 \
  eval.knn_every=0 run.name="${method}_init"
python "$(dirname "$0")/knn_paired.py" "$out/${method}_init" "$out/$method" "$data" --pool "$pool"
probe=(--train "$data" --val "$data" optim.name=sgd optim.base_lr=1.0 optim.momentum=0.9 optim.global_batch_size=256
       data.micro_batch_size=256 data.num_workers=1 trainer.epochs=null trainer.max_steps="$probe_steps"
       optim.warmup_epochs=null optim.warmup_steps=10 distributed.precision=fp32 tracking.enabled=false)
for run in "$method" "${method}_init"; do
  echo "$run: $(largessl eval linear --checkpoint "$out/$run" "${probe[@]}" | tail -n 1)"
done
