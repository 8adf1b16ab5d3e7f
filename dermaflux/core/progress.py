"""What a `dermaflux` command shows while it runs, and where everything else goes.

The console gets DermaFlux's own messages, one progress display per stage and errors. The run log
(<first folder the run owns>/logs/<stage>-<time>.log, its path printed once) gets everything: our
messages, Ray's and the libraries' loggers, Python warnings, the output of Ray's workers (which Ray
forwards to this process) and what native code writes to this process's stderr. `--verbose` puts
all of it on the console too, as Ray prints it, with debug logging.

A progress bar is tqdm on a terminal. When stderr is not a terminal (a pipe, `tee`, a CI log) it is
one line every `DERMAFLUX_PROGRESS_INTERVAL` seconds (default 30) and a summary at the end, never two
lines of one stage within `MIN_GAP_S`. Ray Data stages leave a terminal to Ray Data's own bars.
Outside the CLI (a Ray job) a bar logs the same lines through the `dermaflux.progress` logger.
Code on Ray workers reports with `report_progress`: a plain stdout line that the driver turns into
bar updates and that still reads well where nothing does (`ray job logs`).

Outside a `session()` (the CLI) nothing else changes: no handlers, no run log, no redirection.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

LOG_DIR = "logs"
MIN_GAP_S = 10.0
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that Ray configures with console handlers of their own (propagate=False).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune")
PROGRESS_LINE = re.compile(r"^dermaflux progress: (?P<key>\S+) (?P<done>\d+)/(?P<total>\d+)(?: \| (?P<note>.*))?$")


def report_progress(key: str, done: int, total: int, note: str = "") -> None:
    """On a Ray worker: `done` of `total` for the driver's bar `key` (one stdout line); in the driver's own process
    (train.launch local), the bar itself."""
    if _session is not None and key in _session.bars:
        _session.bars[key].set(done, note=note, total=total)
        return
    # sys.stdout.write, not print: Ray Train patches print() on its workers into a logger that also
    # echoes to stdout, which printed every such line twice.
    sys.stdout.write(f"dermaflux progress: {key} {done}/{total}" + (f" | {note}" if note else "") + "\n")
    sys.stdout.flush()


class RunLogHandler(logging.Handler):
    """Every record (and raw worker line) into the run log; held in memory until the log opens."""

    MAX_HELD = 20_000

    def __init__(self, verbose: bool):
        super().__init__(logging.DEBUG if verbose else logging.INFO)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.held: list[str] = []
        self.file = None

    def open(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8", buffering=1)
        held, self.held = self.held, []
        self.file.write("".join(line + "\n" for line in held))

    def write_line(self, text: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(text + "\n")
            elif len(self.held) < self.MAX_HELD:
                self.held.append(text)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


class ConsoleHandler(logging.Handler):
    """Our records (all with --verbose; anyone's errors) on the console, written around an open tqdm bar."""

    def __init__(self, verbose: bool):
        super().__init__(logging.DEBUG if verbose else logging.INFO)
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if self.verbose or record.levelno >= logging.ERROR:
            return True
        return record.name == "dermaflux" or record.name.startswith("dermaflux.")

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno >= logging.WARNING or self.verbose:
            return f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"
        return f"{stamp} {record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            _console_write(text)
        except Exception:
            self.handleError(record)


def console() -> TextIO:
    """Where the user sees this command's messages (stderr; a copy of it while the run log takes fd 2)."""
    return _session.console if _session is not None else sys.stderr


def _console_write(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=console())  # plain write when no bar is open; above the bars otherwise


@dataclass
class _Session:
    verbose: bool
    interactive: bool
    run_log: RunLogHandler
    console_handler: ConsoleHandler
    console: TextIO  # the real stderr: our messages, bars and errors
    log_path: Path | None = None
    bars: dict[str, Bar] = field(default_factory=dict)
    restore: list = field(default_factory=list)  # undo steps, run in reverse at exit


_session: _Session | None = None


def active() -> bool:
    return _session is not None


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[None]:
    """The CLI's output for one command: console and run-log handlers, quiet libraries; undone at exit."""
    global _session
    if _session is not None:  # nested (a CLI call inside a CLI call): the outer one owns the output
        yield
        return
    _session = _Session(
        verbose=verbose, interactive=sys.stderr.isatty(), run_log=RunLogHandler(verbose),
        console_handler=ConsoleHandler(verbose), console=sys.stderr,
    )
    try:
        _install_logging(_session)
        if not verbose:
            _quiet_environment(_session)
        yield
    finally:
        for undo in reversed(_session.restore):
            with contextlib.suppress(Exception):
                undo()
        _session.run_log.close()
        _session = None


def _install_logging(s: _Session) -> None:
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG if s.verbose else logging.INFO)
    root.addHandler(s.console_handler)
    root.addHandler(s.run_log)
    logging.captureWarnings(True)  # warnings are records: console only with --verbose, always in the log
    s.restore.append(lambda: (root.removeHandler(s.console_handler), root.removeHandler(s.run_log),
                              root.setLevel(old_level), logging.captureWarnings(False)))


