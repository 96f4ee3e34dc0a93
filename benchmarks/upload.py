"""A big image tar through the server's resumable upload, beside a local copy of the same bytes.

    .venv/bin/python benchmarks/upload.py [--size-mib 2048] [--repeats 3] [--warmup 1]
        [--chunk-mib 32] [--dir DIR] [--quick] [--json out.json]

One run makes a docker-save-like tar of `--size-mib` (a manifest, a config and one layer
holding a file of random bytes, so nothing compresses; --quick: 64 MiB), starts `epreuve
serve`'s app (engine.api.create_app on the environment) in its own uvicorn process on a
fresh data dir in DIR (SQLite; a one-phase challenge and a participant token made with the
`epreuve` commands), and times, round by round in rotating order:

- "API upload": engine/client.py `Api.upload`, the path of `epreuve submit --server`: the
  tus protocol in 32 MiB PATCH requests (`--chunk-mib`) over loopback; the server streams
  each body to disk, hashes it on the way, fsyncs each append and moves the whole file
  into its store;
- "local copy": shutil.copyfile of the same tar on the same filesystem (no fsync);
- "local copy + fsync": the same, made durable as the server makes each append;
- "HTTP floor (discard)": the same bytes in the same PATCH requests to /bench/discard, a
  route of this benchmark only that reads each body and drops it: what this HTTP stack
  (httpx, uvicorn, the app's middlewares) costs before the upload writes or hashes a byte.

Each upload is a new one (then deleted, untimed); each copy is removed, untimed. Printed:
the rounds and their medians (harness), the throughput of each side and the per-round
throughput ratio upload / copy (goal: at least 0.5), and the server's peak resident memory
(VmHWM of its process) before the first upload and after the last (goal: growth under
150 MB). The server's sha256 of every upload is checked against the tar's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from fastapi import Request, Response

from benchmarks import harness
from engine.client import CHUNK_BYTES, TUS, Api

EPREUVE = str(Path(sys.executable).parent / "epreuve")
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BLOCK = 512
RANDOM_PIECE = 8 * MIB
CHALLENGE, PHASE, TEAM = "upload-bench", "validation", "bench-team"
CHALLENGE_YAML = f"""
id: {CHALLENGE}
title: Upload benchmark
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}}
metrics: {{labels: [1]}}
ranking: {{scheme: aggregate-then-rank, metrics: [{{metric: dice, label: 1}}]}}
phases:
  - id: {PHASE}
    dataset: {{path: data}}
    limits: {{image_size: 8g}}
