"""Fixtures every test module may use (the tiny model, ``Engine.generate``'s reference tokens, a
daemon, an HTTP daemon and its clients) and helpers that find what a process left behind:
loader workers, shared-memory segments, sockets. Plain helpers are in support.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the HTTP clients load where they are used: the GPU run carries neither
    import httpx
    import openai

from support import (
    BUDGET,
    CHAT,
    KEY,
    MAX_TOKENS,
    PROMPTS,
    SAMPLED,
    Daemon,
    free_port,
    scratch_dir,
)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``XDG_RUNTIME_DIR`` for this test and the daemons it starts; yields the
    ``flashmoe`` directory in it, where the loader sockets go."""
    d = scratch_dir("flr")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    yield d / "flashmoe"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def packed_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a packed store (per-layer files with checksums)."""
    from flashmoe.pack import pack

    return pack(tiny_model, tmp_path_factory.mktemp("packed") / "tiny-packed")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flashmoe.synth import synth

    return synth(tmp_path_factory.mktemp("model") / "tiny", "qwen3_moe", layout="mlx", bits=4)


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> dict:
    """Token ids and text of ``Engine.generate`` (as `flashmoe run` prints) with equal settings."""
    from flashmoe.orchestrator.engine import Engine, GenRequest

    def run(engine: Engine, **kw) -> tuple[list[int], str]:
        chunks = list(engine.generate(GenRequest(id="ref", max_tokens=MAX_TOKENS, **kw)))
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

    with Engine(str(tiny_model), memory_budget=BUDGET, workers=1) as engine:
        out = {p: run(engine, prompt=p) for p in PROMPTS}
        out["chat"] = run(engine, messages=CHAT)
        out["sampled"] = run(engine, prompt=PROMPTS[0], **SAMPLED)
        out["name"] = engine.model_name
        out["prompt_ids"] = engine.encode(GenRequest(id="ids", prompt=PROMPTS[2]))
    return out


@pytest.fixture(scope="module")
def daemon(tiny_model: Path):
    d = Daemon(tiny_model)
    d.wait_ready()
    yield d
    d.close()


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    port = free_port()
    d = Daemon(tiny_model, "--http", f"127.0.0.1:{port}", "--api-key", KEY)
    st = d.wait_ready()
    assert st["http"] == f"http://127.0.0.1:{port}"
    d.url = st["http"]
    yield d
    d.close()


@pytest.fixture
def oai(server: Daemon) -> openai.OpenAI:
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=30, max_retries=0) as c:
        yield c


@pytest.fixture
def http(server: Daemon) -> httpx.Client:
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
