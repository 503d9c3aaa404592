"""Tests that can fail: each compares against a naive reference (a loop, a manual softmax) or
checks a property (masks disjoint, EMA moves toward the weights, target gets no gradient)."""

import math

import pytest
import torch
import torch.nn.functional as F

import tcjepa
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks

torch.set_num_threads(2)


def tiny_cfg(**kw):
    base = dict(img_size=32, patch_size=8, width=32, depth=2, heads=2, pred_width=24, pred_depth=2,
                vocab_size=50, max_words=6, n_captions=3, text_width=16, min_keep=4)
    return TCJEPAConfig(**{**base, **kw})


def fake_text(B, cfg, g):
    tokens = torch.randint(1, cfg.vocab_size, (B, cfg.n_captions, cfg.max_words), generator=g)
    lengths = torch.randint(1, cfg.max_words + 1, (B, cfg.n_captions), generator=g)
    word_mask = torch.arange(cfg.max_words) < lengths[..., None]  # (B, C, S)
    return tokens * word_mask, word_mask


# -----------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("cfg", [TCJEPAConfig(), TCJEPAConfig.vit_b16()], ids=["shapes", "vit_b16"])
def test_masks_shapes_disjoint_and_blocks(cfg):
    g = torch.Generator().manual_seed(0)
    G, N = cfg.grid, cfg.grid**2
    for _ in range(20):
        ctx, tgt = sample_masks(64, cfg, g)
        B, M, Nt = tgt.shape
        assert ctx.shape[0] == 64 and M == cfg.n_targets and ctx.dtype == tgt.dtype == torch.long
        assert ctx.min() >= 0 and ctx.max() < N and tgt.min() >= 0 and tgt.max() < N
        # context and targets never overlap, for every image (a naive per-image check)
        for b in range(B):
            assert not set(ctx[b].tolist()) & set(tgt[b].flatten().tolist())
            assert len(set(ctx[b].tolist())) == ctx.shape[1]  # no duplicate context patch
        # each target block is a full h x w rectangle
        r, c = tgt // G, tgt % G
        h = r.amax(-1) - r.amin(-1) + 1
        w = c.amax(-1) - c.amin(-1) + 1
        assert ((h * w) == Nt).all() and (h == h.flatten()[0]).all()
        # block scale within the configured range, up to rounding h and w to whole patches
        s = Nt / N
        lo, hi = cfg.target_scale
        assert lo * 0.7 <= s <= hi * 1.3, s
        aspect = (h.flatten()[0] / w.flatten()[0]).item()
        assert cfg.target_aspect[0] * 0.6 <= aspect <= cfg.target_aspect[1] * 1.5, aspect


def test_masks_scale_and_aspect_over_draws():
    """Over many batches the block sizes spread across the range and are not tied (the official
    code draws scale and aspect from ONE random number, so big blocks are always tall)."""
    cfg = TCJEPAConfig.vit_b16()
    g = torch.Generator().manual_seed(1)
    sizes = []
    for _ in range(300):
        _, tgt = sample_masks(2, cfg, g)
        r, c = tgt[0, 0] // cfg.grid, tgt[0, 0] % cfg.grid
        sizes.append(((r.max() - r.min() + 1).item(), (c.max() - c.min() + 1).item()))
    scales = torch.tensor([h * w / cfg.grid**2 for h, w in sizes])
    aspects = torch.tensor([h / w for h, w in sizes])
    assert scales.min() >= 0.15 * 0.8 and scales.max() <= 0.2 * 1.2
    assert aspects.min() < 0.9 and aspects.max() > 1.3  # the aspect range is explored
    big = scales > scales.median()
    assert (aspects[big] < 1).any() and (aspects[big] > 1).any()  # big blocks are not all tall


def test_masks_every_cell_reachable_and_positions_per_image():
    cfg = TCJEPAConfig()
    g = torch.Generator().manual_seed(2)
    seen_t = torch.zeros(cfg.grid**2, dtype=torch.bool)
    seen_c = torch.zeros(cfg.grid**2, dtype=torch.bool)
    for _ in range(50):
        ctx, tgt = sample_masks(32, cfg, g)
        seen_t[tgt.flatten()] = True
        seen_c[ctx.flatten()] = True
        assert len({tuple(t.flatten().tolist()) for t in tgt}) > 1  # images get their own positions
    assert seen_t.all() and seen_c.all()  # incl. the last row and column (official off-by-one)


