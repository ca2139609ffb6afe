#!/usr/bin/env bash
# Reproduce the default model (codegen-lm-mini) from scratch: tokenizer, data, training, export, and
# the quality figures quoted in the README. About an hour on 2 CPU cores.
#
#     bash scripts/train_default_model.sh [WORKDIR]     # default runs/default-model
#
# The data is the CPython standard library of the Python running this script (PSF licence), minus
# third-party site-packages, Python 2 test data and files that are deliberately not valid Python.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/default-model}
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
EXCLUDE=(--exclude 'site-packages/*' --exclude 'lib2to3/tests/data/*' --exclude '*badsyntax*'
         --exclude '*bad_coding*' --exclude 'test/tokenizedata/*')
start=$(date +%s)

codegen-lm tokenizer train "$STDLIB" "${EXCLUDE[@]}" --vocab-size 8192 --out "$WORK/tokenizer"
codegen-lm data prepare "$STDLIB" "${EXCLUDE[@]}" --tokenizer "$WORK/tokenizer" --out "$WORK/data" --holdout 0.02
codegen-lm train --config configs/default-model.toml --data "$WORK/data" --out-dir "$WORK/run"
echo "trained in $(( ($(date +%s) - start) / 60 )) minutes"

python scripts/export_model.py "$WORK/run/final" src/codegen_lm/models/codegen-lm-mini --dtype float16
python bench/default_model_quality.py --model src/codegen_lm/models/codegen-lm-mini --data "$WORK/data" \
    --out "$WORK/quality.json"
