#!/usr/bin/env bash
# Installing without root (docs: "Installing without root").
# (a) As an unprivileged user (nobody through setpriv or runuser; the caller when not root):
#     launch/setup.sh's dependency check finds everything (exit 0); with mpicxx/mpirun hidden from
#     PATH and a sudo that refuses, setup.sh exits 2 naming mpi with its module, Spack and conda
#     names, having called sudo only as `sudo -n true`; with HDF5 hidden from CMake, the same for
#     hdf5. Then the project configures against the installed dependencies into a new folder and
#     compiles one translation unit.
# (b) cmake --install BUILD_DIR --prefix P; then, as that user, in an empty folder with P/bin first
#     on PATH, no build folder on any path and no LD_LIBRARY_PATH: sedd-prepare makes shards of a
#     small text, the installed SLURM template (its SEDD_PREFIX default is P) trains a tiny model
#     2 steps under mpirun, sedd-sample and sedd-eval (through sedd-mpirun) read its checkpoint.
# Exit 0: passed; 1: failed; 77: no unprivileged user can run here (skipped, with why).
#   install_test.sh BIN_DIR SOURCE_DIR BUILD_DIR
set -uo pipefail
bin=${1:?bin dir}; src=${2:?source dir}; build=${3:?build dir}
src=$(cd "$src" && pwd); build=$(cd "$build" && pwd); bin=$(cd "$bin" && pwd)
skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAILED: $*"; [[ -f ${log:-} ]] && { echo "--- $log"; tail -40 "$log"; }; exit 1; }
# expect_missing RC LOG NAME WHEN DEBIAN MODULE: setup.sh exited 2 naming NAME (alone) as missing,
# with its Debian, module, Spack and conda names.
expect_missing() {
  local rc=$1 log=$2 name=$3 when=$4 debian=$5 module=$6 hint
  [[ $rc -eq 2 ]] || fail "setup.sh $when exited $rc, not 2"
  grep -q "missing: $name\$" "$log" || fail "setup.sh $when did not name $name (alone) as missing"
  for hint in "$debian" "module load $module" "spack install $module" "conda install -c conda-forge $module"; do
    grep -qF "$hint" "$log" || fail "setup.sh's message $when lacks '$hint'"
  done
}
t0=$SECONDS
stamp() { echo "[install] $* ($((SECONDS - t0)) s)"; }

cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }
python=$(cache SEDD_PYTHON)
[[ -x $python ]] || fail "$build/CMakeCache.txt names no SEDD_PYTHON with torch"
venv=$(dirname "$(dirname "$python")")
torch_prefix=$("$python" -c "import torch.utils; print(torch.utils.cmake_prefix_path)") || fail "no torch in $python"
generator=$(cache CMAKE_GENERATOR)

# The unprivileged user.
if [[ $(id -u) -ne 0 ]]; then
  as_user() { "$@"; }
elif command -v setpriv >/dev/null && setpriv --reuid=65534 --regid=65534 --clear-groups true 2>/dev/null; then
  as_user() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
elif command -v runuser >/dev/null && runuser -u nobody -- true 2>/dev/null; then
  as_user() { runuser -u nobody -- "$@"; }
else
  skip "running as root without setpriv or runuser: no way to run as an unprivileged user"
fi
uid=$(as_user id -u); gid=$(as_user id -g)
[[ $uid -ne 0 ]] || fail "the unprivileged user is root"

