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

# the stages' submission is pipeline.sh's loop, each stage an array over the bases
TAGSCALE_ARRAY=0-$((${#bases[@]} - 1))${SWEEP_PARALLEL:+%$SWEEP_PARALLEL} exec bash "$HERE/pipeline.sh" "$@"
