"""Request validation and preprocessing against a feature spec, without Redis."""

import json

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gateway.dataplane.answers import predictions
from gateway.dataplane.validation import PredictRequest, check_request_id, to_matrix
from rendezvous.spec import FeatureSpec

SPEC = FeatureSpec.from_names(["a", "b", "c"])


def parse(body: str) -> PredictRequest:
    return PredictRequest.model_validate_json(body)


def errors_of(body: str, max_rows: int = 10) -> list[dict]:
    with pytest.raises((RequestValidationError, ValidationError)) as info:
        to_matrix(SPEC, parse(body), max_rows)
    exc = info.value
    return list(exc.errors())


def test_features_are_put_in_spec_order() -> None:
    x = to_matrix(SPEC, parse('{"features": {"c": 3, "a": 1.5, "b": -2}}'), 10)
    assert x.dtype == np.float32 and x.shape == (1, 3)
    np.testing.assert_array_equal(x, [[1.5, -2, 3]])


def test_instances_become_rows() -> None:
    x = to_matrix(SPEC, parse('{"instances": [[1, 2, 3], [4, 5, 6]]}'), 10)
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])


def test_missing_and_unknown_features_are_named() -> None:
    errs = errors_of('{"features": {"a": 1, "b": 2, "zzz": 3}}')
    locs = {tuple(e["loc"]) for e in errs}
    assert ("body", "features", "c") in locs and ("body", "features", "zzz") in locs
    assert any("missing feature 'c'" in e["msg"] for e in errs)
    assert any("unknown feature 'zzz'" in e["msg"] for e in errs)


def test_wrong_row_length_names_the_row() -> None:
    errs = errors_of('{"instances": [[1, 2, 3], [1, 2]]}')
    assert errs[0]["loc"] == ("body", "instances", 1)
    assert "2 values" in errs[0]["msg"] and "expects 3" in errs[0]["msg"]


