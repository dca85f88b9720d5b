#!/usr/bin/env python
"""Draw the offline demo data set: cartoon faces (the training set) and one "subject" (for DreamBooth).

    python make_demo_data.py --output_dir data/demo --num_images 1024 --num_subject_images 8

Writes faces/00000.png ..., subject/00000.png ..., factors.jsonl (the factors of every image)
and preview.png / subject_preview.png (grids to look at). Deterministic: the same seed gives the
same pixels on every machine, and image i does not depend on --num_images.
"""

from __future__ import annotations

import argparse

from uldm.demo_data import SUBJECT, write_demo_dataset
from uldm.errors import InputError, exit_cleanly_on_input_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=1024, help="Faces in the main (training) set.")
    parser.add_argument("--num_subject_images", type=int, default=8, help="Images of the DreamBooth subject.")
    parser.add_argument("--resolution", type=int, default=32, help="Side of the images in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_images", "num_subject_images"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1.")
    if args.resolution < 16:
        raise InputError("--resolution must be at least 16 (smaller faces are unreadable).")
    return args


@exit_cleanly_on_input_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = write_demo_dataset(args.output_dir, args.num_images, args.num_subject_images, args.resolution, args.seed)
    subject = ", ".join(f"{key} {value}" for key, value in SUBJECT.items())
    print(f"Wrote {data.num_images} faces to {data.faces_dir} and {data.num_subject_images} images of the "
          f"subject ({subject}) to {data.subject_dir}; preview: {data.root / 'preview.png'}")


if __name__ == "__main__":
    main()
