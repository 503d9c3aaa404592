"""
Train TC-JEPA (or I-JEPA with --text_cond none) on the built-in `shapes` data or on COCO captions.

  python train.py                                   # CPU or one GPU, built-in data, no download
  torchrun train.py --dataset coco                  # COCO 2017 in data/coco, ViT-B/16 at 224
  torchrun --standalone --nproc_per_node=8 train.py --dataset coco --data_dir /data/coco

Every field of TrainConfig and TCJEPAConfig is a flag; a preset fills the fields not given
(`shapes` by default, `coco` with --dataset coco). `python train.py --help` shows, for each flag,
the value every preset uses. Exit codes (of each process; torchrun reports its own): 0 finished,
75 stopped by a signal after saving a checkpoint (resume with --resume), 1 failed (the last line
says why).
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tcjepa
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks

# -----------------------------------------------------------------------------
# configuration: the training fields, their valid values, the presets


@dataclass
class TrainConfig:
    # data
    dataset: str = "shapes"  # "shapes" (built-in, no download) or "coco" (COCO 2017 captions)
    data_dir: str = "data/coco"  # COCO root with train2017/, val2017/, annotations/
    shapes_size: int = 20000  # number of training images of the built-in dataset
    shapes_layout: str = "grid3"  # shapes: "grid3" (1-4 objects, 3x3 grid) or "pairs" (2 shapes, one colour, 2x2)
    shapes_captions: str = "mixed"  # shapes: "mixed" (grid3); "complement" or "substitute" (pairs; notes/experiments.md §7)
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
    # optimization (notes/paper.md §1.6: warmup + cosine lr, weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0)
    lr: float = 2e-3  # peak learning rate (I-JEPA: 1e-3 at batch 2048); lr_per_256 > 0 replaces it
    start_lr: float = 2e-4  # learning rate at step 0, rising linearly to lr; start_lr_per_256 > 0 replaces it
    lr_per_256: float = 0.0  # > 0: lr = lr_per_256 x global batch / 256, the linear scaling rule (I-JEPA: 1.25e-4)
    start_lr_per_256: float = 0.0  # > 0: start_lr = start_lr_per_256 x global batch / 256 (I-JEPA: 2.5e-5)
    epochs: float = 0.0  # > 0: max_steps = epochs x train images / global batch
    warmup_epochs: float = 0.0  # > 0: warmup_steps = warmup_epochs x train images / global batch
    final_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.04  # at step 0, cosine to final_weight_decay (biases, norms: none)
    final_weight_decay: float = 0.4  # weight decay at the last step
    ema_start: float = 0.99  # EMA momentum at step 0 (I-JEPA 0.996; short runs need less, notes/paper.md §5.2)
    ema_end: float = 0.99  # EMA momentum at the last step (I-JEPA 1.0)
    # logging, evaluation, checkpoints
    log_every: int = 25  # steps between log lines
    eval_every: int = 500  # steps between validation losses (true / shuffled / no captions) and probes
    save_every: int = 500  # steps between checkpoints (and one at the end)
    val_size: int = 256  # validation images for the fixed-mask losses
    probe_train: int = 2000  # train images the linear probes are fitted on (COCO: evenly spaced over train2017)
    probe_val: int = 1000  # COCO: val2017 images the probes score at each evaluation; the last one and --eval_only use all
    probe_words: int = 100  # COCO: the caption-word probe's K most frequent words (stop words left out)
    eval_only: bool = False  # only evaluate --resume's checkpoint (probes + val losses), then exit
    bench: int = 0  # > 0: time this many steps after bench_warmup untimed ones, print, exit
    bench_warmup: int = 10  # untimed steps before --bench (compilation happens here)
    bench_one_batch: bool = False  # --bench: every step reuses one batch (the step alone, no loader)
    # controls and ablations
    shuffle_captions: bool = False  # control: train with each image's captions taken from another image


# flags that take one of a few words (a typo must stop the run, not quietly select a default)
CHOICES = dict(dataset=("shapes", "coco"), device=("auto", "cpu", "cuda"), compile=("auto", "on", "off"),
               shapes_layout=data.LAYOUTS, shapes_captions=data.CAPTION_MODES, **tcjepa.CHOICES)

# numeric ranges, (lowest, highest) inclusive, None = unbounded; checked before anything is built
RANGES = dict(
    shapes_size=(1, None), num_workers=(-1, None), max_steps=(1, None), batch_size=(1, None), grad_accum=(1, None),
    seed=(0, None), lr=(0, None), start_lr=(0, None), final_lr=(0, None), warmup_steps=(0, None),
    weight_decay=(0, None), final_weight_decay=(0, None), ema_start=(0, 1), ema_end=(0, 1), log_every=(1, None),
    eval_every=(1, None), save_every=(1, None), val_size=(1, None), probe_train=(1, None), probe_val=(1, None),
    probe_words=(1, None), bench=(0, None), bench_warmup=(0, None), lr_per_256=(0, None), start_lr_per_256=(0, None),
    epochs=(0, None), warmup_epochs=(0, None),
    img_size=(1, None), patch_size=(1, None), in_chans=(1, None), width=(4, None), depth=(1, None), heads=(1, None),
    mlp_ratio=(0.01, None), pred_width=(4, None), pred_depth=(0, None), n_targets=(1, None), target_scale=(0, 1),
    target_aspect=(0.01, None), context_scale=(0, 1), min_keep=(1, None), vocab_size=(3, None), max_words=(1, None),
    n_captions=(1, None), text_width=(1, None), sparse_coef=(0, None), consist_coef=(0, None), cond_layers=(-1, None),
    cond_mlp_ratio=(0.01, None), cos_temp=(1e-3, None))

# presets: (training fields, model fields) that fill what the command line does not give
SHAPES_MODEL = dict(sparse_coef=0.0, consist_coef=0.0)  # the paper's 0.1 / 0.5 hit the dead zone here (notes/experiments.md §3)
VIT_B16 = {k: v for k, v in dataclasses.asdict(TCJEPAConfig.vit_b16()).items() if v != getattr(TCJEPAConfig, k)}
# I-JEPA's recipe (notes/paper.md §1.6) with lr scaled to the global batch; length in epochs (COCO: notes/coco.md)
COCO_TRAIN = dict(dataset="coco", lr_per_256=1.25e-4, start_lr_per_256=2.5e-5, epochs=100, warmup_epochs=15,
                  ema_start=0.996, ema_end=1.0, batch_size=128, num_workers=-1, log_every=50, eval_every=5000,
                  save_every=1000)
PRESETS = {
    "shapes": ({}, SHAPES_MODEL),  # the default for --dataset shapes
    "shapes_long": (dict(max_steps=4000, eval_every=500), SHAPES_MODEL),  # where I-JEPA clearly learns shape (notes/experiments.md §1)
    "vit_b16": ({}, VIT_B16),  # the paper's ViT-B/16 at 224 px, on any data
    "coco": (COCO_TRAIN, VIT_B16),  # the default for --dataset coco: ViT-B/16 and I-JEPA's recipe
}


# a field given as a flag wins over the preset's rule that would replace it
REPLACED_BY = dict(max_steps="epochs", warmup_steps="warmup_epochs", lr="lr_per_256", start_lr="start_lr_per_256")


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
        for k, (lo, hi) in RANGES.items():
            if not hasattr(cfg, k):
                continue
            v = getattr(cfg, k)
            for x in (v if isinstance(v, tuple) else (v,)):  # NaN fails every comparison: caught here
                if isinstance(x, bool) or not (math.isfinite(x) and x >= lo and (hi is None or x <= hi)):
                    return f"--{k} must be {f'in [{lo}, {hi}]' if hi is not None else f'at least {lo}'}, got {v}"
            if isinstance(v, tuple) and v[0] > v[1]:
                return f"--{k} takes a range low high, got {v[0]} {v[1]}"
    for k in ("width", "pred_width"):  # heads split the width; sin-cos positions take a quarter per sin/cos axis
        if getattr(m, k) % m.heads or getattr(m, k) % 4:
            return f"--{k} {getattr(m, k)} must be a multiple of --heads ({m.heads}) and of 4"
    if m.img_size % m.patch_size:
        return f"--img_size {m.img_size} must be a multiple of --patch_size {m.patch_size}"
    if m.text_cond == "cross" and m.pred_depth == 0:
        return "--text_cond cross needs a predictor layer to condition: --pred_depth at least 1 (or --text_cond none)"
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


# -----------------------------------------------------------------------------
# command line: generated from the two config dataclasses


def _boolean(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def field_comments(cls):
    """{field: its comment} from the dataclass source: the comment on the field's line, or else the
    comment lines right above it."""
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


def default_text(name):
    """'default X' for the shapes preset, then the presets that differ: 'default 0.0 (coco, vit_b16: 0.1)'."""
    values = {}
    for p in PRESETS:
        cfg = next(c for c in apply_preset(p, {}) if hasattr(c, name))
        rule = REPLACED_BY.get(name)
        values[p] = f"from {rule}" if rule and getattr(cfg, rule) > 0 else getattr(cfg, name)
    others = {}
    for p, v in values.items():
        if v != values["shapes"]:
            others.setdefault(repr(v), []).append(p)
    extra = "; ".join(f"{', '.join(ps)}: {v.strip(chr(39))}" for v, ps in others.items())
    return f"default {values['shapes']!r}" + (f" ({extra})" if extra else "")


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of 50 flags
        sys.exit(f"error: {message} (python train.py --help lists every flag)")


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fills the fields no flag gives: shapes (default), shapes_long, vit_b16, coco (default for --dataset coco)")
    for title, cls in (("training (TrainConfig)", TrainConfig), ("model (TCJEPAConfig, tcjepa.py)", TCJEPAConfig)):
        group, comments = p.add_argument_group(title), field_comments(cls)
        for f in dataclasses.fields(cls):
            help = f"{comments.get(f.name, '')}; {default_text(f.name)}".replace("%", "%%")
            if isinstance(f.default, tuple):  # ranges such as target_scale: two numbers
                group.add_argument(f"--{f.name}", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help=help)
            else:
                kind = _boolean if isinstance(f.default, bool) else type(f.default)
                group.add_argument(f"--{f.name}", type=kind, choices=CHOICES.get(f.name), default=None, help=help)
    args = p.parse_args(argv)
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if v is not None and k != "preset"}
    preset = args.preset or ("coco" if given.get("dataset") == "coco" else "shapes")
    tcfg, mcfg = apply_preset(preset, given)
    problem = config_error(tcfg, mcfg)
    if problem:
        p.error(problem)
    return tcfg, mcfg


# -----------------------------------------------------------------------------
# schedules (notes/paper.md §1.6), seeds, the step sampler


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


def seeded(*parts):
    """A CPU generator for one (seed, step, rank, ...) tuple: runs resume exactly, ranks differ."""
    h = 0
    for x in parts:
        h = (h * 1_000_003 + int(x)) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


class StepSampler:
    """Batches of (index, sample_seed) for steps start, start+1, ...: each epoch is a permutation
    drawn from (seed, epoch), split across ranks as DistributedSampler does, so a resumed run sees
    exactly the batches the uninterrupted one would have seen."""

    def __init__(self, n, batch_size, seed, rank, world, start_step, micro_steps):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start = start_step * micro_steps
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise data.DataError(f"batch size {batch_size} x {world} processes is larger than the dataset "
                                 f"({n} images): lower --batch_size")

    def __iter__(self):
        i, epoch_of_perm = self.start, None
        while True:
            epoch, k = divmod(i, self.per_epoch)
            if epoch != epoch_of_perm:  # one shuffle per epoch
                perm, epoch_of_perm = torch.randperm(self.n, generator=seeded(self.seed, epoch)), epoch
            lo = (k * self.world + self.rank) * self.bs
            seeds = torch.randint(0, 2**31 - 1, (self.bs,), generator=seeded(self.seed, i, self.rank, 7))
            yield list(zip(perm[lo:lo + self.bs].tolist(), seeds.tolist()))
            i += 1


# -----------------------------------------------------------------------------
# where this process runs: distributed setup, device, signals


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
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 runs the COCO probes
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=1))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    rt = Runtime(ddp, rank, local_rank, world, device, tcfg.compile == "on" or (tcfg.compile == "auto" and use_cuda),
                 autocast, cpu_group)
    for sig in (signal.SIGTERM, signal.SIGINT):  # save before exit instead of losing the run
        signal.signal(sig, lambda s, f: on_stop_signal(rt, s))
    return rt


def on_stop_signal(rt, sig):
    """The first SIGTERM / SIGINT asks the loop to save and stop; a second one is not caught (it ends
    the process at once, e.g. a second Ctrl-C during a long evaluation)."""
    rt.stop_signal = signal.Signals(sig).name
    signal.signal(sig, signal.SIG_DFL)


def stop_requested(rt):
    """Did this process, or (under DDP) any rank, get a stop signal? The ranks ask every step: one
    all-reduce of one CPU number, far cheaper than a step (notes/perf.md), so a signal is acted on
    within one step (or after the evaluation in progress), inside torchrun's 30 s before it kills."""
    if not rt.ddp:
        return rt.stop_signal is not None
    flag = torch.tensor(float(rt.stop_signal is not None))
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
# checkpoints and the log


