"""Fuzz of the command line and of checkpoint files, in-process: every bad argument value of
every sub-command (sizes, integers, numbers, choices, paths) and every mutated ``config.json``,
safetensors header and index file ends in exit 2 and one ``error:`` line, never a traceback."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from flashmoe.cli import main
from flashmoe.config_check import arg_types
from flashmoe.orchestrator.daemon import main as daemon_main
from flashmoe.synth import synth

BAD_INT = ["0", "-1", "abc", "1.5", "", "1e3", "99999999999999999999999", "nan", "0x10"]
BAD_COUNT = ["-1", "abc", "1.5", "", "nan", "-99999999999999999999"]  # where 0 is fine
BAD_SEED = [*BAD_COUNT, str(2**64), "1" * 40]
BAD_FLOAT = ["abc", "", "nan", "inf", "-inf", "-1", "1e400"]
BAD_SIZE = ["lots", "-5", "0", "1.5XB", "", "GiB", "nan"]
BAD_CHOICE = ["bogus", "", "FLOAT32", "5"]
CASES: list[tuple[str, list[str]]] = []  # (what, argv); filled below, counted in the report


def _flag_cases(base: list[str], flag: str, values: list[str]) -> None:
    for v in values:
        CASES.append((f"{base[0]} {flag}={v!r}", [*base, flag, v]))


def _build_cases() -> None:
    m = ["--model", "MODEL"]
    run = ["run", *m, "--prompt", "hi"]
    bench_decode = ["bench", "decode", *m]
    for base in (run, bench_decode):
        for flag in ("--workers", "--threads", "--experts-per-token"):
            _flag_cases(base, flag, BAD_INT)
        _flag_cases(base, "--memory-budget", BAD_SIZE)
        _flag_cases(base, "--dtype", BAD_CHOICE)
    for base in (run, ["generate", "hi"], ["chat"]):
        _flag_cases(base, "--max-tokens", BAD_INT)
        _flag_cases(base, "--top-k", BAD_COUNT)
        _flag_cases(base, "--seed", BAD_SEED)
        for flag, extra in (("--temperature", []), ("--top-p", ["0", "1.5"]),
                            ("--min-p", ["1.5"])):  # fmt: skip
            _flag_cases(base, flag, BAD_FLOAT + extra)
    for base in (["generate", "hi"], ["chat"]):
        _flag_cases(base, "--timeout", [*BAD_FLOAT, "0"])
    for flag in ("--tokens", "--prompt-tokens", "--streams"):
        _flag_cases(bench_decode, flag, BAD_INT)
    _flag_cases(bench_decode, "--cgroup-cap", BAD_SIZE)
    bench_io = ["bench", "io", *m]
    for flag in ("--workers", "--threads"):
        _flag_cases(bench_io, flag, BAD_INT)
    _flag_cases(bench_io, "--seconds", [*BAD_FLOAT, "0"])
    synth_ = ["synth", "OUT/s", "--arch", "qwen3_moe"]
    for flag in ("--layers", "--hidden", "--experts", "--topk", "--moe-inter", "--vocab"):
        _flag_cases(synth_, flag, BAD_INT)
    _flag_cases(synth_, "--group-size", [*BAD_INT, "16", "48"])
    _flag_cases(synth_, "--bits", [*BAD_INT, "3", "16"])
    _flag_cases(synth_, "--layout", BAD_CHOICE)
    _flag_cases(synth_, "--shard-size", BAD_SIZE)
    _flag_cases(synth_, "--seed", BAD_SEED)
    _flag_cases(["synth", "OUT/s"], "--arch", BAD_CHOICE)
    pack = ["pack", "MODEL", "OUT/p"]
    _flag_cases(pack, "--bits", [*BAD_INT, "5", "16"])
    _flag_cases(pack, "--group-size", [*BAD_INT, "16"])
    # semantic errors the parser cannot see
    CASES.extend([
        ("synth topk > experts", [*synth_, "--experts", "4", "--topk", "8"]),
        ("synth tiny vocab", [*synth_, "--vocab", "100"]),
        ("run experts-per-token > experts", [*run, "--experts-per-token", "999"]),
        ("pack over its source", ["pack", "MODEL", "MODEL", "--force"]),
        ("pack into a file", ["pack", "MODEL", "FILE"]),
        ("unknown command", ["frobnicate"]),
        ("no command", []),
        ("unknown flag", [*run, "--frob"]),
        ("prompt and chat", [*run, "--chat", "hi"]),
    ])  # fmt: skip
    # paths: missing, a file, an empty folder, /dev/null, a folder of junk
    for path in ("MISSING", "FILE", "EMPTY", "/dev/null", "JUNK"):
        CASES.extend([
            (f"inspect {path}", ["inspect", path]),
            (f"run --model {path}", ["run", "--model", path, "--prompt", "hi"]),
            (f"pack {path}", ["pack", path, f"OUT/{path.strip('/')}"]),
            (f"bench io --model {path}", ["bench", "io", "--model", path, "--seconds", "0.1"]),
            (f"generate --socket {path}", ["generate", "hi", "--socket", path, "--timeout", "30"]),
            (f"chat --socket {path}", ["chat", "--socket", path, "--timeout", "30"]),
        ])  # fmt: skip


_build_cases()
DAEMON_CASES = [
    ["start", "--model", "MODEL", "--workers", "0"],
    ["start", "--model", "MODEL", "--lanes", "0"],
    ["start", "--model", "MODEL", "--lanes", "many"],
    ["start", "--model", "MODEL", "--dtype", "int4"],
    ["start", "--model", "MODEL", "--memory-budget", "lots"],
    ["start", "--model", "MODEL", "--experts-per-token", "-2"],
    ["start", "--model", "MODEL", "--drain-timeout", "nan"],
    ["start", "--model", "MODEL", "--start-timeout", "-1"],
    ["status", "--timeout", "abc"],
    ["stop", "--timeout", "inf"],
    ["frobnicate"],
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    model = synth(root / "model", "qwen3_moe", layers=2, experts=4, topk=2, hidden=64,
                  moe_inter=32)  # fmt: skip
    (root / "file").write_text("not a model")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "config.json").write_text("{")
    (root / "junk" / "x.safetensors").write_bytes(b"\xff" * 20)
    (root / "out").mkdir()
    return {"MODEL": str(model), "FILE": str(root / "file"), "EMPTY": str(root / "empty"),
            "JUNK": str(root / "junk"), "MISSING": str(root / "missing"),
            "OUT": str(root / "out")}  # fmt: skip


def _sub(argv: list[str], places: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in places.items():
            if a == k or a.startswith(k + "/"):
                a = v + a[len(k) :]
        out.append(a)
    return out


def one_error_line(err: str) -> bool:
    lines = [ln for ln in err.split("\n") if ln.strip() and "%|" not in ln]  # but progress bars
    return "Traceback" not in err and len(lines) == 1 and "error" in lines[0]


def test_cli_fuzz(places, capsys) -> None:
    failures = []
    for what, argv in CASES:
        rc = main(_sub(argv, places))
        err = capsys.readouterr().err
        if rc != 2 or not one_error_line(err):
            failures.append(f"{what}: exit {rc}: {err[-300:]}")
    for argv in DAEMON_CASES:
        rc = daemon_main(_sub(argv, places))
        err = capsys.readouterr().err
        if rc != 2 or not one_error_line(err):
            failures.append(f"daemon {argv}: exit {rc}: {err[-300:]}")
    assert not failures, f"{len(failures)} of {len(CASES) + len(DAEMON_CASES)}:\n" + "\n".join(
        failures)
    print(f"cli fuzz: {len(CASES) + len(DAEMON_CASES)} cases, all exit 2 with one line")


# -- checkpoint files -----------------------------------------------------------------------------

JUNK = [None, "x", -1, 0, 1.5, [], {}, True, 2**70, float("nan"), [1, "a"], "12"]


def _wrong_type(value, want) -> bool:
    """A value no model can use for a setting declared ``want``: it must be refused (other odd
    values, zeros or huge ones, may be refused or used, but never end in a traceback)."""
    if want is int:
        return type(value) is not int or value < 0
    if want is float:
        return type(value) not in (int, float) or value != value
    if want is bool:
        return type(value) is not bool
    return False


def _checkpoint_mutations(model: Path) -> list[tuple[str, Path, bool]]:
    """(what, relative file, must fail) for every mutation, applied by ``_apply``."""
    config = json.loads((model / "config.json").read_text())
    used = arg_types(config["model_type"])  # what mlx-lm's model reads
    cases: list = []
    for key in sorted(set(config) & set(used)):
        if key == "model_type":
            continue
        for v in JUNK:
            if v == config[key] and type(v) is type(config[key]):
                continue
            cases.append(("config", key, v, _wrong_type(v, used[key])))
    cases += [("config-raw", None, raw, True) for raw in ("", "[]", "{", "null", '"s"', "1")]
    for cut in (0, 4, 8, 9, 40, -1):
        cases.append(("truncate", None, cut, True))
    for n in (0, 1, 2**63, 2**64 - 1, -1):  # -1: one less than the real length
        cases.append(("header-length", None, n, True))
    for what in ("not-object", "no-shape", "no-dtype", "no-offsets", "reversed-offsets",
                 "negative-shape", "shape-mismatch", "string-offsets", "offsets-past-end"):
        cases.append(("header", None, what, True))
    rng = random.Random(24)
    for i in range(30):
        cases.append(("garble", None, (rng.random(), rng.randrange(8), i), False))
    for idx in ("[]", "{", '{"weight_map": 5}', '{"weight_map": {"a": 5}}',
                '{"weight_map": {"a": "../../etc/passwd"}}', '{"weight_map": {"a": "missing.st"}}',
                '{"nope": 1}', '{"weight_map": {"a": "/abs.safetensors"}}'):  # fmt: skip
        cases.append(("index", None, idx, True))
    return cases


def _apply(model: Path, case) -> None:
    kind, key, v, _ = case
    shard = sorted(model.glob("*.safetensors"))[0]
    blob = shard.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if kind == "config":
        c = json.loads((model / "config.json").read_text())
        c[key] = v
        (model / "config.json").write_text(json.dumps(c))
    elif kind == "config-raw":
        (model / "config.json").write_text(v)
    elif kind == "truncate":
        shard.write_bytes(blob[:v] if v >= 0 else blob[: 8 + n - 1])
    elif kind == "header-length":
        shard.write_bytes(struct.pack("<Q", n - 1 if v == -1 else v) + blob[8:])
    elif kind == "header":
        name = next(k for k in header if k != "__metadata__")
        h = header[name]
        if v == "not-object":
            header = [1, 2]
        elif v.startswith("no-"):
            h.pop({"no-shape": "shape", "no-dtype": "dtype", "no-offsets": "data_offsets"}[v])
        elif v == "reversed-offsets":
            h["data_offsets"] = h["data_offsets"][::-1]
        elif v == "negative-shape":
            h["shape"] = [-h["shape"][0], *h["shape"][1:]]
        elif v == "shape-mismatch":
            h["shape"] = [h["shape"][0] + 1, *h["shape"][1:]]
        elif v == "string-offsets":
            h["data_offsets"] = [str(x) for x in h["data_offsets"]]
        elif v == "offsets-past-end":
            h["data_offsets"] = [h["data_offsets"][0], len(blob) * 2]
        text = json.dumps(header).encode()
        text += b" " * max(0, n - len(text))
        shard.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])
    elif kind == "garble":
        where, bit, _ = v
        b = bytearray(blob)
        b[8 + int(where * n)] ^= 1 << bit
        shard.write_bytes(bytes(b))
    elif kind == "index":
        (model / "model.safetensors.index.json").write_text(v)


def test_checkpoint_fuzz(places, tmp_path, capsys) -> None:
    model = Path(places["MODEL"])
    cases = _checkpoint_mutations(model)
    failures, refused = [], 0
    for i, case in enumerate(cases):
        copy = tmp_path / f"m{i}"
        shutil.copytree(model, copy)
        _apply(copy, case)
        rc = main(["inspect", str(copy)])
        err = capsys.readouterr().err
        must_fail = case[3]
        ok = (rc == 2 and one_error_line(err)) or (rc == 0 and not must_fail and not err)
        refused += rc == 2
        if not ok:
            failures.append(f"{case[:3]}: exit {rc}: {err[-300:]}")
        shutil.rmtree(copy)
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures)
    print(f"checkpoint fuzz: {len(cases)} cases, {refused} refused in one line, none a traceback")
