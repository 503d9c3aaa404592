"""
Train TC-JEPA (or I-JEPA with --text_cond none) on the built-in `shapes` data, on COCO captions,
or on your own captioned images.

  python train.py                                   # CPU or one GPU, built-in data, no download
  torchrun train.py --dataset coco                  # COCO 2017 in data/coco, ViT-B/16 at 224
  torchrun --standalone --nproc_per_node=8 train.py --dataset coco --data_dir /data/coco
  torchrun train.py --dataset captions --data_dir DIR   # DIR/train.jsonl (+ val.jsonl), README

Every field of TrainConfig and TCJEPAConfig is a flag; a preset fills the fields not given
(`shapes` by default, `coco` with --dataset coco, `captions` with --dataset captions).
`python train.py --help` shows, for each flag, the value every preset uses. Exit codes (of each
process; torchrun reports its own): 0 finished, 75 stopped by a signal after saving a checkpoint
(resume with --resume auto), 74 a DataLoader worker died after saving (resume with fewer
--num_workers), 1 the user must act (the last line says what).

The phases, in the order a run calls them: config -> runtime (device, DDP, signals) -> data,
tokenizer, model -> the training step -> evaluation -> main, the loop. What main uses to keep a run
safe (out_dir and its lock, resume, atomic checkpoints, the log) comes last, as a library. The
probes that evaluation runs live in data.py (they take an encode function, not this state).
"""

import argparse
import dataclasses
import fcntl
import glob
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import tcjepa
from data import UserError
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks

# -----------------------------------------------------------------------------
# config: the training fields, the presets, the recipe that follows from the data, the command line


@dataclass
class TrainConfig:
    # data
    # "shapes" (built-in, no download), "coco" (COCO 2017 captions) or "captions" (your own: README)
    dataset: str = "shapes"
    data_dir: str = "data/coco"  # coco: the root of train2017/, val2017/, annotations/; captions: see README
    shapes_size: int = 20000  # number of training images of the built-in dataset
    shapes_layout: str = "grid3"  # "grid3" (1-4 objects, 3x3 grid) or "pairs" (2 shapes, one colour, 2x2)
    # shapes: "mixed" (grid3); "complement" or "substitute" (pairs; notes/experiments.md §7)
    shapes_captions: str = "mixed"
    tokenizer: str = ""  # an existing tokenizer.json; default: a fresh run trains one into out_dir
    num_workers: int = 0  # DataLoader workers per process; -1 = auto (this process's share of the CPU cores)
    # run
    out_dir: str = "out"  # checkpoint, log.jsonl and tokenizer go here
    max_steps: int = 1000  # optimizer steps; epochs > 0 replaces it
    batch_size: int = 64  # images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0  # everything random (init, data order, crops, captions, masks) derives from it
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: str = "auto"  # torch.compile the model: "auto" (= on for CUDA), "on", "off"
    resume: str = ""  # a checkpoint to continue from ("auto" = out_dir/ckpt.pt if present)
    overwrite: bool = False  # a fresh run may replace the run in out_dir (its checkpoint, log and tokenizer)
    # optimization (notes/paper.md §1.6: warmup + cosine lr, weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0)
    lr: float = 2e-3  # peak learning rate (I-JEPA: 1e-3 at batch 2048); lr_per_256 > 0 replaces it
    start_lr: float = 2e-4  # learning rate at step 0, rising linearly to lr; start_lr_per_256 > 0 replaces it
    lr_per_256: float = 0.0  # > 0: lr = lr_per_256 x global batch / 256, linear scaling (I-JEPA: 1.25e-4)
    start_lr_per_256: float = 0.0  # > 0: start_lr = start_lr_per_256 x global batch / 256 (I-JEPA: 2.5e-5)
    epochs: float = 0.0  # > 0: max_steps = epochs x train images / global batch
    warmup_epochs: float = 0.0  # > 0: warmup_steps = warmup_epochs x train images / global batch
    final_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.04  # at step 0, cosine to final_weight_decay (biases, norms: none)
    final_weight_decay: float = 0.4  # weight decay at the last step
    ema_start: float = 0.99  # EMA momentum at step 0 (I-JEPA 0.996; short runs need less, paper.md §5.2)
    ema_end: float = 0.99  # EMA momentum at the last step (I-JEPA 1.0)
    # logging, evaluation, checkpoints
    log_every: int = 25  # steps between log lines
    eval_every: int = 500  # steps between validation losses (true / shuffled / no captions) and probes
    save_every: int = 500  # steps between checkpoints (and one at the end)
    val_size: int = 256  # validation images for the fixed-mask losses
    probe_train: int = 2000  # train images the linear probes are fitted on (COCO: evenly spaced in train2017)
    # val images the probes score (shapes: at every evaluation; COCO, captions: the last one and --eval_only
    # use all)
    probe_val: int = 1000
    probe_words: int = 100  # COCO: the caption-word probe's K most frequent words (stop words left out)
    eval_only: bool = False  # only evaluate --resume's checkpoint (probes + val losses), then exit
    export: str = ""  # with --resume: write its target encoder for timm's VisionTransformer here, then exit
    # controls and ablations
    shuffle_captions: bool = False  # control: train with each image's captions taken from another image


# flags that take one of a few words (a typo must stop the run, not quietly select a default)
CHOICES = dict(dataset=("shapes", "coco", "captions"), device=("auto", "cpu", "cuda"),
               compile=("auto", "on", "off"),
               shapes_layout=data.LAYOUTS, shapes_captions=data.CAPTION_MODES, **tcjepa.CHOICES)
# numbers: an int must be >= 1 and a float >= 0 and finite, a range (two numbers) within [0, 1], except
# these (lowest, highest or None). Checked before anything is built, so no bad value fails deep in torch.
LIMITS = dict(num_workers=(-1, None), seed=(0, 2**63 - 1), warmup_steps=(0, None), ema_start=(0, 1),
              ema_end=(0, 1), width=(4, None), pred_width=(4, None), pred_depth=(0, None),
              vocab_size=(3, None), cond_layers=(-1, None), mlp_ratio=(0.01, None),
              cond_mlp_ratio=(0.01, None), target_aspect=(0.01, None), cos_temp=(1e-3, None))

# presets: (training fields, model fields) that fill what the command line does not give
# the paper's 0.1 / 0.5 hit the dead zone here (notes/experiments.md §3, §8)
SHAPES_MODEL = dict(sparse_coef=0.0, consist_coef=0.0)
VIT_B16 = {k: v for k, v in dataclasses.asdict(TCJEPAConfig.vit_b16()).items()
           if v != getattr(TCJEPAConfig, k)}
# I-JEPA's recipe (notes/paper.md §1.6), lr scaled to the global batch, length in epochs (notes/coco.md)
COCO_TRAIN = dict(dataset="coco", lr_per_256=1.25e-4, start_lr_per_256=2.5e-5, epochs=100, warmup_epochs=15,
                  ema_start=0.996, ema_end=1.0, batch_size=128, num_workers=-1, log_every=50, eval_every=5000,
                  save_every=1000)
