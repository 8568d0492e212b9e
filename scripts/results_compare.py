#!/usr/bin/python3
"""Writes docs/comparison.md from the runs of scripts/compare (its manifest.json).

usage: scripts/results_compare.py --manifest RESULTS/manifest.json \
           --invocations RESULTS/invocations.jsonl --out docs/comparison.md \
           --figures docs/figures/comparison --jobs N --wall-seconds S --started N [--notes FILE]

Per dataset and network: each method's chosen setting, test accuracies (mean ± std over
the reported seeds) and its difference to vanilla and to joint, paired by seed, with a
95 % t-interval; then which differences hold at 95 %, and every selection trial.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import PAPER, fmt, machine, mean_std, published  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["vanilla", "joint", "random", "guided", "ogm-ge", "opm", "pmr", "relearning", "smv", "gblend", "mmpareto",
         "agm"]
NAMES = {"mnist": "Colored-and-gray MNIST", "fashion": "colored Fashion-MNIST",
         "speech": "spoken digits (colour digit, gray digit, spoken name)"}
NETWORKS = {"mmtm": "MMTM network", "late": "late-fusion twin"}
LOSS = {"vanilla": "Σ_k CE_k", "joint": "CE(y)", "random": "Σ_k CE_k", "guided": "Σ_k CE_k", "ogm-ge": "CE(y)",
        "opm": "CE(y)", "pmr": "CE(y) + α·prototype CE of the branches behind", "relearning": "CE(y)",
        "smv": "CE(y) on the rows and their copies",
        "gblend": "its weights on CE(y), CE_k", "mmpareto": "CE(y) + Σ_k CE_k", "agm": "CE(y)"}
# Two-sided 95 % quantiles of Student's t, degrees of freedom 1..30 (any statistics table).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def load(run):
    path = os.path.join(run, "summary.json")
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"results_compare: {path}: {e}")
    curve = []
    # epochs.jsonl: the epoch records scripts/compare keeps (and commits) of log.jsonl.
    log = os.path.join(run, "epochs.jsonl")
    if not os.path.exists(log):
        log = os.path.join(run, "log.jsonl")
    if not os.path.exists(log):
        sys.exit(f"results_compare: {run} has neither epochs.jsonl nor log.jsonl")
    with open(log) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"results_compare: {log}:{n}: not JSON ({e})")
            if rec.get("type") == "epoch":
                curve.append(rec["test"]["y"])
    if len(curve) != s["args"]["epochs"]:
        sys.exit(f"results_compare: {log} has {len(curve)} epoch records, the run {s['args']['epochs']} epochs")
    s["curve"] = curve
    try:  # written by scripts/compare when the run ended; a checkout's file times say nothing
        with open(os.path.join(run, "finished")) as f:
            s["finished"] = datetime.datetime.fromisoformat(f.read().strip()).timestamp()
    except (OSError, ValueError):
        s["finished"] = os.path.getmtime(path)
    return s


def paired(a, b):
    """Mean of a_s - b_s over the seeds both have, and its 95 % t-interval half-width."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return (d[0] if d else float("nan")), float("nan")
    return statistics.mean(d), T975[min(len(d) - 1, len(T975)) - 1] * statistics.stdev(d) / math.sqrt(len(d))


def interval_text(m, h):
    if m != m:
        return "—"
    return f"{m * 100:+.2f} [{(m - h) * 100:+.2f}, {(m + h) * 100:+.2f}]" if h == h else f"{m * 100:+.2f}"


def verdict(m, h):
    if not (h == h):
        return None
    if m - h > 0:
        return "better"
    if m + h < 0:
        return "worse"
    return "within noise"


def setting_text(flags):
    return " ".join(flags)


