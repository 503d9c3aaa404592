"""
TC-JEPA in one file: I-JEPA whose predictor is conditioned on image captions.

Paper: "Text-Conditional JEPA for Learning Semantically Rich Visual Representations"
(arXiv 2605.03245). Baseline: I-JEPA (Assran et al., arXiv 2301.08243). notes/paper.md restates
the method in numbered sections (cited below as §), maps every part of it to this code and lists
every deviation.

One training step, in words:
  1. sample_masks: per image, 1 context block and M target blocks on the patch grid (disjoint).
  2. the EMA target encoder sees the whole image; its layer-normed features at the target
     patches are what the predictor must produce.
  3. the context encoder sees only the context patches.
  4. the predictor gets the context features plus one mask token per target patch and, at EVERY
     layer, cross-attends to the words of each caption; the C caption-conditioned versions of each
     token are max-pooled. It outputs a feature for each target patch.
  5. loss = prediction loss + lambda * sparsity + beta * cross-layer consistency, both on the
     rectified cosine patch-word similarities of the conditioner.

Shape legend used in comments:
  B batch, H/W grid height/width in patches, N = H*W patches, D encoder width, P predictor width,
  M target blocks, Nc context patches, Nt patches per target block, L = Nc + Nt predictor tokens
  per sequence, C captions per image, S words per caption, T text width.

Imports only torch and the standard library, so it can be lifted into another project.
"""

import copy
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# the fields that take one of a few words (train.py's command line uses these too)
CHOICES = dict(text_cond=("cross", "none"), text_pool=("word", "mean"), pred_loss=("smooth_l1", "l2"),
               sim_mode=("paper", "cosine", "attention"))


@dataclass
class TCJEPAConfig:
    # image and encoder (defaults: the small built-in `shapes` setting; see vit_b16() for the paper's)
    img_size: int = 64  # input resolution (square)
    patch_size: int = 8  # patch side in pixels -> an 8x8 grid at 64 px
    in_chans: int = 3  # RGB
    width: int = 128  # encoder width D
    depth: int = 4  # encoder blocks
    heads: int = 4  # encoder attention heads (predictor uses the same number, as I-JEPA)
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width (ViT)
    # predictor (I-JEPA: width 384, depth 6 for ViT-B)
    pred_width: int = 64  # predictor width P
    pred_depth: int = 3  # predictor blocks
    # multi-block masking (I-JEPA values)
    n_targets: int = 4  # target blocks M per image
    target_scale: tuple = (0.15, 0.2)  # fraction of patches in one target block
    target_aspect: tuple = (0.75, 1.5)  # h/w of a target block
    context_scale: tuple = (0.85, 1.0)  # fraction of patches in the context block (aspect 1)
    # a context with fewer patches is redrawn (up to 20 times, then the largest draw is kept);
    # I-JEPA: 10 of 196, but 10 of 64 leaves the small grid almost blind (notes/paper.md §5)
    min_keep: int = 24
    # text
    text_cond: str = "cross"  # "cross" = TC-JEPA, "none" = plain I-JEPA (no text parameters)
    vocab_size: int = 1024  # tokenizer vocabulary (id 0 = padding)
    max_words: int = 16  # S: captions are padded / truncated to this many tokens
    n_captions: int = 5  # C: captions per image (COCO has 5; the paper uses 8)
    text_width: int = 64  # T: width of the learned word embeddings (paper: frozen T5)
    sparse_coef: float = 0.1  # lambda, weight of the sparsity loss (paper: 0.1)
    consist_coef: float = 0.5  # beta, weight of the cross-layer consistency loss (paper: 0.5)
    # how patch-word similarities make the attention and the two losses. "paper": softmax of dot
    # products, losses on O (has trivial minima: notes/paper.md §2.5). Not in the paper (§5.1):
    # "cosine": attention = softmax over the words' cosines / cos_temp and a null word of cosine 0,
    # losses on O as the paper; "attention": the paper's attention, sparsity = its entropy, consistency
    # on it. Neither option kept O alive in its screening (notes/experiments.md §9)
    sim_mode: str = "paper"
    cos_temp: float = 0.1  # sim_mode "cosine": cosine logits' temperature (fixed: if learned, O could shrink)
    cond_layers: int = -1  # predictor layers with a conditioner, from the first; -1 = all (paper)
    text_pool: str = "word"  # "word": attend to each word (paper); "mean": one vector per caption
    # learned offsets on the conditioner's queries and keys (their Linear and LayerNorm biases). False:
    # none, as the paper's O = max(cos(W_Q q, W_K t), 0) writes it. It does not avoid the dead zone
    # (notes/experiments.md §8): the queries share a direction without any bias
    qk_bias: bool = True
    # conditioner MLP hidden = cond_mlp_ratio * P. The paper gives no width; with 4 (the blocks')
    # a conditioner costs about a predictor block; 1 halves its FLOPs (a faster step, notes/perf.md)
    cond_mlp_ratio: float = 4.0
    # loss
    pred_loss: str = "smooth_l1"  # "smooth_l1" (official I-JEPA code) or "l2" (I-JEPA paper)

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @classmethod
    def vit_b16(cls, **kw):
        """The paper's ViT-B/16 at 224 px (predictor 384 x 6, heads 12)."""
        base = dict(img_size=224, patch_size=16, width=768, depth=12, heads=12, pred_width=384,
                    pred_depth=6, text_width=384, vocab_size=8192, max_words=24, min_keep=10)
        return cls(**{**base, **kw})


