#!/bin/bash
# slurm/stage3.sh: Tag-LLM stage 3, cross-domain function tags, on the earlier stages' tags.
#   sbatch slurm/stage3.sh [key=value ...]      (from the checkout; arguments go to the trainer)
# Lines marked EDIT are site-specific. Everything else about the job (node count, ranks per
# node, rendezvous, preemption) is derived from Slurm in slurm/launch.sh; see docs/slurm.md.
#SBATCH --job-name=tagscale-stage3
#SBATCH --nodes=1                 # EDIT: number of nodes (the only place it is written)
#SBATCH --ntasks-per-node=1       # one deepspeed launcher per node: keep
#SBATCH --gpus-per-node=8         # EDIT: GPUs per node = ranks per node
#SBATCH --cpus-per-task=32        # EDIT: CPU cores per node
#SBATCH --time=24:00:00           # EDIT: at most your partition's limit
##SBATCH --partition=gpu          # EDIT: remove one '#' to use (partition, account, qos)
##SBATCH --account=myproject      # EDIT
#SBATCH --signal=USR1@600         # 10 min before the limit: checkpoint, then requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out   # one log per job; logs/ must exist when sbatch runs
set -eo pipefail
# EDIT: your environment, e.g.  module load cuda/12.4; source ~/venvs/tagscale/bin/activate

export STAGE=3
export RECIPE=${RECIPE:-tagscale/recipes/demo_stage3.yaml}
export DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
exec bash "${TAGSCALE_HOME:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" "$@"
