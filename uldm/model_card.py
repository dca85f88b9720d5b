"""The README.md (model card) of a saved pipeline: how it was made and how to use it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

USAGE = """\
```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)
images = pipe(batch_size=4, num_inference_steps=50).images
```

Or, without running code from the model folder (inside this toolkit's repository):

```python
from pipeline_latent_uncond import UnconditionalLatentPipeline

pipe = UnconditionalLatentPipeline.from_pretrained("{location}")
```
"""


def write_model_card(output_dir: str | os.PathLike, title: str, summary: str, arguments: dict,
                     images: dict[str, str | os.PathLike | None] | None = None, facts: dict | None = None,
                     usage: str | None = None) -> Path:
    """Write README.md into `output_dir`; images (caption -> PNG) are copied next to it.

    `usage` (Markdown) replaces the standard "load this folder as a pipeline" section, for outputs
    that are not a full pipeline (e.g. a LoRA adapter)."""
    output_dir = Path(output_dir)
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        "- latent-diffusion",
        "- unconditional-image-generation",
        "---",
        "",
        f"# {title}",
        "",
        summary,
        "",
    ]
    for caption, source in (images or {}).items():
        if source is None or not Path(source).is_file():
            continue
        name = Path(source).name if Path(source).parent == output_dir else f"card_{Path(source).name}"
        if Path(source).resolve() != (output_dir / name).resolve():
            shutil.copyfile(source, output_dir / name)
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    if facts:
        lines += ["## Facts", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in facts.items()]
        lines.append("")
    lines += ["## Usage", "", usage or USAGE.format(location=output_dir.name), "## Training arguments", "", "```json",
              json.dumps(arguments, indent=2, sort_keys=True, default=str), "```", ""]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
