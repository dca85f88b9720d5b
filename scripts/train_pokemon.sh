#!/usr/bin/env bash
# A first real run: the ~830 Pokemon images (huggan/pokemon) at 256 px through Stable Diffusion's VAE,
# with the 64M-parameter small UNet (configs/unet/small-sdvae256.json). Latents are cached after the
# first pass, so training touches only 4x32x32 tensors.
#
# GPU memory: batch 64 assumes a 24 GB card (RTX 3090/4090, A10, L4); on 12-16 GB cards use
# --train_batch_size 32 or add --gradient_checkpointing.
set -euo pipefail
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pokemon-ldm}

accelerate launch ${ACCELERATE_ARGS:-} train_unconditional_latent.py \
  --dataset_name huggan/pokemon \
  --vae_name_or_path stabilityai/sd-vae-ft-mse \
  --model_config_name_or_path small-sdvae256 \
  --resolution 256 --center_crop --random_flip \
  --cache_latents \
  --train_batch_size ${BATCH_SIZE:-64} \
  --num_epochs 400 \
  --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 500 \
  --use_ema --snr_gamma 5.0 \
  --mixed_precision ${MIXED_PRECISION:-bf16} \
  --validation_steps 1000 --checkpointing_steps 2000 --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest \
  --output_dir "$OUTPUT_DIR" "$@"
