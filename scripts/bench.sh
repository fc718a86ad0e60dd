#!/usr/bin/env bash
# Benchmark mirror against distribution's proxy on one seeded upstream; prints a table.
# Run scripts/test.sh once first (it installs distribution and the venv). Extra args go to
# bench.run (--quick for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk curl >/dev/null; }
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'; }
exec .venv/bin/python -m bench.run "$@"
