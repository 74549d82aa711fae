#!/usr/bin/env bash
# Start/stop a throw-away one-node Slurm cluster (slurmctld + slurmd + munged)
# whose whole state lives under DIR.  Meant for CI: run as root on Debian/Ubuntu.
#
#   tests/cluster/slurm.sh start DIR    # prints "export SLURM_CONF=DIR/slurm.conf"
#   tests/cluster/slurm.sh stop DIR     # always exits 0, kills by PID file
#   tests/cluster/slurm.sh status DIR
#
# Callers should always pair start with stop, e.g.
#   trap 'tests/cluster/slurm.sh stop "$D"' EXIT
#   eval "$(tests/cluster/slurm.sh start "$D")"
#
# Environment knobs (optional):
#   SLURM_CI_CTLD_PORT / SLURM_CI_SLURMD_PORT   (default 6817 / 6818)
#   SLURM_CI_START_TIMEOUT                      (seconds to wait for idle node, default 60)
#   SLURM_CI_NO_INSTALL=1                       never call apt-get
#   SLURM_CI_FAKE_GPUS=N                        advertise N fake "gpu" GRES on the node
#                                               (char-device clones of /dev/null, no CUDA)
#                                               so that jobs requesting --gpus/--gres=gpu
#                                               are schedulable; default 0 = such jobs are
#                                               rejected at submission
#   (ports and FAKE_GPUS are baked into DIR/slurm.conf on the first start; an
#   existing DIR/slurm.conf is reused as is)
# Everything except the final "export SLURM_CONF=..." line goes to stderr, so
# `eval "$(slurm.sh start DIR)"` works.
set -euo pipefail

log() { echo "[slurm.sh] $*" >&2; }
STARTING=0
die() {
    log "ERROR: $*"
    # a failed start tears down whatever it already started
    if [[ $STARTING == 1 ]]; then STARTING=0; do_stop; fi
    exit 1
}

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
ACTION=$1
DIR=$(realpath -m -- "$2")

CONF=$DIR/slurm.conf
RUN=$DIR/run
LOGD=$DIR/log
MUNGE=$DIR/munge
MUNGE_SOCKET=$MUNGE/munge.socket
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
START_TIMEOUT=${SLURM_CI_START_TIMEOUT:-60}
# The slurm-jobstep executor strips every SLURM_* variable (SLURM_CONF included)
# before it runs `srun` inside the job, so srun on the node only finds the
# config at the compiled-in default path.  We symlink it there (as on a real
# cluster node) and remove the link again on stop.
DEFAULT_CONF=/etc/slurm/slurm.conf

# --- helpers ---------------------------------------------------------------

# alive PID: running and not a zombie (killed daemons are reparented to PID 1,
# which in containers may not reap them promptly)
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# pid_alive PIDFILE NAME: true if the pid in PIDFILE is alive and its command is NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name"* ]]
}

# kill_pidfile PIDFILE NAME: TERM, wait up to 10 s, then KILL.  Never fails.
kill_pidfile() {
    local pidfile=$1 name=$2 pid i
    if pid_alive "$pidfile" "$name"; then
        pid=$(tr -dc '0-9' <"$pidfile")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            alive "$pid" || break
            sleep 0.2
        done
        if alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# Processes that our slurmd spawned (slurmstepd) are not its children after they
# daemonize, and survive slurmd.  They inherit SLURM_CONF=$CONF from slurmd (we
# start slurmd with it), which identifies them exactly.
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" || continue
        echo "${p#/proc/}"
    done
}

