#!/usr/bin/env bash
# Reproduce the default model (codegen-lm-mini) from scratch: tokenizer, data, training, export, and
# the quality figures quoted in the README. About an hour on 2 CPU cores.
#
#     bash scripts/train_default_model.sh [WORKDIR]     # default runs/default-model
#
# The data is the CPython standard library of the Python running this script (PSF licence), minus
# third-party site-packages, Python 2 test data and files that are deliberately not valid Python.
#
# Settings, from the environment (the defaults reproduce the shipped model):
#   CONFIG=FILE        the training config (default configs/default-model.toml)
#   TRAIN_ARGS="..."   extra `codegen-lm train` flags (e.g. "--max-steps 2 --no-compile" for a smoke test)
#   PACKAGES="a==1 b"  also take the Python source of these PyPI packages, installed with --no-deps into
#                      WORKDIR/site (not into this environment); their licences are checked from their
#                      metadata, permissive ones only (`codegen-lm data prepare --package`)
#   FILTERS="..."      `codegen-lm data prepare` filters (e.g. "--drop-tests --drop-generated --near-duplicates 0.85")
#   EXPORT=DIR         where the trained model is exported (default: the package's codegen-lm-mini folder)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/default-model}
CONFIG=${CONFIG:-configs/default-model.toml}
EXPORT=${EXPORT:-src/codegen_lm/models/codegen-lm-mini}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a FILTER_ARGS <<< "${FILTERS:-}"
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
EXCLUDE=(--exclude 'site-packages/*' --exclude 'lib2to3/tests/data/*' --exclude '*badsyntax*'
         --exclude '*bad_coding*' --exclude 'test/tokenizedata/*')
SOURCES=("$STDLIB")
if [ -n "${PACKAGES:-}" ]; then
    read -r -a WANTED <<< "$PACKAGES"
    pip install --quiet --no-deps --target "$WORK/site" "${WANTED[@]}"
    SOURCES+=(--site "$WORK/site")
    for spec in "${WANTED[@]}"; do SOURCES+=(--package "${spec%%[=<>]*}"); done
fi
start=$(date +%s)

codegen-lm tokenizer train "${SOURCES[@]}" "${EXCLUDE[@]}" --vocab-size 8192 --out "$WORK/tokenizer"
codegen-lm data prepare "${SOURCES[@]}" "${EXCLUDE[@]}" "${FILTER_ARGS[@]}" --tokenizer "$WORK/tokenizer" \
    --out "$WORK/data" --holdout 0.02
codegen-lm train --config "$CONFIG" --data "$WORK/data" --out-dir "$WORK/run" "${TRAIN_EXTRA[@]}"
echo "trained in $(( ($(date +%s) - start) / 60 )) minutes"

python scripts/export_model.py "$WORK/run/final" "$EXPORT" --dtype float16
python bench/default_model_quality.py --model "$EXPORT" --data "$WORK/data" --out "$WORK/quality.json"
