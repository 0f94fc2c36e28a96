#!/usr/bin/env python3
"""What the official pre-training region path (RegionTextJsonDataset + its collate_fn, with the official
box_transform) feeds the model, batch by batch, in the json-lines layout of `xvlm region-stats`.

    region-stats-official.py --official X-VLM --config task.yaml --texts 10000 --seed 0 --out official.jsonl

Run with the official code's environment (../shared/bench/OFFICIAL-ENV.md). Only the dataset module and
its transform are imported: the caption-metric and COCO packages the `dataset` package imports at module
level are replaced by empty modules.
"""
import argparse
import importlib
import json
import random
import sys

from official_support import (autocontrast_intended, import_transformers_tokenizers, namespace,
                              sharpness_intended, stub_unused_imports)


def import_official(root):
    sys.path.insert(0, root)
    namespace("dataset", f"{root}/dataset")
    namespace("utils", f"{root}/utils")
    stub_unused_imports()
    import_transformers_tokenizers()
    pretrain = importlib.import_module("dataset.pretrain_dataset")
    randaugment = importlib.import_module("dataset.randaugment")
    return pretrain, randaugment


def box_transform(randaugment):
    # dataset/__init__.py: create_dataset's box_transform.
    from torchvision import transforms
    normalize = transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                     (0.26862954, 0.26130258, 0.27577711))
    return transforms.Compose([
        randaugment.RandomAugment(2, 7, isPIL=True,
                                  augs=['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness']),
        transforms.ToTensor(),
        normalize,
    ])


def use_intended_ops(randaugment):
    """The ablation: AutoContrast and Sharpness with the arithmetic their authors meant (xvlm's), not
    the official uint8 wraps (`-low` of a numpy uint8 wraps to 256 - low; Sharpness casts unclipped)."""
    official_sharpness = randaugment.sharpness_func

    def sharpness(img, factor):
        if factor in (0.0, 1.0):
            return official_sharpness(img, factor)
        return sharpness_intended(img, factor)

    randaugment.func_dict["AutoContrast"] = lambda img, cutoff=0: autocontrast_intended(img)
    randaugment.func_dict["Sharpness"] = sharpness


def record(batch):
    images, idx_to_group_img = batch[0], batch[1]
    image_atts, target_bbox, is_image = batch[7], batch[8], batch[9]
    patches = image_atts.shape[1] - 1
    cover = image_atts[:, 1:].float().sum(1) / patches
    flat = images.flatten(1).double()
    texts = [
        {"img": int(idx_to_group_img[t]), "is_image": int(is_image[t]),
         "box": [float(v) for v in target_bbox[t]], "cov": float(cover[t])}
        for t in range(len(is_image))
    ]
    imgs = [{"mean": float(m), "std": float(s)} for m, s in zip(flat.mean(1), flat.std(1))]
    return {"texts": texts, "images": imgs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="the official X-VLM checkout")
    ap.add_argument("--config", required=True, help="an official-format pre-training task config")
    ap.add_argument("--texts", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--intended-ops", action="store_true",
                    help="ablation: AutoContrast and Sharpness without the official uint8 wraps")
    args = ap.parse_args()

    import torch
    import yaml
    pretrain, randaugment = import_official(args.official)
    if args.intended_ops:
        use_intended_ops(randaugment)
    config = yaml.safe_load(open(args.config))
    # Pretrain.py joins the file lists before create_dataset.
    config["train_file_regions"] = ",".join(config["train_file_regions"])
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset = pretrain.RegionTextJsonDataset(
        config, config["train_file_regions"], rank=0, world_size=1, shuffle=True, repeat=True,
        transform=None, box_transform=box_transform(randaugment))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config["regions"]["max_images"], num_workers=0,
        collate_fn=dataset.collate_fn)
    texts = 0
    with open(args.out, "w") as out:
        for batch in loader:
            rec = record(batch)
            out.write(json.dumps(rec) + "\n")
            texts += len(rec["texts"])
            if texts >= args.texts:
                break
    print(f"{texts} texts written to {args.out}")


if __name__ == "__main__":
    main()
