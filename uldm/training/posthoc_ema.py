"""Post-hoc EMA (Karras et al. 2023, "Analyzing and Improving the Training Dynamics of Diffusion
Models", arXiv 2312.02696, Section 3 and Appendix C): choose the EMA length after training.

During training, `PowerFunctionEMA` keeps a few power-function averages of the weights, each one
the average of all weights seen so far under the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),    0 < tau <= t,

whose width relative to t is sigma_rel (EDM2's length measure; gamma follows from sigma_rel).
Every `snapshot_steps` steps it writes each average to `<output_dir>/ema_snapshots/` (safetensors,
weights only). Afterwards `synthesize_state_dicts` combines the snapshots linearly so that the
combined profile is the least-squares best fit to the profile of any other sigma_rel, which gives
that EMA without having tracked it. Everything the fit needs (inner products of power-function
profiles) is known in closed form.

Time is counted in optimiser steps: the weights after step k stand for the interval (k-1, k].
Tracking then is exact, not an approximation: after step t with per-step factor
beta_t = (1 - 1/t)^(gamma + 1), the average weights step k by (k^(g+1) - (k-1)^(g+1)) / t^(g+1),
the integral of p_t over (k-1, k].
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..saving import save_safetensors_atomically

logger = logging.getLogger(__name__)

DEFAULT_SIGMA_RELS = (0.05, 0.10)
SNAPSHOT_DIR_NAME = "ema_snapshots"
# sigma_rel of the flattest profile, gamma = 0 (a plain running mean of all weights seen).
MAX_SIGMA_REL = math.sqrt(1 / 12)
SNAPSHOT_FORMAT = "uldm-posthoc-ema-1"


# --------------------------------------------------------------------------------------------
# Power-function profiles


def check_sigma_rel(sigma_rel: float) -> float:
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise InputError(
            f"sigma_rel {sigma_rel:g} cannot be a power-function EMA: it must lie strictly between 0 and "
            f"{MAX_SIGMA_REL:.4f} (= sqrt(1/12), the plain mean of all weights). EDM2's useful range is about "
            "0.01-0.25; give a value in that range."
        )
    return sigma_rel


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile with this relative width.

    sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)) (EDM2 Eq. 123) gives the cubic
    g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0 with s = sigma_rel^-2; its largest real root is gamma."""
    s = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_beta(gamma: float, previous_step: int, step: int) -> float:
    """Weight kept on the average when it moves from `previous_step` to `step`.

    (previous/step)^(gamma+1): (1 - 1/t)^(gamma+1) for consecutive steps. Over a gap of several
    steps it treats the weights as constant over the gap, so the profile stays exact for them;
    at the first update (previous_step 0) it is 0, so the average starts at the weights."""
    return (previous_step / step) ** (gamma + 1)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) d tau for every pair, as a len(a) x len(b) matrix.

    With t_a <= t_b the integral runs to t_a and equals
    (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_a/t_b)^g_b / t_b; written with the ratio of the times so that
    t^(gamma+1) never overflows."""
    t_a, g_a = (np.asarray(x, dtype=np.float64).reshape(-1, 1) for x in (steps_a, gammas_a))
    t_b, g_b = (np.asarray(x, dtype=np.float64).reshape(1, -1) for x in (steps_b, gammas_b))
    a_first = t_a <= t_b
    later_time = np.where(a_first, t_b, t_a)
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    later_gamma = np.where(a_first, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio**later_gamma / later_time


@dataclass
class Coefficients:
    """How to combine snapshots into one profile, and how well the combination fits it."""

    weights: np.ndarray  # one per input profile; they sum to 1
    fit_error: float  # ||sum w_i p_i - p_target|| / ||p_target||: 0 is exact


def solve_coefficients(steps: Sequence[int], gammas: Sequence[float], target_step: int,
                       target_gamma: float) -> Coefficients:
    """EDM2's least squares (Appendix C.3): the combination of the input profiles closest in L2 to
    the target profile. Normal equations A w = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>;
    then the weights are rescaled to sum to 1 so that the result is an average of the weights."""
    # Times relative to the target keep the matrix well scaled; the solution does not change.
    times = np.asarray(steps, dtype=np.float64) / float(target_step)
    gammas = np.asarray(gammas, dtype=np.float64)
    gram = profile_inner_products(times, gammas, times, gammas)
    towards_target = profile_inner_products(times, gammas, [1.0], [target_gamma])[:, 0]
    weights = np.linalg.lstsq(gram, towards_target, rcond=None)[0]
    weights = weights / weights.sum()
    target_norm2 = profile_inner_products([1.0], [target_gamma], [1.0], [target_gamma])[0, 0]
    residual2 = target_norm2 - 2 * weights @ towards_target + weights @ gram @ weights
    return Coefficients(weights=weights, fit_error=float(math.sqrt(max(residual2, 0.0) / target_norm2)))


# --------------------------------------------------------------------------------------------
# Tracking during training


def snapshot_file_name(step: int, sigma_rel: float) -> str:
    return f"ema-{step:09d}-sigma_rel-{sigma_rel:g}.safetensors"


class PowerFunctionEMA:
    """Power-function averages of a model's parameters, one per sigma_rel.

    `model` is the unwrapped model (e.g. a diffusers UNet2DModel, before `accelerator.prepare`):
    its parameter names, buffers and config go into the snapshots. Call `step(parameters,
    global_step)` once per optimiser step with the same parameters (in the order of
    `model.parameters()`) and the number of optimiser steps done, counting this one.

    The averages are kept in float32 (float64 for float64 parameters), on the parameters' device.
    Every process of a multi-process run does the same arithmetic on the same (synchronised)
    weights, so the averages agree exactly; only the process made with `is_main_process=True`
    writes snapshots. Register the object with `accelerator.register_for_checkpointing` so that
    resume restores the averages exactly.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
                 snapshot_dir: str | os.PathLike | None = None, snapshot_steps: int = 0,
                 is_main_process: bool = True, snapshot_dtype: torch.dtype = torch.float32):
        sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise InputError(f"--ema_sigma_rels needs one or more different values, got {sigma_rels}.")
        if snapshot_steps and snapshot_dir is None:
            raise ValueError("snapshot_steps needs a snapshot_dir to write into.")
        self.model = model
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.snapshot_steps = int(snapshot_steps or 0)
        self.is_main_process = is_main_process
        self.snapshot_dtype = snapshot_dtype
        self.last_step = 0  # optimiser steps averaged so far
        parameters = dict(model.named_parameters())
        self.names = list(parameters)
        # A tied weight appears once in named_parameters but under each of its names in state_dict. By name, not
        # by object: FSDP2 replaces the parameter objects (with sharded ones) but keeps their names.
        index_of_parameter = {id(p): index for index, p in enumerate(parameters.values())}
        self._index_of_name = {name: index_of_parameter[id(p)]
                               for name, p in model.named_parameters(remove_duplicate=False)}
        with torch.no_grad():
            self.averages = [[p.detach().to(self._average_dtype(p.dtype), copy=True) for p in parameters.values()]
                             for _ in sigma_rels]
        self._stale_snapshots_checked = False

    @staticmethod
    def _average_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    # ---- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor], global_step: int) -> None:
        """Average in the weights after optimiser step `global_step` (1 for the first step), then
        write snapshots if `global_step` is a multiple of `snapshot_steps`."""
        global_step = int(global_step)
        if global_step <= self.last_step:
            raise ValueError(
                f"PowerFunctionEMA.step: global_step {global_step} is not after the last step averaged "
                f"({self.last_step}); pass the number of optimiser steps done, counting this one."
            )
        parameters = [p.detach() for p in parameters]
        self._check_matches(parameters)
        if not self._stale_snapshots_checked:
            self._set_aside_snapshots_after(self.last_step)
            self._stale_snapshots_checked = True
        inputs = [p if p.dtype == a.dtype else p.to(a.dtype) for p, a in zip(parameters, self.averages[0])]
        for averages, gamma in zip(self.averages, self.gammas):
            weight = 1.0 - power_ema_beta(gamma, self.last_step, global_step)
            torch._foreach_lerp_(averages, inputs, weight)  # one multi-tensor kernel per profile
        self.last_step = global_step
        if self.snapshot_due(global_step):
            self.save_snapshots()

    def snapshot_due(self, global_step: int) -> bool:
        """Whether `step(..., global_step)` writes snapshots."""
        return bool(self.snapshot_steps) and global_step % self.snapshot_steps == 0

    def _check_matches(self, parameters: list[torch.Tensor]) -> None:
        first = self.averages[0]
        if len(parameters) != len(first):
            raise ValueError(
                f"PowerFunctionEMA.step got {len(parameters)} parameters; it tracks the {len(first)} of the model "
                "it was built with. Pass model.parameters() of that model."
            )
        if first[0].device != parameters[0].device:  # the model moved (e.g. to the GPU by prepare)
            self.to(parameters[0].device)
        if self.last_step == 0:
            for name, p, a in zip(self.names, parameters, first):
                if p.shape != a.shape:
                    raise ValueError(f"PowerFunctionEMA.step: parameter {name} has shape {tuple(p.shape)}, "
                                     f"expected {tuple(a.shape)}.")

    def to(self, device) -> "PowerFunctionEMA":
        self.averages = [[a.to(device) for a in averages] for averages in self.averages]
        return self

    # ---- the averages ---------------------------------------------------------------------------

    def averaged_state_dict(self, sigma_rel: float, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A full state dict of the model (loads with `load_state_dict`) holding this profile's average
        in place of the parameters, on the CPU. Buffers are the model's current ones."""
        averages = self.averages[self._profile_index(sigma_rel)]
        result = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            index = self._index_of_name.get(key)
            value = averages[index] if index is not None else value
            result[key] = value.detach().to("cpu", dtype=dtype if value.is_floating_point() and dtype else None,
                                             copy=True).contiguous()
        return result

    def _profile_index(self, sigma_rel: float) -> int:
        for index, tracked in enumerate(self.sigma_rels):
            if math.isclose(tracked, sigma_rel, rel_tol=1e-9):
                return index
        raise KeyError(f"sigma_rel {sigma_rel:g} is not tracked; tracked: {self.sigma_rels}.")

    # ---- snapshots ------------------------------------------------------------------------------

    def save_snapshots(self) -> list[Path]:
        """Write each profile's average at the current step (main process only; returns the paths).

        Call it at the end of training too, so that the last step has snapshots; it writes nothing
        when the snapshots of this step are already there."""
        if not self.is_main_process or self.snapshot_dir is None or self.last_step == 0:
            return []
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for sigma_rel, gamma in zip(self.sigma_rels, self.gammas):
            path = self.snapshot_dir / snapshot_file_name(self.last_step, sigma_rel)
            if path.exists() and self._stale_snapshots_checked:
                continue
            tensors = self.averaged_state_dict(sigma_rel, dtype=self.snapshot_dtype)
            save_safetensors_atomically(tensors, path, self._snapshot_metadata(sigma_rel, gamma))
            written.append(path)
        return written

    def _snapshot_metadata(self, sigma_rel: float, gamma: float) -> dict[str, str]:
        metadata = {"format": "pt", "uldm_format": SNAPSHOT_FORMAT, "step": str(self.last_step),
                    "sigma_rel": repr(float(sigma_rel)), "gamma": repr(float(gamma)),
                    "model_class": type(self.model).__name__}
        config = getattr(self.model, "config", None)
        if config is not None:
            metadata["config"] = json.dumps(dict(config), default=list)
        return metadata

    def _set_aside_snapshots_after(self, step: int) -> None:
        """Snapshots later than the step training (re)starts from belong to another trajectory (an
        interrupted run's future, or an earlier run in the same folder): move them into a subfolder,
        where synthesis does not look, instead of mixing them with the new ones."""
        if not self.is_main_process or self.snapshot_dir is None or not self.snapshot_dir.is_dir():
            return
        later = [s for s in list_snapshots(self.snapshot_dir, warn=False) if s.step > step]
        if not later:
            return
        aside = self.snapshot_dir / f"superseded-after-step-{step}"
        counter = 1
        while aside.exists():
            counter += 1
            aside = self.snapshot_dir / f"superseded-after-step-{step}-{counter}"
        aside.mkdir()
        for snapshot in later:
            os.replace(snapshot.path, aside / snapshot.path.name)
        logger.warning(
            "Moved %d post-hoc EMA snapshots later than step %d into %s: training goes on from step %d, so they "
            "are not part of this run.", len(later), step, aside, step,
        )

    # ---- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "sigma_rels": list(self.sigma_rels),
            "last_step": self.last_step,
            "names": list(self.names),
            "averages": [list(averages) for averages in self.averages],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = [float(s) for s in state["sigma_rels"]]
        if len(saved) != len(self.sigma_rels) or not all(
                math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, self.sigma_rels)):
            raise InputError(
                f"The checkpoint's post-hoc EMA tracks sigma_rel {saved}, this run asks for {self.sigma_rels}. "
                f"Resume with --ema_sigma_rels {' '.join(f'{s:g}' for s in saved)} (the profiles cannot change "
                "mid-run)."
            )
        if list(state["names"]) != self.names:
            raise InputError(
                "The checkpoint's post-hoc EMA was taken of a model with other parameters "
                f"({len(state['names'])} tensors, this model has {len(self.names)}); resume with the same model."
            )
        for averages, saved_averages in zip(self.averages, state["averages"]):
            for average, saved_average in zip(averages, saved_averages):
                average.copy_(saved_average)
        self.last_step = int(state["last_step"])
        self._stale_snapshots_checked = False