# -----------------------------------------------------------------------------
# masks: I-JEPA multi-block sampling, vectorized over the batch


def _block_corners(B, M, h, w, grid, g, device):
    """Random top-left corners of M blocks of size h x w per image: (B, M) rows and cols.
    I-JEPA draws randint(0, grid - h), which never reaches the last row/col; we draw up to and
    including grid - h so every cell can be covered."""
    top = torch.randint(0, grid - h + 1, (B, M), generator=g, device=device)
    left = torch.randint(0, grid - w + 1, (B, M), generator=g, device=device)
    return top, left


def _block_size(scale, aspect, N, grid, g, device):
    """(h, w) of a block: scale and aspect are two independent draws (I-JEPA reuses one)."""
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g, device=device).item()
    a = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(1, generator=g, device=device).item()
    h = min(grid, max(1, round(math.sqrt(s * N * a))))
    w = min(grid, max(1, round(math.sqrt(s * N / a))))
    return h, w


def _block_union(top, left, h, w, grid):
    """Cells covered by any of M blocks of size h x w: (B, M) corners -> (B, grid*grid) bool.
    Cell (r, c) is covered iff some block covers row r AND column c, so the union is a sum over
    blocks of row x column indicator products: one batched matmul instead of a (B, M, N) boolean
    cover reduced with any() (faster, notes/perf.md)."""
    r = torch.arange(grid, device=top.device)
    rows = ((r >= top[..., None]) & (r < top[..., None] + h)).float()  # (B, M, grid)
    cols = ((r >= left[..., None]) & (r < left[..., None] + w)).float()  # (B, M, grid)
    return torch.einsum("bmr,bmc->brc", rows, cols).flatten(1) > 0  # (B, N)


