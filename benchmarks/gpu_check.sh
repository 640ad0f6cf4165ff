#!/usr/bin/env bash
# The one prepared GPU check: under 8 minutes on one H100, one JSON (default gpu_check.json). On a machine
# without CUDA it measures what a CPU can and marks the GPU sections skipped. See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [OUT.json] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=$(command -v python3)   # a device machine may have no venv: its own Python
out=${1:-gpu_check.json}
shift || true
exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
