# Sourced by scripts/demo and scripts/test: make .venv with everything the project needs, once.
# torch goes in first where none is installed: TORCH_SPEC (default torch==2.13.0) from the index pip
# is configured with. What build that is depends on the index: on Linux the public PyPI gives a
# CUDA build of several GB; https://download.pytorch.org/whl/cpu a CPU one. TORCH_SPEC may carry
# pip options, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
# STREAM_METRICS_VENV=/path/to/venv uses an existing environment (and the torch already in it).
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
        echo "stream_metrics: installing ${TORCH_SPEC:-torch==2.13.0}"
        # Unquoted on purpose: the spec may hold pip options as separate words.
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
        "$VENV/bin/python" -c "import torch; print('stream_metrics: installed torch', torch.__version__, 'with CUDA ' + torch.version.cuda if torch.version.cuda else '(CPU only)')"
    fi
    echo "stream_metrics: installing stream_metrics[dev] into $VENV"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
