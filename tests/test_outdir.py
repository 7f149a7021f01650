"""``pack`` and ``synth`` remove only what they wrote: ``--force`` never takes a folder of someone's
files, a folder holding the source, a file or a link; an unknown ``OUT.partial`` is an error; a
full or read-only disk is one line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import flashmoe.pack as pack_mod
import flashmoe.synth as synth_mod
from flashmoe.cli import main
from flashmoe.outdir import MARKER
from flashmoe.synth import synth

TINY = ["--layers", "2", "--experts", "4", "--topk", "2", "--hidden", "64", "--moe-inter", "32"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("outdir") / "src", "qwen3_moe", layers=2, experts=4,
                 topk=2, hidden=64, moe_inter=32)


def _one_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.split("\n") if ln and "%|" not in ln]  # but progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def _snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = f"-> {p.readlink()}" if p.is_symlink() else p.read_bytes() if p.is_file() else ""
    return out


def _users_things(tmp: Path, src: Path) -> dict[str, Path]:
    """Paths --force must not touch: a folder of files, a folder holding a source, a file, a
    link to a folder, a link to a file."""
    (tmp / "docs").mkdir()
    (tmp / "docs" / "thesis.txt").write_text("years of work")
    holder = tmp / "holder"
    holder.mkdir()
    synth(holder / "inner", "qwen3_moe", layers=2, experts=4, topk=2, hidden=64, moe_inter=32)
    (tmp / "notes.txt").write_text("keep me")
    (tmp / "link-dir").symlink_to(tmp / "docs")
    (tmp / "link-file").symlink_to(tmp / "notes.txt")
    return {"folder": tmp / "docs", "holds-source": holder, "file": tmp / "notes.txt",
            "link-dir": tmp / "link-dir", "link-file": tmp / "link-file"}  # fmt: skip


@pytest.mark.parametrize("cmd", ["pack", "synth"])
def test_force_never_removes_what_it_did_not_write(cmd, src, tmp_path, capsys):
    things = _users_things(tmp_path, src)
    before = _snapshot(tmp_path)
    for what, out in things.items():
        source = out / "inner" if what == "holds-source" else src
        argv = (["pack", str(source), str(out)] if cmd == "pack"
                else ["synth", str(out), "--arch", "qwen3_moe", *TINY])  # fmt: skip
        for force in ([], ["--force"]):
            assert main(argv + force) == 2, (what, force)
            _one_error(capsys, str(out))
    assert _snapshot(tmp_path) == before


def test_force_replaces_its_own_output(src, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["pack", str(src), str(out)]) == 0
    assert (out / MARKER).is_file()
    capsys.readouterr()
    assert main(["pack", str(src), str(out)]) == 2
    _one_error(capsys, "--force")
    (out / "extra").write_text("x")
    assert main(["pack", str(src), str(out), "--force", "--bits", "8", "--group-size", "32"]) == 0
    assert not (out / "extra").exists() and json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no .old or .partial left
    # a packed store from before markers is recognised by its manifest
    (out / MARKER).unlink()
    assert main(["pack", str(src), str(out), "--force"]) == 0
    m = tmp_path / "m"
    assert main(["synth", str(m), "--arch", "qwen3_moe", *TINY]) == 0
    assert main(["synth", str(m), "--arch", "mixtral", *TINY, "--force"]) == 0
    assert json.loads((m / "config.json").read_text())["model_type"] == "mixtral"


def test_pack_into_its_own_source_is_refused(src, tmp_path, capsys):
    assert main(["pack", str(src), str(src), "--force"]) == 2
    _one_error(capsys, "holds the source")
    assert (src / "config.json").is_file()


@pytest.mark.parametrize("cmd", ["pack", "synth"])
def test_partial(cmd, src, tmp_path, capsys):
    out = tmp_path / "o"
    argv = (["pack", str(src), str(out)] if cmd == "pack"
            else ["synth", str(out), "--arch", "qwen3_moe", *TINY])  # fmt: skip
    partial = tmp_path / "o.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("not flashmoe's")
    assert main(argv) == 2
    _one_error(capsys, "o.partial")
    assert (partial / "mine.txt").read_text() == "not flashmoe's"
    (partial / "mine.txt").unlink()
    partial.rmdir()
    partial.write_text("a file")
    assert main(argv) == 2
    _one_error(capsys, "o.partial")
    partial.unlink()
    partial.mkdir()  # an interrupted run of ours: removed and written again
    (partial / MARKER).write_text("{}")
    (partial / "half.bin").write_bytes(b"\0" * 10)
    assert main(argv) == 0
    assert not partial.exists() and out.is_dir()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
@pytest.mark.parametrize("cmd", ["pack", "synth"])
def test_full_or_read_only_disk_is_one_line(cmd, code, src, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if cmd == "pack":
        monkeypatch.setattr(pack_mod, "_write_dense", refuse)
        argv = ["pack", str(src), str(tmp_path / "o")]
    else:
        monkeypatch.setattr(synth_mod, "_write_shard", refuse)
        argv = ["synth", str(tmp_path / "o"), "--arch", "qwen3_moe", *TINY]
    assert main(argv) == 2
    _one_error(capsys, "cannot write", os.strerror(code))
    assert list(tmp_path.iterdir()) == []
