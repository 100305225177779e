# Sourced by scripts/demo and scripts/test: make .venv with everything the project needs, once.
# A CPU build of torch goes in first where none is installed (a bare `torch` requirement would
# pull a CUDA build of several GB); set TORCH_SPEC to choose another.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAM_METRICS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "stream_metrics: creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.stream_metrics-installed"
want="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "stream_metrics: installing ${TORCH_SPEC:-torch==2.13.0} (CPU build)"
        "$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "stream_metrics: installing stream_metrics[dev] into $VENV"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
