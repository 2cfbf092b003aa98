#!/bin/bash
# One paper recipe on several nodes: one torchrun per node (srun --ntasks-per-node=1), each starting one process per
# GPU; the first node of the allocation is the rendezvous. Checkpoints are written by rank 0 into cache_dir, which
# must be on a filesystem every node sees; an interrupted job resubmitted with the same arguments resumes exactly.
#
#   sbatch --nodes 2 scripts/slurm_paper.sh clipself                              # 2 x 8 GPUs
#   sbatch --nodes 4 scripts/slurm_paper.sh declip -p backbone=EVA02-L-14-336     # -p: profile parameters
#   sbatch --nodes 2 scripts/slurm_paper.sh synclip -p weights_dir=/shared/weights batch_size=1 grad_accum=2
#
# Arguments after the method go to `python -m ovlib.train` (-p KEY=VALUE profile parameters, FIELD=VALUE
# DistillConfig fields). Batch sizes in params/paper.yaml are per GPU: the global batch grows with the node count
# (keep it with grad_accum). Environment: GPUS_PER_NODE (default: SLURM's GPUs on the node, else 8), MASTER_PORT
# (29500), PYTHON (.venv/bin/python), and for compute nodes without internet HF_HUB_OFFLINE=1 with -p weights_dir.
#SBATCH --job-name=ovbook-paper
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
METHOD=${1:?usage: sbatch --nodes N scripts/slurm_paper.sh METHOD [-p KEY=VALUE ...] [FIELD=VALUE ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TQDM_DISABLE=1
echo "ovbook: $METHOD on $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
# SLURM_NODEID is evaluated by each task (single quotes), the other values here
srun --kill-on-bad-exit=1 bash -c '"$0" -m torch.distributed.run --nnodes "$1" --nproc-per-node "$2" \
    --node-rank "$SLURM_NODEID" --master-addr "$3" --master-port "$4" \
    -m ovlib.train --method "$5" --profile paper "${@:6}"' \
    "$PYTHON" "$SLURM_NNODES" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" "$METHOD" "$@"
