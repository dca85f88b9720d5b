#!/usr/bin/env python
"""Align face photos exactly like FFHQ (NVlabs/ffhq-dataset), for training data and DreamBooth instances.

    python align_faces.py photos/ more/IMG_0001.jpg --output_dir aligned --output_size 256

Each face becomes `<stem>_<k>.png` (k = 0 for the largest face) in a tree that mirrors the inputs'
folders; `manifest.jsonl` records source, output, the 68 landmarks and the crop quad of every
face. Finished sources are skipped on a rerun (resume after an interruption), unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from uldm.face_align import (
    DETECTORS,
    FFHQ_SIZE,
    MANIFEST_NAME,
    AlignOptions,
    ImageOutcome,
    align_files,
    finished_sources,
    plan_output_stems,
    read_manifest,
    write_manifest,
)
from uldm.errors import InputError, exit_cleanly_on_input_errors
from uldm.images import list_image_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="Image files or folders (searched recursively).")
    parser.add_argument("--output_dir", required=True, help="Where the aligned PNGs and manifest.jsonl go.")
    parser.add_argument("--output_size", type=int, default=FFHQ_SIZE,
                        help="Side of the aligned images. 1024 is FFHQ; smaller sizes (256) are LANCZOS "
                             "downscales of the 1024 alignment, as FFHQ-256 was made.")
    parser.add_argument("--transform_size", type=int, default=None,
                        help="Size at which the face square is sampled before the LANCZOS reduction "
                             "(default 4096 = FFHQ's 4x of 1024; e.g. 1024 is ~10x faster for --output_size 256 "
                             "and nearly identical).")
    parser.add_argument("--faces", choices=("largest", "all"), default="largest",
                        help="Write only the largest face of each photo (DreamBooth) or every face found.")
    parser.add_argument("--min_face_size", type=float, default=0.0,
                        help="Skip faces whose crop square spans fewer source pixels than this (e.g. the output "
                             "size, to avoid upscaled, blurry faces).")
    parser.add_argument("--no_rotation", action="store_true", help="Keep the crop upright: tilted faces stay tilted.")
    parser.add_argument("--no_padding", action="store_true",
                        help="Leave the crop's parts outside the photo black instead of blurred reflection.")
    parser.add_argument("--detector", choices=DETECTORS, default="hog",
                        help="dlib face detector: hog (fast) or cnn (more poses, slow on a CPU).")
    parser.add_argument("--upsample", type=int, default=1,
                        help="Times the detector doubles the photo first: 1 finds faces down to ~40 px, "
                             "0 is ~4x faster on large photos.")
    parser.add_argument("--detection_threshold", type=float, default=0.0,
                        help="Minimum detector score; raise it (e.g. 0.5) to drop weak false positives with --faces all.")
    parser.add_argument("--num_workers", type=int, default=1, help="Parallel processes (one dlib model each).")
    parser.add_argument("--overwrite", action="store_true", help="Redo sources that already have outputs.")
    return parser.parse_args(argv)


@dataclass
class Summary:
    images_found: int = 0
    images_skipped: int = 0  # finished by an earlier run
    images_read: int = 0
    faces_written: int = 0
    images_without_face: int = 0
    images_only_small_faces: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, outcome: ImageOutcome) -> None:
        if outcome.status == "failed":
            self.failures.append((outcome.source, outcome.error or "unknown error"))
            return
        self.images_read += 1
        self.faces_written += len(outcome.records)
        self.images_without_face += outcome.status == "no_face"
        self.images_only_small_faces += outcome.status == "too_small"

    def report(self, output_dir: str) -> str:
        lines = [
            f"Images found: {self.images_found} (skipped, already aligned: {self.images_skipped})",
            f"Images read: {self.images_read}",
            f"Faces written: {self.faces_written} -> {output_dir}",
            f"Images with no face: {self.images_without_face}",
        ]
        if self.images_only_small_faces:
            lines.append(f"Images with only faces below --min_face_size: {self.images_only_small_faces}")
        lines.append(f"Failures: {len(self.failures)}")
        lines.extend(f"  {source}: {error}" for source, error in sorted(self.failures))
        return "\n".join(lines)


@exit_cleanly_on_input_errors
def main(argv: list[str] | None = None) -> Summary:
    args = parse_args(argv)
    try:
        options = AlignOptions(
            output_size=args.output_size, transform_size=args.transform_size, faces=args.faces,
            min_face_size=args.min_face_size, rotate=not args.no_rotation, padding=not args.no_padding,
            detector=args.detector, upsample=args.upsample, detection_threshold=args.detection_threshold,
        )
        files = list_image_files(args.inputs)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from error
    output_dir = Path(args.output_dir)
    # An output folder inside an input folder must not be aligned again on the next run.
    files = [f for f in files if output_dir.resolve() not in f.resolve().parents]
    if not files:
        raise InputError(f"no image files found in {args.inputs}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "align_faces_args.json", "w") as handle:
        json.dump(vars(args), handle, indent=2)

    stems = plan_output_stems(files)
    manifest_path = output_dir / MANIFEST_NAME
    previous = read_manifest(manifest_path)
    done = set() if args.overwrite else finished_sources(previous, output_dir)
    # Keep records of sources not in this run and of finished ones; the rest are redone.
    write_manifest(manifest_path, [r for r in previous if r["source"] in done or r["source"] not in stems])
    tasks = [(source, stem) for source, stem in stems.items() if source not in done]

    summary = Summary(images_found=len(stems), images_skipped=len(stems) - len(tasks))
    with open(manifest_path, "a") as manifest, tqdm(total=len(tasks), unit="img", desc="Aligning") as progress:
        for outcome in align_files(tasks, output_dir, options, args.num_workers):
            for record in outcome.records:
                manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            summary.add(outcome)
            progress.update()
            progress.set_postfix(faces=summary.faces_written, failed=len(summary.failures))
    print(summary.report(str(output_dir)))
    return summary


if __name__ == "__main__":
    main()
