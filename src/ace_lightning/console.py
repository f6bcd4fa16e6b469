"""The console: one logger for the package, each event printed once, on rank zero only.

``log.info(...)`` replaces ``print``; under DDP only global rank zero writes (the rank comes from
Lightning's ``rank_zero_only.rank`` or the launcher's RANK / SLURM_PROCID variables). INFO lines go
to stdout as the bare message, warnings and errors to stderr as ``warning: ...`` / ``error: ...``.

``import ace_lightning`` installs the cheap part (the package's handler, Lightning's logger kept
from printing its lines a second time through the root logger, the advertisement filter, the
warning filters): nothing is imported for it. Every entry point calls ``setup_console()`` at the
start of its main function, after Hydra has configured logging (Hydra configures it anew for each
job of a multirun): it does the same again and also sends the package's and Lightning's records to
the log files on the root logger (Hydra's ``<job>.log``), and prints warnings on one line with their
category. Every part is idempotent.

Progress bars go to stderr, tables and paths to stdout (a table piped to a file stays clean):
``progress(iterable, enabled, **tqdm_kw)`` is tqdm when ``enabled`` (``trainer.enable_progress_bar``)
on global rank zero, else the iterable itself, and a ``desc`` is then logged once as one line, so
a long step says what it is doing without a bar; ``progress_bar_callbacks(enabled)`` is
Lightning's bar, moved from stdout to stderr.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from typing import Any, Iterable, TypeVar

T = TypeVar("T")

log = logging.getLogger("ace_lightning")


def global_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    # Lightning's rank (strategies set it, also under ddp_spawn), only if Lightning is imported:
    # importing it here would cost seconds on the first log line of a command that never trains
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankZeroFilter(logging.Filter):
    """Drops records on every rank but zero."""

    def filter(self, record: logging.LogRecord) -> bool:
        return global_rank() == 0


# ---- the package's handler ------------------------------------------------------------------------

class ConsoleHandler(logging.Handler):
    """INFO and below to ``sys.stdout``, warnings and errors to ``sys.stderr``; the streams are
    looked up at each record, so pytest's capsys and ``contextlib.redirect_stdout`` see the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if stream is None:  # pythonw
                return
            stream.write(msg + "\n")
            stream.flush()
        except RecursionError:  # pragma: no cover
            raise
        except Exception:  # pragma: no cover
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    """The bare message; ``warning: `` / ``error: `` before warnings and errors (the CLI's style)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


class _ToFile(logging.Handler):
    """Forwards records to a log file of the root logger (Hydra's ``<job>.log``) with that file's
    own format; marked so that the next ``setup_console()`` replaces it (each Hydra job has its own
    file)."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _install_package_handler() -> None:
    """One ConsoleHandler (rank zero only) on the ``ace_lightning`` logger, which does not
    propagate: Hydra's root handler would print every line a second time."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        handler = ConsoleHandler()
        handler.setFormatter(ConsoleFormatter())
        handler.addFilter(RankZeroFilter())
        log.addHandler(handler)


# ---- Lightning's loggers --------------------------------------------------------------------------

# Lightning's `rank_zero_info` logs through one of these (whichever of lightning.pytorch /
# lightning.fabric was imported last set lightning_utilities' module logger).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_utilities.core.rank_zero")


class AdvertisementFilter(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing [litlogger] / [litmodels] ..." lines (Lightning
    2.6 logs them from LoggerConnector.configure_logger and CallbackConnector for every Trainer,
    that is every stage)."""

    _AD = re.compile(r"^\W*Tip:.*(litlogger|litmodels|pypi\.org/project/lit|Lightning (AI|Experiments))", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self._AD.match(record.getMessage())
        except Exception:  # pragma: no cover - a record whose message cannot be built
            return True


def _quiet_lightning() -> None:
    """Lightning prints each of its lines once. Its ``lightning`` logger has its own handler
    ("INFO: ...", added when Lightning is imported); ``lightning.pytorch`` / ``lightning.fabric``
    either propagate to it (the root logger had a handler at their import, as under Hydra) or get a
    handler of their own and stop there. Without this, ``lightning`` propagated on to the root
    logger and Hydra's console handler printed every line again. Setting it here works whether or
    not Lightning is imported yet (its import never touches ``propagate`` of ``lightning``)."""
    logging.getLogger("lightning").propagate = False
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, AdvertisementFilter) for f in logger.filters):
            logger.addFilter(AdvertisementFilter())


def _mirror_root_files() -> None:
    """Send the package's records (rank zero) and Lightning's to the root logger's log files, since
    neither propagates to the root logger any more."""
    root_files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    lightning = logging.getLogger("lightning")
    targets = [(log, True), (lightning, False)]
    # a Lightning sub-logger with a handler of its own does not propagate to `lightning`
    targets += [(logging.getLogger(n), False) for n in ("lightning.pytorch", "lightning.fabric")
                if not logging.getLogger(n).propagate]
    for logger, rank_zero in targets:
        for h in [h for h in logger.handlers if isinstance(h, _ToFile)]:
            logger.removeHandler(h)
        for target in root_files:
            forward = _ToFile(target)
            if rank_zero:
                forward.addFilter(RankZeroFilter())
            logger.addHandler(forward)


