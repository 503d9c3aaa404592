"""
Tables and curves of notes/experiments.md from the logs that notes/run_experiments.sh writes.

  python notes/report.py             # from the committed logs, notes/runs/<name>.jsonl
  python notes/report.py runs        # from a fresh rerun, runs/<name>/log.jsonl
  python notes/report.py --mech      # only the pre-registered test of notes/experiments.md §7 and its verdict
  python notes/report.py --dead      # only the dead-zone test of notes/experiments.md §8 (+ <run>.dead.json
                                     # from python notes/dead_zone.py runs/<run>/ckpt.pt)
  python notes/report.py --sim       # only the remedies of notes/experiments.md §9, their verdict, notes/sim_curves.png
  python notes/report.py --power     # §7's paired interval, and how often its rule A passes a true +0.02 effect
  python notes/report.py --claims    # the two claims of notes/experiments.md §10, verdicts, claim1.png, claim2.png

The committed logs are those of sections 7-9; the tables of sections 1-6 need a rerun (their logs were
not kept, and some §8 runs share their names with §1 runs made under an earlier init), so plain
`python notes/report.py` prints sections 7-9 and `python notes/report.py runs` every section.

A run that has not finished is reported as missing, never guessed. The first record of a log (the
run's config) and any record without results are skipped. matplotlib is needed for the curves only.
"""

import json
import os
import statistics
import sys

import plot  # notes/plot.py: the log reader both share

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = ["dense_shape", "dense_shape_obj", "dense_color", "img_shape_ap", "img_color_ap", "img_count_acc"]
VAL = ["val_true", "val_shuffled", "val_none"]


def log_path(runs, name):
    for path in (os.path.join(runs, f"{name}.jsonl"), os.path.join(runs, name, "log.jsonl")):
        if os.path.exists(path):
            return path
    return None


def load(runs, name):
    """-> (train records, eval records, init probes) or None if the run has not finished."""
    path = log_path(runs, name)
    if path is None:
        return None
    # plot.read skips a line cut short (a run still writing) and keeps the last record of a step (a run
    # resumed by a train.py older than its log trimming logged the steps after its checkpoint twice)
    train, evals, init = plot.read(path)
    return (train, evals, init) if init else None


def step_minutes(train):
    """Minutes spent in training steps (evaluation and saving excluded), from each record's ms_per_step."""
    steps = [r["step"] for r in train]
    return sum(r["ms_per_step"] * (s - p) for r, s, p in zip(train, steps, [0] + steps[:-1])) / 60e3


