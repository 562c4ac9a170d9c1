#!/usr/bin/env bash
# Install Prometheus and promtool (Debian package `prometheus`) for the deploy tests:
# `promtool check/test rules` on the generated alert rules, and a real Prometheus server in the
# end-to-end monitoring test. Idempotent: does nothing when both are on PATH.
#
#   scripts/install-prometheus.sh
#
# Needs apt-get and root (or sudo). Elsewhere, install Prometheus >= 2.42 by hand; the tests
# skip with a reason when promtool is missing.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "==> prometheus is installed ($(prometheus --version 2>&1 | head -1))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: no apt-get here; install Prometheus (promtool) by hand" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-prometheus: needs root (or sudo) for apt-get" >&2
        exit 1
    fi
fi
echo "==> installing prometheus (Debian package) for promtool and the monitoring tests"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
# The package's postinst enables a systemd service; without systemd (containers, CI) nothing starts.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "==> $(prometheus --version 2>&1 | head -1)"