def sample_masks(batch_size, cfg, generator=None, device=None, max_tries=20):
    """Multi-block masks as I-JEPA (notes/paper.md §1.2): returns patch indices
    ctx (B, Nc) and tgt (B, M, Nt), targets never in the context.

    Like I-JEPA, block SIZES are drawn once per batch and POSITIONS per image, so the shapes are
    rectangular. Unlike the official sampler (see notes/paper.md): every row/col is reachable,
    scale and aspect are independent, an image whose context has fewer than min_keep patches is
    redrawn (targets and context) up to max_tries times and otherwise keeps its largest draw
    (never overlapping), and contexts are cut to the batch minimum by a random subset, not in
    raster order (which would drop the bottom of the image); ctx comes in random order."""
    B, M, G, N = batch_size, cfg.n_targets, cfg.grid, cfg.grid**2
    g = generator
    th, tw = _block_size(cfg.target_scale, cfg.target_aspect, N, G, g, device)
    ch, cw = _block_size(cfg.context_scale, (1.0, 1.0), N, G, g, device)
    best_tops = best_ctx = best_n = None
    for _ in range(max_tries):  # retries are batched: each pass redraws every image at once
        tt, tl = _block_corners(B, M, th, tw, G, g, device)
        ct, cl = _block_corners(B, 1, ch, cw, G, g, device)
        ctx_mask = _block_union(ct, cl, ch, cw, G) & ~_block_union(tt, tl, th, tw, G)  # (B, N)
        n = ctx_mask.sum(1, dtype=torch.int32)  # (B,) context patches per image
        if best_ctx is None:
            best_tops, best_ctx, best_n = (tt, tl), ctx_mask, n
        else:  # keep, per image, the draw with the larger context (an accepted draw stays)
            better = (n > best_n) & (best_n < cfg.min_keep)
            best_ctx = torch.where(better[:, None], ctx_mask, best_ctx)
            best_n = torch.where(better, n, best_n)
            best_tops = tuple(torch.where(better[:, None], new, old) for new, old in zip((tt, tl), best_tops))
        if best_n.min() >= cfg.min_keep:
            break
    tt, tl = best_tops
    # target indices directly from the corners, raster order inside each block
    rr = tt[..., None, None] + torch.arange(th, device=tt.device)[:, None]  # (B, M, th, 1)
    cc = tl[..., None, None] + torch.arange(tw, device=tt.device)[None, :]  # (B, M, 1, tw)
    tgt = (rr * G + cc).flatten(-2)  # (B, M, Nt)
    # context: a random subset of each image's context patches, the batch minimum in size, in
    # random order (encoder and predictor are permutation-equivariant over tokens and positions
    # are gathered with the tokens, so the order is immaterial; a sort would cost a fifth of the sampler:
    # notes/perf.md)
    keep = int(best_n.min())
    score = torch.rand(B, N, generator=g, device=device).masked_fill(~best_ctx, -1.0)
    ctx = score.topk(keep, dim=1, sorted=False).indices  # (B, Nc)
    return ctx, tgt


# -----------------------------------------------------------------------------
# the ViT (I-JEPA's encoder and, narrower, its predictor)


def sincos_2d(grid, dim):
    """Fixed 2D sin-cos position embedding (MAE / I-JEPA): (grid*grid, dim), half per axis."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    out = [f(c.flatten()[:, None] * omega) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()  # (N, dim)


def gather_tokens(x, idx):
    """x (B, N, D), idx (B, K) -> (B, K, D): the tokens at the given patch indices."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.size(-1)))


def LayerNorm(dim, bias=True):
    return nn.LayerNorm(dim, eps=1e-6, bias=bias)  # I-JEPA's eps (torch's default is 1e-5)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # fused kernel on GPU (flash / mem-efficient)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = LayerNorm(dim), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """I-JEPA encoder: Conv2d patches + fixed sin-cos positions, pre-norm blocks, final LayerNorm,
    no [cls] token. With `keep` (B, K) it encodes only those patches (the context encoder)."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos", sincos_2d(cfg.grid, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.width)

    def forward(self, images, keep=None):
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        if keep is not None:  # I-JEPA masks after adding positions
            x = gather_tokens(x, keep)  # (B, K, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# -----------------------------------------------------------------------------
# text: tokens -> word embeddings, and the per-layer text conditioner


class TextEmbed(nn.Module):
    """Token ids (B, C, S) -> word features (B, C, S, T): learned embedding + learned position,
    LayerNorm. Deviation: the paper uses frozen T5 features; nothing can be downloaded here."""

    def __init__(self, cfg):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(cfg.max_words, cfg.text_width))  # drawn in TCJEPA.init_weights
        self.norm = LayerNorm(cfg.text_width, bias=cfg.qk_bias)  # the keys' input

    def forward(self, tokens):
        return self.norm(self.tok(tokens) + self.pos[: tokens.size(-1)])