work=$(mktemp -d /tmp/sedd-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
user=$work/user
mkdir -p "$user/home" "$user/tmp" "$work/prefix"
[[ $(id -u) -eq 0 ]] && chown -R "$uid:$gid" "$user"
# The user's environment: a home and temporary folder of its own, no compiler cache (the caller's
# is not the user's), no library path.
uenv=(env -u LD_LIBRARY_PATH -u CMAKE_PREFIX_PATH -u SEDD_BIN -u SEDD_BIN_DIR -u SEDD_PREFIX
      HOME="$user/home" TMPDIR="$user/tmp" CCACHE_DISABLE=1 SEDD_CORES=1)

# The source tree as the user sees it: read in place when it can, else a copy it can read.
usrc=$src
if ! as_user test -r "$src/CMakeLists.txt" -a -r "$src/src/pch.h" -a -x "$src/launch"; then
  mkdir "$work/src"
  tar -C "$src" --exclude=./build --exclude=./.venv --exclude=./.git -cf - . | tar -C "$work/src" -xf -
  chmod -R a+rX "$work/src"
  usrc=$work/src
fi
as_user test -r "$torch_prefix/Torch/TorchConfig.cmake" ||
  skip "LibTorch ($torch_prefix) is not readable by uid $uid; make the virtualenv world-readable to run this test"
# The virtualenv's python may be a link into a private folder (pyenv under /root): the configure
# then goes without it (Parquet/Arrow input off), as a user's own virtualenv would not.
python_arg=(-DSEDD_PYTHON="$python")
as_user "${uenv[@]}" "$python" -c "import torch" 2>/dev/null || python_arg=()
stamp "unprivileged user uid $uid; source $usrc"

# --- (a1) setup.sh's dependency check as the user --------------------------------------------------
# A sudo that refuses as one without password-less rights would, and logs how it was called.
mkdir "$user/sudo-bin"
cat > "$user/sudo-bin/sudo" <<EOF
#!/bin/sh
echo "\$*" >> "$user/sudo.log"
echo "sudo: a password is required" >&2
exit 1
EOF
chmod 755 "$user/sudo-bin/sudo"
[[ $(id -u) -eq 0 ]] && chown -R "$uid:$gid" "$user/sudo-bin"
upath=$user/sudo-bin:$PATH

log=$user/check-all.log
as_user "${uenv[@]}" PATH="$upath" SEDD_CHECK_ONLY=1 SEDD_VENV="$venv" \
  bash "$usrc/launch/setup.sh" > "$log" 2>&1 || fail "setup.sh's check failed with every dependency present"
grep -q "every dependency found" "$log" || fail "setup.sh's check did not say that every dependency was found"
stamp "setup.sh check, everything present: exit 0"

# PATH without MPI's wrappers and launchers: every other program the user finds on PATH, linked in
# one folder (made by the user: programs in folders it cannot read stay out, as on its PATH).
nompi=$user/no-mpi-bin
as_user "${uenv[@]}" PATH="$upath" bash -c '
  mkdir "$1" && cd "$1" || exit 1
  IFS=: read -r -a dirs <<< "$PATH"
  for d in "${dirs[@]}"; do
    for f in "$d"/*; do
      name=${f##*/}
      case $name in mpicxx|mpic++|mpiCC|mpicc|mpirun|mpiexec|orterun) continue;; esac
      [[ -f $f && -x $f && ! -e $name ]] && ln -s "$f" "$name"
    done
  done
  exit 0' - "$nompi" || fail "making $nompi"
log=$user/check-no-mpi.log
# The whole script as a user would run it (no SEDD_CHECK_ONLY): it must stop before the virtualenv.
as_user "${uenv[@]}" PATH="$nompi" SEDD_SKIP_BUILD=1 SEDD_VENV="$venv" SEDD_BUILD="$user/never-made-build" \
  bash "$usrc/launch/setup.sh" > "$log" 2>&1
expect_missing $? "$log" mpi "without mpicxx/mpirun" libopenmpi-dev openmpi
[[ ! -e $user/never-made-build ]] || fail "setup.sh went on past the missing dependency"
if [[ -f $user/sudo.log ]] && grep -qv '^-n true$' "$user/sudo.log"; then
  fail "setup.sh called sudo for more than 'sudo -n true': $(tr '\n' ';' < "$user/sudo.log")"
fi
stamp "setup.sh without mpicxx/mpirun: exit 2 naming mpi, sudo called as: $(tr '\n' ';' < "$user/sudo.log" 2>/dev/null)"
sed 's/^/    /' "$log"

log=$user/check-no-hdf5.log
as_user "${uenv[@]}" PATH="$upath" SEDD_CHECK_ONLY=1 SEDD_VENV="$venv" \
  SEDD_CMAKE_ARGS="-DCMAKE_DISABLE_FIND_PACKAGE_HDF5=ON" bash "$usrc/launch/setup.sh" > "$log" 2>&1
expect_missing $? "$log" hdf5 "with HDF5 hidden from CMake" libhdf5-dev hdf5
stamp "setup.sh with HDF5 hidden from CMake: exit 2 naming hdf5"
sed 's/^/    /' "$log"

# --- (a2) configure and compile as the user ------------------------------------------------------
log=$user/configure.log
ubuild=$user/build
as_user "${uenv[@]}" PATH="$upath" cmake -S "$usrc" -B "$ubuild" -G "${generator:-Ninja}" \
  -DCMAKE_PREFIX_PATH="$torch_prefix" "${python_arg[@]}" > "$log" 2>&1 ||
  fail "configuring as uid $uid failed"
