#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine (run as root) and runs it:
# the real upstream (distribution), real clients (dockerd, containerd, podman, skopeo, chromium), then
# lint, type checks and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip ca-certificates curl openssl \
    docker-registry docker.io docker-compose containerd podman skopeo prometheus chromium chromium-driver \
    mmdebstrap iproute2 redis-server >/dev/null

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check mirror tests bench scripts docker
.venv/bin/mypy
.venv/bin/mypy tests bench docker
# The lowest versions pyproject.toml allows, installed once in a venv of their own: the fast suite there.
bash scripts/check-floors.sh 2>&1 | grep -v "^WARNING: Location" | tail -3
exec .venv/bin/python -m pytest "$@"
