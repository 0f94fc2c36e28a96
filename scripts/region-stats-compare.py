#!/usr/bin/env python3
"""Tests whether two dumps of region batches (`xvlm region-stats`, scripts/region-stats-official.py) come
from the same distribution, statistic by statistic: Kolmogorov-Smirnov for the continuous ones,
chi-square for the counts; a statistic passes at p > 0.01. RNG streams differ, so batches cannot match one
for one; their distributions must.

    region-stats-compare.py xvlm.jsonl official.jsonl
"""
import json
import sys

import numpy as np
from scipy import stats


def first_region_per_image(batches):
    """One region text per image: an image's regions share its crop, and the collate's padding repeats
    texts, so all of them together are not independent draws (a KS test on them is optimistic)."""
    regions = []
    for b in batches:
        seen = set()
        for t in b["texts"]:
            if t["is_image"] == 0 and t["img"] not in seen:
                seen.add(t["img"])
                regions.append(t)
    return regions


def load(path):
    batches = [json.loads(line) for line in open(path)]
    texts = [t for b in batches for t in b["texts"]]
    regions = first_region_per_image(batches)
    images = [i for b in batches for i in b["images"]]
    per_image = []
    duplicates = 0
    for b in batches:
        counts = {}
        seen = set()
        for t in b["texts"]:
            counts[t["img"]] = counts.get(t["img"], 0) + 1
            key = (t["img"], t["is_image"], tuple(t["box"]))
            duplicates += key in seen
            seen.add(key)
        per_image.extend(counts.values())
    return {
        "texts": len(texts),
        "whole-image texts": [t["is_image"] for t in texts],
        "region cx": [t["box"][0] for t in regions],
        "region cy": [t["box"][1] for t in regions],
        "region w": [t["box"][2] for t in regions],
        "region h": [t["box"][3] for t in regions],
        "region patch coverage": [t["cov"] for t in regions],
        "texts per image": per_image,
        "repeated texts (padding)": duplicates,
        "image pixel mean": [i["mean"] for i in images],
        "image pixel std": [i["std"] for i in images],
        "flat images (std < 0.05)": [int(i["std"] < 0.05) for i in images],
    }


def chi2_counts(a, b):
    """Chi-square of two samples of small integers (categories with few counts pooled)."""
    values = sorted(set(a) | set(b))
    table = np.array([[a.count(v) for v in values], [b.count(v) for v in values]])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return stats.chi2_contingency(table)[1]


def main():
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    print(f"texts: xvlm {ours['texts']}, official {theirs['texts']}")
    print(f"| statistic | xvlm mean | official mean | test | p | |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for name in ours:
        if name == "texts":
            continue
        a, b = ours[name], theirs[name]
        if name == "repeated texts (padding)":
            na, nb = ours["texts"], theirs["texts"]
            p = stats.chi2_contingency([[a, na - a], [b, nb - b]])[1]
            ma, mb, test = a / na, b / nb, "chi2"
        elif name in ("whole-image texts", "texts per image", "flat images (std < 0.05)"):
            p, ma, mb, test = chi2_counts(a, b), np.mean(a), np.mean(b), "chi2"
        else:
            p, ma, mb, test = stats.ks_2samp(a, b).pvalue, np.mean(a), np.mean(b), "KS"
        ok = p > 0.01
        failed += not ok
        print(f"| {name} | {ma:.4f} | {mb:.4f} | {test} | {p:.3g} | {'ok' if ok else 'DIFFERS'} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
