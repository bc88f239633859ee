#!/usr/bin/env bash
# Rebuild Baby GeoChat from nothing on a CPU: synthetic data -> tokenizer -> pretrained tower -> three train.py stages
# -> held-out eval. Usage: bash scripts/train_baby.sh [WORK_DIR]   (59.6 min of training on a 2-core AVX512 CPU: the
# tower 6.1, the three train.py stages 36.35, 9.43 and 7.75, as the commands that wrote
# checkpoints/baby-geochat/model.safetensors took them run one at a time; the 6-layer baby's recipe, these commands
# but for the decoder's depth, gave its weights bit for bit run end to end)
#
# The recipe of the shipped checkpoint (README, "Baby GeoChat"):
#   1. the vision tower alone (synthetic/pretrain_tower.py): which class covers each patch, and that object's box,
#      each value also place-coded as a 101-way choice, the rate falling to 0 by a cosine; then frozen, as GeoChat
#      keeps CLIP frozen;
#   2. train.py on presence, count, [refer] and the scene (presence and refer twice as often), every record 3-5
#      different questions about its image, none answered by an earlier turn, and a [refer] question about a scene
#      of several classes asked of every class, so that only the class named decides the box;
#   3. train.py from stage 2 on every task, presence, count, [refer], comparison and the grounded description asked
#      most (a description is a record of its own, asked first as sample.py asks it), records written like stage 2's,
#      lr 1e-3;
#   4. train.py from stage 3 on the same records at lr 3e-4.
# Box values and the prompts' fixed phrases are single tokenizer pieces (--box-pieces --prompt-pieces) and the prompts
# use the llava_v1 template that sample.py and eval.py ask with (--template llava_v1). DTYPE=auto trains in bf16 on
# CPUs with native bf16; at the baby's widths float32 is the faster choice even there (README), so the default here
# is float32 on every CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/baby-work}
dtype=${DTYPE:-float32}
mkdir -p "$work"
common=(--mode full --batch-size 16 --global-batch 16 --warmup-ratio 0.03 --dtype "$dtype" --max-length 512
        --template llava_v1 --compile --save-every 500)
records=(--n-train 8000 --n-test 0 --seed 0 --multi-turn-prob 1.0 --records-per-image 3 --turns 3-5
         --refuse-given-away --refer-every-class)

# data: 8000 training scenes and 300 held-out ones (the bench files), the same scenes for every stage
python synthetic/prepare.py scenes --out "$work/data" --n-train 8000 --n-test 300 --seed 0 --multi-turn-prob 0
python synthetic/prepare.py tokenizer --corpus "$work/data/corpus.txt" --out "$work/data/tokenizer.model" \
    --vocab-size 1000 --box-pieces --prompt-pieces
python synthetic/prepare.py scenes --out "$work/reading" "${records[@]}" --tasks presence,presence,count,refer,refer,scene
python synthetic/prepare.py scenes --out "$work/all" "${records[@]}" \
    --tasks presence,presence,presence,presence,count,count,count,refer,refer,refer,refer,refer,refer,comparison,comparison,comparison,grounding,grounding,grounding,grounding,grounding,identify,identify,scene

# 1. the tower
python synthetic/pretrain_tower.py --config baby --out "$work/tower" --steps 2000 --schedule cosine

# 2. presence, count, [refer], the scene
python train.py --config baby --vision-tower "$work/tower" --tokenizer "$work/data/tokenizer.model" \
    --data "$work/reading/train.json" --image-folder "$work/data/images" --out "$work/stage1" \
    --max-steps 3400 --seed 0 --lr 1e-3 "${common[@]}"

# 3. every task
python train.py --checkpoint "$work/stage1" --data "$work/all/train.json" --image-folder "$work/data/images" \
    --out "$work/stage2" --max-steps 1000 --seed 3 --lr 1e-3 "${common[@]}"

# 4. the same records at a third of the rate
python train.py --checkpoint "$work/stage2" --data "$work/all/train.json" --image-folder "$work/data/images" \
    --out "$work/run" --max-steps 800 --seed 4 --lr 3e-4 "${common[@]}"

rm -rf "$work/answers"  # eval.py run resumes into an answers file: never mix a rerun's answers with an older model's
for bench in scene vqa referring region_captioning; do
    python eval.py run --bench "$bench" --questions "$work/data/$bench.jsonl" --image-folder "$work/data/images" \
        --checkpoint "$work/run" --answers "$work/answers/$bench.jsonl" --batch-size 32 --device cpu
done
python scripts/score_descriptions.py --checkpoint "$work/run" --data "$work/data"  # grounded descriptions, box by box
python scripts/plot_loss.py --first-stage 2 "$work/stage1/metrics.jsonl" "$work/stage2/metrics.jsonl" "$work/run/metrics.jsonl" "$work/loss.png"
