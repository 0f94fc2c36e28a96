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
import types


def empty_module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def namespace(name, path):
    """A package whose __init__ is not run (its heavy imports are not needed here)."""
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def import_official(root):
    sys.path.insert(0, root)
    namespace("dataset", f"{root}/dataset")
    namespace("utils", f"{root}/utils")
    placeholder = type("Unused", (), {})
    for name, attr in [
        ("vqaTools.vqaEval", "VQAEval"),
        ("refTools.evaluation.refEvaluation", "RefEvaluation"),
        ("pycocotools.coco", "COCO"),
        ("pycocoevalcap.eval", "COCOEvalCap"),
    ]:
        parent = name.rsplit(".", 1)[0]
        if parent not in sys.modules:
            empty_module(parent).__path__ = []
        empty_module(name, **{attr: placeholder})
    # transformers 4.12.5 (installed without its `tokenizers<0.11`, which has no Python 3.11 wheel)
    # imports a few `tokenizers` names when a slow tokenizer loads; they are never used by it.
    # Keep transformers' own "is it installed" checks answering no while the stub is in place.
    importlib.import_module("transformers.file_utils").is_tokenizers_available = lambda: False
    stub = empty_module("tokenizers", Encoding=placeholder, Tokenizer=placeholder, Regex=placeholder)
    stub.__path__ = []
    for sub in ["decoders", "normalizers", "pre_tokenizers", "processors"]:
        setattr(stub, sub, empty_module(f"tokenizers.{sub}", Decoder=placeholder))
    empty_module("tokenizers.trainers", BpeTrainer=placeholder, UnigramTrainer=placeholder,
                 WordLevelTrainer=placeholder, WordPieceTrainer=placeholder)
    empty_module("tokenizers.models", BPE=placeholder, Unigram=placeholder, WordPiece=placeholder)
    importlib.import_module("transformers.models.auto.tokenization_auto")
    for name in [n for n in sys.modules if n == "tokenizers" or n.startswith("tokenizers.")]:
        del sys.modules[name]
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
    import numpy as np

    def autocontrast(img, cutoff=0):
        def channel(ch):
            high, low = int(ch.max()), int(ch.min())
            if high <= low:
                return ch
            table = (np.arange(256) - low) * (255 / (high - low))
            return table.clip(0, 255).astype(np.uint8)[ch]
        return np.stack([channel(img[:, :, c]) for c in range(img.shape[2])], axis=-1)

    official_sharpness = randaugment.sharpness_func

    def sharpness(img, factor):
        if factor in (0.0, 1.0):
            return official_sharpness(img, factor)
        kernel = np.ones((3, 3), dtype=np.float32)
        kernel[1][1] = 5
        kernel /= 13
        degenerate = randaugment.cv2.filter2D(img, -1, kernel).astype(np.float32)[1:-1, 1:-1, :]
        out = img.astype(np.float32)
        out[1:-1, 1:-1, :] = degenerate + factor * (out[1:-1, 1:-1, :] - degenerate)
        return out.clip(0, 255).astype(np.uint8)

    randaugment.func_dict["AutoContrast"] = autocontrast
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
