#!/usr/bin/env bash
# The whole toolkit end to end, offline, in one command:
#   demo data -> VAE -> latent diffusion model -> samples -> DreamBooth on the subject -> samples.
#
#   bash scripts/quickstart.sh            # about 5 minutes on 2 CPU cores; uses a GPU if there is one
#   QUICK=1 bash scripts/quickstart.sh    # (or --quick) a few steps of each, to check that everything runs
#
# Pictures land in outputs/quickstart/ (OUTPUT_DIR=... to change). PYTHON picks the interpreter
# (default: .venv/bin/python if present, else python3); LAUNCH the launcher of the training scripts
# (default: "$PYTHON", one process; e.g. LAUNCH="accelerate launch --multi_gpu" for several GPUs).
# FID during training uses the FID Inception when INCEPTION_WEIGHTS=FILE is set (or the file is in torch's hub
# cache), else a fixed random convolutional network: offline and cheap, but not comparable with published FIDs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
QUICK="${QUICK:-0}"
for argument in "$@"; do
  case "$argument" in
    --quick) QUICK=1 ;;
    *) echo "usage: bash scripts/quickstart.sh [--quick]" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a LAUNCH <<< "${LAUNCH:-$PYTHON}"
OUT="${OUTPUT_DIR:-outputs/quickstart}"
export HF_HUB_OFFLINE=1  # nothing here downloads anything

if [[ "$QUICK" == 1 ]]; then
  NUM_IMAGES=64;   VAE_STEPS=6;   VAE_BATCH=8;  LDM_STEPS=6;    LDM_BATCH=16
  NUM_SAMPLES=16;  SAMPLE_STEPS=4; CLASS_IMAGES=8; DB_STEPS=4;  VALIDATION_STEPS=0
  FID_IMAGES=16
else
  NUM_IMAGES=1024; VAE_STEPS=2400; VAE_BATCH=8; LDM_STEPS=2500; LDM_BATCH=32
  NUM_SAMPLES=64;  SAMPLE_STEPS=25; CLASS_IMAGES=64; DB_STEPS=300; VALIDATION_STEPS=500
  FID_IMAGES=256
fi
DATA="$OUT/data"
COMMON=(--resolution 32 --checkpointing_steps 0 --report_to tensorboard --seed 0)
started=$SECONDS
INCEPTION_WEIGHTS="${INCEPTION_WEIGHTS:-}"
for cached in "${TORCH_HOME:-$HOME/.cache/torch}"/hub/checkpoints/{weights-inception,pt_inception}-2015-12-05-6726825d.pth; do
  if [[ -z "$INCEPTION_WEIGHTS" && -f "$cached" ]]; then INCEPTION_WEIGHTS="$cached"; fi
done
if [[ -n "$INCEPTION_WEIGHTS" ]]; then
  FID=(--validation_fid_images "$FID_IMAGES" --fid_feature_extractor inception --inception_weights "$INCEPTION_WEIGHTS")
  FID_NOTE="FID Inception ($INCEPTION_WEIGHTS)"
else
  FID=(--validation_fid_images "$FID_IMAGES" --fid_feature_extractor random-conv)
  FID_NOTE="a fixed random conv net (no Inception weights here): compare these FIDs with each other, not with papers"
fi

step() { printf '\n==> [%s] %s (%ds so far)\n' "$1" "$2" "$((SECONDS - started))"; }
fresh() { rm -rf "$@"; }  # each step starts clean, so a rerun never mixes in old results
sample_grid() {  # sample_grid PIPELINE NAME: NUM_SAMPLES images from fixed seeds -> $OUT/NAME.png
  fresh "$OUT/samples_$2"
  "$PYTHON" sample.py "$1" --num_images "$NUM_SAMPLES" --output_dir "$OUT/samples_$2" \
    --num_inference_steps "$SAMPLE_STEPS" --seed 0 --batch_size 64 --save_grid \
    --grid_rows "$(( NUM_SAMPLES >= 64 ? 8 : 4 ))"
  cp "$OUT/samples_$2/grid.png" "$OUT/$2.png"
}

mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  echo "Training on the GPU: $(nvidia-smi -L | head -n 1)"
else
  echo "No GPU found: training on the CPU."
fi

step 1/6 "Drawing the demo data set ($NUM_IMAGES faces and the subject)"
"$PYTHON" make_demo_data.py --output_dir "$DATA" --num_images "$NUM_IMAGES" --num_subject_images 8
cp "$DATA/preview.png" "$OUT/1_data.png"
cp "$DATA/subject_preview.png" "$OUT/4_subject.png"

