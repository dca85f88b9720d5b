"""The training step that the benchmarks time, its variants, and the ways they time it.

A step is what uldm.training.TrainingLoop does with one batch: the trainer's loss (`trainer_loss`, the calls of
train_unconditional_latent.py's compute_loss), backward, clipping at 1.0, the optimiser step, the EMA step, the
loss kept on the device in uldm.training.StepRecords and read back at the end of a logging interval (or, as the
loop did before issue 13, after every step). A `Variant` names what changes between measurements (precision,
torch.compile, channels_last, TF32 matmuls, the AdamW implementation, the EMA, the read-back); VARIANTS and
STEP_KINDS are the table that bench_train_step.py, bench_compile.py and bench_gpu.py pick from.

`python bench/harness.py MODULE:FUNCTION SPEC_JSON` runs bench.MODULE.FUNCTION(spec) in a fresh process
(`in_fresh_process`) and prints its result as one JSON line.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import models, report  # noqa: E402
from uldm.diffusion import LossConfig, build_noise_scheduler, noisy_latents_and_target, weighted_loss  # noqa: E402
from uldm.training import EmaConfig, OptimizerConfig, StepRecords, build_ema, build_optimizer  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
LEARNING_RATE = 1e-4
# AdamW's implementations by name; "trainer" (a Variant's default) is the one uldm.training.build_optimizer picks.
OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
# What StepRecords.read_back and uldm.data.prepare_training_set need of an accelerate.Accelerator, for one process.
ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, is_local_main_process=True,
                              wait_for_everyone=lambda: None, reduce=lambda values, reduction: values)


@dataclasses.dataclass(frozen=True)
class Variant:
    precision: str = "fp32"  # "bf16": autocast with fp32 weights, as accelerate's --mixed_precision bf16
    compile: bool = False  # torch.compile(model), inductor, default mode
    channels_last: bool = False  # the model's weights and input
    tf32_matmul: bool = False  # TF32 matmuls too (--allow_tf32); cuDNN convolutions use TF32 by PyTorch's default
    optimizer: str = "trainer"  # "trainer" (uldm.training.build_optimizer) or a key of OPTIMIZERS
    ema: str | None = None  # None, "trainer" (uldm.training.build_ema: foreach) or "for-loop" (diffusers' default)
    readback: str = "interval"  # "interval": once per `TrainingStep.run` (a logging interval); "step": every step


VARIANTS = {
    "fp32": Variant(),
    "tf32": Variant(tf32_matmul=True),
    "bf16": Variant("bf16"),
    "bf16 + channels_last": Variant("bf16", channels_last=True),
    "bf16 + compile": Variant("bf16", compile=True),
    "bf16 + compile + channels_last": Variant("bf16", compile=True, channels_last=True),
}
# The optimiser, EMA and read-back of the training loop before issue 13 ("loop") and now ("tuned").
STEP_KINDS = {"loop": {"optimizer": "foreach", "ema": "for-loop", "readback": "step"},
              "tuned": {"optimizer": "trainer", "ema": "trainer", "readback": "interval"}}


# ------------------------------------------------------------------------------------------ the step


def trainer_loss(forward: Callable, noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
                 levers: LossConfig = LossConfig()) -> torch.Tensor:
    """The loss of one batch as train_unconditional_latent.py's compute_loss takes it."""
    noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, latents, generator, levers=levers)
    return weighted_loss(forward(noisy, timesteps).sample, target, timesteps, noise_scheduler, levers)


def model_forward(runnable, variant: Variant, device: torch.device) -> Callable:
    """`runnable` (the model or its compiled form) called as the prepared model runs: under bf16 autocast for
    bf16 (accelerate wraps the forward so), with its input in the variant's memory format."""
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.precision == "bf16")

    def forward(noisy, timesteps):
        with autocast:
            return runnable(noisy.contiguous(memory_format=memory_format), timesteps)

    return forward


def prepare_model(unet: str, variant: Variant, device: torch.device):
    """(a fresh UNet in training mode on `device`, its forward as the variant runs it)."""
    model = models.build_unet(unet).to(device).train()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, model_forward(torch.compile(model) if variant.compile else model, variant, device)


