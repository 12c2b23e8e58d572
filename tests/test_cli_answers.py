"""What the ``rdv`` commands make of input no check foresaw (found by a helper's fuzzing of the
command line): a file with a cell, a line or a nesting past what its reader takes, and a
``--url`` that answers but is not a gateway. Each ends in one line naming the fault (the file
and line of a file's), a non-zero status, and no traceback. In process, against a tiny HTTP
server on a free port of 127.0.0.1 that answers as each test tells it."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.cli.records import LINE_LIMIT

ROOT = Path(__file__).parents[1]
NOWHERE = "http://127.0.0.1:9"
"""A gateway that is not there: a command that got as far as a request would say so."""
DEP = "breast-cancer"
ENRICHED = {"name": DEP, "feature_spec": {"version": 1, "names": ["x", "y"],
            "lookup": {"key": "customer_id", "features": ["x"], "defaults": {}}}}  # fmt: skip
"""What ``GET /admin/deployments/breast-cancer`` answers for a deployment that looks up ``x``."""

Answer = tuple[int, str, bytes]
"""status, content type, body"""


def as_json(doc: object, status: int = 200) -> Answer:
    return status, "application/json", json.dumps(doc).encode()


HTML = (200, "text/html", b"<html><body>hi</body></html>")


@contextmanager
def answering(
    answers: Mapping[tuple[str, str], Answer | Callable[[bytes], Answer]],
) -> Iterator[tuple[str, list[str]]]:
    """A server at ``--url`` that answers each ``(method, path)`` as given, or as a function of
    the request's body says (404 JSON else): its base URL, and the ``METHOD path`` of each
    request it was sent."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            sent = self.rfile.read(int(self.headers.get("content-length") or 0))
            path = self.path.split("?")[0]
            asked.append(f"{self.command} {path}")
            given = answers.get((self.command, path), as_json({"detail": "Not Found"}, 404))
            status, kind, body = given(sent) if callable(given) else given
            self.send_response(status)
            if status == 503:
                self.send_header("retry-after", "0.1")
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            if 300 <= status < 400:
                self.send_header("location", "http://elsewhere.example/login")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def ended(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    """The exit status (or the line ``sys.exit`` was given) and what went to stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code or 0, capsys.readouterr().err


def test_a_csv_cell_past_the_csv_limit_is_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both ended in ``_csv.Error: field larger than field limit (131072)``, a traceback."""
    labels = tmp_path / "huge.csv"
    labels.write_text("request_id,label\np-1," + "1" * 200_000 + "\n")
    code, _ = ended(["feedback", "--deployment", DEP, "--url", NOWHERE, str(labels)], capsys)
    assert code == f"{labels}:2: a cell longer than 131072 characters", code

    entities = tmp_path / "entities.csv"
    entities.write_text("customer_id,x\nc-1,1.5\nc-2," + "1" * 200_000 + "\n")
    wide = tmp_path / "header.csv"
    wide.write_text("customer_id," + "x" * 200_000 + "\n")
    with answering({("GET", f"/admin/deployments/{DEP}"): as_json(ENRICHED)}) as (url, asked):
        for path, line in ((entities, 3), (wide, 1)):
            argv = ["features", "load", "--deployment", DEP, "--file", str(path), "--url", url]
            code, _ = ended(argv, capsys)
            assert code == f"{path}:{line}: a cell longer than 131072 characters", code
    assert asked == [f"GET /admin/deployments/{DEP}"] * 2  # the file is refused, none sent


FEEDBACK = f"POST /v1/deployments/{DEP}/feedback"
REPLAYS = f"/admin/deployments/{DEP}/replays"


def test_a_bulk_load_waits_out_a_gateway_that_refuses_for_a_moment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failover's 503s (2-3 s) ended ``rdv feedback`` half-way, and ``rdv features load``
    too, for a person to start again (a helper's probe): both send a batch again after a 503
    (its ``Retry-After``) for up to ``--retry-for`` seconds, saying so."""
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr-1,1\nr-2,0\n")
    entities = tmp_path / "entities.csv"
    entities.write_text("customer_id,x\nc-1,1.5\n")
    calls: list[int] = []

    def twice_unavailable(answer: Answer) -> Callable[[bytes], Answer]:
        def answered(_body: bytes) -> Answer:
            calls.append(1)
            if len(calls) % 3:
                return as_json({"detail": "Redis is unavailable: ConnectionError"}, 503)
            return answer

        return answered

    route = FEEDBACK.split()[1]
    with answering({("POST", route): twice_unavailable(as_json({"accepted": 2, "relabelled": 0})),
                    # its first call too: a 503 there ended the load at once (a probe)
                    ("GET", f"/admin/deployments/{DEP}"): twice_unavailable(as_json(ENRICHED)),
                    ("PUT", f"/admin/deployments/{DEP}/entities"):
                        twice_unavailable(as_json({"loaded": 1}))}) as (url, asked):  # fmt: skip
        main(["feedback", "--deployment", DEP, "--url", url, str(labels)])
        sent = capsys.readouterr()
        assert json.loads(sent.out)["accepted"] == 2 and asked == [f"POST {route}"] * 3
        assert sent.err.count("rdv feedback: 503 Redis is unavailable: ConnectionError; trying "
                              "again in 0.1 s") == 2, sent.err  # fmt: skip
        main(["features", "load", "--deployment", DEP, "--file", str(entities), "--url", url])
        assert json.loads(capsys.readouterr().out)["loaded"] == 1 and len(calls) == 9
        code, _ = ended(["feedback", "--deployment", DEP, "--url", url, "--retry-for", "0",
                         str(labels)], capsys)  # fmt: skip
        assert isinstance(code, str) and code.startswith("batch 1 (items 1-2) refused: 503"), code


def test_skip_unknown_sends_the_rest_of_a_batch_that_names_unknown_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch naming one id the gateway no longer knew (a request answered by a gateway
    killed a moment later) was refused whole, and a person had to find and remove the ids (a
    helper's probe). ``--skip-unknown`` drops the ids each 404 lists and sends the rest."""
    gone = [f"gone-{i}" for i in range(25)]  # more than one 404 lists (20)
    kept = [f"r-{i}" for i in range(10)]
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\n" + "".join(f"{rid},1\n" for rid in kept + gone))

    def feedback(body: bytes) -> Answer:
        ids = [item["request_id"] for item in json.loads(body)]
        unknown = [rid for rid in ids if rid.startswith("gone-")][:20]
        if unknown:
            return as_json({"detail": "unknown or expired request ids", "unknown": unknown}, 404)
        return as_json({"accepted": len(ids), "relabelled": 0})

    with answering({("POST", FEEDBACK.split()[1]): feedback}) as (url, asked):
        main(["feedback", "--deployment", DEP, "--url", url, "--skip-unknown", "--batch", "30",
              str(labels)])  # fmt: skip
    sent = capsys.readouterr()
    said = json.loads(sent.out)
    assert (said["accepted"], said["skipped_unknown"], said["batches"]) == (10, 25, 2), said
    assert len(asked) == 3  # batch 1: 20 unknown, then its 10 known; batch 2: 5 unknown
    assert (
        f"{labels}: 25 labels skipped, their request ids unknown or expired (the first: "
        "'gone-0')" in sent.err
    ), sent.err
    # a 404 naming none of the batch's ids is a refusal as it was, not a loop
    elsewhere = as_json({"detail": "unknown or expired request ids", "unknown": ["x"]}, 404)
    with answering({("POST", FEEDBACK.split()[1]): elsewhere}) as (url, asked):
        code, _ = ended(["feedback", "--deployment", DEP, "--url", url, "--skip-unknown",
                         str(labels)], capsys)  # fmt: skip
    assert isinstance(code, str) and code.startswith("batch 1 (items 1-35) refused: 404"), code
    assert len(asked) == 1
    # a batch refused after one with skipped ids is named by the file's items (it was named
    # by the labels accepted: "items 2-3" for the file's 3-4; a helper's CLI probe)
    later = tmp_path / "later.csv"
    later.write_text("request_id,label\ngone-0,1\nr-1,1\nr-2,1\nr-3,7\n")

    def refuses_label_7(body: bytes) -> Answer:
        items = json.loads(body)
        if any(item["label"] == "7" or item["label"] == 7 for item in items):
            return as_json({"detail": "item 1: label 7 is not a class"}, 422)
        return feedback(body)

    with answering({("POST", FEEDBACK.split()[1]): refuses_label_7}) as (url, asked):
        code, _ = ended(["feedback", "--deployment", DEP, "--url", url, "--skip-unknown",
                         "--batch", "2", str(later)], capsys)  # fmt: skip
    assert isinstance(code, str) and code.startswith("batch 2 (items 3-4) refused: 422"), code


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (as_json({}), f"{FEEDBACK} -> 200 but the answer is not a gateway's JSON: accepted: "
                      "Field required; relabelled: Field required: {}"),
        (as_json([1, 2]), "-> 200 but the answer is not a gateway's JSON: a list, not an object"),
        (as_json("x"), "-> 200 but the answer is not a gateway's JSON: text, not an object"),
        (as_json({"accepted": "many", "relabelled": 0}),
         "accepted: Input should be a valid integer: {"),
        (HTML, f"{FEEDBACK} -> 200 but the answer is not a gateway's JSON: text/html "
               "'<html><body>hi</body></html>'"),
        ((302, "text/html", b""), f"{FEEDBACK} -> 302 but the answer is not a gateway's JSON: a "
                                  "redirect to http://elsewhere.example/login"),
        ((502, "text/html", b"<html>\n<h1>Bad Gateway</h1>\n</html>"),
         "-> 502 but the answer is not a gateway's JSON: text/html '<html> <h1>Bad Gateway"),
    ],
)  # fmt: skip
def test_feedback_to_a_url_that_is_no_gateway_is_one_line(
    answer: Answer, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``{}`` ended in ``KeyError: 'accepted'``, a list or text in a TypeError, a redirect or
    a web page in ``rdv feedback: Expecting value: line 1 column 1 (char 0)``."""
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr-1,1\n")
    with answering({("POST", FEEDBACK.split()[1]): answer}) as (url, _):
        code, _ = ended(["feedback", "--deployment", DEP, "--url", url, str(labels)], capsys)
    assert isinstance(code, str) and says in code, code
    assert code.startswith("batch 1 (items 1-1)") and code.endswith(
        "; 0 labels were accepted before it"
    ), code
    assert "\n" not in code


def test_a_refused_feedback_batch_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr-1,1\n")
    refusal = as_json({"detail": "unknown request ids", "unknown": ["r-1"]}, 404)
    with answering({("POST", FEEDBACK.split()[1]): refusal}) as (url, _):
        code, err = ended(["feedback", "--deployment", DEP, "--url", url, str(labels)], capsys)
    assert code == ("batch 1 (items 1-1) refused: 404: unknown request ids; 0 labels were "
                    "accepted before it"), code  # fmt: skip
    assert json.loads(err)["unknown"] == ["r-1"]  # the whole refusal, for the ids


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (as_json({}, 202), f"POST {REPLAYS} -> 202 but the answer is not a gateway's JSON: id: "
                           "Field required; state: Field required; progress: Field required: {}"),
        ((202, "text/html", b"<html>hi</html>"), f"POST {REPLAYS} -> 202 but the answer is not "
                                                 "a gateway's JSON: text/html '<html>hi</html>'"),
        (as_json([1], 202), f"POST {REPLAYS} -> 202 but the answer is not a gateway's JSON: a "
                            "list, not an object"),
        (as_json({"id": "18c-0123456789ab", "state": "running", "progress": {"done": "x",
                 "total": 9}}, 202), "progress.done: Input should be a valid integer: {"),
        (as_json({"id": "../../models/m/1", "state": "running", "progress": {"done": 0,
                 "total": None}}, 202), "id: String should match pattern '^[0-9a-f]{1,16}-"),
    ],
)  # fmt: skip
def test_replay_on_a_url_that_is_no_gateway_is_one_line(
    answer: Answer, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each ended in ``KeyError: 'id'`` or a TypeError."""
    with answering({("POST", REPLAYS): answer}) as (url, _):
        code, _ = ended(["replay", "--deployment", DEP, "--version", "1", "--url", url], capsys)
    assert code == says if says.startswith("POST") else says in str(code), code


@pytest.mark.parametrize(
    ("deployment", "entities", "says"),
    [
        (as_json([1]), None, f"GET /admin/deployments/{DEP} -> 200 but the answer is not a "
                             "gateway's JSON: a list, not an object"),
        (as_json({"name": DEP}), None, "the answer is not a gateway's JSON: feature_spec: Field "
                                       f"required: {{\"name\":\"{DEP}\"}}"),
        (as_json("x"), None, "GET /admin/deployments/breast-cancer -> 200 but the answer is not "
                             "a gateway's JSON: text, not an object"),
        (as_json({"feature_spec": {"lookup": "x"}}), None,
         "the answer is not a gateway's JSON: feature_spec.lookup: Input should be a valid "
         "dictionary"),
        (as_json(ENRICHED), HTML, f"batch of lines 2-2: PUT /admin/deployments/{DEP}/entities "
                                  "-> 200 but the answer is not a gateway's JSON: text/html"),
        (as_json(ENRICHED), as_json({"detail": {"rows": [1]}}, 422),
         'batch of lines 2-2 refused (422: {"rows":[1]}); 0 rows were loaded before it'),
    ],
)  # fmt: skip
def test_features_load_on_a_url_that_is_no_gateway_is_one_line(
    deployment: Answer,
    entities: Answer | None,
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A list or text for the deployment ended in an AttributeError; a web page for a batch
    counted its entities as loaded."""
    rows = tmp_path / "entities.csv"
    rows.write_text("customer_id,x\nc-1,1.5\n")
    answers = {("GET", f"/admin/deployments/{DEP}"): deployment}
    if entities is not None:
        answers["PUT", f"/admin/deployments/{DEP}/entities"] = entities
    with answering(answers) as (url, _):
        argv = ["features", "load", "--deployment", DEP, "--file", str(rows), "--url", url]
        code, _ = ended(argv, capsys)
    assert isinstance(code, str) and says in code, code


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (HTML, "GET /admin/models -> 200 but the answer is not a gateway's JSON: text/html "
               "'<html><body>hi</body></html>'"),
        ((200, "application/json", b""), "GET /admin/models -> 200 but the answer is not a "
                                         "gateway's JSON: an empty body"),
        (as_json("ok"), "GET /admin/models -> 200 but the answer is not a gateway's JSON: text, "
                        "not an object or a list: \"ok\""),
        ((200, "application/json", b"[" * 100_000), "GET /admin/models -> 200 but the answer is "
                                                    "not a gateway's JSON: nested too deeply"),
        (as_json({"detail": {"field": "version", "why": [1, 2]}}, 422),
         'GET /admin/models -> 422: {"field":"version","why":[1,2]}'),
        (as_json({"detail": [{"what": 1}, "x"]}, 422),
         'GET /admin/models -> 422: [{"what":1},"x"]'),
        (as_json({"detail": [{"loc": ["body", "version"], "msg": "Field required"}]}, 422),
         "GET /admin/models -> 422: version: Field required"),
        (as_json({"error": "no"}, 500), 'GET /admin/models -> 500: {"error":"no"}'),
        (as_json({"detail": None}, 500), "GET /admin/models -> 500: null"),
    ],
)  # fmt: skip
def test_an_admin_answer_that_is_not_a_gateways_is_an_error(
    answer: Answer, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A web page answering 200 was printed as the command's JSON (``{"detail": "<html>..."}``,
    status 0); a refusal whose detail is an object or a list said ``-> 422: None``."""
    with answering({("GET", "/admin/models"): answer}) as (url, _):
        code, _ = ended(["models", "list", "--url", url], capsys)
    assert code == says, code


def test_a_long_refusal_detail_is_cut_to_one_bounded_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refusal = as_json({"detail": {"rows": list(range(10_000))}}, 422)
    with answering({("GET", "/admin/models"): refusal}) as (url, _):
        code, err = ended(["models", "list", "--url", url], capsys)
    assert isinstance(code, str) and code.startswith('GET /admin/models -> 422: {"rows":[0,1,2,')
    assert code.endswith("...") and len(code) < 400, code
    assert json.loads(err)["detail"]["rows"][-1] == 9_999  # the whole of it on stderr


def test_json_nested_too_deeply_names_its_file_and_line_or_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rdv feedback: maximum recursion depth exceeded while decoding ...``, no file:line (the
    other bad lines have one); ``rdv archive: maximum recursion ...`` for ``--positions``."""
    deep = "[" * 100_000
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"request_id": "r-1", "label": 1}\n' + deep + "\n")
    code, _ = ended(["feedback", "--deployment", DEP, "--url", NOWHERE, str(jsonl)], capsys)
    assert code == f"{jsonl}:2: not JSON: nested too deeply", code
    cell = tmp_path / "deep.csv"  # a label list in a cell, under the cell limit
    cell.write_text(f"request_id,label\nr-1,{deep}\n")
    code, _ = ended(["feedback", "--deployment", DEP, "--url", NOWHERE, str(cell)], capsys)
    assert isinstance(code, str) and code.startswith(f"{cell}:2: label '[[[[")
    assert code.endswith("is not a class or a JSON list of classes (or names)") and len(code) < 300

    entities = tmp_path / "entities.jsonl"
    entities.write_text('{"customer_id": "c-1", "x": 1.5}\n' + deep + "\n")
    with answering({("GET", f"/admin/deployments/{DEP}"): as_json(ENRICHED)}) as (url, _):
        argv = ["features", "load", "--deployment", DEP, "--file", str(entities), "--url", url]
        code, _ = ended(argv, capsys)
    assert code == f"{entities}:2: not JSON: nested too deeply", code

    monkeypatch.setenv("RDV_REDIS_URL", "redis://127.0.0.1:9")  # checked before Redis is asked
    held = tmp_path / "positions.json"
    held.write_text(deep)
    out = str(tmp_path / "slice.csv")
    for given in (deep, f"@{held}"):
        argv = ["archive", "export", "--deployment", DEP, "--out", out, "--positions", given]
        code, _ = ended(argv, capsys)
        assert isinstance(code, str) and code.startswith("rdv archive export: --positions "), code
        assert code.endswith(": not JSON: nested too deeply") and len(code) < 200, code


def test_a_challenger_without_a_version_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It was sent, and the gateway's ``422: version: Field required`` came back."""
    argv = ["challengers", "add", "--deployment", DEP, "--role", "c1", "--url", NOWHERE]
    code, err = ended(argv, capsys)
    assert code == 2 and err.strip() == "rdv challengers add: --version required", (code, err)


def test_a_line_past_the_bound_is_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line is read whole before it is parsed: past ``LINE_LIMIT`` bytes it is refused."""
    says = f"line longer than {LINE_LIMIT} bytes"
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text('{"request_id": "r-1", "label": 1}\n' + " " * LINE_LIMIT + "1\n")
    code, _ = ended(["feedback", "--deployment", DEP, "--url", NOWHERE, str(jsonl)], capsys)
    assert isinstance(code, str) and code.startswith(f"{jsonl}:2: {says}"), code
    wide = tmp_path / "wide.csv"  # two bytes a character: over the bound in bytes only
    wide.write_text("request_id,label\nr-1,\u00e9" + "\u00e9" * (LINE_LIMIT // 2) + "\n")
    code, _ = ended(["feedback", "--deployment", DEP, "--url", NOWHERE, str(wide)], capsys)
    assert isinstance(code, str) and code.startswith(f"{wide}:2: {says}"), code


def test_a_file_with_no_line_end_is_refused_not_read_for_ever(tmp_path: Path) -> None:
    """``rdv feedback --deployment d /dev/zero`` read one endless line into memory. Its own
    process, its address space bounded: before the fix it ran out of memory in a traceback."""

    def bounded() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "feedback", "--deployment", "d", "--url", NOWHERE,
         "/dev/zero"],
        env={"PATH": "/usr/bin:/bin", "RDV_DATA_DIR": str(tmp_path)}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, preexec_fn=bounded,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"/dev/zero:1: line longer than {LINE_LIMIT} bytes"), last


def test_a_file_of_nothing_sends_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty file exited 0 printing ``"accepted": 0`` and nothing else: a wrong file given
    by mistake looked like a day with no labels."""
    for name, content in [
        ("labels.jsonl", ""),
        ("labels.csv", "request_id,label\n"),
        ("empty.csv", ""),
    ]:  # an empty CSV was an error (a CLI probe)
        labels = tmp_path / name
        labels.write_text(content)
        main(["feedback", "--deployment", DEP, "--url", NOWHERE, str(labels)])
        out, err = capsys.readouterr()
        assert json.loads(out)["accepted"] == 0
        assert f"{labels}: no labels in it; nothing sent" in err
    for name, content in [("entities.csv", "customer_id,x\n"), ("empty.csv", "")]:
        entities = tmp_path / name
        entities.write_text(content)
        with answering({("GET", f"/admin/deployments/{DEP}"): as_json(ENRICHED)}) as (url, _):
            main(["features", "load", "--deployment", DEP, "--file", str(entities), "--url", url])
        out, err = capsys.readouterr()
        assert json.loads(out)["loaded"] == 0
        assert f"{entities}: no entities in it; nothing sent" in err


def test_a_gateway_lost_in_the_middle_of_a_load_says_how_far_it_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said only "cannot reach the gateway", and how many entities had been stored showed
    nowhere but the progress line (a helper's probe): the second batch's PUT meets a gateway
    that drops the connection."""
    puts: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(json.dumps(ENRICHED).encode())

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            puts.append(1)
            if len(puts) > 1:
                self.close_connection = True  # gone without an answer
                return
            self._answer(json.dumps({"loaded": 1}).encode())

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    rows = tmp_path / "entities.csv"
    rows.write_text("customer_id,x\nc-1,1.5\nc-2,2.5\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        argv = ["features", "load", "--deployment", DEP, "--file", str(rows), "--url", url,
                "--batch", "1", "--retry-for", "0"]  # fmt: skip
        code, _ = ended(argv, capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(code, str) and code.startswith(f"cannot reach the gateway at {url}"), code
    assert code.endswith("; 1 rows were loaded before it (a load again is safe)"), code


def test_rdv_replay_follows_its_replay_through_a_gateway_that_refuses_for_a_moment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failover's 503 on a progress poll ended ``rdv replay`` with status 1 and ``-> 503:
    Redis is unavailable`` while the replay ran on (a helper's probe on a real cluster): the
    poll is a read, sent again through a 429 or 503 as ``rdv decisions`` reads Redis again."""
    rid = "1a2527c0c07-9a3350ebe4b9"
    report = {"id": rid, "state": "running", "progress": {"done": 0, "total": 8}}
    polls: list[int] = []

    def poll(_body: bytes) -> Answer:
        polls.append(1)
        if len(polls) < 3:
            return as_json({"detail": "Redis is unavailable: ConnectionError"}, 503)
        return as_json({**report, "state": "done", "progress": {"done": 8, "total": 8}})

    with answering({("POST", REPLAYS): as_json(report, 202),
                    ("GET", f"{REPLAYS}/{rid}"): poll}) as (url, _asked):  # fmt: skip
        main(["replay", "--deployment", DEP, "--version", "1", "--url", url])
    out = capsys.readouterr()
    assert json.loads(out.out)["state"] == "done" and len(polls) == 3, out.err