def test_masks_context_not_biased_to_top():
    cfg = TCJEPAConfig()
    g = torch.Generator().manual_seed(3)
    rows = torch.cat([(sample_masks(64, cfg, g)[0] // cfg.grid).flatten().float() for _ in range(50)])
    center = (cfg.grid - 1) / 2
    assert abs(rows.mean().item() - center) < 0.25, rows.mean()  # raster truncation gives ~2.5


def test_masks_min_keep_and_seed():
    cfg = TCJEPAConfig()
    ctx, _ = sample_masks(128, cfg, torch.Generator().manual_seed(4))
    assert ctx.shape[1] >= cfg.min_keep - 4  # redraws keep a real context (not ~11 of 64)
    a = sample_masks(16, cfg, torch.Generator().manual_seed(5))
    b = sample_masks(16, cfg, torch.Generator().manual_seed(5))
    c = sample_masks(16, cfg, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


# -----------------------------------------------------------------------------
# attention against naive loops


def test_self_attention_matches_naive_loop():
    torch.manual_seed(0)
    attn = tcjepa.SelfAttention(16, heads=4)
    x = torch.randn(3, 7, 16)
    y = attn(x)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    ref = torch.zeros_like(x)
    for b in range(3):
        outs = []
        for h in range(4):
            sl = slice(4 * h, 4 * h + 4)
            s = q[b, :, sl] @ k[b, :, sl].T / 2.0
            p = s.exp() / s.exp().sum(-1, keepdim=True)  # manual softmax
            outs.append(p @ v[b, :, sl])
        ref[b] = attn.proj(torch.cat(outs, -1))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_text_conditioner_matches_naive_loop():
    cfg = tiny_cfg(n_captions=4)
    torch.manual_seed(0)
    cond = tcjepa.TextConditioner(cfg)
    B, Q, C, S, P = 3, 5, 4, cfg.max_words, cfg.pred_width
    x, words = torch.randn(B, Q, P), torch.randn(B, C, S, cfg.text_width)
    word_mask = torch.rand(B, C, S) > 0.4
    word_mask[0, 1] = False  # a padded caption
    word_mask[1, :, 0] = True
    word_mask[2] = False  # an image with no caption at all
    y, O, _ = cond(x, words, word_mask)
    ref_y, ref_O = torch.zeros_like(x), torch.zeros(B, Q, C, S)
    for b in range(B):
        q = cond.q(cond.norm_q(x[b]))  # (Q, P)
        pooled = None
        for c in range(C):
            idx = word_mask[b, c].nonzero().flatten()
            if len(idx) == 0:
                continue
            k, v = cond.k(words[b, c, idx]), cond.v(words[b, c, idx])
            s = q @ k.T / math.sqrt(P)
            a = s.exp() / s.exp().sum(-1, keepdim=True)
            out = a @ v  # (Q, P)
            pooled = out if pooled is None else torch.maximum(pooled, out)
            for i in range(Q):
                for j, w in enumerate(idx):
                    ref_O[b, i, c, w] = max(F.cosine_similarity(q[i], k[j], dim=0).item(), 0.0)
        h = x[b] + (pooled if pooled is not None else 0)
        ref_y[b] = h + cond.mlp(cond.norm2(h))
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(O, ref_O, atol=1e-5, rtol=1e-5)


def test_text_losses_match_direct_recomputation():
    g = torch.Generator().manual_seed(0)
    Lyr, B, Q, C, S = 3, 2, 4, 3, 5
    word_mask = torch.rand(B, C, S, generator=g) > 0.3
    word_mask[1, 2] = False  # padded caption: must not count
    sims = torch.rand(Lyr, B, Q, C, S, generator=g).clamp(min=0.3) * word_mask[None, :, None]
    sparse, consist = tcjepa.text_losses(sims, word_mask)
    sp, co, n = 0.0, 0.0, 0
    for b in range(B):
        for c in range(C):
            if not word_mask[b, c].any():
                continue
            for i in range(Q):
                O = sims[:, b, i, c]  # (Lyr, S)
                sp += sum(O[l].abs().sum() for l in range(Lyr)) / Lyr
                co += sum((O[l] - O.mean(0)).abs().sum() for l in range(Lyr)) / Lyr
                n += 1
    torch.testing.assert_close(sparse, sp / n)
    torch.testing.assert_close(consist, co / n)


# -----------------------------------------------------------------------------
# the model


def test_padded_captions_ignored_real_captions_matter():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, word_mask = fake_text(2, cfg, g)
    word_mask[0, 2] = False  # image 0 has only 2 real captions

    def predict(tok):
        z = model.encoder(images, ctx)
        return model.predictor(z, ctx, tgt, model.text(tok), word_mask)[0]

    base = predict(tokens)
    t2 = tokens.clone()
    t2[0, 2] = torch.randint(1, cfg.vocab_size, (cfg.max_words,), generator=g)  # edit the padded caption
    torch.testing.assert_close(predict(t2), base)
    t3 = tokens.clone()
    t3[0, 0] = (t3[0, 0] % (cfg.vocab_size - 1)) + 1  # edit a real caption
    assert (predict(t3)[0] - base[0]).abs().max() > 1e-4


def test_ema_target_no_grad_and_no_text_params():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, word_mask = fake_text(2, cfg, g)
    model(torch.randn(2, 3, 32, 32), ctx, tgt, tokens, word_mask)["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())  # target gets no gradient
    assert all(p.grad is not None for p in model.encoder.parameters())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target.parameters()]
    model.update_target(1.0)  # momentum 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters()))
    model.update_target(0.9)  # moves toward the encoder by 10%
    for a, t, e in zip(before, model.target.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * e)
    model.update_target(0.0)  # momentum 0: a copy
    assert all(torch.equal(t, e) for t, e in zip(model.target.parameters(), model.encoder.parameters()))

    plain = TCJEPA(tiny_cfg(text_cond="none"))
    names = [n for n, _ in plain.named_parameters()]
    assert not any(n.startswith("text") or "conds" in n for n in names)
    out = plain(torch.randn(2, 3, 32, 32), ctx, tgt)
    assert out["loss"].item() == out["loss_pred"].item()


def test_loss_terms_and_total():
    cfg = tiny_cfg(sparse_coef=0.3, consist_coef=0.7)
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, word_mask = fake_text(2, cfg, g)
    out = model(torch.randn(2, 3, 32, 32), ctx, tgt, tokens, word_mask)
    total = out["loss_pred"] + 0.3 * out["loss_sparse"] + 0.7 * out["loss_consist"]
    torch.testing.assert_close(out["loss"], total)
    assert out["loss_sparse"] > 0 and out["loss_consist"] > 0 and 0 < out["pos_frac"] <= 1
    assert 0 < out["attn_entropy"] <= math.log(cfg.max_words) + 1e-4


def test_tiny_model_overfits_one_batch():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    ctx, tgt = sample_masks(4, cfg, g)
    tokens, word_mask = fake_text(4, cfg, g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):  # the target is fixed (no EMA step): a pure regression problem
        loss = model(images, ctx, tgt, tokens, word_mask)["loss_pred"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("text_cond", ["cross", "none"])
def test_flops_estimate_matches_flop_counter(text_cond):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_cfg(text_cond=text_cond, width=64, pred_width=32, img_size=64)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, word_mask = fake_text(2, cfg, g)
    word_mask[:] = True
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel is not counted; its math twin is
        model(torch.randn(2, 3, 64, 64), ctx, tgt, tokens, word_mask)["loss"].backward()
    est = model.flops_per_image(ctx.shape[1], tgt.shape[2]) * 2
    measured = counter.get_total_flops()
    assert abs(est - measured) / measured < 0.10, (est, measured)


def test_encode_uses_target_encoder():
    cfg = tiny_cfg()
    model = TCJEPA(cfg)
    x = torch.randn(2, 3, 32, 32)
    feats = model.encode(x)
    assert feats.shape == (2, cfg.grid**2, cfg.width) and not feats.requires_grad
    torch.testing.assert_close(feats, model.target(x))
    with torch.no_grad():
        model.target.norm.bias.add_(1.0)  # change only the target: encode must follow it
    assert not torch.allclose(model.encode(x), feats)
