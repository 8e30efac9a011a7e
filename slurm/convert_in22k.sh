#!/bin/bash
# ImageNet-22K -> largessl shards on one CPU node (python -m data_tools imagenet22k), then a full verify.
# Rerunning (or a requeue) resumes the conversion where it stopped. docs/slurm.md and docs/data.md have the details.
#   mkdir -p logs    # once, where you submit from: sbatch does not create it, and the job fails without it
#   sbatch slurm/convert_in22k.sh SRC OUT [imagenet22k options, e.g. --val-per-class 10 --expect-classes 19167]
# SRC: winter21_whole.tar / fall11_whole.tar, a directory of per-synset tars or of synset folders; OUT: the
# dataset directory. One worker per allocated CPU: set --cpus-per-task to the core count of your CPU nodes.
#SBATCH --job-name=convert_in22k
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --time=3-00:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
##SBATCH --partition=cpu
##SBATCH --account=my_account
##SBATCH --mem=0
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch slurm/convert_in22k.sh SRC OUT [python -m data_tools imagenet22k options]" >&2
    exit 2
fi
SRC=$1
OUT=$2
shift 2
PY="${LARGESSL_PYTHON:-python}"
WORKERS="${SLURM_CPUS_PER_TASK:-$(nproc)}"

"$PY" -u -m data_tools imagenet22k "$SRC" "$OUT" --workers "$WORKERS" "$@"
"$PY" -u -m data_tools verify "$OUT" --workers "$WORKERS"