class TextConditioner(nn.Module):
    """notes/paper.md §2.2: q <- q + softmax(q K^T) V over the words of each caption, for every
    predictor token (context and mask tokens), then a two-layer MLP with LayerNorm. Choices (§4):
    one head (the paper's similarity O is one number per token-word pair), 1/sqrt(P) scaling,
    pre-norm, no output projection, max-pool over captions BEFORE the MLP (C x cheaper).
    text_pool "mean" (ablation, caption-level conditioning): each caption is one mean word.
    sim_mode "cosine" (not in the paper, §5.1) builds the attention from the cosines themselves."""

    def __init__(self, cfg):
        super().__init__()
        P, self.pool, self.sim_mode, self.cos_temp = cfg.pred_width, cfg.text_pool, cfg.sim_mode, cfg.cos_temp
        self.norm_q = LayerNorm(P, bias=cfg.qk_bias)
        self.q, self.k = nn.Linear(P, P, bias=cfg.qk_bias), nn.Linear(cfg.text_width, P, bias=cfg.qk_bias)
        self.v = nn.Linear(cfg.text_width, P)
        self.norm2, self.mlp = LayerNorm(P), MLP(P, int(P * cfg.cond_mlp_ratio))

    def forward(self, x, words, word_mask):
        """x (B, Q, P) tokens of an image (all its M sequences side by side), words (B, C, S, T),
        word_mask (B, C, S) True for real words. Returns the new x, the rectified cosine
        patch-word similarities O (B, Q, C, S), zero at padding, the mean attention entropy over
        the words and the attention (B, C, Q, S) (S = 1 with text_pool "mean")."""
        if self.pool == "mean":  # one vector per caption: the mean of its words (K, V are affine: pool first)
            w = word_mask[..., None].float()  # (B, C, S, 1)
            words = (words * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)  # (B, C, 1, T)
            word_mask = word_mask.any(-1, keepdim=True)  # (B, C, 1)
        q = self.q(self.norm_q(x))  # (B, Q, P)
        k, v = self.k(words), self.v(words)  # (B, C, S, P)
        # captions lead, (B, C, Q, .): the values are then one batched matmul with no transposed
        # copies (with `max` below: a faster conditioner, notes/perf.md)
        dots = torch.einsum("bqp,bcsp->bcqs", q, k)  # (B, C, Q, S)
        # §2.4: O = max(cos(W_Q q, K), 0), from the same dot products: cos = q.k / (|q| |k|)
        cos = dots / (q.norm(dim=-1)[:, None, :, None] * k.norm(dim=-1)[:, :, None] + 1e-6)  # (B, C, Q, S)
        mask = word_mask[:, :, None]  # (B, C, 1, S)
        if self.sim_mode == "cosine":
            # §5.1: logits are the cosines / cos_temp, and a null word of cosine 0 (value 0) takes the
            # rest. The paper's softmax ignores a constant added to all of a query's logits, and
            # cosines can all go negative (O = 0) or shrink to 0 without changing it (§2.5); here both
            # move the weight from the words to the null word, so they cost the prediction its text.
            logits = (cos / self.cos_temp).masked_fill(~mask, float("-inf"))
            null = logits.new_zeros(logits.shape[:-1] + (1,))  # (B, C, Q, 1)
            att = torch.cat([logits, null], -1).softmax(-1)[..., :-1]  # (B, C, Q, S), sums to < 1
        else:
            # a caption with no words attends uniformly (masked to 0 below), instead of NaN
            att = dots.mul(q.size(-1) ** -0.5).masked_fill(~mask, float("-inf"))
            att = att.masked_fill(~mask.any(-1, keepdim=True), 0.0).softmax(-1)
        y = att @ v  # (B, C, Q, P): one conditioned token per caption
        # §2.3: max-pool the C conditioned tokens x + y_c; max_c (x + y_c) = x + max_c y_c, so pool y.
        # Padded captions never win. max (not amax): its backward is a scatter, not an equality test.
        has_words = word_mask.any(-1)[:, :, None, None]  # (B, C, 1, 1)
        y = y.masked_fill(~has_words, float("-inf")).max(1).values  # (B, Q, P)
        y = torch.where(has_words.any(1), y, 0.0)  # an image with no caption gets no text
        x = x + y
        x = x + self.mlp(self.norm2(x))
        with torch.no_grad():  # diagnostic: entropy (nats) of the attention over the words of real captions
            p = att / att.sum(-1, keepdim=True).clamp(min=1e-12)  # (the null word of "cosine" left out)
            ent = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, C, Q)
            ent = (ent * has_words[..., 0]).sum() / (has_words.sum() * ent.size(2)).clamp(min=1)
        return x, (cos.clamp(min=0) * mask).transpose(1, 2), ent, att  # O as (B, Q, C, S)


