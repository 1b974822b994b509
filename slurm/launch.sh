#!/usr/bin/env bash
# slurm/launch.sh: the Slurm + DeepSpeed plumbing that stage1.sh, stage2.sh and stage3.sh share.
#
# It runs inside an sbatch job (a stage script execs it) and:
#   1. picks the run folder, $RUNS_ROOT/$RUN_NAME[/<base>]/stage$STAGE, and the earlier stages'
#      folders beside it (from_runs), which must be complete;
#   2. writes a hostfile from `scontrol show hostnames` (slots = GPUs Slurm gave the node),
#      MASTER_ADDR = the first node, MASTER_PORT derived from the job id;
#   3. starts one `deepspeed --no_ssh --node_rank $SLURM_NODEID` launcher per node under
#      `srun --kill-on-bad-exit=1`; each starts the node's ranks of tagscale/train.py;
#   4. afterwards: if the trainer checkpointed on USR1/TERM (it leaves $RUN_DIR/PREEMPTED), requeues
#      the job (same job id; the trainer resumes on its own) and exits 0; else exits with the
#      trainer's status, which is what --dependency=afterok sees.
#
# Environment (the stage scripts set STAGE and RECIPE; the rest have defaults):
#   STAGE                    1, 2 or 3
#   RECIPE                   the trainer's recipe (YAML)
#   DS_CONFIG                DeepSpeed config (ds_configs/*.json)
#   RUNS_ROOT=runs           where run folders go (relative paths: to the submit directory)
#   RUN_NAME=default         one name per pipeline: stage N of run NAME is $RUNS_ROOT/NAME/stageN
#   RUN_DIR                  this stage's run folder, instead of the convention above
#   PREV_RUN                 earlier stages' run folders (space separated) instead of the convention;
#                            set but empty: no from_runs override (the recipe's own from_runs)
#   BASES                    in a job array: the bases, one per array task (a path, i.e. a name with
#                            a '/', or embedded:NAME -> base.path=, a name -> base.preset=:
#                            tagscale.shapes.base_kind); task i trains base i into $RUN_NAME/<base name>/
#   TAGSCALE_PROCS_PER_NODE  ranks per node; default $SLURM_GPUS_ON_NODE
#   TAGSCALE_HOME            the tagscale checkout; default $SLURM_SUBMIT_DIR
# Arguments are passed through to the trainer (key=value overrides).
set -eo pipefail

say() { echo "[launch $(date +%T)] $*"; }
die() { echo "[launch] error: $*" >&2; exit 2; }
[ -n "$SLURM_JOB_ID" ] || die "not inside a Slurm job: submit a stage script with sbatch (see docs/slurm.md)"
ROOT=$(cd "${TAGSCALE_HOME:-$SLURM_SUBMIT_DIR}" && pwd)
[ -f "$ROOT/tagscale/train.py" ] || die "no tagscale/train.py under $ROOT: submit from the checkout or set TAGSCALE_HOME"
cd "${SLURM_SUBMIT_DIR:-$PWD}"   # relative paths are relative to where sbatch was run
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

case $STAGE in 1|2|3) ;; *) die "STAGE must be 1, 2 or 3 (got '$STAGE')" ;; esac
[ -f "$RECIPE" ] || die "recipe '$RECIPE' not found (set RECIPE)"
[ -f "$DS_CONFIG" ] || die "DeepSpeed config '$DS_CONFIG' not found (set DS_CONFIG)"
RECIPE=$(abspath "$RECIPE")
DS_CONFIG=$(abspath "$DS_CONFIG")
RUNS_ROOT=$(abspath "${RUNS_ROOT:-runs}")
RUN_NAME=${RUN_NAME:-default}

# sweep: array task i trains base i of $BASES
overrides=()
if [ -n "$BASES" ] && [ -n "$SLURM_ARRAY_TASK_ID" ]; then
  read -r -d '' -a bases <<< "$BASES" || true
  BASE=${bases[$SLURM_ARRAY_TASK_ID]}
  [ -n "$BASE" ] || die "array task $SLURM_ARRAY_TASK_ID has no base: BASES lists ${#bases[@]}"
  # what the base string names and its run-folder name: tagscale.shapes' rule, as a local sweep reads it
  launch=$(PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} python3 -m tagscale.shapes --launch "$BASE") \
    || die "BASES: cannot read base '$BASE' (python3 -m tagscale.shapes --launch)"
  mapfile -t launch <<< "$launch"
  overrides+=("${launch[@]:1}")
  RUN_NAME=$RUN_NAME/${launch[0]}
fi

# run folders: this stage's, and the earlier stages' (from_runs)
RUN_DIR=$(abspath "${RUN_DIR:-$RUNS_ROOT/$RUN_NAME/stage$STAGE}")
if [ -z "${PREV_RUN+set}" ]; then
  PREV_RUN=""
  for ((s = 1; s < STAGE; s++)); do PREV_RUN="$PREV_RUN $RUNS_ROOT/$RUN_NAME/stage$s"; done
fi
from=""
for prev in $PREV_RUN; do
  prev=$(abspath "$prev")
  PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} python3 -m tagscale.runtime.runfolder --complete "$prev" \
    || die "stage $STAGE needs the complete run folder $prev (tagscale.runtime.runfolder.complete_run):" \
           "run the earlier stage first (slurm/pipeline.sh runs them in order) or set PREV_RUN"
  from="$from${from:+,}\"$prev\""