def prepare_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise data.DataError(f"--out_dir {path} is not a writable folder ({e.strerror}): give another --out_dir") from None


def load_checkpoint(path):
    """A checkpoint that train.py wrote, or one line saying why this file is not one."""
    if not os.path.isfile(path):
        raise data.DataError(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, garbage: torch raises several kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise data.DataError(f"--resume {path}: not a readable checkpoint ({reason}); give the ckpt.pt of a run, "
                             f"or none to start fresh") from None
    if not (isinstance(ckpt, dict) and {"model", "optimizer", "model_config", "train_config", "step"} <= set(ckpt)):
        raise data.DataError(f"--resume {path}: not a train.py checkpoint (no model / optimizer / config / step); "
                             f"give the ckpt.pt of a run")
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
    return all(bool(torch.isfinite(t).all()) for sd in state_dicts for t in tensors(sd) if t.is_floating_point())


def save_checkpoint(path, raw_model, opt, tcfg, mcfg, step, tokenizer, world):
    """Atomic: a temp file named for this process, then a rename over the old one (a kill never
    leaves half a file). The tokenizer travels inside (its json). A failed write (disk full) removes
    the temp file, keeps the previous checkpoint and stops with one line."""
    state = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), train_config=dataclasses.asdict(tcfg),
                 model_config=dataclasses.asdict(mcfg), step=step, tokenizer_json=tokenizer.to_str(), world=world,
                 rng=torch.get_rng_state())  # (all training randomness comes from seeded generators)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise data.DataError(f"could not save {path} at step {step + 1} ({str(e).splitlines()[0][:100]}); the "
                             f"previous checkpoint is kept: free space in {os.path.dirname(path) or '.'} and resume "
                             f"with --resume {path}") from None


