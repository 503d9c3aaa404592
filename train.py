"""
Train TC-JEPA (or I-JEPA with --text_cond none) on the built-in `shapes` data or on COCO captions.

  python train.py                                   # CPU or one GPU, built-in data, no download
  torchrun train.py --dataset coco                  # COCO 2017 in data/coco, ViT-B/16 at 224
  torchrun --standalone --nproc_per_node=8 train.py --dataset coco --data_dir /data/coco

Every field of TrainConfig and TCJEPAConfig is a flag (python train.py --help).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks


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
    max_steps: int = 1000  # optimizer steps (about 7 minutes on 2 CPU cores with the defaults)
    batch_size: int = 64  # images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0  # everything random (data order, crops, captions, masks) derives from it
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: str = "auto"  # torch.compile the model: "auto" (= on for CUDA), "on", "off"
    resume: str = ""  # a checkpoint to continue from ("auto" = out_dir/ckpt.pt if present)
    # optimization (I-JEPA: warmup + cosine lr, weight decay 0.04 -> 0.4, EMA 0.996 -> 1.0)
    lr: float = 2e-3  # peak learning rate (I-JEPA: 1e-3 at batch 2048; --dataset coco uses that)
    start_lr: float = 2e-4  # learning rate at step 0, rising linearly to lr
    final_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.04  # at step 0, cosine to final_weight_decay (biases, norms: none)
    final_weight_decay: float = 0.4
    ema_start: float = 0.99  # EMA momentum at step 0 (I-JEPA 0.996; short runs need less, PAPER.md sec. 3)
    ema_end: float = 0.99  # EMA momentum at the last step (I-JEPA 1.0; constant 0.99 learns more in short runs)
    # logging, evaluation, checkpoints
    log_every: int = 25  # steps between log lines
    eval_every: int = 500  # steps between validation losses (true / shuffled / no captions) and probes
    save_every: int = 500  # steps between checkpoints (and one at the end)
    val_size: int = 256  # validation images for the fixed-mask losses
    probe_train: int = 2000  # shapes: train images the linear probes are fitted on (val: the val split)
    eval_only: bool = False  # only evaluate --resume's checkpoint (probes + val losses), then exit
    bench: int = 0  # > 0: time this many steps after bench_warmup untimed ones, print, exit
    bench_warmup: int = 10  # untimed steps before --bench (compilation happens here)
    bench_one_batch: bool = False  # --bench: every step reuses one batch (the step alone, no loader)
    # controls and ablations
    shuffle_captions: bool = False  # control: train with each image's captions taken from another image


# --dataset coco: the I-JEPA recipe at ViT-B/16 scale (any flag given still wins)
COCO_DEFAULTS = dict(lr=1e-3, ema_start=0.996, ema_end=1.0, batch_size=128, num_workers=-1, max_steps=20000,
                     warmup_steps=1500, log_every=50, eval_every=2000, save_every=1000)

# --preset shapes_long: the shortest budget found where I-JEPA's encoder clearly beats its random
# init on the dense shape probe (notes/experiments.md sec. 1); one CPU thread: ~25 min I-JEPA, ~40 min TC-JEPA
SHAPES_LONG = dict(max_steps=4000, eval_every=500)

LOGGED = ("loss", "loss_pred", "loss_sparse", "loss_consist", "pos_frac", "attn_entropy")  # per-step values

# -----------------------------------------------------------------------------
# command line: generated from the two config dataclasses


# flags that take one of a few words; a typo must stop the run, not quietly select a default
CHOICES = dict(dataset=("shapes", "coco"), shapes_layout=data.LAYOUTS, shapes_captions=data.CAPTION_MODES, device=("auto", "cpu", "cuda"), compile=("auto", "on", "off"),
               text_cond=("cross", "none"), text_pool=("word", "mean"), pred_loss=("smooth_l1", "l2"))


def _boolean(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def config_error(t, m):
    """The first flag value that would fail deep inside torch (or train silently wrong), or None."""
    for k in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every", "val_size",
              "probe_train"):
        if getattr(t, k) < 1:
            return f"--{k} must be at least 1, got {getattr(t, k)}"
    for k in ("width", "pred_width"):  # heads split the width; sin-cos positions take a quarter per sin/cos axis
        if getattr(m, k) % m.heads or getattr(m, k) % 4:
            return f"--{k} {getattr(m, k)} must be a multiple of --heads ({m.heads}) and of 4"
    if m.img_size % m.patch_size:
        return f"--img_size {m.img_size} must be a multiple of --patch_size {m.patch_size}"
    if not (m.cond_layers == -1 or 1 <= m.cond_layers <= m.pred_depth):
        return f"--cond_layers must be -1 (all) or 1..{m.pred_depth} (--pred_depth), got {m.cond_layers}"
    if (t.shapes_layout == "pairs") != (t.shapes_captions != "mixed"):
        return "--shapes_captions: mixed goes with --shapes_layout grid3, complement or substitute with pairs"
    if t.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no GPU here: use --device cpu (or auto)"
    return None


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of 50 flags
        sys.exit(f"error: {message} (python train.py --help lists every flag)")


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["shapes", "shapes_long", "vit_b16"], default=None,
                   help="shapes (default), shapes_long (4000 steps, see notes/experiments.md), "
                        "vit_b16 (the default for --dataset coco)")
    for title, cls in (("training", TrainConfig), ("model (TCJEPAConfig)", TCJEPAConfig)):
        group = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):  # ranges such as target_scale: two numbers
                group.add_argument(f"--{f.name}", type=float, nargs=2, default=None, help=f"default {default}")
            else:
                kind = _boolean if isinstance(default, bool) else type(default)
                group.add_argument(f"--{f.name}", type=kind, choices=CHOICES.get(f.name), default=None,
                                   help=f"default {default!r}")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = COCO_DEFAULTS if given.get("dataset") == "coco" else SHAPES_LONG if args.preset == "shapes_long" else {}
    tcfg = TrainConfig(**{**base, **{k: v for k, v in given.items() if k in tfields}})
    preset = args.preset or ("vit_b16" if tcfg.dataset == "coco" else "shapes")
    # shapes: the text losses are off by default; at this scale the paper's lambda 0.1 / beta 0.5
    # drive the patch-word cosines into the dead zone (notes/experiments.md). --sparse_coef 0.1
    # --consist_coef 0.5 gives the paper's values; the vit_b16 preset keeps them.
    mcfg = TCJEPAConfig.vit_b16() if preset == "vit_b16" else TCJEPAConfig(sparse_coef=0.0, consist_coef=0.0)
    mcfg = dataclasses.replace(mcfg, **{k: (tuple(v) if isinstance(v, list) else v)
                                        for k, v in given.items() if k not in tfields and k != "preset"})
    problem = config_error(tcfg, mcfg)
    if problem:
        p.error(problem)
    return tcfg, mcfg


# -----------------------------------------------------------------------------
# schedules (I-JEPA), seeds, checkpoints


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


def auto_workers():
    """DataLoader workers for one process: its share of the node's CPU cores, less one for itself
    (capped at 32). COCO decoding is the bottleneck: one worker does 254-320 img/s and an H200 at
    40% MFU would want ~4,650 img/s of ViT-B I-JEPA (an estimate, notes/perf.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGINT / SIGTERM: torchrun, SLURM and `kill -- -PGID` signal the
    whole process group, and a worker killed first would crash the trainer before it saves.
    (A worker still exits when the trainer does.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def save_checkpoint(path, raw_model, opt, tcfg, mcfg, step, tokenizer):
    """Atomic: write a temp file, then rename over the old one (a kill never leaves half a file).
    The tokenizer travels inside (its json), so a resumed run cannot pick up another one."""
    state = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), train_config=dataclasses.asdict(tcfg),
                 model_config=dataclasses.asdict(mcfg), step=step, tokenizer_json=tokenizer.to_str(),
                 rng=torch.get_rng_state())  # (all training randomness comes from seeded generators)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# evaluation: does the predictor use the text?


