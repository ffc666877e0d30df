"""engine/io/report.py (summary line, progress rendering), intercept/exporter.py's queue drops."""

from __future__ import annotations

import io
import logging

from engine.io.report import Progress, final_summary, progress_text, summary_text
from intercept.exporter import QueueDropReader, counters_fn
from intercept.server import new_counters


def test_final_summary_counts_outcomes_fidelity_and_nonzero_drops():
    totals = {
        "ended_closed": 40, "ended_target_reset": 2, "ended_refused": 0, "requests": 120,
        "client_bytes_captured": 8000, "client_bytes_acked": 7960, "drop_pure_ack": 31,
        "drop_no_session": 0, "drop_ring_oversize": 1, "active": 3,
    }  # fmt: skip
    s = final_summary(totals)
    assert s["sessions"] == 42 and s["sessions_by_outcome"] == {"closed": 40, "target_reset": 2}
    assert s["requests_sent"] == 120 and s["fidelity_pct"] == 99.5
    assert s["drops"] == {"pure_ack": 31, "ring_oversize": 1}
    line = summary_text(s)
    assert line == (
        "summary: sessions 42 (closed 40, target_reset 2), 3 still active, requests sent 120, "
        "fidelity 99.50 % (7960 of 8000 client bytes acked), drops: pure_ack 31, ring_oversize 1"
    )


def test_summary_names_spilled_and_reused_client_tuples():
    s = final_summary({"drop_no_tuple": 4, "tuples_spilled": 70000, "tuples_reused": 12})
    assert (s["tuples_spilled"], s["tuples_reused"], s["drops"]) == (70000, 12, {"no_tuple": 4})
    assert summary_text(s).endswith("drops: no_tuple 4, client tuples spilled 70000 reused 12")


def test_summary_without_captured_payload_says_so():
    line = summary_text(final_summary({}))
    assert line == (
        "summary: sessions 0, requests sent 0, fidelity n/a (no client payload captured), "
        "drops: none"
    )


def _totals(read: int, records: int, total: int = 1000) -> dict[str, int]:
    return {"offline_bytes_read": read, "offline_records": records, "offline_bytes_total": total}


def test_progress_on_a_terminal_redraws_with_rate_and_eta():
    out = io.StringIO()
    p = Progress(logging.getLogger("test-progress"), stream=out, tty=True)
    assert p.due(0.0)
    p.update(_totals(0, 0), 10.0)
    assert not p.due(10.2) and p.due(10.5)
    text = p.update(_totals(250, 100), 12.0)  # 50 records/s, 125 bytes/s: 750 bytes left
    assert text == "replay  25.0% | 100 packets read | 0 sessions active | 50 pkt/s | ETA 0:00:06"
    p.finish(_totals(1000, 400), 14.0)
    assert out.getvalue().count("\r\x1b[K") == 3 and out.getvalue().endswith("ETA 0:00:00\n")


def test_progress_without_a_terminal_logs_plain_lines(caplog):
    log = logging.getLogger("test-progress-plain")
    p = Progress(log, stream=io.StringIO(), tty=False, plain_interval_s=2.0)
    with caplog.at_level(logging.INFO, logger=log.name):
        p.update(_totals(0, 0, total=0), 0.0)
        assert not p.due(1.9) and p.due(2.0)
    assert caplog.messages == [
        "progress: replay ?% | 0 packets read | 0 sessions active | ? pkt/s | ETA ?"
    ]
    assert caplog.records[0].progress["percent"] is None


def test_progress_text_of_an_unknown_total():
    fields = {"percent": None, "packets_read": 5, "sessions_active": 1, "rate_pps": None,
              "eta_s": None}  # fmt: skip
    assert (
        progress_text(fields) == "replay ?% | 5 packets read | 1 sessions active | ? pkt/s | ETA ?"
    )


def test_queue_drops_count_from_start_and_never_go_back():
    kernel = iter([100, 103, 101, None, 110])
    reader = QueueDropReader(0, read=lambda q: next(kernel))
    assert reader.dropped() == 3
    assert reader.dropped() == 3  # a lower reading (a re-bound queue) never goes backwards
    assert reader.dropped() is None  # the queue is not listed (any more)
    assert reader.dropped() == 10


def test_scrape_values_take_the_larger_of_loop_and_kernel_counts():
    counters = new_counters()
    counters["queue_dropped"] = 7
    counters["responses_forwarded"] = 5
    kernel = iter([0, 4, 9])
    values = counters_fn(counters, QueueDropReader(0, read=lambda q: next(kernel)))
    first = values()
    assert first["queue_dropped"] == 7 and first["responses_forwarded"] == 5
    assert values()["queue_dropped"] == 9
    assert counters["queue_dropped"] == 7  # the scrape never writes the loop's dict
    assert counters_fn(counters, None)()["queue_dropped"] == 7
