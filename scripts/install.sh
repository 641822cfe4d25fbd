#!/usr/bin/env bash
# Install potluck into the active Python environment (a virtualenv is recommended).
#
# llama-cpp-python has no prebuilt wheels on PyPI: pip compiles llama.cpp from source. With the
# default native flags, GCC 12 builds llama.cpp's Intel AMX kernels so that they crash on any
# quantized model (llama.cpp issue #20824; see ../shared/models/README.md). This script builds the
# wheel once with the AMX kernels off and explicit x86 feature flags matched to this CPU, keeps it
# in a wheelhouse keyed by those flags (pip's own cache ignores CMAKE_ARGS and could hand back a
# crashing build), and installs from there.
#
# Usage: scripts/install.sh [EXTRAS]      e.g. scripts/install.sh dev
# Env:   PYTHON (default python3), POTLUCK_WHEELHOUSE, POTLUCK_CMAKE_ARGS (override the flags)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
PY=${PYTHON:-python3}
EXTRAS=${1:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

cpu_has() { grep -m1 -qw "$1" /proc/cpuinfo 2>/dev/null; }

if [ -n "${POTLUCK_CMAKE_ARGS:-}" ]; then
  cmake_args=$POTLUCK_CMAKE_ARGS
elif [ "$(uname -m)" = "x86_64" ]; then
  cmake_args="-DGGML_NATIVE=OFF"
  if cpu_has avx2; then cmake_args+=" -DGGML_AVX2=ON"; else cmake_args+=" -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"; fi
  if cpu_has avx512f; then cmake_args+=" -DGGML_AVX512=ON"; else cmake_args+=" -DGGML_AVX512=OFF"; fi
  cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  cmake_args=""  # ARM and others: llama.cpp's native defaults are safe
fi

pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$pytag" "$cmake_args" | sha256sum | cut -c1-16)
wheelhouse=${POTLUCK_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/potluck/wheels/$key}
mkdir -p "$wheelhouse"

if ! ls "$wheelhouse"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
  echo "potluck: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (5-15 minutes on 2 cores)"
  echo "potluck: CMAKE_ARGS=$cmake_args"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$wheelhouse"
fi

# --no-deps: its dependencies (numpy, jinja2, diskcache) come with the project install below.
"$PY" -m pip install --no-index --no-deps --find-links "$wheelhouse" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
if [ -n "$EXTRAS" ]; then target="$here[$EXTRAS]"; else target="$here"; fi
"$PY" -m pip install -e "$target"
echo "potluck: installed; try \`potluck node start\`"
