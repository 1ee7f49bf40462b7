#!/usr/bin/env bash
# A real Slurm (+ munge) on this one machine whose whole state lives under one folder: one node, or
# several nodes, each in a network namespace of its own. Used by the Slurm test tiers
# (tests/test_slurm.py, tests/test_multi_node.py) and handy for trying the sbatch templates.
#
#   slurm/local-cluster.sh install                    apt-get install slurm-wlm munge (Debian/Ubuntu, root)
#   slurm/local-cluster.sh start DIR [CPUS] [NODES]   configure and start munged, slurmctld, slurmd(s) under DIR
#   slurm/local-cluster.sh stop DIR                   stop them (pid files under DIR), delete the namespaces
#   slurm/local-cluster.sh env DIR                    print `export SLURM_CONF=...` for clients
#   slurm/local-cluster.sh netns DIR NODE             print the network namespace of NODE (n1, n2, ...)
#
# Runs as root (munged needs --force for that; Slurm's SlurmUser is root). Ports are picked free
# at start, so two clusters (two test runs) can live side by side. CPUS (default 8) is declared to
# Slurm per node regardless of the real core count (SlurmdParameters=config_overrides), so a 2-core
# box can run jobs with several tasks.
# NODES >= 2: nodes n1..nN, each a slurmd (-N nK, a port of its own) inside a network namespace
# lt<id>-nK whose only link is an interface named lt0 (172.<a>.<b>.K/24) on a bridge in the host's
# namespace; slurmctld listens on the bridge (.254). A node reaches another only through its
# NodeAddr, so jobs prove cross-node launching: rank 0's address must be the first node's NodeAddr
# (not a node name, not 127.0.0.1) and gloo must use lt0 (GLOO_SOCKET_IFNAME=lt0).
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
    dir=${2:?usage: local-cluster.sh start DIR [CPUS] [NODES]}
    cpus=${3:-8}
    nodes=${4:-1}
    [[ $nodes =~ ^[1-9]$ ]] || die "NODES must be 1-9, got $nodes"
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
    ctld_addr=127.0.0.1
    if (( nodes > 1 )); then
        command -v ip >/dev/null || die "several nodes need iproute2 (ip netns)"
        mem=$((mem / nodes))
        # a private /24 not in use on this machine, and names unique to DIR
        id=$(printf %s "$dir" | md5sum | cut -c1-5)
        for _ in $(seq 50); do
            a=$((16 + RANDOM % 16)); b=$((RANDOM % 256))
            ip -o -4 addr | grep -q " 172\.$a\.$b\." || break
        done
        net=172.$a.$b
        br=lt${id}br
        echo "NETNS_ID=$id NETNS_NET=$net NETNS_NODES=$nodes" >"$dir/etc/netns.env"
        ip link add "$br" type bridge || die "cannot create bridge $br (ip link add ... type bridge)"
        ip addr add "$net.254/24" dev "$br"
        ip link set "$br" up
        for i in $(seq "$nodes"); do
            ns=lt${id}-n$i
            ip netns add "$ns" || die "cannot create network namespace $ns"
            ip link add "lt${id}h$i" type veth peer name "lt${id}p$i"
            ip link set "lt${id}h$i" master "$br" up
            ip link set "lt${id}p$i" netns "$ns"
            ip -n "$ns" link set "lt${id}p$i" name lt0
            ip -n "$ns" addr add "$net.$i/24" dev lt0
            ip -n "$ns" link set lt0 up
            ip -n "$ns" link set lo up
        done
        ctld_addr=$net.254
    fi
    cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=longtrain-local
SlurmctldHost=$node($ctld_addr)
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
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
EOF
    if (( nodes == 1 )); then
        cat >>"$dir/etc/slurm.conf" <<EOF
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    else
        for i in $(seq "$nodes"); do
            echo "NodeName=n$i NodeAddr=$net.$i Port=$(free_port) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done >>"$dir/etc/slurm.conf"
        echo "PartitionName=local Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" \
            >>"$dir/etc/slurm.conf"
    fi
    export SLURM_CONF=$dir/etc/slurm.conf
    slurmctld -f "$SLURM_CONF" -i || die "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log" 2>/dev/null)"
    if (( nodes == 1 )); then
        slurmd -f "$SLURM_CONF" || die "slurmd failed: $(tail -5 "$dir/log/slurmd-$node.log" 2>/dev/null)"
    else
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd checks for
        for i in $(seq "$nodes"); do
            nsenter --net="/run/netns/lt${id}-n$i" slurmd -f "$SLURM_CONF" -N "n$i" \
                || die "slurmd n$i failed: $(tail -5 "$dir/log/slurmd-n$i.log" 2>/dev/null)"
        done
    fi
    # ready when every node accepts jobs
    ready() { [[ $(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc)') -ge $nodes ]]; }
    if ! wait_for 60 ready; then
        scontrol update NodeName="$(sinfo -h -N -o %N | paste -sd,)" State=RESUME >/dev/null 2>&1 || true
        wait_for 30 ready || die "nodes never became idle: $(sinfo -h -N 2>&1 | head -4); see $dir/log"
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
stop)
    dir=${2:?usage: local-cluster.sh stop DIR}
    [[ -d $dir ]] || exit 0
    if [[ -f $dir/etc/slurm.conf ]] && command -v scancel >/dev/null; then
        SLURM_CONF=$dir/etc/slurm.conf timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    fi
    for f in "$dir"/run/slurmd*.pid; do stop_pidfile "$f"; done
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    if [[ -f $dir/etc/netns.env ]]; then
        # shellcheck disable=SC1091
        source "$dir/etc/netns.env"
        for i in $(seq "$NETNS_NODES"); do
            ns=lt${NETNS_ID}-n$i
            # whatever still runs in the namespace (job steps of a killed slurmd) goes with it
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
            ip link del "lt${NETNS_ID}h$i" 2>/dev/null || true
        done
        ip link del "lt${NETNS_ID}br" 2>/dev/null || true
        rm -f "$dir/etc/netns.env"
    fi
    ;;
env)
    dir=${2:?usage: local-cluster.sh env DIR}
    echo "export SLURM_CONF=$(cd "$dir" && pwd)/etc/slurm.conf"
    ;;
netns)
    dir=${2:?usage: local-cluster.sh netns DIR NODE}
    [[ -f $dir/etc/netns.env ]] || die "$dir is not a multi-node cluster"
    # shellcheck disable=SC1091
    source "$dir/etc/netns.env"
    echo "lt${NETNS_ID}-${3:?usage: local-cluster.sh netns DIR NODE}"
    ;;
*)
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
