"""
Data for TC-JEPA: captioned images, a tokenizer, batching, ground truth, and the probes that score
a frozen encoder against that ground truth.

Two sources of (image, captions):
  ShapesDataset  built in, no download: scenes of 1-4 large coloured shapes on a 3x3 grid, each
                 with 5 captions and per-pixel ground truth (shape_map, color_map) for probes.
                 Rendered on the fly, a whole batch in one vectorized call.
  CocoCaptions   the real COCO 2017 captions layout, with I-JEPA's crop augmentation.
Then a word-level tokenizer, Collate (picks and tokenizes captions into a batch), StepSampler (the
seeded data order), patch_labels (one majority label per ViT patch, for dense probes), and the
ground truth of the COCO probes: read_instances, instance_label_map (polygons and crowd RLE),
caption-word targets, CocoProbeSet (the fixed evaluation view). json, PIL and torch only: no
pycocotools.

The probes live here, beside the ground truth they are scored on, and not in train.py: they take
an `encode` function (images -> patch features), never the model or the training state, so the
training script tells the story of a run and a user can score any encoder with them. Ridge
probes, mIoU, average precision, RankMe (shapes_probes, coco_probes), and the grounding of the
conditioner's patch-word similarities on the shapes data (grounding_probe).

Shape legend: B batch, C captions per image, S words per caption, H/W pixels, N objects in a batch
(patches in the probes). A dataset key is an int index or a tuple (index, sample_seed); all
randomness of an item comes from that key, so results do not depend on DataLoader workers.
"""

import json
import math
import os
import random
import re
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers


class UserError(Exception):
    """The user must act: a one-line message that says what is wrong and what to do (train.py prints
    it as its last line and exits 1)."""


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalization


