#!/usr/bin/env bash
# Idempotent setup: system dependencies, the project-local LibTorch virtualenv, and a Release build
# in build/. Safe to run again; each step is skipped when already satisfied.
# System dependencies: as root (or with password-less sudo) on Debian, the missing Debian packages
# are installed. Elsewhere (a cluster without root, dependencies from modules, Spack or conda) each
# is looked for where it is (PATH, CMAKE_PREFIX_PATH, pkg-config, CMake's own find_package); what
# is missing is listed with its Debian, module, Spack and conda names, and the script exits 2.
#   SEDD_VENV      virtualenv folder (default: <repo>/.venv)
#   SEDD_BUILD     build folder      (default: <repo>/build)
#   SEDD_SKIP_BUILD=1   install only
#   SEDD_BUILD_TESTS=0  build the tools only (-DBUILD_TESTING=OFF: GoogleTest not needed)
#   SEDD_CHECK_ONLY=1   check the system dependencies, install nothing, stop (exit 0 or 2)
#   SEDD_NO_APT=1       never install Debian packages; check as on a cluster
#   SEDD_CMAKE_ARGS     more arguments for cmake's configure (word-split), e.g. -DHDF5_ROOT=DIR
#   CMAKE_PREFIX_PATH   install prefixes of module/Spack/conda packages (':'-separated); passed
#                       to cmake after the torch wheel's
#   SEDD_TORCH_VERSION  the PyPI torch wheel to build against (default 2.15.0; 2.11.0 works too)
#   Torch_DIR           an existing LibTorch (its share/cmake/Torch); the wheel then serves the
#                       Python tools only
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SEDD_VENV:-$repo/.venv}
build=${SEDD_BUILD:-$repo/build}
testing=ON; [[ ${SEDD_BUILD_TESTS:-1} == 0 ]] && testing=OFF   # CMake's BUILD_TESTING
read -r -a extra_cmake_args <<< "${SEDD_CMAKE_ARGS:-}"
py=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }
err() { printf '[setup] %s\n' "$*" >&2; }

# --- System dependencies: Debian packages where we may install them ------------------------------
apt_pkgs=(build-essential cmake ninja-build ccache pkg-config
          libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libboost-program-options-dev
          libgtest-dev nlohmann-json3-dev libpcre2-dev libicu-dev
          fortune-mod fortunes python3-venv)
install_debian() {
  local missing=() p sudo_cmd=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing Debian packages: ${missing[*]}"
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo -n)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- System dependencies: looked for where they are (no root) ------------------------------------
# name | what is looked for | Debian package | module | Spack package | conda-forge package
deps=(
  "compiler|a C++20 compiler (\$CXX, else c++)|build-essential|gcc|gcc|cxx-compiler"
  "cmake|cmake >= 3.25|cmake|cmake|cmake|cmake"
  "pkg-config|pkg-config on PATH|pkg-config|pkgconf|pkgconf|pkg-config"
  "mpi|MPI: mpicxx and mpirun on PATH|libopenmpi-dev openmpi-bin|openmpi|openmpi|openmpi"
  "hdf5|HDF5 C library and headers (h5cc)|libhdf5-dev|hdf5|hdf5|hdf5"
  "boost|Boost.Program_options|libboost-program-options-dev|boost|boost|boost-cpp"
  "nlohmann-json|nlohmann-json (CMake package)|nlohmann-json3-dev|nlohmann-json|nlohmann-json|nlohmann_json"
  "pcre2|PCRE2 (pkg-config libpcre2-8)|libpcre2-dev|pcre2|pcre2|pcre2"
  "icu|ICU (pkg-config icu-uc)|libicu-dev|icu|icu4c|icu"
  "gtest|GoogleTest (for the tests only: SEDD_BUILD_TESTS=0 builds without)|libgtest-dev|googletest|googletest|gtest"
  "python|python3 with venv (for the torch wheel)|python3-venv|python|python|python"
)
cmake_prefix_env=${CMAKE_PREFIX_PATH:-}
pick_generator() { generator=Ninja; command -v ninja >/dev/null 2>&1 || generator="Unix Makefiles"; }
pick_generator