done
[ -n "$from" ] && overrides+=("from_runs=[$from]")
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/PREEMPTED"   # the trainer writes it again if this run is interrupted

# nodes, ranks, rendezvous
PROCS=${TAGSCALE_PROCS_PER_NODE:-$SLURM_GPUS_ON_NODE}
[ -n "$PROCS" ] || die "no GPUs allocated: request them in the header (--gpus-per-node) or set TAGSCALE_PROCS_PER_NODE"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
mapfile -t hostfile < <(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$PROCS/")
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [ -n "$SLURM_ARRAY_JOB_ID" ]; then
  JOB=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID   # requeue this task, not the whole array
else
  JOB=$SLURM_JOB_ID
fi
# ZeRO++ hpZ (ds_configs/zero3_bf16_multinode.json): the secondary partition must span exactly one node, and the
# ranks per node are known only here. A config that names zero_hpz_partition_size gets it filled in: ranks per node,
# or 1 (off) on a single node, where there is no node boundary to keep traffic inside. The filled copy goes beside
# the run folders (shared storage: every node's ranks read it), not into /tmp, which other nodes cannot see.
if grep -q '"zero_hpz_partition_size"' "$DS_CONFIG"; then
  hpz=$PROCS
  [ "$SLURM_NNODES" -gt 1 ] || hpz=1
  filled=$(dirname "$RUN_DIR")/ds_config-stage$STAGE-job${JOB}.json
  mkdir -p "$(dirname "$filled")"
  python3 - "$DS_CONFIG" "$hpz" "$filled" <<'PY' || die "DeepSpeed config $DS_CONFIG: not readable JSON"
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.setdefault("zero_optimization", {})["zero_hpz_partition_size"] = int(sys.argv[2])
json.dump(cfg, open(sys.argv[3], "w"), indent=1)
PY
  say "ZeRO++ hpZ: zero_hpz_partition_size=$hpz (ranks per node; 1 = off) in $filled, from $DS_CONFIG"
  DS_CONFIG=$filled
fi
say "stage $STAGE, job $JOB (restart ${SLURM_RESTART_COUNT:-0}), $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]" \
    "x $PROCS rank(s), master $MASTER_ADDR:$MASTER_PORT"
say "recipe $RECIPE, run folder $RUN_DIR${from:+, from $from}"
# which job (and log) ran which stage, beside the run folders (the trainer owns what is inside them)
echo "$(date -Iseconds) stage$STAGE job $JOB restart ${SLURM_RESTART_COUNT:-0} $RUN_DIR" \
     "log $(scontrol show job "$JOB" | sed -n 's/^ *StdOut=//p' | head -n 1)" >> "$(dirname "$RUN_DIR")/slurm-jobs.txt"

# One launcher per node; `\$SLURM_NODEID` is expanded on each node, which writes its own copy of
# the hostfile (no shared /tmp needed). `trap '' USR1 TERM`: the deepspeed launcher would die of
# USR1 (and on TERM kill its ranks at once); ignoring them lets the ranks, which get the signal
# too, checkpoint and exit 0 (shared/notes/slurm.md A.5).
train=("$ROOT/tagscale/train.py" --ds_config "$DS_CONFIG" --config "$RECIPE"
       "output.dir=$RUN_DIR" "${overrides[@]}" "$@")
# Each node first says who it is (its host name and the address that name resolves to, which is what gloo/NCCL
# advertise to the other nodes): a wrong host file or an address that only works locally shows in the log.
cmd="trap '' USR1 TERM; echo \"[launch] node \$SLURM_NODEID of $SLURM_NNODES (\$SLURMD_NODENAME): host \$(hostname)"
cmd="$cmd, address \$(getent hosts \$(hostname) | awk '{print \$1; exit}'), node_rank \$SLURM_NODEID\""
cmd="$cmd; hostfile=\$(mktemp); printf '%s\n' $(printf '%q ' "${hostfile[@]}")> \$hostfile"
cmd="$cmd; deepspeed --hostfile \$hostfile --no_ssh --node_rank \$SLURM_NODEID"
cmd="$cmd --master_addr $MASTER_ADDR --master_port $MASTER_PORT $(printf '%q ' "${train[@]}")"
cmd="$cmd; rc=\$?; rm -f \$hostfile; exit \$rc"
say "srun: $cmd"

# srun in the background so that a USR1/TERM sent to this batch shell (--signal=B:..., scancel -b,
# preemption) is forwarded to the ranks at once instead of after srun returns.
forward() { say "got $1: asking the trainer to checkpoint (USR1)"; kill -USR1 "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
ending=0
trap 'ending=1; forward TERM' TERM
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" \
     --kill-on-bad-exit=1 --label bash -c "$cmd" &
srun_pid=$!
rc=0
while :; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break   # else a trapped signal interrupted wait: wait again
done
trap - USR1 TERM

if [ -e "$RUN_DIR/PREEMPTED" ]; then
  step=$(cat "$RUN_DIR/PREEMPTED")
  if [ "$ending" = 1 ]; then
    # TERM to the batch shell: scancel, the time limit, or a preemption (where the partition's
    # PreemptMode=REQUEUE makes Slurm requeue the job itself). A cancelled job must stay cancelled.
    say "Slurm is ending this job; the trainer checkpointed at step $step. Not requeueing:" \
        "submit the same stage again to resume."
    exit 0
  fi
  say "trainer checkpointed at step $step (srun rc $rc): requeueing job $JOB"
  scontrol requeue "$JOB"
  exit 0
fi
say "srun finished, rc $rc"
exit "$rc"
