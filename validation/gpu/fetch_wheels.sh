#!/usr/bin/env bash
# Download, into .whl/, the wheels run.sh installs on a CUDA machine without network access
# that has torch, transformers, peft and accelerate but not memplan's other dependencies.
# Targets CPython 3.12 on x86-64 Linux; pass another version as $1 (e.g. 3.11).
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${1:-3.12}"
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this checkout is tested with (pydantic pins pydantic-core exactly).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp "${platforms[@]}" -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.15.0 bitsandbytes==0.50.2
ls -1 .whl
