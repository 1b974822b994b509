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
#   TAGSCALE_SLURM_NODES=1                   nodes; >1 starts a multi-node cluster (below)
#   TAGSCALE_SLURM_NET=auto                  multi-node only: netns | loopback | auto (netns if it works)
# Based on the tested recipe in the notes (shared/notes/slurm.md, Part B).
#
# Multi-node (TAGSCALE_SLURM_NODES=N > 1; shared/notes/slurm-multinode.md): nodes tsnode1..N, each a slurmd -N.
#   netns:    one network namespace per node (tagscale-<hash of DIR>-tsnodeI, address 10.211.0.I on its `slurm0`, a veth into a
#             hub namespace with a bridge) and its own UTS namespace (hostname tsnodeI), so every node has its own
#             network stack, host name and address; slurmctld runs in tsnode1's namespace. All addresses live in
#             namespaces this script made; nothing is added to the host's network. Clients must run inside
#             tsnode1's namespace: $DIR/env exports TAGSCALE_SLURM_CLIENT="nsenter --net=..." to prefix them with.
#   loopback: the fallback where namespaces cannot be made: N slurmd on 127.0.0.1, ports 16818+I, one host name.
#   Both use a munged of their own (socket in $DIR/munge), so another cluster's munged going down cannot break it,
#   and ports of their own (netns: per namespace; loopback: 16817+), so they run beside the one-node cluster.
#   $DIR/env also exports TAGSCALE_SLURM_MODE (netns or loopback): the tests say which one ran.
set -euo pipefail

DIR=${TAGSCALE_SLURM_DIR:-/tmp/tagscale-slurm}
CPUS=${TAGSCALE_SLURM_CPUS:-$(nproc)}
GPUS=${TAGSCALE_SLURM_GPUS:-2}
MEM_MB=${TAGSCALE_SLURM_MEM_MB:-16000}
REQUEUE_DELAY=${TAGSCALE_SLURM_REQUEUE_DELAY:-5}
HOST=$(hostname -s)
MARK="# added by tagscale .ci/slurm_up.sh"
export SLURM_CONF=$DIR/slurm.conf
NODES=${TAGSCALE_SLURM_NODES:-1}
case $NODES in ''|*[!0-9]*|0) echo "[slurm_up] error: TAGSCALE_SLURM_NODES must be a positive integer (got '$NODES')" >&2; exit 2 ;; esac

