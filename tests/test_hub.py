"""Hub sources, fully offline: a hand-built Hub cache, a Hub that cannot be reached, and a loopback Hub that
answers 404. Each failure has its own message naming the repository, the revision and the `hf` command to run."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import llama_config
from safetensors.torch import load_file

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.errors import ModelNotFoundError
from tp_loader.resolve import looks_like_repo_id, resolve_source
from tp_loader.testing import run_ranks, same_error

SHA = "0123456789abcdef0123456789abcdef01234567"
TINY = llama_config(num_hidden_layers=1)


def _hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Puts ``source``'s files in huggingface_hub's cache layout; returns the snapshot directory.

    ``models--org--name/blobs/<hash>`` holds the bytes, ``snapshots/<sha>/<file>`` links to them with a relative
    symlink, and ``refs/<revision>`` holds the commit sha.
    """
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / SHA
    for directory in (folder / "refs", folder / "blobs", snapshot):
        directory.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(SHA)
    for path in sorted(source.iterdir()):
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, folder / "blobs" / blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty Hub cache directory, resolved as huggingface_hub resolves it."""
    path = tmp_path.resolve() / "hub"
    path.mkdir()
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Downloads on, with tiny timeouts; returns a function that points huggingface_hub at an endpoint.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the timeouts into ``constants`` at import, so the
    constants are patched as well as the environment.
    """
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(huggingface_hub.constants, name, 1)

    def point_at(endpoint: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)

    return point_at


