"""`rtml evaluate`: labels from feedback, metrics of a small hand-computed case, and input errors."""

import datetime as dt
import gzip
import json

import pytest

from rtml import cli, evaluate


def insight(tx, customer, event_time, score):
    # Extra contract fields are present in real insight files and must be ignored.
    return {
        "transaction_id": tx,
        "customer_id": customer,
        "terminal_id": "T1",
        "event_time": event_time,
        "amount": 10.0,
        "score": score,
        "decision": "approve",
        "model_version": "v1",
    }


def report(tx, reported_at, is_fraud=True, event_time="2018-08-01T10:00:00Z"):
    return {
        "transaction_id": tx,
        "customer_id": "C",
        "terminal_id": "T1",
        "event_time": event_time,
        "reported_at": reported_at,
        "is_fraud": is_fraud,
    }


# Eight scored transactions over two UTC days (plus a repeated t1). t7 is 01:00 on Aug 2 at +02:00,
# so Aug 1 in UTC. Labels: t1, t7, t6, t4 fraud; t3 was reported and then retracted.
INSIGHTS = [
    insight("t1", "A", "2018-08-01T09:00:00Z", 0.9),
    insight("t2", "B", "2018-08-01T10:00:00Z", 0.8),
    insight("t3", "C", "2018-08-01T11:00:00Z", 0.3),
    insight("t4", "D", "2018-08-01T12:00:00Z", 0.2),
    insight("t7", "E", "2018-08-02T01:00:00+02:00", 0.85),
    insight("t1", "A", "2018-08-01T09:00:00Z", 0.1),
    insight("t5", "A", "2018-08-02T09:00:00Z", 0.7),
    insight("t6", "B", "2018-08-02T10:00:00Z", 0.6),
    insight("t8", "G", "2018-08-02T11:00:00Z", 0.65),
]
FEEDBACK = [
    report("t1", "2018-08-03T00:00:00Z"),
    # The retraction comes first in the file but is the later report, so it wins.
    report("t3", "2018-08-06T00:00:00Z", is_fraud=False),
    report("t3", "2018-08-05T00:00:00Z", is_fraud=True),
    report("t4", "2018-08-04T00:00:00Z"),
    report("t6", "2018-08-09T00:00:00Z", event_time="2018-08-02T10:00:00Z"),
    report("t7", "2018-08-09T00:00:00Z", event_time="2018-08-01T23:00:00Z"),
    report("t99", "2018-08-09T00:00:00Z"),  # a transaction nobody scored
]
# Hand-computed, k=2. Scores by rank: 0.9 F, 0.85 F, 0.8, 0.7, 0.65, 0.6 F, 0.3, 0.2 F.
# AUC: fraud-over-genuine pairs 4 + 4 + 1 + 0 = 9 of 16.
# AP: recall steps of 1/4 at precisions 1, 1, 3/6, 4/8.
# Card precision@2: Aug 1 ranks A 0.9 F, E 0.85 F, B, C, D -> 2/2 (A and E found);
# Aug 2 ranks G 0.65, B 0.6 F (A is found) -> 1/2; mean 3/4.
EXPECTED = {
    "insights": 8,
    "duplicates_ignored": 1,
    "frauds": 4,
    "fraud_rate": 0.5,
    "auc_roc": 9 / 16,
    "average_precision": 0.75,
    "card_precision_at_2": 0.75,
    "days": 2,
    "reports_without_insight": 1,
}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "insights.jsonl", INSIGHTS), write_jsonl(tmp_path / "feedback.jsonl", FEEDBACK)


def test_report_of_a_hand_computed_case(files):
    result = evaluate.evaluate(*files, k=2)
    assert result == pytest.approx(EXPECTED)
    assert list(result) == list(EXPECTED)


def test_feedback_from_a_replay_file_gives_the_same_report(tmp_path, files):
    insights, _ = files
    lines = [{"kind": "transaction", "event": {"transaction_id": "t1", "whatever": 1}}]
    lines += [{"kind": "feedback", "event": event} for event in FEEDBACK]
    replay = write_jsonl(tmp_path / "replay.jsonl", lines)
    assert evaluate.evaluate(insights, replay, k=2) == pytest.approx(EXPECTED)


def test_plain_and_replay_feedback_lines_may_be_mixed_in_one_file(tmp_path):
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [report("t1", "2018-08-03T00:00:00Z"), {"kind": "feedback", "event": report("t2", "2018-08-03T00:00:00Z")}],
    )
    assert evaluate.read_labels(mixed).is_fraud == {"t1": True, "t2": True}


