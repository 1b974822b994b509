#!/usr/bin/env bash
# .ci/slurm_up.sh: start a real one-node Slurm cluster on this machine, for tests.
#
# Every daemon is started by hand (no systemd): munged, slurmctld, slurmd. Slurm's config,
# state, spool, pid files and logs live in one folder ($TAGSCALE_SLURM_DIR); /etc/slurm is not
# touched, so clients need SLURM_CONF, which this script prints (and writes to $DIR/env).
# Installs Debian's slurm-wlm and munge when they are missing. Needs root.
# Idempotent: when the cluster is already up and its node usable, it does nothing.
# Stop it with .ci/slurm_down.sh (by pid, never by name).
#
# Knobs:
#   TAGSCALE_SLURM_DIR=/tmp/tagscale-slurm   config, state, pid files, logs
#   TAGSCALE_SLURM_CPUS=$(nproc)             CPUs of the node
#   TAGSCALE_SLURM_GPUS=2                    fake GPUs (gres/gpu on /dev/null twins), so
#                                            --gpus-per-node=N works and SLURM_GPUS_ON_NODE is set
#   TAGSCALE_SLURM_MEM_MB=16000              RealMemory of the node
#   TAGSCALE_SLURM_REQUEUE_DELAY=5           seconds a requeued job waits (Slurm's default: 120)
# Based on the tested recipe in the notes (shared/notes/slurm.md, Part B).
set -euo pipefail

DIR=${TAGSCALE_SLURM_DIR:-/tmp/tagscale-slurm}
CPUS=${TAGSCALE_SLURM_CPUS:-$(nproc)}
GPUS=${TAGSCALE_SLURM_GPUS:-2}
MEM_MB=${TAGSCALE_SLURM_MEM_MB:-16000}
REQUEUE_DELAY=${TAGSCALE_SLURM_REQUEUE_DELAY:-5}
HOST=$(hostname -s)
MARK="# added by tagscale .ci/slurm_up.sh"
export SLURM_CONF=$DIR/slurm.conf

log() { echo "[slurm_up] $*"; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

alive() {  # alive PIDFILE COMM: the pid in PIDFILE runs and really is COMM
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
node_ok() { sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; }

if alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd && node_ok; then
  log "already up ($(sinfo -h -N -o '%N %T'))"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
t0=$(date +%s)

# 1. packages (the postinst cannot start services without systemd; we start them below)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  log "installing slurm-wlm and munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  }
fi
log "$(slurmctld -V), $(munged -V 2>&1 | head -1)"

# 2. the node name must resolve (MASTER_ADDR is the first node of the job)
if ! getent hosts "$HOST" >/dev/null; then
  echo "127.0.0.1 $HOST $MARK" >> /etc/hosts
  log "added '127.0.0.1 $HOST' to /etc/hosts"
fi

# 3. munge, at its default key and socket (Slurm's clients look there)
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 0600 /etc/munge/munge.key
mkdir -p "$DIR"
if ! alive /run/munge/munged.pid munged; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged   # daemonizes; writes /run/munge/munged.pid
  touch "$DIR/munged.ours"               # so slurm_down.sh stops it (and only then)
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi
munge -n | unmunge >/dev/null || die "munge credential round-trip failed"

# 4. stop our Slurm daemons of an earlier, unhealthy start (by pid)
stop() {  # stop PIDFILE COMM
  local pid i
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    kill "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}
stop "$DIR/slurmd.pid" slurmd
stop "$DIR/slurmctld.pid" slurmctld

# 5. config
mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log" "$DIR/dev"
GRES_NODE=""
GRES_TYPES=""
rm -f "$DIR/gres.conf"
if [ "$GPUS" -gt 0 ]; then
  for i in $(seq 0 $((GPUS - 1))); do
    # gres/gpu wants a character device: major 1 minor 3 is /dev/null
    [ -c "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3
  done
  echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" > "$DIR/gres.conf"
  GRES_NODE=" Gres=gpu:$GPUS"
  GRES_TYPES="GresTypes=gpu"
fi
cat > "$SLURM_CONF" <<EOF
# written by tagscale .ci/slurm_up.sh: a one-node test cluster
ClusterName=tagscale-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held before it may start again
AuthInfo=cred_expire=$REQUEUE_DELAY
SlurmctldPort=${TAGSCALE_SLURM_CTLD_PORT:-6817}
SlurmdPort=${TAGSCALE_SLURM_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no cgroups, no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# no slurmdbd (so no sacct): every finished run of a job is one line here, with its state
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
# keep finished jobs visible to 'scontrol show job' for an hour
MinJobAge=3600
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
$GRES_TYPES
NodeName=$HOST CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# 6. daemons: each daemonizes and writes its pid file; -c = start with an empty queue
/usr/sbin/slurmctld -f "$SLURM_CONF" -c
for i in $(seq 100); do alive "$DIR/slurmctld.pid" slurmctld && break; sleep 0.1; done
alive "$DIR/slurmctld.pid" slurmctld || { tail -20 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not start"; }
/usr/sbin/slurmd -f "$SLURM_CONF"
for i in $(seq 100); do alive "$DIR/slurmd.pid" slurmd && break; sleep 0.1; done
alive "$DIR/slurmd.pid" slurmd || { tail -20 "$DIR/log/slurmd.log" >&2; die "slurmd did not start"; }

# 7. wait for the node
for i in $(seq 300); do
  node_ok && break
  [ "$i" = 50 ] && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
  sleep 0.2
done
node_ok || { sinfo -R >&2 || true; die "node $HOST not usable after 60 s"; }
echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env"
log "up in $(( $(date +%s) - t0 ))s: node $HOST ($CPUS CPUs, $GPUS fake GPUs, $MEM_MB MB), partition debug;" \
    "pids munged=$(cat /run/munge/munged.pid) slurmctld=$(cat "$DIR/slurmctld.pid") slurmd=$(cat "$DIR/slurmd.pid")"
echo "export SLURM_CONF=$SLURM_CONF"
