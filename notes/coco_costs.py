"""
The measurements of notes/coco.md: what the COCO probes cost on the CPU, how the polygon fill compares
with PIL's and COCO's, and the example output. No COCO is needed: each subcommand makes its own inputs
(in a temporary directory, deleted at the end). Timings run at one thread (torch.set_num_threads(1)).

  python notes/coco_costs.py parse     # ~1 min, 3.5 GB of memory and 0.4 GB of disk
  python notes/coco_costs.py raster    # ~10 s
  python notes/coco_costs.py probes    # ~30 s
  python notes/coco_costs.py polygons  # ~10 s; needs pycocotools (pip install pycocotools), not a dependency
  python notes/coco_costs.py example   # ~15 s

parse     writes a synthetic instances_train2017.json of the real size (118,287 images, 860,000
          annotations, COCO's 80 category ids) and prints its size, then the wall, user and system
          time and the peak memory of data.read_instances on the 2,000 ids data.coco_probe_data picks
          (the peak of the whole process, the same as `/usr/bin/time -v`'s maximum resident set size).
raster    per 640x480 image with 7 polygons of 15 vertices, the best of 5 passes over 100 scenes: the
          label map (data.instance_label_map), + the evaluation view (data.eval_crop), and a whole probe
          item (data.CocoProbeSet: decoding a 640x480 noise JPEG, the view and the labels).
probes    at ViT-B/16, 224 px: the target encoder on 8 images, a StreamingRidge(768, 81) update with
          8 x 196 patch rows and its solve(), the dense scoring, and a pooled ridge fit, an
          average_precision and a rankme at the sizes of a last evaluation (2,000 train, 5,000 val).
polygons  area and pixel disagreement of data._paint_polygon (pixel centres) and PIL's
          ImageDraw.polygon against pycocotools' masks: on 140 random 30-vertex polygons of COCO-like
          sizes, and on small objects (square root of the area 3-10 px).
example   writes the 6-image fixture of the tests (test_tcjepa._write_coco, _write_instances) and runs
          the two train.py commands of notes/coco.md §4 (a 2-step run, then --eval_only), printing
          their output.
"""

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train  # noqa: E402


def each(fn, items):
    """Calls fn on every item, keeping no result: a list of 100 full-size maps would time page faults."""
    for it in items:
        fn(it)


def best_of(fn, reps):
    """The fastest of reps calls, in seconds: the least disturbed by other jobs on the machine."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def polygon(rng, r, k, xs, ys):
    """k vertices at sorted random angles around a centre drawn in the ranges xs, ys, at 0.6-1 x radius r:
    a star-shaped, simple polygon, [x1, y1, x2, y2, ...]."""
    cx, cy = rng.uniform(*xs), rng.uniform(*ys)
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(k))
    return [v for a in angles
            for v in (cx + r * rng.uniform(.6, 1) * math.cos(a), cy + r * rng.uniform(.6, 1) * math.sin(a))]


def scenes(n, k, seed=0):
    """n 640x480 scenes of 7 instances (label, area, [polygon], iscrowd) as data.read_instances gives them.
    Radii 8-220 px, log-uniform: COCO's objects run from a few pixels to the whole image."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        anns = []
        for _ in range(7):
            r = math.exp(rng.uniform(math.log(8), math.log(220)))
            p = polygon(rng, r, k, (0, 640), (0, 480))
            anns.append((rng.randint(1, 80), 0.64 * math.pi * r * r, [p], 0))  # mean radius 0.8 r
        out.append(anns)
    return out


# ----------------------------------------------------------------------------- parse

COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]  # 80


