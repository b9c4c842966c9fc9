#!/usr/bin/env python3
"""The report of launch/gpu-check.sh: reads what its parts left in a work folder and writes
gpu-check.json (and, with --final, report.txt, also printed).

    gpu_check_report.py WORK --out DIR --elapsed SECONDS [--final]

WORK holds meta.tsv (key, value), deps.tsv (\\x1f-separated: name, kind, required, present, path,
note), parts.tsv (name, exit, seconds, timeout, state), logs/NAME.log and bench/*.json. Files are
replaced by rename, so a reader never sees half of one. With --final the exit code is the verdict:
0 when nothing is wrong, 1 otherwise. The printed report ends with the GPU section and the problems.
"""
import argparse
import datetime
import json
import os
import re
import sys

REPORT_LIMIT = 10000  # characters of report.txt

# The official SEDD code (its train.py and sampler, bf16 autocast) measured on one H100 with
# torch 2.11 beside this project: SEDD-small, L = 1024, absorbing graph.
OFFICIAL = {
    "train_b32_tokens_per_s": (158e3, 163e3), "train_b32_peak_gb": 34.0,
    "train_b64_tokens_per_s": (171e3, 171e3), "train_b64_peak_gb": 66.0,
    "sample_128_s": 8.3, "sample_1024_s": 64.0,
}


def read(path):
    try:
        with open(path, errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f.read())  # colours under mpirun's pty
    except OSError:
        return ""


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def gtest(text):
    """passed / failed / skipped (with reasons) / unfinished test names of a gtest log."""
    res, order, cur, buf = {}, [], None, []
    for line in text.splitlines():
        m = re.match(r"\[ RUN      \] (\S+)", line)
        if m:
            cur, buf = m.group(1), []
            if cur not in res:
                order.append(cur)
            res.setdefault(cur, ("unfinished", ""))
            continue
        m = re.match(r"\[\s+(OK|FAILED|SKIPPED)\s+\] (\S+)(?: \(\d+ ms\))?", line)
        if m and m.group(2) in res and res[m.group(2)][0] == "unfinished":
            kind = {"OK": "passed", "FAILED": "failed", "SKIPPED": "skipped"}[m.group(1)]
            reason = ""
            if kind == "skipped":
                lines = [l.strip() for l in buf if l.strip()]
                if lines and lines[0].endswith("Skipped"):
                    lines = lines[1:]
                reason = " ".join(lines)[:300]
            res[m.group(2)] = (kind, reason)
            cur = None
            continue
        if cur:
            buf.append(line)
    r = {"passed": [], "failed": [], "skipped": [], "unfinished": []}
    for name in order:
        kind, reason = res[name]
        r[kind].append({"name": name, "reason": reason} if kind == "skipped" else name)
    return r


