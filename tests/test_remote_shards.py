"""Datasets read from a real HTTP server on 127.0.0.1 and through pipe: commands (largessl/data/remote.py): the same
index and the same samples as the local directory, retries when a stream breaks off, one-line errors otherwise."""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, job_processes, read_metrics, run_largessl

from largessl.data import remote
from largessl.data.index import SplitIndex, open_split
from largessl.data.stream import RawSample, StreamPlan, read_range, read_shard
from largessl.errors import DataError
from largessl.preflight import check_dataset

MODES = ("plain", "drop-once", "drop-always", "stall-once")
"""The first path segment of a URL says how the server sends a shard (a .tar): whole; the first GET of each shard
cut after half its bytes (the connection closed); every GET cut; the first GET stalled after half its bytes."""


class ShardServer(ThreadingHTTPServer):
    """Serves the files under `root` at /MODE/PATH, recording every request (method, path)."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), ShardHandler)
        self.root, self.requests, self.broken = root, [], set()
        self.release = threading.Event()  # ends the stalled answers
        self.lock = threading.Lock()

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/{name}"

    def gets(self, suffix: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(suffix))


class ShardHandler(BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        mode, _, name = self.path.lstrip("/").partition("/")
        file = self.server.root / name
        if mode not in MODES or ".." in name.split("/") or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and file.suffix == ".tar" and self.breaks(mode):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if mode == "stall-once":
                self.server.release.wait(60)
            return  # HTTP/1.0: the connection is closed, short of its Content-Length
        if body:
            self.wfile.write(data)

    def breaks(self, mode: str) -> bool:
        with self.server.lock:
            first = self.path not in self.server.broken
            self.server.broken.add(self.path)
        return mode == "drop-always" or (mode != "plain" and first)


@pytest.fixture(scope="module")
def shard_server(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardServer]:
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(mini_shards, root / "mini")
    server = ShardServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(shard_server: ShardServer) -> ShardServer:
    shard_server.requests.clear()
    shard_server.broken.clear()
    return shard_server


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)


def content(samples: Iterator[RawSample]) -> list[dict]:
    """The samples without the shard they came from (its path or URL)."""
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in samples]


def everything(index: SplitIndex) -> list[dict]:
    return content(read_range(list(index.shards), 0, index.num_samples))


def same_index(remote_index: SplitIndex, local: SplitIndex) -> None:
    assert [(s.path.rsplit("/", 1)[-1], s.num_samples) for s in remote_index.shards] == \
           [(Path(s.path).name, s.num_samples) for s in local.shards]
    assert remote_index.classes == local.classes and len(remote_index.classes) == 10
    assert remote_index.num_samples == local.num_samples and remote_index.split == local.split


def served_copy(server: ShardServer, mini_shards: Path, name: str) -> Path:
    """A copy of the mini dataset under the server's root, to break."""
    copy = server.root / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(mini_shards, copy)
    return copy


# ----------------------------------------------------------------------------- HTTP: the same dataset as on disk


def test_an_http_dataset_opens_like_its_directory(server: ShardServer, mini_shards: Path) -> None:
    url = server.url("plain", "mini")
    for split in ("train", "val"):
        index = open_split(url + "/", split)  # a trailing slash is the same base
        same_index(index, open_split(str(mini_shards), split))
        assert index.root == url
        assert all(s.path == f"{url}/{split}-{n:06d}.tar" for n, s in enumerate(index.shards))
    assert server.gets("/mini/dataset.json") == 2
    assert server.gets(".tar") == 0  # the start-up check downloads no shard: HEAD only
    assert sum(1 for method, _ in server.requests if method == "HEAD") == 4 + 2


def test_streaming_over_http_gives_the_same_samples_in_the_same_order(server: ShardServer, mini_shards: Path) -> None:
    over_http, local = open_split(server.url("plain", "mini"), "train"), open_split(str(mini_shards), "train")
    assert everything(over_http) == everything(local)
    assert len(everything(over_http)) == 500
    plans = [StreamPlan(shards=index.shards, seed=4, num_slots=3, batch_size=16, shuffle_buffer=40)
             for index in (over_http, local)]
    for slot in range(3):
        streams = [content(itertools.islice(plan.stream(1, slot), plan.samples_per_slot)) for plan in plans]
        assert streams[0] == streams[1] and len(streams[0]) == 160


