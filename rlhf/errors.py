"""Errors the command line turns into one clear line and an exit code.

A `UserError` is a mistake the user can fix (bad recipe, missing file, wrong order of steps): exit 2.
`DoesNotFit` means the memory budget says the step will not fit the device: exit 3.
Anything else is a bug in rlhf and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2


class DoesNotFit(Exception):
    """The memory-budget pre-flight predicts the step will not fit; `report` is the rendered budget."""

    exit_code = 3

    def __init__(self, message: str, report: str = ""):
        super().__init__(message)
        self.report = report


def explain(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for an exception that is not a UserError: known environment failures read as such,
    anything else is reported as a bug (exit 1, traceback shown)."""
    import errno

    name = type(exc).__name__
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):  # an error of ours that knows its exit code (e.g. a failed merge self-check)
        return str(exc), code
    if name == "OutOfMemoryError":
        return (
            "out of GPU memory; run `rlhf budget` for this step and apply its suggestions "
            "(smaller mini-batch, gradient checkpointing, 4-bit), or retry with --auto-fit",
            3,
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing in {_folder(exc.filename)}; free space there and rerun with --resume", 2
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write in {_folder(exc.filename)} ({exc.strerror}); make it writable, or pass another --run DIR",
            2,
        )
    return f"{name}: {exc} (this is a bug in rlhf; the traceback is above)", 1


def _folder(filename) -> str:
    """Where a failed write went: the folder of one of rlhf's temporary files (.NAME.xxxx.tmp), else the path."""
    import os

    if not filename:
        return "the output folder"
    name = os.path.basename(str(filename))
    return os.path.dirname(str(filename)) or "." if name.startswith(".") and name.endswith(".tmp") else str(filename)
