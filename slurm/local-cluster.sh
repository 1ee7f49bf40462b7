#!/usr/bin/env bash
# A real single-node Slurm (+ munge) whose whole state lives under one folder.
# Used by the Slurm test tier (tests/test_slurm.py) and handy for trying the sbatch templates.
#
#   slurm/local-cluster.sh install            apt-get install slurm-wlm munge (Debian/Ubuntu, root)
#   slurm/local-cluster.sh start DIR [CPUS]   configure and start munged, slurmctld, slurmd under DIR
#   slurm/local-cluster.sh stop DIR           stop them (by the pid files under DIR)
#   slurm/local-cluster.sh env DIR            print `export SLURM_CONF=...` for clients
#
# Runs as root (munged needs --force for that; Slurm's SlurmUser is root). Ports are picked free
# at start, so two clusters (two test runs) can live side by side. CPUS (default 8) is declared to
# Slurm regardless of the real core count (SlurmdParameters=config_overrides), so a 2-core box can
# run jobs with several tasks.
set -euo pipefail

cmd=${1:-}
die() { echo "local-cluster: $*" >&2; exit 1; }

free_port() {
    python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND until it succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

stop_pidfile() {
    local f=$1 pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

case $cmd in
install)
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
    command -v apt-get >/dev/null || die "apt-get not found: install slurm-wlm and munge by hand"
    [[ $(id -u) == 0 ]] || die "installing packages needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
    ;;
start)
    dir=${2:?usage: local-cluster.sh start DIR [CPUS]}
    cpus=${3:-8}
    [[ $(id -u) == 0 ]] || die "the local cluster runs as root (munged --force, SlurmUser=root)"
    for b in munged slurmctld slurmd; do command -v $b >/dev/null || die "$b not found (run: $0 install)"; done
    dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
    mkdir -p "$dir"/{etc,state,spool,log,run,munge}
    chmod 700 "$dir/munge"
    # munge: a private key, socket, pid and log; --force lets it run as root in a non-standard place
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || die "munged failed: $(tail -3 "$dir/munge/munged.log" 2>/dev/null)"
    node=$(hostname -s)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=longtrain-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    export SLURM_CONF=$dir/etc/slurm.conf
    slurmctld -f "$SLURM_CONF" -i || die "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log" 2>/dev/null)"
    slurmd -f "$SLURM_CONF" || die "slurmd failed: $(tail -5 "$dir/log/slurmd.log" 2>/dev/null)"
    # ready when the node accepts jobs
    if ! wait_for 60 bash -c "sinfo -h -o %t | grep -qE '^(idle|mix|alloc)'"; then
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        wait_for 30 bash -c "sinfo -h -o %t | grep -qE '^(idle|mix|alloc)'" \
            || die "node never became idle: $(sinfo -h 2>&1 | head -2); see $dir/log"
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
stop)
    dir=${2:?usage: local-cluster.sh stop DIR}
    [[ -d $dir ]] || exit 0
    if [[ -f $dir/etc/slurm.conf ]] && command -v scancel >/dev/null; then
        SLURM_CONF=$dir/etc/slurm.conf timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    fi
    stop_pidfile "$dir/run/slurmd.pid"
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    ;;
env)
    dir=${2:?usage: local-cluster.sh env DIR}
    echo "export SLURM_CONF=$(cd "$dir" && pwd)/etc/slurm.conf"
    ;;
*)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
