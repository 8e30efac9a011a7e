#!/bin/bash
# MAE ViT-H/14 pretraining (recipe pretrain/mae_vith14): 4 nodes x 8 GPUs, one srun task per GPU;
# docs/slurm.md has the details.
#   mkdir -p logs    # once, where you submit from: sbatch does not create it, and the job fails without it
#   sbatch slurm/pretrain_mae_vith.sh data.train=/shards/in22k tracking.uri=http://mlflow-host:5000
# Arguments are config overrides (section.key=value); sbatch options before the script override the headers.
# The run directory (runs/mae_vith14 unless run.name / run.output_dir say otherwise) stays the same across
# requeues, so every requeued job resumes it. USR1 goes to the tasks (not B:, the batch shell): the ranks save a
# checkpoint and rank 0 requeues the job.
#SBATCH --job-name=mae_vith14
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_account
set -euo pipefail

# CPU threads per task: --cpus-per-task less data.num_workers, chosen by largessl and said at start-up
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun of SLURM 22.05-23.02 does not inherit --cpus-per-task
PY="${LARGESSL_PYTHON:-python}"

srun --kill-on-bad-exit=1 "$PY" -u -m largessl pretrain --config pretrain/mae_vith14 "$@"
