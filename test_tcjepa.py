"""Tests that can fail: each compares against a naive reference (a loop, a manual softmax) or
checks a property (masks disjoint, EMA moves toward the weights, target gets no gradient)."""

import json
import math
import os
import shutil
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import tcjepa
from data import (COLOR_RGB, COLORS, MEAN, SHAPES, STD, CocoCaptions, Collate, UserError, ShapesDataset,
                  load_tokenizer, patch_labels, train_tokenizer)
from tcjepa import TCJEPA, TCJEPAConfig, sample_masks

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: subprocesses run train.py from it


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


def conditioner_batch(cfg, B=3, Q=5):
    """Tokens x (B, Q, P), caption words (B, C, S, text_width) and a word mask (B, C, S) with a padded
    caption (image 0), every caption non-empty (image 1) and an image with no caption at all (image 2)."""
    C, S = cfg.n_captions, cfg.max_words
    x, words = torch.randn(B, Q, cfg.pred_width), torch.randn(B, C, S, cfg.text_width)
    word_mask = torch.rand(B, C, S) > 0.4
    word_mask[0, 1] = False
    word_mask[1, :, 0] = True
    word_mask[2] = False
    return x, words, word_mask


def test_text_conditioner_matches_naive_loop():
    cfg = tiny_cfg(n_captions=4)
    torch.manual_seed(0)
    cond = tcjepa.TextConditioner(cfg)
    x, words, word_mask = conditioner_batch(cfg)
    (B, Q, P), C, S = x.shape, cfg.n_captions, cfg.max_words
    y, O, _, att = cond(x, words, word_mask)
    ref_y, ref_O, ref_att = torch.zeros_like(x), torch.zeros(B, Q, C, S), torch.zeros(B, C, Q, S)
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
            ref_att[b, c][:, idx] = a
            pooled = out if pooled is None else torch.maximum(pooled, out)
            for i in range(Q):
                for j, w in enumerate(idx):
                    ref_O[b, i, c, w] = max(F.cosine_similarity(q[i], k[j], dim=0).item(), 0.0)
        h = x[b] + (pooled if pooled is not None else 0)
        ref_y[b] = h + cond.mlp(cond.norm2(h))
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(O, ref_O, atol=1e-5, rtol=1e-5)
    real = word_mask.any(-1)  # (B, C): the returned attention of a real caption is its softmax
    torch.testing.assert_close(att[real], ref_att[real], atol=1e-6, rtol=1e-5)


def test_bias_free_queries_and_keys():
    """qk_bias False: no learned offset reaches a query or a key, so a zero input gives zero q and k."""
    torch.manual_seed(0)
    m = TCJEPA(tiny_cfg(qk_bias=False))
    cond = m.predictor.conds[0]
    assert cond.q.bias is None and cond.k.bias is None
    assert cond.norm_q.bias is None and m.text.norm.bias is None
    assert cond.v.bias is not None  # values keep theirs
    # even with trained (non-zero) norm weights: q and k are linear in the normalized input
    with torch.no_grad():
        cond.norm_q.weight.uniform_(0.5, 2)
        x = torch.randn(1, 3, 24)
        torch.testing.assert_close(cond.q(cond.norm_q(-x)), -cond.q(cond.norm_q(x)))
        w = torch.randn(1, 2, 3, m.cfg.text_width)
        torch.testing.assert_close(cond.k(m.text.norm(-w)), -cond.k(m.text.norm(w)))
    g = torch.Generator().manual_seed(1)
    tokens, wm = fake_text(2, m.cfg, g)
    ctx, tgt = sample_masks(2, m.cfg, g)
    out = m(torch.randn(2, 3, 32, 32), ctx, tgt, tokens, wm)
    out["loss"].backward()  # trains as the default does
    assert torch.isfinite(out["loss"]) and cond.q.weight.grad is not None


def test_mean_pooled_captions_attend_to_the_mean_word():
    """text_pool "mean" (ablation): the conditioner sees one vector per caption, the mean of its words."""
    cfg = tiny_cfg(text_pool="mean")
    torch.manual_seed(0)
    cond = tcjepa.TextConditioner(cfg)
    x = torch.randn(2, 5, cfg.pred_width)
    words = torch.randn(2, cfg.n_captions, cfg.max_words, cfg.text_width)
    word_mask = torch.rand(2, cfg.n_captions, cfg.max_words) > 0.3
    word_mask[:, :, 0] = True
    mean = torch.stack([torch.stack([words[b, c][word_mask[b, c]].mean(0) for c in range(cfg.n_captions)])
                        for b in range(2)])[:, :, None]  # (B, C, 1, T)
    cond.pool = "word"
    ref = cond(x, mean, word_mask[..., :1])
    cond.pool = "mean"
    got = cond(x, words, word_mask)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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



def cond_and_inputs(sim_mode="paper", seed=0, P=32, T=8):
    """A TextConditioner with random weights (non-zero biases) and words, in float64. T < P, so the
    keys vary in at most T of the P dimensions and a direction orthogonal to every key exists."""
    cfg = tiny_cfg(pred_width=P, text_width=T, n_captions=3, max_words=6, sim_mode=sim_mode)
    torch.manual_seed(seed)
    cond = tcjepa.TextConditioner(cfg).double()
    with torch.no_grad():
        for lin in (cond.q, cond.k, cond.v):
            lin.bias.normal_(0, 0.3)
    x, words = torch.randn(2, 7, P, dtype=torch.float64), torch.randn(2, 3, 6, T, dtype=torch.float64)
    word_mask = torch.rand(2, 3, 6) > 0.3
    word_mask[..., 0] = True
    return cond, x, words, word_mask


def orthogonal_to_keys(cond):
    """A unit vector u with u . k = 0 for every key k = W_K t + b_K, whatever the words t."""
    basis = torch.cat([cond.k.weight, cond.k.bias[:, None]], 1)  # (P, T + 1): spans every key
    u = torch.randn(basis.size(0), dtype=basis.dtype)
    u = u - basis @ torch.linalg.lstsq(basis, u).solution  # remove the span of the keys
    return u / u.norm()


def test_paper_loss_has_free_trivial_minima():
    """notes/paper.md §2.5, two transformations of the query/key side that leave the attention, and so
    the conditioner's output, as they were, while the paper's O (and L_sparse, L_consist) go to 0.
    Shift: every key gains a component a*u and every query -c*u; q.k_s changes by a number that
    is the same for all words of a query, which a softmax ignores, and every cosine tends to -1.
    Shrink: every query gains a component along u that differs from token to token; q.k_s is
    unchanged, |q| grows, every cosine tends to 0 with its sign kept (pos_frac cannot see it), also
    after centring queries and keys (the mean is taken out, the per-token part stays)."""
    cond, x, words, wm = cond_and_inputs()
    y0, O0, _, att0 = cond(x, words, wm)
    sp0, co0 = tcjepa.text_losses(torch.stack([O0, O0]), wm)
    assert (O0 > 0).any() and sp0 > 0
    u = orthogonal_to_keys(cond)
    with torch.no_grad():  # the shift
        cond.q.bias.sub_(1e3 * u)
        cond.k.bias.add_(1e3 * u)
    y1, O1, _, att1 = cond(x, words, wm)
    torch.testing.assert_close(att1, att0, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(y1, y0, atol=1e-9, rtol=1e-7)
    assert O1.abs().max() == 0  # every cosine negative: O = 0, and so the losses and their gradients
    Os = torch.stack([O1, O1])  # two "layers" alike
    sp, co = tcjepa.text_losses(Os, wm)
    assert sp == 0 and co == 0

    cond, x, words, wm = cond_and_inputs(seed=1)
    y0, O0, _, att0 = cond(x, words, wm)
    u, r = orthogonal_to_keys(cond), torch.randn(cond.q.in_features, dtype=torch.float64)
    q0 = cond.q(cond.norm_q(x))
    with torch.no_grad():  # the shrink: q_i gains c (r . LN(x_i)) u, different for every token
        cond.q.weight.add_(1e4 * u[:, None] * r[None, :])
    y1, O1, _, att1 = cond(x, words, wm)
    torch.testing.assert_close(att1, att0, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(y1, y0, atol=1e-9, rtol=1e-7)
    assert torch.equal(O1 > 0, O0 > 0)  # the same signs: pos_frac unchanged
    assert O1.sum() < 1e-3 * O0.sum()  # ... while every positive cosine shrank ~1000x
    q1, k = cond.q(cond.norm_q(x)), cond.k(words)  # centred: the mean query and mean key taken out
    cq0, cq1, ck = q0 - q0.mean(1, keepdim=True), q1 - q1.mean(1, keepdim=True), k - k[wm].mean(0)
    cos0 = F.cosine_similarity(cq0[:, None, :, None], ck[:, :, None], dim=-1)  # (B, C, Q, S)
    cos1 = F.cosine_similarity(cq1[:, None, :, None], ck[:, :, None], dim=-1)
    m = wm[:, :, None].expand_as(cos0)
    assert torch.equal(cos1[m] > 0, cos0[m] > 0)
    assert cos1[m].clamp(min=0).sum() < 1e-3 * cos0[m].clamp(min=0).sum()


def test_remedies_make_the_trivial_minima_cost_something():
    """sim_mode cosine: the same shift and shrink now change the attention (weight moves to the null
    word), so they would cost the prediction its text. sim_mode attention: its losses are functions
    of the attention, which both leave unchanged, so neither can lower them."""
    for transform in ("shift", "shrink"):
        for mode in ("cosine", "attention"):
            cond, x, words, wm = cond_and_inputs(mode, seed=2)
            y0, _, _, att0 = cond(x, words, wm)
            u, r = orthogonal_to_keys(cond), torch.randn(cond.q.in_features, dtype=torch.float64)
            with torch.no_grad():
                if transform == "shift":
                    cond.q.bias.sub_(1e3 * u)
                    cond.k.bias.add_(1e3 * u)
                else:
                    cond.q.weight.add_(1e4 * u[:, None] * r[None, :])
            y1, O1, _, att1 = cond(x, words, wm)
            if mode == "cosine":
                real = wm[:, :, None].expand_as(att0)
                if transform == "shift":  # the text's weight goes to the null word
                    assert att1[real].sum() < 0.5 * att0[real].sum()
                else:  # every cosine -> 0: the weights of a caption's words become equal (no word chosen)
                    n = wm.sum(-1)[:, :, None].expand(-1, -1, att0.size(2))  # (B, C, Q) real words
                    torch.testing.assert_close(att1, real / (1.0 + n[..., None].double()), atol=1e-3, rtol=0)
                    assert (att0 - real / (1.0 + n[..., None])).abs().max() > 0.1
                assert (y1 - y0).abs().max() > 1e-2, transform
            else:
                torch.testing.assert_close(att1, att0, atol=1e-9, rtol=1e-7)
                A0, A1 = (torch.stack([a, a.flip(0)]).transpose(2, 3) for a in (att0, att1))
                for l0, l1 in zip(tcjepa.text_losses(A0, wm, entropy=True),
                                  tcjepa.text_losses(A1, wm, entropy=True)):
                    torch.testing.assert_close(l1, l0)
                    assert l0 > 0


def test_cosine_conditioner_matches_naive_loop():
    """sim_mode cosine: weight of word s = exp(cos_s / temp) / (1 + sum_t exp(cos_t / temp)) over the
    caption's real words (a null word of cosine 0 and value 0 takes the rest)."""
    cfg = tiny_cfg(n_captions=4, sim_mode="cosine", cos_temp=0.2)
    torch.manual_seed(0)
    cond = tcjepa.TextConditioner(cfg)
    x, words, word_mask = conditioner_batch(cfg)
    (B, Q, P), C, S = x.shape, cfg.n_captions, cfg.max_words
    y, O, ent, att = cond(x, words, word_mask)
    ref_y, ref_att = torch.zeros_like(x), torch.zeros(B, C, Q, S)
    for b in range(B):
        q = cond.q(cond.norm_q(x[b]))  # (Q, P)
        pooled = None
        for c in range(C):
            idx = word_mask[b, c].nonzero().flatten()
            if len(idx) == 0:
                continue
            k, v = cond.k(words[b, c, idx]), cond.v(words[b, c, idx])
            cos = torch.stack([torch.stack([F.cosine_similarity(q[i], k[j], dim=0) for j in range(len(idx))])
                               for i in range(Q)])  # (Q, n)
            e = (cos / 0.2).exp()
            a = e / (1 + e.sum(-1, keepdim=True))
            ref_att[b, c][:, idx] = a
            out = a @ v
            pooled = out if pooled is None else torch.maximum(pooled, out)
        h = x[b] + (pooled if pooled is not None else 0)
        ref_y[b] = h + cond.mlp(cond.norm2(h))
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att, ref_att, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(ent)
    cfg_paper = tiny_cfg(n_captions=4)
    torch.manual_seed(0)
    paper = tcjepa.TextConditioner(cfg_paper)
    torch.testing.assert_close(paper(x, words, word_mask)[1], O)  # O is the paper's whatever the attention


def test_attention_mode_losses_are_entropy_and_consistency_of_the_attention():
    """sim_mode attention: L_sparse = mean over real (token, caption) pairs of the layer-mean entropy
    of the attention; L_consist = the same of ||A^l - mean_l A||_1; checked against a loop, through
    TCJEPA.forward."""
    cfg = tiny_cfg(sim_mode="attention", sparse_coef=0.3, consist_coef=0.7)
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, wm = fake_text(2, cfg, g)
    wm[1, 2] = False  # a padded caption: must not count
    images = torch.randn(2, 3, 32, 32)
    out = model(images, ctx, tgt, tokens, wm)
    A = model.predict(images, ctx, tgt, tokens, wm, return_attention=True)["attention"]  # (Lyr, B, C, Q, S)
    sp, co, n = 0.0, 0.0, 0
    for b in range(2):
        for c in range(cfg.n_captions):
            if not wm[b, c].any():
                continue
            for i in range(A.size(3)):
                a = A[:, b, c, i][:, wm[b, c]]  # (Lyr, real words)
                sp += sum(-(a[l] * a[l].log()).sum() for l in range(len(a))) / len(a)
                co += sum((a[l] - a.mean(0)).abs().sum() for l in range(len(a))) / len(a)
                n += 1
    torch.testing.assert_close(out["loss_sparse"], sp / n)
    torch.testing.assert_close(out["loss_consist"], co / n)
    torch.testing.assert_close(out["loss"],
                               out["loss_pred"] + 0.3 * out["loss_sparse"] + 0.7 * out["loss_consist"])
    out["loss"].backward()
    assert model.predictor.conds[0].q.weight.grad.abs().sum() > 0


def test_pos_cos_is_the_mean_positive_cosine():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    tokens, wm = fake_text(2, cfg, g)
    images = torch.randn(2, 3, 32, 32)
    out = model(images, ctx, tgt, tokens, wm)
    O = model.predict(images, ctx, tgt, tokens, wm)["sims"]
    torch.testing.assert_close(out["pos_cos"], O[O > 0].mean())
    assert 0 < out["pos_cos"] < 1


def grounding_case(seed=0):
    """Random captions over a 12-word vocabulary (ids 1-4 shapes, 5-7 colours, 8-11 other words) and
    random objects under 5 tokens per image: (tokens, word_mask, words_at, is_ctx, color_ids)."""
    g = torch.Generator().manual_seed(seed)
    B, Q, C, S = 3, 5, 4, 6
    tokens = torch.randint(1, 12, (B, C, S), generator=g)
    word_mask = torch.arange(S) < torch.randint(3, S + 1, (B, C, 1), generator=g)
    tokens = tokens * word_mask
    words_at = torch.stack([torch.randint(0, 5, (B, Q), generator=g),
                            torch.randint(5, 8, (B, Q), generator=g)], -1)
    words_at[words_at[..., 0] == 0] = 0  # background: no words
    is_ctx = torch.rand(B, Q, generator=g) < 0.5
    return tokens, word_mask, words_at, is_ctx, torch.tensor([5, 6, 7])


def test_grounding_matches_a_loop_and_knows_its_answers():
    tokens, wm, words_at, is_ctx, colors = grounding_case()
    B, C, S = tokens.shape
    Q = words_at.size(1)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, B, Q, C, S, generator=g).round(decimals=1)  # ties happen
    got = data.grounding_summary(data.grounding_sums(scores, tokens, wm, words_at, is_ctx, colors), "g")
    hits, aucs, chance, n = [0.0, 0.0], [0.0, 0.0], 0.0, 0
    for b in range(B):
        for i in range(Q):
            shape, color = words_at[b, i].tolist()
            for c in range(C):
                words = tokens[b, c][wm[b, c]].tolist()
                has_color_word = any(w in (5, 6, 7) for w in words)
                if shape == 0 or shape not in words or (has_color_word and color not in words):
                    continue
                pos = [w in (shape, color) for w in words]
                if all(pos):
                    continue
                n += 1
                chance += sum(pos) / len(words)
                for l in range(2):
                    x = scores[l, b, i, c][wm[b, c]].tolist()
                    top = [j for j, v in enumerate(x) if v == max(x)]
                    hits[l] += sum(pos[j] for j in top) / len(top)
                    pairs = [(x[p] > x[q]) + 0.5 * (x[p] == x[q])
                             for p in range(len(x)) for q in range(len(x)) if pos[p] and not pos[q]]
                    aucs[l] += sum(pairs) / len(pairs)
    assert n > 10 and got["ground_pairs"] == n
    assert got["g"] == pytest.approx(sum(hits) / 2 / n, abs=1e-6)
    assert got["g_auc"] == pytest.approx(sum(aucs) / 2 / n, abs=1e-6)
    assert got["ground_chance"] == pytest.approx(chance / n, abs=1e-6)
    assert got["g_layers"] == [round(h / n, 4) for h in hits]

    # known answers: scores that pick exactly the object's words -> 1; all equal (dead O) -> chance, AUC 1/2
    is_obj = ((tokens[:, None] == words_at[..., 0, None, None])
              | (tokens[:, None] == words_at[..., 1, None, None]))
    perfect = (is_obj & wm[:, None]).float()[None].expand(3, -1, -1, -1, -1)  # (3, B, Q, C, S)
    p = data.grounding_summary(data.grounding_sums(perfect, tokens, wm, words_at, is_ctx, colors), "g")
    assert p["g"] == 1.0 and p["g_auc"] == 1.0 and p["g_tgt"] == 1.0 and p["g_ctx"] == 1.0
    assert p["g_layers"] == [1.0] * 3
    zeros = torch.zeros(3, B, Q, C, S)
    flat = data.grounding_summary(data.grounding_sums(zeros, tokens, wm, words_at, is_ctx, colors), "g")
    assert flat["g"] == pytest.approx(flat["ground_chance"]) and flat["g_auc"] == 0.5 and 0 < flat["g"] < 0.7
    wrong = 1 - perfect  # always another word
    summary = data.grounding_summary(data.grounding_sums(wrong, tokens, wm, words_at, is_ctx, colors), "g")
    assert summary["g"] == 0.0


def test_grounding_probe_reads_the_patches_the_predictor_tokens_stand_for(tmp_path):
    """End to end on shapes: an oracle whose O and attention put 1 on the words of the object under each
    predictor token's patch (found through ctx / tgt, as tcjepa.Predictor orders its tokens) scores 1."""
    val = ShapesDataset("val", size=16)
    tok = train_tokenizer(val.captions_for_tokenizer(), 64)
    cfg = TCJEPAConfig(n_captions=5, max_words=16)
    items = val.__getitems__([(j, j) for j in range(16)])
    batch = Collate(tok, 5, 16)(items)
    batch["ctx"], batch["tgt"] = sample_masks(16, cfg, torch.Generator().manual_seed(0))
    batch["indices"] = torch.arange(16)
    gt = val.render(range(16))
    # each patch's object words (shape, colour): (B, N, 2)
    at_patch = data.object_words(patch_labels(gt["shape_map"], 8), patch_labels(gt["color_map"], 8), tok)

    def oracle(images, ctx, tgt, tokens, word_mask):
        (B, Nc), (M, Nt) = ctx.shape, tgt.shape[1:]
        scores = torch.zeros(B, M, Nc + Nt, *tokens.shape[1:])  # (B, M, L, C, S)
        for b in range(B):
            for m in range(M):
                for j, p in enumerate(ctx[b].tolist() + tgt[b, m].tolist()):
                    shape, color = at_patch[b, p].tolist()
                    is_word = (tokens[b] == shape) | (tokens[b] == color)
                    scores[b, m, j] = is_word & word_mask[b] & (shape > 0)
        O = scores.flatten(1, 2)[None]  # (1, B, Q, C, S)
        return O, O.transpose(2, 3)

    res = data.grounding_probe(oracle, [batch], val, tok, 8)
    assert res["ground_pairs"] > 100
    assert res["ground_o"] == 1.0 and res["ground_attn"] == 1.0 and res["ground_o_auc"] == 1.0
    assert 0.1 < res["ground_chance"] < 0.5

    def shuffled(*a):  # the same oracle with the images' captions rolled: no better than chance
        O, _ = oracle(*a)
        O = O.roll(1, 1)
        return O, O.transpose(2, 3)

    res = data.grounding_probe(shuffled, [batch], val, tok, 8)
    assert res["ground_o"] < res["ground_chance"] + 0.15


def test_block_union_matches_a_loop():
    """The batched-matmul union of blocks equals the cells a per-block double loop paints."""
    g = torch.Generator().manual_seed(7)
    G, B, M, h, w = 9, 16, 4, 3, 5
    top = torch.randint(0, G - h + 1, (B, M), generator=g)
    left = torch.randint(0, G - w + 1, (B, M), generator=g)
    union = tcjepa._block_union(top, left, h, w, G)
    ref = torch.zeros(B, G * G, dtype=torch.bool)
    for b in range(B):
        for m in range(M):
            for i in range(h):
                for j in range(w):
                    ref[b, (top[b, m] + i) * G + left[b, m] + j] = True
    assert torch.equal(union, ref)


def test_context_order_does_not_change_the_loss():
    """sample_masks returns the context in random order; the model must not care (positions are
    gathered with the tokens, attention and the conditioner are permutation-equivariant)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    ctx, tgt = sample_masks(2, cfg, g)
    assert not torch.equal(ctx, ctx.sort(1).values)  # the order really is random
    tokens, word_mask = fake_text(2, cfg, g)
    a = model(images, ctx, tgt, tokens, word_mask)
    b = model(images, ctx.sort(1).values, tgt, tokens, word_mask)
    for k in ("loss_pred", "loss_sparse", "loss_consist"):
        torch.testing.assert_close(a[k], b[k])


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
    # padding inside a real caption
    b, c, w = ((~word_mask) & word_mask.any(-1, keepdim=True)).nonzero()[0].tolist()
    t4 = tokens.clone()
    t4[b, c, w] = 7  # a real word id at a padded position: masked, so nothing changes
    torch.testing.assert_close(predict(t4), base)
    t3 = tokens.clone()
    t3[0, 0] = (t3[0, 0] % (cfg.vocab_size - 1)) + 1  # edit a real caption
    M = cfg.n_targets
    assert (predict(t3)[:M] - base[:M]).abs().max() > 1e-4  # rows 0..M-1: image 0's target blocks
    torch.testing.assert_close(predict(t3)[M:], base[M:])  # image 1 is untouched


def test_targets_are_layer_normed_without_parameters():
    """notes/paper.md §1.3: targets are the target encoder's output normalized once more over the
    feature dimension with no learned scale or offset: mean 0 and std 1 per token, whatever the
    target encoder's own final LayerNorm has learned (at init it would hide a missing norm)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TCJEPA(cfg)
    with torch.no_grad():
        model.target.norm.weight.uniform_(0.5, 3.0)
        model.target.norm.bias.uniform_(-2.0, 2.0)
    g = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(2, cfg, g)
    t = model.predict(torch.randn(2, 3, 32, 32), ctx, tgt)["targets"]  # (B*M, Nt, D)
    torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(t.shape[:-1]), atol=1e-3, rtol=0)


