"""The live log: a container's output reaches the server while it runs, bounded and inert.

runners/log_stream.py (size, total and rate bounds; hostile bytes rendered), the Docker
runner streaming a real container's log before it exits, and engine/live_logs.py (the one
place the worker route and DbCoordinator.log keep it; capped; read back rendered).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from engine import live_logs
from runners.base import FailureReason, RunSpec
from runners.log_stream import CUT_NOTE, LogStream

HOSTILE = b"\x1b[2J\x1b]0;owned\x07 \xe2\x80\xae reversed \x00 nul \xff\xfe bad\r\n"
NEVER = 3600.0  # an interval that never elapses in a test: only close() sends


def _collected(**bounds) -> tuple[LogStream, list[str]]:
    sent: list[str] = []
    return LogStream(sent.append, interval=NEVER, **bounds).start(), sent


def test_chunks_are_batched_not_sent_one_by_one():
    stream, sent = _collected()
    for n in range(500):
        stream.feed(f"line {n}\n".encode())
    stream.close()
    assert len(sent) == 1  # the rate bound: one send per interval, whatever came meanwhile
    assert sent[0].startswith("line 0\n") and sent[0].endswith("line 499\n")


def test_hostile_bytes_arrive_rendered():
    stream, sent = _collected()
    stream.feed(HOSTILE)
    stream.close()
    text = "".join(sent)
    assert "\x1b" not in text and "\x00" not in text and "\x07" not in text
    assert "\u202e" not in text and "\r" not in text
    assert "\\x1b[2J" in text and "\\u202e" in text and "\ufffd" in text
    assert text.endswith("bad\n")


def test_a_character_split_across_chunks_stays_whole():
    stream, sent = _collected()
    encoded = "café ünïcode\n".encode()
    for byte in encoded:
        stream.feed(bytes([byte]))
    stream.close()
    assert "".join(sent) == "café ünïcode\n"


def test_a_flood_keeps_the_newest_bytes_of_one_chunk_and_says_so():
    stream, sent = _collected(chunk_bytes=1000)
    stream.feed(b"old " * 10_000 + b"NEWEST\n")
    stream.close()
    text = "".join(sent)
    assert text.endswith("NEWEST\n") and "byte(s) skipped" in text
    assert len(text.encode()) < 1200


def test_the_total_per_run_is_capped_with_one_note():
    sent: list[str] = []
    stream = LogStream(sent.append, interval=0.01, chunk_bytes=100, total_bytes=250).start()
    done = threading.Event()

    def until_cut(text: str) -> None:
        sent.append(text)
        if CUT_NOTE in text:
            done.set()

    stream.send = until_cut
    while not done.is_set():
        stream.feed(b"x" * 100)
        done.wait(0.005)
    stream.feed(b"AFTER THE CUT")
    stream.close()
    text = "".join(sent)
    assert text.count("x") <= 250 and text.count(CUT_NOTE) == 1
    assert "AFTER THE CUT" not in text and stream.sent_bytes <= 250


def test_a_failing_receiver_never_breaks_the_stream():
    calls = []

    def refuse(text: str) -> None:
        calls.append(text)
        raise ConnectionError("the server is away")

    stream = LogStream(refuse, interval=NEVER).start()
    stream.feed(b"lost\n")
    stream.close()
    assert calls == ["lost\n"]


@pytest.mark.docker
def test_a_running_containers_log_arrives_before_it_exits(runner, adversarial):
    """The container prints, then sleeps for ten minutes: only a log streamed while it
    runs can stop it (the receiver cancels the run on seeing the line). Without the live
    stream the run would end by its timeout, not by cancellation."""
    cancel = threading.Event()
    received: list[str] = []

    def on_log(text: str) -> None:
        received.append(text)
        if "LIVE-LINE" in "".join(received):
            cancel.set()

    command = ("python3", "-c", "import sys, time; sys.stdout.write('LIVE-LINE \\x1b[31m red"
               "\\n'); sys.stdout.flush(); time.sleep(600)")
    result = runner.run(RunSpec(image=adversarial["probe"], command=command,
                                timeout_seconds=120), cancel=cancel, on_log=on_log)
    assert result.reason == FailureReason.CANCELLED
    text = "".join(received)
    assert "LIVE-LINE \\x1b[31m red\n" in text and "\x1b" not in text
    assert "LIVE-LINE" in result.log_tail  # the recorded log is unchanged


# -- engine/live_logs.py: where the server keeps it ---------------------------------------

def test_the_kept_log_is_rendered_again_on_the_way_in(tmp_path):
    # a remote node's chunk is not trusted to have been rendered by its runner
    assert live_logs.append(tmp_path, 7, 1, "ok \x1b[31m\u202e\x00 line\n")
    assert live_logs.tail(tmp_path, 7, 1) == "ok \\x1b[31m\\u202e\\x00 line\n"
    assert live_logs.tail(tmp_path, 7, 2) == ""  # another attempt's log is its own


def test_the_kept_log_is_capped_per_attempt(tmp_path):
    assert live_logs.append(tmp_path, 1, 1, "a" * 900, max_bytes=1000)
    assert not live_logs.append(tmp_path, 1, 1, "b" * 200, max_bytes=1000)  # not half kept
    assert live_logs.append(tmp_path, 1, 1, "c" * 100, max_bytes=1000)
    assert live_logs.log_path(tmp_path, 1, 1).stat().st_size == 1000


def test_the_tail_starts_clean_when_it_cuts_a_character(tmp_path):
    live_logs.append(tmp_path, 3, 1, "é" * 100 + "END")
    tail = live_logs.tail(tmp_path, 3, 1, max_bytes=10)  # 7 bytes of é's, one cut
    assert tail.endswith("END") and "\ufffd" not in tail and set(tail[:-3]) == {"é"}


def test_a_link_planted_in_place_of_the_log_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    path = live_logs.log_path(tmp_path, 9, 1)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with pytest.raises(OSError):
        live_logs.append(tmp_path, 9, 1, "x")
    assert target.read_text() == ""


# -- pruning: the logs no page reads any more go ------------------------------------------

LONG_AGO = 2 * live_logs.IDLE_BEFORE_PRUNED


def _aged(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def _written(state_dir, job_id: int, attempt: int, age: float = LONG_AGO):
    live_logs.append(state_dir, job_id, attempt, f"job {job_id} attempt {attempt}\n")
    path = live_logs.log_path(state_dir, job_id, attempt)
    _aged(path, age)
    return path


def test_logs_of_attempts_not_in_hand_go_once_idle(tmp_path):
    in_hand = _written(tmp_path, 1, 2)
    earlier_attempt = _written(tmp_path, 1, 1)
    ended = _written(tmp_path, 2, 1)
    just_written = _written(tmp_path, 3, 1, age=5)  # maybe leased after in_hand was read
    stranger = tmp_path / "worker-logs" / "notes.txt"
    stranger.write_text("not ours to remove")
    _aged(stranger, LONG_AGO)

    assert live_logs.prune(tmp_path, {(1, 2)}) == 2

    assert in_hand.exists() and just_written.exists() and stranger.exists()
    assert not earlier_attempt.exists() and not ended.exists()


def test_a_planted_link_is_removed_not_its_target(tmp_path):
    target = tmp_path / "precious"
    target.write_text("kept")
    link = live_logs.log_path(tmp_path, 5, 1)
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    _aged(link, LONG_AGO)
    assert live_logs.prune(tmp_path, set()) == 1
    assert not link.is_symlink() and target.read_text() == "kept"


def test_what_cannot_be_removed_is_left_and_the_sweep_goes_on(tmp_path):
    odd = live_logs.log_path(tmp_path, 6, 1)
    odd.mkdir(parents=True)  # a directory by the log's name: unlink refuses it
    _aged(odd, LONG_AGO)
    ended = _written(tmp_path, 7, 1)
    assert live_logs.prune(tmp_path, set()) == 1
    assert odd.is_dir() and not ended.exists()


def test_no_log_directory_is_nothing_to_prune(tmp_path):
    assert live_logs.prune(tmp_path / "absent", set()) == 0


def test_the_sweep_prunes_the_logs_of_jobs_that_moved_on(tmp_path):
    from engine import queue
    from engine.config import Settings
    from engine.db import session_factory
    from engine.worker.coordinator import DbCoordinator
    from tests.test_queue import fill

    sessions = session_factory(f"sqlite:///{tmp_path / 'logs.db'}")
    fill(sessions, 2)
    with sessions() as session:
        running = queue.lease(session, "node-a", queue.DEFAULT_LEASE)
        session.commit()
        running_id, attempt = running.id, running.attempts
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://",
                        state_dir=tmp_path / "state")
    kept = _written(settings.state_dir, running_id, attempt)
    earlier = _written(settings.state_dir, running_id, attempt - 1)
    other = _written(settings.state_dir, running_id + 1, 1)  # queued: not in hand

    DbCoordinator(sessions, settings, "sweeper").maintenance()

    assert kept.exists()
    assert not earlier.exists() and not other.exists()
