# Sourced by every jobs/*.sbatch: finds hpdl's environment, sizes BLAS threads, defines LAUNCH.
#
# Settings (environment variables, all optional; sbatch passes the submitting shell's environment):
#   HPDL_ROOT    the hpdl checkout (default: the directory sbatch was run from)
#   HPDL_VENV    its virtual environment (default: $HPDL_ROOT/.venv, made by `make`)
#   HPDL_MPIRUN  the MPI launcher (default: the venv's mpirun, MPICH's hydra: inside a Slurm job it
#                reads the node list and tasks per node from Slurm, starts one proxy per node through
#                srun, and fills node 0's task slots first, then node 1's, ...)
#   HPDL_BIND    hydra's -bind-to (default core:$SLURM_CPUS_PER_TASK: each rank pinned to its own
#                cores, so ranks on one node do not migrate onto each other's; `none` turns it off)
# Outputs (runs/, checkpoints) go to the job's working directory: sbatch's --chdir, else where it ran.
set -euo pipefail

HPDL_ROOT=${HPDL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
HPDL_VENV=${HPDL_VENV:-$HPDL_ROOT/.venv}
PY=$HPDL_VENV/bin/python
MPIRUN=${HPDL_MPIRUN:-$HPDL_VENV/bin/mpirun}
if [[ ! -x $PY ]]; then
    echo "hpdl job: error: no python at $PY; run \`make test\` in $HPDL_ROOT or set HPDL_VENV" >&2
    exit 2
fi

# BLAS threads = the cores Slurm gave each task; hpdl's --threads says the same to threadpoolctl.
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$CPUS OPENBLAS_NUM_THREADS=$CPUS MKL_NUM_THREADS=$CPUS

echo "hpdl job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}:" \
     "${SLURM_NTASKS:-1} tasks on ${SLURM_JOB_NODELIST:-$(hostname -s)} (${SLURM_TASKS_PER_NODE:-1} per node)," \
     "$CPUS CPUs per task, attempt ${SLURM_RESTART_COUNT:-0}"

# "${LAUNCH[@]}" CMD...: CMD on every task of the job, each bound to its CPUs. An array, not a
# function, so that `"${LAUNCH[@]}" ... &` is mpirun itself and a signal to $! reaches it.
LAUNCH=("$MPIRUN" -n "${SLURM_NTASKS:-1}" -bind-to "${HPDL_BIND:-core:$CPUS}")
