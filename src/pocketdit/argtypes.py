"""What every `pocketdit` command checks before it starts work: argument types and ranges, output paths,
optional packages. One helper per kind, so that all commands (and the ones later issues add) answer bad
input the same way: a `CLIError` that `pocketdit.cli.main` prints as one `pocketdit: error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

from .utils import cli_error

__all__ = [
    "CLIError", "exit_code_command", "ArgumentParser", "positive_int", "non_negative_int", "seed", "threads", "finite_float",
    "positive_float", "guidance_scale", "time_shift", "learning_rate", "check_output_file", "check_output_dir", "check_device", "require_modules", "quiet_loading", "loading_input", "IMAGE_EXTENSIONS",
]


class CLIError(Exception):
    """An expected failure of a command (bad argument, unusable path, missing extra): one line, exit 2."""


def exit_code_command(fn):
    """A command `fn(argv) -> exit code` that can also be called on its own (forwarded commands, tests):
    its CLIError becomes the one `pocketdit: error:` line and exit code 2, as under `pocketdit.cli.main`."""

    @functools.wraps(fn)
    def command(argv) -> int:
        try:
            return fn(argv)
        except CLIError as e:
            return cli_error(str(e))

    return command


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a CLIError (one line naming the command) instead of usage + exit."""

    def error(self, message: str):
        command = self.prog.removeprefix("pocketdit").strip()  # main prints the "pocketdit: error:" prefix
        raise CLIError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:  # "1e3" is a fine way to write 1000; "1e23" is not a 64-bit integer and fails below
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not math.isfinite(value) or not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: torch generators take 0 <= seed < 2**63."""
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text}")
    return value


def threads(text: str) -> int:
    """CPU threads: 0 means torch's default."""
    value = _int(text)
    if not 0 <= value <= (os.cpu_count() or 1) * 4:
        raise argparse.ArgumentTypeError(f"expected 0 (torch's default) to {(os.cpu_count() or 1) * 4} threads, got {value}")
    return value


def finite_float(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected a number <= {high:g}, got {text}")
        return value

    return parse


positive_float = finite_float(0.0, low_open=True)
guidance_scale = finite_float(0.0, 100.0)  # classifier-free guidance: 1 = off; beyond 100 only saturates
time_shift = finite_float(0.0, 1000.0, low_open=True)  # the flow timestep shift
learning_rate = finite_float(0.0, 1.0, low_open=True)

# extensions PIL writes without extra plugins
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _check_writable_in(path: Path, parent: Path, option: str) -> None:
    """`path` will be created inside `parent` (or a folder under it that does not exist yet)."""
    while not parent.exists():  # the command creates missing folders; the first existing one must take them
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is not a directory")
    try:  # os.access says yes to root everywhere (/proc included): try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot write in {parent} ({e.strerror or e})") from None


def check_output_file(path: Union[str, os.PathLike], option: str, extensions: Optional[Iterable[str]] = None) -> Path:
    """An output file the command will write at the end: fail now, not after the work."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{option} {path}: is a directory; give a file name")
    if extensions is not None:
        extensions = tuple(extensions)
        if path.suffix.lower() not in extensions:
            raise CLIError(f"{option} {path}: unknown extension {path.suffix or '(none)'!r}; use one of "
                           f"{', '.join(extensions)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{option} {path}: file is not writable")
    _check_writable_in(path, path.parent, option)
    return path


def check_output_dir(path: Union[str, os.PathLike], option: str, overwrite: bool = False,
                     allowed: Iterable[str] = ()) -> Path:
    """An output directory: not a file, writable, and empty unless --overwrite (or holding only `allowed` names,
    what the same command wrote before), so a run or other files are never silently mixed with new output."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path}: is a file, not a directory")
    if path.is_dir() and not overwrite:
        others = sorted(p.name for p in path.iterdir() if p.name not in set(allowed))
        if others:
            shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
            raise CLIError(f"{option} {path}: directory is not empty ({shown}); choose a new directory or pass "
                           f"--overwrite")
    _check_writable_in(path, path, option)
    return path


def check_device(spec: str, option: str = "--device") -> str:
    """'auto', or a torch device that exists on this machine ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if spec == "auto":
        return spec
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"{option} {spec!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{option} {spec!r}: this torch has no usable CUDA device (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"{option} {spec!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"{option} {spec!r}: MPS is not available here (use --device cpu or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"{option} {spec!r}: PocketDiT runs on cpu, cuda or mps")
    return spec


def require_modules(modules: Iterable[str], feature: str, extra: Optional[str] = None) -> None:
    """Fail before any work when `feature` needs packages that are not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        hint = f"pip install 'pocketdit[{extra}]'" if extra else f"pip install {' '.join(missing)}"
        raise CLIError(f"{feature} needs {', '.join(missing)}, which is not installed ({hint})")


@contextlib.contextmanager
def quiet_loading():
    """No 'Loading weights' / 'Loading pipeline components' bars from transformers and diffusers while a
    command loads its model: they say nothing here, and an error after them should stay one line."""
    toggles = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            toggles.append(module)
    try:
        yield
    finally:
        for module in toggles:
            module.enable_progress_bar()


@contextlib.contextmanager
def loading_input(path):
    """Loading a model the user named: quiet progress bars, and an input that is not a model (or a damaged
    one) as one CLIError line naming it, instead of the loader's traceback."""
    from .checkpoint import CheckpointError

    try:
        with quiet_loading():
            yield
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, ImportError) as e:
        message = str(e) if not isinstance(e, KeyError) else f"missing entry {e}"
        if isinstance(e, json.JSONDecodeError):  # raised by a loader that does not say which file
            message = f"a JSON file in it is not valid JSON ({e})"
        raise CLIError(f"cannot load {path}: {message}") from None
    except RuntimeError as e:  # torch: weights that do not fit the config
        raise CLIError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