# ----------------------------------------------------------------------------- HTTP: streams that break off


def test_a_connection_dropped_mid_shard_is_read_again_without_losing_a_sample(
        server: ShardServer, mini_shards: Path, quick_retries: None, capsys: pytest.CaptureFixture) -> None:
    url = server.url("drop-once", "mini")
    index = open_split(url, "train")
    assert everything(index) == everything(open_split(str(mini_shards), "train"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "broke off" in line]
    assert len(warnings) == 4  # one per shard: each was cut once
    for n, line in enumerate(warnings):
        assert line.startswith(f"warning: reading shard {url}/train-{n:06d}.tar broke off after ")
        assert "connection closed after" in line and line.endswith("(read 2 of 4)")
    assert all(int(line.split(" broke off after ")[1].split()[0]) > 0 for line in warnings)  # samples were skipped
    assert all(server.gets(f"/train-{n:06d}.tar") == 2 for n in range(4))


def test_a_server_that_always_drops_stops_with_the_shard_named_in_bounded_time(
        server: ShardServer, capsys: pytest.CaptureFixture) -> None:
    index = open_split(server.url("drop-always", "mini"), "train")
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        list(read_shard(index.shards[0]))
    elapsed = time.monotonic() - started
    assert str(caught.value).startswith(f"shard {index.shards[0].path} broke off on each of 4 reads (last: "
                                        "connection closed after ")
    assert "\n" not in str(caught.value)
    assert server.gets("/train-000000.tar") == remote.TRIES == 4
    assert capsys.readouterr().err.count("warning: reading shard") == 3
    assert 7 <= elapsed < 30  # backoff 1 + 2 + 4 s, never a hang


def test_a_stalled_server_times_out_and_is_read_again(server: ShardServer, mini_shards: Path, quick_retries: None,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(remote, "TIMEOUT_S", 1.0)
    index = open_split(server.url("stall-once", "mini"), "val")
    started = time.monotonic()
    got = content(read_shard(index.shards[1]))
    assert time.monotonic() - started < 15
    assert got == content(read_shard(open_split(str(mini_shards), "val").shards[1]))
    assert "(no answer for 1 s); reading it again" in capsys.readouterr().err


def test_a_shard_served_whole_but_truncated_is_damaged_not_retried(server: ShardServer, mini_shards: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    copy = served_copy(server, mini_shards, "damaged")
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:100_000 + 77])  # inside a member
    index = open_split(server.url("plain", "damaged"), "train")
    with pytest.raises(DataError, match=rf"^shard {index.shards[1].path} is damaged \(.*\); check the dataset with: "
                                        r"python -m data_tools verify DIR, on the directory behind "
                                        rf"{server.url('plain', 'damaged')} \(or a copy\)$"):
        list(read_shard(index.shards[1]))
    assert server.gets("/damaged/train-000001.tar") == 1
    assert "broke off" not in capsys.readouterr().err


def test_counts_that_disagree_name_the_url(server: ShardServer, mini_shards: Path) -> None:
    copy = served_copy(server, mini_shards, "miscounted")
    index = json.loads((copy / "dataset.json").read_text())
    index["splits"]["train"]["shards"][3]["num_samples"] = 120  # it holds 116
    (copy / "dataset.json").write_text(json.dumps(index))
    url = server.url("plain", "miscounted")
    shard = open_split(url, "train").shards[3]
    with pytest.raises(DataError, match=rf"^shard {shard.path} holds 116 samples but dataset\.json says 120; check the "
                                        rf"dataset with: python -m data_tools verify DIR, on the directory behind "
                                        rf"{url} \(or a copy\)$"):
        list(read_shard(shard))


# ----------------------------------------------------------------------------- HTTP: what cannot be read


def test_an_unreadable_index_is_one_line_naming_the_key(server: ShardServer, tmp_path: Path) -> None:
    nowhere = server.url("plain", "nowhere")
    with pytest.raises(DataError, match=rf"^data\.train: cannot read {nowhere}/dataset\.json \(HTTP 404\)$"):
        open_split(nowhere, "train")
    port = free_port()
    with pytest.raises(DataError, match=rf"^data\.val: cannot read http://127\.0\.0\.1:{port}/x/dataset\.json "
                                        r"\(connection refused\)$"):
        open_split(f"http://127.0.0.1:{port}/x", "val", "data.val")
    garbage = server.root / "garbage"
    garbage.mkdir(exist_ok=True)
    (garbage / "dataset.json").write_text("<html>not an index</html>")
    with pytest.raises(DataError, match=r"^--train: http://\S+/garbage/dataset\.json is not valid JSON \("):
        open_split(server.url("plain", "garbage"), "train", "--train")
    for bad in (server.url("plain", "mini?sig=1"), "http:///mini", "s3://bucket/in1k"):
        with pytest.raises(DataError, match=r"^eval\.knn_train: '\S+'"):
            open_split(bad, "train", "eval.knn_train")


def test_missing_shards_are_named_at_start_and_while_reading(server: ShardServer, mini_shards: Path) -> None:
    copy = served_copy(server, mini_shards, "holes")
    url = server.url("plain", "holes")
    index = open_split(url, "train")
    (copy / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=rf"^missing shard {url}/train-000002\.tar \(HTTP 404\)$"):
        list(read_shard(index.shards[2]))
    (copy / "train-000000.tar").unlink()
    with pytest.raises(DataError, match=rf"^missing shard {url}/train-000000\.tar and 1 more "
                                        rf"\(listed in {url}/dataset\.json\)$"):
        open_split(url, "train")


def test_shard_names_cannot_leave_the_dataset_or_change_the_url(server: ShardServer, mini_shards: Path) -> None:
    base = server.url("plain", "mini")
    for unsafe in ("../mini/train-000000.tar", "http://evil.example/x.tar", "/etc/passwd", "sub/x.tar", "..", ""):
        with pytest.raises(ValueError, match="is not a file name inside the dataset directory"):
            remote.file_location(base, unsafe)
    assert remote.file_location(base, "%2e%2e") == f"{base}/%252e%252e"  # quoted whole: no path or scheme
    assert remote.file_location(base, "a:b?c#d.tar") == f"{base}/a%3Ab%3Fc%23d.tar"
    copy = served_copy(server, mini_shards, "hostile")
    index = json.loads((copy / "dataset.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = "../mini/train-000000.tar"
    (copy / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"^data\.train: http://\S+/hostile/dataset\.json: shard entry "
                                        r"'\.\./mini/train-000000\.tar' is not a file name .*; refusing to read it$"):
        open_split(server.url("plain", "hostile"), "train")
    assert server.gets("/mini/train-000000.tar") == 0


# ----------------------------------------------------------------------------- pipe: commands


def test_a_pipe_dataset_reads_like_its_directory(mini_shards: Path) -> None:
    command = f"pipe:cat {shlex.quote(str(mini_shards))}/{{}}"
    index, local = open_split(command, "train"), open_split(str(mini_shards), "train")
    same_index(index, local)
    assert index.shards[0].path == f"pipe:cat {shlex.quote(str(mini_shards))}/train-000000.tar"
    assert everything(index) == everything(local)
    marked = open_split(f"pipe:cat {shlex.quote(str(mini_shards))}/{{}}; : reader-{id(index)}", "val")
    samples = read_shard(marked.shards[0])
    assert len(list(itertools.islice(samples, 3))) == 3
    assert job_processes(f"reader-{id(index)}")  # the command is still writing
    samples.close()  # a reader that stops early kills the command
    assert not job_processes(f"reader-{id(index)}")


def test_pipe_datasets_need_the_placeholder_and_safe_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        open_split("pipe:aws s3 cp s3://bucket/in1k -", "train")
    assert str(caught.value) == ("data.train: pipe: dataset 'pipe:aws s3 cp s3://bucket/in1k -' has no {} where the "
                                 "file name goes (e.g. pipe:aws s3 cp s3://bucket/in1k/{} -; docs/data.md)")
    template = f"pipe:cat {tmp_path}/{{}}"
    assert remote.file_location(template, "train-000000.tar") == f"pipe:cat {tmp_path}/train-000000.tar"
    for unsafe in ("x;touch pwned.tar", "$(id).tar", "-n", "a b.tar", "`id`", "../x.tar"):
        with pytest.raises(ValueError):
            remote.file_location(template, unsafe)


def test_a_failing_pipe_command_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        open_split(f"pipe:cat {tmp_path}/nowhere/{{}}", "train")
    assert str(caught.value) == (f"data.train: cannot read pipe:cat {tmp_path}/nowhere/dataset.json (the command "
                                 f"exited with status 1: cat: {tmp_path}/nowhere/dataset.json: No such file or "
                                 "directory)")


def cut_tars(mini_shards: Path, marks: Path | None) -> str:
    """A pipe: dataset whose command prints half of a shard and exits 3: the first time for each shard (a marker
    file under `marks`), or every time (no `marks`); dataset.json is printed whole."""
    source = shlex.quote(str(mini_shards))
    cut = f"head -c $(( $(stat -c %s {source}/$f) / 2 )) {source}/$f; exit 3"
    once = f"if [ ! -e {marks}/$f ]; then touch {marks}/$f; {cut}; fi" if marks else cut
    return f"pipe:f={{}}; case $f in *.tar) {once};; esac; cat {source}/$f"


def test_a_pipe_that_fails_mid_shard_is_run_again(mini_shards: Path, tmp_path: Path, quick_retries: None,
                                                  capsys: pytest.CaptureFixture) -> None:
    index = open_split(cut_tars(mini_shards, tmp_path), "train")
    assert everything(index) == everything(open_split(str(mini_shards), "train"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "broke off" in line]
    assert len(warnings) == 4 and all("(the command exited with status 3)" in line for line in warnings)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train-{n:06d}.tar" for n in range(4)]


def test_a_pipe_that_always_fails_stops_naming_the_shard(mini_shards: Path, quick_retries: None) -> None:
    shard = open_split(cut_tars(mini_shards, None), "val").shards[0]
    with pytest.raises(DataError) as caught:
        list(read_shard(shard))
    assert str(caught.value) == (f"shard {shard.path} broke off on each of 4 reads (last: the command exited with "
                                 "status 3); is the server or storage reachable?")


# ----------------------------------------------------------------------------- start-up checks and a real run


def test_preflight_checks_remote_datasets_without_downloading_shards(server: ShardServer, mini_shards: Path,
                                                                     tmp_path: Path) -> None:
    assert check_dataset("data.train", server.url("plain", "mini"), "train").num_samples == 500
    assert server.gets(".tar") == 0 and server.gets("dataset.json") == 1
    log = tmp_path / "ran.txt"
    command = f"pipe:echo {{}} >> {log}; cat {shlex.quote(str(mini_shards))}/{{}}"
    assert check_dataset("eval.knn_val", command, "val").num_samples == 200
    assert log.read_text() == "dataset.json\n"  # pipe: shards are not checked (that would download them)
    copy = served_copy(server, mini_shards, "preflight-holes")
    (copy / "val-000001.tar").unlink()
    with pytest.raises(DataError, match=r"^missing shard http://\S+/preflight-holes/val-000001\.tar \(listed in "):
        check_dataset("data.val", server.url("plain", "preflight-holes"), "val")


def test_pretraining_from_an_http_server_that_drops_connections(server: ShardServer, tmp_path: Path) -> None:
    url = server.url("drop-once", "mini")
    result = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={url}", f"data.val={url}",
                           "run.name=remote", "trainer.max_steps=4", "trainer.log_every=2", "eval.knn_every=4",
                           "tracking.enabled=false"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "runs" / "remote")
    assert sorted(metrics) == [2, 4] and "knn_top1" in metrics[4]
    assert "broke off" in result.stderr and "reading it again" in result.stderr
    assert server.gets("/mini/val-000000.tar") >= 2  # k-NN read the val split over HTTP