def build_adamw(parameters, implementation: str, device: torch.device | str):
    if implementation == "trainer":
        return build_optimizer(parameters, OptimizerConfig(), LEARNING_RATE, device)
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=1e-6, **OPTIMIZERS[implementation])


def build_variant_ema(model, kind: str | None):
    """The training scripts' EMA (uldm.training.build_ema); "for-loop" steps it one tensor at a time."""
    ema = build_ema(model, EmaConfig() if kind else None)
    if kind == "for-loop":
        ema.foreach = False
    return ema


def random_latents(shape: tuple[int, ...], device: torch.device) -> Callable:
    """make_latents for a TrainingStep: random latents, as read from the latent cache."""
    return lambda batch_size, generator: torch.randn((batch_size, *shape), generator=generator, device=device)


class TrainingStep:
    """`step(batch_size)` takes one training step; `step.run(batch_size, steps)` a logging interval of them.

    make_latents(batch_size, generator) gives the clean latents (default: random ones); `optimizer` may be shared
    between steps over the same model (eager against compiled)."""

    def __init__(self, model, forward: Callable, variant: Variant, device: torch.device, make_latents=None,
                 optimizer=None, seed: int = 0):
        self.model, self.forward, self.variant = model, forward, variant
        self.noise_scheduler = build_noise_scheduler()
        self.generator = torch.Generator(device).manual_seed(seed)
        self.make_latents = make_latents or random_latents(models.sample_shape(model), device)
        self.optimizer = optimizer or build_adamw(model.parameters(), variant.optimizer, device)
        self.ema = build_variant_ema(model, variant.ema)
        self.records, self.steps = StepRecords(), 0

    def __call__(self, batch_size: int) -> None:
        latents = self.make_latents(batch_size, self.generator)
        loss = trainer_loss(self.forward, self.noise_scheduler, latents, self.generator)
        self.records.add(loss, {}, self.steps + 1, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        self.steps += 1
        self.records.end_step(self.steps)
        if self.variant.readback == "step":
            self.read_back()

    def run(self, batch_size: int, steps: int) -> None:
        for _ in range(steps):
            self(batch_size)
        self.read_back()

    def read_back(self) -> list[dict]:
        """The losses since the last read-back, copied to the host at once (a device-to-host sync)."""
        rows, first_bad = self.records.read_back(ONE_PROCESS)
        if first_bad is not None:
            raise FloatingPointError(f"The loss became NaN or infinite in step {first_bad[0]}.")
        return rows


# ------------------------------------------------------------------------------------------ timing


def seconds(function: Callable) -> float:
    """Wall time of function(), including the device work it queued."""
    report.synchronize()
    start = time.perf_counter()
    function()
    report.synchronize()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable], untimed: int, timed: int,
              before: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each run, the runs taking turns (so that a change in the machine's load hits all alike);
    the first `untimed` rounds are left out. before(name), untimed, prepares each run."""
    times = {name: [] for name in runs}
    for round_number in range(untimed + timed):
        for name, run in runs.items():
            if before is not None:
                before(name)
            elapsed = seconds(run)
            if round_number >= untimed:
                times[name].append(elapsed)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def relative_difference(tensors, references) -> float:
    """||a - b|| / ||b|| over all tensors together (0 where both are zero)."""
    difference = math.sqrt(sum(torch.sum((a.double() - b.double()) ** 2).item() for a, b in zip(tensors, references)))
    norm = math.sqrt(sum(torch.sum(b.double() ** 2).item() for b in references))
    return difference / norm if norm else difference


# ------------------------------------------------------------------- optimiser and EMA implementations


def unet_with_gradients(unet: str, device: str):
    """A fresh UNet on `device` whose parameters hold fixed random gradients."""
    model = models.build_unet(unet).to(device)
    generator = torch.Generator().manual_seed(2)
    for parameter in model.parameters():
        parameter.grad = (torch.randn(parameter.shape, generator=generator) * 1e-3).to(device)
    return model


def measure_optimizer(spec: dict) -> dict:
    """AdamW's implementations over the UNet's parameters (on spec["device"], default the CPU): the weights after
    3 steps from the same start against the for-loop's, then steps taking turns (each keeps its own moments)."""
    device = spec.get("device", "cpu")
    parameters = list(unet_with_gradients(spec["unet"], device).parameters())
    start = [p.detach().clone() for p in parameters]
    final_weights, errors = {}, {}
    for name in OPTIMIZERS:
        with torch.no_grad():
            torch._foreach_copy_(parameters, start)
        try:
            optimizer = build_adamw(parameters, name, device)
            for _ in range(3):
                optimizer.step()
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"[:2000]
            continue
        final_weights[name] = [p.detach().clone() for p in parameters]
    reference = final_weights.pop("for-loop", None)
    differences = {name: relative_difference(weights, reference) for name, weights in final_weights.items()
                   if reference is not None}
    del final_weights, reference, start
    steps = {name: build_adamw(parameters, name, device).step for name in OPTIMIZERS if name not in errors}
    times = alternate(steps, 1 + spec["warmup_steps"], spec["optimizer_steps"])  # the first step allocates moments
    return {"weights_relative_difference": differences, "step_s": medians(times), "step_times_s": times,
            "errors": errors, "parameters": sum(p.numel() for p in parameters)}


def measure_ema(spec: dict) -> dict:
    """The training scripts' EMA with foreach against diffusers' default (on spec["device"], default the CPU)."""
    model = unet_with_gradients(spec["unet"], spec.get("device", "cpu"))
    parameters = list(model.parameters())
    gradients = [p.grad for p in parameters]
    emas = {"foreach": build_variant_ema(model, "trainer"), "default (for-loop)": build_variant_ema(model, "for-loop")}

    def move_weights(_name=None):
        with torch.no_grad():
            torch._foreach_add_(parameters, gradients)

    for _ in range(3):  # same weights, a few steps each: the averages must agree
        move_weights()
        for ema in emas.values():
            ema.step(parameters)
    difference = relative_difference(emas["foreach"].shadow_params, emas["default (for-loop)"].shadow_params)
    times = alternate({name: (lambda ema=ema: ema.step(parameters)) for name, ema in emas.items()},
                      spec["warmup_steps"], spec["optimizer_steps"], before=move_weights)
    return {"step_s": medians(times), "step_times_s": times, "average_relative_difference": difference,
            "parameters": sum(p.numel() for p in parameters)}


# ---------------------------------------------------------------------- runs of the training scripts


def loop_seconds(output_dir: str | Path, skip: int = 0) -> tuple[float, int]:
    """(Seconds of a run's logged training steps after the first `skip`, their number), from its metrics.jsonl
    (each step logs its images/s) and training_args.json (its batch size): start-up and saving are not counted."""
    from uldm.training import RUN_ARGUMENTS_FILE, read_metrics

    batch_size = json.loads((Path(output_dir) / RUN_ARGUMENTS_FILE).read_text())["train_batch_size"]
    rows = [row for row in read_metrics(output_dir, having="loss") if row["step"] > skip]
    return sum(batch_size / row["images_per_sec"] for row in rows), len(rows)


def timing_cache_builds():
    """Times the latent cache's build (its first call) and reads (later ones) while inside."""
    from uldm import latent_cache

    return report.timing_calls(latent_cache, "build_or_load_latent_cache")


# -------------------------------------------------------------------------------- fresh processes


def start_worker(function: str, spec: dict, **env: str) -> subprocess.Popen:
    """bench.<function> ("module:name") of `spec` in a fresh process: no memory, threads or compiled code left
    over from another measurement."""
    command = [sys.executable, str(Path(__file__).resolve()), function, json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.Popen(command, env=env, cwd=report.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def worker_result(process: subprocess.Popen, what: str) -> dict:
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"Measuring {what} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def in_fresh_process(function: str, spec: dict, what: str, **env: str) -> dict:
    return worker_result(start_worker(function, spec, **env), what)


def worker_main(function: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    module, name = function.split(":")
    result = getattr(importlib.import_module(f"bench.{module}"), name)(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
