"""Feature computation over history, in shards, with the same core as the stream (no Beam here).

The backfill reads replay files, orders every line by publication order (file index, byte
offset of the line), and hashes entities into shards. Each shard is processed here: its events
sorted by publication order, one `CustomerState` or `TerminalState` per entity, exactly as the
streaming DoFns would see them arriving in that order.

Events travel between stages as flat tuples of primitives, which encode far faster than named
tuples (the backfill packs each shard's part into one compressed pickle): a transaction row is
`(file, offset, *Transaction)` and a feedback row is `(file, offset, *Feedback)`; rows sort by
publication order as they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from operator import itemgetter
from typing import NamedTuple

from rtml import events
from rtml.features import CUSTOMER_FEATURES, FEATURE_NAMES, TERMINAL_FEATURES, CustomerState, TerminalState

TX_ROW_LENGTH = 2 + len(events.Transaction._fields)
FB_ROW_LENGTH = 2 + len(events.Feedback._fields)
_TX = {name: 2 + i for i, name in enumerate(events.Transaction._fields)}
_FB_TERMINAL_AT = 2 + events.Feedback._fields.index("terminal_id")


class Rejected(NamedTuple):
    seq: tuple[int, int]
    kind: str
    error: str


def shard_of(entity_id: str, shards: int) -> int:
    return zlib.crc32(entity_id.encode()) % shards


def parse_line(file_index: int, offset: int, line: bytes) -> tuple | Rejected | None:
    """A replay-file line as a transaction or feedback row (validated like a Pub/Sub message).

    The line goes through the same checks as a message body (size, UTF-8, JSON, object), then
    the event through the contract's rules, so a line gets the verdict its event would get.
    """
    if not line.strip():
        return None
    try:
        record = events.decode_object(line)
        kind, event = record.get("kind"), record.get("event")
        if kind not in ("transaction", "feedback") or not isinstance(event, dict):
            return Rejected(
                (file_index, offset),
                "not_replay_line",
                'line: expected {"kind": "transaction"|"feedback", "event": {...}}',
            )
        if kind == "transaction":
            return (file_index, offset, *events.transaction_from_object(event))
        return (file_index, offset, *events.feedback_from_object(event))
    except events.InvalidMessage as err:
        return Rejected((file_index, offset), err.kind, str(err))


def is_transaction(row: tuple) -> bool:
    return len(row) == TX_ROW_LENGTH


def transaction_of(row: tuple) -> events.Transaction:
    return events.Transaction(*row[2:])


def feedback_of(row: tuple) -> events.Feedback:
    return events.Feedback(*row[2:])


def customer_id(row: tuple) -> str:
    return row[_TX["customer_id"]] if is_transaction(row) else row[3]


def terminal_id(row: tuple) -> str:
    return row[_TX["terminal_id"]] if is_transaction(row) else row[_FB_TERMINAL_AT]


class CustomerResult(NamedTuple):
    features: dict[str, tuple]  # transaction_id -> values in CUSTOMER_FEATURES order (first copy only)
    states: dict[str, CustomerState]  # final state per customer
    duplicates: int


def customer_shard(rows: Iterable[tuple]) -> CustomerResult:
    """Run the customer core over one shard's transaction rows in publication order."""
    states: dict[str, CustomerState] = {}
    features: dict[str, tuple] = {}
    duplicates = 0
    tx_id_at, time_at, customer_at, amount_at = (
        _TX["transaction_id"],
        _TX["event_time_us"],
        _TX["customer_id"],
        _TX["amount"],
    )
    for row in sorted(rows):
        state = states.get(row[customer_at])
        if state is None:
            state = states[row[customer_at]] = CustomerState()
        values = state.add(row[tx_id_at], row[time_at], row[amount_at])
        if values is None or row[tx_id_at] in features:  # a duplicate id, here or at another customer
            duplicates += 1
        else:
            features[row[tx_id_at]] = values
    return CustomerResult(features, states, duplicates)


class TerminalResult(NamedTuple):
    features: dict[str, tuple]  # transaction_id -> (transaction row, values in TERMINAL_FEATURES order, label)
    states: dict[str, TerminalState]
    repeats: list[tuple]  # transaction rows of an id this shard had already kept (they still count at their customer)

    def handed_on(self) -> list[tuple]:
        """Every transaction as the customer core takes it (`customer_examples`):
        `(row, terminal values, label)`, and `(row, None, 0)` for a repeat."""
        return [*self.features.values(), *((row, None, 0) for row in self.repeats)]


