"""The authenticated (extended) intercept channel end to end: tcpcopy-mp and intercept-mp with
``--secret-file`` in the shared testbed (real nginx, NFQUEUE intercept), design §6.

Same secret: replication works (requests reach the target nginx) and intercept-mp's
--summary-json counts the authenticated channels.  Different secrets: tcpcopy-mp logs the
refusal and keeps retrying, nothing is routed (no request reaches the target), and
intercept-mp counts the refusals.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

REQUESTS = 5
DEADLINE_S = 60.0
# How long requests sent while the secrets differ are given to show up at the target (they
# must not); replication of a request takes milliseconds when the channel works.
NOTHING_ARRIVES_S = 5.0


def secret_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def start(
    tb: tbm.Testbed, tmp_path: Path, intercept_secret: Path, tcpcopy_secret: Path
) -> tuple[tbm.Proc, tbm.Proc, Path]:
    tb.set_mode(tbm.TRADITIONAL)
    summary = tmp_path / "intercept-summary.json"
    # -b: listen on the target's address only (the flag is exercised in a real run too).
    intercept = tb.start_intercept(
        extra=["--secret-file", str(intercept_secret), "-b", tbm.TARGET_IP], summary=summary
    )
    tcpcopy = tb.start_tcpcopy(
        ["-x", tbm.TRANSFER_HTTP, "-c", "198.19.1.x", "--secret-file", str(tcpcopy_secret)],
        summary=tmp_path / "tcpcopy-summary.json",
    )
    return intercept, tcpcopy, summary


def send_requests(tb: tbm.Testbed, prefix: str) -> None:
    for i in range(REQUESTS):
        status, _ = tbm.http_get(tb.ns("client"), tbm.ONLINE_CLIENT_SIDE_IP,
                                 tbm.ONLINE_HTTP_PORT, f"{prefix}{i}")  # fmt: skip
        assert status == 200


def stop_both(intercept: tbm.Proc, tcpcopy: tbm.Proc, summary: Path) -> dict:
    assert tcpcopy.stop(signal.SIGTERM, timeout=20) == 0, tcpcopy.tail()
    assert intercept.stop(signal.SIGTERM, timeout=20) == 0, intercept.tail()
    values = tbm.read_summary(summary)
    assert values is not None, intercept.tail()
    return values


@pytest.mark.timeout(180)
def test_same_secret_replicates(testbed: tbm.Testbed, tmp_path: Path) -> None:
    shared = secret_file(tmp_path, "secret", "Z3bq8nS2sWJ4y0tQ5PpX1r7mK9cV6dLh")
    intercept, tcpcopy, summary = start(testbed, tmp_path, shared, shared)
    testbed.wait_replicating(tcpcopy)
    send_requests(testbed, "/auth/")
    seen = testbed.wait_target_count("/auth/", REQUESTS, timeout=DEADLINE_S)
    values = stop_both(intercept, tcpcopy, summary)
    assert seen == REQUESTS, tcpcopy.tail()
    assert values["auth_ok"] >= 1 and values["routes_added"] >= REQUESTS, values
    assert (values["auth_refused"], values["compat_refused"], values["compat_accepted"]) == (
        0,
        0,
        0,
    ), values
    assert "refused" not in tcpcopy.output()


@pytest.mark.timeout(180)
def test_different_secrets_route_nothing_and_count_the_refusal(
    testbed: tbm.Testbed, tmp_path: Path
) -> None:
    ours = secret_file(tmp_path, "intercept-secret", "intercept-side-secret-0123456789")
    theirs = secret_file(tmp_path, "tcpcopy-secret", "tcpcopy-side-secret-9876543210ab")
    intercept, tcpcopy, summary = start(testbed, tmp_path, ours, theirs)
    expected_line = f"intercept {tbm.TARGET_IP}:{tbm.INTERCEPT_PORT} refused our secret"
    tbm.wait_until(lambda: expected_line in tcpcopy.output(), DEADLINE_S,
                   what="tcpcopy-mp logging the refusal")  # fmt: skip
    send_requests(testbed, "/noauth/")
    seen = testbed.wait_target_count("/noauth/", 1, timeout=NOTHING_ARRIVES_S)
    assert tcpcopy.alive(), tcpcopy.tail()  # a refusal is retried, never fatal
    values = stop_both(intercept, tcpcopy, summary)
    assert seen == 0, testbed.access_log("target")
    assert values["auth_refused"] >= 1 and values["auth_ok"] == 0, values
    assert values["routes_added"] == 0 and values["responses_forwarded"] == 0, values
    assert f"refused tcpcopy {tbm.ONLINE_SERVER_SIDE_IP}:" in intercept.output()
    assert "wrong secret (HMAC does not verify)" in intercept.output()
