"""
Pictures of notes/experiments.md from a trained TC-JEPA checkpoint on the built-in shapes data.

  python notes/figures.py runs/tc_s0/ckpt.pt       # writes notes/masks.png, attention.png, steer.png
  python notes/figures.py runs/tc_s0/ckpt.pt --table-only   # only the steering table (any checkpoint)
  python notes/figures.py --pairs                  # notes/pairs.png: the data and masks of notes/experiments.md §7

masks.png      a val image with its context and target blocks (tcjepa.sample_masks)
attention.png  patch-to-word attention: for a few val images and one caption each, the attention
               every patch token pays to each word (mean over the predictor's conditioner layers)
steer.png      text steers the prediction: one object hidden under a target block; the block is
               predicted under the true captions, under edited ones ("red circle" -> "blue square")
               and with no caption; for each prediction, the val patches whose target features are
               nearest to it (cosine), with how many of them show the named shape / color
matplotlib is needed here only (pip install matplotlib).
"""

import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks  # noqa: E402


def load(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TCJEPAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()})
    model = TCJEPA(cfg)
    model.load_state_dict(ckpt["model"])
    if "tokenizer_json" in ckpt:  # checkpoints carry their tokenizer
        return model.eval(), cfg, data.tokenizer_from_str(ckpt["tokenizer_json"], path)
    tok_path = ckpt["tokenizer"]  # older checkpoints name its file
    if not os.path.exists(tok_path):  # the checkpoint's folder moved: look beside it
        tok_path = os.path.join(os.path.dirname(path), "tokenizer.json")
    return model.eval(), cfg, data.load_tokenizer(tok_path)


