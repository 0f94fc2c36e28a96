#!/usr/bin/env python3
"""Held-out metrics of pre-trained tiny X-VLM weights, computed by the official model code
(zengyan-97/X-VLM @ cb4fff1, `models.model_pretrain.XVLM`), for the learning comparison (issue 14).

    learn-eval.py --official X-VLM --config bench/tiny-learn/task.yaml --heldout /tmp/tinyheld \
        --weights RUN/final/model.safetensors [--weights official-1.pth ...] --out metrics.jsonl

Run with the official code's environment (../shared/bench/OFFICIAL-ENV.md). Every --weights file is loaded
into the same official model built from --config (xvlm's safetensors checkpoints use the official
per-tensor keys; an official runner's `--save` file is a torch state_dict); a key of the model that the file
lacks must be a non-parameter buffer that the model rebuilds (Swin's relative-position index, attention
masks), and a key the model lacks is an error. One json line per file goes to --out.

The held-out set is the pre-training shards of another synthetic corpus (`xvlm synth-data --seed 1`:
images the runs never saw, the same caption and region grammar), read with the training vocabulary
(the config's text_encoder). Images go through the official test_transform (bicubic resize to image_res,
ToTensor, the CLIP normalisation), texts through the official pre-training preprocess without masking
(pre_caption, [CLS] and at most max_tokens - 1 word-pieces, no [SEP]: add_eos is False there).
The metrics, fixed before any result was seen:

- Zero-shot retrieval by ITC (the vision_proj / text_proj features of the [CLS] tokens, cosine):
  i2t_r1, i2t_r5 (% of images whose best-ranked caption of theirs is within rank 1 / 5 of all captions),
  i2t_mean_rank (mean of that rank, 1-based), and t2i_r1, t2i_r5, t2i_mean_rank (each caption against
  all images). Ties are ranked in file order.
- Boxes, from `predict_bbox` on the whole image (as in the official region step) for every region of
  every held-out image, its text `attribute caption` as RegionTextJsonDataset builds it (the first
  attribute and caption where there are several): box_acc50 (% with IoU >= 0.5 against the true box)
  and box_miou (mean IoU, %).
- Masked words: every word-piece (not [CLS]) of every held-out caption masked alone ([MASK] in its place) and
  predicted by the MLM head attending to the image (`text_encoder(..., masked_pos)`): mlm_acc (% argmax
  equals the true token).
"""
import argparse
import base64
import glob
import io
import json
import os
import sys
import warnings

from official_support import build_without_weights, import_transformers_tokenizers, namespace, stub_unused_imports

METRICS = ["i2t_r1", "i2t_r5", "i2t_mean_rank", "t2i_r1", "t2i_r5", "t2i_mean_rank",
           "box_acc50", "box_miou", "mlm_acc"]


def import_official(root):
    sys.path.insert(0, root)
    namespace("dataset", f"{root}/dataset")
    stub_unused_imports()
    import_transformers_tokenizers()


def read_heldout(root):
    """(images as PIL, captions per image, regions per image: (text, [x, y, w, h] pixels)) from the
    pre-training shards of a synth-data corpus: image_text for captions, regions for boxes (same images,
    same order)."""
    from PIL import Image
    images, captions, regions = [], [], []
    for path in sorted(glob.glob(os.path.join(root, "pretrain", "regions", "*.jsonl"))):
        for line in open(path):
            ann = json.loads(line)
            images.append(Image.open(io.BytesIO(base64.b64decode(ann["binary"]))).convert("RGB"))
            regs = []
            for elem in ann["elems"]:
                cap = elem["caption"][0] if isinstance(elem["caption"], list) else elem["caption"]
                if "attributes" in elem:
                    attr = elem["attributes"][0] if isinstance(elem["attributes"], list) else elem["attributes"]
                    cap = attr + " " + cap
                regs.append((cap, elem["bb"]))
            regions.append(regs)
    for path in sorted(glob.glob(os.path.join(root, "pretrain", "image_text", "*.jsonl"))):
        for line in open(path):
            ann = json.loads(line)
            captions.append(ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]])
    assert len(captions) == len(images), "image_text and regions shards must hold the same images"
    return images, captions, regions