class Report:
    def __init__(self, work, elapsed):
        self.work, self.logs = work, os.path.join(work, "logs")
        self.meta = {}
        for line in read(os.path.join(work, "meta.tsv")).splitlines():
            k, _, v = line.partition("\t")
            self.meta[k] = v
        self.parts = {}
        for line in read(os.path.join(work, "parts.tsv")).splitlines():
            f = line.split("\t")
            if len(f) >= 5:
                self.parts[f[0]] = {"rc": int(f[1]) if f[1] else None, "seconds": int(f[2] or 0),
                                    "timeout_s": int(f[3] or 0), "state": f[4]}
        self.elapsed = elapsed
        self.problems, self.warnings = [], []

    def log(self, name):
        return read(os.path.join(self.logs, name + ".log"))

    def part(self, name):
        return dict(self.parts.get(name, {"rc": None, "seconds": 0, "timeout_s": 0, "state": "not run"}))

    def part_problem(self, name, p):
        """A part that did not end well is a problem, saying how."""
        state = p.get("state", "not run")
        if name not in self.parts and self.meta.get("stopped_by"):
            return  # never reached: the stop itself is the problem
        if state.startswith("not run"):
            if "budget spent" in state:
                self.problems.append("%s not run: the budget was spent" % name)
            elif "GPUs, this node has" not in state and "compute-sanitizer" not in state:
                self.problems.append("%s %s" % (name, state))
        elif state != "done":
            self.problems.append("%s %s after %s s (see logs/%s.log)" % (name, state, p.get("seconds"), name))
        elif p.get("rc") not in (0, None):
            self.problems.append("%s exited %s (see logs/%s.log)" % (name, p.get("rc"), name))

    # --- sections -----------------------------------------------------------------------------
    def dependencies(self):
        deps = []
        for line in read(os.path.join(self.work, "deps.tsv")).split("\n"):
            if line:
                d = dict(zip(("name", "kind", "required", "present", "path", "note"), line.split("\x1f")))
                d["required"], d["present"] = d.get("required") == "1", d.get("present") == "1"
                deps.append(d)
        return deps

    def gpu(self):
        p = self.part("nvidia_smi")
        smi = self.log("nvidia_smi" if p.get("rc") == 0 else "nvidia_smi_basic")
        rows = [l for l in smi.splitlines() if l and not l.startswith("#")]
        gpu = None
        if len(rows) >= 2:
            head = [h.strip() for h in rows[0].split(",")]
            gpus = [dict(zip(head, [v.strip() for v in r.split(",")])) for r in rows[1:] if "," in r]
            if gpus:
                g = gpus[0]
                gpu = {"name": g.get("name"), "memory_total": g.get("memory.total [MiB]"),
                       "driver": g.get("driver_version"), "compute_cap": g.get("compute_cap"),
                       "compute_mode": g.get("compute_mode"), "count": len(gpus), "all": gpus}
        m = re.search(r"CUDA Version:\s*([\d.]+)", self.log("nvidia_smi_header"))
        if gpu is None:
            self.problems.append("nvidia-smi gave no GPU rows (see logs/nvidia_smi*.log)")
            return {"name": None, "error": "nvidia-smi gave no GPU rows"}
        gpu["cuda_driver_version"] = m.group(1) if m else None
        if gpu.get("compute_mode", "").lower().startswith("exclusive"):
            self.warnings.append("the GPU is in %s compute mode: the tests that start GPU work in child "
                                 "processes skip themselves" % gpu["compute_mode"])
        return gpu

    def runtime(self):
        text = self.log("system")
        kernel = self.meta.get("kernel", "")
        low = text.lower()
        if "gvisor" in low or kernel == "4.4.0":
            kind = "gVisor"
        elif "firecracker" in low or "virtio_mmio" in low:
            kind = "Firecracker"
        elif text:
            kind = "other (%s)" % (re.search(r"product: (.*)", text).group(1).strip() or "no DMI product")
        else:
            kind = "unknown"
        return {"kernel": kernel, "kind": kind}

    def versions(self):
        v = {}
        text = self.log("torch_versions")
        m = re.search(r"^TORCH_VERSIONS (.*)$", text, re.M)
        if m:
            v = json.loads(m.group(1))
        vp = self.log("torch_version_py")
        for key, field in (("libtorch", "__version__"), ("libtorch_cuda", "cuda")):
            m = re.search(r"^%s\s*(?::[^=]*)?=\s*'([^']*)'" % field, vp, re.M)
            if m:
                v[key] = m.group(1)
        nccl = "".join(self.log(n) for n in sorted(self.parts) if n.startswith("gpu_"))
        m = re.search(r"NCCL version (\S+)", nccl)
        v["nccl_loaded_by_binaries"] = m.group(1) if m else None
        if v.get("libtorch") and v.get("torch") and v["libtorch"] != v["torch"]:
            self.problems.append("the python torch (%s) is not the libtorch the binaries load (%s)"
                                 % (v["torch"], v["libtorch"]))
        return v

    def test_part(self, name):
        p = self.part(name)
        p.update(gtest(self.log(name)))
        for f in p["failed"]:
            self.problems.append("%s: test failed: %s" % (name, f))
        for f in p["unfinished"]:
            self.problems.append("%s: test did not finish (crash or cut): %s" % (name, f))
        self.part_problem(name, p)
        p["ok"] = p["state"] == "done" and p["rc"] == 0 and not p["failed"] and not p["unfinished"]
        return p

    def sanitizer(self, runtime):
        out = {}
        for tool in ("memcheck", "racecheck"):
            p = self.part(tool)
            text = self.log(tool)
            s = dict(p)
            s.update(gtest(text))
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            s["errors"] = int(m.group(1)) if m else None
            m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
            if m:
                s["hazards"], s["errors"], s["warnings"] = int(m.group(1)), int(m.group(2)), int(m.group(3))
            ran = bool(s["passed"] or s["failed"] or s["unfinished"])
            if p["state"] == "done" and not ran and p["rc"] not in (0, None) and runtime["kind"] == "gVisor":
                # gVisor does not let the sanitizer attach to the device: not a kernel failure
                s["state"] = "sanitizer unavailable here (gVisor)"
                self.warnings.append("%s: sanitizer unavailable here (gVisor runtime)" % tool)
            elif p["state"] == "done" and (s["errors"] or p["rc"] != 0 or s["failed"] or s["unfinished"]):
                self.problems.append("%s: %s errors, exit %s (see logs/%s.log)" % (tool, s["errors"], p["rc"], tool))
            else:
                self.part_problem(tool, p)
            out[tool] = s
        return out

    def bench(self, name, path):
        p = self.part(name)
        r = {"state": p["state"], "rc": p["rc"], "wall_s": p["seconds"]}
        j = load_json(os.path.join(self.work, "bench", path))
        self.part_problem(name, p)
        if j is None and p["state"] == "done":
            self.problems.append("%s: no figures (exit %s; see logs/%s.log)" % (name, p["rc"], name))
        return r, j

    def build(self):
        meta = self.meta
        report = {"version": 2,
                  "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "host": meta.get("host"), "repo": meta.get("repo"), "sedd_bin": meta.get("bin"),
                  "elapsed_s": self.elapsed, "budget_s": int(meta.get("budget", 0) or 0),
                  "stopped_by": meta.get("stopped_by"),
                  "dependencies": self.dependencies(), "missing": meta.get("missing", "").split(),
                  "parts": [dict(name=n, **p) for n, p in self.parts.items()]}
        if "no_gpu_reason" in meta:
            report.update({"gpu": None, "no_gpu_reason": meta["no_gpu_reason"]})
            for m in report["missing"]:
                self.problems.append("missing: " + m)
            report.update({"problems": self.problems, "warnings": self.warnings, "ok": not self.problems})
            return report
        if meta.get("stopped_by"):
            self.problems.append("stopped by %s after %d s: the parts after %s did not run"
                                 % (meta["stopped_by"], self.elapsed, list(self.parts)[-1] if self.parts else "the start"))
        for m in report["missing"]:
            self.problems.append("missing: %s (the parts that need it did not run)" % m)
        runtime = self.runtime()
        report.update({"gpu": self.gpu(), "runtime": runtime, "versions": self.versions()})
        report["gpu_tests"] = {n: self.test_part(n) for n in self.parts if n.startswith("gpu_")}
        life = self.test_part("life_cycle") if "life_cycle" in self.parts else self.part("life_cycle")
        text = self.log("life_cycle")
        m = re.search(r"GPU bf16 loss ([-\d.e+]+) -> ([-\d.e+]+)", text)
        if m:
            life["loss_first5"], life["loss_last5"] = float(m.group(1)), float(m.group(2))
        m = re.search(r"GPU resume: worst per-step loss difference ([-\d.e+]+)", text)
        if m:
            life["resume_worst_relative_loss_difference"] = float(m.group(1))
        if "life_cycle" not in self.parts:
            self.part_problem("life_cycle", life)
        report["life_cycle"] = life
        report["sanitizer"] = self.sanitizer(runtime)
        training = {}
        for label in ("b32", "b64", "b32_no_fused_kernels", "b32_no_fused_loss"):
            r, j = self.bench("train_" + label, "train_%s.json" % label)
            if isinstance(j, list) and j:
                r.update(j[0])
            training[label] = r
        sampling = {}
        for steps in (128, 1024):
            r, j = self.bench("sample_%d" % steps, "sample_%d.json" % steps)
            if j:
                r.update({k: v for k, v in j.items() if k != "results"})
                if j.get("results"):
                    r.update(j["results"][0])
            sampling[str(steps)] = r
        evaluation = {"data": "this tree's sources and docs, byte tokenizer, 64 sequences of 1024",
                      "checkpoint": "sedd-small shape, 20 steps of sedd-train on that data"}
        for n in ("eval_prepare", "eval_train"):
            if n in self.parts:
                self.part_problem(n, self.part(n))
        for k in (2, 16):
            r, j = self.bench("eval_k%d" % k, "eval_k%d.json" % k)
            if j:
                for key in ("tokens", "sequences", "seconds", "nats_per_token", "tokens_x_draws_per_s", "mc_samples"):
                    r[key] = j.get(key)
                if j.get("seconds"):
                    r["tokens_per_s"] = j["tokens"] / j["seconds"]
            evaluation["k%d" % k] = r
        report.update({"training": training, "sampling": sampling, "eval": evaluation})
        if "suite" in self.parts:
            suite = {}
            for line in self.log("suite_status").splitlines():
                name, _, rc = line.partition(" ")
                s = gtest(self.log("suite_" + name))
                s["rc"] = int(rc) if rc.strip().lstrip("-").isdigit() else None
                suite[name] = s
                if s["rc"] != 0 or s["failed"] or s["unfinished"]:
                    self.problems.append("suite %s: exit %s, failed %s" % (name, s["rc"], s["failed"] + s["unfinished"]))
            self.part_problem("suite", self.part("suite"))
            report["suite"] = suite
        report["against_official"] = self.against_official(training, sampling)
        report.update({"problems": self.problems, "warnings": self.warnings, "ok": not self.problems})
        return report

    def against_official(self, training, sampling):
        rows = []

        def row(what, ours, official, better):
            ratio = None
            if isinstance(ours, (int, float)) and official:
                ratio = ours / official
            rows.append({"what": what, "ours": ours, "official": official, "ratio": ratio, "better_when": better})
        lo, hi = OFFICIAL["train_b32_tokens_per_s"]
        row("train b32 tokens/s", training["b32"].get("tokens_per_s"), (lo + hi) / 2, "higher")
        row("train b32 peak GB", training["b32"].get("peak_memory_gb"), OFFICIAL["train_b32_peak_gb"], "lower")
        row("train b64 tokens/s", training["b64"].get("tokens_per_s"), OFFICIAL["train_b64_tokens_per_s"][0], "higher")
        row("train b64 peak GB", training["b64"].get("peak_memory_gb"), OFFICIAL["train_b64_peak_gb"], "lower")
        row("sample 16x1024, 128 steps, s", sampling["128"].get("cached_seconds"), OFFICIAL["sample_128_s"], "lower")
        row("sample 16x1024, 1024 steps, s", sampling["1024"].get("cached_seconds"), OFFICIAL["sample_1024_s"], "lower")
        return rows


