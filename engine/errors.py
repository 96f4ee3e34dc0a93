"""One family of expected failures, mapped once to a CLI exit code and an HTTP status.

Every failure a user can cause or meet (a bad challenge file, a refused submission, an
unsealed dataset, an unusable image, an absent Docker Engine) is an `EpreuveError`, or one
of the runner's `RunnerError`s or the GPU allocator's `NotEnoughGPUs` (`runners` and
`gpu` know nothing of the engine, so they carry their own codes). The command line prints
its message and exits with its code: an expected failure never shows a traceback.
"""

from __future__ import annotations

EXIT_REFUSED = 1  # the request was understood and refused: the message says why
EXIT_USAGE = 2  # the command line itself is wrong (as click's usage errors)
EXIT_NO_ENGINE = 3  # the platform is not there: no Docker Engine, no GPU


class EpreuveError(Exception):
    """An expected failure whose message a user can act on."""

    exit_code = EXIT_REFUSED
    http_status = 422


class NotFound(EpreuveError):
    """A challenge, phase, submission or file that does not exist."""

    http_status = 404


class Conflict(EpreuveError):
    """Refused because of the state of things (quota used, phase closed, results exist)."""

    http_status = 409


class LeaseLost(Conflict, RuntimeError):
    """The job was swept (lease expired) or cancelled while this worker held it: someone
    else owns it now. Raised without rolling back anyone's unit of work."""


class Unavailable(EpreuveError):
    """The platform cannot do it now (no Docker Engine, no GPU); not the user's fault."""

    exit_code = EXIT_NO_ENGINE
    http_status = 503


def _outside_the_family() -> tuple[type[Exception], ...]:
    """The runner's and the GPU allocator's expected failures: `runners` and `gpu` know
    nothing of the engine, so they carry their own exit code and HTTP status."""
    from gpu.allocator import NotEnoughGPUs
    from runners.base import RunnerError

    return (RunnerError, NotEnoughGPUs)


def expected(exc: BaseException) -> bool:
    """An expected failure: shown as its message, never as a traceback."""
    return isinstance(exc, (EpreuveError, *_outside_the_family()))


def exit_code(exc: BaseException) -> int:
    return exc.exit_code if expected(exc) else EXIT_REFUSED


def http_status(exc: BaseException) -> int:
    return exc.http_status if expected(exc) else 500