@pytest.mark.parametrize(
    "body",
    [
        '{"features": {"a": "1", "b": 2, "c": 3}}',
        '{"features": {"a": true, "b": 2, "c": 3}}',
        '{"features": {"a": null, "b": 2, "c": 3}}',
        '{"features": {"a": NaN, "b": 2, "c": 3}}',
        '{"features": {"a": Infinity, "b": 2, "c": 3}}',
        '{"instances": [[1, "x", 3]]}',
    ],
)
def test_non_numeric_and_non_finite_values_are_refused(body: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(body)
    loc = info.value.errors()[0]["loc"]
    assert loc[0] in ("features", "instances")


def test_float32_overflow_is_refused_with_its_location() -> None:
    errs = errors_of(json.dumps({"features": {"a": 1e300, "b": 2, "c": 3}}))
    assert errs[0]["loc"] == ("body", "features", "a")
    assert "float32" in errs[0]["msg"]
    # float32's largest, as the shortest decimal prints it, rounds to it (it was refused);
    # the least number that rounds to infinity is refused
    x = to_matrix(SPEC, parse('{"instances": [[3.4028235e38, -3.4028235e38, 0]]}'), 10)
    assert x.dtype == np.float32 and np.isfinite(x).all() and x[0, 0] == np.finfo(np.float32).max
    assert errors_of('{"instances": [[3.4028235677973366e38, 0, 0]]}')[0]["loc"] == (
        "body", "instances", 0, 0)  # fmt: skip


@pytest.mark.parametrize(
    "body", ["{}", '{"features": {"a": 1, "b": 2, "c": 3}, "instances": [[1, 2, 3]]}']
)
def test_exactly_one_of_features_or_instances(body: str) -> None:
    assert "exactly one" in errors_of(body)[0]["msg"]


def test_row_cap() -> None:
    errs = errors_of('{"instances": [[1, 2, 3], [1, 2, 3], [1, 2, 3]]}', max_rows=2)
    assert "at most 2" in errs[0]["msg"]


def test_a_body_of_more_rows_than_the_cap_is_refused_before_it_is_parsed() -> None:
    """A megabyte of ``[[1],[1],...]`` cost ~110 ms of the event loop to parse before the row
    cap refused it (found by hand): counting its brackets refuses it in well under 1 ms.
    Brackets in feature names are allowed for."""
    from gateway.dataplane.validation import parse_body

    flood = ('{"instances": [' + ",".join(["[1]"] * 250_000) + "]}").encode()
    with pytest.raises(RequestValidationError) as refused:
        parse_body(flood, SPEC, 1000)
    assert refused.value.errors()[0]["msg"] == (
        "the body opens 250001 arrays: a request holds at most 1000 rows, an array of numbers each"
    )
    # one row nested deeply is not called more than 1000 rows (found by a helper's probe)
    deep = ('{"instances": [' + "[" * 1500 + "1" + "]" * 1500 + "]}").encode()
    with pytest.raises(RequestValidationError) as nested:
        parse_body(deep, SPEC, 1000)
    assert "more than 1000 rows" not in str(nested.value.errors())
    assert "opens 1501 arrays" in nested.value.errors()[0]["msg"]
    bracketed = FeatureSpec.from_names(["x[0]", "x[1]", "x[2]"])
    one = parse_body(b'{"features": {"x[0]": 1, "x[1]": 2, "x[2]": 3}}', bracketed, 1)
    assert to_matrix(bracketed, one, 1).tolist() == [[1.0, 2.0, 3.0]]
    two = b'{"instances": [[1, 2, 3], [4, 5, 6]]}'
    assert to_matrix(SPEC, parse_body(two, SPEC, 2), 2).shape == (2, 3)


def test_a_body_with_a_byte_order_mark_is_refused_saying_so() -> None:
    """The parser's words were "expected value at line 1 column 1"."""
    from gateway.dataplane.validation import parse_body

    body = b'{"instances": [[1, 2, 3]]}'
    assert to_matrix(SPEC, parse_body(body, SPEC, 1), 1).shape == (1, 3)
    with pytest.raises(RequestValidationError) as refused:
        parse_body(b"\xef\xbb\xbf" + body, SPEC, 1)
    [error] = refused.value.errors()
    assert "byte order mark (EF BB BF)" in error["msg"] and error["loc"] == ("body",)


def test_empty_instances_and_extra_keys_are_refused() -> None:
    with pytest.raises(ValidationError):
        parse('{"instances": []}')
    with pytest.raises(ValidationError):
        parse('{"features": {"a": 1, "b": 2, "c": 3}, "model": "x"}')


def test_request_id_header_is_checked() -> None:
    assert check_request_id("abc-123") == "abc-123"
    assert check_request_id("a b:c/d@e") == "a b:c/d@e" and check_request_id("x" * 128)
    # printable ASCII, as an OIP id: a header's UTF-8 'é' was read as Latin-1 'Ã©', another id
    for bad in ["", "x" * 129, "tab\there", "\u00c3\u00a9-x", " lead", "trail "]:
        with pytest.raises(RequestValidationError):
            check_request_id(bad)


def _answer(body: bytes) -> tuple[int, bytes]:
    from gateway.dataplane.failures import problem_of
    from gateway.dataplane.validation import parse_body

    with pytest.raises(RequestValidationError) as info:
        to_matrix(SPEC, parse_body(body, SPEC, 1000), 1000)
    problem = problem_of(info.value)
    assert problem is not None
    return problem.status, problem.body()


def test_a_422_names_ten_faults_and_counts_the_rest_in_a_few_kb() -> None:
    many = {f"unknown-{i}-" + "x" * 300: 1.0 for i in range(50_000)}
    status, body = _answer(json.dumps({"features": many}).encode())
    detail = json.loads(body)["detail"]
    assert status == 422 and len(body) <= 8 * 1024
    assert len(detail) == 11 and "50003 in all" in detail[-1]["msg"]  # 3 missing + 50,000
    long_row = {"instances": [["x" * 100_000] + [1.0] * 2]}
    status, body = _answer(json.dumps(long_row).encode())
    assert status == 422 and len(body) <= 8 * 1024 and "float" in body.decode()


def test_a_protocols_own_matrix_is_held_to_the_same_rules() -> None:
    import numpy as np
    from fastapi.exceptions import RequestValidationError

    from gateway.dataplane.validation import check_matrix
    from rendezvous.spec import FeatureSpec

    spec = FeatureSpec(names=("a", "b"))
    ok = check_matrix(spec, np.array([[1.0, 2.0]], dtype=np.float64), max_rows=3)
    assert ok.dtype == np.float32 and ok.flags.c_contiguous and ok.tolist() == [[1.0, 2.0]]
    for bad, needle in [
        (np.zeros((1, 3)), "expects [rows, 2]"),
        (np.zeros(2), "expects [rows, 2]"),
        (np.zeros((4, 2)), "1 to 3"),
        (np.zeros((0, 2)), "1 to 3"),
        (np.array([[1.0, np.nan]]), "'b': not a finite"),
        (np.array([[1e300, 1.0]]), "'a': not a finite"),
    ]:
        try:
            check_matrix(spec, bad, max_rows=3)
        except RequestValidationError as exc:
            assert needle in exc.errors()[0]["msg"], (needle, exc.errors())
        else:
            raise AssertionError(f"accepted {bad!r}")


def test_an_answers_rows_give_each_label_with_its_probabilities_by_class_name() -> None:
    """Binary rows are built without a zip per row; both shapes read as the classes say."""
    binary = predictions([1, 0], np.array([[0.25, 0.75], [0.5, 0.5]], np.float32), [0, 1])
    assert binary == [{"label": 1, "probabilities": {"0": 0.25, "1": 0.75}},
                      {"label": 0, "probabilities": {"0": 0.5, "1": 0.5}}]  # fmt: skip
    three = predictions([7], np.array([[0.125, 0.375, 0.5]], np.float32), [3, 5, 7])
    assert three == [{"label": 7, "probabilities": {"3": 0.125, "5": 0.375, "7": 0.5}}]
    with pytest.raises(ValueError):  # rows and labels that do not line up are a bug, not data
        predictions([1], np.array([[0.5, 0.5], [0.5, 0.5]], np.float32), [0, 1])


def test_many_unknown_features_are_counted_not_each_described() -> None:
    """A fault built for each of 60,000 unknown feature names held the event loop 55 ms (found
    by hand): the first are named, the others counted (the refusal shows ten and the total)."""
    from gateway.dataplane.failures import bounded_faults

    body = json.dumps({"features": {f"u{i}": 1.0 for i in range(5_000)}})
    errs = errors_of(body)
    assert len(errs) == 3 + 5_000  # a, b, c missing; every unknown one counted
    named = [e["msg"] for e in errs if e["msg"].startswith("unknown feature")]
    assert named == [f"unknown feature 'u{i}'" for i in range(20)]
    assert bounded_faults(errs)[-1]["msg"] == "4993 more faults not shown (5003 in all)"


@pytest.mark.parametrize("body", [b"", b" \r\n"])
def test_an_empty_body_is_named_empty_not_by_the_parsers_eof(body: bytes) -> None:
    """A POST with neither Content-Length nor Transfer-Encoding has a body of length 0 (RFC
    9112, 6.3): predict said "Invalid JSON: EOF while parsing a value", feedback the same."""
    from gateway.dataplane.feedback import FeedbackRefused, parse_items
    from gateway.dataplane.validation import parse_body

    with pytest.raises(RequestValidationError) as refused:
        parse_body(body, SPEC, 1)
    [error] = refused.value.errors()
    assert error["msg"].startswith("the body is empty") and error["loc"] == ("body",)
    assert "input" not in error  # it was null, as if a JSON null had been sent
    with pytest.raises(FeedbackRefused) as fed:
        parse_items(body, 10)
    assert fed.value.status == 400 and str(fed.value.detail).startswith("the body is empty")


def test_feedback_faults_echo_what_was_sent_and_its_ids_follow_predicts_rule() -> None:
    """A structure sent as ``correct`` was echoed as ``"input": null``, as if null were sent;
    an id no request can carry (a control character) was looked up and answered 404 where
    predict's ``X-Request-Id`` is a 422."""
    from gateway.dataplane.failures import bounded_faults
    from gateway.dataplane.feedback import FeedbackRefused, parse_items

    def faults(item: dict) -> list[dict]:
        with pytest.raises(FeedbackRefused) as refused:
            parse_items(json.dumps(item).encode(), 10)
        assert refused.value.status == 422
        return refused.value.detail  # type: ignore[no-any-return]

    [listed] = faults({"request_id": "r-1", "correct": [1]})
    assert listed["loc"] == ["body", 0, "correct"] and "input" not in listed
    [word] = faults({"request_id": "r-1", "correct": "yes"})
    assert word["input"] == "yes"
    for bad in ["a\x01b", " lead", "tab\there", "\u00e9-1"]:
        [fault] = faults({"request_id": bad, "label": 1})
        assert fault["loc"] == ["body", 0, "request_id"], fault
        assert "printable ASCII" in fault["msg"] and fault["input"] == bad
    assert bounded_faults([{"type": "t", "loc": ["body"], "msg": "m", "input": None}]) == [
        {"type": "t", "loc": ["body"], "msg": "m", "input": None}  # a null sent stays named
    ]


@pytest.mark.parametrize(
    ("name", "fault"),
    [("BadName", "('B' at 0)"), ("a" * 64, "(64 characters)"), ("", "(empty)"),
     ("-x", "(it starts with '-')"), ("bad$name", "('$' at 3)"), ("a" * 500, "(500 characters)")],
)  # fmt: skip
def test_a_name_that_can_never_be_a_deployments_says_what_is_wrong_in_it(
    name: str, fault: str
) -> None:
    from rendezvous import names

    with pytest.raises(names.InvalidName) as refused:
        names.check_name(name, "deployment")
    said = str(refused.value)
    assert fault in said and "use 1-63 characters" in said and len(said) < 300, said


def test_a_predict_fault_with_no_one_value_sent_echoes_no_null_input() -> None:
    """A missing feature, an unknown one, both 'features' and 'instances', a row of the wrong
    length each said ``"input": null``, as if a null had been sent there; a value sent is
    still echoed."""
    from gateway.dataplane.validation import parse_body, to_matrix

    width = len(SPEC.names)
    bodies = [
        {"features": {}},
        {"features": {n: 1.0 for n in SPEC.names}, "instances": [[1.0] * width]},
        {"instances": [[1.0] * (width + 1)]},
    ]
    for body in bodies:
        with pytest.raises(RequestValidationError) as refused:
            to_matrix(SPEC, parse_body(json.dumps(body).encode(), SPEC, 10), 10)
        for error in refused.value.errors():
            assert "input" not in error, (body, error)
    with pytest.raises(RequestValidationError) as refused:
        to_matrix(SPEC, parse_body(json.dumps({"instances": [[1e39] * width]}).encode(),
                                   SPEC, 10), 10)  # fmt: skip
    assert refused.value.errors()[0]["input"] == 1e39
