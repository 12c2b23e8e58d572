"""What the ``rdv`` commands make of wrong input before they send or start anything: a usage
error naming the flag (status 2) or one line naming the fault, never a traceback and never a
request to another route. Found by a helper's fuzzing of every subcommand; in-process
(``gateway.cli.main.main``) and against no server, since each is refused before one is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.cli.readers as readers
from gateway.cli.main import main
from rdv_client.admin import segment

pytestmark = pytest.mark.pure

NOWHERE = "http://127.0.0.1:9"
"""A gateway that is not there: a command that got as far as a request would say so."""


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    return ended.value.code or 0, capsys.readouterr().err + str(ended.value.code)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # a name is a path segment: these reached a model's delete, a list, the 307 of ''
        (["deployments", "delete", "--deployment", "../models/m1/2"], "invalid deployment"),
        (["challengers", "remove", "--deployment", "d", "--role", "../../models/m/1"],
         "invalid role"),
        (["deployments", "show", "--deployment", "."], "invalid deployment"),
        (["deployments", "show", "--deployment", ""], "invalid deployment"),
        (["models", "show", "--name", "m/1"], "invalid model"),
        (["deployments", "show", "--deployment", "a\nb"], "invalid deployment"),
        (["replay", "--deployment", "d", "--resume", "../x"], "invalid replay id"),
        (["worker", "--deployment", "a b"], "invalid deployment"),
        (["logbin", "--consumer", "a\nb"], "invalid consumer"),
        # numbers JSON cannot carry, or out of range
        (["promote", "--deployment", "d", "--version", "2", "--max-disagreement", "nan"],
         "not a finite number"),
        (["challengers", "add", "--deployment", "d", "--role", "c", "--version", "2",
          "--split", "1e400"], "not a finite number"),
        (["schedule", "set", "--deployment", "d", "--split", "c1"], "write ROLE=FRACTION"),
        (["schedule", "set", "--deployment", "d", "--split", "c1=abc"], "not a number"),
        (["schedule", "set", "--deployment", "d", "--split", "c1=0.5", "--clear-split"],
         "not allowed with"),
        (["decisions", "--deployment", "d", "--limit", "9223372036854775808"], "more than"),
        (["feedback", "--deployment", "d", "--batch", "0", "f.csv"], "less than 1"),
        (["features", "load", "--deployment", "d", "--file", "f.csv", "--batch", "20000"],
         "more than 10000"),
        (["gateway", "--port", "-1"], "less than 0"),
        # a --url that names no gateway: "connection refused" or a traceback from httpx
        (["models", "list", "--url", "http://127.0.0.1:99999"], "Port out of range"),
        (["feedback", "--deployment", "d", "--url", "127.0.0.1:8000", "f.csv"],
         "write http://HOST:PORT"),
        (["replay", "--deployment", "d", "--url", "http://:80"], "write http://HOST:PORT"),
        (["deployments", "list", "--url", "http://h:0"], "port 0"),
        (["deployments", "create", "--deployment", "d", "--model", "m", "--version", "1",
          "--canary-model", "x", "--url", NOWHERE], "--canary-version required"),
        # status 1 before, as a failure (a helper's CLI probe)
        (["replay", "--deployment", "d", "--url", NOWHERE], "--version is required"),
        (["archive", "export", "--deployment", "d"], "--deployment and --out are required"),
        (["worker", "--shard", "bad"], "--shard wants I/N"),
        (["worker", "--shard", "0/0"], "I must be in 0..N-1"),
        (["worker", "--role", "real"], "--role needs --deployment"),
        # accepted and not read: the whole archive printed, or written (a helper's CLI probe)
        (["archive", "read", "--from", "2026-12-01"], "rdv archive read: --from only for export"),
        (["archive", "list", "--out", "x.csv", "--to", "1"], "--to, --out only for export"),
        (["archive", "export", "--deployment", "d", "--out", "x.csv", "--limit", "3"],
         "--limit is for list and read"),
        (["models", "list", "--version", "3", "--url", NOWHERE], "--version is for show"),
        (["replay", "--deployment", "d", "--resume", "18c0a0b0c0d-0123456789ab", "--version", "1",
          "--last", "5", "--url", NOWHERE], "--version, --last not taken with it"),
        # dropped, and the gateway's refusal named another cause (a helper's CLI probe)
        (["models", "upload", "--name", "m", "--file", "m.onnx", "--feature-names", "",
          "--url", NOWHERE], "--feature-names is empty"),
        (["models", "upload", "--name", "m", "--file", "m.onnx", "--class-names", " ",
          "--url", NOWHERE], "--class-names is empty"),
    ],
)  # fmt: skip
def test_a_value_that_cannot_be_right_is_a_usage_error_naming_it(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = refused(argv, capsys)
    assert code == 2 and says in err, (code, err)
    assert "Traceback" not in err


def test_a_gateway_that_cannot_be_reached_is_named_without_credentials(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--url http://user:secret@host`` was printed whole (a helper's probe)."""
    code, err = refused(["deployments", "list", "--url", "http://u:SECRETP@127.0.0.1:9"], capsys)
    assert code != 0 and "cannot reach the gateway at http://127.0.0.1:9" in err, err
    assert "SECRETP" not in err