def append_log(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def trim_log(path, step):
    """Resuming at `step`: drop the records a killed run wrote after its checkpoint, and the probes at
    initialization that a finished run wrote last (the resumed run writes them again when it ends)."""
    if not os.path.exists(path):
        return
    recs = []
    for line in open(path):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill or a full disk
            pass
    keep = [json.dumps(r) + "\n" for r in recs if r.get("step", 0) <= step and "init_probes" not in r]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# data, tokenizer, model


def datasets(tcfg, mcfg):
    if tcfg.dataset == "shapes":
        kw = dict(img_size=mcfg.img_size, seed=tcfg.seed, layout=tcfg.shapes_layout, captions=tcfg.shapes_captions)
        return data.ShapesDataset("train", size=tcfg.shapes_size, **kw), data.ShapesDataset("val", **kw)
    return (data.CocoCaptions(tcfg.data_dir, "train", img_size=mcfg.img_size),
            data.CocoCaptions(tcfg.data_dir, "val", img_size=mcfg.img_size))


def choose_tokenizer(tcfg, mcfg, ckpt, resume, train_set, rt):
    """A resumed run takes the checkpoint's own tokenizer; a fresh run trains one on its training
    captions into out_dir (never reusing a tokenizer.json another run left there), unless --tokenizer.
    A benchmark keeps its tokenizer in memory and leaves out_dir as it was."""
    if ckpt is not None and "tokenizer_json" in ckpt:
        tokenizer = data.tokenizer_from_str(ckpt["tokenizer_json"], f"the checkpoint {resume}")
        if tcfg.tokenizer and data.load_tokenizer(tcfg.tokenizer).get_vocab() != tokenizer.get_vocab():
            raise data.DataError(f"--tokenizer {tcfg.tokenizer} is not the tokenizer {resume} was trained with: "
                                 f"drop --tokenizer (the checkpoint carries its own)")
        return tokenizer
    if ckpt is not None:  # checkpoints before 2026-11-29 name a file: --tokenizer, that file, or the one beside
        named = ckpt["tokenizer"]
        named = named if os.path.exists(named) else os.path.join(os.path.dirname(resume), "tokenizer.json")
        return data.load_tokenizer(tcfg.tokenizer or named)
    if tcfg.tokenizer:
        return data.load_tokenizer(tcfg.tokenizer)
    if tcfg.bench:
        return data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size)
    path = os.path.join(tcfg.out_dir, "tokenizer.json")
    if rt.master:
        data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size, path)
    if rt.ddp:
        dist.barrier()  # every rank waits, then loads it (several nodes need a shared out_dir)
    return data.load_tokenizer(path)


def check_captions(train_set, tokenizer, max_images=10000):
    """text_cond=cross with captions that tokenize to nothing would train I-JEPA under another name:
    stop if no sampled image has a usable caption, warn if most have none."""
    n = min(len(train_set), max_images)
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:n].tolist()
    caps = [train_set.captions_of(i) for i in idx]
    enc = tokenizer.encode_batch([c for cs in caps for c in cs], add_special_tokens=False)
    usable, k = 0, 0
    for cs in caps:
        usable += any(len(e.ids) > 0 for e in enc[k:k + len(cs)])
        k += len(cs)
    if usable == 0:
        raise data.DataError(f"--text_cond cross, but none of {n} sampled training images has a caption with a word "
                             f"the tokenizer knows: fix the captions, or train I-JEPA with --text_cond none")
    if usable < n / 2:
        print(f"warning: only {usable} of {n} sampled training images have a usable caption; the others train "
              f"without text", file=sys.stderr)


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


def restore(raw_model, opt, ckpt, tcfg, mcfg, rt):
    """Load a checkpoint into model and optimizer; the model must match. Returns the next step."""
    diff = {k: v for k, v in ckpt["model_config"].items() if getattr(mcfg, k, None) != v}
    if diff:
        raise data.DataError(f"--resume: the checkpoint's model differs in {diff}: give the same model flags")
    changed = [k for k, v in ckpt["train_config"].items()
               if k not in ("resume", "eval_only", "bench") and getattr(tcfg, k, None) != v]
    if changed:
        rt.print0("resuming with changed training flags: " + ", ".join(
            f"{k} {ckpt['train_config'][k]!r} -> {getattr(tcfg, k)!r}" for k in changed))
    t = ckpt["train_config"]
    if "world" in ckpt and t["batch_size"] * t["grad_accum"] * ckpt["world"] != tcfg.batch_size * tcfg.grad_accum * rt.world:
        raise data.DataError(f"--resume: the checkpoint was trained with a global batch of {t['batch_size']} x "
                             f"{ckpt['world']} processes x {t['grad_accum']} accum; keep it (e.g. --grad_accum) so "
                             f"that the schedule and the data order stay the same")
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
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, broadcast_buffers=False)
    return model


def make_loader(train_set, collate, tcfg, rt, start_step):
    sampler = StepSampler(len(train_set), tcfg.batch_size, tcfg.seed, rt.rank, rt.world, start_step, tcfg.grad_accum)
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=tcfg.num_workers, pin_memory=rt.device.type == "cuda",
                                       persistent_workers=tcfg.num_workers > 0, worker_init_fn=ignore_stop_signals)


def make_val_batches(val_set, collate, tcfg, mcfg):
    """Fixed val images with fixed masks: the same for every evaluation, and for every run of a seed
    and batch size (the masks are drawn per batch)."""
    batches, n_val = [], min(tcfg.val_size, len(val_set))
    for i in range(0, n_val, tcfg.batch_size):
        b = collate([val_set[(j, 1000 + j)] for j in range(i, min(n_val, i + tcfg.batch_size))])
        b["ctx"], b["tgt"] = sample_masks(len(b["images"]), mcfg, seeded(tcfg.seed, 10**9, i))  # unreadable ones dropped
        b["indices"] = torch.arange(i, min(n_val, i + tcfg.batch_size))  # (shapes: every item is readable)
        batches.append(b)
    return batches


