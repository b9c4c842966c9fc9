#!/usr/bin/env python3
"""The paired comparison of compare_with_official.sh's results.tsv (seed, official, ours, ...):
every seed, the mean of ours - official with its 95% t interval (also as a share of the official
mean, and the interval's half-width), and every run that ends 3% or more above the mean of the
other runs on its side.

    paired_summary.py RESULTS_TSV [OTHER_TSV LABEL]

With OTHER_TSV (seed, bound: e.g. ours with stratified times), the same paired interval of
OTHER - ours on the seeds both have.
"""
import math
import sys

T975 = [None, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]


def interval(label, a, b):
    """Paired mean of b - a with its 95% interval, relative to mean(a)."""
    n = len(a)
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    t = T975[n - 1] if n - 1 < len(T975) else 1.96
    base = sum(a) / n
    print("%s: %+.4f +- %.4f (s.e., n = %d); 95%% interval [%+.4f, %+.4f] = [%+.2f%%, %+.2f%%] of %.4f; "
          "half-width %.2f%%" % (label, mean, se, n, mean - t * se, mean + t * se, 100 * (mean - t * se) / base,
                                 100 * (mean + t * se) / base, base, 100 * t * se / base))


def outliers(side, seeds, values):
    for s, v in zip(seeds, values):
        rest = [x for t, x in zip(seeds, values) if t != s]
        m = sum(rest) / len(rest)
        if v >= 1.03 * m:
            print("outlier: %s seed %d ends at %.4f, %.1f%% above the other %s runs (%.4f)"
                  % (side, s, v, 100 * (v / m - 1), side, m))


def main():
    rows = []
    for line in open(sys.argv[1]):
        f = line.rstrip("\n").split("\t")
        if len(f) >= 3 and f[1] and f[2]:
            rows.append((int(f[0]), float(f[1]), float(f[2])))
    print("seed   official      ours   ours - official")
    for s, o, u in rows:
        print("%4d   %8.4f  %8.4f   %+.4f (%+.2f%%)" % (s, o, u, u - o, 100 * (u - o) / o))
    if len(rows) < 2:
        return
    seeds, off, ours = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    print("means: official %.4f, ours %.4f" % (sum(off) / len(off), sum(ours) / len(ours)))
    interval("ours - official", off, ours)
    outliers("official", seeds, off)
    outliers("ours", seeds, ours)
    if len(sys.argv) >= 4:
        other = {}
        for line in open(sys.argv[2]):
            f = line.split()
            if len(f) >= 2:
                other[int(f[0])] = float(f[1])
        both = [(u, other[s]) for s, _, u in rows if s in other]
        if len(both) >= 2:
            interval("%s - ours" % sys.argv[3], [x for x, _ in both], [y for _, y in both])


if __name__ == "__main__":
    main()