def terminal_shard(rows: Iterable[tuple]) -> TerminalResult:
    """Run the terminal core over one shard's transactions and feedback in publication order.

    The label of a transaction is its report in force at the end of the input (the latest
    `reported_at` wins, so a retraction clears an earlier report): 1 for fraud, else 0.
    """
    states: dict[str, TerminalState] = {}
    features: dict[str, list] = {}
    repeats: list[tuple] = []
    latest: dict[str, tuple] = {}
    tx_id_at, time_at, amount_at, terminal_at = (
        _TX["transaction_id"],
        _TX["event_time_us"],
        _TX["amount"],
        _TX["terminal_id"],
    )
    for row in sorted(rows):
        is_tx = len(row) == TX_ROW_LENGTH  # `is_transaction` and `terminal_id` inline: called for every row
        state = states.get(row_terminal := row[terminal_at] if is_tx else row[_FB_TERMINAL_AT])
        if state is None:
            state = states[row_terminal] = TerminalState()
        if is_tx:
            values = state.add(row[tx_id_at], row[time_at], row[amount_at])
            if values is not None and row[tx_id_at] not in features:  # the first copy of an id wins
                features[row[tx_id_at]] = [row, values, 0]
            else:
                repeats.append(row)
            continue
        fb = feedback_of(row)
        state.apply_feedback(fb)
        previous = latest.get(fb.transaction_id)
        if previous is None or (fb.reported_at_us, row[:2]) >= previous[:2]:
            latest[fb.transaction_id] = (fb.reported_at_us, row[:2], fb.is_fraud)
    for tx_id, (_, _, is_fraud) in latest.items():
        if is_fraud and tx_id in features:
            features[tx_id][2] = 1
    return TerminalResult({tx_id: tuple(value) for tx_id, value in features.items()}, states, repeats)


def customer_examples(items: Iterable[tuple]) -> tuple[CustomerResult, ExampleColumns]:
    """Run the customer core over one shard's transactions, then join: the examples of the
    transactions both cores kept.

    `items` are `(transaction row, terminal values or None, label)` as the terminal core left
    them: every transaction row of the shard's customers, None for a repeat it did not keep (a
    repeat still reaches the customer's state, as in the stream). Where both cores kept copies
    of one id, the earliest published copy the terminal core kept is joined.
    """
    ordered = sorted(items, key=lambda item: item[0][:2])
    result = customer_shard(item[0] for item in ordered)
    terminal: dict[str, tuple] = {}
    tx_id_at = _TX["transaction_id"]
    for item in ordered:
        if item[1] is not None and item[0][tx_id_at] not in terminal:
            terminal[item[0][tx_id_at]] = item
    return result, join(result.features, terminal)


class ExampleColumns(NamedTuple):
    """Training examples of one shard as columns, sorted by event time."""

    transaction_id: list[str]
    customer_id: list[str]
    terminal_id: list[str]
    event_time: list[str]
    event_time_us: list[int]
    label: list[int]
    features: dict[str, list[float]]  # FEATURE_NAMES -> values

    def __len__(self) -> int:
        return len(self.transaction_id)

    def rows(self) -> list[dict]:
        """One dict per example (for tests and small outputs)."""
        out = []
        for i in range(len(self)):
            row = {name: getattr(self, name)[i] for name in self._fields if name != "features"}
            row.update({name: values[i] for name, values in self.features.items()})
            out.append(row)
        return out


def join(customer: dict[str, tuple], terminal: dict[str, tuple]) -> ExampleColumns:
    """Columns of the examples of transactions known to both cores, sorted by event time.

    Built a column at a time, each with `map` and `itemgetter` (a loop in C), which takes a
    fraction of the time of appending each example's 21 values one by one. (Transposing with
    `zip(*rows)` is as fast only with the cyclic garbage collector off: its hundred thousand
    argument iterators set off collections that walk the whole shard.)
    """
    from rtml.features import during_night, during_weekend

    joined = sorted(
        (value[0][_TX["event_time_us"]], tx_id, value) for tx_id, value in terminal.items() if tx_id in customer
    )

    def column(source: list, at: int) -> list:
        return list(map(itemgetter(at), source))

    times, ids, values = column(joined, 0), column(joined, 1), column(joined, 2)
    rows, terminal_values = column(values, 0), column(values, 1)
    customer_values = list(map(customer.__getitem__, ids))
    features = {
        "amount": list(map(float, column(rows, _TX["amount"]))),
        "tx_during_weekend": list(map(during_weekend, times)),
        "tx_during_night": list(map(during_night, times)),
    }
    features.update((name, column(customer_values, k)) for k, name in enumerate(CUSTOMER_FEATURES))
    features.update((name, column(terminal_values, k)) for k, name in enumerate(TERMINAL_FEATURES))
    return ExampleColumns(
        ids,
        column(rows, _TX["customer_id"]),
        column(rows, _TX["terminal_id"]),
        column(rows, _TX["event_time"]),
        times,
        column(values, 2),
        {name: features[name] for name in FEATURE_NAMES},
    )
