"""pipeline.infra.download.fetch_file and pipeline.fetch.fetch against real mirrors: a local HTTP
server on 127.0.0.1, file:// URLs and plain directories."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from pathlib import Path

import pytest
from run_helpers import temp_files

from pipeline.core.idx import raw_sha256
from pipeline.fetch import fetch
from pipeline.infra.config import DatasetConfig, IdxPair
from pipeline.infra.download import OFFLINE_HINT, fetch_file, source_url
from pipeline.infra.errors import ConfigError, DataError

NAME = DatasetConfig().train.images  # MNIST's, the name of a tiny file (conftest.py)
MIRROR_KINDS = ("http", "file_url", "dir")


def as_mirror(kind: str, directory: Path, http_server) -> tuple[str, list[str] | None]:
    """`directory` as a mirror of the given kind, and the server's request log (http only)."""
    if kind == "http":
        served = http_server(directory)
        return served.url, served.requests
    if kind == "file_url":
        return directory.as_uri() + "/", None
    return str(directory) + "/", None


def assert_failed_cleanly(
    err: DataError, dest: Path, name: str, tried: list[tuple[str, str]]
) -> None:
    """The DataError names the file, every location tried with its reason, and the offline hint;
    neither the final file nor a temporary one is left behind."""
    message = str(err)
    assert name in message
    for location, reason in tried:
        line = next((ln for ln in message.splitlines() if location in ln), None)
        assert line is not None, f"{location} not listed in:\n{message}"
        assert re.search(reason, line, re.IGNORECASE), f"{reason!r} not in {line!r}"
    assert "dataset=digits" in message
    assert OFFLINE_HINT in message
    assert not (dest / name).exists()
    assert temp_files(dest) == []


# --------------------------------------------------------------------------- good files


@pytest.mark.parametrize("kind", MIRROR_KINDS)
def test_fetches_a_valid_file(kind, idx_files, mirror_dir, tmp_path, http_server):
    mirror, requests = as_mirror(kind, mirror_dir, http_server)
    dest = tmp_path / "dest"
    path = fetch_file(NAME, idx_files[NAME], [mirror], dest, timeout=5, retries=0)
    assert path == dest / NAME
    assert path.read_bytes() == (mirror_dir / NAME).read_bytes()
    assert raw_sha256(path) == idx_files[NAME]
    assert temp_files(dest) == []
    if requests is not None:
        assert requests == [f"/{NAME}"]


def test_valid_file_already_present_is_not_fetched_again(
    idx_files, mirror_dir, tmp_path, http_server
):
    served = http_server(mirror_dir)
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copyfile(mirror_dir / NAME, dest / NAME)
    before = (dest / NAME).stat().st_mtime_ns
    assert fetch_file(NAME, idx_files[NAME], [served.url], dest) == dest / NAME
    assert served.requests == []
    assert (dest / NAME).stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "content",
    [b"not gzip at all", gzip.compress(b"\x00\x00\x08\x03valid gzip, wrong content")],
    ids=["garbage", "wrong-content"],
)
def test_file_present_but_invalid_is_fetched_again(
    content, idx_files, mirror_dir, tmp_path, http_server
):
    served = http_server(mirror_dir)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / NAME).write_bytes(content)
    fetch_file(NAME, idx_files[NAME], [served.url], dest, retries=0)
    assert served.requests == [f"/{NAME}"]
    assert raw_sha256(dest / NAME) == idx_files[NAME]
    assert temp_files(dest) == []


@pytest.mark.parametrize("kind", MIRROR_KINDS)
def test_regzipped_copy_of_the_same_bytes_is_accepted(
    kind, idx_files, mirror_dir, tmp_path, http_server
):
    """Debian re-compresses Fashion-MNIST: the gzip bytes differ, the content does not."""
    original = (mirror_dir / NAME).read_bytes()
    regzipped = gzip.compress(gzip.decompress(original), compresslevel=1, mtime=1234567)
    assert regzipped != original
    other = tmp_path / "regzipped"
    other.mkdir()
    (other / NAME).write_bytes(regzipped)
    mirror, _ = as_mirror(kind, other, http_server)
    dest = tmp_path / "dest"
    fetch_file(NAME, idx_files[NAME], [mirror], dest, retries=0)
    assert (dest / NAME).read_bytes() == regzipped


# --------------------------------------------------------------------------- bad files