def write_instances(path, n_images=118287, n_anns=860000, seed=0):
    """A synthetic instances_train2017.json of the real file's size and shape; returns its sorted image ids.

    Sparse ids up to 581,929 as train2017's; at least one annotation per image; polygons of 20-44
    coordinates at 2 decimals, 30% in two parts; 1% crowd masks as 1,000-run uncompressed RLE over the
    whole image (COCO's crowd masks); the areas and boxes are random (read_instances only copies them)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    ids = sorted(rng.sample(range(1, 581930), n_images))
    per_image = torch.bincount(torch.randint(0, n_images, (n_anns - n_images,), generator=g), minlength=n_images) + 1
    size = {i: (640, 360 + i % 281) for i in ids}  # COCO's images are 640 px on the long side
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic"}, "licenses": [], "images": [')
        f.write(",".join(json.dumps(dict(id=i, file_name=f"{i:012d}.jpg", width=size[i][0], height=size[i][1],
                                         license=1, coco_url="", flickr_url="", date_captured="")) for i in ids))
        f.write('], "annotations": [')
        aid = 0
        for i, k in zip(ids, per_image.tolist()):
            for _ in range(k):
                aid += 1
                seg, crowd = synthetic_segmentation(rng, g, *size[i])
                bbox = [round(rng.uniform(0, size[i][0]), 2) for _ in range(4)]
                f.write(("," if aid > 1 else "") + f'{{"segmentation": {seg}, "area": {rng.uniform(10, 60000)!r}, '
                        f'"iscrowd": {crowd}, "image_id": {i}, "bbox": {json.dumps(bbox)}, '
                        f'"category_id": {rng.choice(COCO_CATEGORY_IDS)}, "id": {aid}}}')
        f.write('], "categories": [' + ",".join(json.dumps(dict(supercategory="s", id=c, name=f"cat{c}"))
                                              for c in COCO_CATEGORY_IDS) + "]}")
    return ids


def synthetic_segmentation(rng, g, w, h):
    """(segmentation as JSON text, iscrowd) for one annotation of a w x h image."""
    if rng.random() < 0.01:  # crowd: 1,000 runs that add up to the image, as read_instances checks
        cuts = torch.randint(1, w * h, (999,), generator=g).sort().values
        runs = torch.cat([cuts, torch.tensor([w * h])]) - torch.cat([torch.tensor([0]), cuts])
        return '{"counts": [' + ",".join(map(str, runs.tolist())) + f'], "size": [{h}, {w}]}}', 1
    parts = []
    for _ in range(2 if rng.random() < 0.3 else 1):
        n = rng.randrange(10, 23)  # 10-22 points: 20-44 coordinates
        parts.append("[" + ",".join(f"{rng.uniform(0, s):.2f}" for _ in range(n) for s in (w, h)) + "]")
    return "[" + ",".join(parts) + "]", 0


def cmd_parse():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "instances_train2017.json"
        ids = write_instances(path)
        print(f"synthetic {path.name}: {path.stat().st_size / 1e6:.0f} MB, {len(ids)} images")
        idx = torch.linspace(0, len(ids) - 1, 2000).round().long().unique().tolist()  # as data.coco_probe_data
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        names, _, images, dropped = data.read_instances(path, image_ids=[ids[i] for i in idx])
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss is the peak of the whole process; writing the file holds little, so this is the parse's
    print(f"read_instances: {wall:.1f} s wall ({r1.ru_utime - r0.ru_utime:.1f} s user, "
          f"{r1.ru_stime - r0.ru_stime:.1f} s system), {len(names)} categories, {len(images)} images, "
          f"{sum(len(r['anns']) for r in images.values())} annotations kept, {dropped.get('compressed crowd mask', 0)} compressed; "
          f"peak RSS {r1.ru_maxrss / 1e6:.2f} GB")


# ----------------------------------------------------------------------------- raster


def cmd_raster():
    scs = scenes(100, k=15)

    def label_map(anns):
        return data.instance_label_map(anns, 480, 640)

    def with_crop(anns):  # as CocoProbeSet.label_map: the uint8 map through the evaluation view
        m = label_map(anns).to(torch.uint8)[None]
        return data.eval_crop(m, 224, TF.InterpolationMode.NEAREST_EXACT)

    steps = {"instance_label_map": label_map, "+ eval_crop (NEAREST_EXACT)": with_crop}
    best = dict.fromkeys(steps, math.inf)
    for _ in range(5):  # the two steps in turn: other jobs then slow both alike
        for name, fn in steps.items():
            best[name] = min(best[name], best_of(lambda: each(fn, scs), 1))
    for name, t in best.items():
        print(f"{name}: {t / len(scs) * 1e3:.2f} ms per 640x480 image, 7 polygons of 15 vertices")
    with tempfile.TemporaryDirectory() as d:
        jpg = os.path.join(d, "noise.jpg")
        # noise: harder to decode than a photo, so an upper bound on a COCO image's decode
        noise = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        TF.to_pil_image(noise).save(jpg, quality=90)
        records = [dict(width=640, height=480, anns=a) for a in scs]
        ds = data.CocoProbeSet([jpg] * len(scs), records, [["a dog"]] * len(scs), ["dog"], img_size=224, patch_size=16)
        t = best_of(lambda: each(ds.__getitem__, range(len(ds))), 5)
        print(f"whole probe item (decode a {os.path.getsize(jpg) / 1e3:.0f} KB 640x480 noise JPEG + view + labels): "
              f"{t / len(ds) * 1e3:.2f} ms")


# ----------------------------------------------------------------------------- probes


def encoder_flops(cfg):
    """Forward matmul FLOPs of the encoder per image: the forward part of TCJEPA.flops_per_image."""
    D, N, hid = cfg.width, cfg.grid**2, int(cfg.width * cfg.mlp_ratio)
    block = 2 * N * (4 * D * D + 2 * D * hid) + 2 * 2 * N * N * D
    return 2 * N * D * cfg.in_chans * cfg.patch_size**2 + cfg.depth * block


def cmd_probes():
    torch.manual_seed(0)
    model = train.TCJEPA(train.TCJEPAConfig.vit_b16()).eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        model.encode(x[:2])  # warm-up: the first call allocates
        t = best_of(lambda: model.encode(x), 2)
        f = model.encode(x).float()  # (8, 196, 768)
    gflop = encoder_flops(model.cfg) / 1e9
    print(f"encode 8 images: {t:.2f} s ({t / 8 * 1e3:.0f} ms/image; ~{gflop:.0f} GFLOP/image, "
          f"{8 * gflop / t:.0f} GFLOP/s)")

    # the dense probe: one batch of 8 images' patches, streamed as StreamingRidge does for every batch
    X, y = f.flatten(0, 1), torch.randint(0, 81, (8 * 196,))
    Y = F.one_hot(y, 81)
    ridge = data.StreamingRidge(768, 81, class_weight=torch.rand(81) + 0.1).update(X, Y)
    t_up = best_of(lambda: ridge.update(X, Y), 3)
    t_solve = best_of(ridge.solve, 3)
    score, conf = ridge.solve(), data.Confusion(81)
    t_score = best_of(lambda: conf.update(score(X).argmax(1), y), 3)
    print(f"StreamingRidge.update 1568 x 768 -> 81: {t_up * 1e3:.0f} ms; solve(): {t_solve * 1e3:.0f} ms; "
          f"score + argmax + Confusion.update of 1568 rows: {t_score * 1e3:.1f} ms")

    # the pooled probes of a last evaluation: 2,000 train and 5,000 val images, 100 caption words
    Xtr, Xva = torch.randn(2000, 768), torch.randn(5000, 768)
    Ptr, Pva = (torch.rand(2000, 100) < 0.05).float(), (torch.rand(5000, 100) < 0.05).float()
    t_fit = best_of(lambda: data.ridge_fit(Xtr, Ptr)(Xva), 3)
    s = data.ridge_fit(Xtr, Ptr)(Xva)
    t_ap = best_of(lambda: data.average_precision(s, Pva), 3)
    t_rank = best_of(lambda: data.rankme(Xva), 3)
    print(f"pooled ridge_fit 2000 x 768 -> 100 + scoring 5000: {t_fit * 1e3:.0f} ms; average_precision "
          f"5000 x 100: {t_ap * 1e3:.0f} ms; rankme 5000 x 768: {t_rank * 1e3:.0f} ms")


# ----------------------------------------------------------------------------- polygons


def masks(xy, h, w, coco_mask):
    """The polygon's (h, w) bool masks: pixel centres (data._paint_polygon), PIL, pycocotools."""
    ours = torch.zeros(h, w, dtype=torch.uint8)
    data._paint_polygon(ours, xy, 1)
    im = Image.new("L", (w, h))
    ImageDraw.Draw(im).polygon(xy, fill=1)
    coco = torch.from_numpy(coco_mask.decode(coco_mask.frPyObjects([xy], h, w))[..., 0].astype(bool))
    return ours > 0, TF.pil_to_tensor(im)[0] > 0, coco


