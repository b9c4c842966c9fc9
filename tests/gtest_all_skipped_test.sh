#!/usr/bin/env bash
# gtest_all_skipped.sh: 77 only when every test skipped; a failure or a test that ran is never
# reported as a skip.
here=$(cd "$(dirname "$0")" && pwd); status=0
expect() {  # expect CODE DESCRIPTION -- gtest-like output lines
  local want=$1 what=$2; shift 3
  bash "$here/gtest_all_skipped.sh" printf '%s\n' "$@" >/dev/null; local got=$?
  if [[ $got != "$want" ]]; then echo "FAIL: $what: exit $got, expected $want"; status=1; else echo "ok: $what"; fi
}
expect 77 "all skipped" -- '[ RUN      ] A.x' '[  SKIPPED ] A.x (0 ms)' '[  PASSED  ] 0 tests.' '[  SKIPPED ] 1 test, listed below:' '[  SKIPPED ] A.x'
expect 0 "one ran, one skipped" -- '[       OK ] A.y (3 ms)' '[  SKIPPED ] A.x (0 ms)' '[  PASSED  ] 1 test.' '[  SKIPPED ] A.x'
expect 0 "none skipped" -- '[       OK ] A.y (3 ms)' '[  PASSED  ] 1 test.'
# A failed test with a skipped one: the command itself fails (gtest exits 1), never a skip.
bash "$here/gtest_all_skipped.sh" bash -c "printf '[  SKIPPED ] A.x\n[  FAILED  ] A.z\n'; exit 1" >/dev/null
[[ $? == 1 ]] && echo "ok: failure with a skip stays a failure" || { echo "FAIL: failure with a skip"; status=1; }
# Colour codes (gtest under mpirun) do not hide a test that ran.
expect 0 "coloured OK line" -- $'\e[0;32m[       OK ] \e[mA.y (1 ms)' $'\e[0;32m[  SKIPPED ] \e[mA.x'
exit $status
