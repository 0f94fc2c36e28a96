#!/usr/bin/env python3
"""Generate model/tests/fixtures/randaugment/cases.json: digests of the official colour ops.

Each case is (w, h, seed, kind, ranges) and, per op, the SHA-256 of the official output. The input image
is `h * w * 3` bytes (RGB, row-major): splitmix64 bytes seeded with `seed` (as
scripts/pil-resize-cases.py), channel c mapped to `lo_c + byte % (hi_c - lo_c + 1)` with
`ranges[c] = [lo_c, hi_c]`, so no image is stored. The kinds choose the ranges so that every branch of
the official arithmetic is hit: AutoContrast's uint8 wrap of `-low` (a channel with 0 < min < max), a
channel with min 0, a constant channel; Sharpness results below 0 and above 255 (numpy's unclipped
`astype(np.uint8)`).

Ops, with RandomAugment(2, 7)'s level 0.7:
- `autocontrast`, `sharpness` (factor 0.7 * 1.8 + 0.1), `equalize`, `brightness` (same factor): the
  official `dataset/randaugment.py` functions, wraps included (xvlm's default, `OpArithmetic::Official`);
- `autocontrast_exact`, `sharpness_exact`: the documented mappings without the wraps (xvlm-only
  `exact_ops: True`, `OpArithmetic::Exact`), as scripts/region-stats-official.py's `--intended-ops`.

Run with the official environment (../shared/bench/OFFICIAL-ENV.md: numpy, opencv):
    /work/official/venv/bin/python scripts/randaugment-cases.py /work/official/X-VLM
"""

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import cv2
import numpy as np

from official_support import autocontrast_intended, sharpness_intended, splitmix64_bytes
OUT = Path(__file__).resolve().parent.parent / "model/tests/fixtures/randaugment/cases.json"
FACTOR = (7 / 10) * 1.8 + 0.1


def image(w, h, seed, ranges):
    raw = np.frombuffer(splitmix64_bytes(seed, w * h * 3), dtype=np.uint8).reshape(h, w, 3)
    out = np.empty_like(raw)
    for c, (lo, hi) in enumerate(ranges):
        out[:, :, c] = (lo + raw[:, :, c].astype(np.int64) % (hi - lo + 1)).astype(np.uint8)
    return out


def ranges_of(kind, rng):
    def narrow():
        lo = rng.randrange(1, 200)
        return [lo, rng.randrange(lo + 1, 256)]

    if kind == "full":
        return [[0, 255]] * 3
    if kind == "narrow":
        return [narrow() for _ in range(3)]
    if kind == "mixed":
        return [[0, rng.randrange(1, 256)], narrow(), narrow()]
    if kind == "constant":
        v = rng.randrange(0, 256)
        return [[v, v], narrow(), [0, 255]]
    if kind == "dark":
        return [[0, rng.randrange(1, 40)] for _ in range(3)]
    if kind == "bright":
        return [[rng.randrange(200, 255), 255] for _ in range(3)]
    raise ValueError(kind)


def import_randaugment(official):
    spec = importlib.util.spec_from_file_location(
        "randaugment", Path(official) / "dataset/randaugment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest(img):
    return hashlib.sha256(np.ascontiguousarray(img, dtype=np.uint8).tobytes()).hexdigest()


def main():
    ra = import_randaugment(sys.argv[1] if len(sys.argv) > 1 else "/work/official/X-VLM")
    ops = {
        "autocontrast": ra.autocontrast_func,
        "sharpness": lambda img: ra.sharpness_func(img, FACTOR),
        "equalize": ra.equalize_func,
        "brightness": lambda img: ra.brightness_func(img, FACTOR),
        "autocontrast_exact": autocontrast_intended,
        "sharpness_exact": lambda img: sharpness_intended(img, FACTOR),
    }
    rng = random.Random(14)
    rows = []
    kinds = ["full", "narrow", "mixed", "constant", "dark", "bright"]
    for i in range(240):
        kind = kinds[i % len(kinds)]
        w, h = rng.randrange(1, 48), rng.randrange(1, 48)
        seed = rng.getrandbits(64)
        ranges = ranges_of(kind, rng)
        img = image(w, h, seed, ranges)
        rows.append({"w": w, "h": h, "seed": seed, "kind": kind, "ranges": ranges,
                     **{name: digest(op(img.copy())) for name, op in ops.items()}})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generator": "scripts/randaugment-cases.py",
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "factor": FACTOR,
        "cases": rows,
    }, indent=1) + "\n")
    print(f"{len(rows)} cases written to {OUT}")


if __name__ == "__main__":
    main()
