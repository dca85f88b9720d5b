"""Shared code of the unconditional latent diffusion toolkit.

The top-level scripts (train_unconditional_latent.py, train_dreambooth_unconditional.py,
train_vae.py, align_faces.py, sample.py, evaluate.py) are thin; what they share lives here.
"""

__version__ = "0.1.0"