def _set_env(s: _Session, name: str, value: str) -> None:
    old = os.environ.get(name)
    os.environ[name] = value
    s.restore.append(lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old))


def _quiet_environment(s: _Session) -> None:
    """Environment read by libraries here and (inherited when Ray starts) on the workers."""
    # Ray Data's non-terminal status block (7 lines) goes to the run log; once a minute is plenty there.
    interval = os.environ.get("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")
    _set_env(s, "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", interval)
    if not s.interactive:
        # Off a terminal a library's tqdm bar (pipeline loading, weight loading) is a heap of \r-joined
        # lines; our bars pass disable=False and print their own lines.
        _set_env(s, "TQDM_DISABLE", "1")
        _set_env(s, "HF_HUB_DISABLE_PROGRESS_BARS", "1")


def open_run_log(folder: str | os.PathLike, name: str) -> Path | None:
    """The run log in `folder`/logs (the first call of a session; later calls return it). None outside the CLI."""
    s = _session
    if s is None:
        return None
    if s.log_path is not None:
        return s.log_path
    logs = Path(folder) / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    s.log_path = logs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    s.run_log.open(s.log_path)
    if not s.verbose:
        _native_stderr_to_log(s)
    log.info("log of this run: %s", shown(s.log_path))
    return s.log_path