def fmt(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def row(label, finals, keys, n):
    return f"| {label} | {n} | " + " | ".join(fmt([f[k] for f in finals]) for k in keys) + " |"


def group(runs, names):
    done = [load(runs, n) for n in names]
    return [d for d in done if d is not None]


def main(runs):
    out = []
    seeds = [0, 1, 2]
    # --- main comparison: random init, I-JEPA, TC-JEPA, TC-JEPA on shuffled captions
    ij, tc, sh, m1 = (group(runs, [f"{p}_s{s}" for s in seeds]) for p in ("ijepa", "tc", "shuf", "tc_mlp1"))
    init = [d[2] for d in ij + tc + sh]  # the same init per seed: every run measures it
    keys = PROBES + VAL
    out.append("| model | runs | " + " | ".join(keys) + " |")
    out.append("|---|---|" + "---|" * len(keys))
    out.append(f"| random init | {len(init)} | " + " | ".join(fmt([i[k] for i in init]) if k in PROBES else "-"
                                                          for k in keys) + " |")
    for label, g in (("I-JEPA", ij), ("TC-JEPA", tc), ("TC-JEPA, shuffled captions", sh),
                     ("TC-JEPA, --cond_mlp_ratio 1", m1)):
        out.append(row(label, [d[1][-1] for d in g], keys, len(g)))
    # --- the long regime (--preset shapes_long, 4000 steps)
    out.append("")
    lij, ltc = (group(runs, [f"long_{p}_s{s}" for s in seeds]) for p in ("ijepa", "tc"))
    linit = [d[2] for d in lij + ltc]
    out.append("| model, 4000 steps | runs | " + " | ".join(keys) + " |")
    out.append("|---|---|" + "---|" * len(keys))
    out.append(f"| random init | {len(linit)} | " + " | ".join(fmt([i[k] for i in linit]) if k in PROBES else "-"
                                                           for k in keys) + " |")
    for label, g in (("I-JEPA", lij), ("TC-JEPA", ltc), ("I-JEPA, EMA 0.996 -> 1.0", group(runs, ["long_ijepa_ema_s0"]))):
        out.append(row(label, [d[1][-1] for d in g], keys, len(g)))
    # --- ablations and the lambda / beta sweep (seed 0)
    out.append("")
    keys2 = PROBES + VAL + ["pos_frac", "attn_entropy"]
    out.append("| run (seed 0) | runs | " + " | ".join(keys2) + " |")
    out.append("|---|---|" + "---|" * len(keys2))
    for label, name in (("TC-JEPA, lambda = beta = 0", "tc_s0"), ("TC-JEPA, paper's lambda 0.1, beta 0.5", "tc_paper_s0"),
                        ("TC-JEPA, lambda 0.1, beta 0", "tc_sparse_s0"), ("TC-JEPA, lambda 0, beta 0.5", "tc_consist_s0"),
                        ("TC-JEPA, lambda 0.01, beta 0.05", "tc_tenth_s0"),
                        ("one conditioned layer", "tc_onelayer_s0"), ("captions mean-pooled", "tc_meanpool_s0")):
        d = load(runs, name)
        if d is None:
            out.append(f"| {label} | 0 | " + " | ".join("-" for _ in keys2) + " |")
            continue
        final = {**d[1][-1], **{k: statistics.mean(r[k] for r in d[0][-6:]) for k in ("pos_frac", "attn_entropy")}}
        out.append(row(label, [final], keys2, 1))
    # --- stability over target block scales (seed 0)
    out.append("")
    out.append("| target scale | I-JEPA dense_shape | TC-JEPA dense_shape | I-JEPA dense_shape_obj | TC-JEPA dense_shape_obj |")
    out.append("|---|---|---|---|---|")
    for label, suffix in (("(0.10, 0.15)", "small_s0"), ("(0.15, 0.20) default", "s0"), ("(0.20, 0.25)", "large_s0")):
        a, b = load(runs, f"ijepa_{suffix}"), load(runs, f"tc_{suffix}")
        cells = [fmt([d[1][-1][k]]) if d else "-" for k in ("dense_shape", "dense_shape_obj") for d in (a, b)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    curves(runs)


def pyplot():
    """matplotlib.pyplot without a display, or None (then the figures are skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no figures)")
        return None
    return plt


def curves(runs):
    if not all(load(runs, f"{name}_s{s}") for name in ("ijepa", "tc") for s in (0, 1, 2)):
        print("(I-JEPA and TC-JEPA seeds 0-2 not all there: notes/curves.png left as it is)")
        return
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for name, color in (("ijepa", "tab:blue"), ("tc", "tab:orange"), ("shuf", "tab:gray")):
        for s in (0, 1, 2):
            d = load(runs, f"{name}_s{s}")
            if d is None:
                continue
            train, evals, init = d
            label = {"ijepa": "I-JEPA", "tc": "TC-JEPA", "shuf": "TC-JEPA, shuffled captions"}[name] if s == 0 else None
            ax[0].plot([r["step"] for r in train], [r["loss_pred"] for r in train], color=color, alpha=0.7, label=label)
            steps = [0] + [r["step"] for r in evals]
            ax[1].plot(steps, [init["dense_shape"]] + [r["dense_shape"] for r in evals], "o-", color=color, alpha=0.7,
                       label=label)
            if name != "ijepa":
                ax[2].plot([r["step"] for r in evals], [r["val_true"] for r in evals], "o-", color=color, alpha=0.7,
                           label=f"{label}: true captions" if label else None)
                ax[2].plot([r["step"] for r in evals], [r["val_shuffled"] for r in evals], "x--", color=color, alpha=0.7,
                           label=f"{label}: shuffled captions" if label else None)
    for name, color in (("long_ijepa", "tab:blue"), ("long_tc", "tab:orange")):
        for s in (0, 1, 2):
            d = load(runs, f"{name}_s{s}")
            if d is not None:
                steps = [0] + [r["step"] for r in d[1]]
                ax[3].plot(steps, [d[2]["dense_shape"]] + [r["dense_shape"] for r in d[1]], "o-", color=color,
                           alpha=0.7, label=("I-JEPA" if name == "long_ijepa" else "TC-JEPA") if s == 0 else None)
    ax[3].set(title="dense shape probe, --preset shapes_long", xlabel="step")
    ax[0].set(title="training prediction loss", xlabel="step", yscale="log")
    ax[1].set(title="dense shape probe (val, mean per-class acc.)", xlabel="step")
    ax[2].set(title="val prediction loss, fixed masks", xlabel="step", yscale="log")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=110)
    print("wrote notes/curves.png")


# -----------------------------------------------------------------------------
# notes/experiments.md §7: complement vs substitute captions, pre-registered

ARMS = (("I-JEPA", "mech_ijepa", 3), ("TC-complement", "mech_comp", 3), ("TC-substitute", "mech_sub", 2),
        ("TC-complement, shuffled captions", "mech_shuf", 2))
GAINS = ("dense_shape_obj", "obj_shape", "img_shape_ap")  # primary first


def mech(runs):
    """The §7 table (gain = final - the same seed's encoder at init) and the verdict by the rule as written."""
    arms = {}
    for label, prefix, n in ARMS:
        arms[prefix] = {}
        for s in range(n):
            d = load(runs, f"{prefix}_s{s}")
            if d is not None and d[1] and d[1][-1]["step"] == 3000:
                final, init = d[1][-1], d[2]
                diag_path = os.path.join(runs, f"{prefix}_s{s}.diag.json")
                diag = json.load(open(diag_path)) if os.path.exists(diag_path) else {}
                arms[prefix][s] = dict(gain={k: final[k] - init[k] for k in GAINS}, final=final, diag=diag,
                                       minutes=step_minutes(d[0]))
    cols = [f"gain {k}" for k in GAINS] + VAL + ["elimination_ratio", "loss_object", "loss_background"]
    out = ["| arm | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, prefix, n in ARMS:
        r = arms[prefix]
        cells = [fmt([x["gain"][k] for x in r.values()]) for k in GAINS]
        cells += [fmt([x["final"][k] for x in r.values()]) for k in VAL]
        cells += [fmt([x["diag"][k] for x in r.values() if k in x["diag"]])
                  for k in ("elimination_ratio", "loss_object", "loss_background")]
        out.append(f"| {label} | {len(r)} of {n} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("per seed, gain dense_shape_obj: " + "; ".join(
        f"{prefix} " + ", ".join(f"s{s} {x['gain']['dense_shape_obj']:+.3f}" for s, x in sorted(arms[prefix].items()))
        for _, prefix, _ in ARMS))
    out.append("minutes in training steps: " + "; ".join(
        f"{prefix} " + ", ".join(f"{x['minutes']:.0f}" for _, x in sorted(arms[prefix].items())) for _, prefix, _ in ARMS))
    out.append("")
    out.append("verdict: " + verdict(arms))
    print("\n".join(out))
    mech_figure(arms)


def mech_figure(arms):
    """notes/mech_gains.png: each seed's gain per arm, a line joining the same seed (paired) across arms."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, len(GAINS), figsize=(5 * len(GAINS), 3.8))
    labels = [label for label, _, _ in ARMS]
    for a, k in zip(ax, GAINS):
        for s, color in zip(range(3), ("tab:blue", "tab:orange", "tab:green")):
            xs = [i for i, (_, p, _) in enumerate(ARMS) if s in arms[p]]
            ys = [arms[ARMS[i][1]][s]["gain"][k] for i in xs]
            a.plot(xs, ys, "o-", color=color, alpha=0.8, label=f"seed {s}")
        a.axhline(0, color="gray", lw=0.8)
        a.set_xticks(range(len(labels)), [lb.replace(", ", ",\n") for lb in labels], fontsize=8)
        a.set(title=f"gain {k} (step 3000 - init)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mech_gains.png"), dpi=110)
    print("wrote notes/mech_gains.png")


def verdict(arms):
    """The decision rule of notes/experiments.md §7, applied as written."""
    need = {p: n for _, p, n in ARMS}
    missing = [f"{p}_s{s}" for p, n in need.items() for s in range(n) if s not in arms[p]]
    if any(s not in arms["mech_comp"] for s in range(3)):
        return f"incomplete: missing {', '.join(missing)}"
    comp, ij, sub, shuf = (arms[p] for p in ("mech_comp", "mech_ijepa", "mech_sub", "mech_shuf"))
    mean = statistics.mean
    vt, vs = mean(x["final"]["val_true"] for x in comp.values()), mean(x["final"]["val_shuffled"] for x in comp.values())
    if not vt <= 0.8 * vs:
        return f"manipulation check failed (val_true {vt:.4f} > 0.8 x val_shuffled {vs:.4f}): shape words unused: inconclusive"
    lines = [f"manipulation check passed (TC-complement val_true {vt:.4f} <= 0.8 x val_shuffled {vs:.4f})"]
    g = lambda arm, s: arm[s]["gain"]["dense_shape_obj"]  # noqa: E731
    have = lambda arm, n: all(s in arm for s in range(n))  # noqa: E731
    # A: every condition that the finished runs can decide; A holds only if all hold
    conds = []
    if have(ij, 3):
        diff = mean(g(comp, s) for s in range(3)) - mean(g(ij, s) for s in range(3))
        conds.append((f"gain complement - I-JEPA {diff:+.3f} >= +0.02", diff >= 0.02))
        paired = [g(comp, s) - g(ij, s) for s in range(3)]
        conds.append((f"paired differences {', '.join(f'{d:+.3f}' for d in paired)} all > 0", all(d > 0 for d in paired)))
    conds.append((f"gain complement {mean(g(comp, s) for s in range(3)):+.3f} > 0", mean(g(comp, s) for s in range(3)) > 0))
    if have(shuf, 2):
        d = [g(comp, s) - g(shuf, s) for s in range(2)]
        conds.append((f"complement - shuffled {', '.join(f'{x:+.3f}' for x in d)} >= +0.02", all(x >= 0.02 for x in d)))
    failed = [c for c, ok in conds if not ok]
    complete = have(ij, 3) and have(shuf, 2)
    a = complete and not failed
    state = "does not hold" if failed else ("holds" if a else "undecided, runs missing")
    lines.append(f"A (the paper's direction): {state} ({'; '.join(f'{c}: {ok}' for c, ok in conds)})")
    # B: needs the substitute and the shuffled arms
    if not (have(sub, 2) and have(shuf, 2) and have(ij, 2)):
        lines.append(f"B (the caption stands in): undecided, missing {', '.join(m for m in missing if 'sub' in m or 'shuf' in m)}")
        return "; ".join(lines)
    b = (all(g(sub, s) - g(ij, s) <= -0.02 for s in range(2))
         and abs(mean(g(shuf, s) for s in range(2)) - mean(g(ij, s) for s in range(2))) < 0.02)
    lines.append(f"B (the caption stands in): {'holds' if b else 'does not hold'} (substitute - I-JEPA "
                 f"{', '.join(f'{g(sub, s) - g(ij, s):+.3f}' for s in range(2))}; |shuffled - I-JEPA| "
                 f"{abs(mean(g(shuf, s) for s in range(2)) - mean(g(ij, s) for s in range(2))):.3f})")
    if not (a or b) and complete:
        lines.append("otherwise: no effect at this scale")
    return "; ".join(lines)


# -----------------------------------------------------------------------------
# notes/experiments.md §8: the paper's lambda / beta with and without offsets on the queries and keys

DEAD_RUNS = (("lambda = beta = 0", "tc_s0"), ("paper's lambda 0.1, beta 0.5", "tc_paper_s0"),
             ("paper's lambda 0.1, beta 0.5, --qk_bias false", "tc_paper_nobias_s0"),
             ("queries and keys centred (commit 9798b9d), lambda = beta = 0", "tc_center_s0"),
             ("queries and keys centred (commit 9798b9d), paper's lambda 0.1, beta 0.5", "tc_paper_center_s0"))
DEAD_STEPS = (25, 100, 175, 500, 1000, 1500)  # pos_frac as logged at these steps (each a mean over 25 steps)


def dead(runs):
    cone_keys = ("q_cone", "k_cone", "cos_means", "pos_frac_centered", "q_spread")  # notes/dead_zone.py, mean over layers
    cols = [f"pos_frac @{s}" for s in DEAD_STEPS] + ["first step < 0.001", "max after step 100", "attn_entropy (end)", "val_true", "val_shuffled", "val_none",
                                                     "dense_shape_obj", "img_shape_ap", "rankme", *cone_keys]
    out = ["| run (seed 0, 1500 steps) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, name in DEAD_RUNS:
        d = load(runs, name)
        if d is None:
            out.append(f"| {label} | " + " | ".join("not run" if i == 0 else "-" for i in range(len(cols))) + " |")
            continue
        train, evals = d[0], d[1]
        by_step = {r["step"]: r for r in train}
        cells = [f"{by_step[s]['pos_frac']:.4f}" if s in by_step else "-" for s in DEAD_STEPS]
        cells.append(str(next((r["step"] for r in train if r["pos_frac"] < 1e-3), "never")))
        cells.append(f"{max(r['pos_frac'] for r in train if r['step'] > 100):.4f}")
        cells.append(fmt([statistics.mean(r["attn_entropy"] for r in train[-6:])]))  # the last 150 steps
        cells += [fmt([evals[-1][k]]) for k in VAL + ["dense_shape_obj", "img_shape_ap", "rankme"]]
        cone_path = os.path.join(runs, f"{name}.dead.json")
        layers = json.load(open(cone_path))["layers"] if os.path.exists(cone_path) else []
        cells += [fmt([statistics.mean(r[k] for r in layers)]) if layers and k in layers[0] else "-" for k in cone_keys]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(out))


# -----------------------------------------------------------------------------
# notes/experiments.md §9: remedies for the loss's trivial minima, pre-registered

SIM = (("the paper as written", "sim_paper"), ("lambda = beta = 0", "sim_zero"), ("remedy cosine", "sim_cosine"),
       ("remedy attention", "sim_attn"))
SIM_SEEDS = (0, 1)


def window(train, lo, hi, key):
    """Mean of a logged value over the records at steps lo..hi."""
    vals = [r[key] for r in train if lo <= r["step"] <= hi and key in r]
    return statistics.mean(vals) if vals else float("nan")


def sim_measures(runs, prefix, seed):
    d = load(runs, f"{prefix}_s{seed}")
    if d is None or not d[1] or d[1][-1]["step"] != 1500:
        return None
    train, evals = d[0], d[1]
    return dict(final=evals[-1], evals=evals, train=train, pos_cos_mid=window(train, 425, 500, "pos_cos"),
                pos_cos_end=window(train, 1425, 1500, "pos_cos"), pos_frac_end=window(train, 1425, 1500, "pos_frac"),
                loss_pred_end=window(train, 1425, 1500, "loss_pred"), minutes=step_minutes(train))


def sim_conditions(m, ref):
    """The four conditions of the §9 rule for one run (m) against sim_zero of the same seed (ref)."""
    f, r = m["final"], ref["final"]
    return {
        "1 O alive": m["pos_cos_end"] >= 0.05 and m["pos_cos_end"] >= 0.5 * m["pos_cos_mid"] and m["pos_frac_end"] >= 0.01,
        "2 grounded": (f["ground_o"] >= f["ground_chance"] + 0.10 and f["ground_attn"] >= f["ground_chance"] + 0.10
                       and f["ground_o_auc"] >= 0.60 and f["ground_attn_auc"] >= 0.60),
        "3 text used": f["val_true"] <= 0.8 * f["val_shuffled"],
        "4 no collapse": f["rankme"] >= 0.8 * r["rankme"] and m["loss_pred_end"] >= 0.25 * ref["loss_pred_end"],
    }


def sim(runs):
    """The §9 table, each run's conditions, and the verdict by the rule as written."""
    got = {p: {s: sim_measures(runs, p, s) for s in SIM_SEEDS} for _, p in SIM}
    cols = ["pos_frac_end", "pos_cos_mid", "pos_cos_end", "ground_o", "ground_attn", "ground_chance", "ground_o_auc",
            "ground_attn_auc", "val_true", "val_shuffled", "val_none", "rankme", "loss_pred_end", "dense_shape_obj",
            "img_shape_ap", "attn_entropy_end"]
    out = ["| candidate | seed | " + " | ".join(cols) + " | conditions 1-4 |", "|---|---|" + "---|" * (len(cols) + 1)]
    verdicts = {}
    for label, p in SIM:
        for s in SIM_SEEDS:
            m = got[p][s]
            if m is None:
                out.append(f"| {label} | {s} | " + " | ".join("-" for _ in cols) + " | not finished |")
                continue
            f = m["final"]
            vals = {**{k: f.get(k, float("nan")) for k in cols}, **m,
                    "attn_entropy_end": window(m["train"], 1425, 1500, "attn_entropy")}
            ref = got["sim_zero"][s]
            conds = sim_conditions(m, ref) if ref else None
            verdicts.setdefault(p, []).append(conds)
            marks = " ".join("y" if ok else "n" for ok in conds.values()) if conds else "-"
            out.append(f"| {label} | {s} | " + " | ".join(f"{vals[k]:.4f}" for k in cols) + f" | {marks} |")
    out.append("")
    out.append("minutes in training steps: " + "; ".join(
        f"{p} " + ", ".join(f"{m['minutes']:.0f}" for m in got[p].values() if m) for _, p in SIM))
    out.append("")
    out.append("verdict: " + sim_verdict(verdicts))
    print("\n".join(out))
    sim_figure(got)


def sim_verdict(verdicts):
    """A remedy passes when all four conditions hold in both seeds; cosine is preferred (order fixed in §9)."""
    lines, passed = [], []
    for _, p in SIM:
        v = verdicts.get(p, [])
        if len(v) < len(SIM_SEEDS) or any(c is None for c in v):
            lines.append(f"{p}: incomplete")
            continue
        failed = sorted({k for c in v for k, ok in c.items() if not ok})
        lines.append(f"{p}: {'passes' if not failed else 'fails ' + ', '.join(failed)}")
        if not failed and p in ("sim_cosine", "sim_attn"):
            passed.append(p)
    if any("incomplete" in x for x in lines):
        return "; ".join(lines) + " -> undecided"
    choice = next((p for p in ("sim_cosine", "sim_attn") if p in passed), None)
    return "; ".join(lines) + (f" -> chosen: {choice}" if choice else " -> no remedy passes: the paper's loss stays")


def sim_figure(got):
    """notes/sim_curves.png: pos_cos and pos_frac over steps, ground_o and ground_attn at each evaluation
    (chance dotted), per candidate, both seeds."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 4, figsize=(22, 4.2))
    colors = dict(sim_paper="tab:red", sim_zero="tab:gray", sim_cosine="tab:blue", sim_attn="tab:green")
    for label, p in SIM:
        for s, m in got[p].items():
            if m is None:
                continue
            st = "-" if s == 0 else "--"
            lab = label if s == 0 else None
            steps = [r["step"] for r in m["train"]]
            ax[0].plot(steps, [r["pos_cos"] for r in m["train"]], st, color=colors[p], label=lab)
            ax[1].plot(steps, [r["pos_frac"] for r in m["train"]], st, color=colors[p], label=lab)
            es = [r["step"] for r in m["evals"]]
            ax[2].plot(es, [r["ground_o"] for r in m["evals"]], "o" + st, color=colors[p], label=lab)
            ax[3].plot(es, [r["ground_attn"] for r in m["evals"]], "o" + st, color=colors[p], label=lab)
            for a in ax[2:]:
                a.plot(es, [r["ground_chance"] for r in m["evals"]], ":", color="black", lw=0.8)
    ax[0].set(title="pos_cos: mean positive patch-word cosine", xlabel="step", yscale="log")
    ax[1].set(title="pos_frac: share of positive cosines", xlabel="step", yscale="log")
    ax[2].set(title="ground_o (top word by O is the object's; chance dotted)", xlabel="step")
    ax[3].set(title="ground_attn (top word by attention; chance dotted)", xlabel="step")
    ax[0].legend(fontsize=8, title="solid seed 0, dashed seed 1", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sim_curves.png"), dpi=110)
    print("wrote notes/sim_curves.png")


def power(runs, n_draws=200_000):
    """§7: the paired difference complement - I-JEPA with its 95% t interval, and a Monte Carlo of how
    often rule A would pass if the true paired difference were +0.02 with the measured spread."""
    import math
    import random
    g = lambda name: (lambda f, i: f["dense_shape_obj"] - i["dense_shape_obj"])(load(runs, name)[1][-1],  # noqa: E731
                                                                                load(runs, name)[2])
    d = [g(f"mech_comp_s{s}") - g(f"mech_ijepa_s{s}") for s in range(3)]
    m, sd = statistics.mean(d), statistics.stdev(d)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, df 2)
    print(f"paired complement - I-JEPA: {', '.join(f'{x:+.4f}' for x in d)}; mean {m:+.4f}, sd {sd:.4f}, "
          f"95% interval [{m - half:+.3f}, {m + half:+.3f}], t {m / (sd / math.sqrt(3)):.2f}")
    rng, part, whole = random.Random(0), 0, 0
    for _ in range(n_draws):
        x = [rng.gauss(0.02, sd) for _ in range(3)]
        y = [rng.gauss(0.02, sd) for _ in range(2)]  # complement - shuffled: assumed the same mean and spread
        ok = statistics.mean(x) >= 0.02 and all(v > 0 for v in x)
        part += ok
        whole += ok and all(v >= 0.02 for v in y)
    print(f"a true +0.02 (sd {sd:.3f}) passes the I-JEPA part of rule A {part / n_draws:.1%} of the time, "
          f"the whole rule {whole / n_draws:.1%} ({n_draws} draws, seed 0)")
    # §10's rule (the paired 95% t interval excludes 0), with §7's paired sd: how many seeds find +0.03?
    def found(n, effect, draws=20_000):
        hits = 0
        for _ in range(draws):
            x = [rng.gauss(effect, sd) for _ in range(n)]
            hits += statistics.mean(x) - T975[n - 1] * statistics.stdev(x) / math.sqrt(n) > 0
        return hits / draws
    print("§10 power for a true +0.03: " + ", ".join(f"{n} seeds {found(n, 0.03):.0%}" for n in range(5, 13)))
    print("§10 with 10 seeds: " + ", ".join(f"+{e} {found(10, e):.0%}" for e in (0.02, 0.025, 0.028, 0.03)))


# -----------------------------------------------------------------------------
# notes/experiments.md §10: the paper's two testable claims, pre-registered

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145}  # t quantiles 0.975 by degrees of freedom
C1_SEEDS, C1_CONTROL_SEEDS = range(10), range(3)
C1_ARMS = (("I-JEPA", "c1_ijepa", C1_SEEDS), ("TC-JEPA", "c1_tc", C1_SEEDS),
           ("TC-JEPA, lambda = beta = 0", "c1_zero", C1_CONTROL_SEEDS),
           ("TC-JEPA, shuffled captions", "c1_shuf", C1_CONTROL_SEEDS))
C2_SCALES = (("easy (0.10, 0.15)", "easy"), ("default (0.15, 0.20)", "default"), ("hard (0.30, 0.40)", "hard"))
C2_METHODS = (("I-JEPA", "c2_ijepa"), ("TC-JEPA", "c2_tc"))
C2_SEEDS = range(3)


def interval(xs):
    """(mean, low, high) of a 95% t interval; (mean, nan, nan) with fewer than 2 values."""
    import math
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def by_interval(d, n_needed, above, below):
    """§10's rule: the verdict of paired differences d by their 95% interval."""
    if len(d) < n_needed:
        return f"undecided: {len(d)} of {n_needed} paired seeds"
    _, lo, hi = interval(d)
    what = above if lo > 0 else below if hi < 0 else "no difference detected (the interval holds 0)"
    return f"{what}: 95% interval [{lo:+.4f}, {hi:+.4f}]"


def final_and_init(runs, name, steps):
    d = load(runs, name)
    if d is None or not d[1] or d[1][-1]["step"] != steps:
        return None
    return d[1][-1], d[2]


def claim1(runs):
    got = {p: {s: final_and_init(runs, f"{p}_s{s}", 3000) for s in seeds} for _, p, seeds in C1_ARMS}
    gain = lambda p, s, k="dense_shape_obj": got[p][s][0][k] - got[p][s][1][k]  # noqa: E731
    have = lambda p: [s for s, v in got[p].items() if v is not None]  # noqa: E731
    out = ["| arm | seeds | gain dense_shape_obj | gain obj_shape | gain img_shape_ap | rankme | ground_o | "
           "ground_chance | val_true | val_shuffled |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, p, seeds in C1_ARMS:
        ss = have(p)
        cells = [fmt([gain(p, s, k) for s in ss]) for k in ("dense_shape_obj", "obj_shape", "img_shape_ap")]
        cells += [fmt([got[p][s][0][k] for s in ss if got[p][s][0].get(k) is not None])
                  for k in ("rankme", "ground_o", "ground_chance", "val_true", "val_shuffled")]
        out.append(f"| {label} | {len(ss)} of {len(seeds)} | " + " | ".join(cells) + " |")
    out.append("")
    pairs = (("TC-JEPA - I-JEPA (primary)", "c1_tc", "c1_ijepa"), ("TC-JEPA - lambda = beta = 0", "c1_tc", "c1_zero"),
             ("TC-JEPA - shuffled captions", "c1_tc", "c1_shuf"))
    verdict = None
    for label, a, b in pairs:
        ss = [s for s in have(a) if s in have(b)]
        for k in ("dense_shape_obj", "obj_shape", "img_shape_ap"):
            d = [gain(a, s, k) - gain(b, s, k) for s in ss]
            if not d:
                continue
            m, lo, hi = interval(d)
            out.append(f"{label}, gain {k}: {', '.join(f'{x:+.3f}' for x in d)}; mean {m:+.4f}, 95% interval "
                       f"[{lo:+.4f}, {hi:+.4f}] ({len(d)} paired seeds)")
            if a == "c1_tc" and b == "c1_ijepa" and k == "dense_shape_obj":
                verdict = by_interval(d, len(C1_SEEDS), "claim 1 holds here: TC-JEPA's gain exceeds I-JEPA's",
                                      "the opposite of claim 1: TC-JEPA's gain is below I-JEPA's")
    out.append("")
    out.append(f"verdict (claim 1): {verdict or 'no runs'}")
    print("\n".join(out))
    if any(v for arm in got.values() for v in arm.values()):
        claim1_figure(got, gain)


def paired_panel(ax, x, d):
    """Paired differences d at x: each seed a grey dot, their mean and 95% t interval in black."""
    m, lo, hi = interval(d)
    ax.plot([x] * len(d), d, "o", alpha=0.4, color="gray")
    ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]] if len(d) > 1 else None, fmt="s", color="black", capsize=6)


def claim1_figure(got, gain):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2))
    labels = [label for label, _, _ in C1_ARMS]
    for s in C1_SEEDS:
        xs = [i for i, (_, p, _) in enumerate(C1_ARMS) if got[p].get(s)]
        ax[0].plot(xs, [gain(C1_ARMS[i][1], s) for i in xs], "o-", alpha=0.6, label=f"seed {s}")
    ax[0].axhline(0, color="gray", lw=0.8)
    ax[0].set_xticks(range(len(labels)), [lb.replace(", ", ",\n") for lb in labels], fontsize=8)
    ax[0].set(title="gain dense_shape_obj (step 3000 - init), seeds joined")
    ax[0].legend(fontsize=6, ncol=2)
    for i, (label, a, b) in enumerate((("TC - I-JEPA", "c1_tc", "c1_ijepa"), ("TC - lambda=beta=0", "c1_tc", "c1_zero"),
                                       ("TC - shuffled", "c1_tc", "c1_shuf"))):
        ss = [s for s in C1_SEEDS if got[a].get(s) and got[b].get(s)]
        d = [gain(a, s) - gain(b, s) for s in ss]
        if not d:
            continue
        paired_panel(ax[1], i, d)
    ax[1].axhline(0, color="gray", lw=0.8)
    ax[1].set_xticks(range(3), ["TC - I-JEPA\n(primary)", "TC - lambda=beta=0", "TC - shuffled"], fontsize=8)
    ax[1].set(title="paired differences of the gain, mean and 95% interval")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "claim1.png"), dpi=110)
    print("wrote notes/claim1.png")


