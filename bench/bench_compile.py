#!/usr/bin/env python
"""The compute path on the CPU, options side by side: torch.compile, channels_last, AdamW's
implementations and diffusers' EMA with and without foreach.

    python bench/bench_compile.py            # small-sdvae256 (64M) and seed-ffhq256-sdvae (258M), batch 2
    python bench/bench_compile.py --quick    # the tiny UNet, a smoke test
    python bench/bench_compile.py --parts optimizer ema --unets small-sdvae256

The full run takes about 20-30 minutes on an idle 2-core machine (most of it compiling and stepping the
seed UNet); --quick about 2 minutes (inductor compiles even the tiny UNet for over a minute). Every
part runs in a fresh process, one after the other:

- compile: the training loop's step (bench/harness.py) eager against
  `torch.compile(model)` (inductor, default mode) on the same model. Both first compute the loss and
  gradients of one batch from the same weights; they must agree within the tolerances below. Then
  eager and compiled steps alternate (so that a change in the machine's load hits both alike) and the
  median of the timed steps is the steady state. The first compiled step includes tracing and
  compiling forward and backward, with an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR).
  Graph breaks are counted twice: dynamo's own counter during those steps, and
  `torch._dynamo.explain` over the forward pass (which lists each break's reason).
- restart: a new process with the cache the compile part left, as a resumed run would start: its
  first compiled step is the compile cost of every restart.
- channels_last: the eager training step with the model, its AdamW moments and the input in
  channels_last against the default layout, alternating.
- optimizer: AdamW's `optimizer.step()` over the UNet's parameters with fused=True, foreach=True and
  the single-tensor for-loop (foreach=False), alternating; the weights after a few steps from the same
  start are compared with the for-loop's.
- ema: the training scripts' EMA (`uldm.training.build_ema`, foreach) against diffusers' default (one
  tensor at a time), alternating; the averages are compared after a few steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness, models, report  # noqa: E402
from uldm.diffusion import build_noise_scheduler  # noqa: E402

NAME = "compile"
PARTS = ("compile", "restart", "channels_last", "optimizer", "ema")
# Compiled against eager from the same weights and batch, in fp32. Inductor fuses and reorders
# reductions, so the results differ by rounding: about 1e-7 relative on the loss, up to 1e-5 on the
# whole gradient vector were seen here; these bounds leave a margin while catching a wrong graph.
LOSS_RTOL = 1e-5
GRADIENT_RTOL = 1e-4  # ||g_compiled - g_eager|| / ||g_eager|| over all parameters together
# Optimiser implementations and EMA variants against the reference (same start, same gradients).
WEIGHTS_RTOL = 1e-6  # ||w - w_reference|| / ||w_reference|| over all parameters together
# name: (full, quick)
DEFAULTS = {
    "unets": (["small-sdvae256", "seed-ffhq256-sdvae"], ["tiny"]),
    "batch_size": (2, 2),
    "warmup_steps": (1, 1),
    "steps": (3, 2),
    "optimizer_steps": (5, 3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", nargs="+", default=None,
                        help="UNet presets or JSON files, 4-channel latents (default small-sdvae256 "
                             "seed-ffhq256-sdvae; --quick: tiny).")
    parser.add_argument("--batch_size", type=int, default=None, help="Images per training step (default 2).")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="Untimed steps of each variant after the first one (default 1).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Timed training steps of each variant (default 3; --quick 2).")
    parser.add_argument("--optimizer_steps", type=int, default=None,
                        help="Timed optimizer and EMA steps of each variant (default 5; --quick 3).")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="What to measure (restart needs compile).")
    args = report.parse_benchmark_args(parser, argv, DEFAULTS)
    if args.batch_size < 1 or args.warmup_steps < 0 or args.steps < 1 or args.optimizer_steps < 1:
        parser.error("--batch_size, --steps and --optimizer_steps must be at least 1, --warmup_steps at least 0.")
    if "restart" in args.parts and "compile" not in args.parts:
        parser.error("--parts restart measures a restart over the cache that the compile part fills: add compile.")
    return args


# ------------------------------------------------------------------------------ in the subprocess

CPU = torch.device("cpu")


def loss_and_gradients(forward, model, batch_size: int) -> tuple[float, list, float]:
    """The trainer's loss of one fixed batch, forward and backward: (loss, cloned gradients, seconds); the
    gradients are cleared after."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((batch_size, *models.sample_shape(model)), generator=generator)
    noise_scheduler = build_noise_scheduler()
    start = time.perf_counter()
    loss = harness.trainer_loss(forward, noise_scheduler, latents, generator)
    loss.backward()
    elapsed = time.perf_counter() - start
    gradients = [parameter.grad.detach().clone() for parameter in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.item(), gradients, elapsed


def worst_tensor(names, tensors, references, negligible: float = 1e-6) -> dict:
    """The parameter whose gradient differs most, relative to its own norm.

    Gradients that are zero in exact arithmetic (attention key biases: softmax ignores a constant
    added to every key) hold only rounding noise, so a norm under `negligible` of the whole
    gradient's does not count: only how many there are is reported."""
    total = math.sqrt(sum(reference.double().pow(2).sum().item() for reference in references))
    worst = {"name": None, "relative_difference": 0.0, "negligible_gradients": 0}
    for name, a, b in zip(names, tensors, references):
        if b.norm().item() <= negligible * total:
            worst["negligible_gradients"] += 1
            continue
        difference = harness.relative_difference([a], [b])
        if difference > worst["relative_difference"]:
            worst.update(name=name, relative_difference=difference)
    return worst


def graph_break_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": dict(counters["graph_break"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "frames_compiled": int(counters["frames"]["ok"])}


def explain_forward(model, batch_size: int) -> dict:
    """torch._dynamo.explain over the forward pass: graphs, breaks and their reasons."""
    latents = torch.randn((batch_size, *models.sample_shape(model)))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(latents, torch.full((batch_size,), 500))
    reasons = []
    for reason in explanation.break_reasons:
        where = reason.user_stack[-1] if reason.user_stack else None
        reasons.append(f"{reason.reason}" + (f" ({where.filename}:{where.lineno})" if where else ""))
    return {"graph_count": explanation.graph_count, "graph_break_count": explanation.graph_break_count,
            "break_reasons": reasons, "op_count": explanation.op_count}


def measure_compile(spec: dict) -> dict:
    from uldm.models import count_parameters

    variant, batch_size = harness.Variant(), spec["batch_size"]
    model, eager = harness.prepare_model(spec["unet"], variant, CPU)
    compiled = harness.model_forward(torch.compile(model), variant, CPU)
    names = [name for name, _ in model.named_parameters()]
    eager_loss, eager_gradients, eager_first_s = loss_and_gradients(eager, model, batch_size)
    result = {"parameters": count_parameters(model), "eager_first_forward_backward_s": eager_first_s}
    try:
        compiled_loss, compiled_gradients, compiled_first_s = loss_and_gradients(compiled, model, batch_size)
    except Exception as error:  # inductor may lack a compiler or fail on this CPU: report why
        result["compile_error"] = f"{type(error).__name__}: {error}"[:4000]
        return result
    result.update({
        "compiled_first_forward_backward_s": compiled_first_s,
        "eager_loss": eager_loss, "compiled_loss": compiled_loss,
        "loss_relative_difference": abs(compiled_loss - eager_loss) / abs(eager_loss),
        "gradient_relative_difference": harness.relative_difference(compiled_gradients, eager_gradients),
        "worst_gradient": worst_tensor(names, compiled_gradients, eager_gradients),
    })
    del eager_gradients, compiled_gradients

    steps = {"eager": harness.TrainingStep(model, eager, variant, CPU)}
    steps["compiled"] = harness.TrainingStep(model, compiled, variant, CPU, optimizer=steps["eager"].optimizer)
    # The first clipping and AdamW step (it allocates the moments) belong to the first step of both.
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    first_optimizer_s = harness.seconds(
        lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), steps["eager"].optimizer.step()))
    steps["eager"].optimizer.zero_grad(set_to_none=True)
    result["eager_first_step_s"] = eager_first_s + first_optimizer_s
    result["compiled_first_step_s"] = compiled_first_s + first_optimizer_s
    times = harness.alternate({name: (lambda step=step: step(batch_size)) for name, step in steps.items()},
                              spec["warmup_steps"], spec["steps"])
    result.update({"eager_step_s": statistics.median(times["eager"]),
                   "compiled_step_s": statistics.median(times["compiled"]),
                   "eager_step_times_s": times["eager"], "compiled_step_times_s": times["compiled"],
                   **graph_break_counts()})
    result["explain"] = explain_forward(model, batch_size)
    return result