def test_a_split_naming_a_role_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["schedule", "set", "--deployment", "d", "--split", "c=0.2", "--split", "c=0.4"]
    code, err = refused([*argv, "--url", NOWHERE], capsys)
    assert code == 2 and "--split names c twice" in err, err  # status 1 before (a probe)


def test_files_a_command_cannot_read_are_one_line_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dir.csv.meta.json").mkdir()
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"request_id,label\n\xd7\xff\xfe,1\n")
    long_csv, long_jsonl = tmp_path / "long.csv", tmp_path / "long.jsonl"
    long_csv.write_text("request_id,label\nr1," + "7" * 5000 + "\n")
    long_jsonl.write_text('{"request_id": "r1", "label": ' + "7" * 5000 + "}\n")
    cases = [
        (["models", "upload", "--name", "m", "--file", str(tmp_path / "none.onnx")],
         "--file"),
        (["models", "upload", "--name", "m", "--file", str(tmp_path)], "Is a directory"),
        (["models", "upload", "--name", "m", "--file", str(garbage), "--metrics", "{bad"],
         "--metrics is not JSON"),
        (["models", "upload", "--name", "m", "--file", str(garbage), "--classes", "a,b"],
         "--classes 'a,b'"),
        (["models", "upload", "--name", "m", "--file", str(garbage), "--feature-names",
          f"@{garbage}"], "not a readable UTF-8 file"),
        (["feedback", "--deployment", "d", "--url", NOWHERE, str(garbage)], "not UTF-8 text"),
        # Python's words named sys.set_int_max_str_digits (a helper's CLI probe)
        (["feedback", "--deployment", "d", "--url", NOWHERE, str(long_csv)],
         f"{long_csv}:2: label 777777777777777777777777... (5000 characters) is no class"),
        (["feedback", "--deployment", "d", "--url", NOWHERE, str(long_jsonl)],
         f"{long_jsonl}:1: not JSON this command reads: an integer of more than 4300 digits"),
        # read until memory ran out (a helper's CLI probe)
        (["models", "upload", "--name", "m", "--file", "/dev/zero"], "larger than 268435456"),
        (["archive", "list", "--data-dir", str(tmp_path / "none")], "no archive at"),
        # found after the work, naming the CSV, which was left without it (a CLI probe)
        (["archive", "export", "--deployment", "d", "--out", str(tmp_path / "dir.csv"),
          "--data-dir", str(tmp_path)], "dir.csv.meta.json is a folder"),
        # it wrote an empty file and exited 0 (a helper's CLI probe)
        (["archive", "export", "--deployment", "d", "--out", str(tmp_path / "x.csv"),
          "--data-dir", str(tmp_path / "none")], "no archive at"),
    ]  # fmt: skip
    for argv, says in cases:
        code, err = refused([*argv, *(["--url", NOWHERE] if argv[0] == "models" else [])], capsys)
        assert code not in (0, None) and says in err, (argv, code, err)
        assert "Traceback" not in err, argv