# -----------------------------------------------------------------------------
# one optimizer step

LOGGED = ("loss", "loss_pred", "loss_sparse", "loss_consist", "pos_frac", "pos_cos", "attn_entropy",
          "grad_norm")  # per step


def train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt):
    """One optimizer step of grad_accum micro-steps. Returns dict(parts: the LOGGED values summed
    over the micro-steps, finite: whether the loss and the gradient norm are finite (both kept on
    the device: no host sync), n_img, shapes: the last (Nc, Nt), data_wait: seconds blocked on the
    loader). A non-finite step still updates the weights in memory, but the loop reads `finite` at the
    next check point and then logs and saves nothing of it or after it."""
    lr, wd, momentum = schedules(step, tcfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd
    total, n_img, data_wait = 0.0, 0, 0.0
    for micro in range(tcfg.grad_accum):
        t_wait = time.perf_counter()
        batch = next_batch()
        data_wait += time.perf_counter() - t_wait
        B = batch["images"].size(0)
        ctx, tgt = sample_masks(B, mcfg, seeded(tcfg.seed, step, rt.rank, micro, 3))  # on CPU: no GPU sync
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
        total = total + torch.stack([out[k].detach().float() for k in LOGGED[:-1]])
        n_img += B * rt.world
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) * tcfg.grad_accum  # summed later
    finite = total[0].isfinite() & grad_norm.isfinite()
    if os.environ.get("TCJEPA_TEST_SLOW_STEP"):  # tests only: a slow step, as big models have (seconds)
        time.sleep(float(os.environ["TCJEPA_TEST_SLOW_STEP"]))
    opt.step()
    opt.zero_grad(set_to_none=True)
    raw_model.update_target(momentum)
    return dict(parts=torch.cat([total, grad_norm[None]]), finite=finite, n_img=n_img,
                shapes=(ctx.size(1), tgt.size(2)), data_wait=data_wait)


# -----------------------------------------------------------------------------
# evaluation: does the predictor use the text?


@torch.no_grad()
def val_losses(raw_model, val_batches, device, autocast):
    """Prediction loss on fixed val images and fixed masks with the true captions, captions shuffled
    across images, and no captions: the cheapest sign that the text is used (notes/paper.md §2.5)."""
    raw_model.eval()
    sums = dict(true=0.0, shuffled=0.0, none=0.0)
    n_total = sum(len(b["images"]) for b in val_batches)
    for b in val_batches:
        images, tokens, wm, ctx, tgt = (b[k].to(device) for k in ("images", "tokens", "word_mask", "ctx", "tgt"))
        variants = dict(true=(tokens, wm), shuffled=(tokens.roll(1, 0), wm.roll(1, 0)),
                        none=(tokens, torch.zeros_like(wm)))
        for name, (tok, w) in variants.items():
            with autocast:
                sums[name] += raw_model(images, ctx, tgt, tok, w)["loss_pred"].item() * len(images) / n_total
    raw_model.train()
    return sums


# -----------------------------------------------------------------------------
# linear probes on frozen TARGET-encoder features (shapes: per-patch and per-image ground truth)


def ridge_fit(X, Y, weight=None, lam=1e-3):
    """Closed-form (weighted) ridge regression on standardized features: deterministic and fast.
    X (n, D), Y (n, K) targets, weight (n,) -> a function mapping features to (n, K) scores."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xs = torch.cat([(X - mu) / sd, torch.ones(len(X), 1)], 1).double()  # (n, D+1) with a bias column
    w = (torch.ones(len(X)) if weight is None else weight / weight.mean()).double()[:, None]
    A = Xs.T @ (w * Xs) + lam * len(X) * torch.eye(Xs.size(1), dtype=torch.float64)
    W = torch.linalg.solve(A, Xs.T @ (w * Y.double()))  # (D+1, K)
    return lambda Z: (torch.cat([(Z - mu) / sd, torch.ones(len(Z), 1)], 1).double() @ W).float()


def class_probe(Xtr, ytr, Xte, yte, n_classes):
    """Mean per-class accuracy of a ridge classifier (one-hot targets, classes weighted equally so
    that background patches do not drown the objects), over the classes present in yte."""
    freq = torch.bincount(ytr, minlength=n_classes).float().clamp(min=1)
    scores = ridge_fit(Xtr, F.one_hot(ytr, n_classes).float(), weight=1 / freq[ytr])(Xte)
    pred = scores.argmax(1)
    accs = [(pred[yte == c] == c).float().mean() for c in range(n_classes) if (yte == c).any()]
    return torch.stack(accs).mean().item()


def average_precision(scores, labels):
    """Mean over columns of the average precision of ranking (n, K) scores against 0/1 labels."""
    aps = []
    for k in range(labels.size(1)):
        order = scores[:, k].argsort(descending=True)
        hits = labels[order, k]
        if hits.sum() == 0:
            continue
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / hits.sum())
    return torch.stack(aps).mean().item() if aps else float("nan")  # nan: no column has a positive


@torch.no_grad()
def shapes_features(raw_model, dataset, n, device, autocast, batch_size=250):
    """Target-encoder patch features (n, N, D) and per-patch ground truth of the first n images:
    shape, colour, object (0 background, 1 + slot), and the image attributes."""
    raw_model.eval()
    feats, gt = [], []
    for i in range(0, n, batch_size):
        out = dataset.render(list(range(i, min(n, i + batch_size))))
        with autocast:
            feats.append(raw_model.encode(out["images"].to(device)).float().cpu())
        p = raw_model.cfg.patch_size
        gt.append((data.patch_labels(out["shape_map"], p), data.patch_labels(out["color_map"], p),
                   data.patch_labels(out["object_map"], p), out["attrs"]))
    raw_model.train()
    shape, color, obj, attrs = (torch.cat(x) for x in zip(*gt))
    return torch.cat(feats), shape, color, obj, attrs


def object_pooled(feats, shape, obj):
    """One row per object: the mean feature of its patches (majority label) and its shape (0-based).
    feats (n, N, D), shape / obj (n, N) patch labels -> (n_objects, D), (n_objects,)."""
    K = int(obj.max()) + 1
    onehot = F.one_hot(obj, K).float()  # (n, N, K)
    sums = onehot.transpose(1, 2) @ feats  # (n, K, D)
    counts = onehot.sum(1)  # (n, K)
    shapes = (onehot.transpose(1, 2) @ F.one_hot(shape, len(data.SHAPES) + 1).float()).argmax(-1)  # (n, K) majority
    keep = counts[:, 1:] > 0  # objects that own at least one patch
    return (sums[:, 1:] / counts[:, 1:, None].clamp(min=1))[keep], shapes[:, 1:][keep] - 1


def probes(raw_model, train_set, val_set, n_train, device, autocast):
    """Dense probes (what covers each patch: background or a shape; its color), an object probe
    (each object's mean feature: its shape) and image probes (which shapes / colors are present,
    how many objects) on the shapes val split."""
    ftr, str_, ctr, otr, atr = shapes_features(raw_model, train_set, n_train, device, autocast)
    fte, ste, cte, ote, ate = shapes_features(raw_model, val_set, len(val_set), device, autocast)
    D, ns, nc = ftr.size(-1), len(data.SHAPES), len(data.COLORS)
    res = dict(dense_shape=class_probe(ftr.reshape(-1, D), str_.flatten(), fte.reshape(-1, D), ste.flatten(), ns + 1),
               dense_color=class_probe(ftr.reshape(-1, D), ctr.flatten(), fte.reshape(-1, D), cte.flatten(), nc + 1))
    on_tr, on_te = str_.flatten() > 0, ste.flatten() > 0  # object patches only: shape among 7 kinds
    res["dense_shape_obj"] = class_probe(ftr.reshape(-1, D)[on_tr], str_.flatten()[on_tr] - 1,
                                         fte.reshape(-1, D)[on_te], ste.flatten()[on_te] - 1, ns)
    res["obj_shape"] = class_probe(*object_pooled(ftr, str_, otr), *object_pooled(fte, ste, ote), ns)
    gtr, gte = ftr.mean(1), fte.mean(1)  # average-pooled image features (I-JEPA's probe input)
    scores = ridge_fit(gtr, atr)(gte)
    res["img_shape_ap"] = average_precision(scores[:, :ns], ate[:, :ns])
    res["img_color_ap"] = average_precision(scores[:, ns:ns + nc], ate[:, ns:ns + nc])
    res["img_count_acc"] = class_probe(gtr, atr[:, ns + nc:].argmax(1), gte, ate[:, ns + nc:].argmax(1), 4)
    res["rankme"] = rankme(gte)
    return res


def rankme(feats, eps=1e-7):
    """Effective rank of (n, D) features (RankMe, Garrido et al. 2023): exp of the entropy of the
    normalized singular values. A label-free collapse monitor: it falls when features collapse."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


