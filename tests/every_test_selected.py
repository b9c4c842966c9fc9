#!/usr/bin/env python3
"""Every GoogleTest test of every test binary is selected by some CTest entry, and every GPU test
by an entry labelled gpu (so launch/gpu-check.sh, which runs the gpu entries, cannot lose one).
Also: no entry selects nothing (a filter that matches no test is a typo), and a test whose source
skips for want of a GPU (a GTEST_SKIP line naming CUDA, NCCL or a GPU) is named as a GPU test,
so that a renamed GPU test cannot slip into a CPU entry and skip there unseen.

    every_test_selected.py ENTRIES_TSV BIN_DIR [TEST_SOURCE_DIR]

ENTRIES_TSV is bin/sedd-test-entries.tsv, written by tests/CMakeLists.txt (name, labels, binary,
ranks, filter). Exit 0 when all holds, 1 naming each test no entry selects, by suite.
"""
import fnmatch
import glob
import os
import re
import subprocess
import sys

GPU_PATTERNS = ("*Gpu*", "*Nccl*")


def listed(binary, gtest_filter=None):
    """The full names (Suite.Test) that BINARY --gtest_list_tests prints for a filter."""
    cmd = [binary, "--gtest_list_tests"] + (["--gtest_filter=" + gtest_filter] if gtest_filter else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        sys.exit("every_test_selected: %s failed (exit %d):\n%s" % (" ".join(cmd), out.returncode, out.stderr))
    names, suite = [], None
    for line in out.stdout.splitlines():
        if not line.strip() or line.startswith(("[", "MPI", "threads")):
            continue
        if not line.startswith(" "):
            suite = line.split("#")[0].strip()
        else:
            names.append(suite + line.split("#")[0].strip())
    return names


def gpu_skips_outside_gpu_names(source_dir):
    """Tests whose body has a GTEST_SKIP line about CUDA/NCCL/GPUs but whose name is no GPU name."""
    found = []
    for path in sorted(glob.glob(os.path.join(source_dir, "*_test.cpp"))):
        src = open(path).read()
        for m in re.finditer(r"^TEST(?:_F|_P)?\((\w+),\s*(\w+)\)", src, re.M):
            rest = src[m.end():]
            end = re.search(r"^(TEST(?:_F|_P)?\(|int main\()", rest, re.M)
            body = rest[:end.start()] if end else rest
            name = m.group(1) + "." + m.group(2)
            if any("GTEST_SKIP" in line and re.search(r"(?i)cuda|nccl|gpu", line) for line in body.split("\n")) and \
                    not any(fnmatch.fnmatchcase(name, p) for p in GPU_PATTERNS):
                found.append("%s (%s) skips without a GPU but is not named *Gpu* or *Nccl*"
                             % (name, os.path.basename(path)))
    return found


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    entries_tsv, bin_dir = sys.argv[1:3]
    entries = []
    with open(entries_tsv) as f:
        for line in f:
            if line.strip():
                name, labels, binary, ranks, gtest_filter = line.rstrip("\n").split("\t")
                entries.append({"name": name, "labels": labels.split(","), "binary": binary, "filter": gtest_filter})
    problems = []
    for binary in sorted({e["binary"] for e in entries}):
        path = os.path.join(bin_dir, binary)
        every = listed(path)
        by = {}   # test -> the entries that select it
        for e in (e for e in entries if e["binary"] == binary):
            chosen = listed(path, e["filter"])
            if not chosen:
                problems.append("entry %s selects no test of %s (filter %s)" % (e["name"], binary, e["filter"]))
            for t in chosen:
                by.setdefault(t, []).append(e)
        missed = {}
        for t in every:
            if t not in by:
                missed.setdefault(t.split(".")[0], []).append(t)
            elif any(fnmatch.fnmatchcase(t, p) for p in GPU_PATTERNS) and \
                    not any("gpu" in e["labels"] for e in by[t]):
                problems.append("GPU test %s is in no gpu-labelled entry (only %s)" %
                                (t, ", ".join(e["name"] for e in by[t])))
        for suite, tests in sorted(missed.items()):
            problems.append("%s: suite %s (%d test(s): %s) is selected by no CTest entry" %
                            (binary, suite, len(tests), ", ".join(tests[:4]) + (" ..." if len(tests) > 4 else "")))
        print("%s: %d tests, %d selected by %d entries" % (binary, len(every), len(by),
                                                          sum(e["binary"] == binary for e in entries)))
    if len(sys.argv) == 4:
        problems += gpu_skips_outside_gpu_names(sys.argv[3])
    for p in problems:
        print("NOT SELECTED: " + p if "selected by no" in p else "PROBLEM: " + p)
    if problems:
        print("add the suite to an entry in tests/CMakeLists.txt (GPU tests: name them *Gpu* or *Nccl*)")
        return 1
    print("every test is selected by a CTest entry; every GPU test by a gpu entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
