"""Shared code of the unconditional latent diffusion toolkit.

The top-level scripts (train_unconditional_latent.py, train_dreambooth_unconditional.py,
train_vae.py, align_faces.py, sample.py, evaluate.py, synthesize_ema.py) are thin: they parse
their arguments, turn them into the typed configurations of this package (`args`) and call it.
Each idea has one home:

* `args`: command-line groups with diffusers' names; parsed arguments -> configs (the only module
  that reads an argparse namespace). `presets`: the JSON presets under configs/.
* `training`, `checkpoints`: the loop every trainer shares (LoopConfig, OptimizerConfig, EmaConfig;
  the Validation callback with its schedule; metrics.jsonl; crash-safe checkpoints; exact resume).
* `data`, `images`: training images and their preprocessing (DataConfig); `latents`: the latent space
  (scale rule from pipeline_latent_uncond.py, encoding, posterior samples, flips, the std);
  `vae`: loading first stages; `latent_cache`: storing/reading cached latents (CacheConfig);
  `diffusion`: noise schedule, timesteps, targets and losses, and their levers (LossConfig);
  `pixel_space`: training and sampling with no first stage (a DDPMPipeline).
* `sampling`: building/saving pipelines, schedulers by name, sample folders; `pipeline_loading`: loading
  a saved pipeline without running its code; `validation`: grids from fixed noise (ValidationConfig).
* `dreambooth`, `autoencoder`, `posthoc_ema`, `face_align`, `demo_data`: one job each.
* `fid`, `identity`, `subject_similarity`, `distances`: measuring samples; `fid_validation`: FID/KID of a
  model (in training, and of each EMA in synthesize_ema.py --sweep).
* `model_card`, `hub`: sharing results. `errors`: the error scripts print (exit 2). `testing`: test support.
"""

__version__ = "0.1.0"
