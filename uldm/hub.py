"""Sharing a run's output folder on the Hugging Face Hub, the way diffusers' training examples do.

diffusers' examples create the repository at the start and `upload_folder` the output folder after
each model save and at the end, on the main process. This module does the same with three changes:

* only what makes the model page goes up (pipeline or adapter, model card and its images, sample
  grids, training arguments, loss curve), never checkpoints, logs, the latent cache, EMA snapshots or
  temporary files;
* uploads after intermediate saves run in the background, so training does not wait for the network;
* a failed upload never fails the run: the model is complete on disk, and one message says why the
  upload failed and gives the exact command that uploads the same files later (diffusers raises at
  that point, after hours of training, with a traceback and a failed exit status).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from uldm.errors import InputError

logger = logging.getLogger(__name__)

# Arguments that must never be written anywhere (training_args.json, the model card, trackers):
# those files go up to the Hub with the model.
SECRET_ARGUMENTS = ("hub_token",)

# What stays local. Patterns are huggingface_hub's: fnmatch on the path relative to the output folder,
# where "*" also matches "/" (so "checkpoint-*" takes every file under every checkpoint folder).
LOCAL_ONLY_PATTERNS = (
    "checkpoint-*",        # training checkpoints (optimiser state etc.): for resuming, not for sharing
    "logs/*",              # TensorBoard (the default --logging_dir)
    "latent_cache/*",      # the encoded data set (the default --latent_cache_dir)
    "ema_snapshots/*",
    "previous_run_*",      # an earlier run's files, moved aside by --overwrite_output_dir
    "fid_reference/*",     # cached FID reference features (the default --reference_stats_cache)
    "best_checkpoint.json",  # names a local checkpoint (--keep_best_checkpoint)
    ".*",                  # hidden files and folders: checkpoints being written (.tmp-checkpoint-*),
                           # other temporary writes, notebook and editor files
    "*/.*",
    "*.tmp",
    "*.pyc",
)

# Text files small enough to check for a leaked token before they go up.
TEXT_SUFFIXES = {".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".py", ".csv"}
MAX_SCANNED_BYTES = 16 * 2**20


@dataclass(frozen=True)
class HubConfig:
    """diffusers' Hub flags of a run (built by `uldm.args.hub_config`)."""

    output_dir: str
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_private_repo: bool = False
    report_to: str | None = None  # the trackers: wandb would record a --hub_token given on the command line
    # Folders of the run that stay local even when they lie inside the output folder (TensorBoard logs,
    # the latent cache, DreamBooth's class images): absolute, or relative to the working directory.
    local_folders: tuple[str, ...] = ()

    @property
    def repo_id(self) -> str:
        """diffusers' rule: --hub_model_id, else the name of the output folder (in the token's namespace)."""
        return self.hub_model_id or Path(os.path.abspath(self.output_dir)).name

    @property
    def ignore_patterns(self) -> list[str]:
        return upload_ignore_patterns(self.output_dir, self.local_folders)


def check_hub_config(config: HubConfig) -> None:
    """Refuse, before any work, what cannot be uploaded safely or at all; warn about Hub flags that do
    nothing. Raises InputError."""
    if config.hub_token is not None and reports_to_wandb(config.report_to):
        # Same refusal as diffusers, and for the same reason: wandb stores every argument of the run in
        # its config, so the token would be readable by anyone who can see the wandb project.
        raise InputError(
            "You cannot use both --report_to=wandb and --hub_token: wandb records every command-line argument "
            "of the run, so your token would be stored in the wandb project. Log in once with `hf auth login` "
            "(or set HF_TOKEN in the environment) and drop --hub_token.")
    if not config.push_to_hub:
        given = [f"--{name}" for name in ("hub_model_id", "hub_token", "hub_private_repo") if getattr(config, name)]
        if given:
            logger.warning("%s given without --push_to_hub: nothing will be uploaded.", ", ".join(given))
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = config.repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        source = "--hub_model_id" if config.hub_model_id else f"the name of --output_dir ({repo_id!r})"
        raise InputError(
            f"{source} is not a valid Hub repository name: {error} Pass --hub_model_id NAME or "
            "--hub_model_id USER_OR_ORG/NAME (letters, digits, '-', '_', '.').") from None


def reports_to_wandb(report_to: str | None) -> bool:
    trackers = {name.strip() for name in str(report_to or "").split(",")}
    return "wandb" in trackers or ("all" in trackers and importlib.util.find_spec("wandb") is not None)


