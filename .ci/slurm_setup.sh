#!/usr/bin/env bash
# Installs a one-node SLURM (Debian's slurm-wlm: slurmctld, slurmd, the client commands) and munge, as root, for
# the SLURM tests (tests/slurm_cluster.py and tests/slurm_nodes.py start and stop the daemons; this only installs),
# and iproute2, whose `ip` makes the network namespaces of the multi-node cluster. Idempotent: a no-op (well under
# a second) when everything is there; a first install takes about 10 s.
set -euo pipefail

# The tests need these programs (tests/slurm_cluster.py and tests/slurm_nodes.py check the same list; nsenter,
# unshare, mount and hostname are in every Debian).
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for program in munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo ip; do
    command -v "$program" >/dev/null || missing+=("$program")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm_setup: no ${missing[*]}; run this script as root (it apt-get installs slurm-wlm, munge, iproute2)" >&2
    exit 1
fi

echo "slurm_setup: no ${missing[*]}: installing slurm-wlm, munge and iproute2"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/slurm_setup.XXXXXX.log)
# Install only: the packages' scripts would start munged, slurmctld and slurmd with the system's config; the tests
# start their own. Where no policy-rc.d exists, one refuses service starts for the length of the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
# The package lists of a fresh VM may be empty or stale; skip the update when they are recent (under a day).
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    apt-get update -qq >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
fi
apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
rm -f "$log"
echo "slurm_setup: $(slurmctld -V), munge $(dpkg-query -W -f='${Version}' munge)"
