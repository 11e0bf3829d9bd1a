# Sourced by demo.sh and test.sh: create the virtual environment if it is absent and install the
# collection (editable) with its test, federated-learning and MONAI Label extras. Override the location with VENV=/path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "installing the collection and its dependencies (first run: torch and its CUDA wheels, a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,fl,monailabel,sam3]"
    # MONAI Label: its dependency pydicom-seg pins numpy<2 and jsonschema<4, so both go in without their
    # dependencies (the real runtime ones are the monailabel extra above)
    "$VENV/bin/python" -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
    # SAM3 (optional trunk of the angiography bundle) pins numpy<2.4: without dependencies, the sam3 extra has them
    "$VENV/bin/python" -m pip install --quiet --no-deps sam3==0.1.4
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