def heads(s):
    return [k for k in sorted(s["test"]) if k.startswith("y") and k[1:].isdigit()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--figures", required=True)
    ap.add_argument("--invocations", required=True)
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--wall-seconds", type=float, required=True)
    ap.add_argument("--started", type=int, required=True)
    ap.add_argument("--notes")
    args = ap.parse_args()
    try:
        with open(args.manifest) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"results_compare: {args.manifest}: {e}")
    if not manifest["datasets"]:
        sys.exit(f"results_compare: {args.manifest} lists no finished dataset")

    all_runs, finished = {}, []
    for d in manifest["datasets"]:
        for g in d["groups"]:
            for r in g["runs"] + [r for t in g["trials"] for r in t["runs"]]:
                if r not in all_runs:  # relative to the manifest's folder (absolute in older ones)
                    all_runs[r] = load(os.path.join(os.path.dirname(os.path.abspath(args.manifest)), r))
                    finished.append(all_runs[r]["finished"])
    run_minutes = sum(s["seconds"] for s in all_runs.values()) / 60
    try:
        with open(args.invocations) as f:
            invocations = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"results_compare: {args.invocations}: {e}")
    first = next(iter(all_runs.values()))["args"]
    day = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date().isoformat()  # noqa: E731
    selection = " ".join(manifest["selection_seeds"])
    hyper = manifest["hyper"]
    lines = [
        "# Comparison of balancing methods",
        "",
        "Generated by `scripts/results_compare.py` from the runs of `scripts/compare`; do not edit "
        f"by hand (notes come from `{args.notes or '(none)'}`).",
        "",
        "- invocations (each resumes the runs of the ones before): "
        + "; ".join(f"{i['started']} `{i['command']}` at {i['commit']} on {i['machine']}" for i in invocations),
        f"- this table written on: {machine()}",
        f"- dates: runs finished between {day(min(finished))} and {day(max(finished))} (UTC); {len(all_runs)} runs, "
        f"{args.jobs} at a time with one LibTorch thread each: {run_minutes:.1f} min of run time in all; the last "
        f"invocation of the script started {args.started} runs and took {args.wall_seconds / 60:.1f} min of wall time",
        f"- training: batch {first['batch_size']}, SGD momentum {first['momentum']}, the same epochs for every method "
        "of a dataset; every method trains on the same rows: the last "
        f"{float(manifest['held_out']) * 100:.0f} % of the training rows are held out for all (Gradient-Blending "
        "measures generalization on them); checkpoint = best validation accuracy of y; colour noise variance "
        f"{first['colour_noise']}",
        "- each method trains its original's loss ("
        + "; ".join(f"{m} {LOSS[m]}" for m in ORDER if m in manifest["warmup"]) + ") with its original's warm-up of plain training ("
        + ", ".join(f"{m} {manifest['warmup'][m]}" for m in ORDER if m in manifest["warmup"]) + " epochs); each method's schedule, its original's scaled to the run's epochs (OGM-GE: epochs 0–50 of 100; "
        "PMR: the term until epoch 60 of 100, prototype momentum 0, as its colored-MNIST runs; ReLearning: 3 "
        "re-initializations, every 20 of 90 epochs; AGM: r̄ − r capped at 10, at 7 with three modalities): "
        + "; ".join(f"{d['dataset']}: " + ", ".join(f"{m} `{' '.join(flags)}`" for m, flags in d["schedules"].items() if flags)
                    for d in manifest["datasets"]),
        "- tuning, the same budget for every method, vanilla included: 4 trials per dataset and network on the "
        f"selection seed(s) {selection}, which are not reported, chosen on the mean validation accuracy of y (the "
        "earlier candidate on a tie). A method with a hyper-parameter tries lr "
        f"{{{', '.join(manifest['lr_with_hyper'])}}} × {{the original's default, one other}}: "
        + ", ".join(f"{m} `{flag}` {{{', '.join(values)}}}" for m, (flag, values) in hyper.items())
        + f"; {', '.join(m for m in ORDER if m in manifest['warmup'] and m not in hyper)} try lr "
        f"{{{', '.join(manifest['lr_alone'])}}}. Every trial is listed at the end",
        "- differences: a seed fixes the initialization and the data order, the same for every method of a network, "
        "so Δ to vanilla (and to joint) is the mean over seeds of the per-seed difference of test accuracy of y, in "
        "points, with its 95 % t-interval; **better** / **worse** where the interval excludes 0",
        "- guided and random hold fusion gates: they do not run on the late-fusion twin",
        "- cost per step: not measured here (the runs shared the cores); see the paired benchmarks in "
        "[performance.md](performance.md)",
        "- published numbers: the greedy-learning paper's Colored-and-gray MNIST table (vanilla, random, guided on "
        "MMTM; its runs are longer, on all rows); none of the newer methods publishes numbers on these constructions "
        "that could be read offline",
        "",
    ]
    conclusions = []
    plots = []
    for d in manifest["datasets"]:
        by_network = {}
        for g in d["groups"]:
            by_network.setdefault(g["network"], {})[g["method"]] = g
        for network, groups in by_network.items():
            runs = {m: [all_runs[r] for r in g["runs"]] for m, g in groups.items()}
            a = runs[next(iter(runs))][0]["args"]
            head_names = heads(runs[next(iter(runs))][0])
            two = len(head_names) == 2
            title = f"{NAMES.get(d['dataset'], d['dataset'])}, {NETWORKS.get(network, network)}"
            rows = a.get("train_size", "?")
            lines += [
                f"## {title}",
                "",
                f"{rows} training rows ({float(manifest['held_out']) * 100:.0f} % held out for all), "
                f"{a.get('validation_size', '?')} validation, {a.get('test_size', '?')} test; {d['epochs']} epochs; "
                f"seeds {' '.join(d['seeds'])}. Test accuracy in % (mean ± std over seeds) at the best validation "
                "epoch; Δ in points, paired by seed, [95 % interval]; "
                + ("d_util and d_speed at the best epoch (d_speed: none without fusion modules)." if two else
                   "the utilization spread max_k u_k − min_k u_k and the speed spread at the best epoch."),
                "",
                "| method | chosen | seeds | y | Δ y vs vanilla | Δ y vs joint | "
                + " | ".join(head_names) + (" | d_util | d_speed" if two else " | u spread | speed spread")
                + " | paper (y) |",
                "|---|---|---|---|---|---|" + "---|" * len(head_names) + "---|---|---|",
            ]
            for m, rs in runs.items():  # the differences pair runs by position: the same seeds in order
                seeds = [str(r["args"]["seed"]) for r in rs]
                if seeds != d["seeds"]:
                    sys.exit(f"results_compare: {d['dataset']} {network} {m}: runs of seeds {seeds}, not {d['seeds']}")
            ys = {m: [r["test"]["y"] for r in rs] for m, rs in runs.items()}
            deltas = {}
            for m in (m for m in ORDER if m in runs):
                rs = runs[m]
                dv = paired(ys[m], ys["vanilla"]) if "vanilla" in ys and m != "vanilla" else (float("nan"),) * 2
                dj = paired(ys[m], ys["joint"]) if "joint" in ys and m != "joint" else (float("nan"),) * 2
                deltas[m] = (dv, dj)
                u = [r["utilization_test"] for r in rs]
                if two:
                    # Nothing to cut without fusion modules: d_util is 0 by construction there.
                    util = fmt(mean_std([x["d_util"] for x in u]), 1, 3) if network == "mmtm" else "n/a"
                    speed = fmt(mean_std([r.get("d_speed_at_best") for r in rs]), 1, 3)
                else:
                    util = fmt(mean_std([x["spread"] for x in u]), 1, 3)
                    speed = fmt(mean_std([r.get("speed_spread_at_best") for r in rs]), 1, 3)
                paper = published(PAPER, m, 2) if d["dataset"] == "mnist" and network == "mmtm" else "—"
                lines.append(
                    f"| {m} | `{setting_text(groups[m]['chosen'])}` | {len(rs)} | "
                    f"{fmt(mean_std(ys[m]), 100)} | {interval_text(*dv)} | {interval_text(*dj)} | "
                    + " | ".join(fmt(mean_std([r['test'][h] for r in rs]), 100) for h in head_names)
                    + f" | {util} | {speed} | {paper} |")
            lines.append("")
            for base, index in (("vanilla", 0), ("joint", 1)):
                found = {"better": [], "worse": [], "within noise": []}
                for m, pair in deltas.items():
                    v = verdict(*pair[index])
                    if v:
                        found[v].append(f"{m} ({interval_text(*pair[index])})")
                if any(found.values()):
                    conclusions.append(
                        f"- {title}, against {base}: "
                        + "; ".join(f"**{k}**: {', '.join(v)}" for k, v in found.items() if v) + ".")
            plots.append((title, network, runs, deltas))

    lines += ["## Which differences hold at 95 %", "",
              "Generated from the intervals above (a difference holds where its interval excludes 0; "
              "several comparisons are made, so expect about one in twenty 'holds' by chance).", ""]
    lines += conclusions + [""]
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            lines += [f.read().strip(), ""]

    lines += ["## Selection trials", "",
              f"Mean validation accuracy of y (%) over the selection seed(s) {selection}; the chosen trial in bold.",
              ""]
    for d in manifest["datasets"]:
        for g in d["groups"]:
            cells = []
            for t in g["trials"]:
                text = f"`{setting_text(t['flags'])}` {t['validation'] * 100:.2f}"
                cells.append(f"**{text}**" if t["flags"] == g["chosen"] else text)
            lines.append(f"- {d['dataset']}, {g['network']}, {g['method']}: " + "; ".join(cells))
    lines.append("")

    os.makedirs(args.figures, exist_ok=True)
    fig, axes = plt.subplots(1, len(plots), figsize=(4.4 * len(plots), 3.8), squeeze=False)
    for ax, (title, network, runs, deltas) in zip(axes[0], plots):
        methods = [m for m in ORDER if m in deltas and m != "vanilla"]
        for i, m in enumerate(methods):
            mean, half = deltas[m][0]
            ax.errorbar([mean * 100], [i], xerr=[[half * 100 if half == half else 0]], fmt="o", color="tab:blue")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("Δ test accuracy of y vs vanilla (points, 95 %)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.figures, "differences.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(plots), figsize=(4.4 * len(plots), 3.6), squeeze=False, sharey=True)
    for ax, (title, network, runs, deltas) in zip(axes[0], plots):
        for m in (m for m in ORDER if m in runs):
            curves = [r["curve"] for r in runs[m]]
            n = min(len(c) for c in curves)
            ax.plot(range(1, n + 1), [100 * sum(c[e] for c in curves) / len(curves) for e in range(n)], label=m)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("test accuracy of y (%), mean over seeds")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.figures, "curves.png"), dpi=110)
    plt.close(fig)

    rel = os.path.relpath(args.figures, os.path.dirname(args.out) or ".")
    lines += ["## Plots", "", f"![difference to vanilla per method, 95 % intervals]({rel}/differences.png)", "",
              f"![test accuracy of y per epoch]({rel}/curves.png)", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