def compare(polys, h, w, coco_mask, keep=lambda coco: True):
    """Areas and pixels that differ from COCO's mask, summed over the polygons that keep accepts."""
    tot = dict(n=0, coco=0, ours=0, pil=0, ours_diff=0, pil_diff=0)
    for xy in polys:
        ours, pil, coco = masks(xy, h, w, coco_mask)
        if not keep(coco):
            continue
        tot["n"] += 1
        for k, m in (("coco", coco), ("ours", ours), ("pil", pil)):
            tot[k] += m.sum().item()
        tot["ours_diff"] += (ours != coco).sum().item()
        tot["pil_diff"] += (pil != coco).sum().item()
    return tot


def report(name, t):
    c = t["coco"]
    print(f"{name}: {t['n']} polygons, COCO area {c:,} px; pixel centres: area {t['ours'] / c - 1:+.1%}, "
          f"differ on {t['ours_diff']:,} px ({t['ours_diff'] / c:.2%}); PIL: area {t['pil'] / c - 1:+.1%}, "
          f"differ on {t['pil_diff']:,} px ({t['pil_diff'] / c:.2%})")


def cmd_polygons():
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        sys.exit("polygons needs pycocotools (not a project dependency): pip install pycocotools")
    polys = [seg[0] for anns in scenes(20, k=30) for _, _, seg, _ in anns]  # 140 polygons
    report("30-vertex polygons, radius 8-220 px, 640x480", compare(polys, 480, 640, coco_mask))
    # small objects: 12 vertices in a 64x64 image, kept when sqrt(COCO's area) is 3-10 px
    rng = random.Random(1)
    small = [polygon(rng, rng.uniform(1.5, 8), 12, (10, 54), (10, 54)) for _ in range(800)]  # inside the image
    report("small objects, sqrt(area) 3-10 px", compare(small, 64, 64, coco_mask,
                                                         keep=lambda coco: 9 <= coco.sum().item() <= 100))