# --- the printed report ----------------------------------------------------------------------------
def num(v, fmt="%.0f"):
    return fmt % v if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def listed(items, limit):
    items = list(items)
    return items[:limit] + (["... and %d more" % (len(items) - limit)] if len(items) > limit else [])


def render(r):
    L = []
    P = L.append
    P("=" * 96)
    P("gpu-check report - %s, %s, %s s of a %s s budget%s" % (
        r.get("host"), r.get("time"), r.get("elapsed_s"), r.get("budget_s"),
        ", STOPPED BY %s" % r["stopped_by"] if r.get("stopped_by") else ""))
    P("=" * 96)
    if r.get("gpu") is None:
        P("no GPU: %s" % r.get("no_gpu_reason"))
        P("dependencies: %d checked, missing: %s" % (len(r["dependencies"]), " ".join(r["missing"]) or "none"))
        for d in r["dependencies"]:
            if not d["present"]:
                P("  %-8s %-30s %s" % ("MISSING" if d["required"] else "absent", d["name"], d.get("note", "")))
    else:
        P("parts")
        for p in r["parts"]:
            P("  %-34s %-28s exit %-4s %4s s" % (p["name"], p["state"][:28], "-" if p["rc"] is None else p["rc"], p["seconds"]))
        t = r["training"]
        P("")
        P("training   sedd-bench-train, configs/sedd-small.ini, bf16, cuda, batch = micro batch")
        P("  %-22s %10s %7s %8s %8s %8s %8s" % ("run", "tokens/s", "MFU", "peak GB", "data", "fwd+bwd", "opt+comm"))
        for label, x in t.items():
            P("  %-22s %10s %7s %8s %8s %8s %8s%s" % (
                label, num(x.get("tokens_per_s")), num(100 * x["mfu"], "%.1f%%") if "mfu" in x else "-",
                num(x.get("peak_memory_gb"), "%.2f"),
                num(100 * x["split_data"], "%.1f%%") if "split_data" in x else "-",
                num(100 * x["split_forward_backward"], "%.1f%%") if "split_forward_backward" in x else "-",
                num(100 * x["split_optimizer_and_communication"], "%.1f%%") if "split_optimizer_and_communication" in x else "-",
                "" if x.get("state") == "done" else "  [%s]" % x.get("state")))
        P("")
        P("sampling   sedd-bench-sample --model small, 16 x 1024 tokens, analytic")
        P("  %6s %9s %9s %12s %10s %8s %10s" % ("steps", "plain s", "cached s", "cached tok/s", "forwards", "speedup", "equal tok"))
        for steps, x in r["sampling"].items():
            eq = x.get("equal_token_fraction")
            P("  %6s %9s %9s %12s %10s %8s %10s%s" % (
                steps, num(x.get("plain_seconds"), "%.2f"), num(x.get("cached_seconds"), "%.2f"),
                num(x.get("cached_tokens_per_s")), "%s/%s" % (x.get("cached_forwards", "-"), x.get("plain_forwards", "-")),
                num(x["plain_seconds"] / x["cached_seconds"], "%.2fx") if x.get("cached_seconds") else "-",
                num(100 * eq, "%.2f%%") if isinstance(eq, (int, float)) else str(x.get("identical", "-")),
                "" if x.get("state") == "done" else "  [%s]" % x.get("state")))
        P("")
        P("eval       sedd-eval on a 20-step sedd-small checkpoint, %s" % r["eval"]["data"])
        for k in (2, 16):
            x = r["eval"]["k%d" % k]
            P("  K = %2d: %s tokens/s, %s tokens x K / s, %s nats/token%s" % (
                k, num(x.get("tokens_per_s")), num(x.get("tokens_x_draws_per_s")), num(x.get("nats_per_token"), "%.3f"),
                "" if x.get("state") == "done" else "  [%s]" % x.get("state")))
        P("")
        P("against the official SEDD code (one H100, torch 2.11, bf16; measured beside this project)")
        for row in r["against_official"]:
            P("  %-32s ours %10s   official %10s   ratio %s (%s is better)" % (
                row["what"], num(row["ours"], "%.2f" if isinstance(row["ours"], float) and row["ours"] < 100 else "%.0f"),
                num(row["official"], "%.1f" if row["official"] < 100 else "%.0f"), num(row["ratio"], "%.2f"),
                row["better_when"]))
        if r.get("suite"):
            s = r["suite"]
            P("")
            P("CPU suite (--with-suite): %d entries, %d not ok" % (len(s), sum(1 for x in s.values() if x["rc"] != 0)))
        P("")
        P("=" * 30 + " GPU " + "=" * 61)
        g = r["gpu"]
        P("GPU        %s, %s, driver %s, CUDA (driver) %s, compute capability %s, compute mode %s, %s visible" % (
            g.get("name"), g.get("memory_total"), g.get("driver"), g.get("cuda_driver_version"), g.get("compute_cap"),
            g.get("compute_mode"), g.get("count")))
        rt, v = r["runtime"], r["versions"]
        P("node       kernel %s, runtime %s" % (rt["kernel"], rt["kind"]))
        P("versions   torch %s, CUDA %s, cuDNN %s, NCCL %s (python); libtorch of the binaries %s (CUDA %s); NCCL loaded %s" % (
            v.get("torch"), v.get("cuda"), v.get("cudnn"), v.get("nccl"), v.get("libtorch"), v.get("libtorch_cuda"),
            v.get("nccl_loaded_by_binaries")))
        tests = dict(r["gpu_tests"])
        tests["life_cycle"] = r["life_cycle"]
        tot = {k: sum(len(p.get(k, [])) for p in tests.values()) for k in ("passed", "failed", "skipped", "unfinished")}
        P("GPU tests: %(passed)d passed, %(failed)d failed, %(skipped)d skipped, %(unfinished)d unfinished" % tot)
        for name, p in tests.items():
            P("  %-28s %-7s %4s s  %3d passed %2d failed %2d skipped%s" % (
                name, "-" if p.get("state", "").startswith("not run") else "ok" if p.get("ok") else "NOT OK",
                p.get("seconds", "-"), len(p.get("passed", [])),
                len(p.get("failed", [])), len(p.get("skipped", [])),
                "" if p.get("state") == "done" else "  [%s]" % p.get("state")))
            for f in listed(p.get("failed", []), 10):
                P("      FAILED     " + f)
            for f in listed(p.get("unfinished", []), 5):
                P("      UNFINISHED " + f)
            for s in listed(p.get("skipped", []), 8):
                P("      skipped    " + (s if isinstance(s, str) else "%s: %s" % (s["name"], s["reason"][:150])))
        life = r["life_cycle"]
        if "loss_first5" in life:
            P("  life cycle: bf16 loss %.3f -> %.3f; resume: worst relative per-step loss difference %s"
              % (life["loss_first5"], life["loss_last5"], life.get("resume_worst_relative_loss_difference")))
        for tool, s in r["sanitizer"].items():
            P("sanitizer  %-10s %s: %s errors, %d tests passed, %d failed" % (
                tool, s["state"], s.get("errors"), len(s.get("passed", [])), len(s.get("failed", []))))
    P("")
    for w in listed(r["warnings"], 10):
        P("warning: " + w)
    if r["problems"]:
        P("PROBLEMS (%d)" % len(r["problems"]))
        for p in listed(r["problems"], 30):
            P("  - " + p[:300])
    else:
        P("no problems" + ("" if r.get("gpu") is None else ": every GPU test passed and every part finished"))
    text = "\n".join(L) + "\n"
    if len(text) > REPORT_LIMIT:  # keep the end (the GPU section and the problems)
        text = "[... report cut to its last %d characters]\n" % REPORT_LIMIT + text[-(REPORT_LIMIT - 60):]
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--final", action="store_true")
    a = ap.parse_args()
    report = Report(a.work, a.elapsed).build()
    write_atomic(os.path.join(a.out, "gpu-check.json"), json.dumps(report, indent=1) + "\n")
    if not a.final:
        return 0
    text = render(report)
    write_atomic(os.path.join(a.out, "report.txt"), text)
    sys.stdout.write(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