def claim2(runs):
    got = {(p, k, s): final_and_init(runs, f"{p}_{k}_s{s}", 1500) for _, p in C2_METHODS for _, k in C2_SCALES
           for s in C2_SEEDS}
    out = ["| method | setting | seeds | dense_shape_obj | rankme | val_true | val_shuffled |", "|---|---|---|---|---|---|---|"]
    for label, p in C2_METHODS:
        for slabel, k in C2_SCALES:
            r = [got[(p, k, s)][0] for s in C2_SEEDS if got[(p, k, s)]]
            out.append(f"| {label} | {slabel} | {len(r)} | " + " | ".join(fmt([x[c] for x in r]) for c in
                                                                          ("dense_shape_obj", "rankme", "val_true",
                                                                           "val_shuffled")) + " |")
    out.append("")
    spreads, verdict = {}, None
    for c in ("dense_shape_obj", "rankme"):
        for label, p in C2_METHODS:
            ss = [s for s in C2_SEEDS if all(got[(p, k, s)] for _, k in C2_SCALES)]
            spreads[(p, c)] = {s: max(got[(p, k, s)][0][c] for _, k in C2_SCALES)
                               - min(got[(p, k, s)][0][c] for _, k in C2_SCALES) for s in ss}
            if ss:
                m, lo, hi = interval(list(spreads[(p, c)].values()))
                out.append(f"{label}: spread of {c} over the three settings (max - min, per seed) "
                           f"{', '.join(f'{x:.3f}' for x in spreads[(p, c)].values())}; mean {m:.4f}, 95% interval "
                           f"[{lo:.4f}, {hi:.4f}]")
        ss = [s for s in C2_SEEDS if s in spreads[("c2_ijepa", c)] and s in spreads[("c2_tc", c)]]
        if ss:
            d = [spreads[("c2_ijepa", c)][s] - spreads[("c2_tc", c)][s] for s in ss]
            m, lo, hi = interval(d)
            out.append(f"spread I-JEPA - spread TC-JEPA, {c}: {', '.join(f'{x:+.3f}' for x in d)}; mean {m:+.4f}, "
                       f"95% interval [{lo:+.4f}, {hi:+.4f}] ({len(d)} paired seeds)")
            if c == "dense_shape_obj":
                verdict = by_interval(d, len(C2_SEEDS), "claim 2 holds here: I-JEPA's probe moves more across "
                                      "block scales", "the opposite of claim 2: TC-JEPA's probe moves more")
    collapsed = [f"{p}_{k}_s{s} (rankme {got[(p, k, s)][0]['rankme']:.2f})" for _, p in C2_METHODS for _, k in C2_SCALES
                 for s in C2_SEEDS if got[(p, k, s)] and got[(p, k, s)][0]["rankme"] < 2]
    out.append(f"collapse (rankme < 2): {', '.join(collapsed) or 'none'}")
    out.append("")
    out.append(f"verdict (claim 2): {verdict or 'no runs'}")
    print("\n".join(out))
    if any(got.values()):
        claim2_figure(got, spreads)


