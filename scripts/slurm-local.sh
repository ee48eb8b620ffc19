#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, to try the cluster path (Snakemake's SLURM
# executor with profiles/slurm-local) without a cluster. As root:
#   scripts/slurm-local.sh up       # install slurm-wlm and munge if missing, configure, start
#   scripts/slurm-local.sh status   # sinfo
#   scripts/slurm-local.sh down     # stop the daemons (the configuration stays)
# Idempotent: `up` on a running cluster checks it answers; it refuses to replace an
# /etc/slurm/slurm.conf it did not write. State and logs: /var/lib/dwf-slurm.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/dwf-slurm
MARK="# written by dwf scripts/slurm-local.sh"

die() { echo "error: $*" >&2; exit 2; }

answers() { timeout 10 sinfo --noheader >/dev/null 2>&1; }

up() {
    [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and this is not Debian"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    local host cpus mem_mb wanted
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb="$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))"
    wanted="$(sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
                  -e "s|@STATE@|$STATE|g" "$HERE/slurm-local/slurm.conf.in")"
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script; move it away to use the test cluster"
    fi
    mkdir -p "$STATE/slurmctld" "$STATE/slurmd" /etc/slurm
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$wanted" ]; then
        printf '%s\n' "$wanted" > "$CONF"
        down quiet  # a changed configuration: restart what runs
    fi
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    pgrep -x munged >/dev/null || { mkdir -p /run/munge && chown munge:munge /run/munge && su -s /bin/sh munge -c munged; }
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if answers && [ "$(sinfo --noheader -o %t | head -1)" = idle ]; then
            echo "SLURM is up: $(sinfo --noheader -o '%P %D node(s) %c CPUs %m MB %t')"
            return 0
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    die "SLURM did not come up within a minute; see $STATE/slurmctld.log and $STATE/slurmd.log"
}

down() {
    local what
    for what in slurmd slurmctld; do
        pkill -x "$what" 2>/dev/null || true
    done
    for _ in $(seq 20); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.5; done
    [ "${1:-}" = quiet ] || echo "SLURM is down (munged left running; the configuration stays in $CONF)"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) answers && sinfo || die "no SLURM answers here (scripts/slurm-local.sh up)" ;;
    *) die "usage: scripts/slurm-local.sh up|status|down" ;;
esac