@pytest.fixture
def hub_answering_404() -> Iterator[Callable[[str], str]]:
    """A loopback Hub that answers every request with 404 and the given ``X-Error-Code``; yields a function
    that sets the code and returns the endpoint."""
    error_code = {"value": "RepoNotFound"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            self.send_response(404)
            self.send_header("X-Error-Code", error_code["value"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def answer(code: str) -> str:
        error_code["value"] = code
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "source", TINY, llama_tensors(TINY))


def test_cached_repo_resolves_without_fetching_to_its_snapshot_directory(tmp_path: Path, cache: Path) -> None:
    snapshot = _hub_cache(cache, "org/name", _checkpoint(tmp_path))
    assert resolve_source("org/name", cache_dir=cache, fetch=False) == snapshot


def test_cached_repo_loads_with_hf_hub_offline(tmp_path: Path, cache: Path, offline: None) -> None:
    source = _checkpoint(tmp_path)
    _hub_cache(cache, "org/name", source)
    result = tp_loader.load("org/name", cache_dir=cache)
    stored = load_file(str(source / "model.safetensors"))
    assert set(result.state_dict) == set(stored)
    for key, tensor in stored.items():
        assert torch.equal(result.state_dict[key], tensor), key


def test_cached_repo_with_only_bin_weights_still_resolves(tmp_path: Path, cache: Path, offline: None) -> None:
    source = _checkpoint(tmp_path)
    torch.save(load_file(str(source / "model.safetensors")), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    snapshot = _hub_cache(cache, "org/name", source)
    assert resolve_source("org/name", cache_dir=cache) == snapshot


def test_cached_repo_without_weights_says_so(tmp_path: Path, cache: Path, offline: None) -> None:
    source = _checkpoint(tmp_path)
    (source / "model.safetensors").unlink()
    _hub_cache(cache, "org/name", source)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache)
    assert str(info.value) == (
        f"model 'org/name' (revision main) in the local Hub cache {cache} has no safetensors or .bin weights "
        f"[file=org/name]. Download the weights with `hf download org/name --cache-dir {cache}`"
    )


def test_offline_repo_not_in_the_cache_says_offline_and_what_to_run(cache: Path, offline: None) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache)
    assert str(info.value) == (
        f"model 'org/name' (revision main) is not in the local Hub cache {cache}, and downloads are off "
        f"(HF_HUB_OFFLINE is set) [file=org/name]. Run `hf download org/name --cache-dir {cache}` where the Hub "
        "is reachable, or unset HF_HUB_OFFLINE to let tp_loader download it"
    )


def test_offline_revision_not_in_the_cache_names_the_revision(tmp_path: Path, cache: Path, offline: None) -> None:
    _hub_cache(cache, "org/name", _checkpoint(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        tp_loader.load("org/name", cache_dir=cache, revision="v2")
    assert str(info.value) == (
        f"model 'org/name' (revision v2) is not in the local Hub cache {cache}, and downloads are off "
        f"(HF_HUB_OFFLINE is set) [rank=0, file=org/name]. "
        f"Run `hf download org/name --revision v2 --cache-dir {cache}` "
        "where the Hub is reachable, or unset HF_HUB_OFFLINE to let tp_loader download it"
    )


def test_process_that_may_not_fetch_says_so_when_the_repo_is_not_cached(
    cache: Path, online: Callable[[str], None]
) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache, fetch=False)
    assert str(info.value) == (
        f"model 'org/name' (revision main) is not in the local Hub cache {cache}, and downloads are off "
        f"(fetch=False: this process only reads the cache) [file=org/name]. "
        f"Run `hf download org/name --cache-dir {cache}` where the Hub is reachable"
    )


def test_unreachable_hub_says_it_cannot_connect(cache: Path, online: Callable[[str], None]) -> None:
    with socket.socket() as closed:  # bound, not listening: connecting is refused, and no other test gets the port
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        online(endpoint)
        with pytest.raises(ModelNotFoundError) as info:
            resolve_source("org/name", cache_dir=cache)
    assert str(info.value) == (
        f"cannot reach the Hub at {endpoint} for model 'org/name' (revision main) "
        f"(ConnectError: [Errno 111] Connection refused), and it is not in the local Hub cache {cache} "
        "[file=org/name]. Check the network, proxy and HF_ENDPOINT settings, then retry; "
        f"or run `hf download org/name --cache-dir {cache}` where the Hub is reachable"
    )


def test_repo_the_hub_does_not_know_says_not_found(
    cache: Path, online: Callable[[str], None], hub_answering_404: Callable[[str], str]
) -> None:
    endpoint = hub_answering_404("RepoNotFound")
    online(endpoint)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache)
    assert str(info.value) == (
        f"model 'org/name' (revision main) was not found on the Hub at {endpoint}: no such repository, or it is "
        "private and no valid token was sent [file=org/name]. Check the repository id; for a private repository "
        f"log in (`hf auth login`, or set HF_TOKEN), then run `hf download org/name --cache-dir {cache}`"
    )


def test_revision_the_hub_does_not_know_says_which(
    cache: Path, online: Callable[[str], None], hub_answering_404: Callable[[str], str]
) -> None:
    endpoint = hub_answering_404("RevisionNotFound")
    online(endpoint)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache, revision="v2")
    assert str(info.value) == (
        f"revision 'v2' of model 'org/name' was not found on the Hub at {endpoint} (the repository exists) "
        "[file=org/name]. Check the branch, tag or commit name, then run "
        f"`hf download org/name --revision v2 --cache-dir {cache}`"
    )


def test_gated_repo_says_access_is_needed(
    cache: Path, online: Callable[[str], None], hub_answering_404: Callable[[str], str]
) -> None:
    endpoint = hub_answering_404("GatedRepo")
    online(endpoint)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("org/name", cache_dir=cache)
    assert str(info.value) == (
        f"model 'org/name' (revision main) is a gated repository on the Hub at {endpoint}, and no token with "
        f"access to it was sent [file=org/name]. Request access at {endpoint}/org/name, log in as a user who has "
        f"it (`hf auth login`, or set HF_TOKEN), then run `hf download org/name --cache-dir {cache}`"
    )


