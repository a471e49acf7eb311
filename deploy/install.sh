#!/usr/bin/env bash
# The one install script shared by the Dockerfile, CI (.ci/run) and `make setup`.
#
# Usage: deploy/install.sh [--dev | --tool NAME] VENV_DIR
#   Creates (or reuses) a virtual environment at VENV_DIR and installs, in this order:
#   1. torch==$TORCH_VERSION (default 2.13.0), from $TORCH_INDEX_URL when set
#      (e.g. https://download.pytorch.org/whl/cpu or .../cu128 for a CUDA build);
#   2. the pinned lock file: requirements.txt (runtime) or, with --dev, requirements-dev.txt, or with
#      --tool NAME requirements-NAME.txt (a client whose pins clash with ours, e.g. guidellm);
#   3. the project itself, without dependencies (editable with --dev; not with --tool), compiling the
#      native kernels (csrc/ -> model._native) against the torch of step 1: a C++ compiler is needed.
# Environment: PYTHON (interpreter used to create the venv, default python3.11 or python3),
#   TORCH_VERSION, TORCH_INDEX_URL, PIP_NO_CACHE_DIR etc. are passed through to pip.
set -euo pipefail

usage() { echo "usage: $0 [--dev | --tool NAME] VENV_DIR" >&2; exit 2; }

dev=0
venv=""
tool=""
while (( $# )); do
    arg="$1"
    shift
    case "$arg" in
        --dev) dev=1 ;;
        --tool) [[ $# -gt 0 ]] || usage; tool="$1"; shift ;;
        -h|--help) usage ;;
        -*) echo "install.sh: unknown option: $arg" >&2; usage ;;
        *) [[ -z "$venv" ]] || usage; venv="$arg" ;;
    esac
done
[[ -n "$venv" ]] || usage

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "install.sh: creating venv $venv with $python"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# An extra index (not a replacement): its local-version builds (2.13.0+cpu, +cu128) rank above
# PyPI's plain 2.13.0, while torch's dependencies still resolve from the default index.
torch_args=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_args+=(--extra-index-url "$TORCH_INDEX_URL")
fi
echo "install.sh: torch==$torch_version ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
if [[ -n "$tool" ]]; then
    lock="$root/requirements-$tool.txt"
    [[ -f "$lock" ]] || { echo "install.sh: no lock file requirements-$tool.txt" >&2; exit 2; }
elif (( dev )); then
    lock="$root/requirements-dev.txt"
else
    lock="$root/requirements.txt"
fi
# Constrained by the lock, so torch's own dependencies get the pinned versions too.
"${pip[@]}" install "${torch_args[@]}" -c "$lock" "torch==$torch_version"

echo "install.sh: pinned dependencies from ${lock#"$root"/}"
"${pip[@]}" install -r "$lock"

if [[ -n "$tool" ]]; then
    "$venv/bin/python" -c "import torch; print('install.sh: done ($tool), torch', torch.__version__)"
    exit 0
fi
echo "install.sh: the project and its native kernels"
# --no-build-isolation: the kernels build against the torch installed above (an isolated build
# would download another torch only to compile against it)
if (( dev )); then
    "${pip[@]}" install --no-deps --no-build-isolation -e "$root"
else
    "${pip[@]}" install --no-deps --no-build-isolation "$root"
fi
"$venv/bin/python" -c "import torch, model._native as n; print('install.sh: done, torch', torch.__version__, '| native kernels, AVX2:', n.has_avx2())"
