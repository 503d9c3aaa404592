"""
Where the dead zone of notes/experiments.md §8 comes from, on a trained checkpoint of the default
`shapes` data: do the conditioner's queries and keys each point one shared way, with the two ways
opposed, so that every patch-word cosine is negative?

  python notes/dead_zone.py runs/tc_paper_nobias_s0/ckpt.pt [more checkpoints]   # one JSON line each

On 256 val images (the run's own val split) with masks seeded 0, for each conditioned predictor layer:
  pos_frac           share of positive cosines cos(W_Q q, W_K t) over real words (what the losses see)
  q_cone, k_cone     the norm of the mean unit query (over all predictor tokens) and of the mean unit
                     key (over all real words): 1 = every vector points the same way, ~0 = spread out
  cos_means          the cosine between the mean query and the mean key
  pos_frac_centered  pos_frac after subtracting the mean query and the mean key: what is left of
                     the similarities once the shared directions are taken out
  q_spread           how much the queries of one image differ: the mean distance of a query to its
                     image's mean query over the mean query norm (before any centring; 0 = all equal)
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from mechanism import load  # noqa: E402
from tcjepa import TextConditioner, sample_masks  # noqa: E402


def cone(x):
    """x (N, P) -> the norm of the mean unit vector."""
    return float(F.normalize(x, dim=-1).mean(0).norm())


def positive(q, k, word_mask):
    """q (B, Q, P), k (B, C, S, P), word_mask (B, C, S) -> share of positive cosines over the
    token-word pairs of each image (real words only), as the training log's pos_frac."""
    dots = torch.einsum("bqp,bcsp->bcqs", q, k)  # (B, C, Q, S)
    mask = word_mask[:, :, None].expand_as(dots)
    return float((dots > 0)[mask].float().mean())


@torch.no_grad()
def diagnose(path, n_images=256):
    model, cfg, tcfg, tokenizer = load(path)
    if cfg.text_cond != "cross":
        sys.exit(f"error: {path} has no text conditioning (text_cond {cfg.text_cond})")
    val = data.ShapesDataset("val", size=n_images, img_size=cfg.img_size, seed=tcfg["seed"],
                             layout=tcfg.get("shapes_layout", "grid3"), captions=tcfg.get("shapes_captions", "mixed"))
    out = val.render(list(range(n_images)))
    batch = data.Collate(tokenizer, cfg.n_captions, cfg.max_words)(
        [dict(image=out["images"][j], captions=out["captions"][j], seed=j) for j in range(n_images)])
    ctx, tgt = sample_masks(n_images, cfg, torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, TextConditioner)]
    seen = {}  # layer index -> (queries (B, Q, P), keys (B, C, S, P))
    hooks = [h for i, m in enumerate(layers) for h in (
        m.q.register_forward_hook(lambda mod, a, y, i=i: seen.setdefault(i, {}).update(q=y)),
        m.k.register_forward_hook(lambda mod, a, y, i=i: seen.setdefault(i, {}).update(k=y)))]
    model.predict(out["images"], ctx, tgt, batch["tokens"], batch["word_mask"])
    for h in hooks:
        h.remove()
    rows = []
    for i in range(len(layers)):
        q, k, wm = seen[i]["q"], seen[i]["k"], batch["word_mask"]  # (B, Q, P), (B, C, S, P), (B, C, S)
        spread = float((q - q.mean(1, keepdim=True)).norm(dim=-1).mean() / q.norm(dim=-1).mean())
        q_all, k_all = q.flatten(0, 1), k[wm]  # every predictor token, every real word
        q_mean, k_mean = q_all.mean(0), k_all.mean(0)
        rows.append(dict(layer=i, pos_frac=positive(q, k, wm), q_cone=cone(q_all), k_cone=cone(k_all),
                         cos_means=float(F.cosine_similarity(q_mean, k_mean, dim=0)),
                         pos_frac_centered=positive(q - q_mean, k - k_mean, wm), q_spread=spread))
    return dict(checkpoint=path, sparse_coef=cfg.sparse_coef, consist_coef=cfg.consist_coef,
                qk_bias=cfg.qk_bias, layers=rows)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(diagnose(p)))
