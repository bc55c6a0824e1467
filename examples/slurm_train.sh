#!/bin/bash
# Train one model on several GPUs under SLURM: `volseg train` started by torchrun, one process per GPU.
#
#   sbatch examples/slurm_train.sh                 # one node x 4 GPUs
#   sbatch --nodes 2 examples/slurm_train.sh       # 2 nodes x 4 GPUs (8 processes)
#
# srun starts one torchrun per node; torchrun starts one `volseg train` per GPU, gives each its rank
# (RANK, WORLD_SIZE, LOCAL_RANK) and finds the other nodes through the first node (rendezvous c10d).
# Every process draws its own share of each epoch's slices; rank 0 writes the model, the plots and
# a checkpoint (MODEL.ckpt) after every epoch. If a process dies, torchrun ends the others.
#
# Walltime: SLURM sends SIGTERM, then SIGKILL. The checkpoint of the last finished epoch is kept;
# submit the same script again (e.g. `sbatch --dependency=afterany:$SLURM_JOB_ID examples/slurm_train.sh`
# from inside the job, or by hand) and training resumes where it stopped ("resumed from epoch k");
# train.max_minutes counts the time of all attempts. A resumed run needs the same number of GPUs.
#
# Adapt the partition, account, GPUs per node and paths to your site. The output folder must be on a
# filesystem every node sees (GPFS, Lustre, NFS). See README, "Training on several GPUs", for when
# this pays off: for a labelled region of a few hundred voxels a side one GPU is often enough.
#SBATCH --job-name=volseg-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one torchrun per node ...
#SBATCH --gpus-per-node=4            # ... starting one process per GPU
#SBATCH --cpus-per-task=32           # data loading: train.num_workers per process
#SBATCH --time=04:00:00
#SBATCH --output=volseg-train-%j.log
##SBATCH --partition=gpu
##SBATCH --account=myproject

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
IMAGE=${IMAGE:-/data/crop/image.zarr}
LABELS=${LABELS:-/data/crop/labels.zarr}
MODEL=${MODEL:-/scratch/$USER/model.pt}
CONFIG=${CONFIG:-train.yaml}          # `volseg config write-defaults train.yaml`, then edit

# the first node of the job hosts the rendezvous
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:29500" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m volseg_dask.cli train "$IMAGE" "$LABELS" -o "$MODEL" -c "$CONFIG"

# Without torchrun, srun itself can start one task per GPU; volseg reads SLURM_PROCID,
# SLURM_STEP_NUM_TASKS and SLURM_LOCALID, and needs the address of rank 0:
#
#   #SBATCH --ntasks-per-node=4 --gpus-per-task=1
#   export MASTER_ADDR=$HEAD MASTER_PORT=29500
#   srun --kill-on-bad-exit=1 volseg train "$IMAGE" "$LABELS" -o "$MODEL" -c "$CONFIG"
#
# --kill-on-bad-exit=1 ends every task when one fails, as torchrun does.