def test_ema_is_updated_from_the_raw_model_whatever_wraps_it():
    """train_step moves the EMA target from the raw model: under DDP the wrapped model has only a
    forward, so an update through it would break every multi-GPU run."""
    import train

    class ForwardOnly(torch.nn.Module):  # what DDP exposes: forward, no update_target
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return self.m(*a)

    cfg = tiny_cfg(img_size=64)
    tcfg = train.TrainConfig(batch_size=4, ema_start=0.9, ema_end=0.9)
    rt = train.Runtime(False, 0, 0, 1, torch.device("cpu"), False, train.nullcontext())
    raw, opt = train.build_model(cfg, tcfg, rt)
    g = torch.Generator().manual_seed(0)
    tokens, wm = fake_text(4, cfg, g)
    batch = dict(images=torch.randn(4, 3, 64, 64), tokens=tokens, word_mask=wm)
    before = [p.clone() for p in raw.target.parameters()]
    train.train_step(0, ForwardOnly(raw), raw, opt, lambda: batch, tcfg, cfg, rt)
    for b, t, e in zip(before, raw.target.parameters(), raw.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * e)
    assert any(not torch.equal(b, t) for b, t in zip(before, raw.target.parameters()))


def test_val_losses_shuffled_and_none_are_what_they_say():
    """The manipulation check of every experiment: val_shuffled is the loss with each image's captions
    taken from the next image of the whole val set (also in a batch of one), val_none with no caption,
    each against a direct forward pass."""
    import train
    cfg = tiny_cfg(img_size=64)
    torch.manual_seed(0)
    model = TCJEPA(cfg).eval()
    val = ShapesDataset("val", size=9)
    tok = train_tokenizer(val.captions_for_tokenizer(), 64)
    tcfg = train.TrainConfig(val_size=9, batch_size=4)
    batches = train.make_val_batches(val, Collate(tok, cfg.n_captions, cfg.max_words), tcfg, cfg)
    assert [len(b["images"]) for b in batches] == [4, 4, 1]
    every = torch.cat([b["tokens"] for b in batches])
    assert torch.equal(batches[2]["tokens_shuffled"][0], every[7])  # the lone image gets its neighbour's
    assert torch.equal(torch.cat([b["tokens_shuffled"] for b in batches]), every.roll(1, 0))
    v = train.val_losses(model, batches, torch.device("cpu"), train.nullcontext())
    with torch.no_grad():
        def direct(tok, w):
            losses = [model(b["images"], b["ctx"], b["tgt"], tok(b), w(b))["loss_pred"].item()
                      * len(b["images"]) for b in batches]
            return sum(losses) / 9
        assert v["true"] == pytest.approx(direct(lambda b: b["tokens"], lambda b: b["word_mask"]))
        shuffled = direct(lambda b: b["tokens_shuffled"], lambda b: b["word_mask_shuffled"])
        assert v["shuffled"] == pytest.approx(shuffled)
        assert v["none"] == pytest.approx(direct(lambda b: b["tokens"],
                                                 lambda b: torch.zeros_like(b["word_mask"])))
        assert len({round(x, 6) for x in v.values()}) == 3  # three different numbers


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


@pytest.mark.parametrize("variant", [dict(text_cond="cross"), dict(text_pool="mean"), dict(cond_layers=1),
                                     dict(cond_mlp_ratio=1.0), dict(n_captions=2, max_words=3)])
def test_init_depends_on_the_seed_alone(variant):
    """Paired comparisons: with one seed, I-JEPA and every TC-JEPA variant start from the same
    encoder, target, mask token and predictor blocks; another seed gives other weights."""
    def build(seed, **kw):
        torch.manual_seed(seed)
        return TCJEPA(tiny_cfg(**kw)).state_dict()

    ij, tc, other = build(0, text_cond="none"), build(0, **variant), build(1, text_cond="none")
    shared = [k for k in ij if k in tc]
    assert len(shared) == len(ij) and any(k.startswith("predictor.blocks.") for k in shared)
    assert all(torch.equal(ij[k], tc[k]) for k in shared)
    drawn = [k for k in shared if k.endswith("weight") and ij[k].ndim >= 2 or k.endswith("mask_token")]
    assert all(not torch.equal(ij[k], other[k]) for k in drawn)
    # zeros and ones
    assert all(torch.equal(ij[k], other[k]) for k in ij if k.endswith("bias") or "norm" in k)


def test_init_is_ijepas():
    """trunc-normal 0.02 everywhere, as I-JEPA's training applies it
    (no depth scaling: notes/paper.md §5.3)."""
    torch.manual_seed(0)
    m = TCJEPA(TCJEPAConfig(width=256, depth=3, pred_width=128))
    for vit in (m.encoder, m.predictor):
        for block in vit.blocks:
            for w in (block.attn.qkv.weight, block.attn.proj.weight,
                      block.mlp.fc1.weight, block.mlp.fc2.weight):
                assert w.std().item() == pytest.approx(0.02, rel=0.05)
            assert block.mlp.fc1.bias.abs().max() == 0 and block.norm1.eps == 1e-6
    assert m.predictor.conds[1].q.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.predictor.mask_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert m.text.tok.weight[0].abs().max() == 0  # padding row
    assert all(torch.equal(a, b)
               for a, b in zip(m.encoder.state_dict().values(), m.target.state_dict().values()))


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


@pytest.mark.parametrize("text_cond,cond_mlp_ratio", [("cross", 4.0), ("cross", 1.0), ("none", 4.0)])
def test_flops_estimate_matches_flop_counter(text_cond, cond_mlp_ratio):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_cfg(text_cond=text_cond, width=64, pred_width=32, img_size=64, cond_mlp_ratio=cond_mlp_ratio)
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


def scalar_reads(fn):
    """Number of tensor -> Python scalar reads (.item(), bool(t), float(t)) while fn runs: on a GPU
    each is a host-device synchronization. On the CPU they show up in the profiler all the same."""
    with torch.profiler.profile() as prof:
        fn()
    syncs = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
    return sum(e.name in syncs for e in prof.events())


@pytest.mark.parametrize("text_cond,sparse", [("cross", 0.0), ("cross", 0.1), ("none", 0.0)])
def test_model_step_reads_no_scalars(text_cond, sparse):
    cfg = tiny_cfg(text_cond=text_cond, sparse_coef=sparse)
    g = torch.Generator().manual_seed(0)
    model = TCJEPA(cfg)
    ctx, tgt = sample_masks(4, cfg, g)  # masks are drawn on the CPU before the step, on purpose
    tokens, word_mask = fake_text(4, cfg, g)
    images = torch.randn(4, 3, 32, 32)

    # forward, backward, EMA: what runs on the GPU each step (AdamW's own step counter is a CPU tensor)
    def step():
        model(images, ctx, tgt, tokens, word_mask)["loss"].backward()
        model.update_target(0.99)

    assert scalar_reads(lambda: torch.ones(3).sum().item()) > 0  # the detector sees a read
    assert scalar_reads(step) == 0


# =============================================================================
# data.py

POS_WORDS = {"top", "bottom", "left", "right", "center", "middle"}


# ----------------------------------------------------------------------------- shapes


def test_readme_example_prints_what_it_says():
    """The model snippet of README.md runs and prints the numbers written in its comments."""
    import contextlib
    import io
    import re
    text = open(os.path.join(HERE, "README.md")).read()
    code = re.search(r"## The model in a few lines\s+```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    printed = out.getvalue().splitlines()
    promised = [line.split("# ", 1)[1] for line in code.splitlines() if line.startswith("# {")]
    assert promised and promised[0] in printed, (printed, promised)


@pytest.fixture(scope="module")
def shapes300():
    ds = ShapesDataset("train", size=300)
    return ds, ds.render(list(range(300)))


def test_shapes_deterministic_and_getitem_equals_getitems():
    ds = ShapesDataset("train", size=100)
    a, b = ds[5], ShapesDataset("train", size=100)[5]
    items = ds.__getitems__([3, 5, (7, 9)])
    for key in ("image", "shape_map", "color_map", "attrs"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], items[1][key])
    assert a["captions"] == b["captions"] == items[1]["captions"] and len(a["captions"]) == 5
    assert a["image"].shape == (3, 64, 64) and a["shape_map"].dtype == torch.long
    assert a["attrs"].shape == (len(SHAPES) + len(COLORS) + 4,)
    assert a["seed"] == 0 and items[2]["seed"] == 9  # sample_seed is passed through ...
    assert torch.equal(ds[(7, 123)]["image"], items[2]["image"])  # ... and does not change the image
    with pytest.raises(IndexError):
        ds[100]


def test_shapes_splits_and_seeds_disjoint():
    def keys(ds):
        return {hash(img.numpy().tobytes()) for img in ds.render(list(range(300)))["images"]}
    train = keys(ShapesDataset("train", size=300))
    assert len(train) == 300
    assert not train & keys(ShapesDataset("val"))
    assert not train & keys(ShapesDataset("train", size=300, seed=1))
    assert len(ShapesDataset("train")) == 20000 and len(ShapesDataset("val")) == 1000


def _objects(shape_map, color_map, img_size):
    """Ground truth per occupied cell: {(row, col): (shape, color, extent in cells)} read from the maps."""
    cw, objs = img_size / 3, {}
    for r in range(3):
        for c in range(3):
            ys, xs = slice(round(r * cw), round((r + 1) * cw)), slice(round(c * cw), round((c + 1) * cw))
            sm, cm = shape_map[ys, xs], color_map[ys, xs]
            if (sm > 0).any():
                shapes, colors = sm[sm > 0].unique().tolist(), cm[cm > 0].unique().tolist()
                assert len(shapes) == 1 and len(colors) == 1, "one object per cell"
                yy, xx = (sm > 0).nonzero().unbind(1)
                extent = max(yy.max() - yy.min(), xx.max() - xx.min()).item() + 1
                objs[(r, c)] = (shapes[0] - 1, colors[0] - 1, extent / cw)
    return objs


def test_shapes_captions_match_ground_truth(shapes300):
    ds, out = shapes300
    n_all = n_caps = 0
    for b in range(300):
        objs = _objects(out["shape_map"][b], out["color_map"][b], 64)
        described = set()
        for cap in out["captions"][b]:
            words = cap.replace(":", " ").replace(",", " ").split()
            colors = [COLORS.index(w) for w in words if w in COLORS]
            shapes = [SHAPES.index(w) for w in words if w in SHAPES]
            n_caps += 1
            if POS_WORDS & set(words):  # one object: size, color, shape, position
                row = 0 if "top" in words else 2 if "bottom" in words else 1
                col = 0 if "left" in words else 2 if "right" in words else 1
                shape, color, extent = objs[(row, col)]  # KeyError = caption names an empty cell
                assert (colors, shapes) == ([color], [shape]), cap
                big = bool({"big", "large"} & set(words))
                assert big != bool({"small", "little", "tiny"} & set(words)), cap
                assert big == (extent > 0.65), (cap, extent)  # big ~0.74-0.9 cell, small <= 0.56
                described.add((row, col))
            else:  # all objects, no positions
                n_all += 1
                assert sorted(zip(colors, shapes)) == sorted((c, s) for s, c, _ in objs.values()), cap
        assert described == set(objs), "every object has a caption of its own"
    assert 0.05 < n_all / n_caps < 0.35


