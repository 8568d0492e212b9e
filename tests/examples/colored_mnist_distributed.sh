#!/usr/bin/env bash
# End-to-end checks of data-parallel colored_mnist on 127.0.0.1 (tiny generated fixture):
# 2 ranks through scripts/launch-local write one log and one summary; their checkpoint
# resumes in 1 process; a rank killed mid-run, or one that never comes, makes the other
# fail within its timeout with a clear message, no summary and no half-written checkpoint.
# usage: colored_mnist_distributed.sh PATH/TO/colored_mnist
set -euo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
launch=$here/../../scripts/launch-local
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
source "$here/cli_helpers.sh"

/usr/bin/python3 "$here/make_mnist_fixture.py" "$work/data/mnist/digits"
base=(--data-dir "$work/data" --width 8 --train-size 240 --validation-size 80 --test-size 80
      --batch-size 32 --threads 1)
small=("${base[@]}" --policy guided --alpha 0 --Q 2)

# Flags that cannot form a group.
out=$("$bin" --out "$work/x" "${small[@]}" --world-size 2 2>&1) && fail "no --store accepted"
grep -qF -- "--store" <<<"$out" || fail "missing --store not named: $out"
out=$("$bin" --out "$work/x" "${small[@]}" --world-size 2 --rank 2 --store "file://$work/s0" 2>&1) \
  && fail "--rank 2 of 2 accepted"
grep -qF -- "--rank" <<<"$out" || fail "bad --rank not named: $out"
echo "ok: bad distributed flags rejected"

# 2 ranks, 2 epochs: one log and one summary, written by rank 0.
"$launch" 2 "$work/logs" "$bin" --out "$work/dist" "${small[@]}" --epochs 2 --dist-timeout 20 >/dev/null \
  || fail "2-rank run failed: $(tail -n 3 "$work"/logs/rank-*.log)"
[[ -s "$work/logs/rank-1.log" ]] || fail "no log of rank 1"
/usr/bin/python3 - "$work/dist" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
assert len(steps) == 2 * 8, len(steps)  # 240 rows in global batches of 32
assert any(s["kind"] != "regular" for s in steps[8:]), "guided with alpha 0 never re-balanced"
# guided trains Σ_k CE_k: the loss trained, averaged over the ranks, is the logged sum
assert all(abs(s["loss_trained"] - s["loss"]) < 1e-5 for s in steps), steps[0]
s = json.load(open(f"{run}/summary.json"))
assert s["args"]["world_size"] == 2
assert s["utilization_test"]["samples"] == 80, s["utilization_test"]  # all ranks' shares
print("ok: 2 ranks wrote one log and one summary")
PY

# OGM-GE over 2 ranks: rank 0 logs each step's coefficients, from the scores of both
# ranks' shares, and the run ends with a summary.
"$launch" 2 "$work/logs-ogm" "$bin" --out "$work/dist-ogm" "${base[@]}" --policy ogm-ge --ogm-alpha 0.8 \
  --epochs 2 --dist-timeout 20 >/dev/null || fail "2-rank OGM-GE run failed: $(tail -n 3 "$work"/logs-ogm/rank-*.log)"
/usr/bin/python3 - "$work/dist-ogm" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
assert len(steps) == 16 and all("coefficient0" not in s for s in steps[:8])
for s in steps[8:]:
    k = [s["coefficient0"], s["coefficient1"]]
    assert max(k) == 1.0 and 0 < min(k) <= 1.0, s
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["policy"] == "ogm-ge"
print("ok: OGM-GE over 2 ranks")
PY

# Gradient-Blending over 2 ranks: the losses of both ranks' held-out shares make one set
# of weights, logged by rank 0.
"$launch" 2 "$work/logs-gb" "$bin" --out "$work/dist-gb" "${base[@]}" --policy gblend --gblend-super-epoch 1 \
  --epochs 3 --dist-timeout 20 >/dev/null || fail "2-rank Gradient-Blending run failed: $(tail -n 3 "$work"/logs-gb/rank-*.log)"
/usr/bin/python3 - "$work/dist-gb" <<'PY'
import json, sys
epochs = [r for r in map(json.loads, open(f"{sys.argv[1]}/log.jsonl")) if r["type"] == "epoch"]
assert len(epochs) == 3 and epochs[0]["loss_weights"] == [1 / 3] * 3
assert all(abs(sum(e["loss_weights"]) - 1) < 1e-9 for e in epochs) and epochs[2]["loss_weights"] != [1 / 3] * 3
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["policy"] == "gblend"
print("ok: Gradient-Blending over 2 ranks")
PY

# MMPareto over 2 ranks: both ranks' fused gradients make one combination per branch,
# logged by rank 0.
"$launch" 2 "$work/logs-mp" "$bin" --out "$work/dist-mp" "${base[@]}" --policy mmpareto \
  --epochs 2 --dist-timeout 20 >/dev/null || fail "2-rank MMPareto run failed: $(tail -n 3 "$work"/logs-mp/rank-*.log)"
/usr/bin/python3 - "$work/dist-mp" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
assert len(steps) == 16 and all("fused_weight0" not in s for s in steps[:8])
assert all(0 < s[f"fused_weight{k}"] < 1 for s in steps[8:] for k in range(2))
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["policy"] == "mmpareto"
print("ok: MMPareto over 2 ranks")
PY

