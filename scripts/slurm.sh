#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the launcher tests and for trying hydra/launcher=slurm.
#
#   scripts/slurm.sh start    install (Debian's slurmctld, slurmd, slurm-client, munge) if missing,
#                             write a minimal slurm.conf, start munged / slurmctld / slurmd; idempotent
#   scripts/slurm.sh stop     stop the daemons this script started (and nothing else)
#   scripts/slurm.sh status   whether the cluster answers, and its node
#
# Runs as root (apt-get, daemons). The cluster: one node with this machine's CPUs and memory, one
# partition `debug` (the default), SlurmUser=root, proctrack/linuxproc, task/none, select/cons_tres.
# An existing /etc/slurm/slurm.conf that this script did not write is never touched (the script
# stops with an error instead): on a machine with a real SLURM, use that one.
set -euo pipefail

STATE=/run/robustexp-slurm          # pid files of the daemons started here
CONF=/etc/slurm/slurm.conf
MARK="# written by robustexp scripts/slurm.sh"
PARTITION=debug
log() { echo "[slurm.sh] $*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/slurm.sh: run as root (it installs packages and starts daemons)" >&2
    exit 2
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  log "installing slurmctld slurmd slurm-client munge (Debian packages, about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d 101: the packages' postinst must not try to start services (no init system here)
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "scripts/slurm.sh: $CONF exists and was not written by this script; not touching it" >&2
    echo "  (this machine already has a SLURM configuration: use that cluster, or move the file away)" >&2
    exit 1
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # MB, 1 GB left to the system
  mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm "$STATE"
  cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=robustexp
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120): 10 here, so tests do not wait
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# the main scheduling loop every 2 s (default 60): a requeued job starts once its BeginTime has passed
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
InactiveLimit=0
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.tmp"; then rm "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; fi
}

alive() {  # alive <pid file> <command name>
  [ -f "$1" ] && local pid && pid=$(cat "$1") && [ -d "/proc/$pid" ] && [ "$(cat /proc/"$pid"/comm)" = "$2" ]
}

start_munge() {
  if alive "$STATE/munged.pid" munged; then return; fi
  if pgrep -x munged >/dev/null; then log "munged already running (not started here)"; return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/robustexp-munged.pid
  for _ in $(seq 50); do [ -s /run/munge/robustexp-munged.pid ] && break; sleep 0.1; done
  cp /run/munge/robustexp-munged.pid "$STATE/munged.pid"
  log "munged started (pid $(cat "$STATE/munged.pid"))"
}

start_daemon() {  # start_daemon <name>
  local name=$1
  if alive "$STATE/$name.pid" "$name"; then return; fi
  if pgrep -x "$name" >/dev/null; then log "$name already running (not started here)"; return; fi
  "/usr/sbin/$name"
  for _ in $(seq 100); do alive "$STATE/$name.pid" "$name" && break; sleep 0.1; done
  alive "$STATE/$name.pid" "$name" || { echo "scripts/slurm.sh: $name did not start; see /var/log/slurm/$name.log" >&2; exit 1; }
  log "$name started (pid $(cat "$STATE/$name.pid"))"
}

wait_idle() {
  local host state
  host=$(hostname -s)
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc) log "node $host $state, partition $PARTITION ($(nproc) CPUs): ready"; return ;;
      down*|drain*|inval*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "scripts/slurm.sh: node $host is not idle (sinfo: ${state:-no answer}); see /var/log/slurm/" >&2
  exit 1
}

stop_one() {  # stop_one <name>: only a daemon whose pid file this script wrote
  local name=$1 file="$STATE/$1.pid"
  if alive "$file" "$name"; then
    local pid; pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    log "$name stopped (pid $pid)"
  fi
  rm -f "$file"
}

case "${1:-}" in
  start)
    need_root
    install_packages
    write_config
    start_munge
    start_daemon slurmctld
    start_daemon slurmd
    wait_idle
    ;;
  stop)
    need_root
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    ;;
  status)
    if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
      sinfo -N -o "%N %t %c %m %P"
    else
      echo "no SLURM controller answers here (start one with: sudo scripts/slurm.sh start)"
      exit 1
    fi
    ;;
  *)
    echo "usage: scripts/slurm.sh start|stop|status" >&2
    exit 2
    ;;
esac
