#!/usr/bin/env bash
# Install (if needed) and run the test suite; extra arguments go to pytest (e.g. -m slow; -n 0 for one process).
# Two pytest-xdist workers: most tests run one thread, so the two cores of CI's machine both work.
# loadfile: a module's tests share a worker, and so its module-scoped fixtures (servers, Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadfile "$@"
