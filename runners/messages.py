"""What a participant reads when a run fails: what happened, and what to do about it.

Each message names the limit that was hit with its value, because the same
limits apply in `epreuve sandbox run` and `epreuve check`: a participant can
reproduce the failure on their own machine.
"""

from __future__ import annotations

import signal

from runners.base import FailureReason, RunSpec
from runners.logs import shown

EXIT_HINTS = {
    126: "the command is not executable",
    127: "the command was not found in the image",
    134: "the process aborted (SIGABRT)",
    137: "the process was killed (SIGKILL)",
    139: "the process crashed with a segmentation fault (SIGSEGV)",
}


def human_bytes(value: int | float | None) -> str:
    if value is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def exit_hint(exit_code: int | None) -> str:
    if exit_code in EXIT_HINTS:
        return f" ({EXIT_HINTS[exit_code]})"
    if exit_code is not None and exit_code > 128:
        try:
            return f" (killed by {signal.Signals(exit_code - 128).name})"
        except ValueError:
            return ""
    return ""


def for_reason(reason: FailureReason | None, spec: RunSpec, exit_code: int | None,
               peak_memory: int | None) -> str:
    if reason is None:
        return "The container finished successfully."
    if reason is FailureReason.TIMEOUT:
        return (f"The run exceeded its time limit of {spec.timeout_seconds:g} s and was stopped "
                f"(SIGTERM, then SIGKILL after {spec.stop_grace_seconds:g} s). Make inference "
                "faster or look for a hang; the limit is the same when you test locally.")
    if reason is FailureReason.OOM_KILLED:
        return (f"The container ran out of memory: it reached its limit of "
                f"{human_bytes(spec.memory_bytes)} (peak {human_bytes(peak_memory)}) and the "
                "kernel killed it. Reduce memory use (smaller batches, sliding windows, "
                "loading one case at a time); files in /tmp count towards this limit.")
    if reason is FailureReason.OUTPUT_QUOTA:
        return (f"The container wrote more than its output quota of "
                f"{human_bytes(spec.output_quota_bytes)} to /output and was stopped. Write only "
                "the expected files, compressed (e.g. .nii.gz); use /tmp for scratch files.")
    if reason is FailureReason.NONZERO_EXIT:
        return (f"The container exited with code {exit_code}{exit_hint(exit_code)}. "
                "The end of its log usually says why.")
    if reason is FailureReason.CANCELLED:
        return "The run was cancelled before it finished."
    return f"The run failed: {reason.value}."


def image_missing(reference: str) -> str:
    return (f"Image {reference!r} is not present on this node, and the engine never pulls "
            "images. Submit it as a `docker save` tar, or load it with `docker load` first.")


def image_absent() -> str:
    return ("The image, accepted and pinned by the platform, is not present on the node that "
            "ran this job. This is not caused by your submission; the run is retried "
            "automatically.")


def image_wrong_arch(image_arch: str, node_arch: str) -> str:
    return (f"The image is built for {image_arch}, but this node runs {node_arch}. "
            f"Rebuild it for linux/{node_arch} (docker buildx build --platform linux/{node_arch}).")


def image_without_command() -> str:
    return ("The image has neither an ENTRYPOINT nor a CMD: add one so the platform knows "
            "what to run.")


def image_cannot_start(detail: str) -> str:
    # the daemon's words echo the image's own strings (its WorkingDir, Env): shown, not replayed
    return (f"The container could not be started from this image: {shown(detail)}. Check the "
            "ENTRYPOINT/CMD and USER of the image: do they exist inside it?")


def infrastructure(exc: BaseException) -> str:
    # the exception's text (host paths, sockets) is for organisers: it goes in RunResult.detail
    return (f"The platform failed to run the container ({type(exc).__name__}). This is not "
            "caused by your submission; the run is retried automatically.")


def stopped_from_outside() -> str:
    return ("The container was stopped by the platform, not by your code or its limits (for "
            "example the container engine restarted). This is not caused by your submission; "
            "the run is retried automatically.")