def text_losses(sims, word_mask, entropy=False):
    """notes/paper.md §2.4, on the similarities of all layers: sims (Lyr, B, Q, C, S).
    L_sparse = mean over tokens and captions of (1/Lyr) sum_l ||O^l||_1
    L_consist = mean over tokens and captions of (1/Lyr) sum_l ||O^l - mean_l O^l||_1
    entropy=True (sim_mode "attention", §5.1): sims is the attention, and the entropy of each
    layer's attention replaces ||O^l||_1 (the L1 of a distribution is always 1).
    Only real captions count (padded words are already 0 in sims)."""
    has_words = word_mask.any(-1)[:, None, :].float()  # (B, 1, C)
    denom = (has_words.sum() * sims.size(2)).clamp(min=1)  # number of (token, caption) pairs
    if entropy:
        sparse = -(sims * sims.clamp(min=1e-12).log()).sum(-1).mean(0)  # (B, Q, C): nats, mean over layers
    else:
        sparse = sims.sum(-1).mean(0)  # (B, Q, C): L1 over words, mean over layers
    consist = (sims - sims.mean(0)).abs().sum(-1).mean(0)  # (B, Q, C)
    return (sparse * has_words).sum() / denom, (consist * has_words).sum() / denom


# -----------------------------------------------------------------------------
# the predictor


class Predictor(nn.Module):
    """I-JEPA predictor: Linear(D->P) on context features + positions, one mask token per target
    patch (shared vector + position), ViT blocks, LayerNorm, Linear(P->D) on the mask tokens.
    The M target blocks are M sequences of one batched call (context repeated per block). With
    text_cond == "cross" every block (paper; or the first cond_layers) is followed by a
    TextConditioner."""

    def __init__(self, cfg):
        super().__init__()
        P = cfg.pred_width
        self.embed = nn.Linear(cfg.width, P)
        self.mask_token = nn.Parameter(torch.zeros(P))  # drawn in TCJEPA.init_weights
        self.register_buffer("pos", sincos_2d(cfg.grid, P), persistent=False)
        self.blocks = nn.ModuleList(Block(P, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.pred_depth))
        n_cond = cfg.pred_depth if cfg.cond_layers < 0 else cfg.cond_layers
        n_cond = 0 if cfg.text_cond == "none" else n_cond
        self.conds = nn.ModuleList(TextConditioner(cfg) for _ in range(n_cond))
        self.norm, self.proj = LayerNorm(P), nn.Linear(P, cfg.width)

    def forward(self, z, ctx, tgt, words=None, word_mask=None, return_attention=False):
        """z (B, Nc, D) context features at ctx (B, Nc); tgt (B, M, Nt). Returns predictions
        (B*M, Nt, D) (image-major, block inner: the order of tgt.flatten(0, 1)), the similarities
        (layers, B, M*L, C, S), the mean attention entropy and, if asked, the word attention
        (layers, B, C, M*L, S) (each None without text)."""
        (B, Nc), (M, Nt) = ctx.shape, tgt.shape[1:]
        x = self.embed(z) + self.pos[ctx]  # (B, Nc, P)
        x = x.repeat_interleave(M, 0)  # (B*M, Nc, P): the context, once per target block
        m = self.mask_token + self.pos[tgt.flatten(0, 1)]  # (B*M, Nt, P)
        x = torch.cat([x, m], 1)  # (B*M, L, P)
        sims, ents, atts = [], [], []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.conds) and words is not None:
                # text is per image: put an image's M sequences side by side as one query set
                x, s, e, a = self.conds[i](x.view(B, -1, x.size(-1)), words, word_mask)  # (B, M*L, P)
                x = x.view(B * M, -1, x.size(-1))  # (B*M, L, P)
                sims.append(s)
                ents.append(e)
                atts.append(a)
        x = self.proj(self.norm(x[:, Nc:]))  # (B*M, Nt, D): keep the mask tokens only
        if not sims:
            return x, None, None, None
        return x, torch.stack(sims), torch.stack(ents).mean(), torch.stack(atts) if return_attention else None


