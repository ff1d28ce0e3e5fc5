# Sourced by scripts/demo and scripts/test: make .venv and install karoo with the extras in $KAROO_EXTRAS.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "karoo needs Python >= 3.11 (found $("$python" --version 2>&1))" >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# Re-install only when the package's requirements changed since the last install.
stamp="$venv/.karoo-installed"
want="$(sha1sum "$root/pyproject.toml" | cut -d' ' -f1) ${KAROO_EXTRAS:-}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    spec="$root"
    [ -n "${KAROO_EXTRAS:-}" ] && spec="$root[${KAROO_EXTRAS}]"
    "$venv/bin/python" -m pip install -q -e "$spec"
    echo "$want" > "$stamp"
fi
