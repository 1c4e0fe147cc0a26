#!/usr/bin/env bash
# Issue 15's noise check: the pipeline's generating stages on SmolLM2-135M (target and its own
# draft, fp32, the default 18 prompts, 32 new tokens, K in {2, 4}, adaptive K), in a fresh clone.
#   bash experiments/noise/demo.sh quiet    # nothing else on the CPU
#   bash experiments/noise/demo.sh loaded   # one busy-loop process during ksweep@2 and adaptive
# Then: python experiments/noise/compare.py /tmp/demo15-quiet /tmp/demo15-loaded
set -euo pipefail
MODE=$1
D=/tmp/demo15-$MODE
SRC=$(cd "$(dirname "$0")/../.." && pwd)
[ -n "${VIRTUAL_ENV:-}" ] || source "$SRC/.venv/bin/activate"
rm -rf "$D" && git clone -q "$SRC" "$D" && cd "$D"
export PYTHONPATH=$D  # this clone's lab, not the editable install's
python - <<'PY'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["models"].update(target="smollm2-135m-instruct", draft="smollm2-135m-instruct",
                   scorer="smollm2-135m-instruct", dtype="float32")
p["generation"]["max_new_tokens"] = 32
p["ksweep"]["ks"] = [2, 4]
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
hog() { python3 -c "while True: pass" & HOG=$!; echo "hog $HOG on for $1"; }
unhog() { kill "$HOG"; echo "hog off"; }
start=$SECONDS
dvc repro -q baseline
[ "$MODE" = loaded ] && hog ksweep@2
dvc repro -q ksweep@2
[ "$MODE" = loaded ] && unhog
dvc repro -q ksweep@4
[ "$MODE" = loaded ] && hog adaptive
dvc repro -q adaptive@adaptive
[ "$MODE" = loaded ] && unhog
echo "wall $((SECONDS - start)) s"
