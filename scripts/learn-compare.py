#!/usr/bin/env python3
"""The table of the learning comparison (issue 14): loss windows and held-out metrics of the official runs
against xvlm's, with the band rule, from what scripts/learn-compare.sh left in its OUT folder.

    learn-compare.py --dir /tmp/learn-compare --seeds 1 2 3 --ablation-seeds 1 2 [--windows 400 800 1200]

Reads official-S.jsonl (scripts/official-pretrain-loop.py), xvlm-S/rank0.log and exact-S/rank0.log (the
xvlm trainer's log: one `optimizer step` line per step) and metrics.jsonl (scripts/learn-eval.py). Only the
standard library.

Loss windows: the mean of each loss over the 50 iterations ending at each --windows iteration (1-based, an
iteration being one image-text step and, iter_perc of the time, a region step before it, as in
Pretrain.train): loss_itc / loss_itm / loss_mlm of the image-text steps, loss_bbox / loss_giou of the
region steps among those iterations.

The rule: with the official seeds' min and max and s = max - min, floored at 0.05 for losses, 3 points
for percentages and 1.0 for mean ranks, xvlm's seed mean must lie in [min - s, max + s]. The ablation
rows (exact_ops: True) are judged by the same band: they are expected to leave it where the wraps matter.
"""
import argparse
import json
import re
import sys

IMAGE_TEXT = ["loss_itc", "loss_itm", "loss_mlm"]
REGION = ["loss_bbox", "loss_giou"]
METRICS = ["i2t_r1", "i2t_r5", "i2t_mean_rank", "t2i_r1", "t2i_r5", "t2i_mean_rank",
           "box_acc50", "box_miou", "mlm_acc"]
LOG_LINE = re.compile(r"optimizer step iteration=(\d+) kind=(\w+) (.*?) lr=")


def official_steps(path):
    """[(iteration, 'image-text' | 'region', {loss: value})] of a runner's json lines."""
    out = []
    for line in open(path):
        rec = json.loads(line)
        out.append((rec["iteration"], rec["step"], {k: v for k, v in rec.items() if k.startswith("loss_")}))
    return out


def xvlm_steps(path):
    """The same from an xvlm trainer log (its iteration is 0-based; General is the image-text step)."""
    out = []
    for line in open(path):
        m = LOG_LINE.search(line)
        if m:
            losses = {k: float(v) for k, v in (kv.split("=") for kv in m.group(3).split())}
            out.append((int(m.group(1)) + 1, "image-text" if m.group(2) == "General" else "region", losses))
    return out


def windows(steps, ends, width):
    """{(loss, end): mean over iterations end - width + 1 .. end}."""
    out = {}
    for end in ends:
        for kind, names in [("image-text", IMAGE_TEXT), ("region", REGION)]:
            picked = [l for it, k, l in steps if k == kind and end - width < it <= end]
            for name in names:
                vals = [l[name] for l in picked]
                out[(name, end)] = sum(vals) / len(vals) if vals else float("nan")
    last = max(it for it, _, _ in steps)
    if last < max(ends):
        sys.exit(f"a run ends at iteration {last}, before window {max(ends)}")
    return out


def floor_of(name):
    if name.startswith("loss_"):
        return 0.05
    if name.endswith("mean_rank"):
        return 1.0
    return 3.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="scripts/learn-compare.sh's OUT")
    ap.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    ap.add_argument("--ablation-seeds", nargs="*", default=[])
    ap.add_argument("--windows", nargs="+", type=int, default=[400, 800, 1200])
    ap.add_argument("--width", type=int, default=50)
    args = ap.parse_args()
    d = args.dir

    rows = {}  # quantity -> {"official": [...], "xvlm": [...], "exact": [...]}
    def add(group, values):
        for k, v in values.items():
            rows.setdefault(k, {"official": [], "xvlm": [], "exact": []})[group].append(v)
    for s in args.seeds:
        add("official", windows(official_steps(f"{d}/official-{s}.jsonl"), args.windows, args.width))
        add("xvlm", windows(xvlm_steps(f"{d}/xvlm-{s}/rank0.log"), args.windows, args.width))
    for s in args.ablation_seeds:
        add("exact", windows(xvlm_steps(f"{d}/exact-{s}/rank0.log"), args.windows, args.width))
    metrics = {}
    try:
        for line in open(f"{d}/metrics.jsonl"):
            rec = json.loads(line)
            metrics[rec["label"]] = rec
    except FileNotFoundError:
        print("(no metrics.jsonl: loss windows only)\n")
    for group, seeds, prefix in [("official", args.seeds, "official"), ("xvlm", args.seeds, "xvlm"),
                                 ("exact", args.ablation_seeds, "exact")]:
        for s in seeds:
            if f"{prefix}-{s}" in metrics:
                add(group, {m: metrics[f"{prefix}-{s}"][m] for m in METRICS})

    order = [(n, e) for e in args.windows for n in IMAGE_TEXT + REGION] + [m for m in METRICS if m in rows]
    abl = bool(args.ablation_seeds)
    head = ["quantity", "official seeds", "min", "max", "s", "band", "xvlm seeds", "xvlm mean", "in band"]
    if abl:
        head += ["exact_ops seeds", "exact_ops mean", "in band"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    outside = []
    def fmt(v):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    for key in order:
        name = f"{key[0][5:]} @ {key[1]}" if isinstance(key, tuple) else key
        r = rows[key]
        lo, hi = min(r["official"]), max(r["official"])
        s = max(hi - lo, floor_of(key[0] if isinstance(key, tuple) else key))
        band = (lo - s, hi + s)
        cells = [name, " ".join(fmt(v) for v in r["official"]), fmt(lo), fmt(hi), fmt(s),
                 f"[{fmt(band[0])}, {fmt(band[1])}]"]
        for group in ["xvlm", "exact"] if abl else ["xvlm"]:
            vals = r[group]
            if not vals:
                cells += ["-", "-", "-"]
                continue
            mean = sum(vals) / len(vals)
            ok = band[0] <= mean <= band[1]
            if group == "xvlm" and not ok:
                outside.append(name)
            cells += [" ".join(fmt(v) for v in vals), fmt(mean), "in" if ok else "**out**"]
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"xvlm outside the band: {', '.join(outside) if outside else 'none'}")


if __name__ == "__main__":
    main()
