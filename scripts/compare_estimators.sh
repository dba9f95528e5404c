#!/usr/bin/env bash
# Other people's memory estimators on the published reference cases, side by side with memplan.
#
# They are not memplan dependencies: they go into their own virtual environment
# (build/estimators-venv, ignored by git). What PyPI has is installed; an estimator whose
# install fails is reported as "not installed" in the table rather than stopping the run.
#
#   scripts/compare_estimators.sh            # install (once) and compare
#   ESTIMATORS_SKIP_INSTALL=1 scripts/...    # reuse the environment as it is
#
# Writes docs/accuracy.md and memplan/references/estimators.json.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/estimators-venv
PY=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
if [[ -z "${ESTIMATORS_SKIP_INSTALL:-}" ]]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first: accelerate builds models on the meta device with it, and DeepSpeed's
    # setup.py imports it. transformers supplies the model classes accelerate sizes.
    "$VENV/bin/python" -m pip install -q torch transformers accelerate
    # DeepSpeed builds no CUDA ops at install time (DS_BUILD_OPS=0): its ZeRO estimators are
    # plain arithmetic and need no GPU.
    DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q deepspeed \
        || echo "compare_estimators: deepspeed did not install; its column will say so" >&2
    # llm-analysis 0.2.2 pins transformers<5 and huggingface-hub<0.15 for its Hub config
    # loader, which this comparison does not use (it builds ModelConfig itself); installing its
    # pins would downgrade what accelerate needs, so it goes in without them.
    "$VENV/bin/python" -m pip install -q --no-deps llm-analysis fire termcolor \
        || echo "compare_estimators: llm-analysis did not install; its column will say so" >&2
    # memplan's own core requirements, so the comparison imports memplan from this checkout.
    "$VENV/bin/python" -m pip install -q "pydantic>=2.6" "rich>=13.0"
fi
"$VENV/bin/python" -m pip freeze > build/estimators-freeze.txt
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" scripts/compare_estimators.py "$@"