# --------------------------------------------------------------------------------------------
# Wiring into a training script


SNAPSHOTS_PER_RUN = 20  # default cadence; fits of sigma_rel 0.03-0.2 from 0.05/0.10 are then within 3%


@dataclass(frozen=True)
class PosthocEmaConfig:
    """--use_posthoc_ema's options (`uldm.args.add_posthoc_ema_args`)."""

    ema_sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS
    ema_snapshot_steps: int | None = None  # None: max_train_steps / SNAPSHOTS_PER_RUN
    ema_snapshot_dtype: str = "float32"


def check_posthoc_ema_supported(accelerator) -> None:
    """The averages are taken of the whole parameters on every process: under FSDP2 the training loop gathers them
    for every step; DeepSpeed ZeRO-3's partitioned parameters cannot be averaged here."""
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero_stage = deepspeed_plugin.zero_stage if deepspeed_plugin is not None else 0
    if zero_stage == 3:
        raise InputError("--use_posthoc_ema needs every process to hold the whole model; it does not work with "
                         "DeepSpeed ZeRO-3. Use DDP, FSDP2 or ZeRO-1/2, or train without --use_posthoc_ema.")


def build_posthoc_ema(model: torch.nn.Module, config: PosthocEmaConfig | None, accelerator, max_train_steps: int,
                      output_dir: str | os.PathLike) -> PowerFunctionEMA | None:
    """The run's PowerFunctionEMA (None without --use_posthoc_ema), over the unwrapped `model`."""
    if config is None:
        return None
    check_posthoc_ema_supported(accelerator)
    snapshot_steps = config.ema_snapshot_steps
    if snapshot_steps is None:
        snapshot_steps = max(1, max_train_steps // SNAPSHOTS_PER_RUN)
    elif snapshot_steps < 1:
        raise InputError(f"--ema_snapshot_steps must be at least 1, got {snapshot_steps}: post-hoc EMA needs snapshots.")
    return PowerFunctionEMA(model, config.ema_sigma_rels, snapshot_dir=Path(output_dir) / SNAPSHOT_DIR_NAME,
                            snapshot_steps=snapshot_steps, is_main_process=accelerator.is_main_process,
                            snapshot_dtype=getattr(torch, config.ema_snapshot_dtype))


# --------------------------------------------------------------------------------------------
# Reading snapshots


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def read_snapshot_info(path: str | os.PathLike) -> Snapshot | None:
    """The step and profile of a snapshot file, from its metadata (None if it is not one)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("uldm_format") != SNAPSHOT_FORMAT:
        return None
    return Snapshot(path=path, step=int(metadata["step"]), sigma_rel=float(metadata["sigma_rel"]),
                    gamma=float(metadata["gamma"]))


def list_snapshots(snapshot_dir: str | os.PathLike, warn: bool = True) -> list[Snapshot]:
    """The snapshots directly in `snapshot_dir` (not in its subfolders), by step then sigma_rel."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        return []
    snapshots = []
    for path in sorted(snapshot_dir.glob("*.safetensors")):
        try:
            info = read_snapshot_info(path)
        except Exception as error:  # a foreign or damaged file: skip it, say which
            info = None
            if warn:
                logger.warning("Skipping %s: not readable as safetensors (%s).", path, error)
            continue
        if info is None:
            if warn:
                logger.warning("Skipping %s: not a post-hoc EMA snapshot (no %s metadata).", path, SNAPSHOT_FORMAT)
            continue
        snapshots.append(info)
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


# --------------------------------------------------------------------------------------------
# Synthesis


@dataclass
class SynthesizedEMA:
    sigma_rel: float
    step: int
    state_dict: dict[str, torch.Tensor]
    coefficients: list[tuple[Snapshot, float]]
    fit_error: float


def snapshots_for_step(snapshots: Sequence[Snapshot], at_step: int | None = None) -> tuple[list[Snapshot], int]:
    """The snapshots a reconstruction at `at_step` (default: the latest snapshot) may use: those not
    after it (a later snapshot has seen weights the target has not), one per (step, profile)."""
    if not snapshots:
        raise InputError(
            "No post-hoc EMA snapshots found. Train with --use_posthoc_ema (snapshots every --ema_snapshot_steps "
            f"steps go to <output_dir>/{SNAPSHOT_DIR_NAME}/), or point --snapshot_dir at that folder."
        )
    steps = sorted({s.step for s in snapshots})
    if at_step is None:
        at_step = steps[-1]
    elif at_step not in steps:
        raise InputError(f"There are no snapshots of step {at_step}; snapshot steps: {_short_list(steps)}. "
                         "Give one of them, or leave the step out to use the latest.")
    unique = {}
    for snapshot in snapshots:
        if 0 < snapshot.step <= at_step:
            unique.setdefault((snapshot.step, round(snapshot.gamma, 9)), snapshot)
    return list(unique.values()), at_step


def _short_list(values: Sequence) -> str:
    values = list(values)
    return ", ".join(map(str, values)) if len(values) <= 8 else \
        ", ".join(map(str, values[:3])) + ", ..., " + ", ".join(map(str, values[-3:]))


def profile_fits(used: Sequence[Snapshot], sigma_rels: Sequence[float], at_step: int,
                 max_fit_error: float | None = None) -> list[Coefficients]:
    """The least-squares combination of the `used` snapshots for each sigma_rel at `at_step` (no weights read);
    InputError for a fit error above `max_fit_error`."""
    fits = [solve_coefficients([s.step for s in used], [s.gamma for s in used], at_step, sigma_rel_to_gamma(sigma_rel))
            for sigma_rel in sigma_rels]
    if max_fit_error is not None:
        for sigma_rel, fit in zip(sigma_rels, fits):
            if fit.fit_error > max_fit_error:
                raise InputError(
                    f"sigma_rel {sigma_rel:g} cannot be reconstructed well from these snapshots: the best fit of its "
                    f"profile is off by {fit.fit_error:.1%} (limit {max_fit_error:.1%}). Snapshots of profiles "
                    f"{sorted({s.sigma_rel for s in used})} at {len({s.step for s in used})} steps up to {at_step} "
                    "are there; a short EMA needs snapshots close to the last step (smaller --ema_snapshot_steps) or a "
                    "tracked profile near it. Choose a sigma_rel nearer the tracked ones, or raise the limit."
                )
    return fits


def synthesize_state_dicts(snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], at_step: int | None = None,
                           max_fit_error: float | None = None, dtype: torch.dtype = torch.float32,
                           ) -> list[SynthesizedEMA]:
    """The EMA of each sigma_rel at `at_step` (default: the latest snapshot step), from the snapshots.

    Reads each snapshot file once for all targets and accumulates in float64 (memory: one float64
    copy of the weights per target). Refuses (InputError) a sigma_rel outside (0, sqrt(1/12)), a
    fit error above `max_fit_error`, and snapshots whose tensors do not agree in names and shapes."""
    from safetensors.torch import load_file

    used, at_step = snapshots_for_step(snapshots, at_step)
    fits = profile_fits(used, sigma_rels, at_step, max_fit_error)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    reference_shapes: dict[str, tuple] | None = None
    reference_path = None
    for index, snapshot in enumerate(used):
        tensors = load_file(str(snapshot.path))
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if reference_shapes is None:
            reference_shapes, reference_path = shapes, snapshot.path
        elif shapes != reference_shapes:
            raise InputError(_shape_mismatch_message(reference_path, reference_shapes, snapshot.path, shapes))
        for target, fit in zip(sums, fits):
            weight = float(fit.weights[index])
            for key, value in tensors.items():
                if not value.is_floating_point():  # integer buffers are not averaged: keep the latest
                    target[key] = value
                    continue
                if key not in target:
                    target[key] = torch.zeros(value.shape, dtype=torch.float64)
                target[key].add_(value.to(torch.float64), alpha=weight)
        del tensors
    return [
        SynthesizedEMA(
            sigma_rel=float(sigma_rel), step=at_step, fit_error=fit.fit_error,
            state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in target.items()},
            coefficients=list(zip(used, (float(w) for w in fit.weights))),
        )
        for sigma_rel, fit, target in zip(sigma_rels, fits, sums)
    ]