# descendants PID: all transitive children of PID (by parent pid).
descendants() {
    local kids k
    kids=$(ps -e -o pid=,ppid= | awk -v p="$1" '$2 == p {print $1}')
    for k in $kids; do
        echo "$k"
        descendants "$k"
    done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ ${SLURM_CI_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and SLURM_CI_NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get"
    log "installing slurm-wlm munge (missing: ${missing[*]})"
    # Keep the packages' own services (system munged/slurmctld/slurmd) from
    # starting: we run our own daemons.  Only add policy-rc.d if none exists.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! apt-get install "${apt_opts[@]}" slurm-wlm munge >&2; then
        apt-get update -q >&2 || true
        apt-get install "${apt_opts[@]}" slurm-wlm munge >&2 || rc=$?
    fi
    [[ $added_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || die "apt-get install slurm-wlm munge failed ($rc)"
}

start_munge() {
    # Own munged with its own key and socket under DIR.
    if pid_alive "$RUN/munged.pid" munged; then
        log "munged already running"
        return 0
    fi
    mkdir -p "$MUNGE"
    chmod 0755 "$MUNGE"   # clients need x on the socket's dir; the key itself is 0400
    if [[ ! -s $MUNGE/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$MUNGE/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: DIR may sit below a world-writable dir such as /tmp; munged
    # otherwise refuses (it checks the key/socket/log directories' permissions).
    munged --force \
        --key-file="$MUNGE/munge.key" \
        --socket="$MUNGE_SOCKET" \
        --pid-file="$RUN/munged.pid" \
        --log-file="$LOGD/munged.log" \
        --seed-file="$MUNGE/munged.seed" \
        --num-threads=2 >&2 || return 1
    local i
    for i in $(seq 1 50); do
        [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

write_conf() {
    local host hw cpus
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hw=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=' | sed -E 's/^NodeName=[^ ]+ //') || true
    if [[ -z $hw ]]; then
        cpus=$(nproc)
        hw="CPUs=$cpus RealMemory=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
    fi
    local gres_line="" node_gres=""
    if [[ ${SLURM_CI_FAKE_GPUS:-0} -gt 0 ]]; then
        gres_line="GresTypes=gpu"
        node_gres="Gres=gpu:${SLURM_CI_FAKE_GPUS}"
        # slurmd drops GPUs without File= ("Removing file-less GPU"), so give
        # each fake GPU its own char device: a clone of /dev/null (1,3).  With
        # task/none nothing ever opens it; Slurm still sets CUDA_VISIBLE_DEVICES.
        local n=$SLURM_CI_FAKE_GPUS i files
        mkdir -p "$DIR/dev"
        for ((i = 0; i < n; i++)); do
            [[ -c $DIR/dev/gpu$i ]] || mknod "$DIR/dev/gpu$i" c 1 3 || die "mknod failed (needed for SLURM_CI_FAKE_GPUS)"
        done
        if ((n == 1)); then files=$DIR/dev/gpu0; else files="$DIR/dev/gpu[0-$((n - 1))]"; fi
        echo "Name=gpu File=$files" >"$DIR/gres.conf"
    fi
    cat >"$CONF" <<EOF
# Generated by tests/cluster/slurm.sh: one-node CI cluster, everything under $DIR
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# keep finished jobs visible to squeue/scontrol for 10 min: the snakemake
# slurm executor polls squeue (no slurmdbd => no sacct)
MinJobAge=600
# jobs without --mem would otherwise get the whole node's memory and serialize
DefMemPerCPU=512
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
$gres_line
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host $hw $node_gres State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

link_default_conf() {
    local cur
    if [[ -L $DEFAULT_CONF ]]; then
        cur=$(readlink "$DEFAULT_CONF")
        if [[ $cur == "$CONF" ]]; then return 0; fi
        # a link left behind by an earlier run whose DIR is gone (or any
        # link to another slurm.sh cluster that is not running) is replaced
        if [[ -e $cur ]]; then
            head -1 "$cur" 2>/dev/null | grep -q 'Generated by tests/cluster/slurm.sh' ||
                die "$DEFAULT_CONF links to $cur (not ours); refusing to replace it"
            # one cluster at a time: jobs of a running one would follow the link
            pid_alive "$(dirname "$cur")/run/slurmctld.pid" slurmctld &&
                die "another slurm.sh cluster is running ($(dirname "$cur")); stop it first"
        fi
    elif [[ -e $DEFAULT_CONF ]]; then
        die "$DEFAULT_CONF exists (a real Slurm setup?); refusing to shadow it. srun inside jobs would use it."
    fi
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -sfn "$CONF" "$DEFAULT_CONF"
    log "linked $DEFAULT_CONF -> $CONF"
}

unlink_default_conf() {
    if [[ -L $DEFAULT_CONF && $(readlink "$DEFAULT_CONF") == "$CONF" ]]; then
        rm -f "$DEFAULT_CONF"
    fi
}

node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -1 | tr -d ' *'
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (SlurmUser=root, SlurmdUser=root)"
    install_packages
    STARTING=1
    mkdir -p "$DIR" "$RUN" "$LOGD" "$DIR/state" "$DIR/spool"
    start_munge || die "munged did not come up; see $LOGD/munged.log"
    [[ -s $CONF ]] || write_conf
    link_default_conf
    export SLURM_CONF=$CONF

    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        log "slurmctld already running"
    else
        log "starting slurmctld"
        slurmctld -f "$CONF" >&2 || die "slurmctld failed; see $LOGD/slurmctld.log"
    fi
    local i
    for i in $(seq 1 100); do
        timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.2
    done
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || {
        tail -n 30 "$LOGD/slurmctld.log" >&2 || true
        die "slurmctld not responding"
    }

    if pid_alive "$RUN/slurmd.pid" slurmd; then
        log "slurmd already running"
    else
        log "starting slurmd"
        slurmd -f "$CONF" -N "$(hostname -s)" >&2 || die "slurmd failed; see $LOGD/slurmd.log"
    fi

    local st="" deadline=$((SECONDS + START_TIMEOUT)) resumed=0
    while ((SECONDS < deadline)); do
        st=$(node_state)
        case $st in
            idle | mix | alloc) break ;;
            down | drain | drng | fail)
                if [[ $resumed == 0 ]]; then
                    log "node is $st, resuming"
                    timeout 5 scontrol update NodeName="$(hostname -s)" State=RESUME >&2 || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.5
    done
    if [[ $st != idle && $st != mix && $st != alloc ]]; then
        log "node state '$st' after ${START_TIMEOUT}s"
        timeout 5 scontrol show node >&2 || true
        tail -n 30 "$LOGD/slurmctld.log" "$LOGD/slurmd.log" >&2 || true
        die "cluster did not become ready"
    fi
    STARTING=0
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    log "cluster up: node $(hostname -s) $st; SLURM_CONF=$CONF"
    echo "export SLURM_CONF=$CONF"
}

do_stop() {
    set +e
    export SLURM_CONF=$CONF
    [[ -d $DIR ]] || { log "nothing to stop in $DIR"; return 0; }
    # Cancel every job first so that slurmd tears the job steps down itself.
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        timeout 10 scancel --full --quiet --partition debug 2>/dev/null
        local i
        for i in $(seq 1 20); do
            [[ -z $(timeout 5 squeue -h -t running,completing,pending -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    kill_pidfile "$RUN/slurmd.pid" slurmd
    kill_pidfile "$RUN/slurmctld.pid" slurmctld
    # Normally empty; left over if slurmctld/slurmd died before the jobs ended.
    local pid
    for pid in $(our_stepds); do
        log "killing leftover slurmstepd $pid and its job processes: $(descendants "$pid" | xargs)"
        kill -STOP "$pid" 2>/dev/null
        # shellcheck disable=SC2046  # one pid per word
        kill -KILL $(descendants "$pid") 2>/dev/null
        kill -KILL "$pid" 2>/dev/null
    done
    kill_pidfile "$RUN/munged.pid" munged
    unlink_default_conf
    log "stopped"
    return 0
}

do_status() {
    local rc=0 d
    for d in munged slurmctld slurmd; do
        if pid_alive "$RUN/$d.pid" "$d"; then log "$d running"; else log "$d not running"; rc=1; fi
    done
    [[ $rc == 0 ]] && SLURM_CONF=$CONF timeout 10 sinfo >&2
    return $rc
}

case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) usage ;;
esac
