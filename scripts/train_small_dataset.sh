#!/usr/bin/env bash
# A first real run on a small data set from the hub, at 256 px through Stable Diffusion's VAE, with the
# 64M-parameter small UNet (configs/unet/small-sdvae256.json). Latents are cached after the first pass,
# so training touches only 4x32x32 tensors.
#
#   bash scripts/train_small_dataset.sh pokemon   # huggan/pokemon, ~830 images, 400 epochs
#   bash scripts/train_small_dataset.sh flowers   # huggan/flowers-102-categories, ~8,200 images, 100 epochs
#
# GPU memory: batch 64 in bf16 needs about 6 GB by docs/benchmarks.md's estimate (from CPU
# measurements): an 8-12 GB card or anything larger; on cards under 8 GB use BATCH_SIZE=32
# (about 4 GB) or add --gradient_checkpointing. Extra arguments are passed on to the training script.
set -euo pipefail
case "${1:-}" in
  pokemon) DATASET=huggan/pokemon; EPOCHS=400 ;;
  flowers) DATASET=huggan/flowers-102-categories; EPOCHS=100 ;;
  *) echo "usage: bash scripts/train_small_dataset.sh pokemon|flowers [extra training arguments]" >&2; exit 2 ;;
esac
NAME=$1; shift
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$NAME-ldm}

accelerate launch ${ACCELERATE_ARGS:-} train_unconditional_latent.py \
  --dataset_name "$DATASET" \
  --vae_name_or_path stabilityai/sd-vae-ft-mse \
  --model_config_name_or_path small-sdvae256 \
  --resolution 256 --center_crop --random_flip \
  --cache_latents \
  --train_batch_size ${BATCH_SIZE:-64} \
  --num_epochs "$EPOCHS" \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 500 \
  --use_ema --snr_gamma 5.0 \
  --mixed_precision ${MIXED_PRECISION:-bf16} \
  --validation_steps 1000 --checkpointing_steps 2000 --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest \
  --output_dir "$OUTPUT_DIR" "$@"
