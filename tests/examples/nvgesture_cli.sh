#!/usr/bin/env bash
# End-to-end checks of the nvgesture example on a tiny generated fixture of extracted
# frames with NVGesture's list files: bad flags, lists and frames fail clearly with no
# summary; a short run learns the fixture; a resumed run (with augmentation) ends exactly
# like an uninterrupted one.
# usage: nvgesture_cli.sh PATH/TO/nvgesture
set -euo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/cli_helpers.sh"

/usr/bin/python3 "$here/make_nvgesture_fixture.py" "$work/nv"
shape=(--frames 8 --resize 20 --crop 16 --width 4 --batch-size 4 --threads 1 --validation-size 6)
small=("${shape[@]}" --classes 3)
train_list=nvgesture_train_correct_cvpr2016_v2.lst
broken() {  # a fresh copy of the fixture to break
  rm -rf "$work/broken"
  cp -r "$work/nv" "$work/broken"
}

expect_error "--data-dir is required" "$work/a" -- "$bin" --out "$work/a"
expect_error "--bogus" "$work/a" -- "$bin" --out "$work/a" --data-dir "$work/nv" --bogus
expect_error "--crop: must not exceed --resize" "$work/a" -- "$bin" --out "$work/a" --data-dir "$work/nv" --resize 16 --crop 20
expect_error "cannot open NVGesture list $work/nv/missing.lst" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/nv" "${small[@]}" --train-list missing.lst
expect_error "a list has label 3 but --classes is 2" "$work/a" -- "$bin" --out "$work/a" --data-dir "$work/nv" "${shape[@]}" --classes 2
broken; printf 'path:./Video_data/class_01/train_subject00_r0 color:sk_color:1:9 label:1\n' >> "$work/broken/$train_list"
expect_error "$train_list:31: expected path:, color: and depth: entries" "$work/a" -- "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}"
broken; sed -i '2s/color:sk_color:1:10/color:sk_color:one:10/' "$work/broken/$train_list"
expect_error "$train_list:2: START and END of 'color:sk_color:one:10' must be integers" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}"
broken; rm -r "$work/broken/Video_data/class_02/train_subject03_r0/sk_depth_all"
expect_error "missing frame folder $work/broken/Video_data/class_02/train_subject03_r0/sk_depth_all" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}"
broken; rm "$work"/broken/Video_data/class_03/test_subject00_r0/sk_color_all/0001[0-2].png
expect_error "sk_color_all has 9 frames, the gesture ends at frame 11" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}"
broken; printf 'not a png' > "$work/broken/Video_data/class_01/train_subject04_r0/sk_depth_all/00005.png"
expect_error "cannot decode image $work/broken/Video_data/class_01/train_subject04_r0/sk_depth_all/00005.png" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}" --epochs 1
broken
/usr/bin/python3 - "$work/broken/Video_data/class_02/test_subject01_r0/sk_color_all/00004.png" <<'PY'
import struct, sys, zlib
w, h = 30, 20  # the fixture's frames are 24x20
raw = b"".join(b"\x00" + bytes(3 * w) for _ in range(h))
chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                               + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
PY
expect_error "00004.png is 30x20 pixels; the clip's other frames are 24x20" "$work/a" -- \
  "$bin" --out "$work/a" --data-dir "$work/broken" "${small[@]}" --epochs 1

# A short guided run learns the fixture (the square's direction tells the class).
"$bin" --out "$work/full" --data-dir "$work/nv" "${small[@]}" --epochs 6 --policy guided --alpha 0 --Q 2 >/dev/null 2>&1 \
  || fail "the training run failed"
expect_outputs "$work/full"
/usr/bin/python3 - "$work/full" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
steps = [r for r in recs if r["type"] == "step"]
epochs = [r for r in recs if r["type"] == "epoch"]
assert len(steps) == 6 * 6, len(steps)  # 24 training clips in batches of 4
assert any(s["kind"] != "regular" for s in steps[6:]), "guided with alpha 0 never re-balanced"
assert max(e["test"]["y"] for e in epochs) >= 0.75, [e["test"] for e in epochs]
s = json.load(open(f"{run}/summary.json"))
assert (s["args"]["train_size"], s["args"]["validation_size"], s["args"]["test_size"]) == (24, 6, 9)
assert s["utilization_test"]["samples"] == 9
print("ok: a short run learns the fixture; logs, checkpoints and summary")
PY

# Interrupted after 2 epochs, resumed to 6: the same steps and summary (augmentation is
# drawn from the seed, the epoch and the step).
"$bin" --out "$work/part" --data-dir "$work/nv" "${small[@]}" --epochs 2 --policy guided --alpha 0 --Q 2 >/dev/null 2>&1 \
  || fail "the first part failed"
"$bin" --out "$work/part" --data-dir "$work/nv" "${small[@]}" --epochs 6 --policy guided --alpha 0 --Q 2 \
  --resume "$work/part/checkpoint-last.pt" >/dev/null 2>&1 || fail "the resumed part failed"
/usr/bin/python3 - "$work/full" "$work/part" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
for k in ("best_epoch", "test", "validation", "utilization_test", "steps_total"):
    assert a[k] == b[k], (k, a[k], b[k])
la = [l for l in open(f"{sys.argv[1]}/log.jsonl") if '"step"' in l]
lb = [l for l in open(f"{sys.argv[2]}/log.jsonl") if '"step"' in l]
assert la == lb, "step logs differ"
print("ok: resume is exact")
PY
# Gradient-Blending on clips loaded batch by batch: the held-out rows and the training
# sample go through the same loader.
"$bin" --out "$work/gb" --data-dir "$work/nv" "${small[@]}" --epochs 3 --policy gblend --gblend-super-epoch 1 \
  --held-out 0.2 >/dev/null 2>&1 || fail "the Gradient-Blending run failed"
/usr/bin/python3 - "$work/gb" <<'PY'
import json, sys
epochs = [r for r in map(json.loads, open(f"{sys.argv[1]}/log.jsonl")) if r["type"] == "epoch"]
assert len(epochs) == 3 and all(abs(sum(e["loss_weights"]) - 1) < 1e-9 for e in epochs), epochs
rows = json.load(open(f"{sys.argv[1]}/summary.json"))["rows"]
assert rows["held_out"] >= 1 and rows["train"] >= 1, rows
print("ok: Gradient-Blending on lazily loaded clips")
PY
echo "nvgesture CLI: all checks passed"