# -----------------------------------------------------------------------------
# linear probes on COCO: categories, segmentation, caption words, RankMe (notes/coco.md)


class StreamingRidge:
    """ridge_fit over batches, with the same result: update(X, Y) per batch, then solve().

    Sums are kept in float64 around the first batch's mean (no cancellation in the variances).
    Features are standardized with the running mean / std (unweighted, as ridge_fit), a bias column
    is added and penalized, and the penalty is lam * n. Weights are divided by their mean over all rows,
    as ridge_fit does. Class-balanced fits need the class frequencies first: pass class_weight (n_out,)
    (e.g. 1 / frequency, from a labels-only pass) and each row of one-hot Y gets its class's weight.
    The sums live on `device`: a GPU for ~1M ViT-B patches (a 769 x 769 float64 product per batch)."""

    def __init__(self, dim, n_out, lam=1e-3, class_weight=None, device="cpu"):
        self.lam, self.n, self.shift, self.device = lam, 0, None, device
        f64 = dict(dtype=torch.float64, device=device)
        self.class_weight = None if class_weight is None else class_weight.to(**f64)
        self.sx, self.sxx = torch.zeros(dim, **f64), torch.zeros(dim, **f64)
        self.G = torch.zeros(dim + 1, dim + 1, **f64)  # weighted [x, 1]^T [x, 1]
        self.B = torch.zeros(dim + 1, n_out, **f64)  # weighted [x, 1]^T y

    def update(self, X, Y, weight=None):
        """X (n, D) features, Y (n, K) targets, weight (n,) or None."""
        X, Y = X.to(self.device, torch.float64), Y.to(self.device, torch.float64)
        if self.shift is None:
            self.shift = X.mean(0)
        Xc = X - self.shift
        w = torch.ones_like(X[:, 0]) if weight is None else weight.to(self.device, torch.float64)
        if self.class_weight is not None:
            w = w * (Y @ self.class_weight)
        Xa = torch.cat([Xc, torch.ones_like(Xc[:, :1])], 1)  # (n, D+1)
        self.G += Xa.T @ (w[:, None] * Xa)
        self.B += Xa.T @ (w[:, None] * Y)
        self.sx += Xc.sum(0)
        self.sxx += (Xc * Xc).sum(0)
        self.n += len(X)
        return self

    def solve(self):
        """-> a function mapping features (m, D) to (m, K) float scores."""
        n, D = self.n, len(self.sx)
        mu = self.sx / n  # mean around the shift
        sd = ((self.sxx - n * mu * mu) / (n - 1)).clamp(min=0).sqrt() + 1e-6  # X.std(0) + 1e-6, as ridge_fit
        # [standardized x, 1] = [x - shift, 1] @ T: a change of basis of the accumulated sums
        T = torch.eye(D + 1, dtype=torch.float64, device=self.device)
        T[:D, :D], T[D, :D] = torch.diag(1 / sd), -mu / sd
        mean_w = self.G[D, D] / n
        A = T.T @ self.G @ T / mean_w + self.lam * n * torch.eye(D + 1, dtype=torch.float64, device=self.device)
        M = T @ torch.linalg.solve(A, T.T @ self.B / mean_w)  # (D+1, K) weights on [x - shift, 1]
        shift, dev = self.shift, self.device
        return lambda Z: ((Z.to(dev, torch.float64) - shift) @ M[:D] + M[D]).float()


class Confusion:
    """Streaming confusion matrix: rows the true class, columns the predicted one."""

    def __init__(self, n_classes):
        self.n, self.m = n_classes, torch.zeros(n_classes, n_classes, dtype=torch.long)

    def update(self, pred, target):
        pair = target.flatten().long() * self.n + pred.flatten().long()  # one bin per (true, predicted)
        self.m += torch.bincount(pair, minlength=self.n ** 2).view(self.n, self.n).cpu()
        return self

    def miou(self):
        """Mean IoU over the classes present in the ground truth; a wrong prediction enlarges the
        union of both its true and its predicted class."""
        inter, present = self.m.diag(), self.m.sum(1) > 0
        union = self.m.sum(0) + self.m.sum(1) - inter
        return (inter[present] / union[present]).mean().item()


@dataclass
class CocoProbeData:
    train: object  # data.CocoProbeSet: probe_train images evenly spaced over train2017
    val: object  # data.CocoProbeSet: all of val2017
    dense_weight: torch.Tensor  # (81,) 1 / patch frequency of each class in the probe's train images


