#!/usr/bin/env bash
# What the multi-host tests need on a Debian machine, as root: ssh (sshd runs inside the tests'
# network namespaces, started by the tests), iproute2, and a single-node Slurm with munge.
#   .ci/services.sh install   apt-get the packages
#   .ci/services.sh start     write slurm.conf, start munged, slurmctld, slurmd; wait until a job can run
#   .ci/services.sh stop      stop what `start` started
# Exit 3 from install/start: not possible here (not root, no apt-get): the tests that need it skip.
set -uo pipefail

state=/run/zfarm-ci
packages=(openssh-server openssh-client iproute2 munge slurmctld slurmd slurm-client)

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "services: not root: the ssh, namespace and Slurm tests will skip" >&2
        exit 3
    fi
}

install() {
    need_root
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "services: no apt-get: the ssh, namespace and Slurm tests will skip" >&2
        exit 3
    fi
    missing=()
    for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
            { echo "services: apt-get install ${missing[*]} failed" >&2; exit 3; }
    fi
    echo "services: installed ${packages[*]}"
}

start() {
    need_root
    command -v slurmctld >/dev/null 2>&1 || { echo "services: Slurm is not installed" >&2; exit 3; }
    mkdir -p "$state" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/slurm
    # munge: a key if the package left none, then the daemon (as root: --force)
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
                                       chmod 400 /etc/munge/munge.key; }
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged || munged --force || { echo "services: munged did not start" >&2; exit 3; }
        touch "$state/munged"
    fi
    host=$(hostname -s)
    if [[ -e /etc/slurm/slurm.conf ]] && ! grep -q "written by zfarm" /etc/slurm/slurm.conf; then
        echo "services: /etc/slurm/slurm.conf is not ours: using that Slurm as it is"
    else
        write_slurm_conf "$host"
    fi
    start_slurm "$host"
}

write_slurm_conf() {
    local host=$1 node
    node=$(slurmd -C | head -1)
    cat >/etc/slurm/slurm.conf <<EOF
# written by zfarm's .ci/services.sh for the test suite: one node, this machine
ClusterName=zfarmci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=5
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    rm -f /etc/slurm/cgroup.conf
}

start_slurm() {
    local host=$1
    pgrep -x slurmctld >/dev/null || { slurmctld -i && touch "$state/slurmctld"; }
    pgrep -x slurmd >/dev/null || { slurmd && touch "$state/slurmd"; }
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "services: Slurm is up: $(sinfo -h -o '%P %D %T %c')"
            return 0
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "services: Slurm did not become ready; see /var/log/slurm/" >&2
    exit 3
}

stop() {
    # only what start started, by the pid each daemon wrote
    declare -A pidfile=([slurmd]="$state/slurmd.pid" [slurmctld]="$state/slurmctld.pid"
                        [munged]=/run/munge/munged.pid)
    for d in slurmd slurmctld munged; do
        if [[ -e "$state/$d" ]]; then
            pid=$(cat "${pidfile[$d]}" 2>/dev/null)
            [[ -n $pid ]] && kill "$pid" 2>/dev/null
            rm -f "$state/$d"
        fi
    done
    echo "services: stopped"
}

"${1:?usage: services.sh install|start|stop}"
