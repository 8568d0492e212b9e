#!/usr/bin/env python3
"""Question: what do MMPareto's and AGM's original formulations cost, beside ours?

Runs, in PyTorch (the project's 2.13 environment: .venv/libtorch-2.13-cpu/bin/python),
the colored-MNIST network of the C++ benchmarks (two ConvBranches of 32, 64, 128, 128
channels, strides 1, 2, 2, 2, BatchNorm, an MMTM of ratio 4 after stages 1, 2, 3, y the
mean of the heads), SGD lr 0.01 momentum 0.9, random colored-MNIST-shaped batches, and
three steps on three copies taking turns in rotating order, each timed alone (as
BM_LossMethodsPaired does in C++):
- vanilla: CE(y0) + CE(y1), one backward;
- MMPareto as GeWu-Lab/MMPareto_ICML2024 `code/MMPareto.py` (a339db3) lines 93-208: a
  backward per loss (CE(y), CE(y0), CE(y1), retain_graph) cloning every encoder gradient
  and concatenating them, the cosine per encoder, on conflict `MinNormSolver.
  find_min_norm_element` (`code/min_norm_solvers.py`, two tasks: a dot product per
  tensor pair read to the host, the "concat" entry included as the original passes it),
  a fourth backward of the summed losses, and per encoder parameter the norm-matched,
  gamma-scaled combination. Logging (`loss.item()` lists) is left out;
- AGM as lihong2303/AGM_ICCV2023 `model/CREMAD_net.py` (5a65542) lines 25-72 and
  `run/CREMAD_main.py` lines 63-69, 128-165: the full forward, then in eval mode with
  autograd on the passes with the gray input zeroed, the colour input zeroed and both
  zeroed; out_a, out_v and their sum through the backward hooks that scale each side's
  gradient; scores by the original's per-sample loop (a softmax of the whole batch per
  sample and the 1e-8 guard), the coefficients, running means; the loss CE(m_a + m_v).
  The accuracy counting and tensorboard writes of the original's loop are left out.

Then runs the C++ benchmark (BM_LossMethodsPaired of bench_training_step, built against the
same LibTorch, AGM with alpha 0.1, its default, which the Python side uses too) in turns
with the Python side: within a side the steps take turns step by step; between the sides
whole rounds alternate. Prints each side's ratio to its own vanilla step and the C++ time
over the Python time per method (medians over rounds), and how often MMPareto's gradients
conflicted on each side (its min-norm solver runs only then).

usage: benchmarks/originals_cost.py --cpp build-2.13-cpu/benchmarks/bench_training_step
         [--rounds 5] [--seconds 4] [--rotations 5] [--threads 1] [--json OUT]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNELS, STRIDES, CLASSES = (32, 64, 128, 128), (1, 2, 2, 2), 10


class Branch(nn.Module):
    """mmbalance's ConvBranch: conv 3x3 (padding 1), BatchNorm, ReLU per stage; head on the mean."""

    def __init__(self, in_channels):
        super().__init__()
        stages, c = [], in_channels
        for out, stride in zip(CHANNELS, STRIDES):
            stages.append(nn.Sequential(nn.Conv2d(c, out, 3, stride, 1), nn.BatchNorm2d(out), nn.ReLU()))
            c = out
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(c, CLASSES)

    def head(self, x):
        return self.classifier(x.flatten(2).mean(-1))


