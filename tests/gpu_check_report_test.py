#!/usr/bin/env python3
"""tools/gpu_check_report.py on canned part results (no GPU, no binaries): what it reads from logs,
how it judges parts, and the size and order of the printed report.

    gpu_check_report_test.py SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

SRC = sys.argv[1]
TOOL = os.path.join(SRC, "tools", "gpu_check_report.py")
failures = []


def check(cond, what):
    print(("ok      " if cond else "FAILED  ") + what)
    if not cond:
        failures.append(what)


def canned(work, parts, logs, meta, bench=None):
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.makedirs(os.path.join(work, "bench"), exist_ok=True)
    with open(os.path.join(work, "parts.tsv"), "w") as f:
        for p in parts:
            f.write("\t".join(str(x) for x in p) + "\n")
    with open(os.path.join(work, "meta.tsv"), "w") as f:
        for k, v in meta.items():
            f.write("%s\t%s\n" % (k, v))
    with open(os.path.join(work, "deps.tsv"), "w") as f:
        f.write("\x1f".join(["sedd-train", "binary", "1", "1", "/x/sedd-train", ""]) + "\n")
    for name, text in logs.items():
        with open(os.path.join(work, "logs", name + ".log"), "w") as f:
            f.write(text)
    for name, value in (bench or {}).items():
        with open(os.path.join(work, "bench", name), "w") as f:
            json.dump(value, f)


def report(work, final=True):
    out = os.path.join(work, "out")
    os.makedirs(out, exist_ok=True)
    r = subprocess.run([sys.executable, TOOL, work, "--out", out, "--elapsed", "42"] + (["--final"] if final else []),
                       capture_output=True, text=True)
    j = json.load(open(os.path.join(out, "gpu-check.json")))
    return r, j, out


SMI = ("index, name, memory.total [MiB], compute_mode\n0, NVIDIA H200, 143771 MiB, %s\n")
GPU_META = {"host": "node1", "repo": "/r", "bin": "/b", "budget": "300", "kernel": "4.4.0", "missing": ""}

with tempfile.TemporaryDirectory() as tmp:
    # 1. gVisor: the sanitizer that cannot attach is "unavailable here", not a kernel failure;
    #    exclusive-process compute mode is a warning; a budget-spent part a problem
    work = os.path.join(tmp, "gvisor")
    canned(work,
           [("nvidia_smi", 0, 1, 4, "done"), ("system", 0, 0, 2, "done"),
            ("memcheck", 1, 3, 8, "done"), ("racecheck", "", 0, 0, "not run: budget spent")],
           {"nvidia_smi": SMI % "Exclusive_Process", "system": "uname: Linux 4.4.0\ndmesg:\n[0.0] Starting gVisor...\n",
            "memcheck": "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"},
           GPU_META)
    r, j, out = report(work)
    check(r.returncode == 1, "a run with problems exits 1 (exit %d)" % r.returncode)
    check(j["runtime"]["kind"] == "gVisor", "gVisor recognised from dmesg and the 4.4.0 kernel")
    check(j["sanitizer"]["memcheck"]["state"] == "sanitizer unavailable here (gVisor)",
          "memcheck under gVisor: unavailable, not a failure (%s)" % j["sanitizer"]["memcheck"]["state"])
    check(not any(p.startswith("memcheck") for p in j["problems"]), "no memcheck problem under gVisor")
    check(any("racecheck not run: the budget was spent" in p for p in j["problems"]), "a budget-spent part is a problem")
    check(any("exclusive" in w.lower() for w in j["warnings"]), "exclusive-process compute mode is a warning")
    check(j["gpu"]["compute_mode"] == "Exclusive_Process", "compute mode read from nvidia-smi")

    # 2. a real memcheck error on a VM is a problem; a long report is cut from the front, so its end
    #    (the GPU section and the problems) survives within 10,000 characters
    work = os.path.join(tmp, "long")
    gtest = "".join("[ RUN      ] FusedOpsGpu.Case%d\n/x.cpp:1: Failure\n[  FAILED  ] FusedOpsGpu.Case%d (1 ms)\n" % (i, i)
                    for i in range(400))
    canned(work,
           [("nvidia_smi", 0, 1, 4, "done"), ("system", 0, 0, 2, "done"), ("gpu_gpu_tests", 1, 30, 100, "done"),
            ("memcheck", 99, 3, 8, "done"), ("train_b32", 0, 20, 35, "done"), ("sample_128", 124, 35, 35, "timed out")],
           {"nvidia_smi": SMI % "Default", "system": "product: Firecracker\ncmdline: virtio_mmio.device=4K@0xd0000000\n",
            "gpu_gpu_tests": gtest, "memcheck": "[ RUN      ] A.B\n[       OK ] A.B (1 ms)\n========= ERROR SUMMARY: 3 errors\n"},
           dict(GPU_META, kernel="6.1.0"),
           {"train_b32.json": [{"tokens_per_s": 200000.0, "mfu": 0.2, "peak_memory_gb": 20.0}]})
    r, j, out = report(work)
    text = open(os.path.join(out, "report.txt")).read()
    check(len(text) <= 10000, "report.txt within 10,000 characters (%d)" % len(text))
    check(text == r.stdout, "report.txt is what was printed")
    check("GPU tests: 0 passed, 400 failed" in text and text.rstrip().splitlines()[-1].startswith("  - "),
          "the cut report keeps the GPU section and ends with the problems")
    check(j["runtime"]["kind"] == "Firecracker", "Firecracker recognised")
    check(any(p.startswith("memcheck: 3 errors") for p in j["problems"]), "memcheck errors are a problem")
    check(any(p.startswith("sample_128 timed out") for p in j["problems"]), "a part cut by its timeout is a problem")
    check(len(j["gpu_tests"]["gpu_gpu_tests"]["failed"]) == 400, "every failed test is in gpu-check.json")
    row = [x for x in j["against_official"] if x["what"] == "train b32 tokens/s"][0]
    check(abs(row["ratio"] - 200000.0 / 160500.0) < 1e-9, "tokens/s against the official code's 158-163k")

    # 3. a clean run: exit 0, "no problems", and gpu-check.json alone without --final
    work = os.path.join(tmp, "clean")
    gtest = "[ RUN      ] ModelGpu.A\n[       OK ] ModelGpu.A (1 ms)\n"
    parts = [("nvidia_smi", 0, 1, 4, "done"), ("gpu_gpu_tests", 0, 3, 100, "done"), ("life_cycle", 0, 30, 60, "done")]
    canned(work, parts, {"nvidia_smi": SMI % "Default", "gpu_gpu_tests": gtest,
                         "life_cycle": "[ RUN      ] TrainGpu.L\nGPU bf16 loss 5.41 -> 3.02\n[       OK ] TrainGpu.L (1 ms)\n"},
           GPU_META)
    r, j, out = report(work, final=False)
    check(r.returncode == 0 and not os.path.exists(os.path.join(out, "report.txt")) and r.stdout == "",
          "without --final: gpu-check.json only, nothing printed")
    check(j["life_cycle"]["loss_last5"] == 3.02, "life-cycle figures read")
    check([p["name"] for p in j["parts"]] == [p[0] for p in parts], "parts kept in the order they ran")

    # 4. no GPU: gpu null, the reason, the dependencies, missing ones are problems
    work = os.path.join(tmp, "nogpu")
    canned(work, [], {}, {"host": "h", "budget": "300", "no_gpu_reason": "nvidia-smi not found", "missing": "sedd-eval"})
    r, j, out = report(work)
    check(j["gpu"] is None and j["no_gpu_reason"] == "nvidia-smi not found", "no GPU: gpu null with its reason")
    check(j["missing"] == ["sedd-eval"] and j["ok"] is False and r.returncode == 1, "a missing dependency fails")
    check("no GPU: nvidia-smi not found" in r.stdout, "the no-GPU report says why")

if failures:
    print("%d check(s) failed" % len(failures))
    sys.exit(1)
print("PASSED: gpu_check_report.py on canned results")
