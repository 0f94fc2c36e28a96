#!/usr/bin/env python3
"""Reference rate of the standard PyTorch pre-training pipeline, to compare with `xvlm bench-data`.

PIL decode + torchvision RandomResizedCrop(res, scale=(0.2, 1.0), bicubic) + RandomHorizontalFlip +
RandAugment(2, 7) + ToTensor + Normalize, one process, one thread. Needs torch, torchvision and Pillow
(not installed by the project). Usage: scripts/bench_torch_pipeline.py DIR [--res 224] [--n 500]
"""
import argparse
import glob
import io
import os
import time

import torch
from PIL import Image
from torchvision import transforms

p = argparse.ArgumentParser()
p.add_argument("images")
p.add_argument("--res", type=int, default=224)
p.add_argument("--n", type=int, default=500)
a = p.parse_args()
torch.set_num_threads(1)
files = sorted(glob.glob(os.path.join(a.images, "*.jpg")))
blobs = [open(f, "rb").read() for f in files]
t = transforms.Compose([
    transforms.RandomResizedCrop(a.res, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.RandomHorizontalFlip(),
    transforms.RandAugment(2, 7),
    transforms.ToTensor(),
    transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])
start, cpu0 = time.perf_counter(), time.process_time()
for i in range(a.n):
    img = Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
    t(img)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
print(f"{a.n / wall:.1f} images/s per thread ({a.n / cpu:.1f} images per CPU-second)")