def _native_stderr_to_log(s: _Session) -> None:
    """File descriptor 2 (C++ code: Ray's core worker, torch) into the run log. Off a terminal
    `sys.stderr` goes there too (library handlers, warnings, stray prints) and only our console
    writes reach the real stderr; on a terminal `sys.stderr` stays there, for tqdm bars."""
    if sys.stderr is not sys.__stderr__:  # captured (pytest) or replaced: leave the descriptors alone
        return
    sys.stderr.flush()
    console_fd = os.dup(2)
    log_fd = os.open(s.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    original = sys.stderr
    s.console = open(console_fd, "w", buffering=1, encoding=original.encoding, errors="backslashreplace")
    if s.interactive:
        sys.stderr = s.console

    def restore():
        s.console.flush()
        sys.stderr.flush()
        os.dup2(console_fd, 2)
        s.console.close()  # closes console_fd
        sys.stderr = s.console = original

    s.restore.append(restore)


def attach_to_ray() -> None:
    """Ray's loggers and (once ray.init ran) the workers' forwarded output into the run log; the console
    keeps their errors. Safe to call again."""
    s = _session
    if s is None:
        return
    import ray.data  # noqa: F401  (configures the `ray.data` logger, which the stages use)

    for name in RAY_LOGGERS:
        _adopt_logger(s, logging.getLogger(name))
    _route_worker_output(s)


def _adopt_logger(s: _Session, logger: logging.Logger) -> None:
    if not logger.handlers or s.run_log in logger.handlers:
        return  # propagates to the root logger, which has ours
    logger.addHandler(s.run_log)
    s.restore.append(lambda: logger.removeHandler(s.run_log))
    if s.verbose:
        return
    for handler in logger.handlers:
        if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
            old = handler.level
            handler.setLevel(max(old, logging.ERROR))
            s.restore.append(lambda h=handler, level=old: h.setLevel(level))


def _route_worker_output(s: _Session) -> None:
    """Replace Ray's printer of forwarded worker lines (present when log_to_driver) with ours."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    ray_printer = dict(dispatcher.handlers).get("ray_print_logs")
    if ray_printer is None or dict(dispatcher.handlers).get("dermaflux") is not None:
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("dermaflux", lambda data: _on_worker_output(s, data, ray_printer))

    def restore():
        dispatcher.remove_handler("dermaflux")
        dispatcher.add_handler("ray_print_logs", ray_printer)

    s.restore.append(restore)


def _on_worker_output(s: _Session, data: dict, ray_printer) -> None:
    """One batch of a worker's lines: progress reports feed the bars; the rest goes to the run log
    (and, with --verbose, to Ray's own printer)."""
    lines = data.get("lines", [])
    others = []
    for line in lines:
        match = PROGRESS_LINE.match(line)
        if match and match["key"] in s.bars:
            s.bars[match["key"]].set(int(match["done"]), note=match["note"] or "", total=int(match["total"]))
        else:
            others.append(line)
    if s.verbose and others:
        ray_printer({**data, "lines": others})
    if data.get("pid") == "autoscaler":  # a status report every few seconds; Ray itself prints only the events
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    prefix = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
    for line in lines:
        s.run_log.write_line(f"{prefix} {line}")


class _RunLogStream(io.TextIOBase):
    """A text stream whose lines go to the run log with a prefix, as a worker's forwarded lines do; after the
    session, to the process's own stdout (a library handler may keep a reference to it)."""

    def __init__(self, prefix: str):
        self.prefix, self.pending = prefix, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        s = _session
        if s is None:
            return sys.__stdout__.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            s.run_log.write_line(f"{self.prefix} {line}")
        return len(text)


@contextlib.contextmanager
def worker_output_in_run_log(name: str) -> Iterator[None]:
    """Code that runs in the driver as a Ray worker would (train.launch local): its stdout (prints, library
    handlers that write to stdout, as DeepSpeed's does) into the run log, prefixed `(name)`, as a worker's lines
    go there; unchanged with --verbose or outside the CLI."""
    if _session is None or _session.verbose:
        yield
        return
    with contextlib.redirect_stdout(_RunLogStream(f"({name} pid={os.getpid()})")):
        yield


def announce(text: str) -> None:
    """A headline (a stage starting or ending): on the console as written, and in the run log."""
    print(text, file=console(), flush=True)
    if _session is not None:
        _session.run_log.write_line(text.strip())


def shown(path: str | os.PathLike) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    text = str(path)
    if "://" in text or not Path(text).is_absolute():
        return text
    with contextlib.suppress(ValueError):
        return str(Path(text).relative_to(Path.cwd()))
    return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# Per stage (a stage may show several bars, e.g. train: the VAE fit, then the steps): when its last
# progress line was printed. Two lines of one stage are never closer than MIN_GAP_S.
_last_line_at: dict[str, float] = {}


def _interval() -> float:
    """Seconds between a bar's lines off a terminal."""
    return float(os.environ.get("DERMAFLUX_PROGRESS_INTERVAL", "30"))


class Bar:
    """One stage's progress: `update`/`set` from the driver, or from workers through `report_progress(key, ...)`."""

    def __init__(self, key: str, what: str, total: int | None, unit: str, ray_data: bool = False,
                 stage: str | None = None):
        self.key, self.what, self.total, self.unit = key, what, total, unit
        self.stage = stage or key
        self.done, self.note = 0, ""
        self.started = self.last_line_at = time.monotonic()
        # Speed counts from the first report: start-up (and steps done before a resume) are not speed.
        self.first_report: tuple[int, float] | None = None
        self.tqdm = None
        s = _session
        # A terminal shows Ray Data's own bars for a Ray Data stage (Ray draws them when stdout is a terminal).
        if s is not None and s.interactive and not (ray_data and sys.stdout.isatty()):
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, desc=what, unit=f" {unit}", file=console(), dynamic_ncols=True,
                             disable=False, mininterval=0.5)

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: str | None = None, total: int | None = None) -> None:
        if self.first_report is None:
            self.first_report = (done, time.monotonic())
        self.done, self.total = done, total or self.total
        self.note = self.note if note is None else note
        if self.tqdm is not None:
            self.tqdm.total, self.tqdm.n = self.total, done
            self.tqdm.set_postfix_str(self.note, refresh=True)
        finished = self.total is not None and done >= self.total  # close() says so, once
        if not finished and time.monotonic() - self.last_line_at >= _interval():
            self._line()

    def speed(self) -> float:
        if self.first_report is None:
            return 0.0
        first_done, first_at = self.first_report
        elapsed = time.monotonic() - first_at
        return (self.done - first_done) / elapsed if elapsed > 0 else 0.0

    def line(self, final: bool = False) -> str:
        total = f"/{self.total}" if self.total else ""
        text = f"{self.what}: {self.done}{total} {self.unit}"
        if final:
            return f"{text} in {_duration(time.monotonic() - self.started)}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        speed = self.speed()
        if speed > 0:
            text += f", {speed:.3g} {self.unit}/s"
            if self.total:
                text += f", ETA {_duration((self.total - self.done) / speed)}"
        return text + (f" | {self.note}" if self.note else "")

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        if now - _last_line_at.get(self.stage, float("-inf")) < MIN_GAP_S:
            return
        _last_line_at[self.stage] = self.last_line_at = now
        # With a tqdm bar on screen the line is for the run log only. Outside the CLI (Ray jobs) the
        # line goes wherever the process logs.
        logging.getLogger("dermaflux.progress").info(self.line(final), extra={"file_only": self.tqdm is not None})

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        self._line(final=True)


@contextlib.contextmanager
def bar(key: str, what: str, total: int | None, unit: str, ray_data: bool = False,
        stage: str | None = None) -> Iterator[Bar]:
    """A progress bar for the duration of the block; workers reach it by `key` (see `report_progress`).
    `stage` (default: `key`) groups the bars of one stage for the spacing of their lines."""
    shown = Bar(key, what, total, unit, ray_data=ray_data, stage=stage)
    if _session is not None:
        _session.bars[key] = shown
    try:
        yield shown
    finally:
        if _session is not None:
            _session.bars.pop(key, None)
        shown.close()
