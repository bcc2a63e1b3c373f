#!/usr/bin/env bash
# Install the offline data set the benchmark uses: Debian's dataset-fashion-mnist (files under
# /usr/share/datasets/fashion-mnist), so CI tests the benchmark's data path instead of skipping it.
# Idempotent; run as root (or with sudo available).
set -euo pipefail

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
fi
ls -l /usr/share/datasets/fashion-mnist