class Texts:
    """The official pre-training text preprocess without masking (dataset/pretrain_dataset.py)."""

    def __init__(self, config):
        from dataset.utils import pre_caption
        from transformers import BertTokenizer
        self.pre_caption = pre_caption
        self.tok = BertTokenizer.from_pretrained(config["text_encoder"])
        self.max_words, self.max_tokens = config["max_words"], config["max_tokens"]

    def ids(self, text):
        tokens = self.tok.tokenize(self.pre_caption(text, self.max_words))
        tokens = [self.tok.cls_token] + tokens[:self.max_tokens - 1]  # add_eos is False in pre-training
        return self.tok.convert_tokens_to_ids(tokens)

    def batch(self, id_lists):
        import torch
        n = max(len(i) for i in id_lists)
        ids = torch.tensor([i + [self.tok.pad_token_id] * (n - len(i)) for i in id_lists])
        atts = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in id_lists])
        return ids, atts


def iou(a, b):
    """IoU of cxcywh boxes (rows)."""
    import torch
    def xyxy(x):
        return torch.stack([x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2,
                            x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2], 1)
    a, b = xyxy(a), xyxy(b)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)
    return inter / (area(a) + area(b) - inter)


def evaluate(model, texts, pixels, captions, regions, sizes, chunk=128):
    import torch
    out = {}
    with torch.no_grad():
        embeds = torch.cat([model.get_vision_embeds(pixels[i:i + chunk])[0] for i in range(0, len(pixels), chunk)])
        atts = torch.ones(embeds.shape[:2], dtype=torch.long)
        image_feat = model.get_features(image_embeds=embeds)

        # Retrieval by ITC.
        cap_img = [i for i, caps in enumerate(captions) for _ in caps]
        cap_ids = [texts.ids(c) for caps in captions for c in caps]
        text_feat = []
        for i in range(0, len(cap_ids), chunk):
            ids, a = texts.batch(cap_ids[i:i + chunk])
            text_feat.append(model.get_features(text_embeds=model.get_text_embeds(ids, a)))
        sim = image_feat @ torch.cat(text_feat).t()  # images x captions
        cap_img_t = torch.tensor(cap_img)

        def rank_of(scores, target_mask):  # 1-based rank of the best target in each row, ties in file order
            order = scores.argsort(dim=1, descending=True, stable=True)
            hits = torch.gather(target_mask, 1, order)
            return hits.float().argmax(dim=1) + 1
        i2t = rank_of(sim, (cap_img_t.view(1, -1) == torch.arange(len(pixels)).view(-1, 1)).long())
        t2i = rank_of(sim.t(), (torch.arange(len(pixels)).view(1, -1) == cap_img_t.view(-1, 1)).long())
        for name, r in [("i2t", i2t), ("t2i", t2i)]:
            out[f"{name}_r1"] = 100 * (r <= 1).float().mean().item()
            out[f"{name}_r5"] = 100 * (r <= 5).float().mean().item()
            out[f"{name}_mean_rank"] = r.float().mean().item()

        # Boxes on the whole image.
        reg_img = [i for i, regs in enumerate(regions) for _ in regs]
        reg_ids = [texts.ids(t) for regs in regions for t, _ in regs]
        target = []
        for i, regs in enumerate(regions):
            w_img, h_img = sizes[i]
            for _, (x, y, w, h) in regs:
                target.append([(x + w / 2) / w_img, (y + h / 2) / h_img, w / w_img, h / h_img])
        target = torch.tensor(target)
        pred = []
        for i in range(0, len(reg_ids), chunk):
            ids, a = texts.batch(reg_ids[i:i + chunk])
            img = embeds[torch.tensor(reg_img[i:i + chunk])]
            pred.append(model.predict_bbox(img, model.get_text_embeds(ids, a), a))
        ious = iou(torch.cat(pred), target)
        out["box_acc50"] = 100 * (ious >= 0.5).float().mean().item()
        out["box_miou"] = 100 * ious.mean().item()

        # Masked words, one at a time.
        mask_id = texts.tok.mask_token_id
        rows, pos, truth, img_of = [], [], [], []
        for ids, img in zip(cap_ids, cap_img):
            for p in range(1, len(ids)):
                m = list(ids)
                m[p] = mask_id
                rows.append(m), pos.append(p), truth.append(ids[p]), img_of.append(img)
        correct = 0
        for i in range(0, len(rows), chunk):
            ids, a = texts.batch(rows[i:i + chunk])
            img = embeds[torch.tensor(img_of[i:i + chunk])]
            logits = model.text_encoder(ids, attention_mask=a, encoder_hidden_states=img,
                                        encoder_attention_mask=atts[:len(img)], return_dict=True,
                                        return_logits=True, masked_pos=torch.tensor(pos[i:i + chunk]).view(-1, 1))
            correct += (logits[:, 0].argmax(-1) == torch.tensor(truth[i:i + chunk])).sum().item()
        out["mlm_acc"] = 100 * correct / len(rows)
    out["counts"] = {"images": len(pixels), "captions": len(cap_ids), "regions": len(reg_ids),
                     "masked_words": len(rows)}
    return out


