"""Measuring samples: `fid` (FID/KID, feature extractors, the reference cache), `identity` (face identity
distances), `subject_similarity` (DINO, CLIP-I), `distances` (the distances they share); `fid_validation`: the
FID/KID of a model, in training and of each EMA in synthesize_ema.py --sweep."""
