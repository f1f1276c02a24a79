"""Plain single-process Python: the reference features over a replay file, no Beam.

The baseline the backfill benchmark compares against: read each line, validate it with the
same contract rules, and run the same feature core per entity in file order.
"""

import json
import sys
import time

from rtml import events
from rtml.features import CustomerState, TerminalState, features_for


def plain_features(path: str) -> dict:
    customers: dict[str, CustomerState] = {}
    terminals: dict[str, TerminalState] = {}
    counts = {"transactions": 0, "feedback": 0, "duplicates": 0}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == "transaction":
                tx = events.transaction_from_object(record["event"])
                customer = customers.get(tx.customer_id)
                if customer is None:
                    customer = customers[tx.customer_id] = CustomerState()
                terminal = terminals.get(tx.terminal_id)
                if terminal is None:
                    terminal = terminals[tx.terminal_id] = TerminalState()
                if features_for(tx, customer, terminal) is None:
                    counts["duplicates"] += 1
                counts["transactions"] += 1
            else:
                fb = events.feedback_from_object(record["event"])
                terminal = terminals.get(fb.terminal_id)
                if terminal is None:
                    terminal = terminals[fb.terminal_id] = TerminalState()
                terminal.apply_feedback(fb)
                counts["feedback"] += 1
    return counts


if __name__ == "__main__":
    started = time.monotonic()
    counts = plain_features(sys.argv[1])
    counts["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(counts))