# ----------------------------------------------------------------------------- example

# notes/coco.md §4: the flags of test_coco_probes_end_to_end_on_the_fixture, after test_tcjepa.TINY
COCO = ("--dataset coco --img_size 32 --patch_size 8 --batch_size 2 --max_steps 2 --eval_every 2 --log_every 1 "
        "--num_workers 0 --probe_train 5 --probe_words 8").split()


def cmd_example():
    import test_tcjepa  # the fixture's writers; imported here as the other subcommands do not need pytest
    with tempfile.TemporaryDirectory() as d:
        coco, out = Path(d) / "coco", Path(d) / "probe"
        test_tcjepa._write_coco(coco)
        test_tcjepa._write_instances(coco)
        common = [*test_tcjepa.TINY, *COCO, "--data_dir", str(coco), "--out_dir", str(out)]
        for extra in ([], ["--resume", str(out / "ckpt.pt"), "--eval_only", "true"]):
            shown = " ".join(["python train.py $TINY $COCO --out_dir $D/probe", *extra]).replace(d, "$D")
            print(f"=== {shown}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # stdout and stderr in order
            subprocess.run([sys.executable, "train.py", *common, *extra], cwd=ROOT, env=env, check=True)


COMMANDS = dict(parse=cmd_parse, raster=cmd_raster, probes=cmd_probes, polygons=cmd_polygons, example=cmd_example)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    args = p.parse_args()
    torch.set_num_threads(1)  # the notes' costs are per thread
    COMMANDS[args.command]()


if __name__ == "__main__":
    main()
