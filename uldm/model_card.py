"""The README.md (model card) of a saved pipeline: how it was made and how to use it.

The metadata block is written by huggingface_hub's ModelCardData, so the Hub reads it the way it reads
every diffusers model (library, pipeline tag, tags, base model, license); the body is ours. (diffusers'
`load_or_create_model_card` first looks for an existing card on the Hub, which needs the network, and
fills a template with sections for text-to-image models; it is not used.)"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

USAGE = """\
```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)
images = pipe(batch_size=4, num_inference_steps=50).images
```

Or, without running code from the model folder (inside this toolkit's repository):

```python
from uldm.pipeline_loading import load_pipeline

pipe = load_pipeline("{location}")
```
"""


DEFAULT_PIPELINE_TAG = "unconditional-image-generation"
CARD_COPY_PREFIX = "card_"  # images from elsewhere are copied next to README.md under this prefix
BASE_TAGS = ("latent-diffusion",)


def write_model_card(output_dir: str | os.PathLike, title: str, summary: str, arguments: dict,
                     images: dict[str, str | os.PathLike | None] | None = None, facts: dict | None = None,
                     usage: str | None = None, *, tags: Sequence[str] = (), base_model: str | None = None,
                     license: str | None = None, pipeline_tag: str | None = DEFAULT_PIPELINE_TAG,
                     location: str | None = None, base_tags: Sequence[str] = BASE_TAGS) -> Path:
    """Write README.md into `output_dir`; images (caption -> PNG) are copied next to it; `arguments` (the run's,
    without secrets: `uldm.hub.public_arguments`) are shown at the end.

    `usage` (Markdown) replaces the standard "load this folder as a pipeline" section, for outputs
    that are not a full pipeline (e.g. a LoRA adapter); `location` is what that standard section loads
    (default: the folder's name; the Hub repository id when the folder is pushed).
    Metadata: `tags` are added to `base_tags` ("latent-diffusion"; none for a pixel-space model) and the
    pipeline tag; `base_model` is the model this
    one was fine-tuned from (kept out of the metadata when it is a local folder, which the Hub would
    refuse; the body still names it); `license` a Hub license id (e.g. "apache-2.0", "cc-by-nc-sa-4.0")."""
    output_dir = Path(output_dir)
    card = ModelCard(f"---\n{card_metadata(tags, base_model, license, pipeline_tag, base_tags).to_yaml()}\n---\n\n"
                     + card_body(output_dir, title, summary, arguments, images, facts, usage, location))
    path = output_dir / "README.md"
    card.save(path)
    return path


def card_metadata(tags: Sequence[str] = (), base_model: str | None = None, license: str | None = None,
                  pipeline_tag: str | None = DEFAULT_PIPELINE_TAG, base_tags: Sequence[str] = BASE_TAGS) -> ModelCardData:
    all_tags = list(dict.fromkeys([*base_tags, *([pipeline_tag] if pipeline_tag else []), *tags]))
    return ModelCardData(library_name="diffusers", pipeline_tag=pipeline_tag, tags=all_tags,
                         base_model=hub_model_id_or_none(base_model), license=license)


def hub_model_id_or_none(name_or_path: str | None) -> str | None:
    """`name_or_path` if it can name a model on the Hub; None for a local folder or file."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def card_body(output_dir: Path, title: str, summary: str, arguments: dict, images, facts, usage, location) -> str:
    lines = [f"# {title}", "", summary, ""]
    copies = set()
    for caption, source in (images or {}).items():
        if source is None or not Path(source).is_file():
            continue
        name = Path(source).name if Path(source).parent == output_dir else f"{CARD_COPY_PREFIX}{Path(source).name}"
        if Path(source).resolve() != (output_dir / name).resolve():
            shutil.copyfile(source, output_dir / name)
            copies.add(name)
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    # The copies an earlier card of this folder showed (e.g. the grid of an earlier --save_model_epochs save).
    for stale in output_dir.glob(f"{CARD_COPY_PREFIX}*.png"):
        if stale.name not in copies:
            stale.unlink()
    if facts:
        lines += ["## Facts", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in facts.items()]
        lines.append("")
    lines += ["## Usage", "", usage or USAGE.format(location=location or output_dir.name), "## Training arguments",
              "", "```json", json.dumps(arguments, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
