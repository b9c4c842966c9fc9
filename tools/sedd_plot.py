#!/usr/bin/env python3
"""Plot a run's loss curve (and validation loss) from metrics.jsonl to a PNG.

  sedd_plot.py RUN_DIR_OR_METRICS.jsonl [--out loss.png]
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics")
    p.add_argument("--out", default=None, help="PNG path (default: next to metrics.jsonl)")
    a = p.parse_args()
    path = os.path.join(a.metrics, "metrics.jsonl") if os.path.isdir(a.metrics) else a.metrics
    if not os.path.exists(path):
        sys.exit(f"sedd_plot: error: {path}: no such metrics file")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                sys.exit(f"sedd_plot: error: {path}:{n}: not JSON")
    if not rows:
        sys.exit(f"sedd_plot: error: {path}: no rows")
    out = a.out or os.path.join(os.path.dirname(path) or ".", "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "valid_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["valid_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("score-entropy bound (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({len(rows)} points)")


if __name__ == "__main__":
    main()
