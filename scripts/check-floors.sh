#!/usr/bin/env bash
# Installs every runtime dependency at the lowest version pyproject.toml allows (its >= floor) in a
# venv of its own and runs the fast suite there: a floor that is too low fails here, not for a user.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-floors
python3 -m venv .venv-floors
.venv-floors/bin/pip install -q --upgrade pip
python3 scripts/floors.py > .venv-floors/constraints.txt
.venv-floors/bin/pip install -q -c .venv-floors/constraints.txt -e '.[test]'
exec .venv-floors/bin/python -m pytest -q -x -p no:cacheprovider -m 'not e2e' "$@"
