"""
What the masks leave for the text to explain, on the shapes val split (notes/paper.md §2.5: when the
masking leaves nothing that text could explain, text conditioning brings nothing).

  python notes/mask_stats.py                       # the default data and masks; one JSON line, ~10 s
  python notes/mask_stats.py --shapes_layout pairs --n_targets 2 --target_scale 0.25 0.25 \\
      --target_aspect 1 1 --context_scale 1 1      # the masks of notes/experiments.md §7

For 1,024 val images, masks drawn as in training (batch 64, seed 0): the context and target sizes;
the share of target patches that show an object; of those, the share whose object has no patch in
the context (only the caption can tell what covers them); and of those, the share whose partner
(another object of the same image) is visible in the context. Objects are told apart by the
object map (data.ShapesDataset.render), one majority label per patch.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tcjepa  # noqa: E402


def mask_stats(layout, cfg, n_images=1024, batch_size=64):
    val = data.ShapesDataset("val", size=n_images, layout=layout,
                             captions="mixed" if layout == "grid3" else "complement")
    g = torch.Generator().manual_seed(0)
    n_tgt = n_obj = n_hidden = n_partner = n_ctx = 0
    for start in range(0, n_images, batch_size):
        out = val.render(list(range(start, min(n_images, start + batch_size))))
        B = len(out["images"])
        obj = data.patch_labels(out["object_map"], cfg.patch_size)  # (B, N): 0 background, 1 + slot
        ctx, tgt = tcjepa.sample_masks(B, cfg, g)
        K = int(obj.max()) + 1
        seen = torch.zeros(B, K, dtype=torch.bool).scatter_(1, obj.gather(1, ctx), True)  # (B, K) object k in context
        t = obj.gather(1, tgt.flatten(1))  # (B, M*Nt) object under each target patch
        on_obj = t > 0
        hidden = on_obj & ~seen.gather(1, t)  # on an object with no patch in the context
        other_seen = seen[:, 1:].any(1, keepdim=True)  # some object is visible: never the hidden one
        n_tgt += t.numel()
        n_obj += int(on_obj.sum())
        n_hidden += int(hidden.sum())
        n_partner += int((hidden & other_seen).sum())
        n_ctx += ctx.size(1) * B
    return dict(images=n_images, context_patches_per_image=round(n_ctx / n_images, 1),
                target_patches_per_image=round(n_tgt / n_images, 1),
                target_patches_on_objects=round(n_obj / n_tgt, 3),
                of_those_object_not_in_context=round(n_hidden / max(n_obj, 1), 3),
                of_those_partner_visible=round(n_partner / max(n_hidden, 1), 3))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes_layout", choices=data.LAYOUTS, default="grid3")
    p.add_argument("--n_targets", type=int)
    for k in ("target_scale", "target_aspect", "context_scale"):
        p.add_argument(f"--{k}", type=float, nargs=2)
    a = p.parse_args()
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items() if v is not None and k != "shapes_layout"}
    cfg = dataclasses.replace(tcjepa.TCJEPAConfig(), **given)
    print(json.dumps(dict(shapes_layout=a.shapes_layout, **given, **mask_stats(a.shapes_layout, cfg))))


if __name__ == "__main__":
    main()
