"""
What --dataset captions costs as the data grows (README: Your own captioned images).

  python notes/captions_scale.py index 100000 300000   # start-up time and index memory, per million images
  python notes/captions_scale.py decode 300            # images per second one loader worker decodes

index N: writes a synthetic train.jsonl of N images with 8 caption sentences each (~95 characters a
sentence, ShareGPT4V-like) and N empty image files, then times CaptionsDataset.splits (reading the
manifest, splitting sentences, checking every image exists, packing) and measures the resident
memory it adds (in a fresh process per N). decode N: N JPEGs of 500x375 (ImageNet's typical size;
smooth colour fields, as notes/perf.py's COCO fixture), each read, decoded, cropped and resized to
224 as a training item is, in one process.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

WORDS = "a the red blue small large dog cat tree sky road car person table cup window light shadow left right".split()


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write(root, n):
    rng = random.Random(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(n):
            rel = f"img/{i:08d}.jpg"
            open(os.path.join(root, rel), "w").close()
            caps = [" ".join(rng.choice(WORDS) for _ in range(18)).capitalize() + "." for _ in range(8)]
            f.write(json.dumps(dict(image=rel, captions=[" ".join(caps)])) + "\n")


def index_child(root):
    """In a fresh process: time and memory of reading the manifest into the two splits."""
    before = rss_mb()
    t0 = time.perf_counter()
    train, val = data.CaptionsDataset.splits(root, img_size=224)
    dt = time.perf_counter() - t0
    packed = (len(train._captions.buf) + len(train.files.buf)) / 2**20
    print(json.dumps(dict(images=len(train) + len(val), seconds=dt, rss_added_mb=rss_mb() - before,
                          packed_mb=packed)))


def index(sizes):
    for n in sizes:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            write(root, n)
            print(f"wrote {n} entries in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "_child", root], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            per_m = 1e6 / r["images"]
            print(f"{r['images']} images: start-up {r['seconds']:.1f} s ({r['seconds'] * per_m:.0f} s per million), "
                  f"memory +{r['rss_added_mb']:.0f} MB ({r['rss_added_mb'] * per_m / 1024:.2f} GB per million; "
                  f"the packed strings {r['packed_mb'] * per_m / 1024:.2f} GB per million)")


def decode(n):
    """Smooth random colour fields (as notes/perf.py's COCO fixture), so they compress like photos."""
    import torch
    from PIL import Image
    with tempfile.TemporaryDirectory() as root:
        gen, lines = torch.Generator().manual_seed(0), []
        for i in range(n):
            arr = (torch.rand(375 // 8, 500 // 8, 3, generator=gen) * 255).byte()
            Image.fromarray(arr.numpy()).resize((500, 375), Image.BILINEAR).save(f"{root}/{i}.jpg", quality=90)
            lines.append(json.dumps(dict(image=f"{i}.jpg", captions=["a picture."])))
        open(os.path.join(root, "train.jsonl"), "w").write("\n".join(lines))
        train, _ = data.CaptionsDataset.splits(root, img_size=224)
        for i in range(min(20, len(train))):  # warm the file cache and the code paths
            train[(i, i)]
        t0 = time.perf_counter()
        for i in range(len(train)):
            train[(i, i)]
        dt = time.perf_counter() - t0
        print(f"decode + crop + resize to 224, one worker: {len(train) / dt:.0f} images/s ({len(train)} JPEGs of "
              f"500x375, {os.path.getsize(os.path.join(root, '0.jpg')) / 1024:.0f} kB each)")


if __name__ == "__main__":
    if sys.argv[1] == "_child":
        index_child(sys.argv[2])
    elif sys.argv[1] == "index":
        index([int(x) for x in sys.argv[2:]] or [100000])
    elif sys.argv[1] == "decode":
        decode(int(sys.argv[2]) if len(sys.argv) > 2 else 300)
