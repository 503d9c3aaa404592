"""
What the masks leave for the text to explain, on the shapes val split (PAPER.md sec. 2 warns that
"when the masking leaves nothing that text could explain, text conditioning brings nothing").

  python notes/mask_stats.py        # prints one JSON line; ~10 s on one CPU thread

For 1,000 val images, masks drawn as in training (batch 64, default config): the share of target
patches that show an object, and, of those, the share whose object (same shape and colour) has no
patch in the context: only the caption can tell what covers them.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tcjepa  # noqa: E402


def main():
    cfg, B = tcjepa.TCJEPAConfig(), 64
    val = data.ShapesDataset("val", size=1024)
    g = torch.Generator().manual_seed(0)
    n_tgt = n_obj = n_unseen = n_ctx = 0
    for start in range(0, 1024, B):
        out = val.render(list(range(start, start + B)))
        shape = data.patch_labels(out["shape_map"], cfg.patch_size)  # (B, N), 0 = background
        color = data.patch_labels(out["color_map"], cfg.patch_size)
        obj = shape * 100 + color  # an object's identity: its shape and colour (0 = background)
        ctx, tgt = tcjepa.sample_masks(B, cfg, g)
        seen = obj.gather(1, ctx)  # (B, Nc) what the context shows
        t = obj.gather(1, tgt.flatten(1))  # (B, M*Nt)
        on_obj = t > 0
        unseen = on_obj & ~(t[:, :, None] == seen[:, None, :]).any(-1)  # object patch, object not in context
        n_tgt += t.numel()
        n_obj += int(on_obj.sum())
        n_unseen += int(unseen.sum())
        n_ctx += ctx.size(1) * B
    print(json.dumps(dict(images=1024, context_patches_per_image=round(n_ctx / 1024, 1),
                          target_patches_per_image=round(n_tgt / 1024, 1),
                          target_patches_on_objects=round(n_obj / n_tgt, 3),
                          object_target_patches_whose_object_is_not_in_context=round(n_unseen / max(n_obj, 1), 3))))


if __name__ == "__main__":
    main()