# check_dependencies: 0 when everything is found; else prints the table of what is missing and
# returns 2. The libraries are looked for by CMake itself (this project's configure, stopped after
# its find_package calls), so what passes here is what the build will find.
check_dependencies() {
  # Word lists in strings, not arrays: an empty array under `set -u` is an error in bash < 4.4.
  local missing="" cxx=${CXX:-c++} tmp have name row f modules="" spack="" conda=""
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/sedd-setup-XXXXXX")
  printf '#include <concepts>\n#include <span>\n#if __cplusplus < 202002L\n#error not C++20\n#endif\nint main() { std::span<const int> s; return static_cast<int>(s.size()); }\n' > "$tmp/c++20.cpp"
  command -v "$cxx" >/dev/null 2>&1 && "$cxx" -std=c++20 "$tmp/c++20.cpp" -o "$tmp/c++20" >/dev/null 2>&1 ||
    missing+=" compiler"
  have=$(cmake --version 2>/dev/null | awk 'NR == 1 {print $3}')
  [[ -n $have && $(printf '%s\n3.25\n' "$have" | sort -V | head -1) == 3.25 ]] || missing+=" cmake"
  command -v pkg-config >/dev/null 2>&1 || missing+=" pkg-config"
  { command -v mpicxx && { command -v mpirun || command -v mpiexec; }; } >/dev/null 2>&1 || missing+=" mpi"
  [[ -x $venv/bin/python ]] || "$py" -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=" python"
  if [[ "$missing " != *" compiler "* && "$missing " != *" cmake "* ]]; then
    if ! cmake -S "$repo" -B "$tmp/build" -G "$generator" -DSEDD_DEPENDENCY_CHECK=ON \
           -DBUILD_TESTING="$testing" \
           ${cmake_prefix_env:+-DCMAKE_PREFIX_PATH="${cmake_prefix_env//:/;}"} \
           ${extra_cmake_args[@]+"${extra_cmake_args[@]}"} > "$tmp/configure.log" 2>&1; then
      if [[ ! -f $tmp/build/sedd-missing.txt ]]; then
        err "error: cmake's dependency check failed for another reason; its output:"
        cat "$tmp/configure.log" >&2
        rm -rf "$tmp"
        return 1
      fi
      for name in $(cat "$tmp/build/sedd-missing.txt"); do
        [[ "$missing " == *" $name "* ]] || missing+=" $name"
      done
    fi
  else
    err "(the libraries are looked for once a C++20 compiler and cmake >= 3.25 are found)"
  fi
  rm -rf "$tmp"
  if [[ -z $missing ]]; then
    say "every dependency found (generator: $generator${cmake_prefix_env:+; CMAKE_PREFIX_PATH=$cmake_prefix_env})"
    return 0
  fi

  err "error: these dependencies were not found:"
  for name in $missing; do
    for row in "${deps[@]}"; do
      IFS='|' read -r -a f <<< "$row"
      [[ ${f[0]} == "$name" ]] || continue
      printf '  %-14s %s\n  %-14s Debian %s | module %s | Spack %s | conda-forge %s\n' \
             "${f[0]}" "${f[1]}" "" "${f[2]}" "${f[3]}" "${f[4]}" "${f[5]}" >&2
      modules+=" ${f[3]}"; spack+=" ${f[4]}"; conda+=" ${f[5]}"
    done
  done
  {
    echo "  environment modules: module load${modules}"
    echo "  Spack:               spack install${spack} && spack load${spack}"
    echo "  conda:               conda install -c conda-forge${conda}"
  } >&2
  err "then run launch/setup.sh again; CMAKE_PREFIX_PATH names prefixes outside PATH (e.g. \$CONDA_PREFIX)"
  err "missing:${missing}"
  return 2
}

sudo_usable() { [[ $(id -u) -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
if [[ ${SEDD_CHECK_ONLY:-0} != 1 && ${SEDD_NO_APT:-0} != 1 ]] &&
   command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 && sudo_usable; then
  install_debian
else
  say "checking the dependencies where they are (no Debian packages are installed)"
  rc=0; check_dependencies || rc=$?
  ((rc == 0)) || exit "$rc"
fi
[[ ${SEDD_CHECK_ONLY:-0} == 1 ]] && exit 0

# --- Python virtualenv with LibTorch (the PyPI torch wheel) and the interop/test helpers -----
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
# The wheel's prefix first, then the environment's (module/Spack/conda installs).
cmake_prefix=$prefix${cmake_prefix_env:+;${cmake_prefix_env//:/;}}
torch_args=(-DCMAKE_PREFIX_PATH="$cmake_prefix")
[[ -n ${Torch_DIR:-} ]] && torch_args+=(-DTorch_DIR="$Torch_DIR")
# A build folder configured for another torch (or other prefixes, or without tests) is configured
# afresh.
stamp="torch $torch_version ${Torch_DIR:-wheel}${cmake_prefix_env:+ prefixes $cmake_prefix_env}"
[[ $testing == OFF ]] && stamp+=" no-tests"
[[ -n ${SEDD_CMAKE_ARGS:-} ]] && stamp+=" $SEDD_CMAKE_ARGS"
configured() { [[ -f $build/CMakeCache.txt && ( -f $build/build.ninja || -f $build/Makefile ) ]]; }
if configured && [[ $(cat "$build/.sedd-torch" 2>/dev/null) != "$stamp" ]]; then
  say "configuration changed ($stamp): reconfiguring $build"
  rm -f "$build/CMakeCache.txt" "$build/build.ninja" "$build/Makefile"
fi
if ! configured; then
  pick_generator   # after the Debian packages (ninja-build) are in
  say "configuring $build ($stamp; generator $generator)"
  cmake -S "$repo" -B "$build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING="$testing" \
        "${torch_args[@]}" -DSEDD_PYTHON="$venv/bin/python" ${extra_cmake_args[@]+"${extra_cmake_args[@]}"} >/dev/null
  echo "$stamp" > "$build/.sedd-torch"
fi
say "building (2 cores: the first build takes a while, later ones are incremental)"
start=$(date +%s)
cmake --build "$build" -j "$(nproc)"
say "build done in $(( $(date +%s) - start )) s"
