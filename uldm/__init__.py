"""Shared code of the unconditional latent diffusion toolkit.

The top-level scripts (train_unconditional_latent.py, train_dreambooth_unconditional.py,
train_vae.py, align_faces.py, sample.py, evaluate.py, synthesize_ema.py) are thin: they parse
their arguments, turn them into the typed configurations of this package (`args`) and call it.
Each idea has one home:

* `args`: command-line groups with diffusers' names; parsed arguments -> configs (the only module
  that reads an argparse namespace). `presets`: the JSON presets under configs/.
* `training/`: the loop every trainer shares, one module per reason to change: `config` (LoopConfig,
  OptimizerConfig, EmaConfig, TrainingConfig), `launch` (the accelerator, the engines' refusals, FSDP2's
  gathered weights), `builders` (optimiser, LR schedule, EMA, steps), `records` (signals, metrics.jsonl,
  read-backs), `loop` (TrainingLoop; the Validation callback with its schedule), `checkpoints` (crash-safe,
  verified checkpoints, exact resume, the keep-best policy; what a checkpoint holds: `CheckpointContents`),
  `posthoc_ema` (EDM2's post-hoc EMA).
* `data`, `images`: training images and their preprocessing (DataConfig); `first_stage`: the space a model
  works in, latent (a VAE and its scale) or pixel (no first stage, a DDPMPipeline), behind one interface, and
  loading any saved model; `latents`: the latent space (scale rule from pipeline_latent_uncond.py, encoding,
  posterior samples, flips, the std); `vae`: loading first stages; `latent_cache`: storing/reading cached
  latents (CacheConfig); `diffusion`: noise schedule, timesteps, targets and losses, and their levers (LossConfig).
* `sampling`: building/saving pipelines, schedulers by name, sample folders; `pipeline_loading`: loading
  a saved pipeline without running its code; `validation`: grids from fixed noise (ValidationConfig);
  `guidance`: guides for two-model guidance (load_guide) and the check that a guide fits its model.
* `dreambooth`, `autoencoder`, `face_align`, `demo_data`: one job each.
* `metrics/`: `fid`, `identity`, `subject_similarity`, `distances`: measuring samples; `fid_validation`:
  FID/KID of a model (in training, and of each EMA in synthesize_ema.py --sweep).
* `model_card`, `hub`: sharing results. `saving`: writes that survive a full disk (and what to do when one
  fails). `errors`: the error scripts print (exit 2). `testing`: test support.
"""

__version__ = "0.1.0"
