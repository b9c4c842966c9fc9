#!/usr/bin/env python3
"""Plot a run's loss curve (and validation loss) from metrics.jsonl to a PNG.

  sedd_plot.py RUN_DIR_OR_METRICS.jsonl [--out loss.png]
"""
import argparse
import json
import math
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
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                sys.exit(f"sedd_plot: error: {path}:{n}: not JSON")
    if not rows:
        sys.exit(f"sedd_plot: error: {path}: no rows")

    def number(r, key):
        # A skipped (non-finite) step is written as null; other tools may write rows without a loss.
        v = r.get(key) if isinstance(r, dict) else None
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    train = [r for r in rows if number(r, "step") and number(r, "loss")]
    val = [r for r in rows if number(r, "step") and number(r, "valid_loss")]
    if not train and not val:
        sys.exit(f"sedd_plot: error: {path}: none of its {len(rows)} rows has a step with a finite loss or valid_loss")
    if len(train) < len(rows):
        print(f"sedd_plot: {len(rows) - len(train)} of {len(rows)} rows have no finite loss; not plotted",
              file=sys.stderr)
    out = a.out or os.path.join(os.path.dirname(path) or ".", "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["valid_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("score-entropy bound (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({len(train)} points)")


if __name__ == "__main__":
    main()