def coco_probe_data(tcfg, mcfg, train_set, val_set):
    """Rank 0, once: the probe images with their instance masks, parsed keeping only what the probe
    needs; None (and one line) when the instances files are missing or unreadable."""
    t0, ann = time.time(), os.path.join(tcfg.data_dir, "annotations")
    idx = torch.linspace(0, len(train_set) - 1, min(tcfg.probe_train, len(train_set))).round().long().unique().tolist()
    try:
        names, _, rec_tr, n_tr = data.read_instances(os.path.join(ann, "instances_train2017.json"),
                                                     [train_set.ids[i] for i in idx])
        _, _, rec_va, n_va = data.read_instances(os.path.join(ann, "instances_val2017.json"), val_set.ids)
    except data.DataError as e:
        print(f"{e}. Training goes on with validation losses only")
        return None
    idx = [i for i in idx if train_set.ids[i] in rec_tr]
    jdx = [j for j in range(len(val_set)) if val_set.ids[j] in rec_va]
    if not idx or not jdx:
        print(f"the instances files list none of the {'train' if not idx else 'val'} images: no COCO probes; "
              f"training goes on with validation losses only")
        return None
    vocab = data.caption_word_vocab([train_set.captions[i] for i in idx], tcfg.probe_words)
    kw = dict(vocab=vocab, n_classes=len(names), img_size=mcfg.img_size, patch_size=mcfg.patch_size)
    tr = data.CocoProbeSet([train_set.files[i] for i in idx], [rec_tr[train_set.ids[i]] for i in idx],
                           [train_set.captions[i] for i in idx], **kw)
    va = data.CocoProbeSet([val_set.files[j] for j in jdx], [rec_va[val_set.ids[j]] for j in jdx],
                           [val_set.captions[j] for j in jdx], **kw)
    labels = torch.cat([data.patch_labels(tr.label_map(i)[None], mcfg.patch_size)[0] for i in range(len(tr))])
    freq = torch.bincount(labels, minlength=len(names) + 1).double()
    print(f"coco probes: {len(tr)} train / {len(va)} val images, {len(vocab)} caption words, {n_tr + n_va} "
          f"compressed crowd masks left out; instances read in {time.time() - t0:.0f} s")
    return CocoProbeData(tr, va, 1 / freq.clamp(min=1))


@torch.no_grad()
def coco_features(raw_model, probe_set, n, tcfg, rt, batch_size=64):
    """(target patch features (B, N, D) float, the batch's ground truth) for the first n images."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(probe_set, range(min(n, len(probe_set)))),
                                         batch_size=batch_size, collate_fn=data.probe_collate,
                                         num_workers=tcfg.num_workers, worker_init_fn=ignore_stop_signals)
    for b in loader:
        with rt.autocast:
            yield raw_model.encode(b["image"].to(rt.device)).float(), b


def coco_probes(raw_model, pd, n_val, tcfg, rt):
    """Ridge probes on the frozen target encoder, fitted on the probe's train images and scored on
    n_val val images: 80-way category mAP and caption-word mAP from average-pooled features,
    segmentation mIoU (background + 80) from patch features (streamed: X^T X, never all patches),
    and RankMe of the pooled val features."""
    raw_model.eval()
    n_cls = len(pd.dense_weight)
    dense, pooled = None, dict(train=[], val=[])
    for f, b in coco_features(raw_model, pd.train, len(pd.train), tcfg, rt):
        dense = dense or StreamingRidge(f.size(-1), n_cls, class_weight=pd.dense_weight, device=rt.device)
        dense.update(f.flatten(0, 1), F.one_hot(b["patch_labels"].flatten(), n_cls).to(rt.device))
        pooled["train"].append((f.mean(1).cpu(), b["present"], b["words"]))
    score, conf = dense.solve(), Confusion(n_cls)
    for f, b in coco_features(raw_model, pd.val, n_val, tcfg, rt):
        conf.update(score(f.flatten(0, 1)).argmax(1).cpu(), b["patch_labels"].flatten())
        pooled["val"].append((f.mean(1).cpu(), b["present"], b["words"]))
    (Xtr, Ptr, Wtr), (Xva, Pva, Wva) = ([torch.cat(x) for x in zip(*pooled[k])] for k in ("train", "val"))
    raw_model.train()
    return dict(coco_cls_map=average_precision(ridge_fit(Xtr, Ptr)(Xva), Pva), coco_dense_miou=conf.miou(),
                coco_words_map=average_precision(ridge_fit(Xtr, Wtr)(Xva), Wva), rankme=rankme(Xva))


def run_probes(raw_model, train_set, val_set, probe_data, tcfg, rt, last):
    """The probes of the dataset on rank 0's frozen target encoder ({} when COCO has no instances)."""
    if tcfg.dataset == "shapes":
        return probes(raw_model, train_set, val_set, tcfg.probe_train, rt.device, rt.autocast)
    if probe_data is None:
        return {}
    return coco_probes(raw_model, probe_data, len(probe_data.val) if last else tcfg.probe_val, tcfg, rt)


@torch.no_grad()
def text_scores(raw_model, rt, images, ctx, tgt, tokens, word_mask):
    """The conditioners' rectified cosines O and attention on one batch (for the grounding probe)."""
    raw_model.eval()
    with rt.autocast:
        out = raw_model.predict(*(x.to(rt.device) for x in (images, ctx, tgt, tokens, word_mask)), return_attention=True)
    raw_model.train()
    return out["sims"].float(), out["attention"].float()


def evaluate(raw_model, val_batches, train_set, val_set, probe_data, tokenizer, tcfg, rt, step, log_path, last):
    """Validation losses on every rank (they are cheap), probes on rank 0 while the others wait at a
    CPU barrier (no NCCL collective pending, so no NCCL timeout); rank 0 logs and prints."""
    v = val_losses(raw_model, val_batches, rt.device, rt.autocast)
    rec = dict(step=step, val_true=v["true"], val_shuffled=v["shuffled"], val_none=v["none"])
    if rt.master:
        t0 = time.time()
        rec.update(run_probes(raw_model, train_set, val_set, probe_data, tcfg, rt, last))
        m = raw_model.cfg
        if tcfg.dataset == "shapes" and m.text_cond == "cross" and m.text_pool == "word":
            rec.update(data.grounding_probe(lambda *a: text_scores(raw_model, rt, *a), val_batches, val_set,
                                            tokenizer, m.patch_size))
        rec["probe_s"] = time.time() - t0
        append_log(log_path, rec)
        print(f"step {step}: " + " | ".join(f"{k} {x:.4f}" for k, x in rec.items()
                                            if k != "step" and isinstance(x, float)))
    if rt.ddp:
        dist.barrier(group=rt.cpu_group)
    return rec


def init_probes(mcfg, tcfg, train_set, val_set, probe_data, rt, log_path, final):
    """The same probes on the very same encoder at initialization (random features are a strong
    baseline), printed beside the trained ones and logged."""
    init, _ = build_model(mcfg, tcfg, rt)
    res = run_probes(init, train_set, val_set, probe_data, tcfg, rt, last=True)
    if not res:
        return
    print(f"\nlinear probes on the frozen target encoder ({tcfg.dataset} val):")
    print(f"{'probe':<18}{'random init':>12}{'trained':>10}")
    for k, x in res.items():
        print(f"{k:<18}{x:>12.4f}{final[k]:>10.4f}")
    append_log(log_path, dict(step=0, init_probes=res))