stamp "configured as uid $uid${python_arg[0]:+ with $python}${python_arg[0]:- (without SEDD_PYTHON: uid $uid cannot run $python)}"
# One real compile: a translation unit without the precompiled torch header (it is quick). Ninja
# names the object from the top; Makefiles from its folder.
object=src/CMakeFiles/sedd.dir/data/text_source.cpp.o
target=(--build "$ubuild" --target "$object")
[[ ${generator:-Ninja} == Ninja ]] || target=(--build "$ubuild/src" --target data/text_source.cpp.o)
log=$user/compile.log
as_user "${uenv[@]}" PATH="$upath" cmake "${target[@]}" > "$log" 2>&1 || fail "compiling $object as uid $uid failed"
[[ -s $ubuild/$object && $(stat -c %u "$ubuild/$object") -eq $uid ]] || fail "no $object owned by uid $uid"
stamp "compiled $object as uid $uid"

# --- (b) install, then run from the prefix only ------------------------------------------------
prefix=$work/prefix
log=$work/install.log
cmake --install "$build" --prefix "$prefix" > "$log" 2>&1 || fail "cmake --install"
for f in bin/sedd-train bin/sedd-prepare bin/sedd-sample bin/sedd-eval bin/sedd-score bin/sedd-mpirun; do
  [[ -x $prefix/$f ]] || fail "$prefix/$f is not installed"
done
for f in share/sedd/configs/tiny.ini share/sedd/tools/sedd_convert.py share/sedd/slurm/train-single-node.sbatch \
         share/sedd/slurm/train-multi-node.sbatch; do
  [[ -f $prefix/$f ]] || fail "$prefix/$f is not installed"
done
for t in "$prefix"/share/sedd/slurm/*.sbatch; do
  grep -qF "SEDD_PREFIX=\${SEDD_PREFIX:-$prefix}" "$t" || fail "$t does not default SEDD_PREFIX to $prefix"
  bash -n "$t" || fail "$t is not valid bash"
done
for f in "$prefix"/bin/sedd-*; do
  [[ $(head -c 4 "$f") == $'\x7fELF' ]] || continue
  runpath=$(readelf -d "$f" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
  [[ $runpath != *"$build"* ]] || fail "$f's RUNPATH names the build folder: $runpath"
done
stamp "installed into $prefix"

run=$work/run
mkdir "$run"
[[ $(id -u) -eq 0 ]] && chown "$uid:$gid" "$run"
# PATH: the prefix, then the caller's folders but for any in the build or source tree.
rpath=$prefix/bin
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  [[ $d == "$build"* || $d == "$bin"* || $d == "$src"/* || $d == */build/* ]] || rpath+=:$d
done
in_run() { (cd "$run" && as_user "${uenv[@]}" PATH="$rpath" OMPI_MCA_btl_vader_single_copy_mechanism=none "$@"); }
for i in $(seq 300); do
  printf '{"text": "line %d: the quick brown fox jumps over the lazy dog %d times"}\n' "$i" $((i * 7 % 13))
done > "$work/corpus.jsonl"
chmod 644 "$work/corpus.jsonl"

log=$work/prepare.log
in_run sedd-prepare --input "$work/corpus.jsonl" --out shards --valid-every 10 > "$log" 2>&1 || fail "installed sedd-prepare"
ls "$run"/shards/train/*.h5 "$run"/shards/valid/*.h5 > /dev/null 2>&1 || fail "sedd-prepare wrote no train/valid shards"
log=$work/train.log
in_run bash "$prefix/share/sedd/slurm/train-single-node.sbatch" "$prefix/share/sedd/configs/tiny.ini" \
  --run.dir run --data.train "shards/train/*.h5" --data.valid "shards/valid/*.h5" --run.device cpu \
  --model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --model.cond_dim 16 --data.seq_len 32 \
  --train.batch_size 4 --train.steps 2 --train.log_every 1 > "$log" 2>&1 || fail "training through the installed template"
[[ -f $run/run/checkpoints/latest && -s $run/run/metrics.jsonl ]] || fail "training wrote no checkpoint or metrics"
stamp "trained 2 steps through the installed template ($(cat "$run/run/checkpoints/latest"))"
log=$work/sample.log
in_run sedd-sample --checkpoint run --num-samples 2 --steps 4 --device cpu --out samples.jsonl > "$log" 2>&1 ||
  fail "installed sedd-sample"
[[ $(wc -l < "$run/samples.jsonl") -eq 2 ]] || fail "sedd-sample did not write 2 samples"
log=$work/eval.log
in_run sedd-mpirun -np 1 sedd-eval --checkpoint run --data "shards/valid/*.h5" --mc-samples 2 --max-sequences 8 \
  --device cpu --json eval.json > "$log" 2>&1 || fail "installed sedd-eval through sedd-mpirun"
[[ -s $run/eval.json ]] || fail "sedd-eval wrote no eval.json"
stamp "sampled and evaluated from the installed binaries: $(tr -d '\n' < "$run/eval.json" | cut -c1-120)"
echo "PASSED ($((SECONDS - t0)) s)"