# -----------------------------------------------------------------------------
# the model


class TCJEPA(nn.Module):
    """Context encoder, EMA target encoder, text embedding and predictor; forward returns the losses."""

    def __init__(self, cfg):
        super().__init__()
        for k, allowed in CHOICES.items():
            assert getattr(cfg, k) in allowed, f"{k} must be one of {allowed}, got {getattr(cfg, k)!r}"
        assert cfg.cond_layers == -1 or 1 <= cfg.cond_layers <= cfg.pred_depth, "cond_layers: -1 or 1..depth"
        self.cfg = cfg
        # the one draw from torch's global generator, before any module is built: torch.manual_seed(s)
        # before TCJEPA(cfg) fixes the init (the modules' own default init is overwritten below)
        seed = int(torch.randint(0, 2**62, (1,)))
        self.encoder = ViT(cfg)  # context encoder f_theta, trained
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)  # EMA f_theta_bar, no grads
        self.text = TextEmbed(cfg) if cfg.text_cond == "cross" else None
        self.predictor = Predictor(cfg)
        self.init_weights(seed)
        self.target.load_state_dict(self.encoder.state_dict())  # start as an exact copy

    @torch.no_grad()
    def init_weights(self, seed):
        """I-JEPA's init as its training runs apply it: trunc-normal std 0.02 for linear / conv
        weights, the mask token and the word positions, zero biases, N(0, 1) word embeddings. (Its
        model classes also divide attn.proj and mlp.fc2 by sqrt(2 x layer id), but its training
        entry point redraws every linear weight afterwards: notes/paper.md §5.3.) Each tensor is drawn
        from its own generator seeded by (seed, its name), so the encoder and the predictor blocks
        start the same for one seed whatever text modules exist: I-JEPA and
        TC-JEPA runs are paired (notes/paper.md §5)."""
        def gen(name):
            return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))

        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, generator=gen(name))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=gen(name))
                m.weight[m.padding_idx].zero_()
        nn.init.trunc_normal_(self.predictor.mask_token, std=0.02, generator=gen("predictor.mask_token"))
        if self.text is not None:
            nn.init.trunc_normal_(self.text.pos, std=0.02, generator=gen("text.pos"))

    def predict(self, images, ctx, tgt, tokens=None, word_mask=None, return_attention=False):
        """The forward pass without the losses: images (B, 3, H, W), ctx (B, Nc), tgt (B, M, Nt),
        tokens / word_mask (B, C, S). Returns dict(pred, targets (B*M, Nt, D) each, sims
        (layers, B, M*L, C, S), attn_entropy, attention (layers, B, C, M*L, S) if asked); the text
        entries are None without text. The losses, the grounding probe and figures read this."""
        B, M, Nt = tgt.shape
        with torch.no_grad():  # §1.3 targets: last layer of the EMA encoder, layer-normed again
            h = self.target(images)  # (B, N, D)
            h = F.layer_norm(h, h.shape[-1:])
            targets = gather_tokens(h, tgt.flatten(1)).view(B * M, Nt, -1)  # (B*M, Nt, D)
        z = self.encoder(images, ctx)  # (B, Nc, D)
        words = self.text(tokens) if (self.text is not None and tokens is not None) else None
        pred, sims, ent, att = self.predictor(z, ctx, tgt, words, word_mask, return_attention)
        return dict(pred=pred, targets=targets, sims=sims, attn_entropy=ent, attention=att)

    def forward(self, images, ctx, tgt, tokens=None, word_mask=None):
        """Returns a dict of scalar losses: loss (the total), loss_pred, loss_sparse, loss_consist,
        plus three detached diagnostics of the text path (notes/paper.md §2.5): pos_frac, the
        share of positive patch-word cosines; pos_cos, the mean of the positive ones (a share can
        stay put while every cosine shrinks to 0); attn_entropy, the mean word-attention entropy.
        Arguments as predict."""
        entropy = self.cfg.sim_mode == "attention"  # its losses are on the attention (§5.1)
        out = self.predict(images, ctx, tgt, tokens, word_mask, return_attention=entropy)
        pred, targets, sims = out["pred"], out["targets"], out["sims"]
        if self.cfg.pred_loss == "l2":  # I-JEPA paper: squared L2 per patch, averaged (§1.5)
            loss_pred = (pred.float() - targets).pow(2).sum(-1).mean()
        else:  # official I-JEPA code: smooth-L1 (beta 1) averaged over all elements
            loss_pred = F.smooth_l1_loss(pred.float(), targets)
        zero = loss_pred.new_zeros(())
        if sims is None:
            loss_sparse = loss_consist = pos_frac = pos_cos = attn_entropy = zero
        else:
            if self.cfg.text_pool == "mean":  # the conditioners saw one pooled word per caption
                word_mask = word_mask.any(-1, keepdim=True)  # (B, C, 1)
            reg = out["attention"].transpose(2, 3) if entropy else sims  # (layers, B, M*L, C, S)
            if self.cfg.sparse_coef == 0 and self.cfg.consist_coef == 0:
                reg = reg.detach()  # unweighted losses are only logged: no backward (notes/perf.md)
            loss_sparse, loss_consist = text_losses(reg.float(), word_mask, entropy)
            n_pos = (sims > 0).sum()
            pos_frac = (n_pos / (word_mask.sum() * sims.size(0) * sims.size(2)).clamp(min=1)).detach()
            pos_cos = (sims.detach().float().sum() / n_pos.clamp(min=1))
            attn_entropy = out["attn_entropy"]
        loss = loss_pred + self.cfg.sparse_coef * loss_sparse + self.cfg.consist_coef * loss_consist
        return dict(loss=loss, loss_pred=loss_pred, loss_sparse=loss_sparse, loss_consist=loss_consist,
                    pos_frac=pos_frac, pos_cos=pos_cos, attn_entropy=attn_entropy)

    @torch.no_grad()
    def update_target(self, momentum):
        """EMA: target <- momentum * target + (1 - momentum) * encoder, fused over all tensors."""
        tgt, src = list(self.target.parameters()), list(self.encoder.parameters())
        torch._foreach_lerp_(tgt, src, 1.0 - momentum)

    @torch.no_grad()
    def encode(self, images):
        """Frozen features for probes: the TARGET encoder's patch features (B, N, D), as I-JEPA."""
        return self.target(images)

    def flops_per_image(self, n_ctx, n_tgt):
        """Matmul FLOPs of one training step per image (nanoGPT-style estimate: 2 per multiply-add,
        backward = 2x forward). n_ctx / n_tgt: context patches and patches per target block."""
        c = self.cfg
        D, P, N, M, C, T = c.width, c.pred_width, c.grid**2, c.n_targets, c.n_captions, c.text_width
        S = 1 if c.text_pool == "mean" else c.max_words
        hid, phid, chid = int(D * c.mlp_ratio), int(P * c.mlp_ratio), int(P * c.cond_mlp_ratio)

        def vit(L, W, h):  # forward FLOPs of one pre-norm block on L tokens of width W
            return 2 * L * (4 * W * W + 2 * W * h) + 2 * 2 * L * L * W

        patch = 2 * N * D * c.in_chans * c.patch_size**2
        target = patch + c.depth * vit(N, D, hid)  # forward only, no grad
        context = patch + c.depth * vit(n_ctx, D, hid)
        L = n_ctx + n_tgt
        pred = 2 * n_ctx * D * P + M * (c.pred_depth * vit(L, P, phid) + 2 * n_tgt * P * D)
        if c.text_cond == "cross":
            Q = M * L  # tokens that query the words, per image
            per_layer = 2 * Q * P * P + 2 * 2 * C * S * T * P + 2 * 2 * Q * C * S * P + 2 * Q * 2 * P * chid
            pred += len(self.predictor.conds) * per_layer
        return target + 3 * (context + pred)
