#!/usr/bin/env bash
# Rebuild Baby GeoChat from nothing on a CPU, in two stages like the real model:
#   synthetic data -> tokenizer
#   -> stage 1: the short answers only the image can give (presence, count, comparison, scene, [identify]),
#      from scratch, so the vision tower learns to see before it must point
#   -> stage 2: every task (grounded descriptions and [refer] boxes too), the whole model from stage 1
#   -> held-out eval -> loss curve.
# Usage: bash scripts/train_baby.sh [WORK_DIR]
#   STAGE1_STEPS, STAGE2_STEPS override the step counts; DTYPE (default auto: bf16 only on CPUs with native
#   bf16, float32 elsewhere) the compute dtype. The data is deterministic.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/baby-work}
stage1_steps=${STAGE1_STEPS:-1200}
stage2_steps=${STAGE2_STEPS:-2400}
dtype=${DTYPE:-auto}
mkdir -p "$work"
recipe=(--mode full --batch-size 16 --global-batch 16 --lr 1e-3 --warmup-ratio 0.03 --dtype "$dtype"
        --max-length 512 --save-every 500 --seed 0)

python synthetic/prepare.py scenes --out "$work/data" --n-train 16000 --n-test 300 --records-per-image 4 \
    --seed 0 --size 128 --workers 2
python synthetic/prepare.py scenes --out "$work/stage1-data" --n-train 16000 --n-test 0 --records-per-image 2 \
    --tasks presence,count,comparison,scene,identify --seed 0 --size 128 --workers 2
python synthetic/prepare.py tokenizer --corpus "$work/data/corpus.txt" --out "$work/data/tokenizer.model" \
    --vocab-size 1000

start=$SECONDS
python train.py --config baby --tokenizer "$work/data/tokenizer.model" --data "$work/stage1-data/train.json" \
    --image-folder "$work/stage1-data/images" --out "$work/stage1" --max-steps "$stage1_steps" "${recipe[@]}"
python train.py --checkpoint "$work/stage1" --train-vision --data "$work/data/train.json" \
    --image-folder "$work/data/images" --out "$work/stage2" --max-steps "$stage2_steps" "${recipe[@]}"
echo "training (both stages): $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"

for bench in scene vqa referring region_captioning; do
    python eval.py run --bench "$bench" --questions "$work/data/$bench.jsonl" --image-folder "$work/data/images" \
        --checkpoint "$work/stage2" --answers "$work/answers/$bench.jsonl" --batch-size 32 --device cpu
done
python eval.py score --bench vqa --answers "$work/answers/vqa.jsonl" --include-count
python scripts/plot_loss.py "$work/stage1/metrics.jsonl" "$work/stage2/metrics.jsonl" "$work/loss.png"