class MMTM(nn.Module):
    """mmbalance's MMTM for two sides of c channels: joint Linear(2c -> 4c/ratio), ReLU,
    a Linear per side, gates 2·sigmoid; the gates' running mean in training (what a
    regular step of the C++ module stages)."""

    def __init__(self, c, ratio=4, momentum=0.1):
        super().__init__()
        self.joint = nn.Linear(2 * c, 4 * c // ratio)
        self.excite = nn.ModuleList([nn.Linear(4 * c // ratio, c) for _ in range(2)])
        self.register_buffer("gate_mean", torch.ones(2 * c))
        self.momentum = momentum

    def forward(self, a, b):
        squeezed = torch.cat([a.flatten(2).mean(-1), b.flatten(2).mean(-1)], 1)
        z = F.relu(self.joint(squeezed))
        gates = [torch.sigmoid(e(z)) * 2 for e in self.excite]
        if self.training:
            with torch.no_grad():
                self.gate_mean.lerp_(torch.cat(gates, 1).mean(0), self.momentum)
        return a * gates[0][:, :, None, None], b * gates[1][:, :, None, None]


class Net(nn.Module):
    """Colour branch ("audio" in the originals' naming), gray branch ("visual"), MMTMs after
    stages 1, 2, 3; returns y0, y1 and y = (y0 + y1) / 2."""

    def __init__(self):
        super().__init__()
        self.audio, self.visual = Branch(3), Branch(1)
        self.fusion = nn.ModuleDict({str(s): MMTM(CHANNELS[s]) for s in (1, 2, 3)})

    def forward(self, x0, x1):
        for s in range(len(CHANNELS)):
            x0, x1 = self.audio.stages[s](x0), self.visual.stages[s](x1)
            if str(s) in self.fusion:
                x0, x1 = self.fusion[str(s)](x0, x1)
        y0, y1 = self.audio.head(x0), self.visual.head(x1)
        return y0, y1, (y0 + y1) / 2


def setup(batch, seed):
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(batch, 3, 28, 28, generator=g), torch.rand(batch, 1, 28, 28, generator=g),
            torch.randint(CLASSES, (batch,), generator=g))
    return net, opt, data


def vanilla_step(net, opt, data):
    x0, x1, label = data
    y0, y1, _ = net(x0, x1)
    loss = F.cross_entropy(y0, label) + F.cross_entropy(y1, label)
    opt.zero_grad()
    loss.backward()
    opt.step()


# --- MMPareto, as code/MMPareto.py and code/min_norm_solvers.py (two tasks) ---

def min_norm_element_from2(v1v1, v1v2, v2v2):
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def find_min_norm_element_2(vecs):
    """MinNormSolver.find_min_norm_element for two vectors: the planar solution, optimal
    for n = 2 (the original returns before its iterations)."""
    dot = lambda u, v: sum(torch.mul(a, b).sum().data.cpu() for a, b in zip(u, v))  # noqa: E731
    v11, v12, v22 = dot(vecs[0], vecs[0]), dot(vecs[0], vecs[1]), dot(vecs[1], vecs[1])
    c, d = min_norm_element_from2(float(v11), float(v12), float(v22))
    return [c, 1 - c], d


class MMParetoOriginal:
    def __init__(self, net):
        self.net = net
        self.names = {side: [(n, p) for n, p in net.named_parameters() if n.startswith(side + ".")
                             and "classifier" not in n] for side in ("audio", "visual")}
        self.conflicts = 0
        self.steps = 0

    def step(self, opt, data, gamma=1.5):
        x0, x1, label = data
        opt.zero_grad()
        out_a, out_v, out = self.net(x0, x1)
        losses = {"both": F.cross_entropy(out, label), "audio": F.cross_entropy(out_a, label),
                  "visual": F.cross_entropy(out_v, label)}
        grads = {"audio": {}, "visual": {}}
        for loss_type, loss in losses.items():
            loss.backward(retain_graph=True)
            for side in ("audio", "visual"):
                if loss_type in ("both", side):
                    g = {n: p.grad.data.clone() for n, p in self.names[side]}
                    g["concat"] = torch.cat([g[n].flatten() for n, _ in self.names[side]])
                    grads[side][loss_type] = g
            opt.zero_grad()
        k = {}
        for side in ("audio", "visual"):
            cos = F.cosine_similarity(grads[side]["both"]["concat"], grads[side][side]["concat"], dim=0)
            if cos > 0:
                k[side] = [0.5, 0.5]
            else:
                self.conflicts += 1
                k[side], _ = find_min_norm_element_2([list(grads[side][t].values()) for t in ("both", side)])
        sum(losses.values()).backward()
        for side in ("audio", "visual"):
            for n, p in self.names[side]:
                three_norm = torch.norm(p.grad.data.clone())
                new_grad = 2 * k[side][0] * grads[side]["both"][n] + 2 * k[side][1] * grads[side][side][n]
                diff = three_norm / torch.norm(new_grad)
                p.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
        opt.step()
        self.steps += 1


# --- AGM, as model/CREMAD_net.py (GradMod) and run/CREMAD_main.py ---

class AGMOriginal:
    def __init__(self, net, alpha):
        self.net, self.alpha = net, alpha
        self.softmax = nn.Softmax(dim=1)
        self.scale_a = self.scale_v = 1.0
        self.train_score_a = self.train_score_v = 0.0
        self.iteration = 0

    def _scaled(self, x, side):
        # Modality_out's full backward hook: the gradient times the side's scale.
        out = x.view_as(x)
        out.register_hook(lambda g: g * (self.scale_a if side == "audio" else self.scale_v))
        return out

    def step(self, opt, data):
        x0, x1, label = data
        self.iteration += 1
        _, _, total_out = self.net(x0, x1)
        self.net.eval()
        pad_visual_out = self.net(x0, torch.zeros_like(x1))[2]
        pad_audio_out = self.net(torch.zeros_like(x0), x1)[2]
        self.net(torch.zeros_like(x0), torch.zeros_like(x1))  # zero_padding_out: computed, unused
        self.net.train()
        # Modality_Audio and Modality_Visual (model/CREMAD_net.py lines 7-17, 66-67).
        m_a = self._scaled(0.5 * (total_out - pad_audio_out + pad_visual_out), "audio")
        m_v = self._scaled(0.5 * (total_out - pad_visual_out + pad_audio_out), "visual")
        out = m_a + m_v
        out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
        out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
        loss = F.cross_entropy(out, label)
        opt.zero_grad()
        if torch.isnan(out_a).any() or torch.isnan(out_v).any():
            raise ValueError
        softmax = self.softmax
        score_audio = score_visual = 0.0
        for k in range(out_a.size(0)):  # run/CREMAD_main.py lines 133-141, as written
            if torch.isinf(torch.log(softmax(out_a)[k][label[k]])) or softmax(out_a)[k][label[k]] < 1e-8:
                score_audio += - torch.log(torch.tensor(1e-8, dtype=out_a.dtype, device=out_a.device))
            else:
                score_audio += - torch.log(softmax(out_a)[k][label[k]])
            if torch.isinf(torch.log(softmax(out_v)[k][label[k]])) or softmax(out_v)[k][label[k]] < 1e-8:
                score_visual += - torch.log(torch.tensor(1e-8, dtype=out_v.dtype, device=out_v.device))
            else:
                score_visual += - torch.log(softmax(out_v)[k][label[k]])
        score_audio, score_visual = score_audio / out_a.size(0), score_visual / out_v.size(0)
        ratio_a = math.exp(score_visual.item() - score_audio.item())
        ratio_v = math.exp(score_audio.item() - score_visual.item())
        optimal_ratio_a = math.exp(self.train_score_v - self.train_score_a)
        optimal_ratio_v = math.exp(self.train_score_a - self.train_score_v)
        coeff_a = math.exp(self.alpha * min(optimal_ratio_a - ratio_a, 10))
        coeff_v = math.exp(self.alpha * min(optimal_ratio_v - ratio_v, 10))
        i = self.iteration
        self.train_score_a = self.train_score_a * (i - 1) / i + score_audio.item() / i
        self.train_score_v = self.train_score_v * (i - 1) / i + score_visual.item() / i
        self.scale_a, self.scale_v = coeff_a, coeff_v
        loss.backward()
        opt.step()


def python_side(batch, seconds, rotations):
    """Seconds per step of vanilla, MMPareto and AGM taking turns in rotating order, for at
    least `seconds` and `rotations` rotations."""
    runs = [setup(batch, 0) for _ in range(3)]
    # AGM's alpha as the C++ benchmark's (AGMPolicy's default, 0.1): the same coefficients'
    # range on both sides (the original's 1.0 drives them to e^10 on a repeated batch).
    pareto, agm = MMParetoOriginal(runs[1][0]), AGMOriginal(runs[2][0], alpha=0.1)
    steps = [lambda: vanilla_step(*runs[0]), lambda: pareto.step(runs[1][1], runs[1][2]),
             lambda: agm.step(runs[2][1], runs[2][2])]
    for s in steps:  # warm-up
        s()
    total, n, turn, start = [0.0] * 3, 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < rotations:
        for k in range(3):
            which = (k + turn) % 3
            t = time.perf_counter()
            steps[which]()
            total[which] += time.perf_counter() - t
        turn += 1
        n += 1
    for net, _, _ in runs:
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise SystemExit("originals_cost: a Python model's parameters are not finite: the timing is void")
    return [t / n for t in total], pareto.conflicts / max(2 * pareto.steps, 1)


def cpp_side(binary, threads):
    """BM_LossMethodsPaired's seconds per step (its MinTime, 4 s, decides how long)."""
    out = subprocess.run(
        [binary, "--benchmark_filter=BM_LossMethodsPaired", "--benchmark_format=json"],
        check=True, capture_output=True, text=True,
        env={**os.environ, "MMBALANCE_BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
    result = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        batch = int(b["name"].split("/")[1])
        result[batch] = [b["vanilla_seconds"], b["mmpareto_seconds"], b["agm_seconds"],
                         b["mmpareto_conflict_fraction"]]
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpp", required=True, help="bench_training_step built against the same LibTorch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0, help="Python side per batch (the C++ side: 4)")
    ap.add_argument("--rotations", type=int, default=5, help="at least this many turns of the three steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = (8, 128)
    py = {b: [] for b in batches}
    cpp = {b: [] for b in batches}
    conflicts = {b: [] for b in batches}
    cpp_conflicts = {b: [] for b in batches}
    for r in range(args.rounds):  # the two sides in turns, so drift hits both
        for b in batches:
            t, c = python_side(b, args.seconds, args.rotations)
            py[b].append(t)
            conflicts[b].append(c)
        for b, t in cpp_side(args.cpp, args.threads).items():
            cpp[b].append(t[:3])
            cpp_conflicts[b].append(t[3])
        print(f"[originals_cost] round {r + 1} of {args.rounds} done", flush=True)
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    report = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "batches": {}}
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.rounds} rounds")
    print("batch | side | vanilla ms | MMPareto ms (/vanilla) | AGM ms (/vanilla)")
    for b in batches:
        row = {}
        for side, data in (("python (originals)", py[b]), ("c++ (mmbalance)", cpp[b])):
            v, m, a = (med(data, i) * 1e3 for i in range(3))
            # Each round's own ratios to vanilla: their range says how far to trust the medians.
            spread = {k: (min(r[i] / r[0] for r in data), max(r[i] / r[0] for r in data))
                      for k, i in (("mmpareto", 1), ("agm", 2))}
            row[side] = {"vanilla_ms": v, "mmpareto_ms": m, "agm_ms": a, "ratio_ranges": spread}
            print(f"{b} | {side} | {v:.2f} | {m:.2f} ({m / v:.2f}, rounds {spread['mmpareto'][0]:.2f}-"
                  f"{spread['mmpareto'][1]:.2f}) | {a:.2f} ({a / v:.2f}, rounds {spread['agm'][0]:.2f}-"
                  f"{spread['agm'][1]:.2f})")
        p, c = row["python (originals)"], row["c++ (mmbalance)"]
        row["cpp_over_python"] = {k: c[k] / p[k] for k in ("vanilla_ms", "mmpareto_ms", "agm_ms")}
        row["mmpareto_conflict_fraction"] = {"python": statistics.mean(conflicts[b]),
                                             "c++": statistics.mean(cpp_conflicts[b])}
        print(f"{b} | c++ / python | " + " | ".join(f"{v:.2f}" for v in row["cpp_over_python"].values())
              + f"  (MMPareto's conflicting encoder-steps: python {statistics.mean(conflicts[b]):.2f}, "
              f"c++ {statistics.mean(cpp_conflicts[b]):.2f})")
        report["batches"][b] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
