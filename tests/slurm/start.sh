#!/usr/bin/env bash
# Start a throw-away one-node SLURM (munged, slurmctld, slurmd) for the tests.
#
#   tests/slurm/start.sh STATE_DIR      # prints the path of STATE_DIR/slurm.conf (export it as SLURM_CONF)
#   tests/slurm/stop.sh  STATE_DIR      # cancels the jobs, stops exactly the daemons started here
#
# Debian's slurm-wlm and munge are installed with apt-get when absent. Config, state, spool, logs and
# pid files all live in STATE_DIR, but for munged's socket, seed and log in a folder of /run/munge of its own;
# STATE_DIR/pids lists "NAME PID" for every daemon this script started: stop.sh kills those and no other.
# Exit codes: 0 running; 77 SLURM cannot be installed here (one line on stderr says why: the tests skip);
# anything else is a failure (logs on stderr).
set -euo pipefail

SKIP=77
state=${1:?usage: start.sh STATE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$state"
state=$(cd "$state" && pwd)

skip() { echo "SLURM unavailable: $*" >&2; exit "$SKIP"; }

# ---- install ---------------------------------------------------------------------------------
missing() { for b in slurmctld slurmd sinfo sbatch munged mungekey munge unmunge; do command -v "$b" >/dev/null || return 0; done; return 1; }
if missing; then
    [ "$(id -u)" -eq 0 ] || skip "slurm-wlm/munge are not installed and installing them needs root (uid $(id -u))"
    command -v apt-get >/dev/null || skip "slurm-wlm/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    log=$state/apt-get.log
    apt=(apt-get -y -q -o DPkg::Lock::Timeout=120)  # wait for another apt/dpkg rather than fail
    if ! "${apt[@]}" install slurm-wlm munge >"$log" 2>&1; then
        # the package lists may be missing or stale: refresh once and retry
        if ! { "${apt[@]}" update && "${apt[@]}" install slurm-wlm munge; } >>"$log" 2>&1; then
            skip "apt-get install slurm-wlm munge failed: $(grep -E '^(E|W):' "$log" | tail -n 1 || tail -n 1 "$log")"
        fi
    fi
    missing && skip "apt-get installed slurm-wlm and munge but their programs are not on PATH"
fi

# ---- helpers ---------------------------------------------------------------------------------
record() { echo "$1 $2" >>"$state/pids"; }   # NAME PID: what stop.sh may kill
fail() {
    echo "start.sh: $*" >&2
    for f in "$state"/slurmctld.log "$state"/slurmd.log "$state"/*.out; do
        [ -s "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
    done
    "$here/stop.sh" "$state" >&2 || true
    exit 1
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port_pair() {  # two consecutive free ports, away from the defaults (6817/6818) a real SLURM may hold
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 20000))
        if port_free "$p" && port_free $((p + 1)); then echo "$p"; return 0; fi
    done
    return 1
}

[ -e "$state/pids" ] && fail "$state/pids exists: this folder already holds a running test SLURM (run stop.sh)"
: >"$state/pids"

# ---- munge -----------------------------------------------------------------------------------
# A munged of our own, on its own socket in /run/munge/<name>/ (munged wants a munge-owned folder, and
# the state folder may not be reachable for the munge user), so that a site's munged, or another test
# cluster's, is neither used nor stopped by us. The key is the machine's (made here if there is none).
[ "$(id -u)" -eq 0 ] || skip "starting munged, slurmctld and slurmd needs root (uid $(id -u))"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
install -d -m 0700 -o munge -g munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
fi
mdir=$(mktemp -d /run/munge/volseg-test.XXXXXX)
chown munge:munge "$mdir"
chmod 0755 "$mdir"
echo "$mdir" >"$state/munge-dir"   # stop.sh removes it
socket=$mdir/munge.socket
# setpriv execs (no fork), so $! is munged itself
setsid setpriv --reuid=munge --regid=munge --init-groups munged --foreground --socket="$socket" \
    --pid-file="$mdir/munged.pid" --seed-file="$mdir/munged.seed" --log-file="$mdir/munged.log" \
    </dev/null >"$state/munged.out" 2>&1 &
record munged $!
for _ in $(seq 100); do
    munge -S "$socket" -n 2>/dev/null | unmunge -S "$socket" >/dev/null 2>&1 && break
    kill -0 "$!" 2>/dev/null || fail "munged exited: $(cat "$state/munged.out")"
    sleep 0.1
done
munge -S "$socket" -n | unmunge -S "$socket" >/dev/null 2>&1 || fail "munged does not answer on $socket"

# ---- slurm.conf ------------------------------------------------------------------------------
node=$(hostname -s)
cpus=$(nproc --all)  # the machine's, not this process's affinity (a test run may have narrowed it)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
port=$(free_port_pair) || fail "no two free consecutive TCP ports found"
mkdir -p "$state/ctld" "$state/spool"
conf=$state/slurm.conf
cat >"$conf" <<CONF
# a one-node test cluster written by tests/slurm/start.sh; every file below lives in $state
ClusterName=volsegtest
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# cores and memory are consumable: several small jobs share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# the node as configured below, even where the machine reports a little less (e.g. memory in a VM)
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=30
MinJobAge=2
KillWait=5
InactiveLimit=0
Waittime=0
# the node's name is the short hostname (slurmd looks itself up by it); the address is loopback
NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$conf

# ---- daemons ---------------------------------------------------------------------------------
setsid slurmctld -D -c -f "$conf" </dev/null >"$state/slurmctld.out" 2>&1 &
record slurmctld $!
setsid slurmd -D -f "$conf" -N "$node" </dev/null >"$state/slurmd.out" 2>&1 &
record slurmd $!

deadline=$((SECONDS + ${SLURM_START_TIMEOUT:-60}))
until [ "$(sinfo -h -N -n "$node" -o %T 2>/dev/null)" = idle ]; do
    while read -r name pid; do
        kill -0 "$pid" 2>/dev/null || fail "$name exited"
    done <"$state/pids"
    [ "$SECONDS" -lt "$deadline" ] || fail "node $node not idle after ${SLURM_START_TIMEOUT:-60} s: $(sinfo -h -N -o '%T %E' 2>&1)"
    sleep 0.5
done
echo "$conf"
