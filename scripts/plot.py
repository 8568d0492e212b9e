#!/usr/bin/python3
"""Plots from the example programs' run folders (log.jsonl, summary.json).

usage: scripts/plot.py --out DIR RUN_DIR [RUN_DIR ...]

Writes into DIR:
  d_speed.png      d_speed over training steps per run, re-balancing steps marked by
                   direction (accelerating m0 / m1)
  accuracy.png     test accuracy of y, y0, y1 per epoch, one panel per policy
  utilization.png  u(m1|m0) and u(m0|m1) per policy (mean and std over seeds)
"""
import argparse
import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"vanilla": "tab:gray", "random": "tab:orange", "guided": "tab:blue"}


def load_run(path):
    steps, epochs = [], []
    log = os.path.join(path, "log.jsonl")
    if not os.path.exists(log):
        sys.exit(f"plot: {log} does not exist (not a run folder?)")
    with open(log) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"plot: {log}:{n}: not JSON ({e})")
            (steps if rec.get("type") == "step" else epochs).append(rec)
    summary = None
    sp = os.path.join(path, "summary.json")
    if os.path.exists(sp):
        with open(sp) as f:
            summary = json.load(f)
    policy = (summary or {}).get("args", {}).get("policy") or os.path.basename(path.rstrip("/")).split("-")[0]
    return {"path": path, "policy": policy, "steps": steps, "epochs": epochs, "summary": summary}


def policies_of(runs):
    return sorted({r["policy"] for r in runs}, key=lambda p: list(COLOURS).index(p) if p in COLOURS else 9)


def plot_d_speed(runs, out):
    policies = policies_of(runs)
    fig, axes = plt.subplots(1, len(policies), figsize=(4.5 * len(policies), 3.8), sharey=True, squeeze=False)
    for ax, policy in zip(axes[0], policies):
        for r in (r for r in runs if r["policy"] == policy):
            pts = [(s["step"], s["d_speed"], s["kind"]) for s in r["steps"] if s.get("d_speed") is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLOURS.get(policy, "black"), lw=0.8)
            for kind, marker, colour in (("rebalance_m0", "^", "tab:red"), ("rebalance_m1", "v", "tab:green")):
                sel = [(x, y) for x, y, k in pts if k == kind]
                if sel:
                    ax.scatter(*zip(*sel), marker=marker, s=5, color=colour, zorder=3)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(policy)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("d_speed = s(m1|m0) - s(m0|m1)")
    handles = [plt.Line2D([], [], marker="^", ls="", color="tab:red", label="re-balancing step accelerating m0"),
               plt.Line2D([], [], marker="v", ls="", color="tab:green", label="re-balancing step accelerating m1")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("Conditional learning speed during training (one line per run)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(os.path.join(out, "d_speed.png"), dpi=120)
    plt.close(fig)


def plot_accuracy(runs, out):
    policies = policies_of(runs)
    fig, axes = plt.subplots(1, len(policies), figsize=(4 * len(policies), 3.6), sharey=True, squeeze=False)
    for ax, policy in zip(axes[0], policies):
        for r in (r for r in runs if r["policy"] == policy):
            ep = [e["epoch"] + 1 for e in r["epochs"]]
            for head, style in (("y", "-"), ("y0", "--"), ("y1", ":")):
                ax.plot(ep, [100 * e["test"][head] for e in r["epochs"]], style,
                        color=COLOURS.get(policy, "black"), lw=1.2, alpha=0.8)
        ax.set_title(policy)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles = [plt.Line2D([], [], ls=s, color="black", label=l)
               for s, l in (("-", "y (both)"), ("--", "y0 (colour image, m0)"), (":", "y1 (gray image, m1)"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)


def plot_utilization(runs, out):
    by = collections.defaultdict(list)
    for r in runs:
        if r["summary"]:
            by[r["policy"]].append(r["summary"]["utilization_test"])
    if not by:
        return
    policies = [p for p in COLOURS if p in by] + [p for p in by if p not in COLOURS]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for i, key in enumerate(("u_m1_given_m0", "u_m0_given_m1")):
        means, stds = [], []
        for p in policies:
            vals = [u[key] for u in by[p] if u[key] is not None]
            m = sum(vals) / len(vals) if vals else float("nan")
            means.append(m)
            stds.append((sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0)
        xs = [j + (i - 0.5) * width for j in range(len(policies))]
        ax.bar(xs, means, width, yerr=stds, capsize=3,
               label="u(m1|m0): m1's gain for branch 0" if i == 0 else "u(m0|m1): m0's gain for branch 1",
               color="tab:purple" if i == 0 else "tab:cyan")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(len(policies)))
    ax.set_xticklabels(policies)
    ax.set_ylabel("conditional utilization rate")
    ax.set_title("Utilization on the test set (best validation epoch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "utilization.png"), dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = [load_run(p) for p in args.runs]
    plot_d_speed(runs, args.out)
    plot_accuracy(runs, args.out)
    plot_utilization(runs, args.out)
    print(f"plots in {args.out}: d_speed.png accuracy.png utilization.png")


if __name__ == "__main__":
    main()
