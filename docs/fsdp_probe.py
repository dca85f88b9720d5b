#!/usr/bin/env python
"""Not a benchmark: the experiment behind docs/fsdp_notes.md, kept so that it can be run again.

A tiny UNet2DModel (configs/unet/tiny.json) trained through accelerate the way uldm/training/ does
(AdamW, a LambdaLR registered for checkpointing, diffusers' EMAModel, accelerator.clip_grad_norm_,
save_state/load_state, get_state_dict), in 2 CPU processes with gloo. accelerate 1.15 never selects FSDP
for CPU processes, so --force_fsdp 1|2 forces it (uldm.testing.force_fsdp_on_cpu) to run accelerate's real FSDP
code paths on the CPU. Each process prints one line "RESULT {json}" at the start and one at the end.

    run() { ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port $1 docs/fsdp_probe.py "${@:2}"; }
    run 29701 --out /tmp/fsdp/ddp --ema full                                    # DDP reference
    run 29702 --out /tmp/fsdp/f2 --ema full --force_fsdp 2                      # FSDP2, EMA of the full weights
    run 29703 --out /tmp/fsdp/f2r --ema full --force_fsdp 2 --resume /tmp/fsdp/f2/checkpoint-2
    run 29704 --out /tmp/fsdp/f2s --ema sharded --force_fsdp 2                  # EMA of the local shards
    run 29705 --out /tmp/fsdp/f2u --ema unwrapped --force_fsdp 2                # what uldm's loop does today
    ACCELERATE_TORCH_DEVICE=cpu run 29706 --out /tmp/fsdp/f1 --ema full --force_fsdp 1   # FSDP1

An exact resume prints the uninterrupted run's last losses, gradient norms, weights and EMA checksums.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save_at", type=int, default=2, help="save_state after this step (not when resuming)")
    parser.add_argument("--resume", default=None, help="a checkpoint folder to load_state from")
    parser.add_argument("--ema", default="full", choices=["full", "sharded", "unwrapped", "none"],
                        help="full: EMAModel built before prepare, stepped with the gathered full weights; "
                             "sharded: built after prepare over the local shards; unwrapped: built before "
                             "prepare, stepped with unwrap_model(model).parameters() (uldm's loop today)")
    parser.add_argument("--force_fsdp", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--state_dict_type", default="SHARDED_STATE_DICT",
                        choices=["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
    parser.add_argument("--clip_params", default="prepared", choices=["prepared", "unwrapped_filtered"],
                        help="what accelerator.clip_grad_norm_ gets: model.parameters() of the prepared model, "
                             "or the unwrapped model's trainable parameters (uldm's loop today)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from uldm.presets import read_json_preset
    from uldm.testing import force_fsdp_on_cpu

    args = parse_args(argv)
    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=args.out))
    if args.force_fsdp:
        force_fsdp_on_cpu(accelerator, args.force_fsdp, args.state_dict_type)
    fsdp = accelerator.distributed_type == DistributedType.FSDP

    def log(**values):
        print("RESULT " + json.dumps({"rank": accelerator.process_index, **values}), flush=True)

    set_seed(0)
    model = UNet2DModel(**read_json_preset("tiny", "unet"))
    ema_options = dict(decay=0.99, use_ema_warmup=True, power=0.75, model_cls=UNet2DModel, model_config=model.config)
    ema = EMAModel(model.parameters(), **ema_options) if args.ema in ("full", "unwrapped") else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if args.ema == "sharded":
        ema = EMAModel(accelerator.unwrap_model(model).parameters(), **ema_options)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    first = next(accelerator.unwrap_model(model).parameters())
    log(distributed_type=str(accelerator.distributed_type), model=type(model).__name__,
        parameter=type(first).__name__, local_shape=list(getattr(first, "to_local", lambda: first)().shape))

    def step_ema():
        unwrapped = accelerator.unwrap_model(model)
        if args.ema == "full" and fsdp and accelerator.is_fsdp2:
            ema.step([p.full_tensor() for p in unwrapped.parameters()])  # an all-gather: every process
        elif args.ema == "full" and fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=False):
                ema.step(unwrapped.parameters())
        else:
            ema.step(unwrapped.parameters())

    start = 0
    if args.resume:
        accelerator.load_state(args.resume)
        start = json.loads((Path(args.resume) / "step.json").read_text())["step"]
    losses, norms = [], []
    try:
        for step in range(start, args.steps):
            generator = torch.Generator().manual_seed(1000 * accelerator.process_index + step)
            latents = torch.randn(2, 4, 8, 8, generator=generator)
            timesteps = torch.randint(0, 1000, (2,), generator=generator)
            loss = model(latents, timesteps).sample.pow(2).mean()
            accelerator.backward(loss)
            parameters = (model.parameters() if args.clip_params == "prepared" else
                          [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
            norm = accelerator.clip_grad_norm_(parameters, 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if ema is not None:
                step_ema()
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            losses.append(round(loss.item(), 7))
            norms.append(round(float(norm), 7))
            if step + 1 == args.save_at and not args.resume:
                folder = Path(args.out) / f"checkpoint-{step + 1}"
                accelerator.save_state(str(folder))
                if accelerator.is_main_process:
                    (folder / "step.json").write_text(json.dumps({"step": step + 1}))
                accelerator.wait_for_everyone()
        state = accelerator.get_state_dict(model)  # every process: a collective under FSDP
        shadows = [getattr(s, "to_local", lambda s=s: s)() for s in ema.shadow_params] if ema is not None else []
        folder = Path(args.out) / f"checkpoint-{args.save_at}"
        if accelerator.is_main_process:  # the final model, unsharded, as a pipeline would be saved
            final = UNet2DModel.from_config(accelerator.unwrap_model(model).config)
            final.load_state_dict(state)
            if args.ema == "full":
                final_ema = UNet2DModel.from_config(final.config)
                ema.copy_to(final_ema.parameters())
                log(final_model_checksum=sum(p.double().abs().sum().item() for p in final.parameters()),
                    final_ema_checksum=sum(p.double().abs().sum().item() for p in final_ema.parameters()))
        log(losses=losses, norms=norms, full_state_dict_keys=len(state or {}),
            weights_checksum=sum(v.double().abs().sum().item() for v in state.values()) if state else None,
            ema_checksum=sum(s.double().abs().sum().item() for s in shadows) if shadows else None,
            checkpoint_files=sorted(os.listdir(folder)) if accelerator.is_main_process and folder.is_dir() else None)
    except Exception as error:
        log(error=f"{type(error).__name__}: {error}"[:1500], traceback=traceback.format_exc()[-2000:])
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