"""


# -- the image tar ---------------------------------------------------------------------------


class LayerStream:
    """One layer tar, generated as it is read: a header, `size` random bytes, the padding
    and the end-of-archive blocks; its sha256 (the layer's diff id) computed on the way."""

    def __init__(self, size: int, seed: int = 0):
        header = tarfile.TarInfo("opt/payload.bin")
        header.size, header.mode, header.uid, header.gid = size, 0o644, 1000, 1000
        header.mtime = 0
        self.parts = [header.tobuf(format=tarfile.USTAR_FORMAT)]
        self.left = size
        self.tail = b"\0" * (-size % BLOCK) + b"\0" * (2 * BLOCK)
        self.length = len(self.parts[0]) + size + len(self.tail)
        self.random = random.Random(seed)
        self.digest = hashlib.sha256()

    def _next_piece(self) -> bytes:
        if self.parts:
            return self.parts.pop(0)
        if self.left:
            piece = self.random.randbytes(min(RANDOM_PIECE, self.left))
            self.left -= len(piece)
            return piece
        piece, self.tail = self.tail, b""
        return piece

    def read(self) -> bytes:
        """The next piece (of any length); b"" at the end."""
        piece = self._next_piece()
        self.digest.update(piece)
        return piece


def write_image_tar(path: Path, total_bytes: int) -> None:
    """A `docker save` layout (manifest.json, config, <layer>/layer.tar) of about
    `total_bytes`: one non-root layer holding random bytes."""
    payload = max(total_bytes - 16 * BLOCK, BLOCK)
    layer = LayerStream(payload)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.copybufsize = RANDOM_PIECE
        layer_name = "0" * 64 + "/layer.tar"
        _add_dir(tar, "0" * 64)
        info = tarfile.TarInfo(layer_name)
        info.size, info.mode = layer.length, 0o644
        tar.addfile(info, _Reader(layer))
        diff_id = "sha256:" + layer.digest.hexdigest()
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"User": "1000:1000", "Cmd": ["python3", "/opt/algorithm.py"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        _add_bytes(tar, config_name, config)
        _add_bytes(tar, "manifest.json", json.dumps([{
            "Config": config_name, "RepoTags": ["bench/upload:latest"],
            "Layers": [layer_name]}]).encode())


class _Reader:
    """What tarfile.addfile reads from: exactly `count` bytes of the stream per read."""

    def __init__(self, stream: LayerStream):
        self.stream, self.current, self.position = stream, b"", 0

    def read(self, count: int) -> bytes:
        pieces = []
        while count:
            if self.position == len(self.current):
                self.current, self.position = self.stream.read(), 0
                if not self.current:
                    break
            piece = self.current[self.position:self.position + count]
            self.position += len(piece)
            count -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- the server ------------------------------------------------------------------------------


def prepare_server_data(root: Path, env: dict) -> str:
    """A sealed one-case dataset, the challenge and a participant token, made with the
    `epreuve` commands; returns the token's secret."""
    from engine.datasets import seal
    from engine.synthetic import synth_dataset

    synth_dataset(root / "data", cases=1, seed=3, size=16)
    seal(root / "data")
    (root / "challenge.yaml").write_text(CHALLENGE_YAML)
    for args in (["challenge", "create", "challenge.yaml"],
                 ["token", "create", "--role", "participant", "--team", TEAM]):
        done = subprocess.run([EPREUVE, *args], env=env, cwd=root, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"epreuve {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def bench_app():
    """The app `epreuve serve` builds (engine.api.create_app on the environment's settings),
    plus one route of this benchmark only: /bench/discard reads a request body and drops
    it, the floor of this HTTP stack (uvicorn, the middlewares) for the same bytes."""
    from engine.api.app import ApiOptions, create_app
    from engine.config import load_settings

    app = create_app(load_settings(), ApiOptions(
        body_cap_exempt=("/api/v1/uploads", "/bench/discard")))

    async def discard(request: Request) -> Response:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
        return Response(status_code=204, headers={"Received": str(received)})

    app.add_api_route("/bench/discard", discard, methods=["PATCH"])
    return app


def start_server(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """uvicorn in its own process, on a free loopback port, serving bench_app."""
    return harness.start_uvicorn("benchmarks.upload:bench_app", root, env, "--no-server-header")


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB (Linux /proc)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


# -- the contenders --------------------------------------------------------------------------


def uploader(url: str, token: str, tar: Path, expected_sha256: str, scratch: Path,
             chunk_bytes: int):
    def run() -> float:
        state = Path(tempfile.mkdtemp(dir=scratch))  # a new upload, never a resumed one
        with Api(url, token, timeout=600) as api:
            started = time.perf_counter()
            result = api.upload(tar, CHALLENGE, PHASE, state_dir=state,
                                chunk_bytes=chunk_bytes)
            seconds = time.perf_counter() - started
            if result.sha256 != expected_sha256:
                raise SystemExit(f"the server hashed {result.sha256}, not {expected_sha256}")
            api.request("DELETE", result.upload_url, headers=TUS)
        shutil.rmtree(state)
        return seconds
    return run


def discarder(url: str, tar: Path, chunk_bytes: int):
    """The same bytes in the same PATCH requests to a route that drops them."""
    def pieces(source, count: int):
        while count > 0 and (piece := source.read(min(MIB, count))):
            count -= len(piece)
            yield piece

    def run() -> float:
        size = tar.stat().st_size
        with httpx.Client(base_url=url, timeout=600) as client, open(tar, "rb") as source:
            started = time.perf_counter()
            for offset in range(0, size, chunk_bytes):
                count = min(chunk_bytes, size - offset)
                response = client.patch("/bench/discard", content=pieces(source, count),
                                        headers={"Content-Length": str(count)})
                if response.headers.get("Received") != str(count):
                    raise SystemExit(f"the discard route answered {response.status_code}")
            return time.perf_counter() - started
    return run


def copier(tar: Path, destination: Path, *, durable: bool):
    def run() -> float:
        started = time.perf_counter()
        shutil.copyfile(tar, destination)
        if durable:
            with open(destination, "rb+") as handle:
                os.fsync(handle.fileno())
        seconds = time.perf_counter() - started
        destination.unlink()
        return seconds
    return run


def print_throughput(measurement: harness.Measurement, size: int) -> dict:
    """MB/s of each side (median and range) and the per-round throughput ratio."""
    print(f"\nthroughput, {size / MIB:.0f} MiB per transfer (MB = 10^6 bytes)\n")
    print("| measured | median | min - max |")
    print("|---|---|---|")
    summary = {}
    for name in measurement.names:
        rates = [size / 1e6 / t for t in measurement.times(name)]
        s = harness.spread(rates)
        summary[name] = s.median
        print(f"| {name} | {s.median:.0f} MB/s | {s.minimum:.0f} - {s.maximum:.0f} MB/s |")
    for other in measurement.names[1:]:
        s = harness.spread([1 / r for r in measurement.ratios(other)])
        summary[f"throughput ratio vs {other}"] = s.median
        goal = " (goal >= 0.5)" if other.startswith("local copy") else ""
        print(f"| throughput ratio {measurement.ours} / {other}{goal} | "
              f"{s.median:.3f} | {s.minimum:.3f} - {s.maximum:.3f} |")
    return summary


def main(argv: list[str] | None = None) -> None:
    def extra(parser):
        parser.add_argument("--size-mib", type=int, default=2048)
        parser.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES // MIB,
                            help="bytes per PATCH request (default: the client's)")
        parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                            help="where the tar, the server's data and the copies go "
                                 "(one filesystem)")

    args = harness.arguments(__doc__.splitlines()[0], repeats=3, warmup=1, extra=extra,
                             argv=argv)
    size_mib = 64 if args.quick else args.size_mib
    env = harness.environment(docker=False)
    harness.print_environment(env)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="upload-bench-") as scratch:
        root = Path(scratch)
        tar = root / "image.tar"
        harness.progress(f"writing a {size_mib} MiB image tar")
        write_image_tar(tar, size_mib * MIB)
        size, expected = tar.stat().st_size, file_sha256(tar)
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("EPREUVE_")}
        server_env["EPREUVE_DATA_DIR"] = str(root / "data-dir")
        token = prepare_server_data(root, server_env)
        server, url = start_server(root, server_env)
        try:
            before = memory_kib(server.pid)
            measurement = harness.measure({
                "API upload": uploader(url, token, tar, expected, root,
                                       args.chunk_mib * MIB),
                "local copy": copier(tar, root / "copy.tar", durable=False),
                "local copy + fsync": copier(tar, root / "copy.tar", durable=True),
                "HTTP floor (discard)": discarder(url, tar, args.chunk_mib * MIB),
            }, repeats=args.repeats, warmup=args.warmup, log=harness.progress)
            after = memory_kib(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    title = (f"upload of a {size_mib} MiB image tar ({size} bytes, {args.chunk_mib} MiB per "
             "PATCH) beside a local copy")
    harness.print_rounds(measurement, title)
    harness.print_summary(measurement, title)
    rates = print_throughput(measurement, size)
    growth_mb = (after["VmHWM"] - before["VmHWM"]) * 1024 / 1e6
    print(f"\nserver memory (KiB): VmHWM {before['VmHWM']} before the first upload, "
          f"{after['VmHWM']} after the last; VmRSS {before['VmRSS']} -> {after['VmRSS']}"
          f"\nserver peak RSS growth: {growth_mb:.1f} MB (goal < 150 MB)")
    harness.print_load()
    harness.write_json(args.json, "upload", env, {title: {
        **measurement.to_dict(), "size_bytes": size, "throughput_mb_s": rates,
        "server_memory_kib": {"before": before, "after": after},
        "peak_rss_growth_mb": growth_mb}})


if __name__ == "__main__":
    main()