def load_weights(path):
    import torch
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu")
    return state.get("model", state) if isinstance(state, dict) else state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="the official X-VLM checkout")
    ap.add_argument("--config", required=True, help="the pre-training task config the weights were trained with")
    ap.add_argument("--heldout", required=True, help="a synth-data corpus the runs did not train on")
    ap.add_argument("--weights", action="append", required=True,
                    help="a .safetensors (xvlm) or torch.save state_dict (official runner --save); repeatable")
    ap.add_argument("--label", action="append", help="a name per --weights (default: the path)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", required=True, help="json lines, one per --weights")
    args = ap.parse_args()
    labels = args.label or args.weights
    if len(labels) != len(args.weights):
        ap.error("give one --label per --weights")

    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import ruamel.yaml as yaml
    config = yaml.load(open(args.config, "r"), Loader=yaml.Loader)
    config_dir = os.path.dirname(os.path.abspath(args.config))
    for key in ["vision_config", "text_config", "text_encoder"]:  # as the runner's patch 6
        p = config[key]
        if not os.path.isabs(p):
            beside = os.path.join(config_dir, p)
            config[key] = beside if os.path.exists(beside) else os.path.abspath(p)
    import_official(os.path.abspath(args.official))
    from torchvision import transforms
    from PIL import Image

    stdout, sys.stdout = sys.stdout, sys.stderr  # the official constructors print
    model = build_without_weights(config)
    model.eval()
    texts = Texts(config)
    sys.stdout = stdout
    test_transform = transforms.Compose([  # dataset/__init__.py: create_dataset's test_transform
        transforms.Resize((config["image_res"], config["image_res"]), interpolation=Image.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    images, captions, regions = read_heldout(args.heldout)
    pixels = torch.stack([test_transform(im) for im in images])
    sizes = [im.size for im in images]
    buffers = {k for k, _ in model.named_buffers()}
    with open(args.out, "w") as f:
        for label, path in zip(labels, args.weights):
            state = load_weights(path)
            msg = model.load_state_dict(state, strict=False)
            missing = [k for k in msg.missing_keys if k not in buffers]
            if missing or msg.unexpected_keys:
                sys.exit(f"{path}: missing parameters {missing[:5]}, unexpected keys {msg.unexpected_keys[:5]}")
            rec = {"label": label, "weights": path, **evaluate(model, texts, pixels, captions, regions, sizes)}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(label, " ".join(f"{k}={rec[k]:.2f}" for k in METRICS), flush=True)


if __name__ == "__main__":
    main()
