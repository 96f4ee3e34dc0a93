"""The benchmark harness computes what it claims, and every benchmark runs end to end (--quick).

No timing is asserted: only the arithmetic of the harness on known values, and
the shape of what each benchmark prints and writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import harness
from tests.conftest import REPO


def counter(values: list[float], calls: list[str], name: str):
    """A contender that returns the next value of a fixed list and logs that it ran."""
    remaining = iter(values)

    def run() -> float:
        calls.append(name)
        return next(remaining)
    return run


def test_spread_of_an_odd_sample():
    s = harness.spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.n, s.median, s.minimum, s.maximum, s.q1, s.q3) == (5, 3.0, 1.0, 5.0, 2.0, 4.0)
    assert s.iqr == 2.0


def test_spread_of_an_even_sample_uses_inclusive_quartiles():
    s = harness.spread([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.q1, s.q3) == (2.5, 1.75, 3.25)


def test_spread_of_one_value_and_of_none():
    s = harness.spread([7.0])
    assert (s.median, s.minimum, s.maximum, s.q1, s.q3) == (7.0, 7.0, 7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        harness.spread([])


def test_round_order_rotates_who_goes_first():
    names = ["ours", "a", "b"]
    assert [harness.round_order(names, i) for i in range(4)] == [
        ["ours", "a", "b"], ["a", "b", "ours"], ["b", "ours", "a"], ["ours", "a", "b"]]
    assert [harness.round_order(["x", "y"], i)[0] for i in range(4)] == ["x", "y", "x", "y"]


def test_measure_discards_warmup_alternates_and_ratios_per_round():
    calls: list[str] = []
    measurement = harness.measure({
        "ours": counter([100.0, 1.0, 3.0, 2.0], calls, "ours"),
        "theirs": counter([100.0, 4.0, 4.0, 8.0], calls, "theirs"),
    }, repeats=3, warmup=1)
    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs", "theirs", "ours"]
    assert measurement.rounds == [{"ours": 1.0, "theirs": 4.0}, {"ours": 3.0, "theirs": 4.0},
                                  {"ours": 2.0, "theirs": 8.0}]
    assert measurement.orders == [["theirs", "ours"], ["ours", "theirs"], ["theirs", "ours"]]
    assert measurement.ratios("theirs") == [0.25, 0.75, 0.25]
    summary = measurement.summary()
    assert summary["ratios"]["ours / theirs"]["median"] == 0.25
    assert summary["ratios"]["ours / theirs"]["maximum"] == 0.75
    assert summary["times"]["ours"]["median"] == 2.0
    assert summary["times"]["theirs"]["q3"] == 6.0


def test_measure_refuses_no_rounds():
    with pytest.raises(ValueError):
        harness.measure({"ours": lambda: 1.0}, repeats=0)


def test_quick_flag_means_one_round_without_warmup(tmp_path):
    args = harness.arguments("x", repeats=9, warmup=2, argv=["--quick", "--json",
                                                               str(tmp_path / "o.json")])
    assert (args.repeats, args.warmup, args.quick) == (1, 0, True)
    assert harness.arguments("x", repeats=9, warmup=2, argv=[]).repeats == 9


def test_printed_summary_shows_median_spread_and_ratio(capsys):
    measurement = harness.Measurement(names=["ours", "theirs"],
                                      rounds=[{"ours": 2.0, "theirs": 4.0},
                                              {"ours": 3.0, "theirs": 2.0}],
                                      orders=[["ours", "theirs"], ["theirs", "ours"]])
    harness.print_summary(measurement, "t")
    out = capsys.readouterr().out
    assert "| ours | 2.500 s | 2.000 s - 3.000 s | 2.250 s - 2.750 s |" in out
    assert "| ratio ours / theirs | 1.000 | 0.500 - 1.500 | 0.750 - 1.250 |" in out


def read_json(path):
    payload = json.loads(path.read_text())
    assert set(payload) == {"benchmark", "environment", "results"}
    assert payload["environment"]["python"]
    return payload


def test_metrics_vs_monai_quick(tmp_path, capsys):
    from benchmarks import metrics_vs_monai

    affinity = os.sched_getaffinity(0)
    metrics_vs_monai.main(["--quick", "--json", str(tmp_path / "m.json")])
    assert os.sched_getaffinity(0) == affinity  # the one-core pinning is undone
    results = read_json(tmp_path / "m.json")["results"]
    assert len(results) == 2  # one core and all cores, one volume
    for result in results.values():
        assert result["names"] == ["Épreuve", "MONAI"]
        assert len(result["rounds"]) == 1
        assert result["difference"] < 1e-6
    assert "where Épreuve's time goes" in capsys.readouterr().out


def test_queue_throughput_quick(tmp_path):
    from benchmarks import queue_throughput

    argv = ["--quick", "--json", str(tmp_path / "q.json")]
    url = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if url:
        argv += ["--postgres", url]
    queue_throughput.main(argv)
    results = read_json(tmp_path / "q.json")["results"]
    assert len(results) == (2 if url else 1)
    for result in results.values():
        assert result["names"] == ["engine.queue", "plain SQL"]
        assert len(result["rounds"]) == 1


@pytest.mark.docker
def test_sandbox_overhead_quick(docker_engine, tmp_path):
    from benchmarks import sandbox_overhead

    sandbox_overhead.main(["--quick", "--json", str(tmp_path / "s.json")])
    results = read_json(tmp_path / "s.json")["results"]
    assert list(results) == ["trivial (true)", "0.2 s sleep", "0.2 s CPU"]
    for result in results.values():
        assert result["names"][0] == "ours"
        assert len(result["rounds"]) == 1
        assert list(result["raw_api_steps"]) == ["create", "start", "wait", "remove"]


@pytest.mark.docker
def test_throughput_quick(docker_engine, tmp_path):
    from benchmarks import throughput

    throughput.main(["--quick", "--json", str(tmp_path / "t.json")])
    results = read_json(tmp_path / "t.json")["results"]
    fractions = results.pop("slot busy fraction")
    (result,) = results.values()
    assert result["names"] == ["engine", "bare loop", "server + remote worker"]
    assert len(result["rounds"]) == 1
    assert list(fractions) == ["cpu-0"] and 0.0 < fractions["cpu-0"] <= 1.0


def test_metrics_scrape_quick(tmp_path):
    from benchmarks import metrics_scrape

    argv = ["--quick", "--json", str(tmp_path / "m.json")]
    url = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if url:
        argv += ["--postgres", url]
    metrics_scrape.main(argv)
    results = read_json(tmp_path / "m.json")["results"]
    assert len(results) == (2 if url else 1)
    for result in results.values():
        assert result["names"] == ["scrape", "rows by state"]
        assert len(result["rounds"]) == 1


def test_upload_quick(tmp_path, capsys):
    from benchmarks import upload

    upload.main(["--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "u.json")])
    (result,) = read_json(tmp_path / "u.json")["results"].values()
    assert result["names"] == ["API upload", "local copy", "local copy + fsync",
                               "HTTP floor (discard)"]
    assert len(result["rounds"]) == 1
    assert result["size_bytes"] >= 64 << 20
    assert set(result["server_memory_kib"]["after"]) == {"VmHWM", "VmRSS"}
    out = capsys.readouterr().out
    assert "throughput ratio API upload / local copy (goal >= 0.5)" in out
    assert "server peak RSS growth:" in out
    assert [p.name for p in tmp_path.iterdir()] == ["u.json"]  # its scratch is removed


def test_api_quick(tmp_path, capsys):
    from benchmarks import api

    api.main(["--quick", "--json", str(tmp_path / "a.json")])
    (result,) = read_json(tmp_path / "a.json")["results"].values()
    assert result["names"] == ["API", "static"]
    assert len(result["rounds"]) == 1
    assert result["sizes"]["leaderboard"] > result["sizes"]["status"] > 0
    latency = result["latency"]
    assert latency["leaderboard"]["requests"] == 5 and latency["status"]["requests"] == 20
    assert "p99 ratio API / static, all requests, per round (goal <= 3)" in \
        capsys.readouterr().out


def test_upload_benchmark_tar_passes_the_intake_checks(tmp_path):
    """The benchmark uploads an image the server would accept, not arbitrary bytes."""
    from benchmarks.upload import write_image_tar
    from engine.images import inspect_tar

    write_image_tar(tmp_path / "image.tar", 3 << 20)
    inspection = inspect_tar(tmp_path / "image.tar")
    assert inspection.layers_bytes >= (3 << 20) - 16 * 512  # one layer: nearly all of it
    assert inspection.config["config"]["User"] == "1000:1000"


def test_queue_over_http_quick(tmp_path, capsys):
    from benchmarks import queue_over_http as queue_benchmark
    from tests.conftest import postgres_sessions

    postgres_sessions()  # a skip without PostgreSQL (a failure in CI); the run has its schema
    queue_benchmark.main(["--quick", "--postgres", os.environ["EPREUVE_TEST_POSTGRES_URL"],
                          "--json", str(tmp_path / "q.json")])
    figures = read_json(tmp_path / "q.json")["results"]["queue over HTTP"]
    assert figures["completed"] == 40 and figures["double_runs"] == 0
    assert 0 < figures["claim_p50_ms"] <= figures["claim_p99_ms"]
    assert figures["jobs_per_second"] > 0
    assert figures["fifo_place"] == 21  # the 20-job backlog, then the small team's job
    assert figures["backlog_jobs_before_small"] <= 4  # the slots: 4 workers
    assert figures["small_team_place"] < figures["fifo_place"]
    assert "small team's first job leased at place" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(
    p.name for p in (REPO / "benchmarks").glob("*.py")
    if p.name not in {"__init__.py", "harness.py"}))
def test_each_benchmark_starts_as_the_readme_runs_it(script):
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path: a script there named
    like a standard module (a queue.py once) broke every other script's imports."""
    shadowing = {p.stem for p in (REPO / "benchmarks").glob("*.py")} & sys.stdlib_module_names
    assert not shadowing, f"benchmarks/ shadows the standard library: {shadowing}"
    started = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "usage:" in started.stdout
