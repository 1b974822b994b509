#!/usr/bin/env bash
# slurm/sweep.sh: the stages over several bases (model sizes), one job array per stage, and
# print the array job ids. Run it from the checkout (not with sbatch):
#
#   BASES="llama-100m llama-350m llama-1b" bash slurm/sweep.sh [sbatch options ...] [-- trainer overrides ...]
#   BASES_FILE=bases.txt bash slurm/sweep.sh
#
# A base is a preset name (-> base.preset=NAME), or embedded:NAME or a model folder (a name with a '/')
# (-> base.path=FOLDER); BASES_FILE holds one per line ('#' starts a comment). Array task i
# trains base i into $RUNS_ROOT/$RUN_NAME/<base name>/stage<N>. Stage N+1's task i starts when
# stage N's task i has succeeded (--dependency=aftercorr), so each base runs its own pipeline.
# STAGES (default "1 2 3"), RECIPE1..3 and the sbatch options work as in pipeline.sh;
# SWEEP_PARALLEL=k runs at most k tasks of an array at once.
# Prints one line per stage:  stage<N> <array job id> <log file pattern>
set -eo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "sweep.sh: error: $*" >&2; exit 2; }
if [ -n "$BASES_FILE" ]; then
  [ -f "$BASES_FILE" ] || die "BASES_FILE '$BASES_FILE' not found"
  BASES=$(sed 's/#.*//' "$BASES_FILE")
fi
read -r -d '' -a bases <<< "$BASES" || true
[ ${#bases[@]} -gt 0 ] || die "no bases: set BASES=\"name-or-folder ...\" or BASES_FILE=file"
dups=$(for b in "${bases[@]}"; do basename "$b"; done | sort | uniq -d)
[ -z "$dups" ] || die "two bases share the run folder name '$dups': rename one"
export BASES="${bases[*]}"   # what each array task reads (slurm/launch.sh), fixed at submit time

LOG_DIR=${TAGSCALE_LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do sbatch_args+=("$1"); shift; done
[ "$1" = -- ] && shift
array=0-$((${#bases[@]} - 1))${SWEEP_PARALLEL:+%$SWEEP_PARALLEL}
dep=()
for n in ${STAGES:-1 2 3}; do
  recipe_var=RECIPE$n
  out=$(
    unset RECIPE
    [ -n "${!recipe_var}" ] && export RECIPE=${!recipe_var}
    sbatch --parsable --array="$array" --output="$LOG_DIR/%x-%A_%a.out" "${dep[@]}" "${sbatch_args[@]}" \
      "$HERE/stage$n.sh" "$@"
  )
  id=${out%%;*}
  echo "stage$n $id $LOG_DIR/tagscale-stage$n-${id}_<task>.out"
  dep=(--dependency=aftercorr:"$id" --kill-on-invalid-dep=yes)
done
