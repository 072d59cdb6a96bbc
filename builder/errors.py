"""Every fatal error the tool raises, one class per exit code.

The CLI catches `FatalError`, prints `error: <message>` on one line and exits
with `exit_code`. A traceback is shown only with `--debug`.
"""

from __future__ import annotations


class FatalError(Exception):
    """An error the user can fix; its message says what to do."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        message = one_line(message)
        super().__init__(message)
        self.message = message


def one_line(text: str) -> str:
    """Control characters shown escaped: an error is one line whatever value it quotes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class ConfigError(FatalError):
    """matrix.yaml, a selector or a command-line value is wrong."""

    exit_code = 2


class KnowledgeError(FatalError):
    """The bundled compatibility data is inconsistent (a bug in this tool)."""

    exit_code = 3


class RenderCheckError(FatalError):
    """Committed images/ differ from what the templates render."""

    exit_code = 4


class EngineError(FatalError):
    """The Docker engine is missing, too old, or refused an operation."""

    exit_code = 5


class BuildFailed(FatalError):
    """One or more images failed to build; the others were still built."""

    exit_code = 6


class RegistryError(FatalError):
    """A registry is unreachable, or a push would change an immutable tag."""

    exit_code = 7


class SmokeFailed(FatalError):
    """One or more images failed their contract or smoke step."""

    exit_code = 8


class AuditFailed(FatalError):
    """A CUDA binary in an image has no kernels its target GPU can run (`audit`)."""

    exit_code = 9


class NetworkUnreachable(FatalError):
    """An upstream the command needs (the package index for `knowledge check`) cannot be reached."""

    exit_code = 10


class Busy(FatalError):
    """Another build of the same project holds its lock (build/.lock)."""

    exit_code = 11


class Interrupted(FatalError):
    """The run was interrupted (Ctrl-C) and cleaned up."""

    exit_code = 130