# AGM over 2 ranks: both ranks' masked passes make one set of scores, logged by rank 0.
"$launch" 2 "$work/logs-agm" "$bin" --out "$work/dist-agm" "${base[@]}" --policy agm --agm-alpha 0.5 \
  --epochs 2 --dist-timeout 20 >/dev/null || fail "2-rank AGM run failed: $(tail -n 3 "$work"/logs-agm/rank-*.log)"
/usr/bin/python3 - "$work/dist-agm" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
assert len(steps) == 16 and all("coefficient0" not in s for s in steps[:8])
assert all(s[f"coefficient{k}"] > 0 for s in steps[8:] for k in range(2))
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["policy"] == "agm"
print("ok: AGM over 2 ranks")
PY

# Sample-level valuation over 2 ranks: each values its share and the values are summed,
# so both build the rows one process builds from the same network: the 2-rank run's
# epoch 1 against its warm-up checkpoint resumed in 1 process.
smv=("${base[@]}" --fusion late --policy smv --warmup-epochs 1 --dist-timeout 20)
"$launch" 2 "$work/logs-smv" "$bin" --out "$work/dist-smv" "${smv[@]}" --epochs 2 >/dev/null \
  || fail "2-rank SMV run failed: $(tail -n 3 "$work"/logs-smv/rank-*.log)"
"$launch" 2 "$work/logs-smv-part" "$bin" --out "$work/dist-smv-part" "${smv[@]}" --epochs 1 >/dev/null \
  || fail "2-rank SMV warm-up failed: $(tail -n 3 "$work"/logs-smv-part/rank-*.log)"
"$bin" --out "$work/dist-smv-part" "${smv[@]}" --epochs 2 --resume "$work/dist-smv-part/checkpoint-last.pt" >/dev/null 2>&1 \
  || fail "1-process resume of the 2-rank SMV checkpoint failed"
/usr/bin/python3 - "$work/dist-smv" "$work/dist-smv-part" <<'PY'
import json, sys
two, one = ([json.loads(l) for l in open(f"{d}/log.jsonl")] for d in sys.argv[1:])
v, w = ([r for r in recs if r["type"] == "epoch"][1]["sample_valuation"] for recs in (two, one))
assert v == w, (v, w)
assert v["rows"] == 240 + sum(v["copies"]) > 240, v
assert sum(1 for r in two if r["type"] == "step" and r["epoch"] == 1) == v["rows"] // 32 + (v["rows"] % 32 >= 2), v
print("ok: SMV over 2 ranks builds the rows one process builds")
PY

# Rank 0's checkpoint resumes in 1 process.
"$bin" --out "$work/dist" "${small[@]}" --epochs 3 --resume "$work/dist/checkpoint-last.pt" >/dev/null 2>&1 \
  || fail "1-process resume of the 2-rank checkpoint failed"
/usr/bin/python3 - "$work/dist" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [0, 1, 2]
assert json.load(open(f"{sys.argv[1]}/summary.json"))["args"]["world_size"] == 1
print("ok: a 2-rank checkpoint resumes with 1 process")
PY

# A rank that never comes: rank 0 gives up within its timeout.
start=$SECONDS
out=$("$bin" --out "$work/alone" "${small[@]}" --world-size 2 --rank 0 --store "file://$work/s1" \
      --dist-timeout 3 2>&1) && fail "rank 0 ran without rank 1"
(( SECONDS - start < 30 )) || fail "rank 0 waited $((SECONDS - start)) s for a missing rank"
grep -qF "could not form the process group" <<<"$out" || fail "unclear error: $out"
[[ ! -e "$work/alone/summary.json" ]] || fail "summary written without the group"
echo "ok: a missing rank fails the run in $((SECONDS - start)) s"

# A rank killed mid-run: the other fails within its timeout.
store=file://$work/s2
"$bin" --out "$work/killed" "${small[@]}" --epochs 50 --world-size 2 --rank 0 --store "$store" \
  --dist-timeout 5 >"$work/rank0.log" 2>&1 &
pids+=($!)
"$bin" --out "$work/killed" "${small[@]}" --epochs 50 --world-size 2 --rank 1 --store "$store" \
  --dist-timeout 5 >"$work/rank1.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do  # until rank 0 has finished an epoch (a checkpoint exists)
  [[ -s "$work/killed/checkpoint-last.pt" ]] && break
  kill -0 "${pids[0]}" 2>/dev/null || fail "rank 0 ended early: $(tail -n 3 "$work/rank0.log")"
  sleep 0.1
done
[[ -s "$work/killed/checkpoint-last.pt" ]] || fail "rank 0 never finished an epoch"
kill -9 "${pids[1]}"
wait "${pids[1]}" 2>/dev/null || true  # reap it quietly
start=$SECONDS
rc=0
wait "${pids[0]}" || rc=$?
(( rc != 0 )) || fail "rank 0 exited 0 after its peer was killed"
(( SECONDS - start < 60 )) || fail "rank 0 took $((SECONDS - start)) s to notice"
grep -qE "rank 0 of 2: .* failed" "$work/rank0.log" || fail "unclear error: $(tail -n 3 "$work/rank0.log")"
[[ ! -e "$work/killed/summary.json" ]] || fail "summary written by a failed run"
! ls "$work/killed"/*.tmp >/dev/null 2>&1 || fail "a half-written checkpoint was left"
"$bin" --out "$work/killed" "${small[@]}" --epochs 2 --resume "$work/killed/checkpoint-last.pt" >/dev/null 2>&1 \
  || fail "the last checkpoint of the killed run does not resume"
echo "ok: a killed rank fails the run in $((SECONDS - start)) s; its last checkpoint resumes"
echo "colored_mnist distributed: all checks passed"