def public_arguments(args) -> dict:
    """vars(args) without secrets: what training_args.json, the model card and trackers may record."""
    return {key: (None if key in SECRET_ARGUMENTS else value) for key, value in vars(args).items()}


def upload_ignore_patterns(output_dir: str | os.PathLike, local_folders=()) -> list[str]:
    """LOCAL_ONLY_PATTERNS plus the run's `local_folders` that lie inside the output folder (e.g. TensorBoard
    logs in --logging_dir, the latent cache in --latent_cache_dir, DreamBooth's --class_data_dir)."""
    output_dir = Path(os.path.abspath(output_dir))
    patterns = list(LOCAL_ONLY_PATTERNS)
    for folder in filter(None, local_folders):
        inside = Path(os.path.abspath(folder))
        if inside != output_dir and output_dir in inside.parents:
            pattern = f"{inside.relative_to(output_dir).as_posix()}/*"
            if pattern not in patterns:
                patterns.append(pattern)
    return patterns


def files_to_upload(output_dir: str | os.PathLike, ignore_patterns: list[str]) -> list[str]:
    """The files (relative POSIX paths) that upload_folder sends for these patterns."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(output_dir)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=ignore_patterns))


def retry_command(repo_id: str, output_dir: str | os.PathLike, ignore_patterns: list[str],
                  private: bool = False, offline: bool = False) -> str:
    """The `hf upload` command that sends the same files as the uploader (with offline mode switched
    off for it where it was on)."""
    parts = ["HF_HUB_OFFLINE=0"] if offline else []
    parts += ["hf", "upload", repo_id, os.path.abspath(output_dir), "--repo-type", "model"]
    for pattern in ignore_patterns:
        parts += ["--exclude", pattern]
    if private:
        parts.append("--private")
    return shlex.join(parts)


def describe_hub_error(error: BaseException) -> str:
    """Why an upload failed, in one sentence, with what to do about it where that is known."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if isinstance(error, LocalTokenNotFoundError):
        return "not logged in to the Hub: run `hf auth login` (or set HF_TOKEN) first"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        detail = (getattr(error, "server_message", None) or str(error)).strip().splitlines()[0]
        if status == 401:
            return f"the Hub refused the token (HTTP 401: {detail}); log in with `hf auth login` or check --hub_token"
        if status == 403:
            return f"the token may not write to this repository (HTTP 403: {detail}); use a token with write access"
        return f"the Hub answered HTTP {status}: {detail}"
    if isinstance(error, (ConnectionError, TimeoutError)) or any(
            cls.__name__ in ("TransportError", "ConnectError", "TimeoutException") for cls in type(error).__mro__):
        return f"the Hub could not be reached ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def hub_is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


class TokenInUploadError(RuntimeError):
    """A file about to be uploaded contains the Hub token."""


