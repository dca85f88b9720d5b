#!/usr/bin/env bash
# The seed's final FFHQ-256 recipe: a 258M-parameter UNet (configs/unet/seed-ffhq256-sdvae.json) on
# 4x32x32 latents of Stable Diffusion's VAE, global batch 84, lr 8.4e-5, 500 warm-up steps, EMA,
# 70 epochs, fp32.
#
# GPU memory: the batch of 84 on ONE GPU needs about 24 GB (fp32, with EMA), as estimated in
# docs/benchmarks.md from memory per image measured on the CPU: a 32-40 GB card; the seed itself ran
# on an 80 GB A100. With several GPUs keep the global batch: 2 GPUs x 42, 4 x 21, 7 x 12
# (--train_batch_size is per GPU), or use --gradient_accumulation_steps: 4 x 21 needs about 10 GB, for
# 12-24 GB cards. --gradient_checkpointing cuts activation memory further for
# about 30% more time.
#
# Data: FFHQ at 256 px as a folder of PNGs (e.g. from the ffhq-dataset's thumbnails or a 1024 set
# downscaled), or any aligned face folder made with align_faces.py --output_size 256.
set -euo pipefail
DATA_DIR=${DATA_DIR:-data/ffhq256}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/ffhq256-seed}
VAE=${VAE:-stabilityai/sd-vae-ft-mse}

accelerate launch ${ACCELERATE_ARGS:-} train_unconditional_latent.py \
  --train_data_dir "$DATA_DIR" \
  --vae_name_or_path "$VAE" \
  --model_config_name_or_path seed-ffhq256-sdvae \
  --resolution 256 --center_crop --random_flip \
  --cache_latents \
  --train_batch_size ${BATCH_SIZE:-84} --gradient_accumulation_steps ${GRAD_ACCUM:-1} \
  --num_epochs 70 \
  --learning_rate 8.4e-5 --lr_scheduler constant_with_warmup --lr_warmup_steps 500 \
  --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 0.0 \
  --use_ema --ema_max_decay 0.9999 \
  --mixed_precision no \
  --ddpm_num_steps 1000 --ddpm_beta_schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 \
  --validation_steps 2500 --num_validation_images 16 --validation_inference_steps 50 \
  --checkpointing_steps 5000 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --dataloader_num_workers 8 \
  --output_dir "$OUTPUT_DIR" "$@"
