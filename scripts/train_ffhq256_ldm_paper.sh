#!/usr/bin/env bash
# The LDM paper's FFHQ-256 model (arXiv 2112.10752, Tables 1, 12, 18): a 274M-parameter UNet
# (configs/unet/ldm-ffhq256-vqf4.json) on 3x64x64 latents of CompVis' VQ-f4 autoencoder, batch 42,
# lr 8.4e-5, 635k iterations, LDM's "linear" schedule (diffusers' scaled_linear) 0.0015 -> 0.0195.
# The paper reports FID 4.98 (precision 0.73, recall 0.50) with 200 DDIM steps.
#
# The VQ-f4 first stage comes from the CompVis/ldm-celebahq-256 repository (subfolder vqvae); its
# latents are used with scale 1.0 (latent_scaling_factor auto does that for VQ models; see diffusers
# bug #6725 for what happens otherwise).
#
# GPU memory: batch 42 at 64x64 latents on ONE GPU needs about 33 GB (fp32, with EMA), as estimated
# in docs/benchmarks.md from CPU measurements: a 40-48 GB card. On 24-32 GB cards (21 x 2 accumulation)
# use --train_batch_size 21 --gradient_accumulation_steps 2 (about 19 GB), or 2 GPUs x 21.
set -euo pipefail
DATA_DIR=${DATA_DIR:-data/ffhq256}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/ffhq256-ldm-vqf4}

accelerate launch ${ACCELERATE_ARGS:-} train_unconditional_latent.py \
  --train_data_dir "$DATA_DIR" \
  --vae_name_or_path CompVis/ldm-celebahq-256 --vae_subfolder vqvae \
  --latent_scaling_factor auto \
  --model_config_name_or_path ldm-ffhq256-vqf4 \
  --resolution 256 --center_crop --random_flip \
  --cache_latents \
  --train_batch_size ${BATCH_SIZE:-42} --gradient_accumulation_steps ${GRAD_ACCUM:-1} \
  --max_train_steps 635000 \
  --learning_rate 8.4e-5 --lr_scheduler constant_with_warmup --lr_warmup_steps 10000 \
  --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 0.0 \
  --use_ema --ema_max_decay 0.9999 \
  --ddpm_num_steps 1000 --ddpm_beta_schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 \
  --validation_steps 10000 --validation_scheduler ddim --validation_inference_steps 200 \
  --checkpointing_steps 10000 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --dataloader_num_workers 8 \
  --output_dir "$OUTPUT_DIR" "$@"
