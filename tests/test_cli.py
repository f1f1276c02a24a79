"""The `rtml` commands, run in-process against the real emulators."""

import json
import time

import pytest

from rtml import cli, config, pubsub_tools
from tests.pubsub_helpers import collect


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def emulator_args(services) -> list[str]:
    return [
        f"--project={services.project}",
        f"--pubsub-emulator={services.pubsub_host}",
        f"--bigtable-emulator={services.bigtable_host}",
    ]


def test_summary_tables_wrap_a_long_path_and_never_cut_it(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    path = "out/" + "/".join(f"folder{i:02d}" for i in range(20)) + "/report/summary.md"
    cli._print_kv("model version 20260101-000000", {"exported to": path, "seconds": "1.5"})
    out = capsys.readouterr().out
    assert "…" not in out
    cells = "".join(ch for ch in out if not ch.isspace() and ch not in "│┃┏┓┗┛━─┡┩└┘┌┐╇┼┬┴├┤╭╮╰╯")
    assert "exportedto" + path in cells
    assert max(len(line) for line in out.splitlines()) <= 80 < len(path)


def test_help_lists_every_command_of_this_release(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("up", "down", "status", "simulate", "replay", "tail", "seek", "backfill", "train", "serve", "evaluate", "demo"):
        assert command in out


def test_simulate_writes_a_replay_file_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "sim.jsonl"
    assert (
        run_cli(
            "simulate",
            "--out",
            str(out),
            "--days",
            "3",
            "--customers",
            "50",
            "--terminals",
            "100",
            "--seed",
            "7",
            "--quiet",
        )
        == 0
    )
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert set(kinds) <= {"transaction", "feedback"} and "transaction" in kinds
    printed = capsys.readouterr().out
    assert "transactions" in printed and f"{kinds.count('transaction'):,}" in printed


def test_simulate_rejects_bad_arguments_naming_the_field(tmp_path, capsys):
    assert run_cli("simulate", "--out", str(tmp_path / "x.jsonl"), "--days", "0", "--quiet") == cli.EXIT_USAGE
    assert "days" in capsys.readouterr().err


@pytest.mark.emulator
def test_replay_publishes_in_file_order_and_tail_writes_one_json_per_line(services, unique_topics, tmp_path):
    sim = tmp_path / "sim.jsonl"
    run_cli("simulate", "--out", str(sim), "--days", "2", "--customers", "20", "--terminals", "40", "--quiet")
    lines = [json.loads(line) for line in sim.read_text().splitlines()]
    tx_lines = [line["event"] for line in lines if line["kind"] == "transaction"]
    names = unique_topics
    assert (
        run_cli(
            "replay",
            "--input",
            str(sim),
            "--transactions-topic",
            names["transactions"],
            "--feedback-topic",
            names["fraud-feedback"],
            "--quiet",
            *emulator_args(services),
        )
        == 0
    )

    out = tmp_path / "tail.jsonl"
    assert (
        run_cli(
            "tail",
            "--subscription",
            names["transactions"] + "-sub",
            "--out",
            str(out),
            "--count",
            str(len(tx_lines)),
            "--idle-timeout",
            "10",
            *emulator_args(services),
        )
        == 0
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(tx_lines)
    assert sorted(w["transaction_id"] for w in written) == sorted(t["transaction_id"] for t in tx_lines)
    assert {w["transaction_id"]: w for w in written} == {t["transaction_id"]: t for t in tx_lines}


@pytest.mark.emulator
def test_tail_stops_after_idle_timeout_when_nothing_arrives(services, unique_topics, tmp_path):
    started = time.monotonic()
    out = tmp_path / "none.jsonl"
    assert (
        run_cli(
            "tail",
            "--subscription",
            unique_topics["fraud-insights"] + "-sub",
            "--out",
            str(out),
            "--idle-timeout",
            "1",
            *emulator_args(services),
        )
        == 0
    )
    assert out.read_text() == ""
    assert time.monotonic() - started < 60


@pytest.mark.emulator
def test_replay_mixes_in_malformed_messages_of_every_kind_with_their_expected_rule(services, unique_topics, tmp_path):
    sim = tmp_path / "sim.jsonl"
    run_cli("simulate", "--out", str(sim), "--days", "1", "--customers", "30", "--terminals", "60", "--quiet")
    names = unique_topics
    stats = pubsub_tools.replay(
        sim,
        project=services.project,
        transactions_topic=names["transactions"],
        feedback_topic=names["fraud-feedback"],
        malformed_rate=0.5,
        seed=3,
        progress=False,
    )
    assert set(stats.malformed) == set(pubsub_tools.MALFORMED_KINDS)
    messages = collect(
        names["transactions"] + "-sub",
        services.project,
        stats.transactions + sum(stats.malformed.values()),
        timeout_s=60,
    )
    flagged = [m for m in messages if "malformed" in m.attributes]
    assert len(flagged) == sum(stats.malformed.values())
    from rtml import events

    for message in flagged:
        with pytest.raises(events.InvalidMessage) as caught:
            events.parse_transaction(message.data)
        assert caught.value.kind == message.attributes["malformed"]


def test_pacer_follows_rate_and_speedup():
    pacer = pubsub_tools.Pacer(rate=200)
    started = time.monotonic()
    for _ in range(41):
        pacer.wait(0)
    assert time.monotonic() - started >= 0.19
    pacer = pubsub_tools.Pacer(speedup=3600)  # one hour of event time per second
    started = time.monotonic()
    pacer.wait(0)
    pacer.wait(900 * 1_000_000)  # 15 minutes later in event time -> 0.25 s
    assert time.monotonic() - started >= 0.24
    with pytest.raises(ValueError):
        pubsub_tools.Pacer(rate=10, speedup=2)


def test_replay_rejects_a_file_that_is_not_in_replay_format(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "transaction", "event": {}}\n{"nope": 1}\n')
    with pytest.raises(pubsub_tools.ReplayFileError, match="bad.jsonl:2"):
        list(pubsub_tools.read_replay(bad))


def test_services_flags_default_to_the_contract_local_setup(monkeypatch):
    for key in ("PUBSUB_EMULATOR_HOST", "BIGTABLE_EMULATOR_HOST", "PUBSUB_PROJECT_ID"):
        monkeypatch.delenv(key, raising=False)
    args = cli.build_parser().parse_args(["status"])
    assert (args.project, args.instance, args.pubsub_emulator, args.bigtable_emulator) == (
        "rtml-local",
        "rtml-local",
        "localhost:8085",
        "localhost:8086",
    )
    assert config.subscription_for(config.INSIGHTS_TOPIC) == "fraud-insights-sub"


@pytest.mark.emulator
def test_seek_delivers_again_what_the_input_subscriptions_received_since_then(services, unique_topics, capsys):
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    names = unique_topics

    def publish(topic: str, texts: list[str]) -> None:
        for text in texts:
            publisher.publish(config.topic_path(services.project, names[topic]), text.encode()).result()

    def pull_all(topic: str) -> list[str]:
        got = []
        pubsub_tools.pull(names[topic] + "-sub", services.project, idle_timeout=1.5, on_message=lambda m: got.append(m.data.decode()))
        return got

    publish("transactions", ["old-1", "old-2"])
    publish("fraud-feedback", ["old-report"])
    assert pull_all("transactions") == ["old-1", "old-2"] and pull_all("fraud-feedback") == ["old-report"]
    time.sleep(1.5)
    since = time.time_ns() // 1000
    time.sleep(1.5)
    publish("transactions", ["new-1", "new-2"])
    publish("fraud-feedback", ["new-report"])
    assert pull_all("transactions") == ["new-1", "new-2"] and pull_all("fraud-feedback") == ["new-report"]
    assert pull_all("transactions") == []  # all acknowledged
    subscriptions = [names["transactions"] + "-sub", names["fraud-feedback"] + "-sub"]
    to = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since / 1e6)) + f".{since % 1_000_000:06d}Z"
    assert run_cli("seek", "--to", to, "--subscriptions", *subscriptions, *emulator_args(services)) == 0
    assert "delivered again" in capsys.readouterr().out
    assert sorted(pull_all("transactions")) == ["new-1", "new-2"]
    assert pull_all("fraud-feedback") == ["new-report"]
    # an output subscription does not keep acknowledged messages: refused, with the fix named
    insights = names["fraud-insights"] + "-sub"
    assert run_cli("seek", "--minutes-back", "1", "--subscriptions", insights, *emulator_args(services)) == cli.EXIT_USAGE
    assert "--retain-acked-messages" in capsys.readouterr().err
    assert run_cli("seek", "--to", "yesterday", *emulator_args(services)) == cli.EXIT_USAGE
    assert "2026-11-22T10:15:00Z" in capsys.readouterr().err
