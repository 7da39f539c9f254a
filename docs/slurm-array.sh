#!/usr/bin/env bash
# The full grid of `flatfast reproduce` on a Slurm cluster, one array task per shard (--shard auto reads
# SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT: task i runs every N-th (optimizer, |A|) group from the i-th).
# Submit the array, then a merge that starts when every task has succeeded:
#
#   jobid=$(sbatch --parsable docs/slurm-array.sh)
#   sbatch --dependency=afterok:$jobid --wrap "flatfast reproduce --merge flatfast-grid/shard-* --out flatfast-grid/merged"
#
# Extra arguments go to every task (e.g. `sbatch docs/slurm-array.sh --data mnist --data-dir /data/mnist`); a
# task that was cut off continues with the same command plus --resume.
#SBATCH --job-name=flatfast-grid
#SBATCH --array=0-15
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --output=flatfast-grid-%A_%a.log
set -euo pipefail
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK FLATFAST_NUM_THREADS=$SLURM_CPUS_PER_TASK
flatfast reproduce --shard auto --out "flatfast-grid/shard-$SLURM_ARRAY_TASK_ID" "$@"
