#!/usr/bin/env bash
# Run our benchmarks and the TRL peer's (../shared/peer/trl) alternately in one go, so both see
# the same machine load, then print the ratios. Usage, from anywhere:
#
#   bash benchmarks/compare_trl.sh                # 2 rounds, default shapes
#   ROUNDS=3 OURS_ARGS="--mkl-avx2" bash benchmarks/compare_trl.sh
#   SHAPES=smollm2 ROUNDS=1 bash benchmarks/compare_trl.sh   # SmolLM2-135M architecture, ~1 min per step each
#   PEER_VENV=../trlvenv bash benchmarks/compare_trl.sh    # an existing venv with the peer's requirements
#
# Environment: ROUNDS (2), SHAPES (default | smollm2: passed as --shapes to ours, and to the
# peer's build_assets.py, whose assets go to their own folder), PPO_STEPS / GEN_REPS (steps,
# warm-up included, and generate repetitions; 11 / 10 at the default shapes, 4 / 3 at smollm2),
# OURS_ARGS (extra flags for our two benchmarks, e.g. --mkl-avx2), RL_ALGORITHMS (critic-free
# algorithms also run against the peer's bench_trl_grpo_rloo.py, 4 prompts x 2 completions per
# step: "grpo rloo" at the default shapes, none at smollm2), PEER_DIR (../shared/peer/trl), PEER_VENV
# (the peer's venv: its torch/transformers/TRL conflict with ours, so never this environment),
# PEER_CACHE (~/.cache/paddle-rlhf: the peer's venv and assets), OUT (output/benchmarks/<date>,
# git-ignored). The peer's venv is created on first use from its requirements (torch CPU wheel
# first), outside the repo and outside shared/.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PEER_DIR="${PEER_DIR:-$REPO/../shared/peer/trl}"
PEER_CACHE="${PEER_CACHE:-$HOME/.cache/paddle-rlhf}"
OUT="${OUT:-$REPO/output/benchmarks/$(date +%Y%m%d-%H%M%S)}"
ROUNDS="${ROUNDS:-2}"
SHAPES="${SHAPES:-default}"
OURS_ARGS="${OURS_ARGS:-}"
VENV="${PEER_VENV:-$PEER_CACHE/trl-peer-venv}"
case "$SHAPES" in
  default) ASSETS="$PEER_CACHE/trl-assets"; PPO_STEPS="${PPO_STEPS:-11}"; GEN_REPS="${GEN_REPS:-10}"
           RL_ALGORITHMS="${RL_ALGORITHMS-grpo rloo}" ;;
  # A step takes about a minute here: fewer steps and repetitions keep a round under ~15 min.
  smollm2) ASSETS="$PEER_CACHE/trl-assets-smollm2"; PPO_STEPS="${PPO_STEPS:-4}"; GEN_REPS="${GEN_REPS:-3}"
           RL_ALGORITHMS="${RL_ALGORITHMS-}" ;;
  *) echo "SHAPES must be default or smollm2 (the shapes both sides can build), got $SHAPES" >&2; exit 1 ;;
esac
export OMP_WAIT_POLICY=PASSIVE

[ -d "$PEER_DIR" ] || { echo "TRL peer not found at $PEER_DIR (set PEER_DIR)" >&2; exit 1; }
mkdir -p "$OUT" "$PEER_CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  echo "=== installing the peer's venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$(grep -E '^torch==' "$PEER_DIR/requirements.txt")"
  "$VENV/bin/pip" install --quiet -r "$PEER_DIR/requirements.txt"
fi
[ -f "$ASSETS/policy/config.json" ] || "$VENV/bin/python" "$PEER_DIR/build_assets.py" --shapes "$SHAPES" --out "$ASSETS" \
    > "$OUT/peer_build_assets.log"
echo "=== shapes $SHAPES, peer assets $ASSETS, $ROUNDS round(s), PPO steps $PPO_STEPS (1 warm-up), generate reps $GEN_REPS, also: ${RL_ALGORITHMS:-no critic-free algorithm}"
echo "=== CPU: $(lscpu | sed -n 's/^Model name: *//p'); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

run() {  # name, command...
  local name=$1; shift
  echo "=== $name (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$@" > "$OUT/$name.log" 2>&1 || { echo "failed, see $OUT/$name.log" >&2; exit 1; }
  grep -E "tokens/s|PPO step median|step median|peak RSS|of the floor|streaming floor" "$OUT/$name.log" | grep -v RESULT_JSON | tail -5 || true
}

for round in $(seq 1 "$ROUNDS"); do
  run "peer_generate_$round" "$VENV/bin/python" "$PEER_DIR/bench_gen_fwdbwd.py" --assets "$ASSETS" --threads 1 \
      --reps "$GEN_REPS" --fb_reps "$GEN_REPS" --json "$OUT/peer_generate_$round.json"
  # shellcheck disable=SC2086
  run "ours_generate_$round" python "$REPO/benchmarks/bench_generate.py" --shapes "$SHAPES" --reps "$GEN_REPS" $OURS_ARGS \
      --json "$OUT/ours_generate_$round.json"
  run "peer_ppo_$round" "$VENV/bin/python" "$PEER_DIR/bench_trl_ppo.py" --assets "$ASSETS" --threads 1 --steps "$PPO_STEPS" \
      --warmup 1 --json "$OUT/peer_ppo_$round.json"
  # shellcheck disable=SC2086
  run "ours_ppo_$round" python "$REPO/benchmarks/bench_ppo.py" --shapes "$SHAPES" --steps "$PPO_STEPS" --warmup 1 $OURS_ARGS \
      --json "$OUT/ours_ppo_$round.json"
  for algorithm in $RL_ALGORITHMS; do
    run "peer_${algorithm}_$round" "$VENV/bin/python" "$PEER_DIR/bench_trl_grpo_rloo.py" --algo "$algorithm" --assets "$ASSETS" \
        --threads 1 --steps "$PPO_STEPS" --warmup 1 --json "$OUT/peer_${algorithm}_$round.json"
    # shellcheck disable=SC2086
    run "ours_${algorithm}_$round" python "$REPO/benchmarks/bench_ppo.py" --algorithm "$algorithm" --shapes "$SHAPES" \
        --steps "$PPO_STEPS" --warmup 1 $OURS_ARGS --json "$OUT/ours_${algorithm}_$round.json"
  done
done
echo "=== load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

python "$REPO/benchmarks/compare_summary.py" "$OUT" | tee "$OUT/summary.txt"