def measure_restart(spec: dict) -> dict:
    """The first compiled step of a new process over the compile part's inductor cache."""
    variant = harness.Variant(compile=True)
    step = harness.TrainingStep(*harness.prepare_model(spec["unet"], variant, CPU), variant, CPU)
    first = harness.seconds(lambda: step(spec["batch_size"]))
    second = harness.seconds(lambda: step(spec["batch_size"]))
    return {"first_step_s": first, "second_step_s": second, **graph_break_counts()}


def to_memory_format(model, optimizer, memory_format) -> None:
    """The model's 4-D weights and their AdamW moments in `memory_format` (the parameters stay the same objects)."""
    model.to(memory_format=memory_format)
    for state in optimizer.state.values():
        for key, value in state.items():
            if getattr(value, "dim", lambda: 0)() == 4:
                state[key] = value.contiguous(memory_format=memory_format)


def measure_channels_last(spec: dict) -> dict:
    variants = {"contiguous": harness.Variant(), "channels_last": harness.Variant(channels_last=True)}
    model, _ = harness.prepare_model(spec["unet"], variants["contiguous"], CPU)
    steps = {"contiguous": harness.TrainingStep(model, harness.model_forward(model, variants["contiguous"], CPU),
                                                variants["contiguous"], CPU)}
    optimizer = steps["contiguous"].optimizer
    steps["channels_last"] = harness.TrainingStep(model, harness.model_forward(model, variants["channels_last"], CPU),
                                                  variants["channels_last"], CPU, optimizer=optimizer)
    memory_formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    times = harness.alternate({name: (lambda step=step: step(spec["batch_size"])) for name, step in steps.items()},
                              1 + spec["warmup_steps"], spec["steps"],
                              before=lambda name: to_memory_format(model, optimizer, memory_formats[name]))
    return {f"{name}_step_s": value for name, value in harness.medians(times).items()} | {"step_times_s": times}