# the paper's image-text recipe (notes/paper.md §2.3; its App. C.2): N = 8 sentences, 50 epochs, warmup 10
CAPTIONS_TRAIN = dict(COCO_TRAIN, dataset="captions", data_dir="data/captions", epochs=50, warmup_epochs=10)
CAPTIONS_MODEL = dict(VIT_B16, n_captions=8, max_words=32)
PRESETS = {
    "shapes": ({}, SHAPES_MODEL),  # the default for --dataset shapes
    "shapes_long": (dict(max_steps=4000, eval_every=500), SHAPES_MODEL),  # see notes/experiments.md §1
    "vit_b16": ({}, VIT_B16),  # the paper's ViT-B/16 at 224 px, on any data
    "coco": (COCO_TRAIN, VIT_B16),  # the default for --dataset coco: ViT-B/16 and I-JEPA's recipe
    "captions": (CAPTIONS_TRAIN, CAPTIONS_MODEL),  # the default for --dataset captions: the paper's setting
}
# a field given as a flag wins over the preset's rule that would replace it
REPLACED_BY = dict(max_steps="epochs", warmup_steps="warmup_epochs", lr="lr_per_256",
                   start_lr="start_lr_per_256")


def apply_preset(name, given):
    """(TrainConfig, TCJEPAConfig) of a preset, with the fields in `given` (flags) winning."""
    train_kw, model_kw = PRESETS[name]
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    off = {rule: 0.0 for field, rule in REPLACED_BY.items() if field in given and rule not in given}
    if "max_steps" in given and "warmup_epochs" not in given:  # a shortened run: its warmup in steps too
        off["warmup_epochs"] = 0.0
    tcfg = TrainConfig(**{**train_kw, **off, **{k: v for k, v in given.items() if k in tfields}})
    mcfg = TCJEPAConfig(**{**model_kw, **{k: v for k, v in given.items() if k not in tfields}})
    return tcfg, mcfg


def config_error(t, m):
    """The first flag value that would fail deep inside torch or train silently wrong, or None."""
    for cfg in (t, m):
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, (str, bool)):
                continue
            default = (0, 1) if isinstance(v, tuple) else (1 if isinstance(v, int) else 0, None)
            lo, hi = LIMITS.get(f.name, default)
            for x in (v if isinstance(v, tuple) else (v,)):  # NaN fails every comparison: caught here
                if not (math.isfinite(x) and x >= lo and (hi is None or x <= hi)):
                    bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
                    return f"--{f.name} must be {bound}, got {v}"
            if isinstance(v, tuple) and v[0] > v[1]:
                return f"--{f.name} takes a range low high, got {v[0]} {v[1]}"
    for k in ("width", "pred_width"):  # heads split the width; sin-cos positions take a quarter per sin/cos
        if getattr(m, k) % m.heads or getattr(m, k) % 4:
            return f"--{k} {getattr(m, k)} must be a multiple of --heads ({m.heads}) and of 4"
    if m.img_size % m.patch_size:
        return f"--img_size {m.img_size} must be a multiple of --patch_size {m.patch_size}"
    if m.text_cond == "cross" and m.pred_depth == 0:
        return "--text_cond cross needs a predictor layer: --pred_depth at least 1 (or --text_cond none)"
    if not (m.cond_layers == -1 or 1 <= m.cond_layers <= m.pred_depth):
        return f"--cond_layers must be -1 (all) or 1..{m.pred_depth} (--pred_depth), got {m.cond_layers}"
    if (t.shapes_layout == "pairs") != (t.shapes_captions != "mixed"):
        return "--shapes_captions: mixed goes with --shapes_layout grid3, complement or substitute with pairs"
    if t.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no GPU here: use --device cpu (or auto)"
    return None


def resolve_recipe(tcfg, n_train, world):
    """The fields that follow from the global batch and the dataset size (the linear scaling rule
    of MAE / DINO / I-JEPA: lr proportional to the global batch; length and warmup in epochs)."""
    G = tcfg.batch_size * world * tcfg.grad_accum
    kw = {}
    if tcfg.lr_per_256 > 0:
        kw["lr"] = tcfg.lr_per_256 * G / 256
    if tcfg.start_lr_per_256 > 0:
        kw["start_lr"] = tcfg.start_lr_per_256 * G / 256
    if tcfg.epochs > 0:
        kw["max_steps"] = max(1, math.ceil(tcfg.epochs * n_train / G))
    if tcfg.warmup_epochs > 0:
        kw["warmup_steps"] = round(tcfg.warmup_epochs * n_train / G)
    return dataclasses.replace(tcfg, **kw)


def field_comments(cls):
    """{field: its comment} from the dataclass source (the comment on the field's line, or the lines
    right above it): the one place where a reader of the code and --help both find a field's meaning."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("# "))
        elif m:
            out[m.group(1)] = m.group(2) or " ".join(above)
            above = []
        else:
            above = []
    return out


def default_text(name, configs):
    """'default X' for the shapes preset, then the presets that differ: 'default 0.0 (coco, vit_b16: 0.1)'.
    configs: {preset: (TrainConfig, TCJEPAConfig)} of every preset with no flag given."""
    values = {}
    for p, cfgs in configs.items():
        cfg = next(c for c in cfgs if hasattr(c, name))
        rule = REPLACED_BY.get(name)
        values[p] = f"from {rule}" if rule and getattr(cfg, rule) > 0 else getattr(cfg, name)
    others = {}
    for p, v in values.items():
        if v != values["shapes"]:
            others.setdefault(repr(v), []).append(p)
    extra = "; ".join(f"{', '.join(ps)}: {v.strip(chr(39))}" for v, ps in others.items())
    return f"default {values['shapes']!r}" + (f" ({extra})" if extra else "")


def _boolean(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of 60 flags
        raise UserError(f"{message} (python train.py --help lists every flag)")


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fills the fields no flag gives: shapes (default), shapes_long, vit_b16, coco "
                        "(default for --dataset coco), captions (default for --dataset captions)")
    configs = {name: apply_preset(name, {}) for name in PRESETS}  # for the help text: each preset's defaults
    for title, cls in (("training (TrainConfig)", TrainConfig),
                       ("model (TCJEPAConfig, tcjepa.py)", TCJEPAConfig)):
        group, comments = p.add_argument_group(title), field_comments(cls)
        for f in dataclasses.fields(cls):
            help = f"{comments.get(f.name, '')}; {default_text(f.name, configs)}".replace("%", "%%")
            if isinstance(f.default, tuple):  # ranges such as target_scale: two numbers
                group.add_argument(f"--{f.name}", type=float, nargs=2, metavar=("LOW", "HIGH"), help=help)
            else:
                kind = _boolean if isinstance(f.default, bool) else type(f.default)
                group.add_argument(f"--{f.name}", type=kind, choices=CHOICES.get(f.name), help=help)
    args = p.parse_args(argv)
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if v is not None and k != "preset"}
    preset = args.preset or {"coco": "coco", "captions": "captions"}.get(given.get("dataset"), "shapes")
    tcfg, mcfg = apply_preset(preset, given)
    problem = config_error(tcfg, mcfg)
    if problem:
        p.error(problem)
    return tcfg, mcfg


# -----------------------------------------------------------------------------
# runtime: where this process runs (device, DDP), and what a stop signal does


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device
    compile: bool  # decided once: --compile on, or auto on a GPU
    autocast: object  # bf16 autocast on CUDA, a no-op on the CPU
    cpu_group: object = None  # a gloo group for the stop flag (a CPU tensor: no GPU sync)
    stop_signal: str = None  # set by the signal handler

    @property
    def master(self):
        return self.rank == 0

    def print0(self, *a, **k):
        if self.master:
            print(*a, **k)


def setup(tcfg):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process."""
    use_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    ddp = "RANK" in os.environ
    rank, local_rank, world, cpu_group = 0, 0, 1, None
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 runs the COCO probes
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=1))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    compile = tcfg.compile == "on" or (tcfg.compile == "auto" and use_cuda)
    rt = Runtime(ddp, rank, local_rank, world, device, compile, autocast, cpu_group)
    for sig in (signal.SIGTERM, signal.SIGINT):  # save before exit instead of losing the run
        signal.signal(sig, lambda s, f: on_stop_signal(rt, s))
    return rt


