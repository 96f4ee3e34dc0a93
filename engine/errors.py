"""One family of expected failures, mapped once to a CLI exit code and an HTTP status.

Every failure a user can cause or meet (a bad challenge file, a refused submission, an
unsealed dataset, an unusable image, an absent Docker Engine) is an `EpreuveError`, or one
of the runner's own exceptions listed in `RUNNER_ERRORS` (`runners` and `gpu` know nothing
of the engine, so they cannot subclass it). The command line prints its message and exits
with its code: an expected failure never shows a traceback.
"""

from __future__ import annotations

from functools import cache

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


class Unavailable(EpreuveError):
    """The platform cannot do it now (no Docker Engine, no GPU); not the user's fault."""

    exit_code = EXIT_NO_ENGINE
    http_status = 503


@cache
def runner_errors() -> dict[type[Exception], tuple[int, int]]:
    """(exit code, HTTP status) of the runner's exceptions, which cannot subclass
    EpreuveError. Imported here, not at the top: the pure layers (medio, scoring) import this
    module and must not pull in the Docker SDK."""
    from gpu.allocator import NotEnoughGPUs
    from runners.base import InvalidRunSpec
    from runners.docker import DockerUnavailable, ImageRejected
    from runners.image_user import UserUnresolvable

    return {
        DockerUnavailable: (EXIT_NO_ENGINE, 503),
        NotEnoughGPUs: (EXIT_NO_ENGINE, 503),
        InvalidRunSpec: (EXIT_USAGE, 422),
        ImageRejected: (EXIT_REFUSED, 422),
        UserUnresolvable: (EXIT_REFUSED, 422),
    }


def expected(exc: BaseException) -> bool:
    """An expected failure: shown as its message, never as a traceback."""
    return isinstance(exc, (EpreuveError, *runner_errors()))


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, EpreuveError):
        return exc.exit_code
    return next((code for kind, (code, _) in runner_errors().items()
                 if isinstance(exc, kind)), EXIT_REFUSED)


def http_status(exc: BaseException) -> int:
    if isinstance(exc, EpreuveError):
        return exc.http_status
    return next((status for kind, (_, status) in runner_errors().items()
                 if isinstance(exc, kind)), 500)