MEASURES = {"compile": measure_compile, "restart": measure_restart, "channels_last": measure_channels_last,
            "optimizer": harness.measure_optimizer, "ema": harness.measure_ema}


def measure(spec: dict) -> dict:
    return MEASURES[spec["part"]](spec)


# ---------------------------------------------------------------------------------- in the parent


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    result = report.start_result(NAME, "CPU compute path: torch.compile, channels_last, AdamW, EMA", args)
    measured: dict[str, dict] = {}
    for unet in args.unets:
        measured[unet] = {}
        # Every part in a fresh process (a cold torch.compile), the restart over the cache the compile part left.
        with tempfile.TemporaryDirectory(prefix="uldm-bench-inductor-") as cache_dir:
            for part in args.parts:
                if part == "restart" and "compile_error" in measured[unet].get("compile", {}):
                    continue
                print(f"Measuring {part} for {unet} in a fresh process...", flush=True)
                spec = {"part": part, "unet": unet, "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
                        "steps": args.steps, "optimizer_steps": args.optimizer_steps,
                        "threads": 1 if args.quick else None}
                measured[unet][part] = harness.in_fresh_process("bench_compile:measure", spec, f"{part} of {unet}",
                                                                TORCHINDUCTOR_CACHE_DIR=cache_dir)
    result["settings"] = {
        "unets": args.unets, "batch_size": args.batch_size, "latents": "4 channels at each UNet's sample_size",
        "warmup_steps": args.warmup_steps, "timed_steps": args.steps, "optimizer_steps": args.optimizer_steps,
        "threads": 1 if args.quick else torch.get_num_threads(), "parts": args.parts,
        "loss_rtol": LOSS_RTOL, "gradient_rtol": GRADIENT_RTOL, "weights_rtol": WEIGHTS_RTOL,
        "compile": "torch.compile(model), inductor, default mode; cold = empty TORCHINDUCTOR_CACHE_DIR",
    }
    result["results"] = {"unets": measured}
    describe(result, measured)
    report.finish_result(result, args)
    return result


