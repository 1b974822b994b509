#!/usr/bin/env bash
# slurm/pipeline.sh: submit stage 1 -> 2 -> 3 as three jobs chained with --dependency=afterok,
# and print their job ids. Run it from the checkout (not with sbatch):
#
#   bash slurm/pipeline.sh [sbatch options ...] [-- trainer overrides ...]
#   RUN_NAME=qed-7b RECIPE1=... RECIPE2=... RECIPE3=... bash slurm/pipeline.sh --time=48:00:00
#
# Arguments before `--` are sbatch options for every stage (they override the #SBATCH header);
# those after it are key=value overrides for every stage's trainer.
# RECIPE1, RECIPE2, RECIPE3 pick each stage's recipe (default: the stage script's); the other
# launcher variables (RUN_NAME, RUNS_ROOT, DS_CONFIG, ...; see slurm/launch.sh) reach every job
# through sbatch's environment. Stages 2 and 3 find the earlier stages' run folders under
# $RUNS_ROOT/$RUN_NAME/ by themselves. STAGES="2 3" submits only those stages (stage 1 done).
# A failed stage cancels the stages after it (--kill-on-invalid-dep=yes).
# Prints one line per stage:  stage<N> <job id> <log file>
# slurm/sweep.sh submits through this same loop with TAGSCALE_ARRAY set (an sbatch --array range): each stage is
# then a job array whose task i waits for task i of the stage before (aftercorr).
set -eo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_DIR=${TAGSCALE_LOG_DIR:-logs}
mkdir -p "$LOG_DIR"   # sbatch needs the log folder to exist at submit time
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do sbatch_args+=("$1"); shift; done
[ "$1" = -- ] && shift
if [ -n "$TAGSCALE_ARRAY" ]; then
  per_job=(--array="$TAGSCALE_ARRAY" --output="$LOG_DIR/%x-%A_%a.out") after=aftercorr log_suffix=_'<task>'.out
else
  per_job=(--output="$LOG_DIR/%x-%j.out") after=afterok log_suffix=.out
fi
dep=()
for n in ${STAGES:-1 2 3}; do
  recipe_var=RECIPE$n
  out=$(
    unset RECIPE
    [ -n "${!recipe_var}" ] && export RECIPE=${!recipe_var}
    sbatch --parsable "${per_job[@]}" "${dep[@]}" "${sbatch_args[@]}" "$HERE/stage$n.sh" "$@"
  )
  id=${out%%;*}
  echo "stage$n $id $LOG_DIR/tagscale-stage$n-$id$log_suffix"
  dep=(--dependency=$after:"$id" --kill-on-invalid-dep=yes)
done
