#!/usr/bin/env bash
# Create .venv with everything the export, the runtime and the tests need, and .venv-triton for
# Triton's Python stub (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
# The install is editable, so only a changed pyproject.toml (dependencies, entry points, the
# package mapping) or this script needs pip again; skipping it saves half a minute on every rerun.
RECORD=.venv/installed-from
if [ -x .venv/bin/apd-deploy ] && [ -x .venv-triton/bin/apd-deploy ] && cat pyproject.toml scripts/install.sh | cmp -s - "$RECORD"; then
  exit 0
fi
python3 -m venv .venv
# torch first, pinned: the machine's local CPU build; left to the resolver, pip would fetch a CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 2> >(grep -v "is ignored" >&2)
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' 2> >(grep -v "is ignored" >&2)
# Triton's Python stub needs numpy < 2 (the [triton] extra's nvidia-pytriton pins it), while onnx and
# ml_dtypes here need numpy 2: tritonserver and the stub get an environment of their own.
python3 -m venv .venv-triton
.venv-triton/bin/pip install --quiet --disable-pip-version-check -e '.[triton]' 2> >(grep -v "is ignored" >&2)
cat pyproject.toml scripts/install.sh > "$RECORD"