def _shape_mismatch_message(path_a, shapes_a: dict, path_b, shapes_b: dict) -> str:
    differing = sorted(k for k in shapes_a.keys() | shapes_b.keys() if shapes_a.get(k) != shapes_b.get(k))
    example = differing[0]
    return (
        f"{path_b.name} and {path_a.name} are snapshots of different models ({len(differing)} tensors differ, e.g. "
        f"{example}: {shapes_b.get(example)} vs {shapes_a.get(example)}). Keep only one run's snapshots in the folder."
    )


def snapshot_shapes(path: str | os.PathLike) -> dict[str, tuple]:
    """Tensor names and shapes of a snapshot, from its header (the weights are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_shapes_fit(given: dict[str, tuple], model: torch.nn.Module, what: str) -> None:
    """InputError unless `given` (name -> shape) has exactly the model's tensors, with the same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v) for k, v in given.items()}
    if given == expected:
        return
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
    details = []
    if reshaped:
        details.append(f"{len(reshaped)} tensors have other shapes, e.g. {reshaped[0]}: "
                       f"{given[reshaped[0]]} vs {expected[reshaped[0]]}")
    if missing:
        details.append(f"{len(missing)} tensors are missing, e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} are unexpected, e.g. {unexpected[0]}")
    raise InputError(f"{what} do not fit this model: {'; '.join(details)}. Use the snapshots of the run that "
                     "trained this model (its own ema_snapshots/ folder).")


