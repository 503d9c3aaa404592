"""
Diagnostics of the pre-registered test (notes/experiments.md §7) on a trained checkpoint of the
`pairs` layout: where the prediction loss sits, and how much of what an oracle caption would give
the true captions already give for a hidden object.

  python notes/mechanism.py runs/mech_comp_s0/ckpt.pt [more checkpoints]   # one JSON line each

On the first 1,024 images of the run's own val split (drawn from the run's seed, so the same in every
arm for one seed) with masks drawn as in training, seeded 0 (batch 64):
  loss_object, loss_background  the mean per-patch prediction loss, true captions, on target
                                patches that show an object / only background
  elim_true, elim_oracle        on the target patches of an object with no patch in the context
                                (images with exactly one such object), the mean per-patch loss with
                                the true captions, and with an oracle caption that names only the
                                hidden shape ("a star", as every caption)
  elimination_ratio             elim_true / elim_oracle: 1 = the true captions and the context tell
                                the predictor as much about the hidden shape as the oracle does
A checkpoint without text (I-JEPA) gets the same numbers; its captions change nothing (ratio 1).
The oracle caption has no position word: for a model trained on `substitute` captions ("a star at
the top left") it is a form never seen in training, so that arm's ratio is not comparable.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks  # noqa: E402


def load(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TCJEPAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()})
    model = TCJEPA(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt["train_config"], data.tokenizer_from_str(ckpt["tokenizer_json"], path)


def per_patch_loss(pred, targets, kind):
    """(B*M, Nt, D) -> (B*M, Nt): the prediction loss of each patch, as TCJEPA.forward averages it."""
    if kind == "l2":
        return (pred.float() - targets).pow(2).sum(-1)
    return F.smooth_l1_loss(pred.float(), targets, reduction="none").mean(-1)


@torch.no_grad()
def diagnose(path, n_images=1024, batch_size=64):
    model, cfg, tcfg, tokenizer = load(path)
    if tcfg.get("shapes_layout") != "pairs":
        sys.exit(f"error: {path} was not trained on --shapes_layout pairs")
    val = data.ShapesDataset("val", size=n_images, img_size=cfg.img_size, seed=tcfg["seed"], layout="pairs",
                             captions=tcfg["shapes_captions"])
    collate = data.Collate(tokenizer, cfg.n_captions, cfg.max_words)
    g = torch.Generator().manual_seed(0)
    sums = dict(obj=0.0, n_obj=0, bg=0.0, n_bg=0, true=0.0, oracle=0.0, n_hidden=0)
    for start in range(0, n_images, batch_size):
        idx = list(range(start, min(n_images, start + batch_size)))
        out = val.render(idx)
        B = len(idx)
        ctx, tgt = sample_masks(B, cfg, g)
        obj = data.patch_labels(out["object_map"], cfg.patch_size)  # (B, N): 0 background, 1 or 2
        shape = data.patch_labels(out["shape_map"], cfg.patch_size)  # (B, N): 0 background, 1 + shape
        seen = torch.zeros(B, 3, dtype=torch.bool).scatter_(1, obj.gather(1, ctx), True)  # (B, 3)
        present = torch.zeros(B, 3, dtype=torch.bool).scatter_(1, obj, True)
        hidden = present & ~seen
        hidden[:, 0] = False
        one = hidden.sum(1) == 1  # exactly one object fully hidden
        slot = hidden.float().argmax(1)  # (B,) that object
        shape_of = torch.zeros(B, 3, dtype=torch.long).scatter_(1, obj, shape)  # (B, 3) each slot's shape
        t = obj.gather(1, tgt.flatten(1))  # (B, M*Nt) object under each target patch
        on_hidden = one[:, None] & (t == slot[:, None])

        true = collate([dict(image=out["images"][j], captions=out["captions"][j], seed=j) for j in range(B)])
        oracle_caps = [["a " + data.SHAPES[shape_of[j, slot[j]] - 1]] * cfg.n_captions for j in range(B)]
        oracle = collate([dict(image=out["images"][j], captions=oracle_caps[j], seed=j) for j in range(B)])
        losses = {}
        for name, b in (("true", true), ("oracle", oracle)):
            r = model.predict(out["images"], ctx, tgt, b["tokens"], b["word_mask"])
            losses[name] = per_patch_loss(r["pred"], r["targets"], cfg.pred_loss).view(B, -1)  # (B, M*Nt)
        sums["obj"] += float(losses["true"][t > 0].sum())
        sums["n_obj"] += int((t > 0).sum())
        sums["bg"] += float(losses["true"][t == 0].sum())
        sums["n_bg"] += int((t == 0).sum())
        sums["true"] += float(losses["true"][on_hidden].sum())
        sums["oracle"] += float(losses["oracle"][on_hidden].sum())
        sums["n_hidden"] += int(on_hidden.sum())
    n = max(sums["n_hidden"], 1)
    return dict(checkpoint=path, text_cond=cfg.text_cond, captions=tcfg["shapes_captions"],
                shuffle_captions=tcfg["shuffle_captions"], loss_object=sums["obj"] / max(sums["n_obj"], 1),
                loss_background=sums["bg"] / max(sums["n_bg"], 1), hidden_patches=sums["n_hidden"],
                elim_true=sums["true"] / n, elim_oracle=sums["oracle"] / n,
                elimination_ratio=sums["true"] / max(sums["oracle"], 1e-12))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(diagnose(p)))
