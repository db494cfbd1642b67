#!/usr/bin/env bash
# Loom developer entry point: bootstraps .venv at the repo root, then serves or tests.
#   bash scripts/dev.sh serve [main.py flags...]   serve the editor (python main.py)
#   bash scripts/dev.sh test  [pytest args...]     ruff + the whole test suite
#   bash scripts/dev.sh run   WORKFLOW [flags...]  run a saved workflow headless
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"

bootstrap() {
    if [ ! -x "$py" ]; then
        python3 -m venv "$venv"
    fi
    # torch first, at the pinned version: where a local CPU wheel is configured pip takes it,
    # and a later `pip install -e .` then finds the pin satisfied instead of pulling CUDA.
    if ! "$py" -c "import torch" >/dev/null 2>&1; then
        "$py" -m pip install --quiet "torch==2.13.0"
    fi
    stamp="$venv/.loom-deps"
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$py" -m pip install --quiet -e ".[test]"
        # spandrel pulls PyPI's torchvision, a CUDA build that cannot load beside the CPU torch
        # and then breaks transformers' imports; Loom needs none of it (upscalers.py explains).
        if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
            echo "removing PyPI's torchvision: it cannot load beside this CPU build of torch"
            "$py" -m pip uninstall --quiet -y torchvision
        fi
        echo "$want" > "$stamp"
    fi
}

cmd="${1:-serve}"
[ $# -gt 0 ] && shift
bootstrap
case "$cmd" in
    serve) exec "$py" main.py "$@" ;;
    run) exec "$py" main.py run "$@" ;;
    test)
        "$venv/bin/ruff" check --no-cache .
        exec "$py" -m pytest "$@"
        ;;
    *) echo "usage: bash scripts/dev.sh serve|test|run [args...]" >&2; exit 2 ;;
esac