log() { echo "[slurm_up] $*"; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

alive() {  # alive PIDFILE COMM: the pid in PIDFILE runs and really is COMM
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
node_ok() { sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; }
stop() {  # stop PIDFILE COMM: our daemon of an earlier, unhealthy start (by pid, never by name)
  local pid i
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    kill "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}
await_daemon() {  # await_daemon PIDFILE COMM LOG: wait up to 10 s for a daemon just started to write its pid file
  local i
  for i in $(seq 100); do alive "$1" "$2" && return 0; sleep 0.1; done
  tail -20 "$3" >&2
  die "$2 did not start (${1##*/}; log $3)"
}
fake_gpus() {  # gres/gpu on /dev/null twins (a character device: major 1 minor 3); sets GRES_NODE and GRES_TYPES
  local i
  GRES_NODE=""; GRES_TYPES=""; rm -f "$DIR/gres.conf"
  [ "$GPUS" -gt 0 ] || return 0
  mkdir -p "$DIR/dev"
  for i in $(seq 0 $((GPUS - 1))); do [ -c "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3; done
  echo "Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" > "$DIR/gres.conf"
  GRES_NODE=" Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"
}
conf_common() {  # the slurm.conf lines every test cluster shares (after its own names, ports and paths)
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
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
EOF
}

if [ "$NODES" = 1 ] && alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd && node_ok; then
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

# ---------------------------------------------------------------------------------------------------------
# multi-node: its own munged, namespaces (or loopback ports), N slurmd -N; the one-node path follows below
if [ "$NODES" -gt 1 ]; then
  NET=${TAGSCALE_SLURM_NET:-auto}
  case $NET in netns|loopback|auto) ;; *) echo "[slurm_up] error: TAGSCALE_SLURM_NET must be netns, loopback or auto (got '$NET')" >&2; exit 2 ;; esac
  SUBNET=10.211.0                              # only ever assigned inside our namespaces
  HOSTS_MARK="# tagscale-ci multinode $DIR"    # not a substring of the one-node MARK: its down script keeps ours
  MUNGE_DIR=$DIR/munge
  MUNGE_SOCK=$MUNGE_DIR/munge.socket
  # namespace names are global: derive them from $DIR so two such clusters (two checkouts' tests) never share one
  NSP=tagscale-$(printf %s "$DIR" | md5sum | cut -c1-6)
  names=()
  for i in $(seq "$NODES"); do names+=("tsnode$i"); done
  client() {  # a Slurm client command where slurmctld can be reached
    if [ "$(cat "$DIR/mode" 2>/dev/null)" = netns ]; then nsenter --net="/run/netns/$NSP-tsnode1" "$@"; else "$@"; fi
  }
  nodes_state() { client sinfo -h -N -o '%N=%T' 2>/dev/null | tr '\n' ' '; }
  all_idle() { [ "$(client sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$')" = "$NODES" ]; }
  all_alive() {
    local n
    alive "$DIR/slurmctld.pid" slurmctld && alive "$MUNGE_DIR/munged.pid" munged || return 1
    for n in "${names[@]}"; do alive "$DIR/slurmd-$n.pid" slurmd || return 1; done
  }
  if all_alive && [ "$(client sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" = "$NODES" ]; then
    log "already up, $(cat "$DIR/mode") mode ($(nodes_state))"
    cat "$DIR/env"
    exit 0
  fi
  t0=$(date +%s)

  # an earlier, unhealthy start of this cluster: its daemons (by pid), namespaces and /etc/hosts lines
  mkdir -p "$DIR"
  for f in "$DIR"/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
  stop "$DIR/slurmctld.pid" slurmctld
  stop "$MUNGE_DIR/munged.pid" munged
  for ns in $(cat "$DIR/netns" 2>/dev/null); do ip netns del "$ns" 2>/dev/null || true; done
  rm -f "$DIR/netns" "$DIR/mode" "$DIR/env"
  sed -i "\|$HOSTS_MARK|d" /etc/hosts

  # the network: a hub namespace with a bridge, one namespace per node with a veth `slurm0` into it
  mode=loopback
  if [ "$NET" != loopback ]; then
    [ -e "/run/netns/$NSP-hub" ] && die "netns $NSP-hub exists but is not listed in $DIR/netns: not ours to reuse"
    if ip netns add "$NSP-hub" 2>"$DIR/netns.err"; then
      echo "$NSP-hub" >> "$DIR/netns"
      ip -n "$NSP-hub" link set lo up
      ip -n "$NSP-hub" link add br0 type bridge
      ip -n "$NSP-hub" link set br0 up
      for i in $(seq "$NODES"); do
        ns=$NSP-tsnode$i
        ip netns add "$ns"
        echo "$ns" >> "$DIR/netns"
        ip -n "$ns" link set lo up
        ip link add name slurm0 netns "$ns" type veth peer name "v$i" netns "$NSP-hub"
        ip -n "$NSP-hub" link set "v$i" master br0 up
        ip -n "$ns" addr add "$SUBNET.$i/24" dev slurm0
        ip -n "$ns" link set slurm0 up
        echo "$SUBNET.$i tsnode$i $HOSTS_MARK" >> /etc/hosts   # MASTER_ADDR=tsnode1 must resolve everywhere
      done
      mode=netns
    elif [ "$NET" = netns ]; then
      die "TAGSCALE_SLURM_NET=netns but 'ip netns add' failed: $(cat "$DIR/netns.err")"
    else
      log "network namespaces unavailable ($(head -1 "$DIR/netns.err")): falling back to loopback"
    fi
  fi
  if [ $mode = loopback ]; then
    echo "127.0.0.1 ${names[*]} $HOSTS_MARK" >> /etc/hosts
  fi
  echo $mode > "$DIR/mode"

  # munge of our own: one daemon in the root namespace; its pathname socket works from every namespace
  install -d -o munge -g munge -m 0700 /etc/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCK" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge credential round-trip failed"

  # config
  mkdir -p "$DIR/ctld" "$DIR/log"
  fake_gpus
  if [ $mode = netns ]; then CTLD_ADDR=$SUBNET.1; CTLD_PORT=6817; else CTLD_ADDR=127.0.0.1; CTLD_PORT=16817; fi
  {
    echo "# written by tagscale .ci/slurm_up.sh: a $NODES-node test cluster ($mode mode)"
    echo "ClusterName=tagscale-ci$NODES"
    # localhost(ADDR): every daemon reads 'localhost' as its own host name, so the controller check passes
    # wherever slurmctld runs; clients connect to ADDR
    echo "SlurmctldHost=localhost($CTLD_ADDR)"
    cat <<EOF
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$REQUEUE_DELAY
SlurmctldPort=$CTLD_PORT
SlurmdSpoolDir=$DIR/spool-%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
    conf_common
    for i in $(seq "$NODES"); do
      if [ $mode = netns ]; then addr="NodeAddr=$SUBNET.$i NodeHostname=tsnode$i"
      else addr="NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((16817 + i))"; fi
      echo "NodeName=tsnode$i $addr CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1" \
           "RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$SLURM_CONF"

  # daemons (nsenter --net, not `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup from slurmd);
  # `unshare --uts` + hostname: each node's processes see their own host name, as on a real cluster
  indo() {  # indo NODE CMD...: run CMD as on NODE
    if [ $mode = netns ]; then
      nsenter --net="/run/netns/$NSP-$1" unshare --uts sh -c "hostname $1; exec \"\$@\"" sh "${@:2}"
    else
      "${@:2}"
    fi
  }
  indo tsnode1 /usr/sbin/slurmctld -f "$SLURM_CONF" -c
  await_daemon "$DIR/slurmctld.pid" slurmctld "$DIR/log/slurmctld.log"
  for n in "${names[@]}"; do
    mkdir -p "$DIR/spool-$n"
    indo "$n" /usr/sbin/slurmd -f "$SLURM_CONF" -N "$n"
  done
  for n in "${names[@]}"; do await_daemon "$DIR/slurmd-$n.pid" slurmd "$DIR/log/slurmd-$n.log"; done
  for i in $(seq 300); do
    all_idle && break
    [ "$i" = 50 ] && client scontrol update NodeName="tsnode[1-$NODES]" State=RESUME 2>/dev/null || true
    sleep 0.2
  done
  all_idle || { client sinfo -N >&2 || true; client sinfo -R >&2 || true; die "not all $NODES nodes idle after 60 s"; }
  {
    echo "export SLURM_CONF=$SLURM_CONF"
    echo "export TAGSCALE_SLURM_MODE=$mode"
    if [ $mode = netns ]; then echo "export TAGSCALE_SLURM_CLIENT='nsenter --net=/run/netns/$NSP-tsnode1'"
    else echo "export TAGSCALE_SLURM_CLIENT=''"; fi
  } > "$DIR/env"
  pids="munged=$(cat "$MUNGE_DIR/munged.pid") slurmctld=$(cat "$DIR/slurmctld.pid")"
  for n in "${names[@]}"; do pids="$pids slurmd-$n=$(cat "$DIR/slurmd-$n.pid")"; done
  log "up in $(( $(date +%s) - t0 ))s, $mode mode: nodes ${names[*]} ($CPUS CPUs, $GPUS fake GPUs, $MEM_MB MB each):" \
      "$(nodes_state); pids $pids"
  cat "$DIR/env"
  exit 0
fi

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
stop "$DIR/slurmd.pid" slurmd
stop "$DIR/slurmctld.pid" slurmctld

# 5. config
mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log"
fake_gpus
{
  cat <<EOF
# written by tagscale .ci/slurm_up.sh: a one-node test cluster
ClusterName=tagscale-ci
SlurmctldHost=$HOST
# cred_expire is also how long a requeued job is held before it may start again
AuthInfo=cred_expire=$REQUEUE_DELAY
SlurmctldPort=${TAGSCALE_SLURM_CTLD_PORT:-6817}
SlurmdPort=${TAGSCALE_SLURM_SLURMD_PORT:-6818}
SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
EOF
  conf_common
  echo "NodeName=$HOST CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1" \
       "RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN"
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$SLURM_CONF"

# 6. daemons: each daemonizes and writes its pid file; -c = start with an empty queue
/usr/sbin/slurmctld -f "$SLURM_CONF" -c
await_daemon "$DIR/slurmctld.pid" slurmctld "$DIR/log/slurmctld.log"
/usr/sbin/slurmd -f "$SLURM_CONF"
await_daemon "$DIR/slurmd.pid" slurmd "$DIR/log/slurmd.log"

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