def on_stop_signal(rt, sig):
    """A SIGTERM or SIGINT asks the loop to save and stop. SIGTERM stays caught: a scheduler and
    torchrun each send one, and the second must not kill a rank before it saves. A second SIGINT is
    not caught (a person's second Ctrl-C ends the process at once, e.g. during a long evaluation)."""
    rt.stop_signal = signal.Signals(sig).name
    if sig == signal.SIGINT:
        signal.signal(sig, signal.SIG_DFL)


def stop_requested(rt, local=False):
    """Did this process (a signal, or `local`), or under DDP any rank, ask to stop? The ranks ask
    every step: one all-reduce of one CPU number, far cheaper than a step (notes/perf.md), so a signal
    is acted on within one step (or after the evaluation in progress), inside torchrun's 30 s."""
    flag = torch.tensor(float(local or rt.stop_signal is not None))
    if rt.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=rt.cpu_group)
    return bool(flag)


def auto_workers():
    """DataLoader workers for one process: its share of the node's CPU cores, less one for itself
    (capped at 32). COCO decoding is the bottleneck (notes/perf.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGINT / SIGTERM: torchrun, SLURM and `kill -- -PGID` signal the
    whole process group, and a worker killed first would crash the trainer before it saves.
    (A worker still exits when the trainer does.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# data, tokenizer, model and optimizer


def datasets(tcfg, mcfg):
    if tcfg.dataset == "shapes":
        kw = dict(img_size=mcfg.img_size, seed=tcfg.seed, layout=tcfg.shapes_layout,
                  captions=tcfg.shapes_captions)
        return data.ShapesDataset("train", size=tcfg.shapes_size, **kw), data.ShapesDataset("val", **kw)
    if tcfg.dataset == "captions":
        return data.CaptionsDataset.splits(tcfg.data_dir, img_size=mcfg.img_size)
    return (data.CocoCaptions(tcfg.data_dir, "train", img_size=mcfg.img_size),
            data.CocoCaptions(tcfg.data_dir, "val", img_size=mcfg.img_size))


def choose_tokenizer(tcfg, mcfg, ckpt, resume, train_set):
    """A resumed run takes the checkpoint's own tokenizer; a fresh run trains one on its training
    captions, in memory (every rank gets the same: ids are sorted by count and word), unless
    --tokenizer. It is written to out_dir with the log, once the run is known to start."""
    if ckpt is not None:
        tokenizer = data.tokenizer_from_str(ckpt["tokenizer_json"], f"the checkpoint {resume}")
        if tcfg.tokenizer and data.load_tokenizer(tcfg.tokenizer).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--tokenizer {tcfg.tokenizer} is not the tokenizer {resume} was trained with: "
                            f"drop --tokenizer (the checkpoint carries its own)")
        return tokenizer
    if tcfg.tokenizer:
        return data.load_tokenizer(tcfg.tokenizer)
    return data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size)


def make_loader(train_set, collate, tcfg, rt, start_step):
    sampler = data.StepSampler(len(train_set), tcfg.batch_size, tcfg.seed, rt.rank, rt.world, start_step,
                               tcfg.grad_accum)
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=tcfg.num_workers, pin_memory=rt.device.type == "cuda",
                                       persistent_workers=tcfg.num_workers > 0,
                                       worker_init_fn=ignore_stop_signals)


def make_val_batches(val_set, collate, tcfg, mcfg):
    """Fixed val images with fixed masks: the same for every evaluation, and for every run of a seed
    and batch size (the masks are drawn per batch). Each image's "shuffled" captions are those of the
    next image of the whole set (a roll inside a batch of one would give an image its own)."""
    batches, n_val = [], min(tcfg.val_size, len(val_set))
    for i in range(0, n_val, tcfg.batch_size):
        b = collate([val_set[(j, 1000 + j)] for j in range(i, min(n_val, i + tcfg.batch_size))])
        # (len(b["images"]): COCO's unreadable images are dropped)
        b["ctx"], b["tgt"] = sample_masks(len(b["images"]), mcfg, data.seeded(tcfg.seed, 10**9, i))
        b["indices"] = torch.arange(i, min(n_val, i + tcfg.batch_size))  # (shapes: every item is readable)
        batches.append(b)
    sizes = [len(b["images"]) for b in batches]
    for k in ("tokens", "word_mask"):
        rolled = torch.cat([b[k] for b in batches]).roll(1, 0).split(sizes)
        for b, r in zip(batches, rolled):
            b[f"{k}_shuffled"] = r
    return batches


def build_model(mcfg, tcfg, rt):
    """The model (seeded: the random-init probe rebuilds the very same one) and AdamW with no weight
    decay on biases and norms (notes/paper.md §1.6)."""
    torch.manual_seed(tcfg.seed)
    model = TCJEPA(mcfg).to(rt.device)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=tcfg.lr, betas=(0.9, 0.999), fused=rt.device.type == "cuda")
    return model, opt


def restore(raw_model, opt, ckpt, tcfg, mcfg, rt, n_train):
    """Load a checkpoint into model and optimizer; the model and the dataset must match. Returns the
    next step."""
    unknown = [k for k in ckpt["model_config"] if not hasattr(mcfg, k)]
    if unknown:
        raise UserError(f"--resume: the checkpoint is from another version of the model (its field(s) "
                        f"{', '.join(unknown)} do not exist here): resume it with the code that wrote it "
                        f"(the first record of its log.jsonl names the commit)")
    diff = {k: v for k, v in ckpt["model_config"].items() if getattr(mcfg, k) != v}
    if diff:
        raise UserError(f"--resume: the checkpoint's model differs in {diff}: give the same model flags")
    t = ckpt["train_config"]
    changed = [k for k, v in t.items()
               if k not in ("resume", "eval_only", "overwrite") and getattr(tcfg, k, v) != v]
    if changed:
        rt.print0("resuming with changed training flags: " + ", ".join(
            f"{k} {t[k]!r} -> {getattr(tcfg, k)!r}" for k in changed))
    G = t["batch_size"] * t["grad_accum"] * ckpt["world"]
    if not tcfg.eval_only and G != tcfg.batch_size * tcfg.grad_accum * rt.world:
        raise UserError(f"--resume: the checkpoint was trained with a global batch of {t['batch_size']} x "
                        f"{ckpt['world']} processes x {t['grad_accum']} accum; keep it (e.g. --grad_accum) "
                        f"so that the schedule and the data order stay the same")
    if ckpt.get("n_train", n_train) != n_train and not tcfg.eval_only:
        rt.print0(f"warning: the training set has {n_train} images, the checkpoint's run had "
                  f"{ckpt['n_train']}: the data order from here differs from the uninterrupted run's (the "
                  f"resume is not exact)")
    raw_model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"] + 1


def wrap(raw_model, rt):
    """torch.compile, then DDP around the compiled model (nanoGPT's order; dynamo still splits the
    graph at DDP's buckets, so the all-reduce overlaps the backward); buffers are constant: no
    broadcast. Checkpoints and the EMA use the raw model (no "_orig_mod." keys)."""
    model = torch.compile(raw_model) if rt.compile else raw_model
    if rt.ddp:
        ids = [rt.local_rank] if rt.device.type == "cuda" else None
        model = DDP(model, device_ids=ids, broadcast_buffers=False)
    return model


# -----------------------------------------------------------------------------
# the training step (notes/paper.md §1.6 schedules)


def schedules(step, t):
    """lr: linear warmup start_lr -> lr, then cosine to final_lr; weight decay: cosine
    weight_decay -> final_weight_decay; EMA momentum: linear ema_start -> ema_end."""
    frac = step / max(1, t.max_steps)
    if step < t.warmup_steps:
        lr = t.start_lr + (t.lr - t.start_lr) * step / t.warmup_steps
    else:
        p = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        lr = t.final_lr + 0.5 * (t.lr - t.final_lr) * (1 + math.cos(math.pi * p))
    wd = t.final_weight_decay + 0.5 * (t.weight_decay - t.final_weight_decay) * (1 + math.cos(math.pi * frac))
    momentum = t.ema_start + (t.ema_end - t.ema_start) * frac
    return lr, wd, momentum


# what TCJEPA.forward returns, logged every step
LOSSES = ("loss", "loss_pred", "loss_sparse", "loss_consist", "pos_frac", "pos_cos", "attn_entropy")


def train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt):
    """One optimizer step of grad_accum micro-steps. Returns dict(values: {name: device scalar}, the
    LOSSES averaged over the micro-steps and the gradient norm, all left on the device (no host
    sync); n_img: images of all processes; shapes: the last (Nc, Nt); data_wait: seconds blocked on
    the loader). A non-finite step still updates the weights in memory: the loop looks at the values
    at its next check point and then logs and saves nothing of it or after it."""
    lr, wd, momentum = schedules(step, tcfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd
    values, n_img, data_wait = dict.fromkeys(LOSSES, 0.0), 0, 0.0
    for micro in range(tcfg.grad_accum):
        t_wait = time.perf_counter()
        batch = next_batch()
        data_wait += time.perf_counter() - t_wait
        B = batch["images"].size(0)
        ctx, tgt = sample_masks(B, mcfg, data.seeded(tcfg.seed, step, rt.rank, micro, 3))  # CPU: no GPU sync
        images, tokens, wm, ctx, tgt = (x.to(rt.device, non_blocking=True) for x in
                                        (batch["images"], batch["tokens"], batch["word_mask"], ctx, tgt))
        if tcfg.shuffle_captions:  # control: every image gets the captions of its neighbour
            tokens, wm = tokens.roll(1, 0), wm.roll(1, 0)
        if rt.compile:  # block sizes change per batch: one compiled graph for all of them
            torch._dynamo.mark_dynamic(ctx, 1)
            torch._dynamo.mark_dynamic(tgt, 2)
        if rt.ddp:  # all-reduce gradients on the last micro-step only (nanoGPT's idiom)
            model.require_backward_grad_sync = micro == tcfg.grad_accum - 1
        with rt.autocast:
            out = model(images, ctx, tgt, tokens, wm)
        (out["loss"] / tcfg.grad_accum).backward()
        for k in LOSSES:
            values[k] = values[k] + out[k].detach().float() / tcfg.grad_accum
        n_img += B * rt.world
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    values["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    opt.step()
    opt.zero_grad(set_to_none=True)
    raw_model.update_target(momentum)  # the raw model: DDP and compile wrap forward only
    return dict(values=values, n_img=n_img, shapes=(ctx.size(1), tgt.size(2)), data_wait=data_wait)


# -----------------------------------------------------------------------------
# evaluation: does the predictor use the text, and is the frozen target encoder any good?


@torch.no_grad()
def val_losses(raw_model, val_batches, device, autocast):
    """Prediction loss on fixed val images and fixed masks with the true captions, captions shuffled
    across images (make_val_batches), and no captions: the cheapest sign that the text is used
    (notes/paper.md §2.5)."""
    sums = dict(true=0.0, shuffled=0.0, none=0.0)
    n_total = sum(len(b["images"]) for b in val_batches)
    for b in val_batches:
        images, tokens, wm, ctx, tgt, tok_s, wm_s = (b[k].to(device) for k in (
            "images", "tokens", "word_mask", "ctx", "tgt", "tokens_shuffled", "word_mask_shuffled"))
        variants = dict(true=(tokens, wm), shuffled=(tok_s, wm_s), none=(tokens, torch.zeros_like(wm)))
        for name, (tok, w) in variants.items():
            with autocast:
                sums[name] += raw_model(images, ctx, tgt, tok, w)["loss_pred"].item() * len(images) / n_total
    return sums


def probe_results(raw_model, train_set, val_set, val_batches, tokenizer, probe_data, tcfg, rt, last):
    """The dataset's probes on the frozen target encoder (data.py), and on the shapes data the grounding
    of the conditioners' patch-word similarities; {} for COCO without its instances files."""
    def encode(images):
        with rt.autocast:
            return raw_model.encode(images.to(rt.device))

    def text_scores(images, ctx, tgt, tokens, word_mask):  # O and attention, for the grounding probe
        with rt.autocast:
            out = raw_model.predict(*(x.to(rt.device) for x in (images, ctx, tgt, tokens, word_mask)),
                                    return_attention=True)
        return out["sims"].float(), out["attention"].float()

    m = raw_model.cfg
    if tcfg.dataset == "captions":
        n_val = len(val_set) if last else tcfg.probe_val
        return data.captions_probes(encode, val_set, n_val, tcfg.num_workers, ignore_stop_signals)
    if tcfg.dataset == "coco":
        if probe_data is None:
            return {}
        n_val = len(probe_data.val) if last else tcfg.probe_val
        return data.coco_probes(encode, probe_data, n_val, tcfg.num_workers, ignore_stop_signals)
    res = data.shapes_probes(encode, train_set, val_set, tcfg.probe_train, m.patch_size, tcfg.probe_val)
    if m.text_cond == "cross" and m.text_pool == "word":
        res.update(data.grounding_probe(text_scores, val_batches, val_set, tokenizer, m.patch_size))
    return res


@torch.no_grad()
def evaluate(raw_model, eval_data, tcfg, rt, step, last):
    """Validation losses on every rank (they are cheap), probes on rank 0 while the others wait at a
    CPU barrier (no NCCL collective pending, so no NCCL timeout). Returns the record (rank 0 logs it)."""
    raw_model.eval()
    v = val_losses(raw_model, eval_data["val_batches"], rt.device, rt.autocast)
    rec = dict(step=step, val_true=v["true"], val_shuffled=v["shuffled"], val_none=v["none"])
    if rt.master:
        t0 = time.time()
        rec.update(probe_results(raw_model, **eval_data, tcfg=tcfg, rt=rt, last=last))
        rec["probe_s"] = time.time() - t0
    if rt.ddp:
        dist.barrier(group=rt.cpu_group)
    raw_model.train()
    return rec


def init_probes(mcfg, tcfg, eval_data, rt):
    """The same probes on the very same encoder at initialization (random features are a strong
    baseline), to print beside the trained ones."""
    init, _ = build_model(mcfg, tcfg, rt)
    init.eval()
    return probe_results(init, **eval_data, tcfg=tcfg, rt=rt, last=True)


DEAD_ZONE = 1e-3  # pos_frac below this for a whole log window: the rectified text losses have no gradient


def dead_zone(pos_max, mcfg):
    weighted = mcfg.sparse_coef > 0 or mcfg.consist_coef > 0
    return mcfg.text_cond == "cross" and mcfg.sim_mode != "attention" and weighted and pos_max < DEAD_ZONE


def dead_zone_warning(mcfg, since, done):
    return (f"warning: pos_frac stayed below {DEAD_ZONE} over steps {since + 1}-{done}: every patch-word "
            f"cosine is negative, so the sparsity and consistency losses (--sparse_coef "
            f"{mcfg.sparse_coef:g} --consist_coef {mcfg.consist_coef:g}) have gone inert (notes/paper.md "
            f"§2.5: the loss has a free minimum there); the two --sim_mode remedies tried did not keep them "
            f"alive either (notes/experiments.md §9); 0 turns the losses off")


# -----------------------------------------------------------------------------
# main: the phases of a run

EXIT_STOPPED = 75  # stopped by a signal after saving: resume (EX_TEMPFAIL, "try again later")
EXIT_WORKER_DIED = 74  # a DataLoader worker died (most often out of memory), saved: resume with fewer workers
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for the MFU in the log


def peak_flops(rt):
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def describe(tcfg, mcfg, train_set, raw_model, rt):
    """The effective configuration in a few lines (every field is in the first record of log.jsonl)."""
    t, m = tcfg, mcfg
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    G = t.batch_size * rt.world * t.grad_accum
    text = "text_cond none (I-JEPA)" if m.text_cond == "none" else (
        f"text_cond cross, {m.n_captions} captions x {m.max_words} words, lambda {m.sparse_coef:g} beta "
        f"{m.consist_coef:g}, sim_mode {m.sim_mode}")
    lines = [f"{t.dataset}: {len(train_set)} train images, {t.num_workers} loader workers | {rt.world} x "
             f"{rt.device.type} | batch {t.batch_size} x {rt.world} x {t.grad_accum} accum = {G} | torch "
             f"{torch.__version__}",
             f"{t.max_steps} steps = {t.max_steps * G / len(train_set):.1f} epochs, lr {t.lr:g} (warmup "
             f"{t.warmup_steps} from {t.start_lr:g}, cosine to {t.final_lr:g}), weight decay "
             f"{t.weight_decay:g} -> {t.final_weight_decay:g}, EMA {t.ema_start:g} -> {t.ema_end:g}, compile "
             f"{'on' if rt.compile else 'off'}",
             f"model {n_params / 1e6:.2f}M trainable params: ViT {m.width}x{m.depth} ({m.heads} heads), "
             f"patch {m.patch_size} at {m.img_size} px, predictor {m.pred_width}x{m.pred_depth} | {text}"]
    if t.warmup_steps >= t.max_steps:
        lines.append(f"note: the warmup ({t.warmup_steps} steps) is as long as the run: the lr never peaks")
    return "\n".join(lines)


def main(argv=None):
    """One run. Returns the exit code (0 finished, EXIT_STOPPED after a signal, EXIT_WORKER_DIED);
    raises UserError when the user must act."""
    tcfg, mcfg = parse_args(argv)
    if tcfg.num_workers < 0:
        tcfg = dataclasses.replace(tcfg, num_workers=auto_workers())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in DataLoader workers
    if tcfg.export:  # reads a checkpoint, writes one file: no run, no out_dir
        if not tcfg.resume:
            raise UserError("--export needs --resume <checkpoint>: the run whose encoder to export")
        resume = os.path.join(tcfg.out_dir, "ckpt.pt") if tcfg.resume == "auto" else tcfg.resume
        print(export_for_timm(load_checkpoint(resume), tcfg.export))
        return 0
    rt = setup(tcfg)
    prepare_out_dir(tcfg.out_dir)
    with out_dir_lock(tcfg.out_dir, rt):  # nothing in out_dir is touched before the lock is held
        try:
            return run(tcfg, mcfg, rt)
        except RuntimeError as e:  # a probe loader's worker died outside the loop: the checkpoint is intact
            rt.print0(worker_died_line(dead_worker(e, rt), "as it was", tcfg))
            return EXIT_WORKER_DIED


def run(tcfg, mcfg, rt):
    """The phases of a run, holding out_dir's lock."""
    # ---- what is in out_dir: a checkpoint to resume, or a run that a fresh start must not replace
    out, ckpt_path = tcfg.out_dir, os.path.join(tcfg.out_dir, "ckpt.pt")
    log_path = os.path.join(out, "log.jsonl")
    resume, own = from_rank0(lambda: what_to_resume(tcfg), rt)  # own: this run writes out_dir's log
    ckpt = load_checkpoint(resume) if resume else None
    trained_on = ckpt["train_config"]["dataset"] if ckpt is not None else tcfg.dataset
    if trained_on != tcfg.dataset:  # its tokenizer is of that data
        raise UserError(f"--resume: the checkpoint was trained on --dataset {trained_on}, with its "
                        f"tokenizer; give --dataset {trained_on}, or start a fresh run")

    # ---- data, tokenizer, model, optimizer (all validated before the log is touched)
    train_set, val_set = datasets(tcfg, mcfg)
    tcfg = resolve_recipe(tcfg, len(train_set), rt.world)
    tokenizer = choose_tokenizer(tcfg, mcfg, ckpt, resume, train_set)
    if tokenizer.get_vocab_size() > mcfg.vocab_size:
        mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.get_vocab_size())
    if mcfg.text_cond == "cross":
        data.check_captions(train_set, tokenizer)
    collate = data.Collate(tokenizer, mcfg.n_captions, mcfg.max_words)
    raw_model, opt = build_model(mcfg, tcfg, rt)
    start_step = restore(raw_model, opt, ckpt, tcfg, mcfg, rt, len(train_set)) if ckpt is not None else 0
    model = wrap(raw_model, rt)
    rt.print0(describe(tcfg, mcfg, train_set, raw_model, rt))
    if ckpt is not None:
        rt.print0(f"resumed from {resume} at step {start_step}")

    # ---- what the log says: an evaluation a stop skipped (or final results) is done below
    finished = start_step >= tcfg.max_steps
    recs = from_rank0(lambda: read_log(log_path)[0], rt) if ckpt is not None and own else []
    logged = {r["step"]: r for r in recs if "val_true" in r}
    has_init = any("init_probes" in r for r in recs)
    due = start_step % tcfg.eval_every == 0 or finished
    pending = ckpt is not None and own and due and start_step not in logged and not tcfg.eval_only
    if finished and not (pending or tcfg.eval_only) and has_init:
        rt.print0(f"{resume} has already finished its {tcfg.max_steps} steps: nothing to train "
                  f"(--eval_only true evaluates it; a larger --max_steps trains on)")
        return 0

    # ---- evaluation data: fixed val batches with fixed masks; the COCO probes' images, read once
    probe_data = None
    if tcfg.dataset == "coco" and rt.master:
        probe_data = data.coco_probe_data(tcfg.data_dir, train_set, val_set, tcfg.probe_train,
                                          tcfg.probe_words, mcfg.img_size, mcfg.patch_size)
    val_batches = make_val_batches(val_set, collate, tcfg, mcfg)
    eval_data = dict(train_set=train_set, val_set=val_set, val_batches=val_batches, tokenizer=tokenizer,
                     probe_data=probe_data)
    loader = make_loader(train_set, collate, tcfg, rt, start_step)  # (checks the batch against the data)

    # ---- everything is validated: the run's files. A fresh log; a resumed one loses what came after ckpt
    if rt.master and not tcfg.eval_only:
        if ckpt is None:  # (--overwrite: the previous run's checkpoint goes with its log)
            if os.path.lexists(ckpt_path):
                os.remove(ckpt_path)
            open(log_path, "w").close()
            tokenizer.save(os.path.join(out, "tokenizer.json"))
        else:
            trim_log(log_path, start_step)
        append_log(log_path, dict(config=dict(train=dataclasses.asdict(tcfg), model=dataclasses.asdict(mcfg)),
                                  start_step=start_step, world=rt.world, code=code_version()))
    final = logged.get(start_step)
    if tcfg.eval_only or pending:
        final = evaluate(raw_model, eval_data, tcfg, rt, start_step, last=finished or tcfg.eval_only)
        if rt.master:
            if own:  # (--eval_only of another folder's checkpoint only prints)
                append_log(log_path, final)
            print(eval_line(final))

    # ---- the training loop: a step per iteration; at a check point (log, eval or save due, or a stop)
    # the ranks agree on the window's values and finiteness, then log, save, evaluate
    data_iter = iter(loader) if not finished else None
    bar = tqdm(total=tcfg.max_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout) \
        if rt.master else None
    say = bar.write if bar else rt.print0  # a line of its own, never onto the progress bar's line
    last_good = f"{resume} (step {start_step})" if ckpt is not None else "none"
    stopping, worker_died, warned = False, None, False
    window, since, t0 = [], start_step, time.time()  # the steps' outputs since the last check point
    for step in ([] if tcfg.eval_only else range(start_step, tcfg.max_steps)):
        try:
            window.append(train_step(step, model, raw_model, opt, lambda: next(data_iter), tcfg, mcfg, rt))
        except RuntimeError as e:
            worker_died = dead_worker(e, rt)
            opt.zero_grad(set_to_none=True)  # this step did not happen: the weights are those after the last
        done = since + len(window)
        if bar and not worker_died:
            bar.update(1)
        stopping = stop_requested(rt, local=worker_died is not None)
        log_due = done % tcfg.log_every == 0 or done == tcfg.max_steps
        eval_due = done % tcfg.eval_every == 0 or done == tcfg.max_steps
        save_due = done % tcfg.save_every == 0 or done == tcfg.max_steps
        if not (stopping or log_due or eval_due or save_due):
            continue
        if window:  # ---- one tensor of the window's values (steps x names), averaged over ranks
            names = list(window[0]["values"])
            vals = torch.stack([torch.stack([w["values"][k] for k in names])
                                for w in window])  # (steps, names)
            if rt.ddp:
                dist.all_reduce(vals, op=dist.ReduceOp.AVG)
            finite = (vals[:, 0].isfinite() & vals[:, names.index("grad_norm")].isfinite()).tolist()
            if not all(finite):  # nothing after a non-finite step is logged or saved
                bad = since + 1 + finite.index(False)
                raise UserError(f"loss, gradient or weights not finite at step {bad}: stopped, nothing after "
                                f"step {bad - 1} was saved. Last good checkpoint: {last_good}. Lower --lr "
                                f"(now {tcfg.lr:g}) and resume from it with --resume, or start again")
            rec = log_record(done, names, vals, window, t0, tcfg, raw_model, rt)
            if not warned and dead_zone(vals[:, names.index("pos_frac")].max().item(), mcfg):
                say(dead_zone_warning(mcfg, since, done))
                warned = True
            if rt.master:
                append_log(log_path, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        window, since = [], done
        if (save_due or stopping) and done > start_step:  # before the evaluation: a stop cannot cost it
            if not all_finite(raw_model.state_dict(), opt.state_dict()):  # the same on every rank
                raise UserError(f"weights not finite after step {done}: stopped, nothing was saved. Last "
                                f"good checkpoint: {last_good}. Lower --lr (now {tcfg.lr:g}) and resume "
                                f"from it")
            if rt.master:
                save_checkpoint(ckpt_path, raw_model, opt, tcfg, mcfg, done - 1, tokenizer, rt.world,
                                len(train_set))
            if rt.ddp:  # no rank exits (and makes torchrun kill rank 0) before the file is written
                dist.barrier(group=rt.cpu_group)
            last_good = f"{ckpt_path} (step {done})"
        if stopping:
            break
        if eval_due:
            try:
                final = evaluate(raw_model, eval_data, tcfg, rt, done, last=done == tcfg.max_steps)
            except RuntimeError as e:  # a probe loader's worker died: the resumed run does this evaluation
                worker_died = dead_worker(e, rt)
                if rt.master and not save_due and done > start_step:
                    save_checkpoint(ckpt_path, raw_model, opt, tcfg, mcfg, done - 1, tokenizer, rt.world,
                                    len(train_set))
                stopping = True
                break
            if rt.master:
                append_log(log_path, final)
                say(eval_line(final))
        t0 = time.time()  # evaluation and saving are not step time
    if bar:
        bar.close()

    # ---- the end: what stopped the run, or the probes at initialization beside the trained ones
    if stopping and (rt.stop_signal or not worker_died):
        rt.print0(f"{rt.stop_signal or 'a stop on another rank'}: saved {last_good}; continue with --resume "
                  f"auto (exit code {EXIT_STOPPED})")
        return EXIT_STOPPED
    if stopping:
        rt.print0(worker_died_line(worker_died, last_good, tcfg))
        return EXIT_WORKER_DIED
    if rt.master:
        init = init_probes(mcfg, tcfg, eval_data, rt)
        if own:
            append_log(log_path, dict(step=0, init_probes=init))
        if final is None:  # a finished run completed by its resume: its last evaluation is in the log
            final = {**logged.get(tcfg.max_steps, {})}
        print(probe_table(final, init, tcfg))
        print(f"finished {tcfg.max_steps} steps. checkpoint: {ckpt_path}\nlog: {log_path}")
    return 0


# torch's words for a DataLoader worker that died (a worker that raised says "in DataLoader worker process")
DEAD_WORKER = re.compile(r"DataLoader worker \(pid")


def worker_died_line(died, last_good, tcfg):
    go_on = ("continue with --resume auto" if last_good != "none" else
             "nothing was saved (no step finished): start again with --overwrite true")
    return (f"error: {died}; last checkpoint: {last_good}. A DataLoader worker is most often killed for "
            f"memory: lower --num_workers (now {tcfg.num_workers}) and {go_on} (exit code "
            f"{EXIT_WORKER_DIED})")


def dead_worker(e, rt):
    """The first line of a RuntimeError that says a DataLoader worker died; any other error is raised
    again. Under DDP the other ranks wait for this one in the gradient all-reduce: stop them all."""
    if not DEAD_WORKER.search(str(e)):
        raise e
    if rt.ddp:
        raise UserError(f"{str(e).splitlines()[0]}: under torchrun the other ranks cannot go on; the last "
                        f"checkpoint is kept: lower --num_workers and continue with --resume auto")
    return str(e).splitlines()[0]


def log_record(done, names, vals, window, t0, tcfg, raw_model, rt):
    """The log line at step `done` (1-based): the window's mean values and its speed."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    dt, imgs, peak = time.time() - t0, sum(w["n_img"] for w in window), peak_flops(rt)
    lr, wd, momentum = schedules(done - 1, tcfg)
    # FLOPs at the (Nc, Nt) of the last batch; data_wait_ms ~0: the loader keeps up
    flops = raw_model.flops_per_image(*window[-1]["shapes"]) * imgs / dt / rt.world
    return dict(step=done, **dict(zip(names, vals.mean(0).tolist())), lr=lr, momentum=momentum,
                weight_decay=wd, ms_per_step=1000 * dt / len(window), img_per_s=imgs / dt,
                mfu=flops / peak if peak else None,
                data_wait_ms=1000 * sum(w["data_wait"] for w in window) / len(window))


def eval_line(rec):
    return f"step {rec['step']}: " + " | ".join(f"{k} {x:.4f}" for k, x in rec.items()
                                                  if k != "step" and isinstance(x, float))


def probe_table(final, init, tcfg):
    """Each probe at initialization beside its trained value ('' without probes; nan where a probe had
    nothing to score, logged as null)."""
    num = lambda x: x if isinstance(x, (int, float)) else float("nan")  # noqa: E731
    rows = [f"{k:<18}{num(x):>12.4f}{num(final.get(k)):>10.4f}" for k, x in init.items()
            if isinstance(x, (int, float, type(None)))]
    head = (f"\nlinear probes on the frozen target encoder ({tcfg.dataset} val):\n"
            f"{'probe':<18}{'random init':>12}{'trained':>10}")
    return "\n".join([head] + rows) if rows else ""


def cli(argv=None):
    """main() with its failures turned into an exit code and one line."""
    try:
        return main(argv)
    except UserError as e:  # from a DataLoader worker it comes wrapped in its traceback: keep the last line
        print("error: " + str(e).strip().splitlines()[-1].removeprefix("data.UserError: "), file=sys.stderr)
        e.__traceback__ = None
    except Exception as e:
        traceback.print_exc()
        e.__traceback__ = None
    # Dropping the traceback frees main()'s frames, and with them the DataLoader, which shuts its workers
    # down cleanly now. Left to the garbage collector at exit, the workers (which ignore SIGTERM, see
    # ignore_stop_signals) would never be stopped and the process would hang after an error.
    return 1


# -----------------------------------------------------------------------------
# checkpoints and the log: out_dir, its lock, resume, atomic saves, the log (the library main uses)


def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out_dir {path} is not a writable folder ({e.strerror}): give another "
                        f"--out_dir") from None


@contextmanager
def out_dir_lock(path, rt):
    """One writer per out_dir: rank 0 holds an exclusive lock on out_dir/.lock for the run's life (the
    OS releases it on any death, so a kill -9 leaves no stale lock). A second process learns who
    holds it, changes nothing and stops; under DDP every rank stops with it."""
    f, who = None, "another process"
    if rt.master:
        f = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            f.write(f"process {os.getpid()} on {socket.gethostname()} since {since}\n")
            f.flush()
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or who
            f.close()
            f = None
    held = f is not None if rt.master else True
    if rt.ddp:  # the ranks agree: all go on, or all stop
        flag = torch.tensor(float(held))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=rt.cpu_group)
        held = bool(flag)
    if not held:
        raise UserError(f"--out_dir {path} is in use by {who}: wait for that run to end, or give another "
                        f"--out_dir")
    try:
        yield
    finally:
        if f is not None:
            f.close()


def run_in(path):
    """What a previous run left in out_dir: '' if nothing, else e.g. 'ckpt.pt (step 500), log.jsonl'."""
    found = []
    ckpt, log = os.path.join(path, "ckpt.pt"), os.path.join(path, "log.jsonl")
    if os.path.lexists(ckpt):
        try:
            step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"] + 1
            found.append(f"ckpt.pt (step {step})")
        except Exception:
            found.append("ckpt.pt")
    if os.path.exists(log) and os.path.getsize(log) > 0:
        found.append("log.jsonl")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        found.append("tokenizer.json")
    return ", ".join(found)


def what_to_resume(tcfg):
    """(the checkpoint to resume or "", whether this run owns out_dir's log: a fresh run, or a resume of
    out_dir's own checkpoint), or one line when out_dir holds a run that this one would mix with."""
    out = tcfg.out_dir
    ckpt_path, held = os.path.join(out, "ckpt.pt"), run_in(out)
    remove_stale_temps(out)
    resume = tcfg.resume
    if resume == "auto":
        if os.path.lexists(ckpt_path) and not os.path.exists(ckpt_path):
            raise UserError(f"--resume auto: {ckpt_path} is a dangling link; restore it, or give --resume "
                            f"<checkpoint>")
        resume = ckpt_path if os.path.exists(ckpt_path) else ""
        if not resume and held:
            raise UserError(f"--resume auto: {out} holds {held} but no ckpt.pt: nothing to continue from; "
                            f"restore ckpt.pt, give another --out_dir, or --overwrite true to start over")
    if tcfg.eval_only and not resume:
        raise UserError("--eval_only needs --resume <checkpoint>")
    own = not resume or os.path.realpath(resume) == os.path.realpath(ckpt_path)
    if held and not own and not tcfg.eval_only:
        raise UserError(f"--out_dir {out} holds a run ({held}) and --resume names another run's checkpoint: "
                        f"give an empty --out_dir to continue that one, or --resume auto to continue this "
                        f"one")
    if held and not resume and not tcfg.overwrite:
        raise UserError(f"--out_dir {out} holds a run ({held}): continue it with --resume auto, give "
                        f"another --out_dir, or add --overwrite true to start over there")
    return resume, own


def from_rank0(fn, rt):
    """fn() on rank 0, its result (or its UserError) sent to every rank: decisions about the disk are
    made once, so the ranks cannot disagree (nodes may see a shared disk at different moments)."""
    box = [None]
    if rt.master:
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", str(e))]
    if rt.ddp:
        dist.broadcast_object_list(box, src=0, group=rt.cpu_group)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value if rt.master else f"{value} (rank 0)")
    return value