# -----------------------------------------------------------------------------
# --bench: honest timing (warm-up outside the timed region, synchronized)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def peak_flops(rt):
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def benchmark(model, raw_model, opt, next_batch, tcfg, mcfg, rt):
    """--bench N: warm-up steps (compilation, allocator) outside the timed region, then N timed
    steps between two synchronizations. Also counts recompilations after the warm-up and the time
    blocked on the DataLoader: near 0 when the loader keeps up."""
    import torch._dynamo.utils as dynamo_utils

    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for step in range(tcfg.bench_warmup):
        train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt)
    sync()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    flops, n_img, wait, t0 = 0.0, 0, 0.0, time.perf_counter()
    for step in range(tcfg.bench_warmup, tcfg.bench_warmup + tcfg.bench):
        out = train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt)
        flops += raw_model.flops_per_image(*out["shapes"]) * out["n_img"]
        n_img, wait = n_img + out["n_img"], wait + out["data_wait"]
    sync()
    dt, peak = time.perf_counter() - t0, peak_flops(rt)
    rec = dict(text_cond=mcfg.text_cond, img_size=mcfg.img_size, width=mcfg.width, batch_size=tcfg.batch_size,
               compile=rt.compile, device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
               threads=torch.get_num_threads(), workers=tcfg.num_workers, torch=torch.__version__, steps=tcfg.bench,
               ms_per_step=1000 * dt / tcfg.bench, img_per_s=n_img / dt, data_wait_ms_per_step=1000 * wait / tcfg.bench,
               peak_mem_gb=torch.cuda.max_memory_allocated(rt.device) / 1e9 if rt.device.type == "cuda" else None,
               mfu=flops / dt / rt.world / peak if peak else None,
               recompiles_after_warmup=dynamo_utils.counters["stats"]["unique_graphs"] - graphs)
    rt.print0("bench " + json.dumps(rec))
    return rec


# -----------------------------------------------------------------------------
# main: the phases of a run

NEVER = 2**62  # first_bad's value while every step has been finite
EXIT_STOPPED = 75  # stopped by a signal after saving: resume (EX_TEMPFAIL, "try again later")


DEAD_ZONE = 1e-3  # pos_frac below this for a whole log window: the rectified text losses have no gradient


def dead_zone(pos_max, mcfg):
    return (mcfg.text_cond == "cross" and mcfg.sim_mode != "attention" and (mcfg.sparse_coef > 0 or mcfg.consist_coef > 0)
            and pos_max < DEAD_ZONE)


def dead_zone_warning(mcfg, since, done):
    return (f"\nwarning: pos_frac stayed below {DEAD_ZONE} over steps {since + 1}-{done}: every patch-word cosine is "
            f"negative, so the sparsity and consistency losses (--sparse_coef {mcfg.sparse_coef:g} --consist_coef "
            f"{mcfg.consist_coef:g}) have gone inert (notes/paper.md §2.5); --sim_mode cosine or attention "
            f"removes the loss's trivial minima (notes/experiments.md §9), 0 turns the losses off")


def last_line(status, rt, tcfg, ckpt_path, log_path, done, bad_step, last_good):
    """What happened, in the run's last line: raises for a non-finite stop (exit 1)."""
    if status == "nan":
        raise data.DataError(f"loss, gradient or weights not finite at step {bad_step}: stopped, nothing after step "
                             f"{bad_step - 1} was saved. Last good checkpoint: {last_good or 'none'}. Lower --lr "
                             f"(now {tcfg.lr:g}) and resume from it with --resume, or start again")
    if status == "stopped":
        rt.print0(f"{rt.stop_signal or 'a signal on another rank'}: saved {ckpt_path} at step {done}; continue "
                  f"with --resume {ckpt_path} (exit code {EXIT_STOPPED})")
    else:
        rt.print0(f"finished {tcfg.max_steps} steps. checkpoint: {ckpt_path}\nlog: {log_path}")


def log_record(done, vals, tcfg, raw_model, shapes, dt, n_steps, imgs, wait, rt):
    """The log line at step `done` (1-based) over the n_steps since the last one."""
    lr, wd, momentum = schedules(done - 1, tcfg)
    peak = peak_flops(rt)
    flops = raw_model.flops_per_image(*shapes) * imgs / dt / rt.world  # (Nc, Nt) of the last batch
    return dict(step=done, **dict(zip(LOGGED, vals)), lr=lr, momentum=momentum, weight_decay=wd,
                ms_per_step=1000 * dt / n_steps, img_per_s=imgs / dt, mfu=flops / peak if peak else None,
                data_wait_ms=1000 * wait / n_steps)  # blocked on the loader: ~0 when it keeps up