@pytest.mark.parametrize("source", ["./typo", "ABS/absent/typo", "~/typo", "./org/name"])
def test_missing_path_is_a_missing_directory(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    source = source.replace("ABS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source(source)
    assert str(info.value) == (
        f"model directory {source!r} does not exist [file={source}]. "
        "Check the path, or pass a Hub repository id such as 'org/name'"
    )


def test_id_shaped_path_under_an_existing_directory_is_a_missing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("models/typo")
    assert str(info.value) == (
        "model directory 'models/typo' does not exist [file=models/typo]. "
        "Check the path; it is not looked up on the Hub because the directory 'models' exists here"
    )


def test_id_without_such_a_local_directory_goes_to_the_hub(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^model 'org/name' \(revision main\) is not in the local Hub cache"):
        resolve_source("org/name", cache_dir=cache)


@pytest.mark.parametrize(
    ("source", "is_id"),
    [
        ("org/name", True),
        ("org/name-1.5B_v2", True),
        ("models/typo", False),
        ("./org/name", False),
        ("/org/name", False),
        ("~/name", False),
        (".org/name", False),
        ("gpt2", True),
        ("org/name/sub", False),
        ("org/../name", False),
    ],
)
def test_what_is_taken_for_a_hub_id(source: str, is_id: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_repo_id(source) is is_id


def _load_absent(rank: int, world_size: int, cache: Path) -> object:
    return tp_loader.load("org/absent", cache_dir=cache)


def test_offline_repo_not_in_the_cache_is_the_same_error_on_every_rank(cache: Path) -> None:
    error = same_error(run_ranks(2, _load_absent, cache, timeout=60, env={"HF_HUB_OFFLINE": "1"}))
    assert error.type == "ModelNotFoundError"
    assert error.message == (
        f"model 'org/absent' (revision main) is not in the local Hub cache {cache}, and downloads are off "
        f"(HF_HUB_OFFLINE is set) [rank=0, file=org/absent]. Run `hf download org/absent --cache-dir {cache}` "
        "where the Hub is reachable, or unset HF_HUB_OFFLINE to let tp_loader download it"
    )
    assert error.wire is not None
    assert (error.wire["type"], error.wire["rank"], error.wire["file"]) == ("ModelNotFoundError", 0, "org/absent")


def test_unreachable_and_unknown_repos_are_the_same_error_on_every_rank(
    cache: Path, online: Callable[[str], None], hub_answering_404: Callable[[str], str]
) -> None:
    """The fetching rank's Hub error reaches the rank that waited for it (forked ranks inherit the
    patched endpoint)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        online(f"http://127.0.0.1:{closed.getsockname()[1]}")
        unreachable = same_error(run_ranks(2, _load_absent, cache, timeout=60))
    assert (unreachable.type, unreachable.wire["rank"], unreachable.wire["file"]) == (
        "ModelNotFoundError",
        0,
        "org/absent",
    )
    assert unreachable.wire["message"].startswith("cannot reach the Hub at http://127.0.0.1:")
    online(hub_answering_404("RepoNotFound"))
    unknown = same_error(run_ranks(2, _load_absent, cache, timeout=60))
    assert unknown.wire["message"].startswith("model 'org/absent' (revision main) was not found on the Hub at ")
    assert unknown.wire["rank"] == 0


def test_a_hub_that_accepts_and_never_answers_is_an_error_on_every_rank_within_the_timeout(
    cache: Path, online: Callable[[str], None]
) -> None:
    """huggingface_hub waits without a bound for some answers (``repo_info`` has no timeout): the
    fetching rank gives up after half of TP_LOADER_TIMEOUT_S, and its error reaches the waiting rank."""
    with socket.socket() as silent:  # listening, never accepting: connections succeed, no answer comes
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        online(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        error = same_error(run_ranks(2, _load_absent, cache, timeout=60, env={"TP_LOADER_TIMEOUT_S": "4"}))
        assert 2 <= time.monotonic() - start < 4 + 10
    assert (error.type, error.wire["rank"], error.wire["file"]) == ("ModelNotFoundError", 0, "org/absent")
    assert error.wire["message"] == (
        "fetching 'org/absent' did not finish within 2 s (half of TP_LOADER_TIMEOUT_S, so that every rank hears "
        "of it within the timeout)"
    )