def _pair_objects(shape_map, color_map):
    """Layout pairs: {(row, col): (shape, color)} per occupied cell of the 2x2 grid, read from the maps."""
    objs, h = {}, shape_map.size(0) // 2
    for r in range(2):
        for c in range(2):
            sm = shape_map[r * h:(r + 1) * h, c * h:(c + 1) * h]
            cm = color_map[r * h:(r + 1) * h, c * h:(c + 1) * h]
            if (sm > 0).any():
                shapes, colors = sm[sm > 0].unique().tolist(), cm[cm > 0].unique().tolist()
                assert len(shapes) == 1 and len(colors) == 1, "one object per cell"
                objs[(r, c)] = (shapes[0] - 1, colors[0] - 1)
    return objs


def test_shapes_pairs_captions_match_ground_truth():
    comp = ShapesDataset("val", size=200, layout="pairs", captions="complement").render(range(200))
    sub = ShapesDataset("val", size=200, layout="pairs", captions="substitute").render(range(200))
    assert torch.equal(comp["images"], sub["images"])  # the same images in both arms
    for b in range(200):
        objs = _pair_objects(comp["shape_map"][b], comp["color_map"][b])
        assert len(objs) == 2 and len({s for s, _ in objs.values()}) == 2
        assert len({c for _, c in objs.values()}) == 1
        names = sorted(SHAPES[s] for s, _ in objs.values())
        orders = set()
        for cap in comp["captions"][b]:  # both shapes, nothing else that tells
            words = cap.split()
            assert sorted(w for w in words if w in SHAPES) == names, cap
            sizes = {"big", "large", "small", "little", "tiny"}
            assert not (set(words) & (POS_WORDS | set(COLORS) | sizes)), cap
            orders.add(tuple(w for w in words if w in SHAPES))
        described = set()
        for cap in sub["captions"][b]:  # one object, at its true position
            words = cap.replace(":", " ").split()
            row, col = (0 if "top" in words else 1), (0 if "left" in words else 1)
            assert [w for w in words if w in SHAPES] == [SHAPES[objs[(row, col)][0]]], cap
            assert not (set(words) & set(COLORS)), cap
            described.add((row, col))
        assert described == set(objs), "every object has a caption of its own"
    # object map: two objects, each one shape; about 9 object patches per image (majority labels)
    om = patch_labels(comp["object_map"], 8)
    assert set(comp["object_map"].unique().tolist()) == {0, 1, 2}
    assert 8 < (om > 0).sum(1).float().mean() < 11


def test_shapes_object_map_matches_shape_map(shapes300):
    ds, out = shapes300
    om, sm = out["object_map"].long(), out["shape_map"]
    assert torch.equal(om > 0, sm > 0)
    for b in range(20):  # each object id covers one shape
        for k in om[b].unique().tolist()[1:]:
            assert len(sm[b][om[b] == k].unique()) == 1


def test_shapes_ground_truth_consistent(shapes300):
    ds, out = shapes300
    attrs, sm, cm = out["attrs"], out["shape_map"], out["color_map"]
    ns, nc = len(SHAPES), len(COLORS)
    for b in range(300):
        objs = _objects(sm[b], cm[b], 64)
        assert attrs[b, ns + nc + len(objs) - 1] == 1 and attrs[b, ns + nc:].sum() == 1
        assert set(attrs[b, :ns].nonzero().flatten().tolist()) == {s for s, _, _ in objs.values()}
        assert set(attrs[b, ns:ns + nc].nonzero().flatten().tolist()) == {c for _, c, _ in objs.values()}
    counts = Counter(int(a) for a in attrs[:, ns + nc:].argmax(1))
    assert set(counts) == {0, 1, 2, 3}  # 1..4 objects all occur
    assert set(sm.unique().tolist()) == set(range(ns + 1)) and set(cm.unique().tolist()) == set(range(nc + 1))
    # the painted pixels have exactly the color the map says; background never does
    rgb = (torch.tensor(COLOR_RGB) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)  # (8, 3)
    pixels = out["images"].permute(0, 2, 3, 1)  # (B, H, W, 3)
    fg = cm > 0
    assert torch.allclose(pixels[fg], rgb[cm[fg] - 1], atol=1e-5)
    dist = (pixels[~fg][:, None] - rgb[None]).abs().amax(-1)  # (pixels, 8) normalized units
    assert dist.min() > 0.3, "background must stay far from every object color"
    # background is textured but of low contrast: varies within an image, much less than objects
    bg_std = torch.stack([pixels[b][~fg[b]].std(0).mean() for b in range(20)])
    assert (bg_std > 0.01).all() and (bg_std < 0.3).all()


def test_shapes_other_img_size_is_proportional():
    small = ShapesDataset(size=50).render(list(range(50)))
    big = ShapesDataset(size=50, img_size=96).render(list(range(50)))
    assert big["images"].shape == (50, 3, 96, 96)
    assert torch.equal(small["attrs"], big["attrs"]) and small["captions"] == big["captions"]
    ratio = (big["shape_map"] > 0).sum() / (small["shape_map"] > 0).sum()
    assert abs(ratio - (96 / 64) ** 2) < 0.1


def test_shapes_render_speed():
    """Spec: >= 2000 img/s on one core (measured ~4500); asserted conservatively against CI noise."""
    ds, threads = ShapesDataset(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds.render(list(range(256)))  # warm-up
        best = min(_timed(ds.render, list(range(k * 256, (k + 1) * 256))) for k in range(1, 4))
    finally:
        torch.set_num_threads(threads)
    assert 256 / best >= 1000, f"{256 / best:.0f} img/s"


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- COCO fixture

UNICODE = "un café très chaud ☕"


def _write_coco(root):
    """A tiny COCO 2017 layout. ids: 1 RGB, 2 L (2 captions), 3 CMYK, 4 RGBA png named .jpg,
    5 corrupt bytes, 6 on disk but no captions, 7 captioned but not on disk; val: 1 image."""
    for d in ("train2017", "val2017", "annotations"):
        (root / d).mkdir(parents=True)
    specs = {1: ("RGB", (40, 30)), 2: ("L", (32, 48)), 3: ("CMYK", (50, 50)), 4: ("RGBA", (36, 36)),
             6: ("RGB", (20, 20))}
    for i, (mode, size) in specs.items():
        img = Image.new(mode, size)
        img.putdata([tuple((x * 7 + k * 50) % 256 for k in range(len(mode))) if len(mode) > 1 else x % 256
                     for x in range(size[0] * size[1])])
        img.save(root / "train2017" / f"{i:012d}.jpg", format="PNG" if mode == "RGBA" else "JPEG")
    (root / "train2017" / f"{5:012d}.jpg").write_bytes(bytes(range(256)) * 4)
    Image.new("RGB", (24, 24), (200, 10, 10)).save(root / "val2017" / f"{100:012d}.jpg")
    long = " ".join(f"word{k}" for k in range(30))
    caps = {1: ["a red bus on a street", UNICODE, "two dogs play", "a cat sleeps", long],
            2: ["a grey photo", "an old picture"],
            3: ["a cmyk image of a tree", "a tree", "green leaves", "a forest", "the tree is tall"],
            4: ["a transparent thing", "!!!", "a png in disguise"], 5: ["broken", "very broken"],
            7: ["gone", "lost"]}
    _dump(root / "annotations" / "captions_train2017.json",
          [i for i in range(1, 8)], [(i, c) for i, cs in caps.items() for c in cs])
    _dump(root / "annotations" / "captions_val2017.json", [100], [(100, "a red square")])


def _dump(path, ids, caps):
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 1, "height": 1} for i in ids],
            "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(caps)]}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def coco_dir(tmp_path):
    _write_coco(tmp_path / "coco")
    return tmp_path / "coco"


def test_coco_index_counts(coco_dir, capsys):
    ds = CocoCaptions(coco_dir, "train", img_size=32)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["coco train: 5 images, 17 captions; left out: 1 without captions, 1 missing files"]
    assert len(ds) == 5 and UNICODE in ds.captions[0]
    assert sorted(ds.captions_for_tokenizer()) == sorted(c for cs in ds.captions for c in cs)
    assert len(CocoCaptions(coco_dir, "val", img_size=32)) == 1


def test_coco_items_modes_crops_and_corrupt(coco_dir, capsys):
    ds = CocoCaptions(coco_dir, "train", img_size=32)
    for i in range(4):  # RGB, L, CMYK, RGBA-as-png all become (3, S, S)
        item = ds[(i, 11)]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["seed"] == 11
    assert torch.equal(ds[(0, 3)]["image"], ds[(0, 3)]["image"])
    assert not torch.equal(ds[(0, 3)]["image"], ds[(0, 4)]["image"])
    torch.manual_seed(0)
    a = ds[(2, 5)]["image"]
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(a, ds[(2, 5)]["image"])
    capsys.readouterr()
    assert ds[4] is None and ds.n_unreadable == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skipping unreadable image {ds.files[4]}: ")


def test_coco_16_bit_image_keeps_its_range(coco_dir):
    ramp = Image.new("I;16", (64, 48))
    ramp.putdata([(x % 64) * 1000 for x in range(64 * 48)])  # 0 .. 63000 of 65535
    ramp.save(coco_dir / "train2017" / f"{1:012d}.jpg", format="PNG")  # replaces image 1
    img = CocoCaptions(coco_dir, "train", img_size=32)[(0, 1)]["image"]
    pixels = img * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)  # back to [0, 1]
    # a ramp, not the all-white clip of convert("RGB")
    assert pixels.min() < 0.2 and 0.5 < pixels.max() < 0.99


def _error(fn):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_coco_errors_name_the_path(coco_dir, tmp_path):
    ann = coco_dir / "annotations" / "captions_train2017.json"
    assert str(tmp_path / "nope") in _error(lambda: CocoCaptions(tmp_path / "nope"))
    gone = coco_dir / "val2017"
    assert str(gone) in _error(lambda: (gone / f"{100:012d}.jpg").unlink() or gone.rmdir()
                               or CocoCaptions(coco_dir, "val"))
    text = ann.read_text(encoding="utf-8")
    ann.write_text('{"images": [}')
    msg = _error(lambda: CocoCaptions(coco_dir))
    assert str(ann) in msg and "not valid JSON" in msg and "line 1 column" in msg
    ann.write_text('{"images": []}')
    assert str(ann) in _error(lambda: CocoCaptions(coco_dir))
    ann.write_text(text.replace('"caption"', '"text"'))
    assert str(ann) in _error(lambda: CocoCaptions(coco_dir))
    for wrong in ('"caption": null', '"image_id": [1]', '"id": "1"'):  # right keys, wrong value types
        field, value = wrong.split(": ")
        data = json.loads(text)
        entry = data["annotations" if field != '"id"' else "images"][0]
        entry[field.strip('"')] = json.loads(value)
        ann.write_text(json.dumps(data))
        assert str(ann) in _error(lambda: CocoCaptions(coco_dir)), wrong
    _dump(ann, [1, 2, 1], [(1, "a dog"), (2, "a cat")])  # one id, two images: they would share captions
    assert "image id 1 more than once" in _error(lambda: CocoCaptions(coco_dir))
    _dump(ann, [7], [(7, "gone")])  # nothing usable
    assert "no usable COCO images" in _error(lambda: CocoCaptions(coco_dir))
    ann.unlink()
    msg = _error(lambda: CocoCaptions(coco_dir))
    assert str(ann) in msg and "cocodataset.org" in msg
    with pytest.raises(UserError):
        ShapesDataset("test")


# ----------------------------------------------------------------------------- tokenizer and Collate


@pytest.fixture
def tok_path(coco_dir, tmp_path):
    caps = list(CocoCaptions(coco_dir, img_size=32).captions_for_tokenizer())
    caps += list(ShapesDataset(size=200).captions_for_tokenizer())
    path = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer(caps, 300, path)
    return path


