#!/usr/bin/env bash
# Install what the cluster end-to-end test (tests/test_cluster_e2e.py, marker `cluster`) needs on a
# fresh Debian/Ubuntu machine: an OpenSSH server binary (the test runs its own `sshd -i` as the SSH
# proxy command, so no daemon is started or enabled here), the SSH client, and rsync (`ray up` and
# `ray submit` copy files with it). Idempotent; run as root (or with sudo available).
set -euo pipefail

need=()
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)

if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # The test never needs the ssh *service*: keep apt from starting (or enabling) a daemon listening
    # on port 22 on machines with an init system, with a temporary policy-rc.d (exit 101 = "action
    # forbidden"), unless the machine already has its own policy.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        own_policy=1
    fi
    trap '[ "$own_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# sshd refuses to run without its privilege-separation directory; containers without systemd do not
# create it at boot.
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p /run/sshd && chmod 0755 /run/sshd
fi

# Print the versions for the log. `sed -n 1p` reads its whole input: `head -n1` would close the pipe
# early, and under `set -o pipefail` the writer's SIGPIPE (exit 141) would fail CI.
/usr/sbin/sshd -V 2>&1 | sed -n 1p || true
rsync --version | sed -n 1p
