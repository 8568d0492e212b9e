#!/usr/bin/env python3
"""Merges Google Benchmark JSON files into one and prints each question's ratios
against its target (median of the repetitions)."""
import argparse
import json
import sys


def medians(files):
    merged = {"context": None, "benchmarks": []}
    times, counters = {}, {}
    for path in files:
        with open(path) as f:
            text = f.read()
        if not text.strip():  # bench_cuda without a GPU registers no benchmark
            print(f"(no results in {path})")
            continue
        data = json.loads(text)
        merged["context"] = merged["context"] or data["context"]
        for b in data["benchmarks"]:
            merged["benchmarks"].append(b)
            if b.get("aggregate_name") == "median":
                # bench_cuda's manually timed runs end in /manual_time
                name = b["run_name"].split("/min_time")[0].split("/repeats")[0].removesuffix("/manual_time")
                times[name] = b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1}[b["time_unit"]]
                for key, value in b.items():  # BM_StepsPaired's ratios, *_over_vanilla
                    if key.endswith("_over_vanilla"):
                        counters[(name, key)] = value
    return merged, times, counters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    merged, t, counters = medians(args.files)
    rows = []

    def ratio(label, num, den, target, op):
        if num not in t or den not in t:
            return
        r = t[num] / t[den]
        if target is None:  # reported for what it explains, no target of its own
            rows.append({"question": label, "numerator": num, "denominator": den, "ratio": r,
                         "target": "-", "met": None})
            return
        ok = r <= target if op == "<=" else r >= target
        rows.append({"question": label, "numerator": num, "denominator": den, "ratio": r,
                     "target": f"{op} {target:g}", "met": ok})

    def paired(label, bench, counter, target):
        if (bench, counter) not in counters:
            return
        r = counters[(bench, counter)]
        rows.append({"question": label, "numerator": f"{bench}:{counter}", "denominator": "", "ratio": r,
                     "target": "-" if target is None else f"<= {target:g}",
                     "met": None if target is None else r <= target})

    for model, name in (("0", "colored-MNIST net"), ("1", "ResNet18 pair")):
        ratio(f"naive / meter ({name})", f"BM_NaivePerParameter/{model}", f"BM_MeterObserve/{model}", 10, ">=")
        ratio(f"meter / floor ({name})", f"BM_MeterObserve/{model}", f"BM_FloorNorm/{model}", 2, "<=")
    for b, target in ((8, 1.03), (32, 1.03), (128, 1.01)):
        paired(f"guided / vanilla, batch {b} (paired)", f"BM_StepsPaired/{b}", "guided_over_vanilla", target)
        paired(f"guided (no checks) / vanilla, batch {b} (paired)", f"BM_StepsPaired/{b}",
               "guided_no_checks_over_vanilla", target)
        paired(f"re-balancing / vanilla, batch {b} (paired)", f"BM_StepsPaired/{b}", "rebalance_over_vanilla", 1.0)
        ratio(f"balancer overhead (observe alone) / vanilla step, batch {b}", f"BM_BalancerObserveOnly/{b}",
              f"BM_StepVanilla/{b}", round(target - 1, 6), "<=")
    for b in (8, 128):  # reported, no target: what a method costs is its own
        paired(f"OGM-GE / vanilla, batch {b} (paired)", f"BM_OGMGEPaired/{b}", "ogm_ge_over_vanilla", None)
        paired(f"OGM (no noise) / vanilla, batch {b} (paired)", f"BM_OGMGEPaired/{b}", "ogm_over_vanilla", None)
    ratio("full probe / plain evaluation", "BM_FullProbe", "BM_PlainEvaluation", 2.2, "<=")
    ratio("evaluate_utilization (averages recorded) / plain evaluation", "BM_EvaluateUtilization", "BM_PlainEvaluation", 2.2, "<=")
    ratio("record_squeeze_averages / plain evaluation (same size)", "BM_RecordSqueezeAverages", "BM_PlainEvaluation", None, None)
    ratio("CUDA naive / meter (ResNet18 pair)", "CUDA_NaivePerParameter/resnet18_pair", "CUDA_MeterObserve/resnet18_pair", 10, ">=")
    ratio("CUDA meter / floor (ResNet18 pair)", "CUDA_MeterObserve/resnet18_pair", "CUDA_FloorNorm/resnet18_pair", 2, "<=")
    for b, target in ((8, 1.03), (32, 1.03), (128, 1.01)):
        ratio(f"CUDA guided / vanilla, batch {b}", f"CUDA_StepGuidedRegular/{b}", f"CUDA_StepVanilla/{b}", target, "<=")
        ratio(f"CUDA guided (no checks) / vanilla, batch {b}", f"CUDA_StepGuidedRegularNoChecks/{b}", f"CUDA_StepVanilla/{b}", target, "<=")
        ratio(f"CUDA guided (lagged d_speed) / vanilla, batch {b}", f"CUDA_StepGuidedRegularLagged/{b}", f"CUDA_StepVanilla/{b}", target, "<=")
        ratio(f"CUDA re-balancing / vanilla, batch {b}", f"CUDA_StepRebalance/{b}", f"CUDA_StepVanilla/{b}", 1.0, "<=")
        ratio(f"CUDA OGM-GE / vanilla, batch {b}", f"CUDA_StepOGMGE/{b}", f"CUDA_StepVanilla/{b}", None, None)
        ratio(f"CUDA OGM (no noise) / vanilla, batch {b}", f"CUDA_StepOGM/{b}", f"CUDA_StepVanilla/{b}", None, None)

    merged["ratios"] = rows
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    ctx = merged["context"]
    print(f"\nhost {ctx.get('host_name')}, {ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz, "
          f"{ctx.get('date')}; results in {args.out}")
    print(f"{'question':58} {'ratio':>8}  {'target':>8}  met")
    for r in rows:
        met = "-" if r["met"] is None else "yes" if r["met"] else "NO"
        print(f"{r['question']:58} {r['ratio']:8.3f}  {r['target']:>8}  {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
