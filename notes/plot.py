"""
One picture of a run, from its log.jsonl: what to watch over a long run.

  python notes/plot.py out/log.jsonl                  # writes out/log.png
  python notes/plot.py out/log.jsonl --out run.png

Panels: the training loss and its parts (prediction, sparsity, consistency); the validation
prediction loss with true, shuffled and no captions (the text is used when true < shuffled); every
probe of the evaluations, dotted at its value for the same encoder at initialization; RankMe (a
collapse shows as a fall towards 1); the text path: pos_frac (share of positive patch-word cosines),
pos_cos (their mean size), attention entropy, and the grounding probe with its chance rate where the
log has it. Needs matplotlib (pip install matplotlib), which training does not.
"""

import argparse
import json
import math
import os

PROBE_SKIP = {"step", "val_true", "val_shuffled", "val_none", "probe_s", "rankme", "ground_chance", "ground_pairs"}


def read(path):
    """(train records, eval records, init probes) of a log; damaged lines are left out."""
    train, evals, init = {}, {}, {}
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step", 0), int):
            continue
        if "init_probes" in r:
            init = r["init_probes"]
        elif "val_true" in r:
            evals[r["step"]] = r
        elif "loss" in r:
            train[r["step"]] = r  # a resumed run's re-logged step keeps its last record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)], init


def series(recs, key):
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(path, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals, init = read(path)
    if not train:
        raise SystemExit(f"error: {path} has no training records: give a run's log.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(18, 8.5))
    ax = axes.flatten()
    for key, style in (("loss", "-"), ("loss_pred", "--"), ("loss_sparse", "-."), ("loss_consist", ":")):
        ax[0].plot(*series(train, key), style, label=key)
    ax[0].set(title="training loss and its parts", xlabel="step", yscale="log")
    for key, color in (("val_true", "tab:green"), ("val_shuffled", "tab:red"), ("val_none", "tab:gray")):
        ax[1].plot(*series(evals, key), "o-", color=color, label=key)
    ax[1].set(title="val prediction loss, fixed masks (text used: true < shuffled)", xlabel="step", yscale="log")
    probes = [k for k in (evals[-1] if evals else {}) if k not in PROBE_SKIP and not k.startswith("ground")
              and isinstance(evals[-1][k], (int, float))]
    for k, color in zip(probes, plt.cm.tab10.colors):
        ax[2].plot(*series(evals, k), "o-", color=color, label=k)
        if isinstance(init.get(k), (int, float)):
            ax[2].axhline(init[k], color=color, ls=":", lw=1)
    ax[2].set(title="probes (dotted: the same encoder at init)", xlabel="step")
    ax[3].plot(*series(evals, "rankme"), "o-", label="trained")
    if isinstance(init.get("rankme"), (int, float)):
        ax[3].axhline(init["rankme"], ls=":", color="tab:blue", label="at init")
    ax[3].set(title="RankMe of pooled val features (collapse: towards 1)", xlabel="step")
    for key in ("pos_frac", "pos_cos"):
        ax[4].plot(*series(train, key), label=key)
    ax[4].plot(*series(train, "attn_entropy"), label="attn_entropy (nats)")
    ax[4].set(title="patch-word cosines: share positive, mean positive; attention entropy", xlabel="step",
              yscale="symlog", ylim=(0, 4))
    ax[4].set_yscale("symlog", linthresh=1e-3)
    for key, color in (("ground_o", "tab:brown"), ("ground_attn", "tab:pink"), ("ground_o_auc", "tab:olive"),
                       ("ground_attn_auc", "tab:cyan")):
        if series(evals, key)[0]:
            ax[5].plot(*series(evals, key), "o-", color=color, label=key)
    if series(evals, "ground_chance")[0]:
        ax[5].plot(*series(evals, "ground_chance"), "k:", label="chance (top-1)")
        ax[5].axhline(0.5, color="gray", lw=0.6, ls="--", label="chance (AUC)")
    ax[5].set(title="grounding: top word is the object's (shapes data)", xlabel="step", ylim=(0, 1))
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="best")
    fig.suptitle(os.path.abspath(path), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a run's log.jsonl")
    p.add_argument("--out", default=None, help="the PNG to write (default: beside the log, log.png)")
    a = p.parse_args()
    if not os.path.isfile(a.log):
        raise SystemExit(f"error: {a.log} is not a file: give a run's log.jsonl")
    plot(a.log, a.out or os.path.splitext(a.log)[0] + ".png")