def claim2_figure(got, spreads):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.2))
    for (label, p), color in zip(C2_METHODS, ("tab:blue", "tab:orange")):
        for a, c in zip(ax, ("dense_shape_obj", "rankme")):
            for s in C2_SEEDS:
                xs = [i for i, (_, k) in enumerate(C2_SCALES) if got[(p, k, s)]]
                a.plot(xs, [got[(p, C2_SCALES[i][1], s)][0][c] for i in xs], "-", color=color, alpha=0.3)
            xs = [i for i, (_, k) in enumerate(C2_SCALES) if any(got[(p, k, s)] for s in C2_SEEDS)]
            ms = [interval([got[(p, C2_SCALES[i][1], s)][0][c] for s in C2_SEEDS if got[(p, C2_SCALES[i][1], s)]])
                  for i in xs]
            a.errorbar(xs, [m[0] for m in ms], yerr=[[m[0] - m[1] if m[1] == m[1] else 0 for m in ms],
                                                    [m[2] - m[0] if m[2] == m[2] else 0 for m in ms]],
                       fmt="o-", color=color, capsize=5, label=label)
    for a, c in zip(ax, ("dense_shape_obj (step 1500)", "rankme (step 1500)")):
        a.set_xticks(range(3), [lb for lb, _ in C2_SCALES], fontsize=8)
        a.set(title=f"{c}: mean, 95% interval, seeds thin", xlabel="target block scale")
        a.legend(fontsize=8)
    # the rule's measure: each seed's spread of the probe over the settings, the two methods joined,
    # and the paired difference I-JEPA - TC-JEPA with its 95% interval
    ij, tc = spreads[("c2_ijepa", "dense_shape_obj")], spreads[("c2_tc", "dense_shape_obj")]
    ss = [s for s in C2_SEEDS if s in ij and s in tc]
    for s in ss:
        ax[2].plot([0, 1], [ij[s], tc[s]], "o-", color="gray", alpha=0.6)
    if ss:
        paired_panel(ax[2], 2, [ij[s] - tc[s] for s in ss])
    ax[2].axhline(0, color="gray", lw=0.8)
    ax[2].set_xticks(range(3), ["I-JEPA", "TC-JEPA", "I-JEPA - TC-JEPA\n(the rule)"], fontsize=8)
    ax[2].set_xlim(-0.5, 2.5)
    ax[2].set(title="spread of dense_shape_obj (max - min over the settings)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "claim2.png"), dpi=110)
    print("wrote notes/claim2.png")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    where = args[0] if args else os.path.join(HERE, "runs")
    if "--mech" in sys.argv:
        mech(where)
    elif "--dead" in sys.argv:
        dead(where)
    elif "--sim" in sys.argv:
        sim(where)
    elif "--power" in sys.argv:
        power(where)
    elif "--claims" in sys.argv:
        claim1(where)
        print()
        claim2(where)
    elif not args:  # the committed logs: sections 7-9 only
        print("sections 1-6: their logs were not kept; rerun them (bash notes/run_experiments.sh) and use "
              "python notes/report.py runs\n\n## section 7\n")
        mech(where)
        print("\n## section 8\n")
        dead(where)
        print("\n## section 9\n")
        sim(where)
    else:
        main(where)