def _corrupt(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not-gzip":
        return gzip.decompress(good)  # the raw IDX bytes, never compressed
    # a valid gzip of different content: one pixel changed
    raw = bytearray(gzip.decompress(good))
    raw[-1] ^= 0xFF
    return gzip.compress(bytes(raw))


BAD_REASONS = {
    "truncated": r"truncated",
    "not-gzip": r"not a valid gzip file",
    "wrong-checksum": r"checksum mismatch",
}


@pytest.mark.parametrize("kind", MIRROR_KINDS)
@pytest.mark.parametrize("corruption", sorted(BAD_REASONS))
def test_bad_file_is_rejected_and_nothing_is_kept(
    corruption, kind, idx_files, mirror_dir, tmp_path, http_server
):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / NAME).write_bytes(_corrupt(corruption, (mirror_dir / NAME).read_bytes()))
    mirror, requests = as_mirror(kind, bad_dir, http_server)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as excinfo:
        fetch_file(NAME, idx_files[NAME], [mirror], dest, timeout=5, retries=2)
    assert_failed_cleanly(
        excinfo.value, dest, NAME, [(source_url(mirror, NAME), BAD_REASONS[corruption])]
    )
    if requests is not None:
        assert requests == [f"/{NAME}"]  # a bad file is not retried on the same mirror


def test_wrong_checksum_message_gives_both_digests(idx_files, mirror_dir, tmp_path):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DataError) as excinfo:
        fetch_file(NAME, wrong, [str(mirror_dir)], tmp_path / "dest", retries=0)
    assert wrong in str(excinfo.value)
    assert idx_files[NAME] in str(excinfo.value)


def test_bad_first_mirror_falls_through_to_a_good_one(idx_files, mirror_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / NAME).write_bytes(b"garbage")
    dest = tmp_path / "dest"
    fetch_file(NAME, idx_files[NAME], [str(bad_dir), str(mirror_dir)], dest, retries=0)
    assert raw_sha256(dest / NAME) == idx_files[NAME]
    assert temp_files(dest) == []


# --------------------------------------------------------------------------- dead mirrors


def test_refused_first_mirror_falls_through_to_the_second(
    idx_files, mirror_dir, tmp_path, http_server, closed_port
):
    served = http_server(mirror_dir)
    dest = tmp_path / "dest"
    dead = f"http://127.0.0.1:{closed_port}/"
    fetch_file(NAME, idx_files[NAME], [dead, served.url], dest, timeout=5, retries=0)
    assert raw_sha256(dest / NAME) == idx_files[NAME]
    assert served.requests == [f"/{NAME}"]


def test_404_first_mirror_falls_through_without_retrying(
    idx_files, mirror_dir, tmp_path, http_server
):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing, good = http_server(empty), http_server(mirror_dir)
    dest = tmp_path / "dest"
    fetch_file(NAME, idx_files[NAME], [missing.url, good.url], dest, timeout=5, retries=2)
    assert missing.requests == [f"/{NAME}"]  # 404 is permanent: asked once despite retries=2
    assert good.requests == [f"/{NAME}"]
    assert raw_sha256(dest / NAME) == idx_files[NAME]


def test_unreachable_mirror_is_not_retried(idx_files, tmp_path, closed_port, monkeypatch):
    """Offline machines hear so at once: a refused connection is not retried with back-offs."""
    import pipeline.infra.download

    backoffs: list[float] = []
    monkeypatch.setattr(pipeline.infra.download.time, "sleep", backoffs.append)
    dead = f"http://127.0.0.1:{closed_port}/"
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as caught:
        fetch_file(NAME, idx_files[NAME], [dead], dest, timeout=5, retries=2)
    assert_failed_cleanly(caught.value, dest, NAME, [(source_url(dead, NAME), "refused")])
    assert backoffs == []


def test_server_error_is_retried_on_the_same_mirror(idx_files, mirror_dir, tmp_path, http_server):
    failures = []

    def fail_once(handler) -> bool:
        if failures:
            return False  # serve the file
        failures.append(handler.path)
        handler.send_error(503, "busy")
        return True

    served = http_server(mirror_dir, routes={f"/{NAME}": fail_once})
    dest = tmp_path / "dest"
    fetch_file(NAME, idx_files[NAME], [served.url], dest, timeout=5, retries=1)
    assert served.requests == [f"/{NAME}", f"/{NAME}"]
    assert raw_sha256(dest / NAME) == idx_files[NAME]


def test_all_mirrors_dead(idx_files, tmp_path, http_server, closed_port):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_found = http_server(empty)
    refused = f"http://127.0.0.1:{closed_port}/"
    missing_dir = tmp_path / "no-such-dir"
    mirrors = [refused, not_found.url, missing_dir.as_uri() + "/", str(missing_dir)]
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as excinfo:
        fetch_file(NAME, idx_files[NAME], mirrors, dest, timeout=5, retries=0)
    assert_failed_cleanly(
        excinfo.value,
        dest,
        NAME,
        [
            (source_url(refused, NAME), r"refused"),
            (source_url(not_found.url, NAME), r"HTTP 404"),
            (source_url(mirrors[2], NAME), r"No such file"),
            (source_url(mirrors[3], NAME), r"No such file"),
        ],
    )


