#!/usr/bin/env bash
# Install what the browser test (tests/test_ui_browser.py) needs on a fresh Debian machine: a
# headless Chromium and the matching chromedriver (Debian's `chromium` and `chromium-driver`; Ubuntu's
# `chromium-browser` is a snap shim that does not run in containers). Selenium itself comes with the
# dev extra of pyproject.toml. Idempotent; run as root (or with sudo available).
set -euo pipefail

have_browser=0
for b in chromium chromium-browser google-chrome; do
    command -v "$b" >/dev/null 2>&1 && have_browser=1
done
have_driver=0
{ command -v chromedriver >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromedriver ]; } && have_driver=1

if [ "$have_browser" = 0 ] || [ "$have_driver" = 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

# Print the versions for the log (`sed -n 1p` reads its whole input: no SIGPIPE under pipefail).
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then
        "$b" --version 2>/dev/null | sed -n 1p || true
        break
    fi
done
{ command -v chromedriver >/dev/null 2>&1 && chromedriver --version | sed -n 1p; } || true
