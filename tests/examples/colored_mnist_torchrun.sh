#!/usr/bin/env bash
# colored_mnist launched as users launch it: torchrun, 2 processes on this machine, no
# distributed flags (the program reads torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ...: env://).
# Both ranks report the same plans every epoch, and the run equals the same run started
# with our own flags (scripts/launch-local): the same steps, decisions and results. Then
# the variables a launch needs, missing, are named.
# usage: colored_mnist_torchrun.sh PATH/TO/torchrun PATH/TO/colored_mnist
set -euo pipefail
torchrun=$1 bin=$2
here=$(cd "$(dirname "$0")" && pwd)
launch=$here/../../scripts/launch-local
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$here/cli_helpers.sh"

/usr/bin/python3 "$here/make_mnist_fixture.py" "$work/data/mnist/digits"
args=(--data-dir "$work/data" --width 8 --train-size 240 --validation-size 80 --test-size 80
      --batch-size 32 --threads 1 --policy guided --alpha 0 --Q 2 --epochs 2 --dist-timeout 30)
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# --tee 3: every rank's output, each line prefixed with the rank ("[default1]:...").
"$torchrun" --nnodes 1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$port" --no-python \
  --tee 3 "$bin" --out "$work/torchrun" "${args[@]}" >"$work/torchrun.log" 2>&1 \
  || fail "torchrun run failed: $(tail -n 20 "$work/torchrun.log")"
"$launch" 2 "$work/logs" "$bin" --out "$work/flags" "${args[@]}" >/dev/null \
  || fail "launch-local run failed: $(tail -n 3 "$work"/logs/rank-*.log)"

/usr/bin/python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
# Each rank's last progress line of each epoch: "epoch E/2 ... steps r/m0/m1 a/b/c".
plans = {}
for line in open(f"{work}/torchrun.log", errors="replace"):
    for part in line.split("\r"):
        m = re.match(r"\[\D*(\d+)\]:.*?(epoch \d+/\d+).*steps r/m0/m1 (\d+/\d+/\d+)", part.strip())
        if m:
            plans.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
assert sorted(plans) == [0, 1], f"progress of ranks {sorted(plans)}: {open(f'{work}/torchrun.log').read()[-2000:]}"
assert plans[0] == plans[1] and len(plans[0]) == 2, plans
# The same run as with our own flags: steps, plans and the summary's results.
def steps(run):
    return [{k: v for k, v in r.items()} for r in map(json.loads, open(f"{work}/{run}/log.jsonl")) if r["type"] == "step"]
a, b = steps("torchrun"), steps("flags")
assert len(a) == 16 and a == b, "the torchrun run's steps differ from launch-local's"
assert any(s["kind"] != "regular" for s in a[8:]), "guided with alpha 0 never re-balanced"
sa, sb = (json.load(open(f"{work}/{run}/summary.json")) for run in ("torchrun", "flags"))
for key in ("best_epoch", "test", "validation", "utilization_test", "steps_total"):
    assert sa[key] == sb[key], (key, sa[key], sb[key])
assert sa["args"]["world_size"] == 2
print("ok: torchrun's 2 ranks took the same plans, and the run equals launch-local's")
PY

# A half-described launch: the missing variables are named.
out=$(env -i PATH="$PATH" WORLD_SIZE=2 "$bin" --out "$work/bad" "${args[@]}" 2>&1) \
  && fail "a launch without RANK, MASTER_ADDR and MASTER_PORT ran"
for name in "RANK (or SLURM_PROCID)" MASTER_PORT MASTER_ADDR; do
  grep -qF -- "$name" <<<"$out" || fail "missing $name not named: $out"
done
echo "ok: missing launch variables named"