def code_version():
    """The git commit this train.py belongs to and whether tracked files differ from it ("unknown"
    outside a checkout), for the first log record: a log names the code that made it."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip()
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                    torch=torch.__version__)
    except (OSError, subprocess.SubprocessError):
        return dict(commit="unknown", dirty="unknown", torch=torch.__version__)


def describe(tcfg, mcfg, train_set, raw_model, rt):
    """The effective configuration in a few lines (every field is in the first record of log.jsonl)."""
    m, n_params = mcfg, sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    text = (f"text_cond cross, {m.n_captions} captions x {m.max_words} words, lambda {m.sparse_coef:g} beta "
            f"{m.consist_coef:g}" if m.text_cond == "cross" else "text_cond none (I-JEPA)")
    return (f"{tcfg.dataset}: {len(train_set)} train images, {tcfg.num_workers} loader workers | {rt.world} x "
            f"{rt.device.type} | batch {tcfg.batch_size} x {rt.world} x {tcfg.grad_accum} accum = "
            f"{tcfg.batch_size * rt.world * tcfg.grad_accum} | torch {torch.__version__}\n"
            f"{tcfg.max_steps} steps = {tcfg.max_steps * tcfg.batch_size * rt.world * tcfg.grad_accum / len(train_set):.1f} "
            f"epochs, lr {tcfg.lr:g} (warmup {tcfg.warmup_steps} from {tcfg.start_lr:g}, cosine to "
            f"{tcfg.final_lr:g}), weight decay {tcfg.weight_decay:g} -> {tcfg.final_weight_decay:g}, EMA "
            f"{tcfg.ema_start:g} -> {tcfg.ema_end:g}, compile {'on' if rt.compile else 'off'}\n"
            f"model {n_params / 1e6:.2f}M trainable params: ViT {m.width}x{m.depth} ({m.heads} heads), patch "
            f"{m.patch_size} at {m.img_size} px, predictor {m.pred_width}x{m.pred_depth} | {text}"
            + (f"\nnote: the warmup ({tcfg.warmup_steps} steps) is as long as the run: the lr never reaches its peak"
               if tcfg.warmup_steps >= tcfg.max_steps else ""))


def main(argv=None):
    tcfg, mcfg = parse_args(argv)
    if tcfg.num_workers < 0:
        tcfg = dataclasses.replace(tcfg, num_workers=auto_workers())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in DataLoader workers
    rt = setup(tcfg)

    # ---- data, checkpoint, tokenizer
    if not tcfg.bench:  # a benchmark leaves out_dir as it was
        prepare_out_dir(tcfg.out_dir)
    train_set, val_set = datasets(tcfg, mcfg)
    tcfg = resolve_recipe(tcfg, len(train_set), rt.world)
    resume = os.path.join(tcfg.out_dir, "ckpt.pt") if tcfg.resume == "auto" else tcfg.resume
    ckpt = load_checkpoint(resume) if resume and (tcfg.resume != "auto" or os.path.exists(resume)) else None
    if tcfg.eval_only and ckpt is None:
        raise data.DataError("--eval_only needs --resume <checkpoint>")
    tokenizer = choose_tokenizer(tcfg, mcfg, ckpt, resume, train_set, rt)
    if tokenizer.get_vocab_size() > mcfg.vocab_size:
        mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.get_vocab_size())
    if mcfg.text_cond == "cross":
        check_captions(train_set, tokenizer)
    collate = data.Collate(tokenizer, mcfg.n_captions, mcfg.max_words)

    # ---- model, optimizer, resume
    raw_model, opt = build_model(mcfg, tcfg, rt)
    start_step = restore(raw_model, opt, ckpt, tcfg, mcfg, rt) if ckpt is not None else 0
    model = wrap(raw_model, rt)
    rt.print0(describe(tcfg, mcfg, train_set, raw_model, rt))
    if ckpt is not None:
        rt.print0(f"resumed from {resume} at step {start_step}")
    log_path, ckpt_path = os.path.join(tcfg.out_dir, "log.jsonl"), os.path.join(tcfg.out_dir, "ckpt.pt")
    if start_step >= tcfg.max_steps and not tcfg.eval_only:
        rt.print0(f"{resume} has already finished its {tcfg.max_steps} steps: nothing to train "
                  f"(--eval_only true evaluates it; a larger --max_steps trains on)")
        return "done"
    if rt.master and not (tcfg.bench or tcfg.eval_only):  # a fresh log; a resumed one loses what came after ckpt
        open(log_path, "w").close() if start_step == 0 else trim_log(log_path, start_step)
        append_log(log_path, dict(config=dict(train=dataclasses.asdict(tcfg), model=dataclasses.asdict(mcfg)),
                                  start_step=start_step, world=rt.world, code=code_version()))

    # ---- loaders: the train stream, fixed val batches with fixed masks, the COCO probes' images
    val_batches = make_val_batches(val_set, collate, tcfg, mcfg)
    probe_data = None
    if tcfg.dataset == "coco" and rt.master and not tcfg.bench:
        probe_data = coco_probe_data(tcfg, mcfg, train_set, val_set)
    if tcfg.eval_only:
        final = evaluate(raw_model, val_batches, train_set, val_set, probe_data, tokenizer, tcfg, rt, start_step,
                         log_path, True)
        if rt.master:
            init_probes(mcfg, tcfg, train_set, val_set, probe_data, rt, log_path, final)
        return "done"
    data_iter = iter(make_loader(train_set, collate, tcfg, rt, start_step))
    one = next(data_iter) if tcfg.bench and tcfg.bench_one_batch else None  # the step alone, no loader
    next_batch = (lambda: one) if one is not None else (lambda: next(data_iter))
    if tcfg.bench:
        return benchmark(model, raw_model, opt, next_batch, tcfg, mcfg, rt)

    # ---- the training loop
    from tqdm import tqdm
    bar = tqdm(total=tcfg.max_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout) if rt.master else None
    status, bad_step, final = "done", None, None
    last_good = f"{resume} (step {start_step})" if ckpt is not None else None
    running, first_bad = None, torch.tensor(NEVER, device=rt.device)  # summed on the device: no sync per step
    pos_max, warned = torch.zeros((), device=rt.device), False  # the largest pos_frac of the log window
    t0, paused, imgs, wait, since = time.time(), 0.0, 0, 0.0, start_step
    for step in range(start_step, tcfg.max_steps):
        out = train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt)
        running = out["parts"] if running is None else running + out["parts"]
        pos_max = torch.maximum(pos_max, out["parts"][LOGGED.index("pos_frac")] / tcfg.grad_accum)
        first_bad = torch.where(out["finite"], first_bad, first_bad.clamp(max=step + 1))
        imgs, wait, done = imgs + out["n_img"], wait + out["data_wait"], step + 1
        if bar:
            bar.update(1)
        stopping = stop_requested(rt)
        due = {k: done % getattr(tcfg, f"{k}_every") == 0 or done == tcfg.max_steps for k in ("log", "eval", "save")}
        if not (stopping or any(due.values())):
            continue
        # ---- a check point: the ranks agree on the first non-finite step, then log, evaluate, save
        if rt.ddp:
            dist.all_reduce(running, op=dist.ReduceOp.AVG)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if first_bad.item() < NEVER:  # nothing after a non-finite step is logged or saved
            status, bad_step = "nan", first_bad.item()
            break
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        n = done - since
        rec = log_record(done, (running / (n * tcfg.grad_accum)).tolist(), tcfg, raw_model, out["shapes"],
                         time.time() - t0 - paused, n, imgs, wait, rt)  # eval and save time is not step time
        if not warned and dead_zone(pos_max.item(), mcfg):
            rt.print0(dead_zone_warning(mcfg, since, done))
            warned = True
        running, t0, paused, imgs, wait, since = None, time.time(), 0.0, 0, 0.0, done
        pos_max.zero_()
        if rt.master:
            append_log(log_path, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        t_pause = time.time()
        if due["save"] or stopping:  # before the evaluation: a signal or a failing probe cannot cost it
            if not all_finite(raw_model.state_dict(), opt.state_dict()):  # the same on every rank
                status, bad_step = "nan", done
                break
            if rt.master:
                save_checkpoint(ckpt_path, raw_model, opt, tcfg, mcfg, step, tokenizer, rt.world)
            if rt.ddp:  # no rank exits (and makes torchrun kill rank 0) before the file is written
                dist.barrier(group=rt.cpu_group)
            last_good = f"{ckpt_path} (step {done})"
        if due["eval"] and not stopping:
            final = evaluate(raw_model, val_batches, train_set, val_set, probe_data, tokenizer, tcfg, rt, done,
                             log_path, last=done == tcfg.max_steps)
        paused += time.time() - t_pause
        if stopping:
            status = "stopped"
            break
    if bar:
        bar.close()

    # ---- finish: the probes at initialization, and a last line that says what happened
    if status == "done" and rt.master:
        init_probes(mcfg, tcfg, train_set, val_set, probe_data, rt, log_path, final)
    if rt.ddp:
        dist.destroy_process_group()
    last_line(status, rt, tcfg, ckpt_path, log_path, done, bad_step, last_good)
    return status


if __name__ == "__main__":
    code = 0
    try:
        code = EXIT_STOPPED if main() == "stopped" else 0
    except data.DataError as e:  # from a DataLoader worker it comes wrapped in its traceback: keep the last line
        code = "error: " + str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")
        e.__traceback__ = None
    except Exception as e:
        traceback.print_exc()
        code, e.__traceback__ = 1, None
    # Dropping the traceback frees main()'s frames, and with them the DataLoader, which shuts its workers
    # down cleanly now. Left to the garbage collector at exit, the workers (which ignore SIGTERM, see
    # ignore_stop_signals) would never be stopped and the process would hang after an error.
    sys.exit(code)