def test_an_interrupt_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(readers, "cmd_decisions", interrupted)
    code, err = refused(["decisions", "--deployment", "d"], capsys)
    assert code == 130 and "rdv decisions: interrupted" in err, err


def test_an_operator_fault_deep_in_a_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What no argument check can see (a folder that cannot be made, a value refused deep
    inside): the fault in one line, not forty of traceback."""

    def deep(args: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/proc/x/models")

    monkeypatch.setattr(readers, "cmd_decisions", deep)
    code, err = refused(["decisions", "--deployment", "d"], capsys)
    assert code == "rdv decisions: No such file or directory: /proc/x/models", code
    assert "Traceback" not in err


def test_a_full_disk_is_one_line_saying_where_rdv_writes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write refused by a full disk names no file (``rdv serve`` on a full data folder said
    only "No space left on device"): the line says where rdv writes."""
    import errno

    def full(args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(readers, "cmd_decisions", full)
    code, err = refused(["decisions", "--deployment", "d"], capsys)
    assert code == ("rdv decisions: No space left on device (where rdv writes: its data "
                    "folder, RDV_DATA_DIR, or the temporary folder)"), code  # fmt: skip
    assert "Traceback" not in err


def test_the_typed_client_never_sends_a_dot_segment() -> None:
    """httpx resolves ``..`` in a path: ``remove_challenger(d, "..")`` was a DELETE of the
    deployment itself."""
    assert segment("..") == "%2E%2E" and segment(".") == "%2E"
    assert segment("a/b") == "a%2Fb" and segment("v1.2") == "v1.2"
    with pytest.raises(ValueError, match="empty"):
        segment("")


def test_an_address_given_on_the_command_line_is_checked_as_the_settings_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--host ''`` was copied into the settings unchecked: a gateway on every address."""
    code, err = refused(["gateway", "--host", "", "--port", "1"], capsys)
    assert code == 2 and "invalid configuration: RDV_HOST='': String should have" in err, err
    code, err = refused(["serve", "--data-dir", ""], capsys)  # argparse made it Path('.')
    assert code == 2 and "--data-dir: empty: name a folder" in err, err


def test_the_commands_reach_a_gateway_on_an_ipv6_or_wildcard_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``RDV_HOST=::1`` made the commands' default ``http://::1:8000``, no URL; a wildcard
    host is where a server listens, not where a client connects."""
    import argparse

    from gateway.cli.admin_http import admin_session

    expected = {"::1": "http://[::1]:8000", "::": "http://[::1]:8000",
                "0.0.0.0": "http://127.0.0.1:8000", "10.0.0.7": "http://10.0.0.7:8000"}  # fmt: skip
    for host, url in expected.items():
        monkeypatch.setenv("RDV_HOST", host)
        with admin_session(argparse.Namespace(url=None)) as session:
            assert str(session.base_url).rstrip("/") == url, host


def test_a_change_sent_and_never_answered_may_have_taken_effect() -> None:
    """A promote whose gateway took the call and went silent said "cannot reach the gateway",
    as if nothing had been sent (found by a helper's probe): it may have taken effect, and
    the line says to look before sending it again. A read, or a connection refused, is as
    before."""
    import httpx

    from gateway.cli.faults import gateway_unreachable

    url = "http://127.0.0.1:8000/admin/deployments/d/promote"
    silent = httpx.ReadTimeout("timed out", request=httpx.Request("POST", url))
    said = gateway_unreachable(silent)
    assert said is not None and said.startswith("the gateway at http://127.0.0.1:8000/ took")
    assert "it may have taken effect; look before sending it again" in said
    read = httpx.ReadTimeout("timed out", request=httpx.Request("GET", url))
    refused = httpx.ConnectError("refused", request=httpx.Request("POST", url))
    for exc in (read, refused):
        assert (gateway_unreachable(exc) or "").startswith("cannot reach the gateway at ")