def _normalize(x):  # (B, 3, H, W) in [0, 1] -> normalized
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _split_key(key):
    """int -> (index, 0); (index, sample_seed) -> (index, sample_seed)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


# -----------------------------------------------------------------------------
# shapes: geometry
# Each shape lives in unit coordinates u (right), v (down) and fits the box [-1, 1]^2, so an
# object of radius r covers at most a 2r x 2r square: objects in different cells never overlap.
# u is (n, 1, W) and v is (n, H, 1); every test broadcasts to an (n, H, W) mask.


_SHAPE_FNS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.82,  # about the circle's area
    "triangle": lambda u, v: (v <= 0.75) & (u.abs() <= 0.56 * (v + 0.95)),  # apex up, base 1.9 wide
    "diamond": lambda u, v: u.abs() + v.abs() <= 1,
    "cross": lambda u, v: ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),
    # inner radius 0.6: the hole stays >= 2 px wide even for a small ring at 64 px
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.36),
    # six-pointed: two equilateral triangles of circumradius 1 (no atan2 needed)
    "star": lambda u, v: (((v <= 0.5) & (u.abs() <= 0.577 * (v + 1)))
                          | ((v >= -0.5) & (u.abs() <= 0.577 * (1 - v)))),
}
SHAPES = list(_SHAPE_FNS)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
COLOR_RGB = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 205, 40),  # same order as COLORS
             (140, 60, 200), (240, 130, 30), (40, 200, 210), (240, 110, 190)]
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
BIG, SMALL = 0.45, 0.28  # object radius as a fraction of a grid cell (big nearly fills its cell)
PAIR_RADIUS = 0.40  # layout "pairs": both objects' radius, as a fraction of a cell of the 2x2 grid
LAYOUTS = ("grid3", "pairs")  # 1-4 objects of two sizes on a 3x3 grid; exactly 2 shapes, one colour, 2x2
CAPTION_MODES = ("mixed", "complement", "substitute")  # see _captions, _pair_captions

# -----------------------------------------------------------------------------
# shapes: captions. Several templates and synonyms so that no single word identifies a caption
# type; the words that carry information are always size, color, shape and position.

_SIZE_WORDS = {True: ("big", "large"), False: ("small", "little", "tiny")}
_ONE = ("a {o} at the {p}", "there is a {o} at the {p}", "a {o} in the {p}", "{p}: a {o}",
        "the {o} sits at the {p}", "at the {p} there is a {o}", "you can see a {o} in the {p}")
_ALL = ("{l}", "an image with {l}", "a picture of {l}")
_P_ALL = 0.4  # chance that a spare caption slot names all objects (no positions) instead of one


def _position(row, col, rng):
    r, c = ROWS[row], COLS[col]
    if row == 1 and col == 1:
        return rng.choice(("center", "middle"))
    if row == 1:
        return rng.choice((f"middle {c}", f"center {c}"))  # a bare "left" reads badly: "in the left"
    if col == 1:
        return rng.choice((r, f"{r} middle", f"{r} center"))
    return rng.choice((f"{r} {c}", f"{r} {c} corner"))


def _one_caption(obj, rng):
    cell, shape, color, big = obj[:4]
    o = f"{rng.choice(_SIZE_WORDS[big])} {COLORS[color]} {SHAPES[shape]}"
    return rng.choice(_ONE).format(o=o, p=_position(cell // 3, cell % 3, rng))


def _all_caption(objs, rng):
    names = [f"{COLORS[c]} {SHAPES[s]}" for _, s, c, *_ in rng.sample(objs, len(objs))]
    names = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
    lst = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return rng.choice(_ALL).format(l=lst)


def _pair_captions(objs, mode, rng, n=5):
    """Layout "pairs" (notes/experiments.md §7). complement: every caption names both shapes, in
    random order, with no position, colour or size word ("a star and a circle"): useful only with
    what the context shows. substitute: each caption names one object with its position ("a star at
    the top left"); every object gets one, the spare slots name a random one."""
    if mode == "complement":
        caps = []
        for _ in range(n):
            a, b = rng.sample([SHAPES[o[1]] for o in objs], 2)
            caps.append(rng.choice(_ALL).format(l=f"a {a} and a {b}"))
        return caps
    def one(obj):
        row, col = ROWS[0 if obj[0] < 2 else 2], COLS[0 if obj[0] % 2 == 0 else 2]
        pos = rng.choice(("{r} {c}", "{r} {c} corner")).format(r=row, c=col)
        return rng.choice(_ONE).format(o=SHAPES[obj[1]], p=pos)
    caps = [one(o) for o in objs] + [one(rng.choice(objs)) for _ in range(n - len(objs))]
    rng.shuffle(caps)
    return caps


def _captions(objs, rng, n=5):
    """Every object gets one caption; the spare slots name one object or all of them."""
    caps = [_one_caption(o, rng) for o in objs]
    for _ in range(n - len(objs)):
        for _ in range(5):  # a few redraws avoid exact repeats (likely with a single object)
            c = _all_caption(objs, rng) if rng.random() < _P_ALL else _one_caption(rng.choice(objs), rng)
            if c not in caps:
                break
        caps.append(c)
    rng.shuffle(caps)
    return caps


# -----------------------------------------------------------------------------
# shapes: the dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Captioned scenes of 1-4 shapes, one per cell of a 3x3 grid, on a smooth textured background.
    layout="pairs": exactly 2 different shapes in one shared colour, one per cell of a 2x2 grid, with
    captions="complement" or "substitute" (the same images for both: captions are drawn last).

    Fixed per (seed, split, index): sample_seed in a key is only passed through. Objects are large
    (a big one nearly fills its cell) so that an I-JEPA target block can hide most of one and its
    caption is then worth reading (notes/experiments.md §5). The background is a faint random wave pattern:
    not flat, so it is not trivially predictable, but of low contrast so it does not dominate a
    feature-prediction loss.
    """

    def __init__(self, split="train", size=None, img_size=64, seed=0, layout="grid3", captions="mixed"):
        if split not in ("train", "val"):
            raise UserError(f"unknown split {split!r}: use 'train' or 'val'")
        known = layout in LAYOUTS and captions in CAPTION_MODES
        if not known or (layout == "pairs") != (captions != "mixed"):
            raise UserError(f"shapes layout {layout!r} with captions {captions!r}: use grid3 with mixed, "
                            f"or pairs with complement or substitute")
        self.split, self.img_size, self.seed = split, img_size, seed
        self.layout, self.caption_mode = layout, captions
        self.cells = 3 if layout == "grid3" else 2  # grid side
        self.size = size if size is not None else (20000 if split == "train" else 1000)

    def __len__(self):
        return self.size

    def _scene(self, index):
        """Python-side draw of one scene: objects [(cell, shape, color, big, jx, jy)], background
        color, waves, captions."""
        # a string seed is hashed with sha512 by random.Random: stable across runs and Python versions,
        # and the split in it gives val its own stream (disjoint from train)
        if self.layout == "pairs":
            rng = random.Random(f"shapes-pairs/{self.seed}/{self.split}/{index}")
            shapes, color = rng.sample(range(len(SHAPES)), 2), rng.randrange(len(COLORS))
            objs = [(cell, s, color, True, rng.uniform(-1, 1), rng.uniform(-1, 1))
                    for cell, s in zip(rng.sample(range(4), 2), shapes)]
        else:
            rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}")
            n = rng.randint(1, 4)
            objs = [(cell, rng.randrange(len(SHAPES)), rng.randrange(len(COLORS)), rng.random() < 0.5,
                     rng.uniform(-1, 1), rng.uniform(-1, 1)) for cell in rng.sample(range(9), n)]
        base = rng.uniform(0.3, 0.6)  # dull grey with a slight tint, far from the saturated objects
        bg = [base + rng.uniform(-0.06, 0.06) for _ in range(3)]
        waves = [(rng.uniform(0, math.pi), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * math.pi),
                  *[rng.uniform(0.02, 0.05) for _ in range(3)]) for _ in range(2)]
        # captions come last: they never change the image
        if self.layout == "grid3":
            caps = _captions(objs, rng)
        else:
            caps = _pair_captions(objs, self.caption_mode, rng)
        return objs, bg, waves, caps

    def render(self, indices):
        """The vectorized core: draw scenes in Python, paint them all with batched tensor ops.

        Returns dict(images (B,3,H,W) normalized, shape_map (B,H,W), color_map (B,H,W), object_map
        (B,H,W) (0 background, 1 + the object's slot), attrs (B,A), captions list[list[str]]).
        """
        scenes = [self._scene(int(i)) for i in indices]
        B = len(scenes)
        # one row per object: (image, slot, cell, shape, color, big, jx, jy)
        rows = torch.tensor([(b, k, *o) for b, sc in enumerate(scenes) for k, o in enumerate(sc[0])],
                            dtype=torch.float32)  # (N, 8)
        img, slot, cell, shape, color = rows[:, :5].long().unbind(1)
        obj = self._object_ids(B, img, slot, cell, shape, big=rows[:, 5] > 0, jitter=rows[:, 6:])

        # per-image lookup tables from object id to label, column 0 = background
        shape_lut, color_lut = torch.zeros(B, 5, dtype=torch.long), torch.zeros(B, 5, dtype=torch.long)
        shape_lut[img, slot + 1], color_lut[img, slot + 1] = shape + 1, color + 1
        flat = obj.view(B, -1).long()  # (B, H*W)
        shape_map = shape_lut.gather(1, flat).view_as(obj)  # (B, H, W)
        color_map = color_lut.gather(1, flat).view_as(obj)

        # colors and background are normalized before painting, which saves two full-size passes
        # (3, B*H*W); faster than pal[:, map] (notes/perf.md)
        fg = self._palette().index_select(1, color_map.view(-1))
        fg = fg.view(3, *obj.shape).transpose(0, 1)  # (B, 3, H, W)
        images = torch.where(color_map[:, None] > 0, fg, self._background(scenes))  # (B, 3, H, W)

        ns, nc = len(SHAPES), len(COLORS)
        attrs = torch.zeros(B, ns + nc + 4)
        attrs[img, shape] = 1  # multi-hot shapes present
        attrs[img, ns + color] = 1  # multi-hot colors present
        attrs[torch.arange(B), ns + nc + torch.bincount(img, minlength=B) - 1] = 1  # one-hot count 1..4
        return dict(images=images, shape_map=shape_map, color_map=color_map, object_map=obj, attrs=attrs,
                    captions=[sc[3] for sc in scenes])

    def _object_ids(self, B, img, slot, cell, shape, big, jitter):
        """Objects (N,) -> (B, H, W) uint8 map: 0 background, 1 + slot of the object covering a pixel."""
        S, g = self.img_size, self.cells
        cw = S / g  # cell width in pixels: geometry scales with img_size
        radius = torch.where(big, BIG, SMALL) if g == 3 else torch.full_like(jitter[:, 0], PAIR_RADIUS)
        r = radius * cw  # (N,)
        slack = 0.8 * (0.5 * cw - r)  # center jitter that keeps the object inside its cell
        cx = (cell % g + 0.5) * cw + jitter[:, 0] * slack
        cy = (cell // g + 0.5) * cw + jitter[:, 1] * slack
        p = torch.arange(S) + 0.5  # pixel centers
        u = ((p - cx[:, None]) / r[:, None])[:, None, :]  # (N, 1, W)
        v = ((p - cy[:, None]) / r[:, None])[:, :, None]  # (N, H, 1)

        # each object is tested only against its own shape (a loop over 7 kinds, not over objects)
        masks = torch.zeros(len(img), S, S, dtype=torch.bool)  # (N, H, W)
        for k, fn in enumerate(_SHAPE_FNS.values()):
            sel = (shape == k).nonzero().squeeze(1)
            if len(sel):
                masks[sel] = fn(u[sel], v[sel])
        # objects never overlap, so summing 1 + slot over an image's objects paints them
        obj = torch.zeros(B, S, S, dtype=torch.uint8)
        ids = masks.to(torch.uint8) * (slot + 1).to(torch.uint8)[:, None, None]  # (N, H, W)
        return obj.index_put_((img,), ids, accumulate=True)

    @staticmethod
    def _palette():  # (3, 1 + len(COLORS)) normalized colors; column 0 (background) is never shown
        rgb = torch.tensor([(0, 0, 0)] + COLOR_RGB, dtype=torch.float32) / 255
        return ((rgb - torch.tensor(MEAN)) / torch.tensor(STD)).T

    def _background(self, scenes):
        """Normalized base color + 2 sinusoids of random orientation, frequency (0.5-2.5 cycles per
        image), phase and per-channel amplitude, as ONE batched matmul (cheaper than 3 full-size ops)."""
        S, std = self.img_size, torch.tensor(STD)
        base = (torch.tensor([sc[1] for sc in scenes]) - torch.tensor(MEAN)) / std  # (B, 3)
        w = torch.tensor([sc[2] for sc in scenes])  # (B, 2, 6): angle, cycles, phase, 3 amplitudes
        k = 2 * math.pi * w[..., 1] / S  # (B, 2) radians per pixel
        a, b, phase = k * torch.cos(w[..., 0]), k * torch.sin(w[..., 0]), w[..., 2]
        p = torch.arange(S) + 0.5
        ax, by = a[..., None] * p, b[..., None] * p + phase[..., None]  # (B, 2, W), (B, 2, H)
        # sin(a x + b y + phase) = cos(b y + phase) sin(a x) + sin(b y + phase) cos(a x): a sum of outer
        # products of a column factor (H) and a row factor (W); a row of ones carries the base color
        rows = torch.cat([ax.sin(), ax.cos(), torch.ones_like(ax[:, :1])], 1)  # (B, 5, W)
        amp = (w[..., 3:] / std).repeat(1, 2, 1).transpose(1, 2)  # (B, 3, 4) per channel and factor
        cols = torch.cat([by.cos(), by.sin()], 1)[:, None] * amp[..., None]  # (B, 3, 4, H)
        cols = torch.cat([cols, base[:, :, None, None].expand(-1, -1, 1, S)], 2)  # (B, 3, 5, H)
        return cols.transpose(2, 3) @ rows[:, None]  # (B, 3, H, 5) @ (B, 1, 5, W) -> (B, 3, H, W)

    def __getitems__(self, keys):
        """A batch of items rendered in one call (DataLoader uses this when it exists)."""
        indices, seeds = zip(*map(_split_key, keys))
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} out of range for {self.size} shapes images")
        out = self.render(indices)
        return [dict(image=out["images"][j], captions=out["captions"][j], shape_map=out["shape_map"][j],
                     color_map=out["color_map"][j], attrs=out["attrs"][j], seed=s)
                for j, s in enumerate(seeds)]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def captions_of(self, index):
        return self._scene(index)[3]

    def captions_for_tokenizer(self):
        for i in range(self.size):
            yield from self._scene(i)[3]


# -----------------------------------------------------------------------------
# COCO captions


def _open_rgb(path):
    """PIL RGB image, or None (with a line on stderr) when the file cannot be decoded (as CocoCaptions)."""
    try:
        with Image.open(path) as im:
            # 16-bit: convert("RGB") would clip at 255
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                im = im.convert("I").point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"skipping unreadable image {path}: {reason}", file=sys.stderr, flush=True)
        return None



class Strings:
    """A list of strings packed into one bytes buffer and a tensor of offsets. DataLoader workers
    (forked) read it without copying it: a Python list of a million str objects is copied into
    every worker page by page as the workers touch the objects' reference counts (notes/perf.md,
    "Your own captions at scale")."""

    def __init__(self, items):
        encoded = [x.encode("utf-8") for x in items]
        self.buf = b"".join(encoded)
        self.offsets = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64).cumsum(0)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.buf[int(self.offsets[i]):int(self.offsets[i + 1])].decode("utf-8")


class CaptionedImages(torch.utils.data.Dataset):
    """Image files, each with its captions, under I-JEPA's crop augmentation: what CocoCaptions and
    CaptionsDataset share. files (paths) and captions (one string per image, its captions joined by
    line breaks) are packed (Strings); ids name the images. An unreadable image yields None, which
    Collate drops."""

    def __init__(self, files, captions, ids, img_size):
        self.files, self._captions, self.ids = Strings(files), Strings(captions), ids
        self.img_size, self.n_unreadable = img_size, 0  # n_unreadable counts in this process only

    def __len__(self):
        return len(self.files)

    def captions_of(self, index):
        return self._captions[index].split("\n")

    @property
    def captions(self):  # captions[i] -> the list of image i's captions
        return _Indexed(self.captions_of, len(self))

    def captions_for_tokenizer(self):
        for i in range(len(self)):
            yield from self.captions_of(i)

    def __getitem__(self, key):
        index, seed = _split_key(key)
        img = _open_rgb(self.files[index])
        if img is None:
            self.n_unreadable += 1
            return None
        # I-JEPA augmentation: RandomResizedCrop(scale=(0.3, 1)), no flip (as I-JEPA's default, and a
        # flip would also contradict "left"/"right" in captions), no color jitter
        i, j, h, w = _crop_params(img.width, img.height, random.Random(seed))
        img = TF.resized_crop(img, i, j, h, w, [self.img_size, self.img_size], antialias=True)
        image = _normalize(TF.to_tensor(img)[None])[0]  # (3, img_size, img_size)
        return dict(image=image, captions=self.captions_of(index), seed=seed)

    def eval_image(self, index):
        """The fixed evaluation view of image `index` (short side resized, centre crop), or None."""
        img = _open_rgb(self.files[index])
        if img is None:
            return None
        return _normalize(TF.to_tensor(eval_crop(img, self.img_size, TF.InterpolationMode.BILINEAR))[None])[0]


class _Indexed:
    def __init__(self, get, n):
        self.get, self.n = get, n

    def __getitem__(self, i):
        return self.get(i)

    def __len__(self):
        return self.n


class CocoCaptions(CaptionedImages):
    """COCO 2017 captions from the official layout: <data_dir>/{train,val}2017/*.jpg and
    <data_dir>/annotations/captions_{train,val}2017.json. Images without captions or missing from
    disk are left out (and counted)."""

    def __init__(self, data_dir="data/coco", split="train", img_size=224):
        if split not in ("train", "val"):
            raise UserError(f"unknown split {split!r}: use 'train' or 'val'")
        root = Path(data_dir)
        img_dir, ann = root / f"{split}2017", root / "annotations" / f"captions_{split}2017.json"
        fix = (f"Download {split}2017.zip and annotations_trainval2017.zip from cocodataset.org "
               f"and unzip them into {root} (see README)")
        for path in (root, ann, img_dir):
            if not path.exists():
                raise UserError(f"COCO not found: {path} is missing. {fix}")
        if not img_dir.is_dir():
            raise UserError(f"COCO not found: {img_dir} is not a folder. {fix}")
        images, annotations = _read_coco_json(ann)

        caps = defaultdict(list)
        for a in annotations:
            caps[a["image_id"]].append(clean_caption(a["caption"]))
        on_disk = {e.name for e in os.scandir(img_dir)}  # one directory scan, not one stat per image
        files, captions, ids = [], [], []
        no_caps = missing = 0
        for im in sorted(images, key=lambda im: im["id"]):
            if not caps.get(im["id"]):
                no_caps += 1
            elif im["file_name"] not in on_disk:
                missing += 1
            else:
                files.append(str(img_dir / im["file_name"]))
                captions.append("\n".join(caps[im["id"]]))
                ids.append(im["id"])
        if not files:
            raise UserError(f"no usable COCO images: none of the {len(images)} images in {ann} is both "
                            f"captioned and present in {img_dir}. {fix}")
        print(f"coco {split}: {len(files)} images, {sum(c.count(chr(10)) + 1 for c in captions)} captions; "
              f"left out: {no_caps} without captions, {missing} missing files")
        super().__init__(files, captions, ids, img_size)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# without a val manifest, the images whose path hashes (crc32) to 0..VAL_PERCENT-1 of 100 are val
VAL_PERCENT = 1


def split_sentences(text):
    """A description -> its sentences, each a caption (the paper: every sentence of a ShareGPT4V
    description is one caption). Cut after '.', '!' or '?' followed by white space, and at line
    breaks; an abbreviation ("e.g. a cat") can cut a sentence early. Empty pieces are dropped."""
    out = []
    for line in text.splitlines():
        out += [clean_caption(p) for p in re.split(r"(?<=[.!?])\s+", line)]
    return [p for p in out if p]


def _captions_of_entry(value):
    """A manifest's captions field (a list of strings, or one string) -> its sentences, or None when
    an item is not a string."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        return None
    return [s for c in items for s in split_sentences(c)]


def read_captions_manifest(root):
    """The images and captions under root, from the first format found:
      root/train.jsonl (and root/val.jsonl): one line per image, {"image": "rel/path.jpg", "captions": [...]}
      root/*.json: ShareGPT4V, a list of {"image": ..., "conversations": [..., {"from": "gpt", "value": ...}]}
      img2dataset's "files" output: root/00000/000000123.jpg beside 000000123.txt, one caption per line
    -> (format, {"train": entries, "val": entries or None}, bad: {kind: count}); entries are
    (relative path, its captions split into sentences and joined by line breaks: one string an image,
    which keeps a million images' index small)."""
    root, bad = Path(root), Counter()

    def entry(image, caps):
        if not isinstance(image, str) or not image:
            bad["no image path"] += 1
        elif caps is None:
            bad["caption not a string"] += 1
        elif not caps:
            bad["no caption"] += 1
        else:
            return image, "\n".join(caps)
        return None

    if (root / "train.jsonl").is_file():
        out = {}
        for split in ("train", "val"):
            path = root / f"{split}.jsonl"
            if not path.is_file():
                out[split] = None
                continue
            out[split] = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        bad["not a JSON line"] += 1
                        continue
                    if not isinstance(r, dict):
                        bad["not a JSON object"] += 1
                        continue
                    e = entry(r.get("image"), _captions_of_entry(r.get("captions")))
                    if e:
                        out[split].append(e)
        return "jsonl", out, bad
    for path in sorted(root.glob("*.json")):
        try:
            items = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except (json.JSONDecodeError, OSError):
            continue
        first = items[0] if isinstance(items, list) and items else None
        if not (isinstance(first, dict) and "conversations" in first):
            continue
        entries = []
        for r in items:
            turns = r.get("conversations") if isinstance(r, dict) else None
            said = [t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "gpt"]
            e = entry(r.get("image") if isinstance(r, dict) else None, _captions_of_entry(said))
            if e:
                entries.append(e)
        return f"sharegpt4v {path.name}", {"train": entries, "val": None}, bad
    entries = []
    for dirpath, _, names in sorted(os.walk(root)):
        stems = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(IMAGE_EXTS)}
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if ext != ".txt" or stem not in stems:
                continue
            try:
                text = Path(dirpath, n).read_text(encoding="utf-8", errors="replace")
            except OSError:
                bad["unreadable caption file"] += 1
                continue
            e = entry(os.path.relpath(os.path.join(dirpath, stems[stem]), root), split_sentences(text))
            if e:
                entries.append(e)
    return "img2dataset files", {"train": entries, "val": None}, bad


class CaptionsDataset(CaptionedImages):
    """Any captioned images: a folder and a manifest in one of read_captions_manifest's formats.
    Captions are split into sentences; Collate samples n_captions of an image's sentences per step,
    seeded (exact resume). Entries with a missing image, no caption or a caption that is not a string
    are counted and left out in one line; an unreadable image file is found when it is first read
    (skipped, as for COCO). Without a val manifest, VAL_PERCENT% of the images, chosen by a hash of
    their path (the same on every run, whatever the order), are the val split.

    CaptionsDataset.splits(root, img_size) -> (train, val): the manifest is read once."""

    def __init__(self, root, entries, split, img_size):
        super().__init__([str(Path(root) / p) for p, _ in entries], [c for _, c in entries],
                         [p for p, _ in entries], img_size)
        self.split = split

    @classmethod
    def splits(cls, root, img_size=224):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"--data_dir {root} is not a folder: give the folder of your images and their "
                            f"manifest (README: Your own captioned images)")
        t0 = time.time()
        fmt, found, bad = read_captions_manifest(root)
        out = {}
        for split in ("train", "val"):
            entries = found[split] or []
            present = [e for e in entries if os.path.isfile(root / e[0])]
            bad[f"missing image ({split})"] += len(entries) - len(present)
            out[split] = present
        if found["val"] is None:  # a fixed rule: the images whose path hashes into the first VAL_PERCENT%
            hashed = [zlib.crc32(p.encode("utf-8")) % 100 for p, _ in out["train"]]
            is_val = [h < VAL_PERCENT for h in hashed]
            if not any(is_val) and len(is_val) > 1:  # a tiny set: its lowest hash is the val image
                is_val[min(range(len(hashed)), key=hashed.__getitem__)] = True
            out["val"] = [e for e, v in zip(out["train"], is_val) if v]
            out["train"] = [e for e, v in zip(out["train"], is_val) if not v]
        left_out = ", ".join(f"{n} {k}" for k, n in sorted(bad.items()) if n) or "nothing"
        if not out["train"] or not out["val"]:
            which = 'train' if not out['train'] else 'val'
            raise UserError(f"no usable {which} image in {root} ({fmt}; left out: "
                            f"{left_out}): an entry needs an image file that exists and at least one caption "
                            f"(README: Your own captioned images)")
        n_caps = sum(c.count("\n") + 1 for _, c in out["train"])
        print(f"captions ({fmt}): {len(out['train'])} train / {len(out['val'])} val images, {n_caps} train "
              f"captions ({n_caps / len(out['train']):.1f} per image); left out: {left_out}; read in "
              f"{time.time() - t0:.1f} s")
        return cls(root, out["train"], "train", img_size), cls(root, out["val"], "val", img_size)


def clean_caption(text):
    """A caption as the tokenizer can take it: what is not valid Unicode (a lone surrogate from a JSON
    escape such as \\ud800) becomes '?', line breaks become spaces, and outer spaces go."""
    return " ".join(text.encode("utf-8", "replace").decode("utf-8").split())


def _read_coco_json(ann):
    """-> (images, annotations) lists, or a one-line UserError naming the file."""
    redo = (f"Re-download annotations_trainval2017.zip from cocodataset.org and unzip it into "
            f"{ann.parent.parent}")
    try:
        with open(ann, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"COCO annotations unreadable: {ann} is not valid JSON ({e.msg} at line {e.lineno} "
                        f"column {e.colno}). {redo}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"COCO annotations unreadable: {ann}: {e}. {redo}") from None
    def has(entries, **types):  # a list of dicts whose values have these types
        return isinstance(entries, list) and all(
            isinstance(x, dict) and all(type(x.get(k)) is t for k, t in types.items()) for x in entries)

    if not (isinstance(data, dict) and has(data.get("images"), id=int, file_name=str)
            and has(data.get("annotations"), image_id=int, caption=str)):
        raise UserError(f"COCO annotations unexpected: {ann} lacks 'images' [{{id: int, file_name: str}}] or "
                        f"'annotations' [{{image_id: int, caption: str}}]; is it a captions file? {redo}")
    ids = Counter(im["id"] for im in data["images"])
    twice = [i for i, n in ids.items() if n > 1]
    if twice:  # captions are joined to images by id: a repeated id would give two images the same captions
        raise UserError(f"COCO annotations unexpected: {ann} lists image id {twice[0]} more than once "
                        f"({len(twice)} repeated ids). {redo}")
    return data["images"], data["annotations"]


def _crop_params(width, height, rng, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params, but drawing from rng instead of torch's global generator."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback, as torchvision: the whole image center-cropped to the nearest allowed ratio
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


# -----------------------------------------------------------------------------
# tokenizer


def _normalizer():
    """NFD, strip accents, lowercase, punctuation and symbols -> space."""
    return normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
                                 normalizers.Replace(Regex(r"[\p{P}\p{S}]"), " ")])


def train_tokenizer(captions, vocab_size, path=None):
    """Lowercased word-level tokenizer: one token per word, the vocab_size - 2 most frequent words
    of the captions (ties broken alphabetically, so ids are the same on every run; the `tokenizers`
    trainers number tokens in hash-map order). [PAD] is id 0, [UNK] id 1 for all other words.
    Punctuation and symbols are dropped, so they never become 'words' shared by every caption."""
    tok = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    counts = Counter()
    for c in captions:
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(c)))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, vocab_size - 2)]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok.model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    if path is not None:  # (None: in memory only)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


def load_tokenizer(path):
    if not Path(path).is_file():
        raise UserError(f"tokenizer not found: {path} is missing. Point --tokenizer to an existing tokenizer "
                        f"json, or give none: a fresh run trains one")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"tokenizer unreadable: {path}: {e}") from None
    return tokenizer_from_str(text, str(path))


def tokenizer_from_str(text, source):
    """A tokenizer from its json text, checked: Collate pads and truncates itself (padding done here
    would count as words), and every id must be below the vocabulary size (the embedding's rows)."""
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception
        reason = (str(e).splitlines() or ["?"])[0]
        raise UserError(f"tokenizer unreadable: {source}: {reason}. Give another --tokenizer, or none to "
                        f"train one") from None
    tok.no_padding()
    tok.no_truncation()
    if tok.token_to_id("[UNK]") is None:
        raise UserError(f"tokenizer {source} has no [UNK] token: a word outside its vocabulary would stop "
                        f"training; give a tokenizer that train.py wrote (or none: a fresh run trains one)")
    top = max(tok.get_vocab().values(), default=0)
    if top >= tok.get_vocab_size():
        raise UserError(f"tokenizer {source} has ids up to {top} but only {tok.get_vocab_size()} entries: "
                        f"ids must run 0..size-1; give another --tokenizer, or none to train one")
    return tok


# -----------------------------------------------------------------------------
# batching


class Collate:
    """items -> batch: drops unreadable (None) items, picks n_captions captions per image without
    replacement (seeded by the item's seed), tokenizes them in one call, pads to max_words.
    Missing captions (an image with fewer) and captions with no words are all-padding rows."""

    def __init__(self, tokenizer, n_captions=5, max_words=16):
        self.tokenizer, self.n_captions, self.max_words = tokenizer, n_captions, max_words
        self.n_empty = 0  # captions that tokenized to nothing (counts in this process only)

    def __call__(self, items):
        items = [it for it in items if it is not None]
        if not items:
            raise UserError("every image in this batch was unreadable: see the 'skipping' lines above "
                            "and re-download the files they name")
        B, C, S = len(items), self.n_captions, self.max_words
        chosen = []
        for it in items:  # strings: no way around a loop here; tokenizing is batched below
            g = torch.Generator().manual_seed(it["seed"])
            order = torch.randperm(len(it["captions"]), generator=g)[:C].tolist()
            chosen.append([it["captions"][k] for k in order])
        flat = [c for caps in chosen for c in caps]
        encodings = self.tokenizer.encode_batch(flat, add_special_tokens=False)

        rows = [b * C + c for b, caps in enumerate(chosen) for c in range(len(caps))]  # row of each caption
        padded, lengths = [[0] * S] * (B * C), [0] * (B * C)  # rows without a caption stay all [PAD] (id 0)
        for row, text, enc in zip(rows, flat, encodings):
            ids = enc.ids[:S]  # truncate to max_words
            if not ids:
                if self.n_empty == 0:
                    print(f"warning: caption {text!r} has no words after tokenizing; treated as absent "
                          f"(further ones are only counted in Collate.n_empty)", file=sys.stderr)
                self.n_empty += 1
            padded[row], lengths[row] = ids + [0] * (S - len(ids)), len(ids)
        tokens = torch.tensor(padded, dtype=torch.long).view(B, C, S)
        word_mask = torch.arange(S) < torch.tensor(lengths).view(B, C, 1)  # (B, C, S) True for real words
        # only what training reads: the shapes ground truth (per-pixel maps, attrs) stays in the
        # worker (probes render it themselves); at 224 px stacking the maps took half of this call
        return dict(images=torch.stack([it["image"] for it in items]), tokens=tokens, word_mask=word_mask,
                    captions=chosen)


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
            raise UserError(f"batch size {batch_size} x {world} processes is larger than the dataset "
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


UNKNOWN_WARN, UNKNOWN_STOP = 0.2, 0.95  # shares of caption words the tokenizer does not know


def check_captions(train_set, tokenizer, max_images=10000):
    """text_cond=cross with captions whose words the tokenizer does not know would train I-JEPA under
    another name ([UNK] carries nothing): on a sample of up to max_images images, stop when no image
    has a known word or UNKNOWN_STOP of the words are unknown (a tokenizer of other data, a tiny
    vocabulary), warn above UNKNOWN_WARN or when most images have no known word."""
    n = min(len(train_set), max_images)
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:n].tolist()
    caps = [train_set.captions_of(i) for i in idx]
    enc = tokenizer.encode_batch([c for cs in caps for c in cs], add_special_tokens=False)
    unk = tokenizer.token_to_id("[UNK]")
    usable, k, words, unknown = 0, 0, 0, 0
    for cs in caps:
        ids = [e.ids for e in enc[k:k + len(cs)]]
        usable += any(i != unk for e in ids for i in e)
        words += sum(map(len, ids))
        unknown += sum(i == unk for e in ids for i in e)
        k += len(cs)
    share = unknown / max(1, words)
    if usable == 0 or share >= UNKNOWN_STOP:
        if usable:
            what = (f"only {words - unknown} of the {words} caption words of {n} sampled training images are "
                    f"known to the tokenizer")
        else:
            what = f"none of {n} sampled training images has a caption with a word the tokenizer knows"
        raise UserError(f"--text_cond cross, but {what}: fix the captions or give a tokenizer of this data "
                        f"(or none: a fresh run trains one), or train I-JEPA with --text_cond none")
    if share > UNKNOWN_WARN:
        print(f"warning: {unknown} of {words} caption words ({share:.0%}) are unknown to the tokenizer "
              f"([UNK]): they carry no text", file=sys.stderr)
    if usable < n / 2:
        print(f"warning: only {usable} of {n} sampled training images have a usable caption; the others "
              f"train without text", file=sys.stderr)


def patch_labels(label_map, patch_size):
    """(B, H, W) int labels -> (B, (H/p)*(W/p)) majority label per patch, raster order.
    Ties go to the smallest label (e.g. background 0)."""
    B, H, W = label_map.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"label map {H}x{W} is not a whole number of {patch_size}px patches")
    h, w, p = H // patch_size, W // patch_size, patch_size
    K = int(label_map.max()) + 1
    pid = (torch.arange(H)[:, None] // p * w + torch.arange(W) // p).view(1, -1)  # (1, H*W) pixel's patch
    key = label_map.reshape(B, -1).long() * (h * w) + pid  # (B, H*W) one bin per (label, patch)
    counts = torch.zeros(B, K * h * w).scatter_add_(1, key, torch.ones(B, H * W))
    return counts.view(B, K, h * w).argmax(1)  # argmax returns the first maximum -> smallest label


# =============================================================================
# COCO evaluation: instance masks, per-patch labels, the categories present, caption-word targets


def read_instances(path, image_ids=None):
    """COCO instances_{train,val}2017.json -> (names, label_of, images, dropped).

    names: the category names in id order (80 for COCO); label_of: category id -> label 1..len(names)
    (ids run 1..90 with gaps); images: {image_id: dict(file_name, width, height, anns)} for the wanted
    ids only (all when image_ids is None), anns a list of (label, area, segmentation, iscrowd);
    dropped: {kind: count} of the annotations left out (a compressed crowd RLE, which needs
    pycocotools; a malformed segmentation; an unknown category; a bad area or iscrowd): one bad
    annotation costs itself, not the probes."""
    path = Path(path)
    fix = (f"probes need annotations/{path.name} from annotations_trainval2017.zip (cocodataset.org): "
           f"unzip it into {path.parent.parent}")
    if not path.is_file():
        raise UserError(f"COCO instances not found: {path} is missing; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)  # the train file (448 MB) takes tens of seconds and a few GB here
    except json.JSONDecodeError as e:
        raise UserError(f"COCO instances unreadable: {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        f"{fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"COCO instances unreadable: {path}: {e}; {fix}") from None
    dropped = Counter()
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names, label_of = [c["name"] for c in cats], {c["id"]: k + 1 for k, c in enumerate(cats)}
        wanted = None if image_ids is None else set(image_ids)
        images = {im["id"]: dict(file_name=im["file_name"], width=im["width"], height=im["height"], anns=[])
                  for im in data["images"] if wanted is None or im["id"] in wanted}
        for a in data["annotations"]:
            rec = images.get(a["image_id"])
            if rec is None:  # not wanted: nothing is built for it
                continue
            seg = a.get("segmentation")
            if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
                dropped["compressed crowd mask"] += 1
            elif not _valid_segmentation(seg, rec["height"], rec["width"]):
                dropped["malformed segmentation"] += 1
            elif a.get("category_id") not in label_of:
                dropped["unknown category"] += 1
            elif not (_number(a.get("area")) and a.get("iscrowd") in (0, 1)):
                dropped["bad area or iscrowd"] += 1
            else:
                rec["anns"].append((label_of[a["category_id"]], float(a["area"]), seg, int(a["iscrowd"])))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"COCO instances unexpected: {path} ({type(e).__name__}: {e}); is it an instances "
                        f"file? {fix}") from None
    return names, label_of, images, dict(dropped)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _valid_segmentation(seg, height, width):
    """Polygons: lists of an even number of finite coordinates; RLE: a list of counts over the whole image."""
    if isinstance(seg, list):
        return all(isinstance(p, list) and len(p) % 2 == 0 and all(map(_number, p)) for p in seg)
    if not (isinstance(seg, dict) and isinstance(seg.get("counts"), list)):
        return False
    if seg.get("size") != [height, width]:
        return False
    return all(isinstance(c, int) and c >= 0 for c in seg["counts"]) and sum(seg["counts"]) == height * width


def image_size(path):
    """(width, height) from the file's header (nothing decoded), or None when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def instance_label_map(anns, height, width):
    """(height, width) long map: 0 background, else the label (1..80) of the instance covering a pixel.

    Overlaps: the SMALLER instance wins (by the annotation's `area`): instances are painted in order of
    decreasing area, so a cup on a table stays a cup. A pixel belongs to a polygon when its centre
    (x + 0.5, y + 0.5) is inside it, as COCO's own masks (pycocotools) do; PIL's ImageDraw.polygon also
    paints the outline and truncates the vertices, which grows a mask by ~1 px on the right and bottom
    (a large error on small objects, notes/coco.md). A polygon with several parts paints all of them.
    Labels < 256."""
    out = torch.zeros(height, width, dtype=torch.uint8)  # a third of the memory traffic of long
    for label, _, seg, _ in sorted(anns, key=lambda a: -a[1]):  # stable: equal areas keep file order
        if isinstance(seg, dict):
            out[_rle_mask(seg["counts"], *seg["size"])] = label
        for part in seg if isinstance(seg, list) else []:
            if len(part) >= 6:  # at least 3 points; COCO has a few degenerate 2-point "polygons"
                _paint_polygon(out, part, label)
    return out.long()


def _rle_mask(counts, height, width):
    """Uncompressed COCO RLE -> (height, width) bool: runs of 0s and 1s alternate, starting with 0s,
    over the pixels in column-major (Fortran) order."""
    values = torch.arange(len(counts)) % 2 == 1
    return values.repeat_interleave(torch.tensor(counts)).view(width, height).T


def _paint_polygon(out, xy, label):
    """Sets out (H, W) to label at the pixels whose centre is inside the polygon xy = [x1, y1, x2, y2, ...]
    (even-odd rule), by scanlines over its bounding box only."""
    x1, y1 = torch.tensor(xy, dtype=torch.float64).view(-1, 2).unbind(1)  # (E,) edge starts
    x2, y2 = x1.roll(1), y1.roll(1)  # (E,) edge ends
    # the rows and columns whose centre may be inside
    r0, r1 = max(0, math.floor(y1.min() - 0.5)), min(out.size(0), math.ceil(y1.max()))
    c0, c1 = max(0, math.floor(x1.min() - 0.5)), min(out.size(1), math.ceil(x1.max()))
    if r0 >= r1 or c0 >= c1:
        return
    yc = torch.arange(r0, r1, dtype=torch.float64)[:, None] + 0.5  # (R, 1) row centres
    crosses = (y1 > yc) != (y2 > yc)  # (R, E) edges that cross the row's centre line
    xs = torch.where(crosses, x1 + (yc - y1) * (x2 - x1) / (y2 - y1), math.inf)  # (R, E) where they cross
    # a crossing at x toggles inside/outside from the first column whose centre is right of it,
    # floor(x + 0.5); toggles past the box (and non-crossings) land in a spare last column
    first = ((xs + 0.5).floor().clamp(c0, c1) - c0).long()  # (R, E)
    toggles = torch.zeros(r1 - r0, c1 - c0 + 1, dtype=torch.uint8)
    toggles.scatter_add_(1, first, torch.ones_like(first, dtype=torch.uint8))
    # (R, C) inside where the count of crossings is odd; a uint8 wraps, its parity stays
    inside = (toggles.cumsum(1, dtype=torch.uint8)[:, :-1] & 1).bool()
    out[r0:r1, c0:c1].masked_fill_(inside, label)


# -----------------------------------------------------------------------------
# caption words

_NORMALIZER, _PRE_TOKENIZER = _normalizer(), pre_tokenizers.Whitespace()  # as train_tokenizer's

# words that every kind of scene uses: articles, prepositions, pronouns, auxiliaries, conjunctions
STOP_WORDS = frozenset("""
a an the
of in on at to with by for from into onto near next over under up down out off through behind around
it its he his she her they their them this that these those there here who which what some
is are was were be been being has have had do does
and or but as while so than
""".split())


def caption_words(text):
    """A caption's words, normalized as train_tokenizer does (its tokens, before the vocabulary)."""
    return [w for w, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def caption_word_vocab(captions_per_image, K, stop_words=STOP_WORDS):
    """The K words used by the most images (any of an image's captions, counted once per image: the
    prevalence of the word_targets column), ties broken alphabetically. Stop words never enter; words
    are whole normalized tokens, not stemmed ("dog" and "dogs" are two words)."""
    counts = Counter()
    for caps in captions_per_image:
        counts.update({w for c in caps for w in caption_words(c)} - stop_words)
    return sorted(counts, key=lambda w: (-counts[w], w))[:K]


def word_targets(captions, vocab):
    """(K,) multi-hot: which vocab words any of the captions uses. vocab: a list, or {word: column}."""
    index = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    target = torch.zeros(len(index))
    target[[index[w] for c in captions for w in caption_words(c) if w in index]] = 1
    return target


# -----------------------------------------------------------------------------
# the probe dataset


def eval_crop(x, size, interpolation):
    """The fixed evaluation view: the short side resized to size, then the centre size x size crop.
    A PIL image and a (1, H, W) tensor of the same H, W get the same output size and crop."""
    x = TF.resize(x, size, interpolation=interpolation, antialias=True)
    return TF.center_crop(x, [size, size])


class CocoProbeSet(torch.utils.data.Dataset):
    """COCO images under the fixed evaluation view, with probe ground truth.

    files, records (read_instances' values) and captions are aligned lists; vocab: caption_word_vocab.
    An item is dict(image (3, S, S) normalized, patch_labels (N,) majority label per patch, present
    (n_classes,) multi-hot, words (K,) multi-hot), or None for an unreadable image. present holds the
    categories VISIBLE in the crop (any pixel of the cropped label map): a category cut away by the crop
    is not in the pixels the encoder sees, and no probe could find it. Captions describe the uncropped
    image, so a word may name something cut away."""

    def __init__(self, files, records, captions, vocab, n_classes=80, img_size=224, patch_size=16):
        self.files, self.records, self.n_classes = files, records, n_classes
        self.img_size, self.patch_size, self.n_unreadable = img_size, patch_size, 0
        index = {w: i for i, w in enumerate(vocab)}
        self.words = torch.stack([word_targets(c, index) for c in captions])  # (n, K): once, not per item

    def __len__(self):
        return len(self.files)

    def label_map(self, index):
        """(S, S) long label map under the evaluation view; no image is decoded (a labels-only pass,
        e.g. for class frequencies, costs ~3 ms a 640x480 image). NEAREST_EXACT samples the pixel centres as
        the image's bilinear resize does; torch's plain NEAREST is shifted by up to half a pixel."""
        r = self.records[index]
        labels = instance_label_map(r["anns"], r["height"], r["width"]).to(torch.uint8)[None]  # (1, H, W)
        return eval_crop(labels, self.img_size, TF.InterpolationMode.NEAREST_EXACT)[0].long()

    def __getitem__(self, index):
        img, r = _open_rgb(self.files[index]), self.records[index]
        if img is None:
            self.n_unreadable += 1
            return None
        if img.size != (r["width"], r["height"]):  # the masks would not line up: wrong annotations file
            raise UserError(f"{self.files[index]} is {img.width}x{img.height} but its instances record says "
                            f"{r['width']}x{r['height']}: use the instances file of the same split")
        img = eval_crop(img, self.img_size, TF.InterpolationMode.BILINEAR)
        labels = self.label_map(index)  # (S, S)
        present = torch.zeros(self.n_classes + 1)
        present[labels.flatten()] = 1  # column 0 (background) is dropped below
        return dict(image=_normalize(TF.to_tensor(img)[None])[0], present=present[1:],
                    words=self.words[index], patch_labels=patch_labels(labels[None], self.patch_size)[0])


def probe_collate(items):
    """Stacks the readable items of a batch (unreadable ones are None)."""
    items = [it for it in items if it is not None]
    if not items:
        raise UserError("every image in this batch was unreadable: see the 'skipping' lines above and "
                        "re-download the files they name")
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# =============================================================================
# probes: linear maps fitted on frozen features, scored against the ground truth above. They take
# an `encode` function (images -> (B, N, D) patch features), never the model or the training state.


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
    if len(ytr) == 0 or len(yte) == 0:  # e.g. no object patch at all (patches larger than the objects)
        return float("nan")
    freq = torch.bincount(ytr, minlength=n_classes).float().clamp(min=1)
    scores = ridge_fit(Xtr, F.one_hot(ytr, n_classes).float(), weight=1 / freq[ytr])(Xte)
    pred = scores.argmax(1)
    accs = [(pred[yte == c] == c).float().mean() for c in range(n_classes) if (yte == c).any()]
    return torch.stack(accs).mean().item() if accs else float("nan")  # nan: no class present


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


def rankme(feats, eps=1e-7):
    """Effective rank of (n, D) features (RankMe, Garrido et al. 2023): exp of the entropy of the
    normalized singular values. A label-free collapse monitor: it falls when features collapse."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- shapes probes


def object_pooled(feats, shape, obj):
    """One row per object: the mean feature of its patches (majority label) and its shape (0-based).
    feats (n, N, D), shape / obj (n, N) patch labels -> (n_objects, D), (n_objects,)."""
    K = int(obj.max()) + 1
    onehot = F.one_hot(obj, K).float()  # (n, N, K)
    sums = onehot.transpose(1, 2) @ feats  # (n, K, D)
    counts = onehot.sum(1)  # (n, K)
    votes = onehot.transpose(1, 2) @ F.one_hot(shape, len(SHAPES) + 1).float()  # (n, K, shapes + 1)
    shapes = votes.argmax(-1)  # (n, K) each object's majority shape
    keep = counts[:, 1:] > 0  # objects that own at least one patch
    return (sums[:, 1:] / counts[:, 1:, None].clamp(min=1))[keep], shapes[:, 1:][keep] - 1


@torch.no_grad()
def shapes_features(encode, dataset, n, patch_size, batch_size=250):
    """Patch features (n, N, D) of the first n images and their per-patch ground truth: shape,
    colour, object (0 background, 1 + slot), and the image attributes."""
    feats, gt = [], []
    for i in range(0, n, batch_size):
        out = dataset.render(list(range(i, min(n, i + batch_size))))
        feats.append(encode(out["images"]).float().cpu())
        gt.append((patch_labels(out["shape_map"], patch_size), patch_labels(out["color_map"], patch_size),
                   patch_labels(out["object_map"], patch_size), out["attrs"]))
    shape, color, obj, attrs = (torch.cat(x) for x in zip(*gt))
    return torch.cat(feats), shape, color, obj, attrs


def shapes_probes(encode, train_set, val_set, n_train, patch_size, n_val=None):
    """Dense probes (what covers each patch: background or a shape; its colour), an object probe
    (each object's mean feature: its shape) and image probes (which shapes / colours are present,
    how many objects), fitted on the first n_train training images, scored on the first n_val val
    images (default: all)."""
    ftr, str_, ctr, otr, atr = shapes_features(encode, train_set, n_train, patch_size)
    n_val = min(n_val or len(val_set), len(val_set))
    fte, ste, cte, ote, ate = shapes_features(encode, val_set, n_val, patch_size)
    D, ns, nc = ftr.size(-1), len(SHAPES), len(COLORS)
    x_tr, x_te = ftr.reshape(-1, D), fte.reshape(-1, D)  # every patch
    res = dict(dense_shape=class_probe(x_tr, str_.flatten(), x_te, ste.flatten(), ns + 1),
               dense_color=class_probe(x_tr, ctr.flatten(), x_te, cte.flatten(), nc + 1))
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


# ----------------------------------------------------------------------------- COCO probes (notes/coco.md)


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
        ridge = self.lam * n * torch.eye(D + 1, dtype=torch.float64, device=self.device)
        A = T.T @ self.G @ T / mean_w + ridge
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
    train: object  # CocoProbeSet: probe_train images evenly spaced over train2017
    val: object  # CocoProbeSet: all of val2017
    dense_weight: torch.Tensor  # (81,) 1 / patch frequency of each class in the probe's train images


def coco_probe_data(data_dir, train_set, val_set, n_train, n_words, img_size, patch_size):
    """Once, at start-up, for every image the probes will ever read: the instance masks (parsed keeping
    only what the probes need), checked against the image files, so that nothing fails at the last
    evaluation. Bad annotations and images are left out with counts by kind; None (and one line) when
    the instances files are missing or unreadable; a stop when they do not describe these images."""
    t0, ann = time.time(), os.path.join(data_dir, "annotations")
    idx = torch.linspace(0, len(train_set) - 1, min(n_train, len(train_set))).round().long().unique().tolist()
    try:
        names, _, rec_tr, drop_tr = read_instances(os.path.join(ann, "instances_train2017.json"),
                                                   [train_set.ids[i] for i in idx])
        _, _, rec_va, drop_va = read_instances(os.path.join(ann, "instances_val2017.json"), val_set.ids)
    except UserError as e:
        print(f"{e}. Training goes on with validation losses only")
        return None
    left_out = Counter(drop_tr) + Counter(drop_va)
    sets = []
    for split, ds, ids, rec in (("train", train_set, idx, rec_tr),
                                ("val", val_set, range(len(val_set)), rec_va)):
        keep = []
        for i in ids:
            r = rec.get(ds.ids[i])
            size = image_size(ds.files[i]) if r is not None else None
            if r is None:
                left_out[f"{split} image without instances"] += 1
            elif size is None:
                left_out[f"unreadable {split} image"] += 1
            elif size != (r["width"], r["height"]):
                left_out[f"{split} image whose size is not its record's"] += 1
            else:
                keep.append(i)
        mismatched = left_out[f"{split} image whose size is not its record's"]
        if mismatched > len(ids) / 2:
            raise UserError(f"{mismatched} of {len(ids)} {split} probe images differ in size from their "
                            f"record in {ann}/instances_{split}2017.json: the masks would not line up; use "
                            f"the instances files of the same COCO release as the images")
        if not keep:
            print(f"no {split} image is usable for the COCO probes ({dict(left_out)}); training goes on with "
                  f"validation losses only")
            return None
        sets.append((ds, keep, rec))
    vocab = caption_word_vocab([train_set.captions[i] for i in sets[0][1]], n_words)
    kw = dict(vocab=vocab, n_classes=len(names), img_size=img_size, patch_size=patch_size)
    tr, va = (CocoProbeSet([ds.files[i] for i in keep], [rec[ds.ids[i]] for i in keep],
                           [ds.captions[i] for i in keep], **kw) for ds, keep, rec in sets)
    labels = torch.cat([patch_labels(tr.label_map(i)[None], patch_size)[0] for i in range(len(tr))])
    freq = torch.bincount(labels, minlength=len(names) + 1).double()
    left = ', '.join(f'{n} {k}' for k, n in sorted(left_out.items())) or 'nothing'
    print(f"coco probes: {len(tr)} train / {len(va)} val images, {len(vocab)} caption words; left out: "
          f"{left}; instances read and checked in {time.time() - t0:.0f} s")
    return CocoProbeData(tr, va, 1 / freq.clamp(min=1))


@torch.no_grad()
def coco_features(encode, probe_set, n, num_workers, worker_init_fn=None, batch_size=64):
    """(patch features (B, N, D) float, the batch's ground truth) for the first n images."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(probe_set, range(min(n, len(probe_set)))),
                                         batch_size=batch_size, collate_fn=probe_collate,
                                         num_workers=num_workers, worker_init_fn=worker_init_fn)
    for b in loader:
        yield encode(b["image"]).float(), b


def coco_probes(encode, pd, n_val, num_workers=0, worker_init_fn=None):
    """Ridge probes on frozen features, fitted on the probe's train images and scored on n_val val
    images: 80-way category mAP and caption-word mAP from average-pooled features, segmentation
    mIoU (background + 80) from patch features (streamed: X^T X, never all patches, on the device
    the features come on), and RankMe of the pooled val features."""
    n_cls = len(pd.dense_weight)
    dense, pooled = None, dict(train=[], val=[])
    for f, b in coco_features(encode, pd.train, len(pd.train), num_workers, worker_init_fn):
        dense = dense or StreamingRidge(f.size(-1), n_cls, class_weight=pd.dense_weight, device=f.device)
        dense.update(f.flatten(0, 1), F.one_hot(b["patch_labels"].flatten(), n_cls).to(f.device))
        pooled["train"].append((f.mean(1).cpu(), b["present"], b["words"]))
    score, conf = dense.solve(), Confusion(n_cls)
    for f, b in coco_features(encode, pd.val, n_val, num_workers, worker_init_fn):
        conf.update(score(f.flatten(0, 1)).argmax(1).cpu(), b["patch_labels"].flatten())
        pooled["val"].append((f.mean(1).cpu(), b["present"], b["words"]))
    (Xtr, Ptr, Wtr), (Xva, Pva, Wva) = ([torch.cat(x) for x in zip(*pooled[k])] for k in ("train", "val"))
    return dict(coco_cls_map=average_precision(ridge_fit(Xtr, Ptr)(Xva), Pva), coco_dense_miou=conf.miou(),
                coco_words_map=average_precision(ridge_fit(Xtr, Wtr)(Xva), Wva), rankme=rankme(Xva))


# ----------------------------------------------------------------------------- your own captions


class _EvalView(torch.utils.data.Dataset):
    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds.eval_image(i)


def _stack_readable(items):
    items = [x for x in items if x is not None]
    return torch.stack(items) if items else None


@torch.no_grad()
def captions_probes(encode, val_set, n, num_workers=0, worker_init_fn=None, batch_size=64):
    """Captioned images come without labels: RankMe of the average-pooled features of the first n val
    images under the evaluation view (a label-free collapse monitor)."""
    loader = torch.utils.data.DataLoader(_EvalView(val_set, n), batch_size=batch_size,
                                         collate_fn=_stack_readable, num_workers=num_workers,
                                         worker_init_fn=worker_init_fn)
    pooled = [encode(x).float().mean(1).cpu() for x in loader if x is not None]
    return dict(rankme=rankme(torch.cat(pooled))) if pooled else {}


# =============================================================================
# grounding: does a patch attend to the words of the object it shows? (shapes ground truth)


def object_words(shape_labels, color_labels, tokenizer):
    """Per patch, the token ids of the shape word and the colour word of the object on it:
    shape_labels / color_labels (B, N) patch labels (0 background, 1 + index) -> (B, N, 2), 0 for
    background (and for a word the tokenizer does not know)."""
    def ids(words):
        return torch.tensor([0] + [tokenizer.token_to_id(w) or 0 for w in words])
    return torch.stack([ids(SHAPES)[shape_labels], ids(COLORS)[color_labels]], -1)


def grounding_sums(scores, tokens, word_mask, words_at, is_ctx, color_ids):
    """Per layer, is a predictor token's highest-scoring word one of its object's words, and how well
    do its scores rank those words above the caption's other words? Sums, to add over batches
    (grounding_summary turns them into rates).

    scores (Lyr, B, Q, C, S): the rectified cosines O, or the attention; tokens, word_mask (B, C, S);
    words_at (B, Q, 2): the shape and colour word of the object at each token's patch (object_words,
    0 = background); is_ctx (B, Q): a context token (else a target token); color_ids: every colour
    word's id. A (token, caption) pair counts when the token's patch shows an object and the caption
    names it: the caption has the object's shape word and, unless it has no colour word at all, its
    colour word; and at least one of its words is not the object's. Its object words are the
    caption's words equal to the object's shape or colour word. Ties share: when k words tie for
    the top score, a hit counts (object words among them) / k, so all-equal scores (O = 0
    everywhere) give chance. AUC: P(object word scores above another word), ties 1/2."""
    real = word_mask[:, None]  # (B, 1, C, S)
    tok = tokens[:, None]  # (B, 1, C, S)
    is_shape = (tok == words_at[..., 0, None, None]) & real  # (B, Q, C, S)
    is_color = (tok == words_at[..., 1, None, None]) & real
    has_color_word = (torch.isin(tokens, color_ids) & word_mask).any(-1)[:, None]  # (B, 1, C)
    pos = is_shape | is_color  # (B, Q, C, S)
    named = ((words_at[..., 0] > 0)[..., None] & is_shape.any(-1) & (is_color.any(-1) | ~has_color_word)
             & (real & ~pos).any(-1))  # (B, Q, C)
    b, q, c = named.nonzero(as_tuple=True)
    pos, real = pos[b, q, c], word_mask[b, c]  # (n, S)
    x = scores[:, b, q, c].float()  # (Lyr, n, S)
    split = (~is_ctx[b, q]).long()  # (n,) 0 context, 1 target
    top = x.masked_fill(~real, float("-inf")).amax(-1, keepdim=True)  # (Lyr, n, 1)
    tied = (x == top) & real
    hit = (tied & pos).sum(-1) / tied.sum(-1)  # (Lyr, n)
    pairs = (pos[:, :, None] & (real & ~pos)[:, None, :]).float()  # (n, S, S): (object word, other word)
    above = (x[..., :, None] > x[..., None, :]).float() + 0.5 * (x[..., :, None] == x[..., None, :]).float()
    auc = (above * pairs).sum((-1, -2)) / pairs.sum((-1, -2))  # (Lyr, n)
    Lyr = scores.size(0)
    return dict(n=torch.zeros(2).index_add_(0, split, torch.ones(len(b))),
                hit=torch.zeros(Lyr, 2).index_add_(1, split, hit),
                auc=torch.zeros(Lyr, 2).index_add_(1, split, auc),
                chance=torch.zeros(2).index_add_(0, split, pos.sum(-1) / real.sum(-1)))


def grounding_summary(sums, name):
    """Sums of grounding_sums (added over batches) -> {name: top-1 rate over all counted pairs, mean
    over layers; name_auc; name_tgt, name_ctx: the rate over target / context tokens only;
    name_layers: the rate per layer}, plus ground_chance (the rate of a word drawn at random) and
    ground_pairs (pairs counted). NaN where no pair counted."""
    n, hit, auc = sums["n"], sums["hit"], sums["auc"]  # (2,), (Lyr, 2), (Lyr, 2)
    per_layer = hit.sum(1) / n.sum()  # (Lyr,)
    return {name: float(per_layer.mean()), f"{name}_auc": float((auc.sum(1) / n.sum()).mean()),
            f"{name}_tgt": float((hit[:, 1] / n[1]).mean()), f"{name}_ctx": float((hit[:, 0] / n[0]).mean()),
            f"{name}_layers": [round(float(x), 4) for x in per_layer],
            "ground_chance": float(sums["chance"].sum() / n.sum()), "ground_pairs": int(n.sum())}


@torch.no_grad()
def grounding_probe(predict, batches, dataset, tokenizer, patch_size):
    """ground_o / ground_attn (grounding_summary) of a model on fixed shapes batches, the rectified
    cosines O and the attention scored alike. predict(images, ctx, tgt, tokens, word_mask) ->
    (O (Lyr, B, Q, C, S), attention (Lyr, B, C, Q, S)); batches: dicts with images, tokens,
    word_mask, ctx (B, Nc), tgt (B, M, Nt) and indices (B,) into the ShapesDataset `dataset`."""
    color_ids = torch.tensor([tokenizer.token_to_id(w) or -1 for w in COLORS])
    sums = {}
    for b in batches:
        gt = dataset.render(b["indices"].tolist())
        at_patch = object_words(patch_labels(gt["shape_map"], patch_size),
                                patch_labels(gt["color_map"], patch_size), tokenizer)  # (B, N, 2)
        (B, Nc), (M, Nt) = b["ctx"].shape, b["tgt"].shape[1:]
        # the predictor's token order: per target block, the context then the block (tcjepa.Predictor)
        patch = torch.cat([b["ctx"][:, None].expand(B, M, Nc), b["tgt"]], 2).flatten(1)  # (B, Q)
        is_ctx = (torch.arange(Nc + Nt) < Nc).repeat(M).expand(B, -1)  # (B, Q)
        words_at = at_patch.gather(1, patch[..., None].expand(-1, -1, 2))  # (B, Q, 2)
        sims, att = predict(b["images"], b["ctx"], b["tgt"], b["tokens"], b["word_mask"])
        for name, scores in (("ground_o", sims), ("ground_attn", att.transpose(2, 3))):
            s = grounding_sums(scores.cpu(), b["tokens"], b["word_mask"], words_at, is_ctx, color_ids)
            sums[name] = s if name not in sums else {k: sums[name][k] + v for k, v in s.items()}
    return {**grounding_summary(sums["ground_o"], "ground_o"),
            **grounding_summary(sums["ground_attn"], "ground_attn")}
