#!/usr/bin/env bash
# DreamBooth on the seed's FFHQ-256 model (the output of scripts/train_ffhq256_seed.sh: a 258M-parameter
# UNet on 4x32x32 latents of Stable Diffusion's VAE): make it generate one person from 5-20 photos.
#
#   PHOTOS=my_photos/ scripts/dreambooth_ffhq256.sh              # prior preservation, weight 0.5 (default)
#   PHOTOS=my_photos/ scripts/dreambooth_ffhq256.sh no_prior     # the variant without it
#   PHOTOS=my_photos/ scripts/dreambooth_ffhq256.sh prior --use_lora --rank 8   # extra arguments go to the trainer
#
# 1. The photos are aligned like FFHQ (align_faces.py, largest face of each photo, 256 px): the base model
#    only knows FFHQ framing. Rerunning skips photos already aligned.
# 2. With prior preservation, 200 class images are sampled from the base model into CLASS_DIR once (25
#    DPM-Solver++ steps each) and reused by every later run on this base. Each batch then holds 4 instance
#    + 4 class images; the prior loss (weight 0.5) keeps the samples diverse. Without it, 4 instance images
#    per batch: more of the subject, less diversity and a stronger pull towards the photos' backgrounds
#    and clothes. Watch samples/validation_*.png (fixed noise, every 100 steps; step 0 is the base model)
#    and metrics.jsonl (distance to the photos, spread of the samples) to pick the
#    number of steps; checkpoints every 200 steps allow going back.
#
# GPU memory: the batch of 4 instance + 4 class latents assumes a 12 GB card (16 GB gives headroom). Estimate,
# not measured on a GPU: full fine-tuning in fp32 holds ~3.8 GiB of weights, gradients and AdamW state for the
# 258M-parameter UNet, plus 1.3 GiB of saved activations for 8 latents of 4x32x32 (counted on a CPU with
# saved-tensor hooks; 0.75 GiB with --gradient_checkpointing), the SD VAE (0.3 GiB) and the CUDA context:
# about 7-8 GiB in all. --use_lora (rank 4: 1.4M weights, 0.5%, a 5 MiB adapter; learning rate 1e-4) needs
# about 4 GiB. Class-image generation (--sample_batch_size 16, no gradients) needs less than training.
set -euo pipefail
VARIANT=${1:-prior}
if [[ $# -gt 0 ]]; then shift; fi
PHOTOS=${PHOTOS:-photos}
BASE=${BASE:-outputs/ffhq256-seed}
INSTANCE_DIR=${INSTANCE_DIR:-data/dreambooth/instance_aligned256}
CLASS_DIR=${CLASS_DIR:-data/dreambooth/ffhq256-seed-class}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dreambooth-ffhq256-$VARIANT}

${PYTHON:-python} align_faces.py "$PHOTOS" --output_dir "$INSTANCE_DIR" --output_size 256 --faces largest

case "$VARIANT" in
  prior)
    PRIOR_ARGS=(--with_prior_preservation --class_data_dir "$CLASS_DIR" --num_class_images 200
                --prior_loss_weight 0.5 --sample_batch_size 16 --class_sampling_steps 25 --class_sampler dpmsolver++) ;;
  no_prior)
    PRIOR_ARGS=() ;;
  *)
    echo "usage: $0 [prior|no_prior] [extra trainer arguments]" >&2; exit 2 ;;
esac

accelerate launch ${ACCELERATE_ARGS:-} train_dreambooth_unconditional.py \
  --pretrained_model_name_or_path "$BASE" \
  --instance_data_dir "$INSTANCE_DIR" \
  ${PRIOR_ARGS[@]+"${PRIOR_ARGS[@]}"} \
  --resolution 256 --random_flip --cache_latents \
  --train_batch_size ${BATCH_SIZE:-4} --gradient_accumulation_steps ${GRAD_ACCUM:-1} \
  --max_train_steps ${MAX_STEPS:-800} \
  --learning_rate ${LEARNING_RATE:-5e-6} --lr_scheduler constant --lr_warmup_steps 0 \
  --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 1e-2 --max_grad_norm 1.0 \
  --mixed_precision ${MIXED_PRECISION:-no} \
  --validation_steps 100 --num_validation_images 16 --validation_inference_steps 50 --validation_scheduler dpmsolver++ \
  --checkpointing_steps 200 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --seed 0 \
  --output_dir "$OUTPUT_DIR" "$@"
