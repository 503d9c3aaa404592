"""
CPU measurements behind notes/perf.md. Run from the repository root:

  OMP_NUM_THREADS=1 python notes/perf.py            # prints one JSON line per measurement
  python notes/perf.py --coco-fixture DIR N         # writes N fake COCO images per split into DIR
  OMP_NUM_THREADS=1 python notes/perf.py --profile-conditioner   # where one conditioner's time goes

Each timing takes the median of several repeats after a warm-up. The training-step timings
(text conditioner cost, recompilations) are done with notes/bench.py, see notes/perf.md.
"""

import io
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tcjepa  # noqa: E402


def timeit(fn, repeats=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_hw(s, a, G, N):
    """(h, w) of a block of scale s and aspect a on a G x G grid, as tcjepa._block_size."""
    return min(G, max(1, round(math.sqrt(s * N * a)))), min(G, max(1, round(math.sqrt(s * N / a))))


def naive_masks(B, cfg, rng):
    """The same semantics as tcjepa.sample_masks, written the straightforward way: a Python loop
    over images (as the official sampler in its DataLoader workers), then the batch-minimum cut."""
    G, N = cfg.grid, cfg.grid**2

    def size(scale, aspect):
        return block_hw(rng.uniform(*scale), rng.uniform(*aspect), G, N)

    th, tw = size(cfg.target_scale, cfg.target_aspect)
    ch, cw = size(cfg.context_scale, (1.0, 1.0))
    ctxs, tgts = [], []
    for _ in range(B):
        best = None
        for _ in range(20):
            blocks = []
            for _ in range(cfg.n_targets):
                t, l = rng.randint(0, G - th), rng.randint(0, G - tw)
                blocks.append([(t + i) * G + l + j for i in range(th) for j in range(tw)])
            t, l = rng.randint(0, G - ch), rng.randint(0, G - cw)
            covered = {p for b in blocks for p in b}
            ctx = [(t + i) * G + l + j for i in range(ch) for j in range(cw) if (t + i) * G + l + j not in covered]
            if best is None or len(ctx) > len(best[0]):
                best = (ctx, blocks)
            if len(ctx) >= cfg.min_keep:
                break
        ctxs.append(best[0])
        tgts.append(best[1])
    keep = min(len(c) for c in ctxs)
    ctx = torch.tensor([rng.sample(c, keep) for c in ctxs])  # a random subset, in random order
    return ctx, torch.tensor(tgts)


def torch_loop_masks(B, cfg, g):
    """The same semantics, per image with small torch ops as the official sampler writes it
    (torch.randint per block, a (G, G) mask per block, torch.nonzero, a per-image retry loop)."""
    G, N = cfg.grid, cfg.grid**2

    def size(scale, aspect):
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item()
        a = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(1, generator=g).item()
        return block_hw(s, a, G, N)

    def block(h, w):
        t = torch.randint(0, G - h + 1, (1,), generator=g).item()
        l = torch.randint(0, G - w + 1, (1,), generator=g).item()
        mask = torch.zeros(G, G, dtype=torch.int32)
        mask[t:t + h, l:l + w] = 1
        return mask

    th, tw = size(cfg.target_scale, cfg.target_aspect)
    ch, cw = size(cfg.context_scale, (1.0, 1.0))
    ctxs, tgts = [], []
    for _ in range(B):
        best = None
        for _ in range(20):
            blocks = [block(th, tw) for _ in range(cfg.n_targets)]
            covered = torch.stack(blocks).amax(0)
            ctx = torch.nonzero((block(ch, cw) * (1 - covered)).flatten()).squeeze(1)
            if best is None or len(ctx) > len(best[0]):
                best = (ctx, [torch.nonzero(b.flatten()).squeeze(1) for b in blocks])
            if len(ctx) >= cfg.min_keep:
                break
        ctxs.append(best[0])
        tgts.append(torch.stack(best[1]))
    keep = min(len(c) for c in ctxs)
    ctx = torch.stack([c[torch.randperm(len(c), generator=g)[:keep]] for c in ctxs])
    return ctx, torch.stack(tgts)


def boolean_union(top, left, h, w, grid):
    """tcjepa._block_union as first written (kept only to measure the gain of the matmul form):
    a (B, M, N) boolean cover of every block, reduced over the blocks with any()."""
    r = torch.arange(grid, device=top.device)
    rows = (r >= top[..., None]) & (r < top[..., None] + h)  # (B, M, grid)
    cols = (r >= left[..., None]) & (r < left[..., None] + w)
    return (rows[..., :, None] & cols[..., None, :]).flatten(-2).any(1)  # (B, N)


def coco_fixture(root, n, splits=("train", "val")):
    """n COCO-sized (640x480) JPEGs with 5 captions each per split, in the COCO 2017 layout.
    Smooth random colour fields, so they compress like photos rather than like noise."""
    from PIL import Image

    os.makedirs(f"{root}/annotations", exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        os.makedirs(f"{root}/{split}2017", exist_ok=True)
        images, anns = [], []
        for i in range(n):
            arr = (torch.rand(480 // 8, 640 // 8, 3, generator=gen) * 255).byte()
            img = Image.fromarray(arr.numpy()).resize((640, 480), Image.BILINEAR)
            img.save(f"{root}/{split}2017/{i:012d}.jpg", quality=90)
            images.append(dict(id=i, file_name=f"{i:012d}.jpg"))
            anns += [dict(id=5 * i + k, image_id=i, caption=f"a photo number {i} view {k}") for k in range(5)]
        with open(f"{root}/annotations/captions_{split}2017.json", "w") as f:
            json.dump(dict(images=images, annotations=anns), f)


def first_layout_conditioner(cond, x, words, word_mask):
    """The conditioner as first written (kept here only to measure the gain of the current
    layout): captions inside (B, Q, C, .), einsum for the values, amax over captions."""
    q = cond.q(cond.norm_q(x))
    k, v = cond.k(words), cond.v(words)
    dots = torch.einsum("bqp,bcsp->bqcs", q, k)
    mask = word_mask[:, None]
    att = dots.mul(q.size(-1) ** -0.5).masked_fill(~mask, float("-inf"))
    att = att.masked_fill(~mask.any(-1, keepdim=True), 0.0).softmax(-1)
    y = torch.einsum("bqcs,bcsp->bqcp", att, v)
    has_words = word_mask.any(-1)[:, None, :, None]
    y = y.masked_fill(~has_words, float("-inf")).amax(2)
    x = x + torch.where(has_words.any(2), y, 0.0)
    x = x + cond.mlp(cond.norm2(x))
    cos = dots / (q.norm(dim=-1)[:, :, None, None] * k.norm(dim=-1)[:, None] + 1e-6)
    return x, cos.clamp(min=0) * mask


def conditioner_inputs():
    """One conditioner at the shapes default sizes and its inputs: B 64, M*L = 4 x 62 tokens,
    5 captions of 16 slots with 9 real words."""
    cfg = tcjepa.TCJEPAConfig()
    torch.manual_seed(0)
    cond = tcjepa.TextConditioner(cfg)
    x = torch.randn(64, 4 * 62, cfg.pred_width, requires_grad=True)
    words = torch.randn(64, 5, 16, cfg.text_width)
    wm = torch.zeros(64, 5, 16, dtype=torch.bool)
    wm[..., :9] = True
    return cond, x, words, wm


def profile_conditioner():
    """Where one conditioner's forward + backward spends its time (shapes default sizes): the ops
    grouped by input shape; the (64, 5, 248, 64) rows are the per-caption attention outputs."""
    from torch.profiler import profile

    cond, x, words, wm = conditioner_inputs()

    def fwd_bwd():
        cond(x, words, wm)[0].sum().backward()

    for _ in range(3):
        fwd_bwd()
    with profile(record_shapes=True) as prof:
        for _ in range(10):
            fwd_bwd()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    big = sum(e.self_cpu_time_total for e in events if "[64, 5, 248, 64]" in str(e.input_shapes))
    print(f"ops with a (64, 5, 248, 64) input: {100 * big / total:.1f}% of the self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=30,
                       max_shapes_column_width=70))


def main():
    import random

    out = []
    # 1. mask sampling, batch 256 on the 14x14 grid of ViT-B/16 at 224
    cfg = tcjepa.TCJEPAConfig.vit_b16()
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    vec = timeit(lambda: tcjepa.sample_masks(256, cfg, g))
    loop = timeit(lambda: naive_masks(256, cfg, rng), repeats=5)
    tloop = timeit(lambda: torch_loop_masks(256, cfg, g), repeats=5)
    out.append(dict(what="masks B=256 grid 14x14 (vit_b16, min_keep 10)", vectorized_ms=1000 * vec,
                    python_loop_ms=1000 * loop, speedup=loop / vec, torch_loop_ms=1000 * tloop,
                    speedup_vs_torch_loop=tloop / vec))
    # two speed-ups of the sampler (notes/perf.md): the union of blocks as a matmul, and no sort of the context
    matmul_union = tcjepa._block_union
    tcjepa._block_union = boolean_union
    boolean = timeit(lambda: tcjepa.sample_masks(256, cfg, g), repeats=21)
    tcjepa._block_union = matmul_union
    now = timeit(lambda: tcjepa.sample_masks(256, cfg, g), repeats=21)
    ctx = tcjepa.sample_masks(256, cfg, g)[0]
    sort = timeit(lambda: ctx.sort(1), repeats=21)
    out.append(dict(what="masks 14x14: union as matmul vs boolean any(); cost of sorting the context",
                    boolean_union_ms=1000 * boolean, matmul_union_ms=1000 * now, sort_ctx_ms=1000 * sort))
    cfg = tcjepa.TCJEPAConfig()  # shapes: 8x8 grid, min_keep 24, where redraws happen
    vec = timeit(lambda: tcjepa.sample_masks(256, cfg, g))
    loop = timeit(lambda: naive_masks(256, cfg, rng), repeats=5)
    tloop = timeit(lambda: torch_loop_masks(256, cfg, g), repeats=5)
    out.append(dict(what="masks B=256 grid 8x8 (shapes, min_keep 24)", vectorized_ms=1000 * vec,
                    python_loop_ms=1000 * loop, speedup=loop / vec, torch_loop_ms=1000 * tloop,
                    speedup_vs_torch_loop=tloop / vec))

    # 1b. one text conditioner, forward + backward, shapes default sizes (B 64, M*L = 4 x 62 tokens,
    # 5 captions of 16 slots, 9 real words): current layout vs the first one
    cond, x, words, wm = conditioner_inputs()

    def fwd_bwd(fn):
        y, O = fn()[:2]
        (y.sum() + O.sum()).backward()

    now = timeit(lambda: fwd_bwd(lambda: cond(x, words, wm)), repeats=21)
    first = timeit(lambda: fwd_bwd(lambda: first_layout_conditioner(cond, x, words, wm)), repeats=21)
    out.append(dict(what="one text conditioner fwd+bwd, B 64, Q 248, C 5, S 16, P 64", current_ms=1000 * now,
                    first_layout_ms=1000 * first, speedup=first / now))

    # 2. context sizes that reach the model (batch minimum), shapes grid 8x8, batch 128
    for min_keep in (10, 24):
        c = tcjepa.TCJEPAConfig(min_keep=min_keep)
        g = torch.Generator().manual_seed(0)
        n = [tcjepa.sample_masks(128, c, g)[0].shape[1] for _ in range(50)]
        out.append(dict(what=f"context patches kept, 8x8 grid, batch 128, min_keep {min_keep}",
                        mean=statistics.mean(n), min=min(n), max=max(n)))

    # 3. EMA update: fused foreach lerp vs a loop over parameters (ViT-B encoder)
    model = tcjepa.TCJEPA(tcjepa.TCJEPAConfig.vit_b16(text_cond="none"))
    fused = timeit(lambda: model.update_target(0.996))

    def loop_ema(m=0.996):
        with torch.no_grad():
            for t, s in zip(model.target.parameters(), model.encoder.parameters()):
                t.mul_(m).add_(s, alpha=1 - m)

    loop = timeit(loop_ema)
    out.append(dict(what="EMA update, ViT-B/16 encoder (86M params)", foreach_ms=1000 * fused,
                    loop_ms=1000 * loop, speedup=loop / fused))
    del model

    # 4. shapes rendering, one thread, batch 256
    ds = data.ShapesDataset("train")
    sec = timeit(lambda: ds.render(list(range(256))))
    out.append(dict(what="shapes render, batch 256", img_per_s=256 / sec))

    # 5. COCO decode + RandomResizedCrop(224) per DataLoader worker, on COCO-sized JPEGs (640x480)
    with tempfile.TemporaryDirectory() as root:
        coco_fixture(root, 64, splits=("train",))
        sys.stdout = io.StringIO()  # the dataset prints its summary line
        coco = data.CocoCaptions(root, "train", img_size=224)
        sys.stdout = sys.__stdout__
        sec = timeit(lambda: [coco[(i, i)] for i in range(64)], repeats=3)

        def decode_only():  # the JPEG decode alone: what GPU decoding could take off the workers
            from PIL import Image

            for path in coco.files:
                with Image.open(path) as im:
                    im.convert("RGB")

        dec = timeit(decode_only, repeats=3)
        out.append(dict(what="COCO decode + RandomResizedCrop(224), 640x480 JPEG, one worker", img_per_s=64 / sec,
                        ms_per_img=1000 * sec / 64, decode_only_ms_per_img=1000 * dec / 64))

    for rec in out:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--coco-fixture"]:  # python notes/perf.py --coco-fixture DIR N (used by gpu_check.sh)
        coco_fixture(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--profile-conditioner"]:
        profile_conditioner()
    else:
        main()
