#!/usr/bin/env python3
"""The official X-VLM pre-training loop (zengyan-97/X-VLM @ cb4fff1, `Pretrain.main` -> `Pretrain.train`) on
one CPU process, every optimizer step written as a json line, then its iterations/s.

    official-pretrain-loop.py --official X-VLM --config bench/tiny-pretrain/task.yaml --iters 300 \
        --seed 42 --threads 2 --out official.jsonl

Run with the official code's environment (../shared/bench/OFFICIAL-ENV.md). The official code runs as it
is: create_dataset, the datasets, their collate_fn, the DataLoaders of Pretrain.main, the model,
create_optimizer, create_scheduler, reinit_scheduler_properties_mysched and the whole body of Pretrain.train
(a region step when `random.random() < iter_perc`, then the image-text step and scheduler.step). An
iteration is one pass of that loop (one image-text batch, plus a region batch iter_perc of the time), as
one step of xvlm's progress is.

What is patched for single-process offline CPU running, and nothing else:
1. Imports: the caption-metric, COCO and REFER modules that the `dataset` package imports at module level
   (vqaTools.vqaEval, refTools.evaluation.refEvaluation, refTools.refer_python3, pycocotools.coco,
   pycocoevalcap.eval) are empty modules, and a `tokenizers` stub is in place during the one
   transformers import that needs it (OFFICIAL-ENV.md). None of them is used by pre-training. `apex`
   (amp, parallel.DistributedDataParallel, convert_syncbn_model) is a placeholder module too, so that
   accelerators/apex_ddp_accelerator.py imports; its class is replaced (4).
2. torch.distributed: a single-process gloo group (file store), so the ITC all-gathers and the final
   barrier run as in the official code; RANK / WORLD_SIZE / SLURM_PROCID are removed from the environment
   so utils.init_distributed_mode takes its non-distributed branch (it would ask for CUDA and NCCL).
3. Weights: no pretrained weights exist, so `build_vision_encoder` runs with load_params=False and
   `BertForMaskedLM.from_pretrained` returns `cls(config)`, reporting the cross-attention keys missing (what
   a text-only BERT checkpoint lacks: they become `init_params`, trained at lr x lr_mult, as officially).
4. ApexDDPAccelerator (apex and CUDA) is replaced by its fp32 O0 equivalent at world 1: set_up seeds
   random / numpy / torch with RNG_SEED as it does (after the model is built) and returns model, optimizer
   and scheduler unwrapped (DDP and the broadcast are no-ops at world 1); backward_step is loss.backward()
   (apex's dynamic loss scale is a power of two capped at 1024: exact in fp32, the step is skipped only on
   an overflow); optimizer_step is clip_grad_norm_ over the optimizer's parameters (amp.master_params at O0).
5. Length: the image-text loader given to Pretrain.train ends the run after --iters batches (the official
   loop runs epochs x step_per_epoch iterations; the lr schedule is still the config's).
6. Files: relative paths in the config (vision_config, text_config, text_encoder, train_file[_regions]) are
   made absolute: against the config's folder when the file is there (xvlm's first rule), else against the
   starting directory (Pretrain.py's). Then the process works in --workdir, where the official loop writes
   log.txt; its output_dir is --workdir/output (checkpoints if ckpt_frequent is reached, and the copy of
   log.txt that Pretrain.main makes after a whole schedule: a different folder, as when Pretrain.py runs).
8. The end of a whole schedule: Pretrain.train's closing metric_logger.synchronize_between_processes
   all-reduces each meter's (count, total) in a CUDA tensor; here the same tensor is on the CPU (gloo).
   Only a run that trains the config's whole schedule (learn-compare.sh) gets there.
9. Recording, observers only: forward hooks on the model and a step post-hook on the optimizer read the
   losses the official step computed (.item(), as Pretrain.train does) and the lr the step used
   (param_groups[0]). The official prints go to stderr; stdout has the summary line only.

Recorded options (off by default; scripts/learn-compare.sh uses both):
- --rng-seed N replaces the config's accelerator RNG_SEED, with which set_up reseeds random / numpy / torch
  after the model is built: --seed alone changes only the initial weights, the data order, augmentation
  and region-step coins follow RNG_SEED (as in Pretrain.py). xvlm's job `seed` replaces RNG_SEED too.
- --save PATH writes `model.state_dict()` after the last iteration (torch.save, as the official
  checkpoints' 'model' entry, without the wrapping dict): the weights scripts/learn-eval.py evaluates.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import warnings

from official_support import Unused, build_without_weights, import_transformers_tokenizers, stub_unused_imports

LOSSES = {3: ["loss_itc", "loss_itm", "loss_mlm"],
          5: ["loss_itc", "loss_itm", "loss_mlm", "loss_bbox", "loss_giou"]}


class Done(Exception):
    """Raised by the image-text loader after --iters batches."""


def import_official(root):
    """Patch 1, then the official Pretrain module."""
    sys.path.insert(0, root)
    stub_unused_imports(extra=[("apex.parallel", "DistributedDataParallel")])
    sys.modules["apex"].amp = Unused
    sys.modules["apex.parallel"].convert_syncbn_model = Unused
    import_transformers_tokenizers()
    pretrain = importlib.import_module("Pretrain")
    cpu_meter_sync(importlib.import_module("utils"))
    return pretrain


def cpu_meter_sync(utils):
    """Patch 8: SmoothedValue.synchronize_between_processes with its tensor on the CPU."""
    import torch
    import torch.distributed as dist

    def synchronize_between_processes(self):
        if not utils.is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        dist.barrier()
        dist.all_reduce(t)
        t = t.tolist()
        self.count = int(t[0])
        self.total = t[1]

    utils.SmoothedValue.synchronize_between_processes = synchronize_between_processes


def single_process_group():
    """Patch 2."""
    import torch.distributed as dist
    for key in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"]:
        os.environ.pop(key, None)
    store = tempfile.NamedTemporaryFile(prefix="xvlm_gloo_", delete=False)
    store.close()
    os.unlink(store.name)
    dist.init_process_group("gloo", init_method="file://" + store.name, rank=0, world_size=1)


class CpuO0Accelerator:
    """Patch 4: ApexDDPAccelerator at FP16_OPT_LEVEL O0, world 1, fp32 on the CPU."""

    def __init__(self, cfg, logger):
        self.cfg = cfg

    def set_up(self, model, optimizer, lr_scheduler, local_rank, world_size, rank):
        import random
        import numpy as np
        import torch
        assert world_size == 1 and self.cfg.FP16_OPT_LEVEL == "O0", "CPU runs world 1, FP16_OPT_LEVEL O0"
        torch.backends.cudnn.benchmark = False
        random.seed(self.cfg.RNG_SEED)
        np.random.seed(self.cfg.RNG_SEED)
        torch.random.manual_seed(self.cfg.RNG_SEED)
        return model, optimizer, lr_scheduler

    def backward_step(self, loss, optimizer):
        loss.backward()

    def optimizer_step(self, optimizer, model, grad_norm):
        import torch
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return float(torch.nn.utils.clip_grad_norm_(params, grad_norm))


class Recorder:
    """Patch 9: one json line per optimizer step; the end time of each iteration (its image-text step)."""

    def __init__(self, out):
        self.out = out
        self.t0 = None
        self.iteration = 0
        self.ends = []  # wall time since t0 at the end of each iteration
        self.in_steps = 0.0

    def now(self):
        return time.perf_counter() - self.t0

    def forward_start(self, module, inputs):
        self.step_start = self.now()

    def forward_end(self, module, inputs, output):
        self.output = output

    def step_end(self, optimizer, args, kwargs):
        t = self.now()
        rec = {"iteration": self.iteration + 1, "step": "region" if len(self.output) == 5 else "image-text"}
        rec.update({k: v.item() for k, v in zip(LOSSES[len(self.output)], self.output)})
        rec["loss"] = sum(rec[k] for k in LOSSES[len(self.output)])
        rec.update(lr=optimizer.param_groups[0]["lr"], lr_large=optimizer.param_groups[2]["lr"],
                   time=t, step_s=t - self.step_start)
        self.in_steps += t - self.step_start
        self.out.write(json.dumps(rec) + "\n")
        if rec["step"] == "image-text":
            self.iteration += 1
            self.ends.append(t)
            self.out.flush()


def limited(loader, n, recorder):
    """Patch 5 (and the start of the clock): n batches of `loader`, then Done."""
    recorder.t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(n):
        yield next(it)
    raise Done


def absolute_paths(config, config_dir):
    """Patch 6."""
    def absolute(p):
        if "://" in p or os.path.isabs(p):
            return p
        beside = os.path.join(config_dir, p)
        return beside if os.path.exists(beside) else os.path.abspath(p)
    for key in ["vision_config", "text_config", "text_encoder"]:
        config[key] = absolute(config[key])
    for key in ["train_file", "train_file_regions"]:
        config[key] = [absolute(p) for p in config[key]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="the official X-VLM checkout")
    ap.add_argument("--config", required=True, help="an official pre-training task config")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--seed", type=int, default=42, help="Pretrain.py --seed")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (intra-op)")
    ap.add_argument("--warmup", type=int, default=10, help="iterations left out of the it/s")
    ap.add_argument("--out", required=True, help="json lines, one per optimizer step")
    ap.add_argument("--workdir", help="where the official loop writes log.txt (default: a new temp dir)")
    ap.add_argument("--rng-seed", type=int, help="replaces the config's accelerator RNG_SEED")
    ap.add_argument("--save", help="write the final model.state_dict() here (torch.save)")
    args = ap.parse_args()
    if args.iters <= args.warmup:
        ap.error("--iters must exceed --warmup")

    import torch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import ruamel.yaml as yaml
    config = yaml.load(open(args.config, "r"), Loader=yaml.Loader)  # as Pretrain.py
    absolute_paths(config, os.path.dirname(os.path.abspath(args.config)))
    if args.rng_seed is not None:
        config["accelerator"]["RNG_SEED"] = args.rng_seed
    save = os.path.abspath(args.save) if args.save else None
    out = open(os.path.abspath(args.out), "w")
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="official-pretrain-"))
    os.makedirs(workdir, exist_ok=True)

    pretrain = import_official(os.path.abspath(args.official))
    single_process_group()
    recorder = Recorder(out)
    built = []
    official_train, official_create_optimizer = pretrain.train, pretrain.create_optimizer

    def model_factory(config):
        model = build_without_weights(config)
        built.append(model)
        model.register_forward_pre_hook(recorder.forward_start)
        model.register_forward_hook(recorder.forward_end)
        return model

    def create_optimizer(arg_opt, model):
        optimizer = official_create_optimizer(arg_opt, model)
        optimizer.register_step_post_hook(recorder.step_end)
        return optimizer

    def train(model, general_loader, *rest):
        return official_train(model, limited(general_loader, args.iters, recorder), *rest)

    pretrain.XVLM = model_factory
    pretrain.ApexDDPAccelerator = CpuO0Accelerator
    pretrain.create_optimizer = create_optimizer
    pretrain.train = train
    main_args = argparse.Namespace(config=args.config, output_dir=os.path.join(workdir, "output"), seed=args.seed, device="cpu",
                                   distributed=True, world_size=1, dist_url="env://")
    os.makedirs(main_args.output_dir, exist_ok=True)
    os.chdir(workdir)
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        pretrain.main(main_args, config)
    except Done:
        pass
    finally:
        sys.stdout = stdout
        out.close()
    if save:
        torch.save(built[0].state_dict(), save)

    ends, w = recorder.ends, args.warmup
    timed = ends[-1] - ends[w - 1]
    print(f"official: it/s={(len(ends) - w) / timed:.3f} over iterations {w + 1}-{len(ends)} "
          f"({timed:.1f} s; the first {w} left out as warm-up); all {len(ends)} iterations "
          f"{ends[-1]:.1f} s, of which {recorder.in_steps:.1f} s in steps (forward to optimizer.step), "
          f"threads={torch.get_num_threads()}, losses in {args.out}", flush=True)


if __name__ == "__main__":
    main()
