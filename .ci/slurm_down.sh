#!/usr/bin/env bash
# .ci/slurm_down.sh: stop the test cluster that .ci/slurm_up.sh started.
# Cancels its jobs, then stops slurmd, slurmctld and (only if slurm_up.sh started it) munged,
# each through the pid in its pid file after checking /proc/PID/comm. Never by name.
# Idempotent: safe when nothing runs. TAGSCALE_SLURM_PURGE=1 also deletes the folder.
set -uo pipefail

DIR=${TAGSCALE_SLURM_DIR:-/tmp/tagscale-slurm}
MARK="# added by tagscale .ci/slurm_up.sh"
export SLURM_CONF=$DIR/slurm.conf
log() { echo "[slurm_down] $*"; }

alive() {  # alive PIDFILE COMM
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
stop() {  # stop PIDFILE COMM: SIGTERM, up to 30 s, then SIGKILL that pid only
  local pid i
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    kill "$pid"
    for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; log "$2 (pid $pid) killed"; else log "$2 (pid $pid) stopped"; fi
  fi
  rm -f "$1"
}

# a multi-node cluster (TAGSCALE_SLURM_NODES>1) says its mode here; its clients may have to enter a namespace
mode=$(cat "$DIR/mode" 2>/dev/null || true)
NSP=tagscale-$(printf %s "$DIR" | md5sum | cut -c1-6)   # as slurm_up.sh names this cluster's namespaces
client() {
  if [ "$mode" = netns ] && [ -e "/run/netns/$NSP-tsnode1" ]; then nsenter --net="/run/netns/$NSP-tsnode1" "$@"
  else "$@"; fi
}

# 1. jobs first: stopping slurmd does not end running jobs (slurmstepd would linger)
if alive "$DIR/slurmctld.pid" slurmctld; then
  jobs=$(client squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    client scancel $jobs 2>/dev/null || true
    for i in $(seq 90); do [ -z "$(client squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# 2. daemons
stop "$DIR/slurmd.pid" slurmd
for f in "$DIR"/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done   # multi-node: one per node
stop "$DIR/slurmctld.pid" slurmctld
if [ -e "$DIR/munged.ours" ]; then
  stop /run/munge/munged.pid munged
  rm -f "$DIR/munged.ours"
fi
stop "$DIR/munge/munged.pid" munged   # multi-node: its own munged
grep -qF "$MARK" /etc/hosts 2>/dev/null && sed -i "/$MARK/d" /etc/hosts
HOSTS_MARK="# tagscale-ci multinode $DIR"
grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null && sed -i "\\|$HOSTS_MARK|d" /etc/hosts
# the namespaces slurm_up.sh made (listed by name in $DIR/netns), and nothing else
for ns in $(cat "$DIR/netns" 2>/dev/null); do ip netns del "$ns" 2>/dev/null && log "netns $ns deleted"; done
rm -f "$DIR/netns" "$DIR/mode"

# 3. leftovers: job step daemons whose job could not be cancelled
left=""
for d in /proc/[0-9]*; do
  [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] && left="$left ${d#/proc/}"
done
[ -n "$left" ] && log "warning: slurmstepd still running, pids:$left"
[ "${TAGSCALE_SLURM_PURGE:-0}" = 1 ] && rm -rf "$DIR" && log "removed $DIR"
log "down"
exit 0
