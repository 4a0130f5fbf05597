#!/bin/bash
# The four arms of config/train_recall.py side by side on one GPU (same batches, same seed), then report.py's
# retrieval views of them: how the four-arm rounds of retrieval.md ran.
#   bash dev/recall_arms.sh RUNS [SECONDS] [--key=value ...]     # the overrides go to every arm
#   ARMS="dense idx" NIAH_SCALES=1 bash dev/recall_arms.sh ...    # a subset of the arms; the needle grid's scales
# Each arm is stopped after SECONDS (default 540) as Ctrl-C stops it, with a checkpoint: run the same command with
# --init_from=resume to continue. RUNS/<arm> holds each run, RUNS/<arm>.txt its output, RUNS/*.png the figures.
set -u
runs=${1:?usage: bash dev/recall_arms.sh RUNS [SECONDS] [--key=value ...]}
seconds=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
arms=${ARMS:-dense idx local random}
mkdir -p "$runs"
declare -A select=([idx]="--msa_select=indexer" [local]="--msa_select=local" [random]="--msa_select=random"
                   [dense]="--attention=dense")
for arm in $arms; do
    timeout -s INT "$seconds" python train.py config/train_recall.py ${select[$arm]} --out_dir="$runs/$arm" "$@" \
        > "$runs/$arm.txt" 2>&1 &
done
wait
dirs=()
for arm in $arms; do
    echo "== $arm"; grep -o "mqar acc [0-9.]*\|over [0-9]* tokens" "$runs/$arm.txt" | paste -d' ' - -
    tail -1 "$runs/$arm.txt"
    dirs+=("$runs/$arm")
done
python report.py mqar "${dirs[@]}" --png="$runs/mqar.png" --mqar_questions=1024
if [[ " $arms " == *" idx "* ]]; then
    python report.py needle --out_dir="$runs/idx" --png="$runs/needle.png"
    python report.py niah "${dirs[@]:0:2}" --niah_scales="${NIAH_SCALES:-1,2,4}" --niah_rows=2 --png="$runs/niah.png"
fi
