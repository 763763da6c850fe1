#!/bin/bash
# Runs a command on one GPU of its node: local rank i gets the node's i-th GPU (modulo their count).
#
# Usage (what pipeline_ps.sbatch does):  mpirun -n N jobs/gpu_bind.sh python -m hpdl.train --device gpu ...
# The local rank is MPICH hydra's MPI_LOCALRANKID, else Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, else
# srun's SLURM_LOCALID (under mpirun every rank inherits its proxy's SLURM_LOCALID 0, so it comes last).
# The GPUs are the list Slurm put in CUDA_VISIBLE_DEVICES (--gpus-per-node with device files in
# gres.conf), else 0..SLURM_GPUS_ON_NODE-1; with neither the command runs unchanged (CPU runs).
set -euo pipefail

local_rank=${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}}
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
elif (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then
    gpus=($(seq 0 $(( SLURM_GPUS_ON_NODE - 1 ))))
fi
if (( ${#gpus[@]} > 0 )); then
    export CUDA_VISIBLE_DEVICES=${gpus[local_rank % ${#gpus[@]}]}
    echo "gpu_bind: rank ${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-?}}} (local rank $local_rank" \
         "on $(hostname -s)): CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
fi
exec "$@"
