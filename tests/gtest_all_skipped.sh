#!/usr/bin/env bash
# Runs a GoogleTest command and exits 77 (CTest: skipped) only when every selected test skipped
# and none failed; a run with a failure, a crash or a test that ran keeps its own status. A lone
# "[  SKIPPED ]" line must not hide a failure elsewhere in the same run.
out=$("$@" 2>&1); rc=$?
printf '%s\n' "$out"
clean=$(printf '%s\n' "$out" | sed 's/\x1b\[[0-9;]*m//g')
(( rc != 0 )) && exit "$rc"
ran=$(printf '%s\n' "$clean" | grep -c '^\[       OK \]')
failed=$(printf '%s\n' "$clean" | grep -c '^\[  FAILED  \]')
skipped=$(printf '%s\n' "$clean" | grep -c '^\[  SKIPPED \] [A-Za-z]')
if (( failed == 0 && ran == 0 && skipped > 0 )); then
  echo "gtest_all_skipped: all $skipped selected test(s) skipped"
  exit 77
fi
exit 0