class HubUploader:
    """Keeps a Hub model repository in sync with a run's output folder; inactive unless enabled (on the
    main process, with --push_to_hub). Every method is safe to call on every process."""

    def __init__(self, repo_id: str, output_dir: str | os.PathLike, *, token: str | None = None,
                 private: bool = False, ignore_patterns: list[str] | None = None, enabled: bool = True):
        self.repo_id = repo_id
        self.output_dir = Path(output_dir)
        self.token = token
        self.private = private
        self.ignore_patterns = list(LOCAL_ONLY_PATTERNS if ignore_patterns is None else ignore_patterns)
        self.enabled = enabled
        self._api = None
        self._repo_future: concurrent.futures.Future | None = None
        self._upload_future: concurrent.futures.Future | None = None
        if enabled:
            from huggingface_hub import HfApi

            self._api = HfApi(token=token)

    @classmethod
    def from_config(cls, config: HubConfig, is_main_process: bool = True) -> "HubUploader":
        """The uploader of a run (inactive without --push_to_hub or off the main process); it starts
        creating the repository in the background, so that a login or network problem shows at once."""
        uploader = cls(config.repo_id, config.output_dir, token=config.hub_token, private=config.hub_private_repo,
                       ignore_patterns=config.ignore_patterns, enabled=config.push_to_hub and is_main_process)
        uploader.start()
        return uploader

    # -- what the trainers call -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the repository (exist_ok) in the background; a failure is reported, not raised."""
        if not self.enabled or self._repo_future is not None:
            return
        if hub_is_offline():
            logger.warning("HF_HUB_OFFLINE=1: nothing is uploaded during this run; at its end a message says how "
                           "to upload the output folder.")
            return
        self._repo_future = self._api.run_as_future(self._create_repo_and_report)

    def upload_in_background(self, commit_message: str) -> concurrent.futures.Future | None:
        """Upload the output folder without waiting (after a --save_model_epochs save). Skipped while the
        previous upload still runs: the next one (at the latest the final one) carries these files too."""
        if not self.enabled or hub_is_offline():
            return None
        if self._upload_future is not None and not self._upload_future.done():
            logger.info("The previous upload to %s is still running; this save goes up with the next one.",
                        self.repo_id)
            return None
        self._upload_future = self._api.run_as_future(self._upload_and_report, commit_message)
        return self._upload_future

    def upload_and_wait(self, commit_message: str = "End of training") -> bool:
        """Upload the output folder and wait (at the end of training; waits for a running upload first).
        True when it went up; on failure one warning says why and how to upload later. Never raises."""
        if not self.enabled:
            return False
        if self._upload_future is not None:
            concurrent.futures.wait([self._upload_future])
        try:
            url = self._upload(commit_message)
        except Exception as error:  # noqa: BLE001 - whatever goes wrong, the saved model must not look lost
            logger.warning(self.failure_message(error))
            return False
        logger.info("Uploaded %s to %s", self.output_dir, url)
        return True

    @property
    def location(self) -> str:
        """The repository id to show in the model card: with its namespace once the Hub has told it."""
        if self._repo_future is not None and self._repo_future.done():
            return self._repo_future.result() or self.repo_id
        return self.repo_id

    def failure_message(self, error: BaseException) -> str:
        from huggingface_hub.errors import OfflineModeIsEnabled

        command = retry_command(self.repo_id, self.output_dir, self.ignore_patterns, self.private,
                                offline=isinstance(error, OfflineModeIsEnabled))
        return (f"Upload of {self.output_dir} to the Hub repository {self.repo_id} failed: {describe_hub_error(error)}.\n"
                f"Everything is saved locally in {os.path.abspath(self.output_dir)}. Upload it later with:\n"
                f"  {command}")

    # -- the work -----------------------------------------------------------------------------------

    def _create_repo(self) -> str:
        return self._api.create_repo(self.repo_id, private=self.private, exist_ok=True).repo_id

    def _upload(self, commit_message: str) -> str:
        self.refuse_files_with_token()
        repo_id = self._create_repo()  # again: cheap, and it recovers from a failed start
        # upload_folder appends its own defaults to the list it is given, so it gets a copy.
        info = self._api.upload_folder(repo_id=repo_id, folder_path=self.output_dir, commit_message=commit_message,
                                       ignore_patterns=list(self.ignore_patterns))
        return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"

    def refuse_files_with_token(self) -> None:
        """A safety net: files that name the token (e.g. arguments written without public_arguments)
        would publish it."""
        if not self.token:
            return
        leaking = []
        for name in files_to_upload(self.output_dir, self.ignore_patterns):
            path = self.output_dir / name
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size <= MAX_SCANNED_BYTES:
                if self.token in path.read_text(errors="ignore"):
                    leaking.append(name)
        if leaking:
            raise TokenInUploadError(
                f"{', '.join(leaking)} contain{'s' if len(leaking) == 1 else ''} the Hub token; remove it from "
                "there (it must never be published) before uploading")

    # Background jobs report their own outcome (before their future completes) and never raise.

    def _create_repo_and_report(self) -> str | None:
        try:
            repo_id = self._create_repo()
        except Exception as error:  # noqa: BLE001
            logger.warning("The Hub repository %s could not be created now: %s. Training goes on; the upload "
                           "is tried again after each model save and at the end.", self.repo_id,
                           describe_hub_error(error))
            return None
        logger.info("Pushing to the Hub repository %s after each model save and at the end.", repo_id)
        return repo_id

    def _upload_and_report(self, commit_message: str) -> str | None:
        try:
            url = self._upload(commit_message)
        except Exception as error:  # noqa: BLE001
            logger.warning("Upload to %s failed: %s. It is tried again at the next save and at the end.",
                           self.repo_id, describe_hub_error(error))
            return None
        logger.info("Uploaded %s to %s", self.output_dir, url)
        return url
