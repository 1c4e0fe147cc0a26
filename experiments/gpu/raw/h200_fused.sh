#!/usr/bin/env bash
# H200 runs of issue 14's open GPU goals, through the `run` tool (each call one session of phases):
#   bash experiments/gpu/raw/h200_fused.sh PHASE...   (after installing the transformers wheel)
# Phases (in the order given; each skipped once the call has run past its budget):
#   engine15   lab bench-engine, 1.5B + 0.5B draft, compiled, fused (the default on CUDA)
#   spec15     lab bench, controlled drafter a = 0.5/0.7/0.8/0.9, K=4, compiled static, fused
#   prof15     one compiled 1.5B step profiled (fused)
#   unfused15  lab bench-engine, 1.5B, compiled, --no-fuse; then its step profiled
#   spec7      lab bench controlled, 7B target + 0.5B draft
#   engine7    lab bench-engine, 7B + 0.5B draft, compiled, fused
#   attn15     one compiled 1.5B step profiled per attention kernel (sdpa, sdpa-no-cudnn, eager)
#   engine15a  lab bench-engine, 1.5B alone, compiled, fused, with --attention $ATTN (default eager)
#   cudatests  the CUDA-marked tests of the fused and compiled engines (fp32, tiny models)
# Every engine is built with 504 cache positions (--prefill-tokens 504 in bench-engine; the six
# prompts' longest, 371 byte tokens, + 128 new + K + 1 in bench), so inductor's on-disk cache
# serves a graph compiled by an earlier phase. Results: $OUT/results.tgz, refreshed per phase.
#
# Two `run` calls, carry [".whl"], timeout_s 600, the second at once (a warm machine keeps
# /tmp/inductor), each:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
#     bash experiments/gpu/raw/h200_fused.sh engine15 spec15 prof15 unfused15   (then: spec7 engine7
#     cudatests)
# Copy in (tar xzf results.tgz): engine/nvidia-h200/*.json -> experiments/engine/nvidia-h200/
# (same schema, plus "fused"); gpu/*.json -> experiments/gpu/; gpu/raw/*.json, profile-*.json and
# engine-unfused/nvidia-h200/*.json (renamed engine-unfused-*.json) -> experiments/gpu/raw/.
set -u
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
W=$OUT/w
mkdir -p "$W"
T=random-qwen2.5-1.5b D=random-qwen2.5-0.5b S=random-qwen2.5-7b
BUDGET=${BUDGET:-570}
ENGINE=(python3 -m lab bench-engine --device cuda --dtypes bfloat16 --engines compiled
        --repeats 5 --prefill-tokens 504)
BENCH=(python3 -m lab bench --device cuda --dtype bfloat16 --compile --k 4 --max-new-tokens 128
       --categories code math_reasoning qa --per-category 2 --acceptance 0.5 0.7 0.8 0.9
       --methods lab_baseline_static '*controlled*_static' --out "$W/gpu")

phase() {  # name, command...: run it with the time left, log it, keep what it wrote
  local name=$1; shift
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 60 ]; then echo "== $name skipped: ${SECONDS}s used"; return; fi
  echo "== $name (at ${SECONDS}s, up to ${left}s)"
  timeout "$left" "$@" >"$W/$name.log" 2>&1
  echo "== $name rc=$? at ${SECONDS}s"
  grep -v "it/s\]\|s/it\]\|prompt/s\|Warning\|warn(" "$W/$name.log" | tail -12
  tar czf "$OUT/results.tgz" -C "$W" .
}

for p in "$@"; do
  case $p in
    engine15) phase engine15 "${ENGINE[@]}" --target $T --draft $D --out "$W/engine" ;;
    spec15) phase spec15 "${BENCH[@]}" --target $T --draft $D --tag h200-$T-controlled ;;
    prof15) phase prof15 python3 experiments/gpu/raw/profile_step.py $T 504 "$W/profile-$T-fused.json" ;;
    unfused15)
      phase unfused15 "${ENGINE[@]}" --target $T --no-fuse --out "$W/engine-unfused"
      phase prof15u python3 experiments/gpu/raw/profile_step.py $T 504 "$W/profile-$T-unfused.json" --no-fuse ;;
    spec7) phase spec7 "${BENCH[@]}" --target $S --draft $D --tag h200-$S-controlled ;;
    engine7) phase engine7 "${ENGINE[@]}" --target $S --draft $D --out "$W/engine" ;;
    attn15)
      for a in sdpa sdpa-no-cudnn eager; do
        phase "prof15-$a" python3 experiments/gpu/raw/profile_step.py $T 504 "$W/profile-$T-attn-$a.json" --attn $a
      done ;;
    engine15a) phase "engine15-${ATTN:-eager}" "${ENGINE[@]}" --target $T --attention "${ATTN:-eager}" --out "$W/engine-attn-${ATTN:-eager}" ;;
    cudatests) phase cudatests python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fuse.py tests/test_engine.py ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