def describe(result: dict, measured: dict) -> None:
    compile_rows, restart_rows, layout_rows, optimizer_rows, ema_rows = [], [], [], [], []
    for unet, parts in measured.items():
        compiled = parts.get("compile")
        if compiled and "compile_error" in compiled:
            result["notes"].append(f"{unet}: torch.compile failed on this CPU: {compiled['compile_error']}")
            add_target_compile(result, unet, None)
        elif compiled:
            compiled["speedup"] = compiled["eager_step_s"] / compiled["compiled_step_s"]
            compiled["compile_overhead_s"] = compiled["compiled_first_step_s"] - compiled["compiled_step_s"]
            compiled["equal_within_tolerance"] = (compiled["loss_relative_difference"] <= LOSS_RTOL
                                                  and compiled["gradient_relative_difference"] <= GRADIENT_RTOL)
            breaks = sum(compiled["graph_breaks"].values())
            compile_rows.append([
                unet, compiled["parameters"] / 1e6, compiled["eager_step_s"], compiled["compiled_step_s"],
                compiled["speedup"], compiled["eager_first_step_s"], compiled["compiled_first_step_s"],
                compiled["loss_relative_difference"], compiled["gradient_relative_difference"],
                compiled["equal_within_tolerance"], breaks, compiled["explain"]["graph_count"]])
            add_target_compile(result, unet, compiled)
            reasons = compiled["explain"]["break_reasons"] + list(compiled["graph_breaks"])
            if reasons:
                result["notes"].append(f"{unet}: graph breaks: " + "; ".join(dict.fromkeys(reasons)))
            worst = compiled["worst_gradient"]
            result["notes"].append(
                f"{unet}: the parameter whose compiled gradient differs most from eager is {worst['name']} "
                f"({worst['relative_difference']:.2e} of its norm; {worst['negligible_gradients']} gradients that "
                "are zero in exact arithmetic, such as attention key biases', are left out).")
        restart = parts.get("restart")
        if restart and compiled and "compile_error" not in compiled:
            restart["compile_overhead_s"] = restart["first_step_s"] - compiled["compiled_step_s"]
            restart_rows.append([unet, compiled["compiled_first_step_s"], restart["first_step_s"],
                                 compiled["compiled_step_s"], compiled["compile_overhead_s"],
                                 restart["compile_overhead_s"]])
        layout = parts.get("channels_last")
        if layout:
            layout["speedup"] = layout["contiguous_step_s"] / layout["channels_last_step_s"]
            layout_rows.append([unet, layout["contiguous_step_s"], layout["channels_last_step_s"], layout["speedup"]])
        optimizer = parts.get("optimizer")
        if optimizer:
            reference = optimizer["step_s"].get("for-loop")
            for name in harness.OPTIMIZERS:
                if name in optimizer["errors"]:
                    optimizer_rows.append([unet, name, None, None, optimizer["errors"][name]])
                    continue
                step = optimizer["step_s"][name]
                difference = optimizer["weights_relative_difference"].get(name, 0.0)
                optimizer_rows.append([unet, name, step, reference / step if reference else None,
                                       "reference" if name == "for-loop" else
                                       f"{difference:.1e} ({'equal' if difference <= WEIGHTS_RTOL else 'DIFFERENT'})"])
        ema = parts.get("ema")
        if ema:
            reference = ema["step_s"]["default (for-loop)"]
            for name, step in ema["step_s"].items():
                ema_rows.append([unet, name, step, reference / step,
                                 "reference" if name.startswith("default") else
                                 f"{ema['average_relative_difference']:.1e} "
                                 f"({'equal' if ema['average_relative_difference'] <= WEIGHTS_RTOL else 'DIFFERENT'})"])
    if compile_rows:
        report.add_table(result, "Training step, eager vs torch.compile (inductor), fp32",
                         ["UNet", "params (M)", "eager s/step", "compiled s/step", "speed-up", "eager first step (s)",
                          "compiled first step, cold cache (s)", "loss rel. diff.", "gradient rel. diff.",
                          "equal within tolerance", "graph breaks", "graphs (explain)"], compile_rows)
        result["notes"].append(
            f"Equal within tolerance: |loss_compiled - loss_eager| / |loss_eager| <= {LOSS_RTOL:g} and "
            f"||g_compiled - g_eager|| / ||g_eager|| <= {GRADIENT_RTOL:g} over all gradients together, after one "
            "forward and backward from the same weights and batch. Speed-up = eager / compiled steady-state s/step.")
        batch_size = result.get("settings", {}).get("batch_size")
        if batch_size:
            result["notes"].append(
                "img/s = batch / s-per-step: "
                + "; ".join(f"{row[0]} eager {batch_size / row[2]:.3g}, compiled {batch_size / row[3]:.3g}"
                            for row in compile_rows) + ".")
    if restart_rows:
        report.add_table(result, "Compile cost per start: cold cache vs a restart over the inductor cache",
                         ["UNet", "first compiled step, cold (s)", "first compiled step, warm cache (s)",
                          "compiled s/step", "compile overhead, cold (s)", "compile overhead, warm (s)"], restart_rows)
    if layout_rows:
        report.add_table(result, "Training step, default layout vs channels_last (eager, fp32)",
                         ["UNet", "contiguous s/step", "channels_last s/step", "speed-up"], layout_rows)
    if optimizer_rows:
        report.add_table(result, "AdamW optimizer.step() over the UNet's parameters",
                         ["UNet", "implementation", "s/step", "speed-up over for-loop",
                          "weights after 3 steps vs for-loop (rel. diff.)"], optimizer_rows)
    if ema_rows:
        report.add_table(result, "diffusers' EMAModel.step() over the UNet's parameters",
                         ["UNet", "implementation", "s/step", "speed-up over default",
                          "average after 3 steps vs default (rel. diff.)"], ema_rows)
    result["notes"].append("CPU figures: on a GPU the balance differs (kernel launches and host syncs dominate "
                           "small ops there); bench/bench_gpu.py measures that.")


def add_target_compile(result: dict, unet: str, compiled: dict | None) -> None:
    if compiled is None:
        report.add_target(result, f"{unet}: torch.compile works on this CPU", "inductor failed (see the notes)", False)
        return
    breaks = sum(compiled["graph_breaks"].values()) + compiled["explain"]["graph_break_count"]
    report.add_target(result, f"{unet}: compiled step equals eager within tolerance, no graph breaks",
                      f"loss {compiled['loss_relative_difference']:.1e}, gradients "
                      f"{compiled['gradient_relative_difference']:.1e}, {breaks} graph breaks, speed-up "
                      f"{compiled['speedup']:.2f}x", compiled["equal_within_tolerance"] and breaks == 0)


if __name__ == "__main__":
    main()