@torch.no_grad()
def val_losses(raw_model, val_batches, device, autocast):
    """Prediction loss on fixed val images and fixed masks with the true captions, captions shuffled
    across images, and no captions: the cheapest sign that the text is used (PAPER.md sec. 3)."""
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
    return torch.stack(aps).mean().item()


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
    return res


def benchmark(train_step, raw_model, tcfg, mcfg, device, peak_flops, print0, data_wait):
    """--bench N: warm-up steps (compilation, allocator) outside the timed region, then N timed
    steps between two synchronizations. Also counts recompilations after the warm-up and the time
    blocked on the DataLoader (data_wait[0], seconds): near 0 when the loader keeps up."""
    import torch._dynamo.utils as dynamo_utils

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(tcfg.bench_warmup):
        train_step(step)
    sync()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops, n_img, data_wait[0], t0 = 0.0, 0, 0.0, time.perf_counter()
    for step in range(tcfg.bench_warmup, tcfg.bench_warmup + tcfg.bench):
        _, n, shapes = train_step(step)
        flops += raw_model.flops_per_image(*shapes) * n
        n_img += n
    sync()
    dt = time.perf_counter() - t0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rec = dict(text_cond=mcfg.text_cond, img_size=mcfg.img_size, width=mcfg.width, batch_size=tcfg.batch_size,
               compile=tcfg.compile, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               threads=torch.get_num_threads(), workers=tcfg.num_workers, torch=torch.__version__, steps=tcfg.bench,
               ms_per_step=1000 * dt / tcfg.bench, img_per_s=n_img / dt,
               data_wait_ms_per_step=1000 * data_wait[0] / tcfg.bench,
               peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
               mfu=flops / dt / world / peak_flops if peak_flops else None,
               recompiles_after_warmup=dynamo_utils.counters["stats"]["unique_graphs"] - graphs)
    print0("bench " + json.dumps(rec))
    return rec


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    tcfg, mcfg = parse_args(argv)
    if tcfg.num_workers < 0:
        tcfg = dataclasses.replace(tcfg, num_workers=auto_workers())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in DataLoader workers

    # ---- distributed setup (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE)
    ddp = "RANK" in os.environ
    use_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
        cpu_group = dist.new_group(backend="gloo")  # for the stop flag, a CPU tensor
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    print0 = print if master else (lambda *a, **k: None)
    torch.manual_seed(tcfg.seed)

    # ---- data and tokenizer
    os.makedirs(tcfg.out_dir, exist_ok=True)
    if tcfg.dataset == "shapes":
        kw = dict(img_size=mcfg.img_size, seed=tcfg.seed, layout=tcfg.shapes_layout, captions=tcfg.shapes_captions)
        train_set = data.ShapesDataset("train", size=tcfg.shapes_size, **kw)
        val_set = data.ShapesDataset("val", **kw)
    else:
        train_set = data.CocoCaptions(tcfg.data_dir, "train", img_size=mcfg.img_size)
        val_set = data.CocoCaptions(tcfg.data_dir, "val", img_size=mcfg.img_size)
    ckpt = None
    resume = os.path.join(tcfg.out_dir, "ckpt.pt") if tcfg.resume == "auto" else tcfg.resume
    if resume and os.path.exists(resume):
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
    elif tcfg.resume and tcfg.resume != "auto":
        raise data.DataError(f"--resume {tcfg.resume}: no such checkpoint")
    # the tokenizer: a resumed run takes the checkpoint's own; a fresh run trains one on its training
    # captions (never reusing a tokenizer.json that another run left in out_dir), unless --tokenizer
    if ckpt is not None and "tokenizer_json" in ckpt:
        tokenizer = data.tokenizer_from_str(ckpt["tokenizer_json"], f"the checkpoint {resume}")
        if tcfg.tokenizer and data.load_tokenizer(tcfg.tokenizer).get_vocab() != tokenizer.get_vocab():
            raise data.DataError(f"--tokenizer {tcfg.tokenizer} is not the tokenizer {resume} was trained with: "
                                 f"drop --tokenizer (the checkpoint carries its own)")
    elif ckpt is not None:  # checkpoints before 2026-11-29 name a file: --tokenizer, that file, or the one beside
        named = ckpt["tokenizer"]
        named = named if os.path.exists(named) else os.path.join(os.path.dirname(resume), "tokenizer.json")
        tokenizer = data.load_tokenizer(tcfg.tokenizer or named)
    elif tcfg.tokenizer:
        tokenizer = data.load_tokenizer(tcfg.tokenizer)
    elif tcfg.bench:  # a benchmark leaves out_dir as it was: its tokenizer stays in memory
        tokenizer = data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size)
    else:
        tok_path = os.path.join(tcfg.out_dir, "tokenizer.json")
        if master:
            data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size, tok_path)
        if ddp:
            dist.barrier()  # every rank waits, then loads it (several nodes need a shared out_dir)
        tokenizer = data.load_tokenizer(tok_path)
    if tokenizer.get_vocab_size() > mcfg.vocab_size:
        mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.get_vocab_size())
    collate = data.Collate(tokenizer, mcfg.n_captions, mcfg.max_words)

    # ---- model, optimizer, compile, DDP
    torch.manual_seed(tcfg.seed)  # the same init for the same seed (the random-init probe rebuilds it)
    model = TCJEPA(mcfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]  # biases, norms
    opt = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=tcfg.lr, betas=(0.9, 0.999), fused=use_cuda)
    start_step = 0
    if ckpt is not None:
        diff = {k: v for k, v in ckpt["model_config"].items() if getattr(mcfg, k, None) != v}
        if diff:
            raise data.DataError(f"--resume: the checkpoint's model differs in {diff}: give the same model flags")
        changed = [k for k, v in ckpt["train_config"].items()
                   if k not in ("resume", "eval_only", "bench") and getattr(tcfg, k, None) != v]
        if changed:
            print0(f"resuming with changed training flags: " + ", ".join(
                f"{k} {ckpt['train_config'][k]!r} -> {getattr(tcfg, k)!r}" for k in changed))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"] + 1
        torch.set_rng_state(ckpt["rng"])
        print0(f"resumed from {resume} at step {start_step}")
    raw_model = model  # uncompiled: checkpoints and the EMA update use it (no "_orig_mod." keys)
    if tcfg.compile == "on" or (tcfg.compile == "auto" and use_cuda):
        model = torch.compile(model)
    if ddp:  # DDP around the compiled model, as torch's docs advise (dynamo then splits the graph at
        # DDP's buckets so the all-reduce overlaps the backward); buffers are constant: no broadcast
        model = DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)
    n_params = sum(p.numel() for p in decay + no_decay)
    print0(f"{tcfg.dataset}: {len(train_set)} train images, {tcfg.num_workers} loader workers | "
           f"model {n_params / 1e6:.2f}M trainable params | text_cond={mcfg.text_cond} | {world} x {device.type} | "
           f"torch {torch.__version__}")

    # ---- loaders: the train stream, and fixed val batches with fixed masks
    sampler = StepSampler(len(train_set), tcfg.batch_size, tcfg.seed, rank, world, start_step, tcfg.grad_accum)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=tcfg.num_workers, pin_memory=use_cuda,
                                         persistent_workers=tcfg.num_workers > 0, worker_init_fn=ignore_stop_signals)
    val_batches = []
    n_val = min(tcfg.val_size, len(val_set))
    for i in range(0, n_val, tcfg.batch_size):
        keys = [(j, 1000 + j) for j in range(i, min(n_val, i + tcfg.batch_size))]
        b = collate([val_set[k] for k in keys])
        b["ctx"], b["tgt"] = sample_masks(len(b["images"]), mcfg, seeded(tcfg.seed, 10**9, i))  # unreadable ones dropped
        val_batches.append(b)

    # ---- training loop
    log_path = os.path.join(tcfg.out_dir, "log.jsonl")
    if master and start_step == 0 and not tcfg.eval_only and not tcfg.bench:
        open(log_path, "w").close()  # a fresh run starts a fresh log; a resumed one appends
    ckpt_path = os.path.join(tcfg.out_dir, "ckpt.pt")
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):  # save before exit instead of losing the run
        signal.signal(sig, lambda s, f: stop.update(signal=signal.Signals(s).name))
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    gpu = torch.cuda.get_device_name(device) if use_cuda else ""
    peak_flops = next((v for k, v in peak.items() if k in gpu), None)
    def evaluate(at_step):
        v = val_losses(raw_model, val_batches, device, autocast)
        rec = dict(step=at_step, val_true=v["true"], val_shuffled=v["shuffled"], val_none=v["none"])
        if master and tcfg.dataset == "shapes":
            rec.update(probes(raw_model, train_set, val_set, tcfg.probe_train, device, autocast))
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"step {at_step}: " + " | ".join(f"{k} {x:.4f}" for k, x in rec.items() if k != "step"))
        return rec

    if tcfg.eval_only:
        if ckpt is None:
            raise data.DataError("--eval_only needs --resume <checkpoint>")
        evaluate(start_step)
        return

    data_iter = iter(loader)
    # --bench_one_batch: every step reuses one batch, which times the step alone, without the loader
    one_batch = next(data_iter) if tcfg.bench and tcfg.bench_one_batch else None
    dynamic = tcfg.compile == "on" or (tcfg.compile == "auto" and use_cuda)
    running = None  # loss parts summed on the device since the last log line (no sync per step)
    never = 2**62
    first_bad = torch.tensor(never, device=device)  # first step with a non-finite loss, kept on the device
    t0, t_excl, imgs, log_start, last_good = time.time(), 0.0, 0, start_step, None
    data_wait = [0.0]  # seconds blocked on the loader since the last log line (does the loader keep up?)
    def train_step(step):
        """One optimizer step of grad_accum micro-steps. Returns the loss parts summed over the
        micro-steps (on the device: no sync), the images seen and the last (Nc, Nt)."""
        lr, wd, momentum = schedules(step, tcfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.param_groups[0]["weight_decay"] = wd
        total, n_img = 0.0, 0
        for micro in range(tcfg.grad_accum):
            t_wait = time.perf_counter()
            batch = one_batch if one_batch is not None else next(data_iter)
            data_wait[0] += time.perf_counter() - t_wait
            B = batch["images"].size(0)
            ctx, tgt = sample_masks(B, mcfg, seeded(tcfg.seed, step, rank, micro, 3))  # on CPU: no GPU sync
            images, tokens, wm, ctx, tgt = (x.to(device, non_blocking=True) for x in
                                            (batch["images"], batch["tokens"], batch["word_mask"], ctx, tgt))
            if tcfg.shuffle_captions:  # control: every image gets the captions of its neighbour
                tokens, wm = tokens.roll(1, 0), wm.roll(1, 0)
            if dynamic:  # block sizes change per batch: one compiled graph for all of them
                torch._dynamo.mark_dynamic(ctx, 1)
                torch._dynamo.mark_dynamic(tgt, 2)
            if ddp:  # all-reduce gradients on the last micro-step only (nanoGPT's idiom)
                model.require_backward_grad_sync = micro == tcfg.grad_accum - 1
            with autocast:
                out = model(images, ctx, tgt, tokens, wm)
            (out["loss"] / tcfg.grad_accum).backward()
            total = total + torch.stack([out[k].detach().float() for k in LOGGED])
            n_img += B * world
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw_model.update_target(momentum)
        return total, n_img, (ctx.size(1), tgt.size(2))

    if tcfg.bench:
        return benchmark(train_step, raw_model, tcfg, mcfg, device, peak_flops, print0, data_wait)

    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.max_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout)

    status = "running"
    for step in range(start_step, tcfg.max_steps):
        parts, n_img, shapes = train_step(step)
        running = parts if running is None else running + parts
        first_bad = torch.where(parts[0].isfinite(), first_bad, first_bad.clamp(max=step + 1))
        imgs += n_img
        if bar:
            bar.update(1)
        last = step == tcfg.max_steps - 1
        check = last or any((step + 1) % k == 0 for k in (tcfg.log_every, tcfg.eval_every, tcfg.save_every))
        stopping = stop["signal"] is not None and not ddp
        if ddp and (check or (step + 1) % 10 == 0):  # ranks stop together; torchrun kills 30 s after its signal
            flag = torch.tensor(float(stop["signal"] is not None))  # on the CPU: no GPU sync
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group)  # a signal on any rank stops all
            stopping = bool(flag)
        if not (check or stopping):
            continue
        # ---- a check point: the ranks agree on NaN, then log, evaluate, save
        if ddp:
            dist.all_reduce(running, op=dist.ReduceOp.AVG)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if first_bad.item() < never:  # weights after a NaN are not saved
            print0(f"\nloss is not finite at step {first_bad.item()}: stopping without saving. "
                   f"Last good checkpoint: {last_good or 'none'}. Try a lower --lr.")
            status = "nan"
            break
        n = step + 1 - log_start
        vals = (running / (n * tcfg.grad_accum)).tolist()
        lr, wd, momentum = schedules(step, tcfg)
        if use_cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0 - t_excl  # eval and checkpoint time is not step time
        flops = raw_model.flops_per_image(*shapes) * imgs / dt / world  # (Nc, Nt) of the last batch
        rec = dict(step=step + 1, **dict(zip(LOGGED, vals)), lr=lr, momentum=momentum, weight_decay=wd,
                   ms_per_step=1000 * dt / n, img_per_s=imgs / dt, mfu=flops / peak_flops if peak_flops else None,
                   data_wait_ms=1000 * data_wait[0] / n)  # blocked on the loader: ~0 when it keeps up
        running, t0, t_excl, imgs, log_start, data_wait[0] = None, time.time(), 0.0, 0, step + 1, 0.0
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        t_pause = time.time()
        if (step + 1) % tcfg.eval_every == 0 or last:
            evaluate(step + 1)
        if (step + 1) % tcfg.save_every == 0 or last or stopping:
            if master:
                save_checkpoint(ckpt_path, raw_model, opt, tcfg, mcfg, step, tokenizer)
            last_good = f"{ckpt_path} (step {step + 1})"
        t_excl += time.time() - t_pause
        if stopping:
            print0(f"\n{stop['signal'] or 'signal on another rank'}: saved {ckpt_path} at step {step + 1}; "
                   f"continue with --resume {ckpt_path}")
            status = "stopped"
            break
    else:
        status = "done"
    if bar:
        bar.close()
    if master and tcfg.dataset == "shapes" and status == "done":
        torch.manual_seed(tcfg.seed)  # the very same encoder at initialization: random features are a strong baseline
        init = probes(TCJEPA(mcfg).to(device), train_set, val_set, tcfg.probe_train, device, autocast)
        final = json.loads(open(log_path).read().strip().splitlines()[-1])
        print("\nlinear probes on the frozen target encoder (shapes val):")
        print(f"{'probe':<18}{'random init':>12}{'trained':>10}")
        for k, x in init.items():
            print(f"{k:<18}{x:>12.4f}{final.get(k, float('nan')):>10.4f}")
        with open(log_path, "a") as f:
            f.write(json.dumps(dict(step=0, init_probes=init)) + "\n")
    print0(f"checkpoint: {ckpt_path}\nlog: {log_path}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    code = 0
    try:
        main()
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