def test_empty_mirror_list(idx_files, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as excinfo:
        fetch_file(NAME, idx_files[NAME], [], dest)
    assert "mirror list is empty" in str(excinfo.value)
    assert_failed_cleanly(excinfo.value, dest, NAME, [])


def _hang_before_headers(handler) -> bool:
    handler.server.stop.wait(60)
    return True


def _hang_mid_body(handler) -> bool:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.write(b"\x1f\x8b" + b"\x00" * 100)
    handler.wfile.flush()
    handler.server.stop.wait(60)
    return True


@pytest.mark.timeout(20)  # a hang the timeout did not catch fails here instead of blocking
@pytest.mark.parametrize("hang", [_hang_before_headers, _hang_mid_body], ids=["headers", "body"])
def test_hanging_mirror_times_out(hang, idx_files, mirror_dir, tmp_path, http_server):
    served = http_server(mirror_dir, routes={f"/{NAME}": hang})
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as excinfo:
        fetch_file(NAME, idx_files[NAME], [served.url], dest, timeout=0.5, retries=0)
    assert_failed_cleanly(excinfo.value, dest, NAME, [(served.url + NAME, r"timed out")])
    assert served.requests == [f"/{NAME}"]


@pytest.mark.timeout(20)
def test_hanging_first_mirror_falls_through_to_the_second(
    idx_files, mirror_dir, tmp_path, http_server
):
    hanging = http_server(mirror_dir, routes={f"/{NAME}": _hang_before_headers})
    good = http_server(mirror_dir)
    dest = tmp_path / "dest"
    fetch_file(NAME, idx_files[NAME], [hanging.url, good.url], dest, timeout=0.5, retries=0)
    assert raw_sha256(dest / NAME) == idx_files[NAME]


# --------------------------------------------------------------------------- fetch stage


def test_fetch_stage_gets_all_four_files(idx_files, mirror_dir, tmp_path, http_server):
    served = http_server(mirror_dir)
    dataset = DatasetConfig(name="mnist", mirrors=[served.url], files=idx_files, retries=0)
    raw = tmp_path / "raw"
    written = fetch(dataset, raw)
    assert len(idx_files) == 4
    assert sorted(written) == sorted(raw / "mnist" / name for name in idx_files)
    for name, sha in idx_files.items():
        assert raw_sha256(raw / "mnist" / name) == sha
    assert sorted(served.requests) == sorted(f"/{name}" for name in idx_files)

    fetch(dataset, raw)  # everything present and valid: no request at all
    assert len(served.requests) == len(idx_files)


def test_fetch_stage_requires_exactly_the_four_files(idx_files, mirror_dir, tmp_path):
    """The schema checks dataset.files against dataset.train/test before anything is fetched."""
    files = dict(idx_files)
    test_labels = DatasetConfig().test.labels
    files.pop(test_labels)
    with pytest.raises(ConfigError, match=r"dataset\.test\.labels") as missing:
        DatasetConfig(name="mnist", mirrors=[str(mirror_dir)], files=files)
    assert test_labels in str(missing.value) and "\n" not in str(missing.value)

    extra = {**idx_files, "extra-idx1-ubyte.gz": "0" * 64}
    with pytest.raises(ConfigError, match=r"dataset\.files.*extra-idx1-ubyte\.gz"):
        DatasetConfig(name="mnist", mirrors=[str(mirror_dir)], files=extra)


def test_a_file_name_used_twice_is_rejected():
    default = DatasetConfig()
    twice = IdxPair(images=default.train.images, labels=default.test.labels)
    with pytest.raises(ConfigError, match=r"dataset\.test\.images='train-images-idx3-ubyte\.gz'"):
        DatasetConfig(name="digits", test=twice)


def test_fetch_stage_without_files_names_the_key(tmp_path):
    dataset = DatasetConfig(name="mnist", mirrors=["https://example.invalid/"], files={})
    with pytest.raises(DataError, match=r"dataset\.files is empty.*conf/dataset/mnist\.yaml"):
        fetch(dataset, tmp_path / "raw")
    assert list((tmp_path / "raw" / "mnist").iterdir()) == []


def test_fetch_cli_rejects_a_file_name_missing_from_files(cli, tmp_path):
    result = cli(tmp_path, "pipeline.fetch", "dataset.test.labels=labels.gz")
    assert result.returncode != 0
    assert "error: dataset.test.labels='labels.gz' is invalid" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "data").exists()


def test_fetch_cli_with_dead_mirror_exits_with_offline_hint(cli, tmp_path, closed_port):
    result = cli(
        tmp_path,
        "pipeline.fetch",
        f"dataset.mirrors=[http://127.0.0.1:{closed_port}/]",
        "dataset.retries=0",
    )
    assert result.returncode != 0
    assert "dataset=digits" in result.stderr
    assert f"127.0.0.1:{closed_port}" in result.stderr
    assert "Traceback" not in result.stderr
    raw = tmp_path / "data" / "raw" / "mnist"
    assert not raw.exists() or list(raw.iterdir()) == []
