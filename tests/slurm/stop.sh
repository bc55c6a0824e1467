#!/usr/bin/env bash
# Stop the test SLURM that tests/slurm/start.sh STATE_DIR started: cancel its jobs and wait for them to
# end, then TERM (and after a grace period KILL) exactly the PIDs listed in STATE_DIR/pids, and no other
# process. A PID whose process has another name by now (reused) is left alone. Safe to run twice.
set -euo pipefail

state=${1:?usage: stop.sh STATE_DIR}
pids=$state/pids
[ -e "$pids" ] || exit 0
export SLURM_CONF=$state/slurm.conf

alive() {  # PID NAME: the process is running (not a zombie) and still is NAME
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$(cut -d' ' -f1 <<<"${stat##*) }")" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# 1. jobs first, while slurmctld and slurmd still run to end them (a job outlives a stopped slurmd)
ctld=$(awk '$1 == "slurmctld" {print $2}' "$pids")
if [ -n "$ctld" ] && alive "$ctld" slurmctld && [ -e "$SLURM_CONF" ]; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
    fi
    # every job gone from the queue and every slurmstepd gone (each keeps a socket in the spool dir)
    for _ in $(seq 120); do
        if [ -z "$(squeue -h -o %A 2>/dev/null || echo error)" ] && \
                [ -z "$(find "$state/spool" -maxdepth 1 -type s 2>/dev/null)" ]; then
            break
        fi
        sleep 0.5
    done
fi

# 2. the daemons, newest first (slurmd, slurmctld, munged)
tac "$pids" | while read -r name pid; do
    alive "$pid" "$name" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" "$name" || break; sleep 0.1; done
    if alive "$pid" "$name"; then
        echo "stop.sh: $name ($pid) ignored TERM for 10 s; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" "$name" || break; sleep 0.1; done
    fi
done

left=""
while read -r name pid; do alive "$pid" "$name" && left="$left $name($pid)"; done <"$pids"
[ -z "$left" ] || { echo "stop.sh: still running:$left" >&2; exit 1; }
mv "$pids" "$pids.stopped"
# munged's private folder (socket, seed, log), made by start.sh under /run/munge
if [ -e "$state/munge-dir" ]; then
    mdir=$(cat "$state/munge-dir")
    case "$mdir" in /run/munge/volseg-test.*) rm -rf -- "$mdir" ;; esac
    rm -f "$state/munge-dir"
fi