def test_a_later_retraction_unlabels_and_a_later_report_relabels(tmp_path):
    path = write_jsonl(
        tmp_path / "feedback.jsonl",
        [
            report("a", "2018-08-03T00:00:00Z", True),
            report("a", "2018-08-04T00:00:00Z", False),
            report("b", "2018-08-03T00:00:00Z", False),
            report("b", "2018-08-04T00:00:00Z", True),
        ],
    )
    labels = evaluate.read_labels(path)
    assert (labels.label("a"), labels.label("b"), labels.label("never-reported")) == (0, 1, 0)
    assert labels.reports == {"a": 2, "b": 2}


def test_ranking_metrics_are_null_when_no_scored_transaction_is_fraud(tmp_path):
    insights = write_jsonl(tmp_path / "i.jsonl", [insight("x", "A", "2018-08-01T00:00:00Z", 0.4)])
    feedback = write_jsonl(tmp_path / "f.jsonl", [])
    result = evaluate.evaluate(insights, feedback, k=100)
    assert (result["auc_roc"], result["average_precision"], result["card_precision_at_100"]) == (None, None, 0.0)


def test_an_empty_insights_file_is_an_error(tmp_path):
    insights = write_jsonl(tmp_path / "i.jsonl", [])
    with pytest.raises(evaluate.EvaluationInputError, match="no insights"):
        evaluate.evaluate(insights, write_jsonl(tmp_path / "f.jsonl", []))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            json.dumps({k: v for k, v in insight("x", "A", "2018-08-01T00:00:00Z", 0.5).items() if k != "score"}),
            "score: required field is missing",
        ),
        (json.dumps(insight("x", "A", "2018-08-01T00:00:00Z", "high")), "score: expected a finite number"),
        (json.dumps(insight("x", "", "2018-08-01T00:00:00Z", 0.5)), "customer_id: expected a non-empty string"),
        (json.dumps(insight("x", "A", "2018-08-01 00:00:00", 0.5)), "event_time: .* has no time zone"),
    ],
)
def test_a_bad_insight_line_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "insights.jsonl", [INSIGHTS[0], "", bad_line])
    with pytest.raises(evaluate.EvaluationInputError, match=message) as info:
        evaluate.read_insights(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (json.dumps({k: v for k, v in FEEDBACK[0].items() if k != "is_fraud"}), "is_fraud: required field is missing"),
        (json.dumps(report("x", "2018-07-01T00:00:00Z")), "reported_at: .* is before event_time"),
        (json.dumps({"kind": "alert", "event": FEEDBACK[0]}), "a replay line must be"),
    ],
)
def test_a_bad_feedback_line_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "feedback.jsonl", [FEEDBACK[0], bad_line])
    with pytest.raises(evaluate.EvaluationInputError, match=message) as info:
        evaluate.read_labels(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_an_insight_belongs_to_the_utc_day_of_its_event_time(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [insight("x", "A", "2018-08-02T01:00:00+02:00", 0.5)])
    [scored], _ = evaluate.read_insights(path)
    assert scored.day == dt.date(2018, 8, 1)


def test_gzipped_files_are_read(tmp_path, files):
    insights, feedback = files
    packed = tmp_path / "feedback.jsonl.gz"
    packed.write_bytes(gzip.compress(feedback.read_bytes()))
    assert evaluate.evaluate(insights, packed, k=2) == pytest.approx(EXPECTED)


# --- the command -----------------------------------------------------------------------------


def test_cli_prints_a_table_then_the_report_as_one_json_line(files, tmp_path, capsys):
    insights, feedback = files
    json_out = tmp_path / "report.json"
    code = cli.main(
        ["evaluate", "--insights", str(insights), "--feedback", str(feedback), "--k", "2", "--json-out", str(json_out)]
    )
    assert code == 0
    out = capsys.readouterr().out
    table, last_line = out.rstrip("\n").rsplit("\n", 1)
    assert json.loads(last_line) == pytest.approx(EXPECTED)
    assert json.loads(json_out.read_text()) == json.loads(last_line)
    for text in ("AUC ROC", "0.5625", "average precision", "0.7500", "card precision@2", "duplicate", "50.000%"):
        assert text in table


def test_cli_names_a_missing_file_and_exits_with_the_usage_code(files, tmp_path, capsys):
    insights, _ = files
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["evaluate", "--insights", str(insights), "--feedback", str(missing)]) == cli.EXIT_USAGE
    assert f"--feedback {missing}: no such file" in capsys.readouterr().err


def test_cli_reports_a_bad_line_without_a_traceback(files, tmp_path, capsys):
    _, feedback = files
    insights = write_jsonl(tmp_path / "insights.jsonl", [INSIGHTS[0], "oops"])
    assert cli.main(["evaluate", "--insights", str(insights), "--feedback", str(feedback)]) == cli.EXIT_USAGE
    assert f"{insights}:2: not valid JSON" in capsys.readouterr().err