def remove_stale_temps(path):
    """Temp files of saves that a kill -9 cut short (no other process writes here: we hold the lock)."""
    for tmp in glob.glob(os.path.join(glob.escape(path), "*.tmp")):
        os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint that train.py wrote, or one line saying why this file is not one."""
    if not os.path.isfile(path):
        raise UserError(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, garbage: torch raises several kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"--resume {path}: not a readable checkpoint ({reason}); give the ckpt.pt of a run, "
                        f"or none to start fresh") from None
    needed = {"model", "optimizer", "model_config", "train_config", "step"}
    if not (isinstance(ckpt, dict) and needed <= set(ckpt)):
        raise UserError(f"--resume {path}: not a train.py checkpoint (no model / optimizer / config / step); "
                        f"give the ckpt.pt of a run")
    if "tokenizer_json" not in ckpt:
        raise UserError(f"--resume {path} carries no tokenizer: it is from another version of train.py; "
                        f"resume it with that version, or start fresh")
    return ckpt


def all_finite(*state_dicts):
    """Every floating tensor in these (nested) state dicts is finite."""
    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
    return all(bool(torch.isfinite(t).all()) for sd in state_dicts for t in tensors(sd)
               if t.is_floating_point())


def save_checkpoint(path, raw_model, opt, tcfg, mcfg, step, tokenizer, world, n_train):
    """Atomic: a temp file named for this process, then a rename over the old one (a kill never
    leaves half a file). The tokenizer travels inside (its json). A failed write (disk full) removes
    the temp file, keeps the previous checkpoint and stops with one line."""
    state = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), step=step,
                 train_config=dataclasses.asdict(tcfg), model_config=dataclasses.asdict(mcfg),
                 tokenizer_json=tokenizer.to_str(), world=world, n_train=n_train,
                 rng=torch.get_rng_state())  # (all training randomness comes from seeded generators)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        where = os.path.dirname(path) or "."
        raise UserError(f"could not save {path} at step {step + 1} ({str(e).splitlines()[0][:100]}); the "
                        f"previous checkpoint is kept: free space in {where} and resume with --resume "
                        f"{path}") from None


def _json_safe(x):
    """NaN and inf -> None: log.jsonl stays strict JSON (a probe with nothing to score gives NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def append_log(path, rec):
    """One line, written whole or not at all: a failed write (disk full) is cut back off the file.
    Unbuffered, so that what reached the disk is known and can be truncated."""
    line = (json.dumps(_json_safe(rec), allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
    except OSError as e:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise UserError(f"could not write {path} ({e.strerror}): free space in "
                        f"{os.path.dirname(path) or '.'} and resume with --resume auto") from None
    finally:
        os.close(fd)


def read_log(path):
    """The records of a log.jsonl (dicts with an int step or none), and how many lines were damaged (cut
    short by a kill or a full disk, foreign bytes, not a record) and left out."""
    recs, bad = [], 0
    if not os.path.exists(path):
        return recs, bad
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, UnicodeError):
                r = None
            if isinstance(r, dict) and isinstance(r.get("step", 0), int):
                recs.append(r)
            elif line.strip():
                bad += 1
    return recs, bad


def trim_log(path, step):
    """Resuming at `step`: drop the records a killed run wrote after its checkpoint, the probes at
    initialization that a finished run wrote last (the resumed run writes them again when it ends),
    and damaged lines (said so)."""
    recs, bad = read_log(path)
    if bad:
        print(f"warning: {path}: {bad} damaged line(s) left out")
    keep = [json.dumps(r) + "\n" for r in recs if r.get("step", 0) <= step and "init_probes" not in r]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def export_for_timm(ckpt, path):
    """The checkpoint's TARGET encoder (what the paper evaluates) as a state dict for timm's
    VisionTransformer with no class token and average pooling (the layout of timm's I-JEPA weights):
    the same block names, the patch embedding under patch_embed.proj, and the fixed sin-cos table as
    pos_embed (a parameter in timm, loaded like the weights). Returns the lines that load it."""
    m = TCJEPAConfig(**ckpt["model_config"])
    model = TCJEPA(m)
    model.load_state_dict(ckpt["model"])
    sd = {k.replace("patch_embed.", "patch_embed.proj.", 1): v for k, v in model.target.state_dict().items()}
    sd["pos_embed"] = model.target.pos[None].clone()  # (1, N, D), raster order, as timm adds it
    try:
        torch.save(sd, path)
    except OSError as e:
        raise UserError(f"--export {path}: could not write it ({e.strerror})") from None
    kw = (f"img_size={m.img_size}, patch_size={m.patch_size}, in_chans={m.in_chans}, embed_dim={m.width}, "
          f"depth={m.depth}, num_heads={m.heads}, mlp_ratio={m.mlp_ratio}, class_token=False, "
          f'global_pool="avg", fc_norm=False, num_classes=0')
    return (f"wrote the target encoder to {path}; load it with timm (the head count matters: a wrong one "
            f"loads silently and computes something else):\n"
            f"import timm, torch\n"
            f"model = timm.models.vision_transformer.VisionTransformer({kw})\n"
            f"model.load_state_dict(torch.load({str(path)!r}))\n"
            f"features = model.forward_features(images)  # (B, {m.grid ** 2}, {m.width}) patch features; "
            f"model(images): (B, {m.width}) pooled")


def code_version():
    """The git commit of this file and whether tracked files differ from it ("unknown" outside a
    checkout), for the first log record: a log names the code that made it."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        def git(*a):
            return subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return dict(commit=git("rev-parse", "HEAD"), dirty=dirty, torch=torch.__version__)
    except (OSError, subprocess.SubprocessError):
        return dict(commit="unknown", dirty="unknown", torch=torch.__version__)


if __name__ == "__main__":
    sys.exit(cli())
