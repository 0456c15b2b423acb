"""Error types and the documented exit codes of the `compress` CLI.

Exit codes (also in README.md):
  0  ok
  1  internal error (a bug: please report it)
  2  usage error (bad flag, unknown target/pass/plugin, bad value)
  3  accuracy gate failed (bundle still written and marked failed)
  4  bad input or config (model file, data file, output dir) with a hint
  5  missing optional dependency / tool
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INPUT = 4
EXIT_DEPENDENCY = 5


class CompressorError(Exception):
    """Base error: carries the CLI exit code; its message is one line for the user."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        if self.hint:
            msg += f" (hint: {' '.join(self.hint.split())})"
        return msg


class UsageError(CompressorError):
    exit_code = EXIT_USAGE


class InputError(CompressorError):
    """Bad model, data file, output directory or recipe content."""

    exit_code = EXIT_INPUT


class DependencyError(CompressorError):
    exit_code = EXIT_DEPENDENCY


class PassError(CompressorError):
    """A pass failed; the message names the pass and those that ran before it."""

    exit_code = EXIT_INTERNAL


class PluginError(CompressorError):
    """A plugin could not be loaded or raised while running."""

    exit_code = EXIT_USAGE


class TargetError(CompressorError):
    """Compilation for a target failed."""

    exit_code = EXIT_INTERNAL