# --------------------------------------------------------------------------------------------
# Pipelines


@dataclass
class SynthesizedPipeline:
    sigma_rel: float
    step: int
    fit_error: float
    folder: Path | None  # None when not written (a sweep that keeps only the best)
    score: float | None = None


def pipeline_folder_name(sigma_rel: float) -> str:
    return f"sigma_rel_{sigma_rel:g}"


def write_synthesized_pipelines(
    pipeline_dir: str | os.PathLike,
    sigma_rels: Sequence[float],
    output_dir: str | os.PathLike,
    snapshot_dir: str | os.PathLike | None = None,
    at_step: int | None = None,
    max_fit_error: float | None = None,
    score: Callable[[object], float] | None = None,
    keep_only_best: bool = False,
    targets_per_pass: int = 4,
) -> list[SynthesizedPipeline]:
    """For each sigma_rel, the saved pipeline at `pipeline_dir` with its UNet weights replaced by the
    EMA synthesised from the snapshots, written to `<output_dir>/sigma_rel_<value>/`.

    `score(pipeline) -> float` (lower is better, e.g. FID) is the seam for a sweep: each pipeline is
    scored in memory; with `keep_only_best` only the best one is written. The scores go to
    `<output_dir>/posthoc_ema.json` either way. `targets_per_pass` bounds the memory (one float64
    copy of the UNet per target) at the cost of reading the snapshots once per pass."""
    if keep_only_best and score is None:
        raise ValueError("keep_only_best needs a score function.")
    sigma_rels = list(dict.fromkeys(check_sigma_rel(s) for s in sigma_rels))
    pipeline_dir, output_dir = Path(pipeline_dir), Path(output_dir)
    if not pipeline_dir.is_dir():
        raise InputError(f"{pipeline_dir} is not a folder. Give the output folder of a training run with "
                         "--use_posthoc_ema (a saved pipeline with ema_snapshots/ inside).")
    snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else pipeline_dir / SNAPSHOT_DIR_NAME
    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise InputError(
            f"No post-hoc EMA snapshots in {snapshot_dir}. Train with --use_posthoc_ema (snapshots every "
            f"--ema_snapshot_steps steps go to <output_dir>/{SNAPSHOT_DIR_NAME}/), or point --snapshot_dir at them."
        )
    used, target_step = snapshots_for_step(snapshots, at_step)
    profile_fits(used, sigma_rels, target_step, max_fit_error)  # every target checked before any is made or scored
    pipeline = load_pipeline(pipeline_dir)
    # Before any weights are read: do the snapshots (the latest one stands for all) fit this UNet?
    check_shapes_fit(snapshot_shapes(snapshots[-1].path), pipeline.unet, f"The snapshots in {snapshot_dir}")
    results: list[SynthesizedPipeline] = []
    best: tuple[SynthesizedPipeline, SynthesizedEMA] | None = None
    for start in range(0, len(sigma_rels), max(1, targets_per_pass)):
        batch = sigma_rels[start:start + max(1, targets_per_pass)]
        for synthesized in synthesize_state_dicts(snapshots, batch, at_step, max_fit_error):
            pipeline.unet.load_state_dict(synthesized.state_dict)
            outcome = SynthesizedPipeline(synthesized.sigma_rel, synthesized.step, synthesized.fit_error, None)
            if score is not None:
                outcome.score = float(score(pipeline))
            if keep_only_best:
                if best is None or outcome.score < best[0].score:
                    best = (outcome, synthesized)
            else:
                outcome.folder = _save_pipeline_atomically(pipeline, output_dir / pipeline_folder_name(outcome.sigma_rel),
                                                           synthesized)
            results.append(outcome)
            logger.info("sigma_rel %g at step %d: profile fit error %.2e%s", outcome.sigma_rel, outcome.step,
                        outcome.fit_error, "" if outcome.score is None else f", score {outcome.score:.4g}")
    if best is not None:
        outcome, synthesized = best
        pipeline.unet.load_state_dict(synthesized.state_dict)
        outcome.folder = _save_pipeline_atomically(pipeline, output_dir / pipeline_folder_name(outcome.sigma_rel),
                                                   synthesized)
    _write_summary(output_dir, pipeline_dir, snapshot_dir, results)
    return results


