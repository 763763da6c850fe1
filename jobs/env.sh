# Sourced by every jobs/*.sbatch: finds hpdl's environment, sizes BLAS threads, makes the run
# directory, defines LAUNCH.
#
# Settings (environment variables, all optional; sbatch passes the submitting shell's environment):
#   HPDL_ROOT    the hpdl checkout (default: the directory sbatch was run from)
#   HPDL_VENV    its virtual environment (default: $HPDL_ROOT/.venv, made by `make`)
#   HPDL_MPIRUN  the MPI launcher (default: the venv's mpirun, MPICH's hydra: inside a Slurm job it
#                reads the node list and tasks per node from Slurm, starts one proxy per node through
#                srun, and fills node 0's task slots first, then node 1's, ...)
#   HPDL_BIND    hydra's -bind-to (default core:$SLURM_CPUS_PER_TASK: each rank pinned to its own
#                cores, so ranks on one node do not migrate onto each other's; `none` turns it off)
# Outputs go to the job's working directory (sbatch's --chdir, else where it ran), into the run
# directory RUN_DIR: runs/<jobid> unless the script set RUN_DIR before sourcing this file. It holds
# metrics.jsonl, checkpoints (resume.sbatch) and ranks.json, the rank table (host, pid and role of
# every rank) that hpdl.train's rank 0 writes at start-up for hpdl.guard.
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

RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_ID:-local}}
mkdir -p "$RUN_DIR"
# Absolute, so that it names one file whichever directory a rank on another node starts in.
HPDL_RANK_TABLE=$(cd "$RUN_DIR" && pwd)/ranks.json
export HPDL_RANK_TABLE

# "${LAUNCH[@]}" CMD...: CMD on every task of the job, each bound to its CPUs and run under
# `python -m hpdl.guard`, which prints `hpdl.guard: rank R (role, pid P on HOST) was killed by
# SIGKILL; ending the job` when its rank dies by a signal (mpirun's own banner names only a pid, and
# not always the dead rank's). An array, not a function, so that `"${LAUNCH[@]}" ... &` is mpirun
# itself and a signal to $! reaches it (mpirun passes SIGTERM on to the guards, they to the ranks).
LAUNCH=("$MPIRUN" -n "${SLURM_NTASKS:-1}" -bind-to "${HPDL_BIND:-core:$CPUS}" "$PY" -m hpdl.guard)