step 2/6 "Training the first stage: a tiny AutoencoderKL (f4, 4 channels)"
fresh "$OUT/vae"
"${LAUNCH[@]}" train_vae.py "${COMMON[@]}" --train_data_dir "$DATA/faces" --model_config_name_or_path tiny-kl-f4 \
  --train_batch_size "$VAE_BATCH" --max_train_steps "$VAE_STEPS" --learning_rate 1e-3 --lr_scheduler cosine \
  --lr_warmup_steps "$(( VAE_STEPS / 20 ))" --validation_steps "$VALIDATION_STEPS" --num_validation_images 16 \
  --output_dir "$OUT/vae"
cp "$OUT/vae/reconstructions.png" "$OUT/2_reconstructions.png"
cp "$OUT/vae/loss_curve.png" "$OUT/loss_vae.png"

step 3/6 "Training the latent diffusion model (tiny UNet) on the VAE's latents"
fresh "$OUT/ldm"
"${LAUNCH[@]}" train_unconditional_latent.py "${COMMON[@]}" --train_data_dir "$DATA/faces" \
  --vae_name_or_path "$OUT/vae" --latent_scaling_factor auto --model_config_name_or_path tiny --cache_latents \
  --random_flip --train_batch_size "$LDM_BATCH" --max_train_steps "$LDM_STEPS" --learning_rate 1e-3 \
  --lr_scheduler cosine --lr_warmup_steps "$(( LDM_STEPS / 20 ))" --use_ema --ema_max_decay 0.999 \
  --validation_steps "$VALIDATION_STEPS" --num_validation_images 16 --validation_inference_steps "$SAMPLE_STEPS" \
  "${FID[@]}" --output_dir "$OUT/ldm"
cp "$OUT/ldm/loss_curve.png" "$OUT/loss_ldm.png"
echo "FID/KID of $FID_IMAGES samples against the $NUM_IMAGES training faces during training; features: $FID_NOTE"
"$PYTHON" -c 'import sys; from uldm.metrics.fid_validation import fid_history; print(fid_history(sys.argv[1]))' "$OUT/ldm"

step 4/6 "Sampling the base model"
sample_grid "$OUT/ldm" 3_base_samples

step 5/6 "DreamBooth on the subject, with prior preservation"
if [[ -f train_dreambooth_unconditional.py ]]; then
  fresh "$OUT/dreambooth" "$OUT/class_images"
  "${LAUNCH[@]}" train_dreambooth_unconditional.py "${COMMON[@]}" --pretrained_model_name_or_path "$OUT/ldm" \
    --instance_data_dir "$DATA/subject" --with_prior_preservation --class_data_dir "$OUT/class_images" \
    --num_class_images "$CLASS_IMAGES" --prior_loss_weight 0.5 --class_sampling_steps "$SAMPLE_STEPS" \
    --sample_batch_size 16 --train_batch_size 4 --max_train_steps "$DB_STEPS" --learning_rate 5e-5 \
    --lr_scheduler constant --lr_warmup_steps 0 --validation_steps 0 --num_validation_images 16 \
    --validation_inference_steps "$SAMPLE_STEPS" --output_dir "$OUT/dreambooth"
  cp "$OUT/dreambooth/loss_curve.png" "$OUT/loss_dreambooth.png"
  step 6/6 "Sampling the fine-tuned model (same seeds as the base samples)"
  sample_grid "$OUT/dreambooth" 5_dreambooth_samples
else
  echo "Skipping DreamBooth: train_dreambooth_unconditional.py is not in this checkout."
  step 6/6 "Skipped (no DreamBooth model to sample)"
fi

printf '\nDone in %d s. Look at %s/:\n' "$((SECONDS - started))" "$OUT"
for picture in "$OUT"/*.png; do echo "  $picture"; done
cat <<EOF
  1_data: training faces   2_reconstructions: held-out faces (left) beside the VAE's reconstructions (right)
  3_base_samples: the latent diffusion model   4_subject: the DreamBooth subject
  5_dreambooth_samples: the fine-tuned model (same seeds as 3)   loss_*: training curves (loss_ldm: with FID/KID)
Models: $OUT/vae (AutoencoderKL), $OUT/ldm and $OUT/dreambooth (pipelines); TensorBoard: tensorboard --logdir $OUT
EOF
