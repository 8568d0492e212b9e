# Sourced by the example programs' end-to-end tests.
fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_error SUBSTRING OUT_DIR -- COMMAND...: the command must exit non-zero, say
# SUBSTRING, and leave no summary in OUT_DIR.
expect_error() {
  local want=$1 out_dir=$2
  shift 3
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  [[ $rc -ne 0 ]] || fail "exit 0 for: $*"
  grep -qF -- "$want" <<<"$out" || fail "message of '$*' lacks '$want': $out"
  [[ ! -e "$out_dir/summary.json" ]] || fail "a summary was written by the failing run: $*"
  echo "ok: rejected ($want)"
}

# expect_outputs DIR: a finished run's files are there and not empty.
expect_outputs() {
  local f
  for f in log.jsonl summary.json checkpoint-last.pt checkpoint-best.pt best.json; do
    [[ -s "$1/$f" ]] || fail "missing $1/$f"
  done
}

# run_and_resume NAME PART EPOCHS COMMAND...: COMMAND (the program and its flags but --out
# and --epochs) run for EPOCHS epochs into $work/NAME, and into $work/NAME-part for PART
# epochs (its output kept in $work/NAME-part.out) then resumed there to EPOCHS: the two
# folders must end alike.
run_and_resume() {
  local name=$1 part=$2 epochs=$3
  shift 3
  "$@" --out "$work/$name" --epochs "$epochs" >/dev/null 2>&1 || fail "the $name run failed"
  "$@" --out "$work/$name-part" --epochs "$part" >"$work/$name-part.out" 2>&1 || fail "the first $name part failed"
  "$@" --out "$work/$name-part" --epochs "$epochs" --resume "$work/$name-part/checkpoint-last.pt" >/dev/null 2>&1 \
    || fail "the resumed $name part failed"
}