def test_tokenizer_roundtrip(tok_path, tmp_path):
    tok = load_tokenizer(tok_path)
    fresh = ShapesDataset(size=300)
    texts = [c for i in range(250, 300) for c in fresh[i]["captions"]] + [UNICODE, "A BIG RED CIRCLE!"]
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert ids == [e.ids for e in load_tokenizer(tok_path).encode_batch(texts, add_special_tokens=False)]
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[UNK]") == 1
    assert all(i and 0 not in i for i in ids)
    # lowercased, no punctuation
    assert ids[-1] == tok.encode("a big red circle", add_special_tokens=False).ids
    assert "cafe" in tok.encode(UNICODE, add_special_tokens=False).tokens  # accents stripped, ☕ dropped
    assert tok.encode("!!!", add_special_tokens=False).ids == [] == tok.encode("").ids
    assert str(tmp_path / "none.json") in _error(lambda: load_tokenizer(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("not a tokenizer")
    assert str(tmp_path / "bad.json") in _error(lambda: load_tokenizer(tmp_path / "bad.json"))
    # a tokenizer saved with padding on: Collate pads itself, so padding here would count as words
    tok.enable_padding(length=12)
    tok.save(str(tmp_path / "padded.json"))
    assert tok.encode("a red circle", add_special_tokens=False).ids.count(0) == 9  # (the file pads to 12)
    enc = load_tokenizer(tmp_path / "padded.json").encode("a red circle", add_special_tokens=False)
    assert len(enc.ids) == 3 and 0 not in enc.ids
    (tmp_path / "gap.json").write_text(tok.to_str().replace('"[UNK]":1', '"[UNK]":5000'))
    # the embedding has no row 5000
    assert "ids up to 5000" in _error(lambda: load_tokenizer(tmp_path / "gap.json"))


def test_collate_coco(coco_dir, tok_path, capsys):
    ds, tok = CocoCaptions(coco_dir, img_size=32), load_tokenizer(tok_path)
    collate = Collate(tok, n_captions=5, max_words=6)
    items = [ds[(i, 7)] for i in range(len(ds))]  # item 4 is corrupt -> None
    capsys.readouterr()
    batch = collate(items)
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["tokens"].shape == batch["word_mask"].shape == (4, 5, 6)
    assert batch["tokens"].dtype == torch.long and batch["word_mask"].dtype == torch.bool
    assert "shape_map" not in batch
    assert torch.equal(batch["tokens"] != 0, batch["word_mask"])  # pad id 0 exactly where masked
    assert len(batch["captions"][1]) == 2 and not batch["word_mask"][1, 2:].any()  # L image: 2 captions
    assert sorted(batch["captions"][0]) == sorted(ds.captions[0])  # 5 of 5, without replacement
    c = batch["captions"][3].index("!!!")  # RGBA image: "!!!" has no words -> absent
    assert not batch["word_mask"][3, c].any() and collate.n_empty == 1
    assert "'!!!'" in capsys.readouterr().err
    long = [k for k, cap in enumerate(batch["captions"][0]) if cap.startswith("word0")][0]
    assert batch["word_mask"][0, long].sum() == 6  # truncated to max_words
    again = collate(items)
    assert again["captions"] == batch["captions"] and torch.equal(again["tokens"], batch["tokens"])
    orders = {tuple(collate([ds[(0, s)]])["captions"][0]) for s in range(6)}
    assert len(orders) > 1  # the seed picks the captions
    with pytest.raises(UserError):
        collate([None, None])


def test_collate_shapes_through_dataloader(tok_path):
    ds = ShapesDataset(size=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=16,
                                         collate_fn=Collate(load_tokenizer(tok_path), 3, 16))
    batch = next(iter(loader))  # DataLoader calls __getitems__: one render for the batch
    assert batch["images"].shape == (16, 3, 64, 64) and batch["tokens"].shape == (16, 3, 16)
    assert set(batch) == {"images", "tokens", "word_mask", "captions"}  # ground-truth maps stay in the worker
    assert torch.equal(batch["images"][3], ds[3]["image"]) and batch["word_mask"].any(-1).all()
    assert all(set(caps) <= set(ds[b]["captions"]) for b, caps in enumerate(batch["captions"]))


# ----------------------------------------------------------------------------- patch_labels


@pytest.mark.parametrize("H,W,p", [(16, 16, 4), (16, 24, 8), (64, 64, 8)])
def test_patch_labels_matches_loop(H, W, p):
    g = torch.Generator().manual_seed(H * W + p)
    maps = torch.randint(0, 4, (3, H, W), generator=g)
    maps[0, :p, :p] = torch.tensor([0, 2] * (p * p // 2)).view(p, p)  # an exact tie: smallest label wins
    expect = torch.zeros(3, (H // p) * (W // p), dtype=torch.long)
    for b in range(3):
        for i in range(H // p):
            for j in range(W // p):
                counts = Counter(maps[b, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten().tolist())
                expect[b, i * (W // p) + j] = max(counts, key=lambda k: (counts[k], -k))
    assert torch.equal(patch_labels(maps, p), expect)
    assert expect[0, 0] == 0


# =============================================================================
# COCO evaluation: instance masks, probe ground truth, probe math

# the fixture: 4 images (3 wanted), category ids with gaps, listed out of order

CATS = [dict(id=90, name="toothbrush", supercategory="x"), dict(id=1, name="person", supercategory="y"),
        dict(id=5, name="airplane", supercategory="z")]  # labels: person 1, airplane 2, toothbrush 3
SIZES = {11: (40, 30), 12: (32, 48), 13: (24, 24), 14: (20, 20)}  # id -> (width, height)
PENTAGON = [v for k in range(5)
            for v in (10 + 7 * math.cos(1.26 * k + 0.3), 15 + 7 * math.sin(1.26 * k + 0.3))]
TRIANGLE = [25.3, 4.6, 37.8, 8.2, 30.1, 25.7]
CUT_AWAY = [36.2, 10.3, 39.4, 10.3, 39.4, 20.6]  # right of the centre crop of image 11 (x 3.75..33.75 kept)
SMALL, LARGE = [12.2, 20.4, 20.7, 19.8, 16.5, 28.3], [4, 10, 28, 10, 28, 40, 4, 40]


def blob_mask(h, w):  # a lopsided disc in the lower left: not symmetric under a transpose
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return ((x - 9) ** 2 / 49 + (y - 36) ** 2 / 100) <= 1


def rle_encode(mask):  # column-major runs, starting with 0s
    flat, counts, value, run = mask.T.flatten().tolist(), [], False, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return counts + [run]


def polygon_area(xy):
    xs, ys = xy[0::2], xy[1::2]
    return abs(sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs)))) / 2


def write_fixture(root):
    """instances_val2017.json + JPEGs in root/val2017; returns the instances path."""
    crowd = blob_mask(48, 32)
    ann = lambda i, img, cat, seg, area, crowd=0: dict(id=i, image_id=img, category_id=cat, segmentation=seg,
                                                     area=area, bbox=[0, 0, 1, 1], iscrowd=crowd)
    anns = [ann(101, 11, 1, [PENTAGON, TRIANGLE], polygon_area(PENTAGON) + polygon_area(TRIANGLE)),
            ann(102, 11, 5, dict(counts="Yb0;1O1N", size=[30, 40]), 30.0, crowd=1),  # compressed: skipped
            ann(107, 11, 5, [CUT_AWAY], polygon_area(CUT_AWAY)),
            ann(103, 12, 5, dict(counts=rle_encode(crowd), size=[48, 32]), float(crowd.sum()), crowd=1),
            ann(104, 12, 1, [SMALL], polygon_area(SMALL)),  # the small one first: file order would lose it
            ann(105, 12, 90, [LARGE], polygon_area(LARGE)),
            ann(106, 14, 1, [[1, 1, 9, 1, 9, 9]], 32.0)]
    images = [dict(id=i, file_name=f"{i:012d}.jpg", width=w, height=h) for i, (w, h) in SIZES.items()]
    (root / "val2017").mkdir()
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(root / "val2017" / im["file_name"])
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=CATS)))
    return path


@pytest.fixture
def coco(tmp_path):
    path = write_fixture(tmp_path)
    return path, data.read_instances(path, image_ids=[11, 12, 13])


# -----------------------------------------------------------------------------
# naive references


def ref_polygon(xy, h, w):
    """Ray casting at pixel centres."""
    xs, ys, out = xy[0::2], xy[1::2], torch.zeros(h, w, dtype=torch.bool)
    for y in range(h):
        for x in range(w):
            px, py, inside = x + 0.5, y + 0.5, False
            for i in range(len(xs)):
                x1, y1, x2, y2 = xs[i], ys[i], xs[i - 1], ys[i - 1]
                if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
                    inside = not inside
            out[y, x] = inside
    return out


def ref_rle(counts, h, w):
    out, pos = torch.zeros(h, w, dtype=torch.bool), 0
    for i, c in enumerate(counts):
        for p in range(pos, pos + c):
            out[p % h, p // h] = i % 2 == 1  # column-major: pixel p is (row p % h, column p // h)
        pos += c
    return out


def ref_label_map(anns, h, w):
    out = torch.zeros(h, w, dtype=torch.long)
    for label, _, seg, _ in sorted(anns, key=lambda a: -a[1]):
        masks = ([ref_rle(seg["counts"], h, w)] if isinstance(seg, dict)
                 else [ref_polygon(p, h, w) for p in seg])
        for m in masks:
            out[m] = label
    return out


def near_edges(polys, h, w, dist=1.0):
    """(h, w) bool: pixel centres within dist of an edge of any polygon."""
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    c = torch.stack([x, y], -1).double()  # (h, w, 2) pixel centres as (x, y)
    near = torch.zeros(h, w, dtype=torch.bool)
    for xy in polys:
        p = torch.tensor(xy, dtype=torch.float64).view(-1, 2)
        for a, b in zip(p, p.roll(1, 0)):
            t = ((c - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
            near |= (c - (a + t[..., None] * (b - a))).norm(dim=-1) <= dist
    return near


# -----------------------------------------------------------------------------
# read_instances


def test_read_instances_keeps_wanted_ids(coco):
    path, (names, label_of, images, dropped) = coco
    assert names == ["person", "airplane", "toothbrush"] and label_of == {1: 1, 5: 2, 90: 3}
    assert set(images) == {11, 12, 13} and dropped == {"compressed crowd mask": 1}
    assert [len(images[i]["anns"]) for i in (11, 12, 13)] == [2, 3, 0]
    assert [a[0] for a in images[12]["anns"]] == [2, 1, 3] and images[12]["anns"][0][3] == 1
    assert (images[12]["width"], images[12]["height"]) == (32, 48)
    assert images[12]["file_name"] == "000000000012.jpg"
    assert set(data.read_instances(path)[2]) == {11, 12, 13, 14}


@pytest.mark.parametrize("content", [None, "{not json", '{"images": 3}', "[]",
                                     '{"categories": [], "images": []}'])
def test_read_instances_errors_in_one_line(tmp_path, content):
    path = tmp_path / "annotations" / "instances_val2017.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(data.UserError) as e:
        data.read_instances(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "annotations_trainval2017.zip" in msg


def test_read_instances_leaves_out_bad_annotations_by_kind(tmp_path):
    """One bad annotation costs itself, not the probes: each kind is counted and left out."""
    path = write_fixture(tmp_path)
    d = json.loads(path.read_text())
    ann = {a["id"]: a for a in d["annotations"]}
    ann[103]["segmentation"]["counts"][-1] += 1  # an RLE one pixel too long
    polys = [a for a in d["annotations"] if isinstance(a["segmentation"], list)]
    polys[0]["segmentation"][0][1] = None  # a null coordinate
    polys[1]["segmentation"][0][0] = "12.5"  # a string coordinate
    polys[2]["category_id"] = 999  # a category the file does not list
    d["annotations"] += [dict(id=998, image_id=11, category_id=1, iscrowd=0, area=5.0,
                              segmentation=[[1.0, 2.0, float("nan"), 3.0, 4.0, 5.0]]),  # a NaN coordinate
                         dict(id=997, image_id=11, category_id=1, iscrowd=0, area=5.0)]  # no segmentation
    path.write_text(json.dumps(d))  # (json writes NaN, as a careless exporter would)
    names, _, images, dropped = data.read_instances(path)
    expected = {"compressed crowd mask": 1, "malformed segmentation": 5, "unknown category": 1}
    assert dropped == expected, dropped
    kept = sum(len(r["anns"]) for r in images.values())
    assert kept == len(d["annotations"]) - 7


# -----------------------------------------------------------------------------
# label maps


def test_rle_is_column_major():
    anns = [(7, 3.0, dict(counts=[1, 2, 3], size=[2, 3]), 1)]  # pixels 1, 2 of the column-major order
    assert data.instance_label_map(anns, 2, 3).tolist() == [[0, 7, 0], [7, 0, 0]]


def test_label_map_matches_references(coco):
    _, (_, _, images, _) = coco
    for i in (11, 12, 13):
        r = images[i]
        h, w = r["height"], r["width"]
        got, want = data.instance_label_map(r["anns"], h, w), ref_label_map(r["anns"], h, w)
        polys = [p for a in r["anns"] if isinstance(a[2], list) for p in a[2]]
        far = ~near_edges(polys, h, w)
        assert (got == want).float().mean() >= 0.99  # a centre on an edge may go either way (PIL: 0.964)
        assert torch.equal(got[far], want[far])
    pent = data.instance_label_map(images[11]["anns"], 30, 40)
    assert pent[15, 10] == 1 and pent[12, 30] == 1  # both parts of the polygon are painted
    m = data.instance_label_map(images[12]["anns"], 48, 32)
    assert m[22, 16] == 1 and m[14, 16] == 3  # the small instance wins inside the large one
    assert m[40, 6] == 2  # the crowd blob (smaller than the box) wins where they overlap
    assert m[35, 20] == 3 and m[5, 5] == 0


def test_label_map_of_a_large_polygon_has_the_coco_area():
    xy = [v for k in range(16) for v in (50 + (40, 18)[k % 2] * math.cos(k * math.pi / 8),
                                         45 + (40, 18)[k % 2] * math.sin(k * math.pi / 8))]
    m = data.instance_label_map([(1, 1.0, [xy], 0)], 90, 100)
    assert abs(m.sum().item() - polygon_area(xy)) < 0.02 * polygon_area(xy)  # pixel centres: no 1 px growth


# -----------------------------------------------------------------------------
# the probe dataset


def probe_set(tmp_path, coco, **kw):
    _, (names, _, images, _) = coco
    ids = [11, 12, 13]
    files = [str(tmp_path / "val2017" / images[i]["file_name"]) for i in ids]
    caps = [["A man, a plane."], ["Two men and a Toothbrush!", "a man"], ["nothing here"]]
    vocab = ["man", "toothbrush", "plane"]
    return data.CocoProbeSet(files, [images[i] for i in ids], caps, vocab, n_classes=len(names), **kw)


def test_probe_set_items(tmp_path, coco):
    ds = probe_set(tmp_path, coco, img_size=16, patch_size=4)
    for i in range(3):
        item, lab = ds[i], ds.label_map(i)
        assert item["image"].shape == (3, 16, 16) and lab.shape == (16, 16)
        # majority per 4x4 patch in raster order, ties to the smaller label
        ref = torch.zeros(16, dtype=torch.long)
        for p in range(16):
            r, c = p // 4 * 4, p % 4 * 4
            ref[p] = torch.bincount(lab[r:r + 4, c:c + 4].flatten(), minlength=4).argmax()
        assert torch.equal(item["patch_labels"], ref)
        assert torch.equal(item["present"], torch.tensor([float((lab == c).any()) for c in (1, 2, 3)]))
    assert ds[0]["present"].tolist() == [1, 0, 0]  # the airplane is cut away by the crop
    assert ds[1]["present"].tolist() == [1, 1, 1] and ds[2]["present"].sum() == 0
    assert [ds[i]["words"].tolist() for i in range(3)] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    batch = data.probe_collate([ds[0], None, ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["patch_labels"].shape == (2, 16)


def test_label_map_follows_the_image_through_resize_and_crop(tmp_path, coco):
    """An image painted with its own label map: after the eval view, image and map still agree."""
    _, (_, _, images, _) = coco
    r = images[12]
    lab = data.instance_label_map(r["anns"], r["height"], r["width"])
    Image.fromarray((lab * 80).to(torch.uint8).numpy()).convert("RGB").save(tmp_path / "painted.png")
    ds = data.CocoProbeSet([str(tmp_path / "painted.png")], [r], [["x"]], [],
                           n_classes=3, img_size=24, patch_size=4)
    grey = ds[0]["image"][0] * data.STD[0] + data.MEAN[0]  # (24, 24) back in [0, 1]
    out = ds.label_map(0)
    same = F.max_pool2d(out[None, None].float(), 3, 1, 1) == -F.max_pool2d(-out[None, None].float(), 3, 1, 1)
    inner = same[0, 0]  # the label is constant around the pixel: no blending with a neighbour
    inner[[0, -1]] = inner[:, [0, -1]] = False  # at the crop's edge the image blends with what was cut away
    assert inner.sum() > 200 and ((grey - out * 80 / 255).abs()[inner] < 0.05).all()


def test_label_map_samples_pixel_centres():
    """48 -> 16 px: each output pixel is the centre of a 3 x 3 block, where only the middle column is set.
    (torch's plain NEAREST samples the block's first column.)"""
    stripes = (torch.arange(48) % 3 == 1).expand(48, 48)
    rec = dict(width=48, height=48, anns=[(1, 1.0, dict(counts=rle_encode(stripes), size=[48, 48]), 1)])
    ds = data.CocoProbeSet(["unused.jpg"], [rec], [["x"]], [], n_classes=1, img_size=16, patch_size=4)
    assert (ds.label_map(0) == 1).all()


def test_unreadable_image_is_none(tmp_path, coco):
    ds = probe_set(tmp_path, coco, img_size=16, patch_size=4)
    with open(ds.files[0], "wb") as f:
        f.write(b"not a jpeg")
    assert ds[0] is None and ds.n_unreadable == 1


# -----------------------------------------------------------------------------
# caption words


def test_caption_words_are_the_tokenizer_words():
    caps = ["A Café-bar, with two DOGS!", "naïve  man's $5 cat", "¿Qué? a man_on top"]
    tok = data.train_tokenizer(caps, 100)
    for c in caps:
        assert data.caption_words(c) == tok.encode(c, add_special_tokens=False).tokens
    assert data.caption_words(caps[0]) == ["a", "cafe", "bar", "with", "two", "dogs"]


def test_vocab_counts_images_drops_stop_words_breaks_ties_alphabetically():
    per_image = [["dog dog dog dog", "a dog"], ["the cat on a mat"], ["a cat and a bat"], ["zebra, bat."]]
    assert len(data.STOP_WORDS) >= 45 and {"a", "the", "on", "and", "is", "it"} <= data.STOP_WORDS
    # cat and bat are in 2 images each (dog's 5 uses are in 1 image), then alphabetically
    assert data.caption_word_vocab(per_image, 3) == ["bat", "cat", "dog"]
    assert data.caption_word_vocab(per_image, 10) == ["bat", "cat", "dog", "mat", "zebra"]
    assert data.word_targets(["A Cat.", "a ZEBRA"], ["bat", "cat", "zebra"]).tolist() == [0, 1, 1]


# -----------------------------------------------------------------------------
# probe math


def test_rankme():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(500, 5, generator=g))[0]
    V = torch.linalg.qr(torch.randn(64, 5, generator=g))[0].T
    assert data.rankme(U @ V) == pytest.approx(5, abs=0.01)  # orthonormal factors: exactly k
    r = data.rankme(torch.randn(500, 5, generator=g) @ torch.randn(5, 64, generator=g))
    assert 0.9 * 5 <= r <= 5.01  # 4.93 here: the factors' singular values are not all equal
    assert data.rankme(torch.randn(20000, 64, generator=g)) > 0.99 * 64


def test_streaming_ridge_equals_ridge_fit():
    g = torch.Generator().manual_seed(1)
    # the offset tests the shifted sums
    X = torch.randn(900, 12, generator=g) * torch.linspace(0.5, 3, 12) + 5
    y = torch.randint(0, 4, (900,), generator=g)
    y[:600] = 0  # unbalanced classes
    Y, Z = F.one_hot(y, 4).float(), torch.randn(50, 12, generator=g) + 5
    freq = torch.bincount(y, minlength=4).float()
    for kw, weight in [({}, None), (dict(class_weight=1 / freq), 1 / freq[y])]:
        s = data.StreamingRidge(12, 4, lam=1e-2, **kw)
        for i in range(0, 900, 250):
            s.update(X[i:i + 250], Y[i:i + 250])
        want = data.ridge_fit(X, Y, weight=weight, lam=1e-2)(Z)
        assert (s.solve()(Z) - want).abs().max() < 1e-6 * want.abs().max()


def test_streaming_ridge_keeps_precision_far_from_the_origin():
    g = torch.Generator().manual_seed(3)
    X = (1e6 + 1e-2 * torch.randn(900, 6, generator=g, dtype=torch.float64))  # sums of x^2 would cancel
    Y = (X[:, :2] - 1e6) * 1e2 + 0.1 * torch.randn(900, 2, generator=g, dtype=torch.float64)
    s = data.StreamingRidge(6, 2)
    for i in range(0, 900, 300):
        s.update(X[i:i + 300], Y[i:i + 300])
    want = data.ridge_fit(X, Y)(X[:20])  # float64 features: ridge_fit computes in float64 throughout
    assert (s.solve()(X[:20]) - want).abs().max() < 1e-6 * want.abs().max()


def test_probes_find_labels_in_informative_features_and_nothing_in_noise():
    g = torch.Generator().manual_seed(2)
    n, C = 3000, 5
    y = torch.randint(0, C, (n,), generator=g)
    informative = (F.one_hot(y, C).float() @ torch.randn(C, 16, generator=g)
                   + 0.1 * torch.randn(n, 16, generator=g))
    noise = torch.randn(n, 16, generator=g)
    res = {}
    for name, X in (("informative", informative), ("noise", noise)):
        s = data.StreamingRidge(16, C)
        for i in range(0, 2000, 500):
            s.update(X[i:i + 500], F.one_hot(y[i:i + 500], C).float())
        pred = s.solve()(X[2000:]).argmax(1)
        conf = data.Confusion(C).update(pred[:500], y[2000:2500]).update(pred[500:], y[2500:])
        assert conf.miou() == pytest.approx(data.Confusion(C).update(pred, y[2000:]).miou())
        res[name] = (pred == y[2000:]).float().mean().item(), conf.miou()
    assert min(res["informative"]) > 0.99 and max(res["noise"]) < 0.35  # chance: 0.2 accuracy, ~0.11 IoU

    labels = (torch.rand(2000, 8, generator=g) < 0.2).float()
    labels[:, 7] = 0  # a column without positives is left out of the mean
    assert data.average_precision(labels + 0.1 * torch.randn(2000, 8, generator=g), labels) > 0.99
    assert data.average_precision(torch.randn(2000, 8, generator=g), labels) == pytest.approx(0.2, abs=0.04)


def test_miou_over_the_classes_present():
    target, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1])
    # class 2 is predicted but never true: not in the mean, but its false positive halves class 0's IoU
    assert data.Confusion(3).update(pred, target).miou() == pytest.approx((0.5 + 1) / 2)


# =============================================================================
# train.py

import os
import signal
import subprocess
import sys

import train

TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--pred_width", "16", "--pred_depth", "2",
        "--text_width", "16", "--vocab_size", "128", "--batch_size", "8", "--shapes_size", "64",
        "--val_size", "16", "--probe_train", "40", "--probe_val", "48", "--log_every", "1",
        "--eval_every", "1000", "--save_every", "1000", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_train(*args, check=True, **kw):
    out = subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, env=ENV,
                         cwd=HERE, **kw)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def slow_step_script(tmp_path, seconds):
    """A script that runs train.py with every training step slowed by `seconds` (as a big model's
    step is): the step is wrapped from outside, train.py has no test hook."""
    path = tmp_path / f"slow_train_{seconds}.py"
    path.write_text(f"""import sys, time
sys.path.insert(0, {HERE!r})
import train
step = train.train_step
def slow_step(*a, **k):
    time.sleep({seconds})
    return step(*a, **k)
train.train_step = slow_step
sys.exit(train.cli())
""")
    return str(path)


def signal_after_step_script(tmp_path, after):
    """A script that runs train.py and sends SIGTERM to its own process group (itself and its loader
    workers, as a scheduler does) right after step `after` (1-based): a stop at a known step."""
    path = tmp_path / f"signal_after_{after}.py"
    path.write_text(f"""import os, signal, sys
sys.path.insert(0, {HERE!r})
import train
step = train.train_step
def step_then_signal(i, *a, **k):
    out = step(i, *a, **k)
    if i + 1 == {after}:
        os.killpg(os.getpgid(0), signal.SIGTERM)
    return out
train.train_step = step_then_signal
sys.exit(train.cli())
""")
    return str(path)


def train_log(out_dir):
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return {r["step"]: r for r in recs if "loss" in r}


def test_train_end_to_end_then_sigterm_and_exact_resume(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run_train(*TINY, "--max_steps", "12", "--out_dir", a, "--eval_every", "6")
    assert "checkpoint:" in out.stdout and "random init" in out.stdout and os.path.exists(f"{a}/ckpt.pt")
    full = train_log(a)
    assert sorted(full) == list(range(1, 13)) and full[12]["loss"] < full[1]["loss"]
    assert {"loss_pred", "loss_sparse", "loss_consist", "pos_frac", "attn_entropy", "lr", "momentum",
            "ms_per_step", "img_per_s", "mfu", "data_wait_ms"} <= set(full[1])
    assert all(0 <= r["data_wait_ms"] < r["ms_per_step"] for r in full.values())
    evals = [json.loads(line) for line in open(f"{a}/log.jsonl") if "val_true" in line]
    assert {"val_true", "val_shuffled", "val_none", "dense_shape", "img_count_acc"} <= set(evals[0])
    # the same run with a DataLoader worker, stopped by SIGTERM to its whole process group (as torchrun and
    # SLURM send it) right after step 5, then resumed: the same losses step for step (data do not depend on
    # workers; the optimizer's moments, the schedules and the data order come back from the checkpoint)
    args = [*TINY, "--max_steps", "12", "--out_dir", b, "--eval_every", "6", "--num_workers", "1"]
    proc = subprocess.run([sys.executable, signal_after_step_script(tmp_path, 5), *args], capture_output=True,
                          text=True, env=ENV, cwd=HERE, start_new_session=True)
    assert proc.returncode == train.EXIT_STOPPED and "SIGTERM: saved" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr
    assert max(train_log(b)) == 5 and torch.load(f"{b}/ckpt.pt", weights_only=False)["step"] + 1 == 5
    other = tmp_path / "other.json"
    train_tokenizer(["zebra giraffe", "a giraffe"], 128, other)
    shutil.copy(other, f"{b}/tokenizer.json")  # the resumed run must keep the checkpoint's own tokenizer
    run_train(*args, "--resume", f"{b}/ckpt.pt")
    resumed = train_log(b)
    assert sorted(resumed) == list(range(1, 13))
    for s in range(1, 13):
        assert resumed[s]["loss"] == pytest.approx(full[s]["loss"], rel=1e-5, abs=1e-6), s
    out = run_train(*TINY, "--out_dir", b, "--resume", f"{b}/ckpt.pt", "--eval_only", "true")
    assert "val_true" in out.stdout and "dense_shape" in out.stdout
    out = run_train(*TINY, "--out_dir", b, "--resume", f"{b}/ckpt.pt", "--tokenizer", str(other), check=False)
    assert out.returncode != 0 and "is not the tokenizer" in out.stderr.strip().splitlines()[-1]
    out = run_train(*TINY, "--width", "48", "--out_dir", b, "--resume", f"{b}/ckpt.pt", check=False)
    assert out.returncode != 0 and "checkpoint's model differs in {'width': 32}" in out.stderr


def test_a_checkpoint_without_its_tokenizer_is_refused_in_one_line(tmp_path):
    """Checkpoints carry their tokenizer; one without it (another version of train.py) stops with one
    line, even when --tokenizer names a file."""
    d = tmp_path / "old"
    run_train(*TINY, "--max_steps", "2", "--out_dir", str(d))
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    del ckpt["tokenizer_json"]
    torch.save(ckpt, d / "ckpt.pt")
    for extra in ([], ["--tokenizer", str(d / "tokenizer.json")]):
        msg = _main_error([*TINY, "--out_dir", str(d), "--resume", str(d / "ckpt.pt"), "--eval_only", "true",
                           *extra])
        assert "carries no tokenizer" in msg and "\n" not in msg, msg


def test_train_errors_are_one_line(tmp_path):
    cases = [
        (["--dataset", "coco", "--data_dir", str(tmp_path / "nowhere")], "nowhere"),
        (["--batch_size", "100", "--shapes_size", "50"], "lower --batch_size"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
        (["--resume", str(tmp_path / "missing.pt")], "no such checkpoint"),
    ]
    for extra, needle in cases:  # in-process: the message
        msg = _main_error([*TINY, "--out_dir", str(tmp_path / "o"), *extra])
        assert msg.startswith("error: ") and needle in msg and "\n" not in msg, msg
    # and the command line
    out = run_train(*TINY, "--out_dir", str(tmp_path / "o"), *cases[1][0], check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and cases[1][1] in lines[0], out.stderr[-2000:]


def test_train_stops_on_nan_naming_the_step(tmp_path, monkeypatch, capsys):
    forward = train.TCJEPA.forward
    calls = {"n": 0}

    def nan_at_step_5(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train.TCJEPA, "forward", nan_at_step_5)
    out_dir = str(tmp_path / "nan")
    with pytest.raises(train.data.UserError) as e:
        train.main([*TINY, "--max_steps", "10", "--out_dir", out_dir, "--save_every", "2",
                    "--log_every", "3"])
    msg = str(e.value)
    assert "not finite at step 5" in msg and f"{out_dir}/ckpt.pt (step 4)" in msg, msg
    ckpt = torch.load(f"{out_dir}/ckpt.pt", weights_only=False)
    assert ckpt["step"] + 1 == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_update_that_goes_non_finite_is_never_saved(tmp_path):
    """lr 1e4 blows the weights up within a few steps: the run exits 1 with one line naming the last
    good checkpoint, which exists and holds only finite tensors."""
    d = tmp_path / "nan"
    out = run_train(*TINY, "--max_steps", "30", "--lr", "1e4", "--start_lr", "1e4", "--warmup_steps", "0",
                    "--save_every", "1", "--log_every", "1", "--out_dir", str(d), check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stderr[-1500:]
    assert last.startswith("error: loss, gradient or weights not finite at step "), out.stderr[-1500:]
    assert "Lower --lr" in last and "Traceback" not in out.stderr
    bad = int(last.split("at step ")[1].split(":")[0])
    if bad > 1:
        assert f"Last good checkpoint: {d}/ckpt.pt (step {bad - 1})" in last
        ckpt = torch.load(d / "ckpt.pt", weights_only=False)
        assert ckpt["step"] + 1 == bad - 1 and train.all_finite(ckpt["model"], ckpt["optimizer"])
    else:
        assert "Last good checkpoint: none" in last and not (d / "ckpt.pt").exists()
    assert max(train_log(d)) < bad  # nothing of the bad step or after is logged


def test_torchrun_sigterm_with_slow_steps_saves_and_resumes_exactly(tmp_path):
    """Steps of 3 s: the ranks agree on a stop every step, so rank 0 saves within a step of the
    signal, long before torchrun's 30 s; the resumed run matches an uninterrupted one."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "train.py"]
    args = [*TINY, "--max_steps", "5", "--num_workers", "1"]
    full = subprocess.run([*torchrun, *args, "--out_dir", str(tmp_path / "full")], capture_output=True,
                          text=True, env=ENV, cwd=HERE, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    d = str(tmp_path / "slow")
    slow = [*torchrun[:-1], slow_step_script(tmp_path, 3)]
    proc = subprocess.Popen([*slow, *args, "--out_dir", d], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=HERE)
    deadline = time.time() + 240
    while not (os.path.exists(f"{d}/log.jsonl") and len(train_log(d)) >= 1) and time.time() < deadline:
        time.sleep(0.05)
    t_signal = time.time()
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert time.time() - t_signal < 15, "saved within a step or two of the signal"
    assert "SIGTERM: saved" in text and "exit code 75" in text and "forcefully" not in text, text[-3000:]
    stopped = torch.load(f"{d}/ckpt.pt", weights_only=False)["step"] + 1
    assert 1 <= stopped < 5
    resumed = subprocess.run([*torchrun, *args, "--out_dir", d, "--resume", f"{d}/ckpt.pt"],
                             capture_output=True, text=True, env=ENV, cwd=HERE, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_log(tmp_path / "full"), train_log(d)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for s in range(stopped + 1, 6):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-6), s


def test_resume_after_a_kill_and_of_a_finished_run(tmp_path, capsys):
    d = tmp_path / "r"
    train.main([*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(d)])
    shutil.copy(d / "ckpt.pt", tmp_path / "at4.pt")
    before = open(d / "log.jsonl").read()
    capsys.readouterr()
    train.main([*TINY, "--max_steps", "4", "--out_dir", str(d), "--resume", "auto"])
    assert "has already finished its 4 steps" in capsys.readouterr().out
    assert open(d / "log.jsonl").read() == before
    train.main([*TINY, "--max_steps", "6", "--out_dir", str(d), "--resume", "auto"])
    first = train_log(d)
    # as if killed after logging steps 5 and 6 but before saving: the checkpoint is at step 4 again
    shutil.copy(tmp_path / "at4.pt", d / "ckpt.pt")
    train.main([*TINY, "--max_steps", "6", "--out_dir", str(d), "--resume", "auto"])
    recs = [json.loads(line) for line in open(d / "log.jsonl")]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # no duplicates
    assert sum("init_probes" in r for r in recs) == 1 and "config" in recs[0]
    assert train_log(d)[6]["loss"] == pytest.approx(first[6]["loss"], rel=1e-5, abs=1e-6)
    assert not list(d.glob("*.tmp"))


def test_resume_keeps_the_global_batch(tmp_path):
    d = tmp_path / "g"
    train.main([*TINY, "--max_steps", "2", "--out_dir", str(d)])
    msg = _main_error([*TINY, "--max_steps", "4", "--batch_size", "4", "--out_dir", str(d),
                       "--resume", "auto"])
    assert "global batch of 8 x 1 processes x 1 accum" in msg, msg
    assert train.main([*TINY, "--max_steps", "4", "--batch_size", "4", "--grad_accum", "2",
                       "--out_dir", str(d), "--resume", "auto"]) == 0


def test_first_log_record_is_the_effective_config(tmp_path):
    d = tmp_path / "c"
    run_train(*TINY, "--max_steps", "2", "--num_workers", "-1", "--out_dir", str(d))
    first = json.loads(open(d / "log.jsonl").readline())
    assert set(first["config"]) == {"train", "model"}
    assert first["config"]["train"]["num_workers"] == train.auto_workers()  # the automatic choice, resolved
    assert first["config"]["model"]["sparse_coef"] == 0.0 and first["config"]["train"]["max_steps"] == 2
    assert {f.name for f in train.dataclasses.fields(TCJEPAConfig)} == set(first["config"]["model"])


def test_help_shows_the_defaults_each_preset_uses():
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=HERE)
    help_text = " ".join(out.stdout.split())
    assert ("lambda, weight of the sparsity loss (paper: 0.1); default 0.0 (vit_b16, coco, captions: 0.1)"
            in help_text)
    assert "lr_per_256 > 0 replaces it; default 0.002 (coco, captions: from lr_per_256)" in help_text
    assert ("optimizer steps; epochs > 0 replaces it; default 1000 "
            "(shapes_long: 4000; coco, captions: from epochs)" in help_text)
    assert "EMA momentum at the last step (I-JEPA 1.0); default 0.99 (coco, captions: 1.0)" in help_text
    assert "captions per image (COCO has 5; the paper uses 8); default 5 (captions: 8)" in help_text
    for preset in train.PRESETS:  # and what each preset really sets is what parse_args gives
        t, m = train.parse_args(["--preset", preset])
        for k, v in {**train.PRESETS[preset][0], **train.PRESETS[preset][1]}.items():
            assert getattr(t if hasattr(t, k) else m, k) == v


def _main_error(argv):
    """The one-line message and the exit of train.main for a bad input (in-process: no torch import)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return str(e.code)
    except train.data.UserError as e:
        return "error: " + str(e)
    raise AssertionError("no error")


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr must be at least 0, got nan"),
    (["--lr", "-1"], "--lr must be at least 0, got -1.0"),
    (["--heads", "0"], "--heads must be at least 1"),
    (["--patch_size", "0"], "--patch_size must be at least 1"),
    (["--n_captions", "0"], "--n_captions must be at least 1"),
    (["--n_targets", "0"], "--n_targets must be at least 1"),
    (["--img_size", "0"], "--img_size must be at least 1"),
    (["--max_words", "0"], "--max_words must be at least 1"),
    (["--ema_start", "1.5"], "--ema_start must be in [0, 1], got 1.5"),
    (["--target_scale", "0.3", "0.2"], "--target_scale takes a range low high"),
    (["--pred_depth", "0"], "--text_cond cross needs a predictor layer"),
    (["--shapes_layout", "pairs"], "--shapes_captions: mixed goes with --shapes_layout grid3"),
])
def test_bad_numbers_stop_before_anything_is_built(flags, needle):
    msg = _main_error(flags)
    assert needle in msg and "\n" not in msg, msg


def test_bad_paths_and_files_stop_with_one_line(tmp_path, coco_dir):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    run_train(*TINY, "--max_steps", "2", "--out_dir", str(tmp_path / "ok"))
    good = (tmp_path / "ok" / "ckpt.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    out = str(tmp_path / "o")
    cases = [
        (["--resume", str(tmp_path / "empty.pt"), "--out_dir", out], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "garbage.pt"), "--out_dir", out], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "truncated.pt"), "--out_dir", out], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "foreign.pt"), "--out_dir", out], "not a train.py checkpoint"),
        (["--out_dir", str(tmp_path / "afile")], "is not a writable folder"),
        (["--out_dir", str(tmp_path / "afile" / "below")], "is not a writable folder"),
    ]
    shutil.rmtree(coco_dir / "train2017")
    (coco_dir / "train2017").write_text("not a folder")
    cases.append((["--dataset", "coco", "--data_dir", str(coco_dir), "--out_dir", out],
                  "train2017 is not a folder"))
    for flags, needle in cases:
        msg = _main_error([*TINY, *flags])
        assert msg.startswith("error: ") and needle in msg and "\n" not in msg, (flags, msg)
    # the same through the command line: one line on stderr, exit code 1, no traceback
    p = run_train(*TINY, "--resume", str(tmp_path / "garbage.pt"), "--out_dir", out, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "not a readable" in p.stderr


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "full"
    train.main([*TINY, "--max_steps", "2", "--out_dir", str(d)])
    before = (d / "ckpt.pt").read_bytes()
    real_save, names = torch.save, []

    def full_disk(obj, f, *a, **k):
        names.append(str(f))
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(train.data.UserError) as e:
        train.main([*TINY, "--max_steps", "4", "--out_dir", str(d), "--resume", str(d / "ckpt.pt")])
    monkeypatch.setattr(train.torch, "save", real_save)
    assert "No space left on device" in str(e.value) and "previous checkpoint is kept" in str(e.value)
    assert (d / "ckpt.pt").read_bytes() == before and not list(d.glob("*.tmp"))
    assert names and all(f".{os.getpid()}.tmp" in n for n in names)  # temp files are unique per process


def test_captions_without_words_stop_text_conditioning(coco_dir, tmp_path):
    ids = [1, 2, 3, 4, 6]
    _dump(coco_dir / "annotations" / "captions_train2017.json", ids, [(i, "!!! ...") for i in ids])
    coco = ["--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "1", "--num_workers", "0"]
    msg = _main_error([*TINY, *coco, "--out_dir", str(tmp_path / "w")])
    assert "none of 5 sampled training images has a caption" in msg and "--text_cond none" in msg
    _dump(coco_dir / "annotations" / "captions_train2017.json", ids,
          [(1, "a red bus")] + [(i, "?") for i in ids[1:]])
    out = run_train(*TINY, *coco, "--out_dir", str(tmp_path / "w2"))
    assert "only 1 of 5 sampled training images have a usable caption" in out.stderr


def test_bench_reports_step_time_and_loader_wait(tmp_path, monkeypatch):
    """notes/bench.py times steps after the warm-up and reports how long the step waited for data: a
    loader slowed by 60 ms per batch must show up as >= 60 ms of wait in every timed step."""
    sys.path.insert(0, os.path.join(HERE, "notes"))
    import bench
    collate, calls = train.data.Collate.__call__, []

    def slow_collate(self, items):
        calls.append(len(items))
        time.sleep(0.06)
        return collate(self, items)

    monkeypatch.setattr(train.data.Collate, "__call__", slow_collate)
    rec = bench.bench(["--steps", "3", "--warmup", "1", *TINY, "--out_dir", str(tmp_path / "b")])
    assert len(calls) == 4  # one batch per step
    # CPU: no known peak, so no MFU
    assert rec["steps"] == 3 and rec["mfu"] is None and rec["recompiles_after_warmup"] == 0
    assert 60 <= rec["data_wait_ms_per_step"] < rec["ms_per_step"]
    assert rec["img_per_s"] == pytest.approx(8 * 1000 / rec["ms_per_step"], rel=1e-6)
    # --one_batch times the step alone: the slow loader is called once, before the warm-up
    one = bench.bench(["--steps", "3", "--warmup", "1", "--one_batch", *TINY,
                       "--out_dir", str(tmp_path / "one")])
    assert one["data_wait_ms_per_step"] < 5 and len(calls) == 4 + 1
    # a benchmark leaves out_dir as it was (its tokenizer stays in memory)
    assert not (tmp_path / "b").exists()


def test_train_on_coco_fixture(coco_dir, tmp_path):
    # an unreadable val image is skipped
    (coco_dir / "val2017" / f"{101:012d}.jpg").write_bytes(b"not a jpeg")
    _dump(coco_dir / "annotations" / "captions_val2017.json", [100, 101],
          [(100, "a red square"), (101, "broken")])
    train_tokenizer(["a shapes run left this tokenizer here"], 64, tmp_path / "c" / "tokenizer.json")
    args = [*TINY, "--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "3", "--log_every", "3", "--eval_every", "2", "--out_dir",
            str(tmp_path / "c")]
    refused = run_train(*args, check=False)  # a fresh run does not replace what another run left
    assert refused.returncode == 1 and "holds a run (tokenizer.json)" in refused.stderr
    out = run_train(*args, "--overwrite", "true")
    # retrained on COCO's captions
    assert load_tokenizer(tmp_path / "c" / "tokenizer.json").token_to_id("bus")
    assert "coco train: 5 images" in out.stdout and os.path.exists(tmp_path / "c" / "tokenizer.json")
    evals = [json.loads(line)["step"] for line in open(tmp_path / "c" / "log.jsonl") if "val_true" in line]
    assert evals == [2, 3]  # every eval_every steps, even when that is not a log step, and at the end
    assert f"{train.auto_workers()} loader workers" in out.stdout  # COCO's default: workers from the cores
    assert sorted(train_log(tmp_path / "c")) == [2, 3]


def _write_instances(coco_dir):
    """instances files for the captions fixture: a polygon or two per image, one crowd RLE, id gaps."""
    sizes = {1: (40, 30), 2: (32, 48), 3: (50, 50), 4: (36, 36), 5: (10, 10), 6: (20, 20), 7: (9, 9)}
    cats = [dict(id=1, name="person", supercategory="p"), dict(id=3, name="car", supercategory="v")]

    def dump(split, sizes):
        anns = []
        for i, (w, h) in sizes.items():
            anns.append(dict(id=10 * i, image_id=i, category_id=1 + 2 * (i % 2), iscrowd=0,
                             area=w * h / 4.0, bbox=[0, 0, w / 2, h / 2],
                             segmentation=[[0, 0, w / 2, 0, w / 2, h / 2, 0, h / 2]]))
        w, h = sizes[next(iter(sizes))]
        anns.append(dict(id=1, image_id=next(iter(sizes)), category_id=1, iscrowd=1, area=float(w * h // 2),
                         bbox=[0, 0, w, h],
                         segmentation=dict(counts=[w * h // 2, w * h - w * h // 2], size=[h, w])))
        images = [dict(id=i, file_name=f"{i:012d}.jpg", width=w, height=h) for i, (w, h) in sizes.items()]
        (coco_dir / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(dict(images=images, categories=cats, annotations=anns)))

    dump("train", sizes)
    dump("val", {100: (24, 24)})


def test_coco_probes_end_to_end_on_the_fixture(coco_dir, tmp_path):
    coco = ["--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "2", "--eval_every", "2", "--log_every", "1",
            "--num_workers", "0", "--probe_train", "5", "--probe_words", "8"]
    out = run_train(*TINY, *coco, "--out_dir", str(tmp_path / "none"))  # no instances files: losses only
    assert "probes need annotations/instances_train2017.json" in out.stdout
    assert "Training goes on" in out.stdout
    _write_instances(coco_dir)
    d = tmp_path / "probe"
    out = run_train(*TINY, *coco, "--out_dir", str(d))
    recs = [json.loads(line) for line in open(d / "log.jsonl")]
    ev = [r for r in recs if "val_true" in r][-1]
    init = [r["init_probes"] for r in recs if "init_probes" in r][0]
    for k in ("coco_cls_map", "coco_dense_miou", "rankme"):
        assert 0 <= ev[k] and 0 <= init[k], k
    assert ev["coco_words_map"] is None  # NaN, written as null: the one val caption has none of the 8 words
    assert "coco probes: 4 train / 1 val images" in out.stdout and "1 unreadable train image" in out.stdout
    out = run_train(*TINY, *coco, "--out_dir", str(d), "--resume", str(d / "ckpt.pt"), "--eval_only", "true")
    assert "coco_dense_miou" in out.stdout and "random init" in out.stdout


def test_recipe_scales_lr_with_the_global_batch():
    t, _ = train.parse_args(["--dataset", "coco"])
    one, eight = train.resolve_recipe(t, 118287, 1), train.resolve_recipe(t, 118287, 8)
    assert one.lr == pytest.approx(1.25e-4 * 128 / 256) and eight.lr == pytest.approx(1.25e-4 * 1024 / 256)
    assert one.max_steps == math.ceil(100 * 118287 / 128)
    assert eight.max_steps == math.ceil(100 * 118287 / 1024)
    assert one.warmup_steps == round(15 * 118287 / 128) and eight.start_lr == pytest.approx(2.5e-5 * 4)
    t, _ = train.parse_args([])  # shapes: steps and lr as given
    assert train.resolve_recipe(t, 20000, 2) == t
    # a flag wins over the rule
    t, _ = train.parse_args(["--dataset", "coco", "--max_steps", "7", "--lr", "0.01"])
    r = train.resolve_recipe(t, 118287, 8)
    assert (r.max_steps, r.lr, r.warmup_steps) == (7, 0.01, 100)  # a shortened run: the warmup in steps too


def test_dead_zone_warning(tmp_path):
    out = run_train(*TINY, "--max_steps", "4", "--log_every", "1", "--sparse_coef", "0.1",
                    "--consist_coef", "0.5", "--out_dir", str(tmp_path / "dz"))
    recs = train_log(tmp_path / "dz")  # windows of one step: the window's largest pos_frac is the logged one
    window_low = any(r["pos_frac"] < train.DEAD_ZONE for r in recs.values())
    assert ("have gone inert" in out.stdout) == window_low  # a fresh model has positive cosines: no warning
    assert train.dead_zone(0.0, TCJEPAConfig(sparse_coef=0.1))
    assert not train.dead_zone(0.0, TCJEPAConfig(sparse_coef=0, consist_coef=0))
    assert not train.dead_zone(0.2, TCJEPAConfig())
    assert not train.dead_zone(0.0, TCJEPAConfig(text_cond="none"))


def test_train_coco_loader_error_is_one_line_and_exits(coco_dir, tmp_path):
    # batch 1: the corrupt image (id 5) alone fills a batch; the error comes from a DataLoader worker, and
    # the process must end with one line, not a worker traceback, and not hang on its workers
    out = run_train(*TINY, "--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32",
                    "--patch_size", "8", "--batch_size", "1", "--max_steps", "6", "--num_workers", "1",
                    "--out_dir", str(tmp_path / "e"), check=False, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0, out.stderr
    assert last.startswith("error: every image in this batch was unreadable"), out.stderr
    assert "Traceback" not in out.stderr


def test_train_two_processes_with_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, "--max_steps", "3", "--grad_accum", "2", "--out_dir", str(tmp_path / "ddp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=HERE,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2 x cpu" in out.stdout and sorted(train_log(tmp_path / "ddp")) == [1, 2, 3]


def test_torchrun_sigterm_saves_with_loader_workers(tmp_path):
    # torchrun forwards a SIGTERM to each rank's process group, DataLoader workers included; the ranks
    # agree to stop within 10 steps (here between log steps) and rank 0 saves before torchrun's 30 s are up
    d = str(tmp_path / "stop")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, "--max_steps", "2000", "--log_every", "7", "--num_workers", "1", "--out_dir", d]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=HERE)
    deadline = time.time() + 240
    while not (os.path.exists(f"{d}/log.jsonl") and len(train_log(d)) >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert "SIGTERM: saved" in text and "killed by signal" not in text, text[-3000:]
    step = torch.load(f"{d}/ckpt.pt", weights_only=False)["step"] + 1
    assert 1 <= step < 2000, step


def test_train_compile_on_cpu(tmp_path):
    out = run_train(*TINY, "--compile", "on", "--max_steps", "3", "--out_dir", str(tmp_path / "comp"),
                    timeout=600)
    assert sorted(train_log(tmp_path / "comp")) == [1, 2, 3]
    ckpt = torch.load(tmp_path / "comp" / "ckpt.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["model"])  # checkpoints hold the uncompiled model


def test_probes_known_answers():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (2000,), generator=g)
    exact = F.one_hot(y, 5).float() + 0.01 * torch.randn(2000, 5, generator=g)
    noise = torch.randn(2000, 16, generator=g)
    assert data.class_probe(exact[:1500], y[:1500], exact[1500:], y[1500:], 5) > 0.99
    assert abs(data.class_probe(noise[:1500], y[:1500], noise[1500:], y[1500:], 5) - 0.2) < 0.06
    labels = (torch.rand(500, 3, generator=g) > 0.5).float()
    assert data.average_precision(labels * 2 - 1, labels) == pytest.approx(1.0)
    assert abs(data.average_precision(torch.rand(500, 3, generator=g), labels) - 0.5) < 0.1


def test_object_pooled_probe_matches_a_loop_and_knows_the_answer():
    g = torch.Generator().manual_seed(0)
    n, N, D = 300, 16, 12
    obj = torch.randint(0, 4, (n, N), generator=g)  # patch labels: 0 background, objects 1-3
    obj_shape = torch.randint(0, 7, (n, 4), generator=g)  # each object's shape
    shape = torch.where(obj > 0, obj_shape.gather(1, obj) + 1, 0)
    feats = torch.randn(n, N, D, generator=g)
    X, y = data.object_pooled(feats, shape, obj)
    rows = [(feats[b][obj[b] == k].mean(0), obj_shape[b, k])
            for b in range(n) for k in range(1, 4) if (obj[b] == k).any()]
    assert torch.allclose(X, torch.stack([r[0] for r in rows]), atol=1e-5)
    assert torch.equal(y, torch.stack([r[1] for r in rows]))
    # features that carry the shape of their object: the object probe is ~1; noise: chance (1/7)
    code = torch.randn(7, D, generator=g)
    informative = torch.where((obj > 0)[..., None], code[(shape - 1).clamp(min=0)], 0.0) + 0.5 * feats
    Xi, yi = data.object_pooled(informative, shape, obj)
    h = len(yi) // 2
    assert data.class_probe(Xi[:h], yi[:h], Xi[h:], yi[h:], 7) > 0.95
    assert abs(data.class_probe(X[:h], y[:h], X[h:], y[h:], 7) - 1 / 7) < 0.08


def test_presets_fill_only_what_is_not_given():
    import train

    t, m = train.parse_args(["--preset", "shapes_long"])
    assert (t.max_steps, t.eval_every, m.width, m.sparse_coef) == (4000, 500, 128, 0.0)
    t, _ = train.parse_args(["--preset", "shapes_long", "--max_steps", "7"])
    assert t.max_steps == 7  # a flag given wins over the preset
    t, m = train.parse_args([])
    assert t.max_steps == 1000 and m.sparse_coef == 0.0  # shapes default: text losses off (dead zone)
    t, m = train.parse_args(["--dataset", "coco"])
    assert (t.lr_per_256, t.ema_start, m.width, m.sparse_coef, m.consist_coef) == \
        (1.25e-4, 0.996, 768, 0.1, 0.5)


@pytest.mark.parametrize("flags, needle", [
    # a typo must not train the uncontrolled model
    (["--shuffle_captions", "ture"], "expected true or false"),
    (["--device", "gpu"], "invalid choice: 'gpu'"),
    (["--compile", "yes"], "invalid choice: 'yes'"),
    (["--text_cond", "foo"], "invalid choice: 'foo'"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--grad_accum", "0"], "--grad_accum must be at least 1"),
    (["--heads", "3"], "--width 128 must be a multiple of --heads (3)"),
    (["--pred_width", "30", "--heads", "2"], "--pred_width 30 must be a multiple of --heads (2) and of 4"),
    (["--img_size", "60"], "--img_size 60 must be a multiple of --patch_size 8"),
    (["--cond_layers", "9"], "--cond_layers must be -1 (all) or 1..3"),
    pytest.param(["--device", "cuda"], "torch sees no GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="only without a GPU")),
])
def test_bad_flag_values_stop_with_one_line(flags, needle):
    with pytest.raises(train.UserError) as e:
        train.parse_args(flags)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert train.parse_args(["--shuffle_captions", "false"])[0].shuffle_captions is False


def test_auto_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.auto_workers() == 15  # one core is left for the training process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4: 16 cores, 4 each
    assert train.auto_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert train.auto_workers() == 1  # never 0: COCO decoding stays out of the training process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(256)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert train.auto_workers() == 32
    t, _ = train.parse_args(["--dataset", "coco"])
    assert t.num_workers == -1 and train.parse_args([])[0].num_workers == 0  # shapes renders in-process


def test_schedules_follow_ijepa():
    t = train.TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, start_lr=2e-4, final_lr=1e-6,
                          ema_start=0.996, ema_end=1.0)
    lr0, wd0, m0 = train.schedules(0, t)
    lr10, _, _ = train.schedules(10, t)
    lr_end, wd_end, m_end = train.schedules(100, t)
    assert lr0 == pytest.approx(2e-4) and lr10 == pytest.approx(1e-3) and lr_end == pytest.approx(1e-6)
    assert wd0 == pytest.approx(0.04) and wd_end == pytest.approx(0.4)
    assert m0 == pytest.approx(0.996) and m_end == pytest.approx(1.0)


# =============================================================================
# CUDA (skipped on CPU-only machines such as CI; notes/gpu_check.sh runs them on a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bf16_compile_matches_eager_and_no_sync():
    cfg = tiny_cfg(img_size=64, width=64, heads=2, pred_width=32)
    torch.manual_seed(0)
    model = TCJEPA(cfg).cuda()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, device="cuda")
    ctx, tgt = (x.cuda() for x in sample_masks(8, cfg, g))
    tokens, word_mask = (x.cuda() for x in fake_text(8, cfg, g))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(images, ctx, tgt, tokens, word_mask)
        compiled = torch.compile(model)(images, ctx, tgt, tokens, word_mask)
    for k in ("loss", "loss_pred", "loss_sparse", "loss_consist"):
        e, c = eager[k].item(), compiled[k].item()
        assert math.isfinite(e) and abs(e - c) < 2e-2 * max(1, abs(e))
    # the step itself never waits for the GPU: no .item(), no data-dependent shapes on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, ctx, tgt, tokens, word_mask)
        out["loss"].backward()
        model.update_target(0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_compiled_dynamic_shapes_one_graph_no_sync():
    """The compiled step on CUDA as train.py runs it (block sizes change per batch, both dims
    marked dynamic): one graph for every (Nc, Nt), and no host-device sync once compiled."""
    import torch._dynamo.utils as dynamo_utils

    cfg = tiny_cfg(img_size=64, width=64, heads=2, pred_width=32)
    torch.manual_seed(0)
    model = TCJEPA(cfg).cuda()
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, device="cuda")
    tokens, word_mask = (x.cuda() for x in fake_text(8, cfg, g))
    batches = {}
    for _ in range(500):  # four batches with four different (Nc, Nt)
        ctx, tgt = sample_masks(8, cfg, g)
        batches.setdefault((ctx.shape[1], tgt.shape[2]), (ctx.cuda(), tgt.cuda()))
        if len(batches) == 4:
            break
    assert len(batches) == 4

    def step(ctx, tgt):
        torch._dynamo.mark_dynamic(ctx, 1)
        torch._dynamo.mark_dynamic(tgt, 2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(images, ctx, tgt, tokens, word_mask)
        out["loss"].backward()
        model.update_target(0.99)

    shapes = list(batches.values())
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    step(*shapes[0])  # compiles forward and backward
    step(*shapes[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*shapes[2])
        step(*shapes[3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dynamo_utils.counters["stats"]["unique_graphs"] - graphs == 1


@cuda
def test_cuda_flash_attention_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = tcjepa.SelfAttention(128, heads=2).cuda()
    x = torch.randn(4, 50, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = attn(x)  # raises if the fused flash kernel cannot run these shapes
    torch.testing.assert_close(y.float(), attn(x), atol=3e-2, rtol=3e-2)



# -----------------------------------------------------------------------------
# nothing lost: the out_dir, signals, workers, late data failures


def test_a_fresh_run_never_replaces_the_run_in_its_out_dir(tmp_path):
    a = tmp_path / "a"
    train.main([*TINY, "--max_steps", "2", "--out_dir", str(a)])
    before = {f: (a / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "tokenizer.json")}
    # a second run, a bad one too
    for flags in (["--text_cond", "none", "--seed", "5"], ["--shapes_size", "4"]):
        msg = _main_error([*TINY, "--max_steps", "2", "--out_dir", str(a), *flags])
        assert "holds a run (ckpt.pt (step 2), log.jsonl, tokenizer.json)" in msg, msg
        assert "--resume auto" in msg, msg
        assert "--overwrite true" in msg and "\n" not in msg
    assert before == {f: (a / f).read_bytes() for f in before}  # not a byte changed
    log = a / "log.jsonl"
    (a / "ckpt.pt").rename(a / "moved.pt")  # --resume auto with the checkpoint missing for a moment
    msg = _main_error([*TINY, "--out_dir", str(a), "--resume", "auto"])
    assert "holds log.jsonl, tokenizer.json but no ckpt.pt" in msg
    (a / "ckpt.pt").symlink_to(a / "nowhere.pt")  # ... or a dangling link
    assert "dangling link" in _main_error([*TINY, "--out_dir", str(a), "--resume", "auto"])
    assert log.read_bytes() == before["log.jsonl"]
    (a / "ckpt.pt").unlink()
    # asked for
    assert train.main([*TINY, "--max_steps", "3", "--out_dir", str(a), "--overwrite", "true"]) == 0
    assert max(train_log(a)) == 3 and min(train_log(a)) == 1
    assert train.main([*TINY, "--max_steps", "2", "--out_dir", str(tmp_path / "new"),
                       "--resume", "auto"]) == 0


def test_one_writer_per_out_dir(tmp_path):
    """A second process on the same out_dir says who holds it and changes nothing; the lock dies with
    its holder (kill -9 leaves none)."""
    d = tmp_path / "d"
    args = [*TINY, "--max_steps", "6", "--out_dir", str(d), "--save_every", "1"]
    first = subprocess.Popen([sys.executable, slow_step_script(tmp_path, 1), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV, cwd=HERE)
    deadline = time.time() + 120
    while not ((d / "log.jsonl").exists() and len(train_log(d)) >= 1) and time.time() < deadline:
        time.sleep(0.05)
    second = run_train(*args[:-4], "--max_steps", "6", "--out_dir", str(d), "--resume", "auto", check=False)
    assert second.returncode == 1
    assert f"is in use by process {first.pid} on" in second.stderr.strip().splitlines()[-1]
    first.kill()  # kill -9: the OS drops its lock
    first.wait()
    resumed = run_train(*args, "--resume", "auto")
    assert sorted(train_log(d)) == list(range(1, 7))


def test_torchrun_with_sigterm_to_torchrun_and_its_ranks_at_once_saves(tmp_path):
    """A scheduler signals every process of the job, and torchrun forwards its own SIGTERM: each rank
    gets two. The second must not kill a rank before it saves: the checkpoint is at the last logged step."""
    d = str(tmp_path / "twice")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           slow_step_script(tmp_path, 2), *TINY, "--max_steps", "20", "--out_dir", d]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=HERE)
    deadline = time.time() + 240
    while not (os.path.exists(f"{d}/log.jsonl") and len(train_log(d)) >= 1) and time.time() < deadline:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    for pid in [proc.pid, *map(int, ranks)]:
        os.kill(pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert text.count("SIGTERM: saved") == 1 and "forcefully" not in text, text[-3000:]
    saved = torch.load(f"{d}/ckpt.pt", weights_only=False)["step"] + 1
    assert saved == max(train_log(d)) and saved < 20


def test_unknown_words_are_not_caption_words(tmp_path):
    """[UNK] carries nothing: a tokenizer that knows (nearly) none of the words stops the run; one that
    misses many is a warning with the numbers."""
    tiny_vocab = tmp_path / "tiny.json"
    train_tokenizer(["zebra giraffe"], 8, tiny_vocab)  # none of the shapes captions' words
    msg = _main_error([*TINY, "--max_steps", "1", "--out_dir", str(tmp_path / "a"),
                       "--tokenizer", str(tiny_vocab)])
    assert "none of 64 sampled training images has a caption with a word the tokenizer knows" in msg, msg
    assert "--text_cond none" in msg and "\n" not in msg
    half = tmp_path / "half.json"  # the built-in captions' words, but none of the shapes or colours
    words = [w for w in "a an the at in on of is there you can see image picture with and top bottom"
             " left right center middle corner sits big large small little tiny".split()]
    train_tokenizer([" ".join(words)], 64, half)
    out = run_train(*TINY, "--max_steps", "1", "--out_dir", str(tmp_path / "b"), "--tokenizer", str(half))
    assert "caption words" in out.stderr and "unknown to the tokenizer" in out.stderr


def test_resuming_on_another_dataset_is_refused(coco_dir, tmp_path):
    d = tmp_path / "s"
    train.main([*TINY, "--max_steps", "1", "--out_dir", str(d)])
    msg = _main_error([*TINY, "--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32",
                       "--batch_size", "2", "--out_dir", str(d), "--resume", "auto"])
    assert "trained on --dataset shapes" in msg and "\n" not in msg, msg


def test_bad_probe_annotations_are_dropped_at_start_up(coco_dir, tmp_path):
    """Null, NaN and string coordinates, an unknown category and a val image whose size is not its
    record's: each left out (counted) at start-up, and the run ends with its final probes."""
    _write_instances(coco_dir)
    for split, fix in (("train", lambda d: d["annotations"][0]["segmentation"][0].__setitem__(1, "7")),
                       ("val", None)):
        path = coco_dir / "annotations" / f"instances_{split}2017.json"
        d = json.loads(path.read_text())
        if fix:
            fix(d)
            d["annotations"][1]["segmentation"][0][0] = None
            d["annotations"][2]["category_id"] = 77
            d["annotations"][3]["segmentation"][0][2] = float("nan")
        else:  # one more val image, recorded at a size it does not have
            Image.new("RGB", (24, 24)).save(coco_dir / "val2017" / f"{101:012d}.jpg")
            d["images"].append(dict(id=101, file_name=f"{101:012d}.jpg", width=30, height=24))
        path.write_text(json.dumps(d))
    _dump(coco_dir / "annotations" / "captions_val2017.json", [100, 101],
          [(100, "a red square"), (101, "a box")])
    coco = ["--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "2", "--eval_every", "1", "--log_every", "1",
            "--probe_val", "1", "--probe_train", "5", "--probe_words", "8"]
    out = run_train(*TINY, *coco, "--out_dir", str(tmp_path / "p"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("coco probes:"))
    assert "3 malformed segmentation" in line and "1 unknown category" in line, line
    assert "1 val image whose size is not its record's" in line and "1 val images" in line, line
    evals = [json.loads(x) for x in open(tmp_path / "p" / "log.jsonl") if "val_true" in x]
    assert [e["step"] for e in evals] == [1, 2] and all(e["coco_dense_miou"] is not None for e in evals)
    # a wrong instances file (every val image at another size): one line before any training
    path = coco_dir / "annotations" / "instances_val2017.json"
    d = json.loads(path.read_text())
    for im in d["images"]:
        im["width"] += 1
    path.write_text(json.dumps(d))
    msg = _main_error([*TINY, *coco, "--out_dir", str(tmp_path / "q")])
    assert "differ in size from their record" in msg and not (tmp_path / "q" / "ckpt.pt").exists(), msg


def test_an_evaluation_that_a_stop_skipped_is_done_by_the_resume(tmp_path):
    """A stop at an evaluation step (or at the last step) skips the evaluation (and the final results);
    the resumed run performs what was skipped."""
    for stop_at, steps in ((4, 6), (6, 6)):
        d = tmp_path / f"stop{stop_at}"
        args = [*TINY, "--max_steps", str(steps), "--eval_every", "4", "--save_every", "100",
                "--out_dir", str(d)]
        p = subprocess.run([sys.executable, signal_after_step_script(tmp_path, stop_at), *args],
                           capture_output=True, text=True, env=ENV, cwd=HERE, start_new_session=True)
        assert p.returncode == train.EXIT_STOPPED, p.stdout[-1500:] + p.stderr[-1500:]
        recs = [json.loads(x) for x in open(d / "log.jsonl")]
        assert not any(r.get("step") == stop_at and "val_true" in r for r in recs)
        out = run_train(*args, "--resume", "auto")
        recs = [json.loads(x) for x in open(d / "log.jsonl")]
        assert [r["step"] for r in recs if "val_true" in r] == sorted({4, steps}), recs
        assert sum("init_probes" in r for r in recs) == 1 and "random init" in out.stdout
        assert "finished" in out.stdout


def test_a_dead_loader_worker_saves_and_says_why(tmp_path):
    """kill -9 of a DataLoader worker (what the OOM killer does): the run saves the last completed step
    and exits 74 with one line; with a stop pending, the same is a stop (75). The resume completes it."""
    for with_stop in (False, True):
        d = tmp_path / f"w{int(with_stop)}"
        args = [*TINY, "--max_steps", "6", "--num_workers", "1", "--out_dir", str(d)]
        p = subprocess.Popen([sys.executable, slow_step_script(tmp_path, 0.7), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV, cwd=HERE)
        deadline = time.time() + 120
        while not ((d / "log.jsonl").exists() and len(train_log(d)) >= 2) and time.time() < deadline:
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert workers
        if with_stop:
            p.send_signal(signal.SIGTERM)
        for w in workers:
            os.kill(int(w), signal.SIGKILL)
        text, _ = p.communicate(timeout=120)
        if with_stop:
            assert p.returncode == train.EXIT_STOPPED and "SIGTERM: saved" in text, text[-2000:]
        else:
            assert p.returncode == train.EXIT_WORKER_DIED, text[-2000:]
            last = text.strip().splitlines()[-1]
            assert "DataLoader worker" in last and "--num_workers" in last, text[-2000:]
            assert "Traceback" not in text, text[-2000:]
        saved = torch.load(d / "ckpt.pt", weights_only=False)["step"] + 1
        assert saved == max(train_log(d))
        run_train(*args, "--resume", "auto")
        assert sorted(train_log(d)) == list(range(1, 7))


def test_a_damaged_log_is_resumed_with_a_warning(tmp_path):
    d = tmp_path / "d"
    train.main([*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(d)])
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    ckpt["step"] = 1  # as if killed after the save at step 2
    torch.save(ckpt, d / "ckpt.pt")
    with open(d / "log.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 0.\xff}\nnull\n{"step": "6"}\n{"step": 4, "lo')
    out = run_train(*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(d), "--resume", "auto")
    assert "4 damaged line(s) left out" in out.stdout and sorted(train_log(d)) == [1, 2, 3, 4]
    assert all(json.loads(x) is not None for x in open(d / "log.jsonl"))


def test_a_full_disk_at_a_log_append_is_one_line_and_leaves_no_partial_line(tmp_path):
    """A real write limit (RLIMIT_FSIZE: the file may not grow past its size + 10 bytes), in a child
    process: the append fails part-way, is cut back off, and says so in one line."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n')
    code = f"""import resource, signal, sys
sys.path.insert(0, {HERE!r})
import train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then gives EFBIG, as a full disk gives ENOSPC
size = {len(path.read_bytes())}
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
try:
    train.append_log({str(path)!r}, dict(step=2, loss=0.25, note="a line longer than ten bytes"))
except train.UserError as e:
    print("USER", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.startswith("USER could not write"), out.stdout + out.stderr
    assert "--resume auto" in out.stdout, out.stdout + out.stderr
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'  # no partial line left


def test_log_records_are_strict_json():
    import io
    assert train._json_safe(dict(a=float("nan"), b=[1.0, float("inf")], c=dict(d=-float("inf")))) == \
        dict(a=None, b=[1.0, None], c=dict(d=None))


def test_bad_inputs_of_part_two_are_one_line_or_handled(tmp_path, coco_dir):
    # a WordLevel tokenizer without [UNK]
    from tokenizers import Tokenizer, models
    no_unk = tmp_path / "no_unk.json"
    Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "a": 1, "red": 2})).save(str(no_unk))
    msg = _main_error([*TINY, "--tokenizer", str(no_unk), "--out_dir", str(tmp_path / "t")])
    assert "has no [UNK] token" in msg and "\n" not in msg
    # a seed past 64 bits
    msg = _main_error([*TINY, "--seed", "18446744073709551616", "--out_dir", str(tmp_path / "s")])
    assert "--seed must be in [0, " in msg
    # a caption with a lone surrogate (a JSON escape)
    path = coco_dir / "annotations" / "captions_train2017.json"
    text = path.read_text(encoding="utf-8").replace('"a red bus on a street"', '"a red bus \\ud800x"')
    path.write_text(text, encoding="utf-8")
    coco = ["--dataset", "coco", "--data_dir", str(coco_dir), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "1", "--num_workers", "0"]
    assert train.main([*TINY, *coco, "--out_dir", str(tmp_path / "c")]) == 0
    # patches as large as the objects on the shapes data: probes with nothing to fit are null, not a crash
    assert train.main([*TINY, "--patch_size", "32", "--min_keep", "1", "--n_targets", "1", "--max_steps", "1",
                       "--out_dir", str(tmp_path / "p32")]) == 0
    # stale temp files of a save cut short by kill -9 are removed by the next run
    (tmp_path / "p32" / "ckpt.pt.12345.tmp").write_bytes(b"half")
    assert train.main([*TINY, "--patch_size", "32", "--min_keep", "1", "--n_targets", "1", "--max_steps", "2",
                       "--out_dir", str(tmp_path / "p32"), "--resume", "auto"]) == 0
    assert not list((tmp_path / "p32").glob("*.tmp"))


def test_checkpoints_of_another_version_and_of_another_world(tmp_path):
    d = tmp_path / "v"
    train.main([*TINY, "--max_steps", "2", "--out_dir", str(d)])
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    ckpt["model_config"]["qk_center"] = False  # a field this version does not have
    torch.save(ckpt, d / "other.pt")
    msg = _main_error([*TINY, "--out_dir", str(d), "--resume", str(d / "other.pt"), "--eval_only", "true"])
    assert "another version of the model" in msg and "qk_center" in msg, msg
    del ckpt["model_config"]["qk_center"]
    ckpt["world"], ckpt["train_config"]["batch_size"] = 2, 4  # trained by 2 processes of 4 images
    torch.save(ckpt, d / "two.pt")
    assert train.main([*TINY, "--out_dir", str(d), "--resume", str(d / "two.pt"), "--eval_only", "true"]) == 0
    out = run_train(*TINY, "--max_steps", "3", "--shapes_size", "48", "--out_dir", str(d), "--resume", "auto")
    assert "the training set has 48 images, the checkpoint's run had 64" in out.stdout


# -----------------------------------------------------------------------------
# your own captioned images (--dataset captions), the export for timm, the plot of a log


def _img(path, size=(40, 30), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_jsonl_captions(root, n=12):
    """root/train.jsonl over n good images (each with a two-sentence description), plus one entry of
    each bad kind; root/val.jsonl with 2 images."""
    lines = []
    for i in range(n):
        _img(root / "imgs" / f"{i}.jpg", color=(20 * i % 256, 100, 50))
        lines.append(dict(image=f"imgs/{i}.jpg",
                          captions=[f"A red box number {i}. It sits on grass!", "a box"]))
    _img(root / "imgs" / "bad_caption.jpg")
    (root / "imgs" / "corrupt.jpg").write_bytes(b"not an image")
    lines += [dict(image="imgs/missing.jpg", captions=["gone"]),  # missing image
              dict(image="imgs/0.jpg", captions=[]),  # no caption
              dict(image="imgs/bad_caption.jpg", captions=["ok", 3]),  # a caption that is not a string
              dict(captions=["no image field"]),
              dict(image="imgs/corrupt.jpg", captions=["a corrupt file is found when read"])]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (root / "train.jsonl").write_text(text)
    for i in range(2):
        _img(root / "val" / f"{i}.jpg")
    val = [json.dumps(dict(image=f"val/{i}.jpg", captions="A val box. Red.")) for i in range(2)]
    (root / "val.jsonl").write_text("\n".join(val))
    return root


def test_sentences_are_captions():
    assert data.split_sentences("A dog runs. It is brown!  Is it?\nyes\n\n  Line two.  ") == \
        ["A dog runs.", "It is brown!", "Is it?", "yes", "Line two."]
    assert data.split_sentences("  ") == []
    assert data.split_sentences("no stop at the end") == ["no stop at the end"]


def test_captions_manifest_formats_and_bad_entries(tmp_path, capsys):
    root = write_jsonl_captions(tmp_path / "j")
    train, val = data.CaptionsDataset.splits(root, img_size=32)
    line = capsys.readouterr().out
    assert "captions (jsonl): 13 train / 2 val images" in line  # 12 good + the corrupt one (found when read)
    for kind in ("1 missing image (train)", "1 no caption", "1 caption not a string", "1 no image path",
                 "1 not a JSON line"):
        assert kind in line, (kind, line)
    assert train.captions_of(0) == ["A red box number 0.", "It sits on grass!", "a box"]  # sentences
    assert val.captions_of(1) == ["A val box.", "Red."]
    item = train[(0, 7)]
    assert item["image"].shape == (3, 32, 32) and item["seed"] == 7
    bad = [i for i in range(len(train)) if train.files[i].endswith("corrupt.jpg")][0]
    assert train[(bad, 0)] is None and train.n_unreadable == 1
    # img2dataset's files layout: 00000/000000123.jpg beside 000000123.txt, one caption per line
    f = tmp_path / "f"
    for i in range(30):
        _img(f / f"{i // 10:05d}" / f"{i:09d}.jpg")
        (f / f"{i // 10:05d}" / f"{i:09d}.txt").write_text(f"a picture {i}\nsecond line. And more.\n")
    (f / "00000" / "orphan.txt").write_text("no image beside me")
    (f / "00000" / "000000099.jpg").parent.mkdir(exist_ok=True)
    _img(f / "00001" / "emptycap.jpg")
    (f / "00001" / "emptycap.txt").write_text("  \n")
    train, val = data.CaptionsDataset.splits(f, img_size=32)
    line = capsys.readouterr().out
    assert "img2dataset files" in line and len(train) + len(val) == 30 and "1 no caption" in line, line
    assert train.captions_of(0)[1:] == ["second line.", "And more."]
    # the held-out rule: a hash of the path, the same on every run and in any order
    again = data.CaptionsDataset.splits(f, img_size=32)[1]
    assert [val.files[i] for i in range(len(val))] == [again.files[i] for i in range(len(again))]
    # ShareGPT4V: a list of {"image", "conversations": [..., {"from": "gpt", "value": description}]}
    s = tmp_path / "s"
    items = []
    for i in range(4):
        _img(s / "sam" / f"{i}.jpg")
        items.append(dict(id=i, image=f"sam/{i}.jpg", conversations=[
            dict(value="<image>\nDescribe the image in detail."),
            {"from": "gpt", "value": "The image shows a red box. The box is on grass. It is sunny."}]))
    items.append(dict(id=9, image="sam/none.jpg", conversations=[{"from": "gpt", "value": "Missing."}]))
    (s / "share-captioner.json").write_text(json.dumps(items))
    train, val = data.CaptionsDataset.splits(s, img_size=32)
    line = capsys.readouterr().out
    assert "(sharegpt4v share-captioner.json): 3 train / 1 val images" in line, line
    assert "1 missing image" in line, line
    assert train.captions_of(0) == ["The image shows a red box.", "The box is on grass.", "It is sunny."]
    # nothing usable: one line
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.jsonl").write_text(json.dumps(dict(image="x.jpg", captions=["a"])) + "\n")
    with pytest.raises(data.UserError, match="no usable train image"):
        data.CaptionsDataset.splits(tmp_path / "e")


def test_n_of_m_captions_are_sampled_per_step_and_seeded(tmp_path):
    """Collate draws n_captions of an image's sentences per step, from the item's seed (which the step
    sampler derives from (seed, step, rank)): the same seed, the same captions (exact resume); another
    seed, another subset."""
    item = dict(image=torch.zeros(3, 8, 8), captions=[f"sentence {k}" for k in range(11)])
    tok = train_tokenizer(item["captions"], 64)
    col = Collate(tok, n_captions=4, max_words=4)
    picks = [tuple(col([dict(item, seed=s)])["captions"][0]) for s in range(200)]
    assert all(len(set(p)) == 4 and set(p) <= set(item["captions"]) for p in picks)
    assert picks[:50] == [tuple(col([dict(item, seed=s)])["captions"][0]) for s in range(50)]  # seeded
    counts = Counter(c for p in picks for c in p)
    assert len(counts) == 11 and min(counts.values()) > 40  # every sentence drawn, about 200 * 4 / 11 each
    few = dict(item, captions=["only one"], seed=3)
    b = col([few])
    assert b["captions"][0] == ["only one"]
    assert b["word_mask"][0].any(-1).tolist() == [True, False, False, False]


def test_train_on_own_captions_end_to_end_and_resume_exactly(tmp_path):
    root = write_jsonl_captions(tmp_path / "j")
    args = [*TINY, "--dataset", "captions", "--data_dir", str(root), "--img_size", "32", "--patch_size", "8",
            "--batch_size", "2", "--max_steps", "6", "--eval_every", "3", "--n_captions", "3",
            "--num_workers", "0"]
    out = run_train(*args, "--out_dir", str(tmp_path / "full"))
    assert "captions (jsonl)" in out.stdout and "rankme" in out.stdout
    evals = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl") if "val_true" in x]
    assert [e["step"] for e in evals] == [3, 6] and all(e["rankme"] >= 1 for e in evals)
    first = json.loads(open(tmp_path / "full" / "log.jsonl").readline())
    assert first["config"]["model"]["n_captions"] == 3 and first["config"]["train"]["dataset"] == "captions"
    d = tmp_path / "stopped"
    p = subprocess.run([sys.executable, signal_after_step_script(tmp_path, 2), *args, "--out_dir", str(d)],
                       capture_output=True, text=True, env=ENV, cwd=HERE, start_new_session=True)
    assert p.returncode == train.EXIT_STOPPED, p.stderr[-2000:]
    run_train(*args, "--out_dir", str(d), "--resume", "auto")
    a, b = train_log(tmp_path / "full"), train_log(d)
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-6), s


def test_captions_preset_follows_the_paper():
    t, m = train.parse_args(["--dataset", "captions"])
    assert (t.epochs, t.warmup_epochs, t.lr_per_256, t.ema_start, t.ema_end) == (50, 10, 1.25e-4, 0.996, 1.0)
    assert (m.n_captions, m.width, m.depth, m.heads, m.patch_size, m.img_size) == (8, 768, 12, 12, 16, 224)
    assert (m.sparse_coef, m.consist_coef) == (0.1, 0.5)
    eight = train.resolve_recipe(t, 1_281_167, 8)  # ImageNet-1k on 8 GPUs
    assert eight.lr == pytest.approx(1.25e-4 * 1024 / 256)
    assert eight.max_steps == math.ceil(50 * 1_281_167 / 1024)


def test_export_loads_into_timm_and_computes_what_encode_does(tmp_path):
    """timm is a test dependency (requirements.txt says why): the exported target encoder, loaded into
    timm's VisionTransformer with the printed arguments, gives TCJEPA.encode's features; with a wrong
    head count the same file loads and computes something else (why the printed lines name it)."""
    import timm
    d = tmp_path / "r"
    train.main([*TINY, "--depth", "2", "--max_steps", "2", "--out_dir", str(d)])
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["model"].items():  # weights far from the init's, target unlike encoder: a sharp test
        if k.startswith("target."):
            v.add_(torch.randn(v.shape, generator=g) * (0.5 if "qkv" in k else 0.1))
    torch.save(ckpt, d / "ckpt.pt")
    out = run_train(*TINY, "--depth", "2", "--resume", str(d / "ckpt.pt"),
                    "--export", str(tmp_path / "enc.pt"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("model = timm"))
    assert "num_heads=2" in line and "class_token=False" in line and 'global_pool="avg"' in line
    kw = eval("dict(" + line.split("VisionTransformer(", 1)[1].rsplit(")", 1)[0] + ")")
    vit = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    res = vit.load_state_dict(torch.load(tmp_path / "enc.pt"))
    assert not res.missing_keys and not res.unexpected_keys
    model = TCJEPA(TCJEPAConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        x = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(vit.forward_features(x), model.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(x), model.encode(x).mean(1), atol=1e-5, rtol=1e-5)
        # the TARGET encoder, not the context one
        assert (vit.forward_features(x) - model.encoder(x)).abs().max() > 1e-2
        wrong = timm.models.vision_transformer.VisionTransformer(**{**kw, "num_heads": 1}).eval()
        wrong.load_state_dict(torch.load(tmp_path / "enc.pt"))  # loads silently ...
        # ... and computes something else
        assert (wrong.forward_features(x) - model.encode(x)).abs().max() > 1e-2


def test_plot_reads_a_log_as_report_does(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "notes"))
    import plot
    log = tmp_path / "log.jsonl"
    log.write_text('{"config": {}}\n{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
                   '{"step": 2, "loss": 0.3}\n{"step": 2, "val_true": 0.1, "rankme": null}\nnull\n'
                   '{"step": "x"}\n{"step": 0, "init_probes": {"rankme": 2.0}}\n{"step": 3, "lo')
    tr, ev, init = plot.read(str(log))
    assert [r["loss"] for r in tr] == [0.5, 0.3] and [e["step"] for e in ev] == [2]
    assert init == {"rankme": 2.0}
    assert plot.series(ev, "rankme") == ([], [])



def test_a_run_never_mixes_with_another_in_its_out_dir(tmp_path, capsys):
    """--resume of another folder's checkpoint into an out_dir that holds a run is refused; into an empty
    one it continues there; --eval_only of another folder's checkpoint writes nothing; --overwrite
    drops the previous checkpoint with its log (a kill before the first save cannot resume it)."""
    a, d, e = tmp_path / "a", tmp_path / "d", tmp_path / "e"
    train.main([*TINY, "--max_steps", "2", "--out_dir", str(a)])
    train.main([*TINY, "--max_steps", "2", "--seed", "3", "--out_dir", str(d)])
    before = {f: (d / f).read_bytes() for f in ("ckpt.pt", "log.jsonl")}
    msg = _main_error([*TINY, "--max_steps", "4", "--out_dir", str(d), "--resume", str(a / "ckpt.pt")])
    assert "--resume names another run's checkpoint" in msg
    assert before == {f: (d / f).read_bytes() for f in before}
    assert train.main([*TINY, "--out_dir", str(e), "--resume", str(a / "ckpt.pt"),
                       "--eval_only", "true"]) == 0
    assert "val_true" in capsys.readouterr().out and not (e / "log.jsonl").exists()
    assert train.main([*TINY, "--max_steps", "3", "--out_dir", str(e), "--resume", str(a / "ckpt.pt")]) == 0
    assert sorted(train_log(e)) == [3] and (e / "ckpt.pt").exists()  # the continued run, in its new folder
    real = train.train_step

    def crash(*args, **kw):
        raise RuntimeError("killed before the first save")

    train.train_step = crash
    try:
        with pytest.raises(RuntimeError, match="before the first save"):
            train.main([*TINY, "--max_steps", "2", "--out_dir", str(d), "--overwrite", "true", "--seed", "9"])
    finally:
        train.train_step = real
    assert not (d / "ckpt.pt").exists()
    assert json.loads((d / "log.jsonl").read_text())["config"]["train"]["seed"] == 9


def test_a_raising_worker_is_not_a_dead_worker_and_a_death_before_step_1_saves_nothing(tmp_path, monkeypatch):
    """An error raised inside a loader worker is a bug to see (its traceback, exit 1), not a worker killed
    for memory (74); a worker death before the first step of a fresh run writes no checkpoint at step -1."""
    def broken(self, keys):
        raise RuntimeError("a bug in the data")

    monkeypatch.setattr(data.ShapesDataset, "__getitems__", broken)
    with pytest.raises(RuntimeError, match="a bug in the data"):
        train.main([*TINY, "--max_steps", "2", "--num_workers", "1", "--out_dir", str(tmp_path / "w")])
    monkeypatch.undo()

    def died(*a, **k):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(train, "train_step", died)
    d = tmp_path / "first"
    assert train.main([*TINY, "--max_steps", "2", "--out_dir", str(d)]) == train.EXIT_WORKER_DIED
    assert not (d / "ckpt.pt").exists()


def test_probe_table_prints_nan_for_a_null_probe():
    t = train.TrainConfig()
    table = train.probe_table(dict(a=None, b=0.5), dict(a=0.25, b=None, c=[1]), t)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:]}
    assert rows == {"a": ["0.2500", "nan"], "b": ["nan", "0.5000"]}, table


# -----------------------------------------------------------------------------
# notes/report.py: the verdicts of notes/experiments.md §10 follow its rules as written

def _report():
    sys.path.insert(0, os.path.join(HERE, "notes"))
    import report
    return report


def test_report_t_quantiles_match_a_numerical_integral_of_the_t_density():
    """T975[df] is the 0.975 quantile of Student's t: integrate the density from 0 (Simpson, 4000 steps)."""
    T975 = _report().T975
    for df, q in T975.items():
        logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        f = lambda t: math.exp(logc - (df + 1) / 2 * math.log1p(t * t / df))  # noqa: E731
        n, h = 4000, q / 4000
        area = h / 3 * (f(0) + f(q) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n)))
        assert abs(0.5 + area - 0.975) < 2e-5, (df, q, 0.5 + area)


def _claim_log(runs, name, step, final, init):
    recs = [{"config": {}}, {"step": step, "loss": 0.1, "ms_per_step": 1.0},
            {"step": step, "val_true": 0.2, "val_shuffled": 0.3, **final}, {"step": 0, "init_probes": init}]
    (runs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _naive_interval(xs, t):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m - t * sd / math.sqrt(len(xs)), m + t * sd / math.sqrt(len(xs))


@pytest.mark.parametrize("case", ["holds", "opposite", "straddles", "a seed missing"])
def test_report_claim1_verdict_follows_the_paired_interval(tmp_path, capsys, monkeypatch, case):
    report = _report()
    monkeypatch.setattr(report, "pyplot", lambda: None)  # no figure written into notes/
    shift = {"holds": 0.03, "opposite": -0.03, "straddles": 0.0, "a seed missing": 0.03}[case]
    d = [shift + 0.01 * ((7 * s) % 5 - 2) for s in range(10)]  # paired differences of the gain, sd ~0.015
    init = {"dense_shape_obj": 0.3, "obj_shape": 0.4, "img_shape_ap": 0.5, "rankme": 3.0}
    for s in range(10):
        ij = {"dense_shape_obj": 0.35 + 0.02 * s, "obj_shape": 0.5, "img_shape_ap": 0.6, "rankme": 9.0}
        tc = {**ij, "dense_shape_obj": ij["dense_shape_obj"] + d[s], "ground_o": 0.2, "ground_chance": 0.2}
        _claim_log(tmp_path, f"c1_ijepa_s{s}", 3000, ij, init)
        if case == "a seed missing" and s == 9:  # still running: no probes yet, its last line cut short
            (tmp_path / "c1_tc_s9.jsonl").write_text('{"config": {}}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
        else:
            _claim_log(tmp_path, f"c1_tc_s{s}", 3000, tc, init)
    _claim_log(tmp_path, "c1_zero_s0", 1500, ij, init)  # stopped early: not a finished run, not counted
    report.claim1(str(tmp_path))
    verdict = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verdict (claim 1)")]
    if case == "a seed missing":
        assert verdict == ["verdict (claim 1): undecided: 9 of 10 paired seeds"]
        return
    lo, hi = _naive_interval(d, 2.262)  # t(0.975, df 9)
    what = {"holds": "claim 1 holds here", "opposite": "the opposite of claim 1",
            "straddles": "no difference detected"}[case]
    # the made-up differences do fall where each case says
    assert (lo > 0, hi < 0) == {"holds": (True, False), "opposite": (False, True),
                                "straddles": (False, False)}[case]
    assert len(verdict) == 1 and what in verdict[0] and f"[{lo:+.4f}, {hi:+.4f}]" in verdict[0], verdict


def test_report_claim2_spreads_verdict_and_collapse(tmp_path, capsys, monkeypatch):
    report = _report()
    monkeypatch.setattr(report, "pyplot", lambda: None)
    probe = {"c2_ijepa": {"easy": 0.50, "default": 0.42, "hard": 0.20},
             "c2_tc": {"easy": 0.45, "default": 0.44, "hard": 0.40}}
    noise = [0.0, 0.02, -0.015]
    for p, by_setting in probe.items():
        for k, v in by_setting.items():
            for s in range(3):
                jitter = noise[s] if k == "hard" else 0.0
                rankme = 1.5 if (p, k, s) == ("c2_ijepa", "hard", 1) else 8.0
                _claim_log(tmp_path, f"{p}_{k}_s{s}", 1500, {"dense_shape_obj": v + jitter, "rankme": rankme},
                           {"dense_shape_obj": 0.1})
    report.claim2(str(tmp_path))
    out = capsys.readouterr().out
    spread_ij = [0.50 - (0.20 + e) for e in noise]  # max - min over the settings, per seed
    spread_tc = [0.45 - (0.40 + e) for e in noise]  # hard stays the lowest of TC-JEPA's three
    lo, hi = _naive_interval([a - b for a, b in zip(spread_ij, spread_tc)], 4.303)  # t(0.975, df 2)
    assert lo > 0
    assert ("verdict (claim 2): claim 2 holds here: I-JEPA's probe moves more across block scales: "
            f"95% interval [{lo:+.4f}, {hi:+.4f}]") in out, out
    assert "collapse (rankme < 2): c2_ijepa_hard_s1 (rankme 1.50)" in out, out