def show(img):
    """Normalized (3, H, W) -> (H, W, 3) in [0, 1] for imshow."""
    x = img * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def block_around(shape_map, cell, cfg):
    """Patch indices of the smallest patch rectangle covering the object in 3x3 cell `cell`."""
    S, p, G = shape_map.size(-1), cfg.patch_size, cfg.grid
    r, c = divmod(cell, 3)
    ys, xs = torch.nonzero(shape_map[r * S // 3:(r + 1) * S // 3, c * S // 3:(c + 1) * S // 3] > 0, as_tuple=True)
    y0, y1 = (ys.min() + r * S // 3) // p, (ys.max() + r * S // 3) // p
    x0, x1 = (xs.min() + c * S // 3) // p, (xs.max() + c * S // 3) // p
    return torch.tensor([y * G + x for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)])


def tokens_for(captions, tokenizer, cfg):
    batch = data.Collate(tokenizer, cfg.n_captions, cfg.max_words)([dict(image=torch.zeros(3, 1, 1), captions=captions, seed=0)])
    return batch["tokens"], batch["word_mask"], batch["captions"][0]


def fig_masks(plt, val, cfg):
    out = val.render(list(range(4)))
    ctx, tgt = sample_masks(4, cfg, torch.Generator().manual_seed(0))
    G, p = cfg.grid, cfg.patch_size
    fig, ax = plt.subplots(1, 4, figsize=(12, 3.4))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    for i in range(4):
        ax[i].imshow(show(out["images"][i]))
        shade = torch.zeros(G * G, 4)  # RGBA: black, transparent on the context, half-opaque elsewhere
        shade[:, 3] = 0.6
        shade[ctx[i], 3] = 0.0
        ax[i].imshow(shade.view(G, G, 4).numpy(), extent=(0, G * p, G * p, 0))
        for m in range(tgt.size(1)):
            ys, xs = tgt[i, m] // G, tgt[i, m] % G
            ax[i].add_patch(plt.Rectangle((xs.min() * p - 0.5, ys.min() * p - 0.5), (xs.max() - xs.min() + 1) * p,
                                          (ys.max() - ys.min() + 1) * p, fill=False, lw=2, ec=colors[m % 5]))
        ax[i].set_title(f"context {ctx.size(1)} patches, 4 targets of {tgt.size(2)}", fontsize=9)
        ax[i].axis("off")
    fig.suptitle("multi-block masks: clear = context, dimmed = not seen, boxes = target blocks", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "masks.png"), dpi=100)


@torch.no_grad()
def word_attention(model, image, ctx, tgt, tokens, word_mask):
    """Attention (layers, Q, C, S) of every predictor token to every word, as the model computes it."""
    att = model.predict(image, ctx, tgt, tokens, word_mask, return_attention=True)["attention"]  # (layers, 1, C, Q, S)
    return att[:, 0].transpose(1, 2)


def fig_attention(plt, model, cfg, tokenizer, val):
    G, idx = cfg.grid, [0, 3, 5]
    out = val.render(idx)
    n_words = 10
    fig, axes = plt.subplots(len(idx), n_words + 1, figsize=(18, 2.1 * len(idx)))
    for row, i in enumerate(range(len(idx))):
        caps = out["captions"][i]
        tokens, wm, chosen = tokens_for(caps, tokenizer, cfg)
        # one target block (the top-left 2x2 patches) and every other patch as context: all 64 patches are tokens
        tgt = torch.tensor([[[0, 1, G, G + 1]]])
        ctx = torch.tensor([[j for j in range(G * G) if j not in (0, 1, G, G + 1)]])
        att = word_attention(model, out["images"][i:i + 1], ctx, tgt, tokens, wm).mean(0)  # (Q, C, S)
        where = torch.cat([ctx[0], tgt[0, 0]])  # token -> patch index
        words = tokenizer.encode(chosen[0]).tokens[: cfg.max_words]
        axes[row, 0].imshow(show(out["images"][i]))
        axes[row, 0].set_title(chosen[0], fontsize=7)
        for j in range(n_words):
            ax = axes[row, j + 1]
            ax.axis("off")
            if j >= len(words):
                continue
            heat = torch.zeros(G * G)
            heat[where] = att[:, 0, j]
            ax.imshow(show(out["images"][i]))
            ax.imshow(heat.view(G, G).numpy(), cmap="inferno", alpha=0.6, extent=(0, cfg.img_size, cfg.img_size, 0))
            ax.set_title(f'"{words[j]}" (max {heat.max():.2f})', fontsize=8)
        axes[row, 0].axis("off")
    fig.suptitle("patch-to-word attention of the text conditioner (first caption, mean over layers); "
                 "bright = the patch attends to that word; each panel scaled to its own max", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "attention.png"), dpi=100)


@torch.no_grad()
def fig_steer(plt, model, cfg, tokenizer, val, n_bank=400, k=6):
    G, p = cfg.grid, cfg.patch_size
    # the bank: layer-normed target features (what predictions are trained to match) of val patches
    bank = val.render(list(range(100, 100 + n_bank)))
    feats = F.layer_norm(model.encode(bank["images"]), (cfg.width,))  # (n, N, D)
    def share(label_map, value):  # (n, H, W) -> (n*N,) fraction of each patch's pixels with that label
        hit = (label_map == value).float()[:, None]
        return F.avg_pool2d(hit, p).flatten()
    bank_f = F.normalize(feats.flatten(0, 1), dim=-1)
    # the query image: the first val image with a big object; hide that object under one block
    for i in range(100):
        scene = val._scene(i)
        big = [o for o in scene[0] if o[3]]
        if big:
            break
    cell, shape, color = big[0][:3]
    item = val[i]
    tgt = block_around(item["shape_map"], cell, cfg)[None, None]  # (1, 1, Nt)
    ctx = torch.tensor([[j for j in range(G * G) if j not in set(tgt.flatten().tolist())]])
    name = f"{data.COLORS[color]} {data.SHAPES[shape]}"
    new_shape, new_color = (shape + 1) % len(data.SHAPES), (color + 3) % len(data.COLORS)
    edits = [("true captions", item["captions"]),
             (f'"{name}" -> "{data.COLORS[new_color]} {data.SHAPES[new_shape]}"',
              [c.replace(name, f"{data.COLORS[new_color]} {data.SHAPES[new_shape]}") for c in item["captions"]]),
             (f'"{name}" -> "{data.COLORS[color]} {data.SHAPES[new_shape]}" (shape only)',
              [c.replace(name, f"{data.COLORS[color]} {data.SHAPES[new_shape]}") for c in item["captions"]]),
             ("no captions", None)]
    fig, axes = plt.subplots(len(edits), k + 1, figsize=(2 * (k + 1), 2.3 * len(edits)))
    for row, (label, caps) in enumerate(edits):
        if caps is None:
            tokens, wm = torch.zeros(1, cfg.n_captions, cfg.max_words, dtype=torch.long), torch.zeros(1, cfg.n_captions, cfg.max_words, dtype=torch.bool)
            want = (None, None)
        else:
            tokens, wm, _ = tokens_for(caps, tokenizer, cfg)
            want = {0: (shape, color), 1: (new_shape, new_color), 2: (new_shape, color)}[row]
        pred = model.predict(item["image"][None], ctx, tgt, tokens, wm)["pred"]  # (1, Nt, D)
        centre = pred[0, tgt.size(-1) // 2]  # the prediction for the block's central patch
        sim = bank_f @ F.normalize(centre, dim=0)
        top = sim.topk(k).indices
        # a neighbour "shows" a shape / color when at least a quarter of its patch has it
        n_shape = int((share(bank["shape_map"], want[0] + 1)[top] >= 0.25).sum()) if want[0] is not None else None
        n_color = int((share(bank["color_map"], want[1] + 1)[top] >= 0.25).sum()) if want[1] is not None else None
        axes[row, 0].imshow(show(item["image"]))
        ys, xs = tgt[0, 0] // G, tgt[0, 0] % G
        axes[row, 0].add_patch(plt.Rectangle((xs.min() * p - 0.5, ys.min() * p - 0.5), (xs.max() - xs.min() + 1) * p,
                                             (ys.max() - ys.min() + 1) * p, fill=True, color="black", alpha=0.85))
        title = label if n_shape is None else f"{label}\nneighbours: shape {n_shape}/{k}, color {n_color}/{k}"
        axes[row, 0].set_title(title, fontsize=7)
        for j, t in enumerate(top.tolist()):
            img, patch = divmod(t, G * G)
            y, x = divmod(patch, G)
            y0, x0 = max(0, (y - 1) * p), max(0, (x - 1) * p)
            crop = show(bank["images"][img])[y0:(y + 2) * p, x0:(x + 2) * p]
            axes[row, j + 1].imshow(crop)
            axes[row, j + 1].set_title(f"cos {sim[t]:.2f}", fontsize=7)
        for a in axes[row]:
            a.axis("off")
    fig.suptitle("text steers the prediction: the hidden block's central patch predicted under each caption set, "
                 f"and the {k} val patches (of {n_bank * G * G}) nearest to it (3x3-patch crops centred on it)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "steer.png"), dpi=100)


@torch.no_grad()
def steer_table(model, cfg, tokenizer, val, n_images=100, n_bank=400, k=10):
    """The steering picture as numbers: over n_images val images, hide a big object under one block,
    predict its central patch under the true captions, under captions whose object color is edited,
    and under captions whose object shape is edited; report the share of the k nearest bank patches
    that show the named color / shape (>= 1/4 of the patch)."""
    G, p = cfg.grid, cfg.patch_size
    bank = val.render(list(range(100, 100 + n_bank)))
    bank_f = F.normalize(F.layer_norm(model.encode(bank["images"]), (cfg.width,)).flatten(0, 1), dim=-1)
    has_color = [F.avg_pool2d((bank["color_map"] == c + 1).float()[:, None], p).flatten() >= 0.25
                 for c in range(len(data.COLORS))]
    has_shape = [F.avg_pool2d((bank["shape_map"] == s + 1).float()[:, None], p).flatten() >= 0.25
                 for s in range(len(data.SHAPES))]
    hits = {key: [] for key in ("true: color", "true: shape", "color edited: new color", "color edited: old color",
                                "shape edited: new shape", "shape edited: old shape")}
    for i in range(100 + n_bank, 100 + n_bank + 4 * n_images):  # images not in the bank
        objs = [o for o in val._scene(i)[0] if o[3]]
        if not objs:
            continue
        cell, shape, color = objs[0][:3]
        item = val[i]
        tgt = block_around(item["shape_map"], cell, cfg)[None, None]
        ctx = torch.tensor([[j for j in range(G * G) if j not in set(tgt.flatten().tolist())]])
        name = f"{data.COLORS[color]} {data.SHAPES[shape]}"
        new_c, new_s = (color + 3) % len(data.COLORS), (shape + 1) % len(data.SHAPES)
        tops = []
        for caps in (item["captions"], [c.replace(name, f"{data.COLORS[new_c]} {data.SHAPES[shape]}") for c in item["captions"]],
                     [c.replace(name, f"{data.COLORS[color]} {data.SHAPES[new_s]}") for c in item["captions"]]):
            tokens, wm, _ = tokens_for(caps, tokenizer, cfg)
            pred = model.predict(item["image"][None], ctx, tgt, tokens, wm)["pred"][0, tgt.size(-1) // 2]
            tops.append((bank_f @ F.normalize(pred, dim=0)).topk(k).indices)
        hits["true: color"].append(has_color[color][tops[0]].float().mean())
        hits["true: shape"].append(has_shape[shape][tops[0]].float().mean())
        hits["color edited: new color"].append(has_color[new_c][tops[1]].float().mean())
        hits["color edited: old color"].append(has_color[color][tops[1]].float().mean())
        hits["shape edited: new shape"].append(has_shape[new_s][tops[2]].float().mean())
        hits["shape edited: old shape"].append(has_shape[shape][tops[2]].float().mean())
        if len(hits["true: color"]) == n_images:
            break
    n = len(hits["true: color"])
    print(f"| share of the {k} nearest val patches showing ... ({n} images) | |")
    print("|---|---|")
    for key, v in hits.items():
        print(f"| {key} | {torch.stack(v).mean():.2f} |")


def fig_pairs(plt):
    """notes/pairs.png: the data and masks of notes/experiments.md §7, with both kinds of caption."""
    import dataclasses
    cfg = dataclasses.replace(TCJEPAConfig(), n_targets=2, target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
                              context_scale=(1.0, 1.0))
    comp = data.ShapesDataset("val", layout="pairs", captions="complement").render(range(4))
    sub = data.ShapesDataset("val", layout="pairs", captions="substitute").render(range(4))
    ctx, tgt = sample_masks(4, cfg, torch.Generator().manual_seed(0))
    G, p = cfg.grid, cfg.patch_size
    fig, ax = plt.subplots(1, 4, figsize=(16, 4.6))
    for i in range(4):
        ax[i].imshow(show(comp["images"][i]))
        shade = torch.zeros(G * G, 4)
        shade[:, 3] = 0.6
        shade[ctx[i], 3] = 0.0
        ax[i].imshow(shade.view(G, G, 4).numpy(), extent=(0, G * p, G * p, 0))
        for m, color in zip(range(tgt.size(1)), ("tab:red", "tab:blue")):
            ys, xs = tgt[i, m] // G, tgt[i, m] % G
            ax[i].add_patch(plt.Rectangle((xs.min() * p - 0.5, ys.min() * p - 0.5), 4 * p, 4 * p, fill=False, lw=2,
                                          ec=color))
        ax[i].set_title(f"complement: {comp['captions'][i][0]}\nsubstitute: {sub['captions'][i][0]}", fontsize=7.5)
        ax[i].axis("off")
    fig.suptitle("the pairs layout: the same images in both arms; clear = context (cut to the batch minimum), "
                 "boxes = the two target blocks",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "pairs.png"), dpi=100)
    print("wrote notes/pairs.png")


def main(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, cfg, tokenizer = load(path)
    val = data.ShapesDataset("val", img_size=cfg.img_size)
    fig_masks(plt, val, cfg)
    fig_attention(plt, model, cfg, tokenizer, val)
    fig_steer(plt, model, cfg, tokenizer, val)
    print("wrote notes/masks.png, notes/attention.png, notes/steer.png")
    steer_table(model, cfg, tokenizer, val)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "runs/tc_s0/ckpt.pt"
    if "--pairs" in sys.argv:  # no checkpoint needed
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig_pairs(plt)
    elif "--table-only" in sys.argv:
        model, cfg, tokenizer = load(path)
        steer_table(model, cfg, tokenizer, data.ShapesDataset("val", img_size=cfg.img_size))
    else:
        main(path)