# ---- warnings -------------------------------------------------------------------------------------

# Deprecations inside the dependencies: the user cannot act on them (a deprecation the package's own
# code triggers is attributed to the package's module by the warning's stacklevel, and still shows).
# Seen: torch.jit.script's FutureWarning (auto_LiRPA's operators script functions at import; also
# silenced inside bounds/compat.py's import of auto_LiRPA) and torch's `LeafSpec` FutureWarning
# raised from lightning.pytorch.utilities._pytree.
_DEPENDENCIES = (r"(torch|torchvision|torchmetrics|lightning|lightning_fabric|pytorch_lightning|lightning_utilities"
                 r"|auto_LiRPA|timm|hydra|omegaconf|wandb|matplotlib|numpy|scipy|pyarrow|PIL|tqdm|onnx"
                 r"|appdirs|pkg_resources|setuptools|google|sentry_sdk)(\.|$)")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

# Lightning's PossibleUserWarnings (and one UserWarning) that do not apply to this project's stages.
# Each is matched by its message and Lightning's module; any other PossibleUserWarning still shows.
_LIGHTNING_NOT_APPLICABLE = (
    # fit_loop: fires only for quick runs (data.subset, limit_train_batches): per-step training
    # values are still written every log_every_n_steps steps counted across epochs, and the epoch
    # metrics (val/*, test/*) at every epoch end.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # data_connector: data.num_workers is chosen per dataset in conf/data (2 for the image sets; 0 for
    # the synthetic set, held in memory, where worker processes only add start-up time); Lightning's
    # suggestion (all cores but one, for each of the 3-4 loaders of a stage, on every DDP rank) does
    # not fit.
    r"The '\w+' does not have many workers which may be a bottleneck",
    # model_checkpoint: the stage runner owns the stage folder (same config: resume from
    # last.ckpt; another config: refused or moved aside), so a non-empty checkpoints/ is expected.
    r"Checkpoint directory .* exists and is not empty",
)


def _filter_warnings() -> None:
    """Installed at import and again by setup_console(); ``filterwarnings`` drops an identical
    earlier entry, so the list does not grow."""
    for category in _DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=_DEPENDENCIES)
    for message in _LIGHTNING_NOT_APPLICABLE:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"lightning(\.|$)")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """One line per warning, with its category (``path:line: Category: message``). Lightning's
    ``formatwarning`` drops the category for every file whose path contains "lightning" (this
    package's too), so a PossibleUserWarning could not be told from a real one."""
    stream = file if file is not None else sys.stderr
    if stream is None:  # pragma: no cover - pythonw
        return
    try:
        stream.write(f"{filename}:{lineno}: {category.__name__}: {message}\n")
    except OSError:  # pragma: no cover
        pass


def _one_line_warnings() -> None:
    # only over Python's own showwarning: never over pytest's recorder or logging.captureWarnings
    if warnings.showwarning is getattr(warnings, "_showwarning_orig", None):
        warnings.showwarning = _show_warning


# ---- entry points ---------------------------------------------------------------------------------

def install() -> None:
    """The part ``import ace_lightning`` runs: no import, no I/O."""
    _install_package_handler()
    _quiet_lightning()
    _filter_warnings()


def setup_console() -> None:
    """Call at the start of every entry point's main (after Hydra configured logging, so once per
    Hydra job); idempotent. See the module docstring."""
    install()
    _mirror_root_files()
    _one_line_warnings()


def progress(iterable: Iterable[T], enabled: bool, **kw: Any) -> Iterable[T]:
    """``tqdm(iterable, **kw)`` on stderr when ``enabled`` (pass ``trainer.enable_progress_bar``)
    and this process is global rank zero; otherwise ``iterable`` itself, and ``desc`` (when
    given) is logged as one line: ``<desc>: <n> batches``. Defaults: ``leave=False``,
    ``dynamic_ncols=True``."""
    if not enabled or global_rank() != 0:
        if kw.get("desc"):
            size = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
            log.info(f"{kw['desc']}: {size} batch{'es' if size != 1 else ''}" if size is not None else kw["desc"])
        return iterable
    from tqdm.auto import tqdm

    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


@functools.lru_cache(maxsize=1)
def _stderr_progress_bar_class() -> type:
    from lightning.pytorch.callbacks import TQDMProgressBar

    def on_stderr(name: str):
        def init(self):  # Lightning creates each bar with file=sys.stdout, read at that moment
            with contextlib.redirect_stdout(sys.stderr):
                return getattr(TQDMProgressBar, name)(self)
        init.__name__ = name
        return init

    names = ("init_sanity_tqdm", "init_train_tqdm", "init_validation_tqdm", "init_test_tqdm", "init_predict_tqdm")
    doc = "Lightning's TQDMProgressBar on stderr (its own writes to stdout, where tables and paths go)."
    return type("StderrProgressBar", (TQDMProgressBar,), {"__doc__": doc, **{n: on_stderr(n) for n in names}})


def progress_bar_callbacks(enabled: bool) -> list:
    """``[Lightning's progress bar on stderr]`` for a Trainer's callbacks when ``enabled``
    (``trainer.enable_progress_bar``), else ``[]`` (Lightning refuses a bar it was told not to show)."""
    return [_stderr_progress_bar_class()()] if enabled else []