def load_pipeline(pipeline_dir: Path):
    """The saved pipeline (loaded without running code from the folder), or an InputError saying why not."""
    from .. import pipeline_loading  # diffusers is imported only by the jobs that load a pipeline

    if not (pipeline_dir / "model_index.json").is_file():
        raise InputError(
            f"{pipeline_dir} is not a saved pipeline (no model_index.json). Give the output folder of a finished "
            "training run (or any pipeline with the same UNet), and --snapshot_dir if its snapshots are elsewhere."
        )
    try:
        return pipeline_loading.load_pipeline(str(pipeline_dir))
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot load the pipeline in {pipeline_dir}: {error}") from error


def _save_pipeline_atomically(pipeline, folder: Path, synthesized: SynthesizedEMA) -> Path:
    """The pipeline and its posthoc_ema.json, put in place of `folder` only once whole (uldm.saving)."""
    from ..saving import save_folder_atomically

    def write(temporary: Path) -> None:
        pipeline.save_pretrained(str(temporary))
        (temporary / "posthoc_ema.json").write_text(json.dumps({
            "sigma_rel": synthesized.sigma_rel,
            "gamma": sigma_rel_to_gamma(synthesized.sigma_rel),
            "step": synthesized.step,
            "profile_fit_error": synthesized.fit_error,
            "snapshots": [{"file": s.path.name, "step": s.step, "sigma_rel": s.sigma_rel, "weight": w}
                          for s, w in synthesized.coefficients],
        }, indent=2) + "\n")

    save_folder_atomically(write, folder, f"the pipeline of sigma_rel {synthesized.sigma_rel:g}")
    return folder


def _write_summary(output_dir: Path, pipeline_dir: Path, snapshot_dir: Path,
                   results: Sequence[SynthesizedPipeline]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    scored = [r for r in results if r.score is not None]
    summary = {
        "pipeline": str(pipeline_dir), "snapshot_dir": str(snapshot_dir),
        "results": [{"sigma_rel": r.sigma_rel, "step": r.step, "profile_fit_error": r.fit_error, "score": r.score,
                     "folder": str(r.folder) if r.folder else None} for r in results],
        "best_sigma_rel": min(scored, key=lambda r: r.score).sigma_rel if scored else None,
    }
    (output_dir / "posthoc_ema.json").write_text(json.dumps(summary, indent=2) + "\n")
