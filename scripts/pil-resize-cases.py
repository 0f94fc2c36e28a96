#!/usr/bin/env python3
"""Generate model/tests/fixtures/pil_resize/cases.json: PIL bicubic resize digests for the exact resampler.

Each case is (in_w, in_h, out_w, out_h, seed, kind, sha256). The input image is `in_h * in_w * 3` bytes
(RGB, row-major) from splitmix64 seeded with `seed`, each 64-bit output giving 8 bytes little-endian
(the same generator is in model/src/data/pixels.rs's tests), so no image is stored. The digest is of
`Image.frombytes("RGB", (in_w, in_h), bytes).resize((out_w, out_h), Image.BICUBIC).tobytes()`, which is
what torchvision's `Resize` does to a PIL image (no reducing_gap).

Run with the Pillow version that made the project's fixtures (13.x):
    python3 -m venv /tmp/venv-pil && /tmp/venv-pil/bin/pip install "pillow==13.*"
    /tmp/venv-pil/bin/python scripts/pil-resize-cases.py
"""

import hashlib
import json
import random
import sys
from pathlib import Path

import PIL
from PIL import Image

from official_support import splitmix64_bytes
OUT = Path(__file__).resolve().parent.parent / "model/tests/fixtures/pil_resize/cases.json"


def cases(rng: random.Random):
    """(kind, in_w, in_h, out_w, out_h) tuples."""
    out = [
        ("fixed", 129, 128, 80, 80),
        ("fixed", 128, 129, 80, 80),
        ("fixed", 200, 150, 90, 50),
        ("fixed", 300, 301, 100, 100),
        ("fixed", 1000, 7, 3, 50),
        ("fixed", 7, 1000, 50, 3),
        ("fixed", 400, 300, 384, 384),
        ("fixed", 333, 250, 224, 224),
        ("fixed", 60, 200, 59, 100),
        ("fixed", 97, 300, 40, 10),
    ]

    def noninteger(i, o):
        return i % o != 0

    # Both sides shrink by a non-integer factor.
    while sum(k == "shrink_both" for k, *_ in out) < 120:
        w, h = rng.randint(3, 400), rng.randint(3, 400)
        ow, oh = rng.randint(1, w - 1), rng.randint(1, h - 1)
        if noninteger(w, ow) and noninteger(h, oh):
            out.append(("shrink_both", w, h, ow, oh))
    # Integer shrink factors (equal or different per side).
    for _ in range(30):
        ow, oh = rng.randint(1, 100), rng.randint(1, 100)
        fx, fy = rng.randint(2, 8), rng.randint(2, 8)
        if rng.random() < 0.4:
            fy = fx
        ow, oh = min(ow, 400 // fx), min(oh, 400 // fy)
        out.append(("integer_shrink", ow * fx, oh * fy, ow, oh))
    # Upscale both sides.
    for _ in range(40):
        w, h = rng.randint(1, 150), rng.randint(1, 150)
        out.append(("upscale", w, h, rng.randint(w + 1, 400), rng.randint(h + 1, 400)))
    # One side up, the other down.
    for _ in range(60):
        a, b = rng.randint(2, 400), rng.randint(1, 200)
        down, up = rng.randint(1, a - 1), rng.randint(b + 1, 400)
        if rng.random() < 0.5:
            out.append(("mixed", a, b, down, up))
        else:
            out.append(("mixed", b, a, up, down))
    # Only one side changes (single pass).
    for _ in range(20):
        w, h = rng.randint(1, 400), rng.randint(1, 400)
        if rng.random() < 0.5:
            out.append(("one_side", w, h, rng.randint(1, 400), h))
        else:
            out.append(("one_side", w, h, w, rng.randint(1, 400)))
    # 1-pixel sides, in the input or the output.
    for _ in range(30):
        dims = [rng.randint(1, 400) for _ in range(4)]
        for i in rng.sample(range(4), rng.randint(1, 2)):
            dims[i] = 1
        out.append(("one_pixel", *dims))
    # Extreme aspect ratios.
    for _ in range(30):
        long, short = rng.randint(300, 1000), rng.randint(1, 8)
        olong, oshort = rng.randint(1, 8), rng.randint(20, 120)
        if rng.random() < 0.5:
            out.append(("extreme", long, short, olong, oshort))
        else:
            out.append(("extreme", short, long, oshort, olong))
    # Both sides shrink near Pillow 13's pass-order threshold (vertical first iff dh > 2 * dw > 0 ...).
    for _ in range(40):
        w = rng.randint(10, 400)
        ow = rng.randint(max(1, w - 120), w - 1)
        dw = w - ow
        dh = 2 * dw + rng.choice([-2, -1, 0, 1, 2])
        h = rng.randint(dh + 1, dh + 300)
        if dh >= 1:
            out.append(("order_threshold", w, h, ow, h - dh))
    return out


def main():
    if PIL.__version__.split(".")[0] != "13":
        sys.exit(f"Pillow 13 made the project's fixtures; this is {PIL.__version__}")
    rng = random.Random(20_14)
    rows = []
    for i, (kind, w, h, ow, oh) in enumerate(cases(rng)):
        seed = rng.getrandbits(53)  # exact in any JSON reader
        img = Image.frombytes("RGB", (w, h), splitmix64_bytes(seed, w * h * 3))
        res = img.resize((ow, oh), Image.BICUBIC)
        assert res.size == (ow, oh)
        rows.append([w, h, ow, oh, seed, kind, hashlib.sha256(res.tobytes()).hexdigest()])
    doc = {
        "about": "PIL Image.resize(BICUBIC) of splitmix64 noise images; made by scripts/pil-resize-cases.py",
        "pillow": PIL.__version__,
        "fields": ["in_w", "in_h", "out_w", "out_h", "seed", "kind", "sha256"],
        "cases": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=None, separators=(",", ":"))
    # One case per line keeps diffs readable.
    text = text.replace('"cases":[[', '"cases":[\n[').replace("],[", "],\n[")
    OUT.write_text(text + "\n")
    print(f"{len(rows)} cases -> {OUT}")


if __name__ == "__main__":
    main()
