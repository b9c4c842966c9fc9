#!/usr/bin/env bash
# Idempotent setup: Debian packages, the project-local LibTorch virtualenv, and a Release build in
# build/. Safe to run again; each step is skipped when already satisfied.
#   SEDD_VENV      virtualenv folder (default: <repo>/.venv)
#   SEDD_BUILD     build folder      (default: <repo>/build)
#   SEDD_SKIP_BUILD=1   install only
#   SEDD_TORCH_VERSION  the PyPI torch wheel to build against (default 2.15.0; 2.11.0 works too)
#   Torch_DIR           an existing LibTorch (its share/cmake/Torch); the wheel then serves the
#                       Python tools only
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SEDD_VENV:-$repo/.venv}
build=${SEDD_BUILD:-$repo/build}

say() { printf '[setup] %s\n' "$*"; }

# --- Debian packages ------------------------------------------------------------------------
apt_pkgs=(build-essential cmake ninja-build ccache pkg-config
          libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libboost-program-options-dev
          libgtest-dev nlohmann-json3-dev libpcre2-dev libicu-dev
          fortune-mod fortunes python3-venv)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python virtualenv with LibTorch (the PyPI torch wheel) and the interop/test helpers -----
py=${PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
  say "creating virtualenv $venv"
  "$py" -m venv "$venv"
fi
# torch pinned (override with SEDD_TORCH_VERSION): the C++ API and the CUDA/NCCL wheel layout
# this build links against.
torch_version=${SEDD_TORCH_VERSION:-2.15.0}
have=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [[ $have != "$torch_version" ]] ||
   ! "$venv/bin/python" -c "import numpy, h5py, tokenizers, safetensors, matplotlib, pyarrow" 2>/dev/null; then
  say "installing torch==$torch_version, numpy, h5py, tokenizers, safetensors, matplotlib, pyarrow into $venv"
  "$venv/bin/pip" install -q "torch==$torch_version" numpy h5py tokenizers safetensors matplotlib pyarrow
fi

# lm-evaluation-harness for tools/lm_eval_sedd.py and its test (pinned: the adapter follows its API).
lm_eval_version=0.4.13
if [[ $("$venv/bin/python" -c "import lm_eval, importlib.metadata as m; print(m.version('lm_eval'))" 2>/dev/null) != \
      "$lm_eval_version" ]]; then
  say "installing lm_eval==$lm_eval_version into $venv"
  "$venv/bin/pip" install -q "lm_eval==$lm_eval_version"
fi

[[ ${SEDD_SKIP_BUILD:-0} == 1 ]] && exit 0

# --- Configure and build ---------------------------------------------------------------------
prefix=$("$venv/bin/python" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
torch_args=(-DCMAKE_PREFIX_PATH="$prefix")
[[ -n ${Torch_DIR:-} ]] && torch_args+=(-DTorch_DIR="$Torch_DIR")
# A build folder configured for another torch is configured afresh.
stamp="torch $torch_version ${Torch_DIR:-wheel}"
if [[ -f $build/build.ninja && $(cat "$build/.sedd-torch" 2>/dev/null) != "$stamp" ]]; then
  say "torch changed ($stamp): reconfiguring $build"
  rm -f "$build/CMakeCache.txt" "$build/build.ninja"
fi
if [[ ! -f $build/build.ninja ]]; then
  say "configuring $build ($stamp)"
  cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        "${torch_args[@]}" -DSEDD_PYTHON="$venv/bin/python" >/dev/null
  echo "$stamp" > "$build/.sedd-torch"
fi
say "building (2 cores: the first build takes a while, later ones are incremental)"
start=$(date +%s)
cmake --build "$build" -j "$(nproc)"
say "build done in $(( $(date +%s) - start )) s"
