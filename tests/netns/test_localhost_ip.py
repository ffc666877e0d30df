"""-H live, offline: captured sessions from 127.0.0.1 reach the target from the -H address.

The sessions are captured for real (tcpdump on the online host), then the file's client
source is rewritten to 127.0.0.1 (checksums redone) and replayed with ``-H``.  Only the pcap
file holds 127.0.0.1: everything sent is from the -H address (198.19.0.0/16) to the target.
"""

from __future__ import annotations

import signal
import struct
from pathlib import Path

import pytest

from engine.codec.packet import checksum, ip_from_str, tcp_checksum
from engine.core.rewrite import LOCALHOST_IP
from testbed import netns as tbm
from tests.netns.conftest import SKIP_NO_NETNS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    SKIP_NO_NETNS,
    pytest.mark.usefixtures("programs"),
]

SESSIONS = 50
H_ADDR = "198.19.4.7"
ETHERNET = 1


def rewrite_source(src: Path, dst: Path, old_ip: int, new_ip: int) -> int:
    """Copy a little-endian Ethernet pcap, replacing IPv4 source old_ip by new_ip; the
    number of packets changed."""
    data = src.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic in (0xA1B2C3D4, 0xA1B23C4D) and linktype == ETHERNET, (hex(magic), linktype)
    out = bytearray(data[:24])
    off, changed = 24, 0
    while off + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        frame = bytearray(data[off + 16 : off + 16 + caplen])
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 6:
            ip = 14
            ihl = (frame[ip] & 0x0F) * 4
            total = struct.unpack_from("!H", frame, ip + 2)[0]
            if int.from_bytes(frame[ip + 12 : ip + 16], "big") == old_ip and ip + total <= len(
                frame
            ):
                frame[ip + 12 : ip + 16] = new_ip.to_bytes(4, "big")
                frame[ip + 10 : ip + 12] = b"\0\0"
                frame[ip + 10 : ip + 12] = struct.pack("!H", checksum(frame[ip : ip + ihl]))
                seg = frame[ip + ihl : ip + total]
                seg[16:18] = b"\0\0"
                dst_ip = int.from_bytes(frame[ip + 16 : ip + 20], "big")
                seg[16:18] = struct.pack("!H", tcp_checksum(new_ip, dst_ip, seg))
                frame[ip + ihl : ip + total] = seg
                changed += 1
        out += data[off : off + 16] + frame
        off += 16 + caplen
    dst.write_bytes(bytes(out))
    return changed


@pytest.mark.timeout(240)
def test_localhost_sessions_replay_from_the_h_address(testbed: tbm.Testbed, tmp_path: Path) -> None:
    captured = tmp_path / "captured.pcap"
    dump = testbed.start_tcpdump(captured)
    res = testbed.loadgen("short", "--requests", str(SESSIONS), "--rate", "50", "--prefix", "lh")
    assert res["ok"] == SESSIONS, res
    tbm.wait_until(
        lambda: tbm.summarize_pcap(captured, 80).fins_to_port == SESSIONS,
        20,
        what=f"{SESSIONS} client FINs written by tcpdump",
    )
    assert dump.stop(signal.SIGINT) == 0
    local = tmp_path / "localhost.pcap"
    changed = rewrite_source(captured, local, ip_from_str(tbm.CLIENT_IP), LOCALHOST_IP)
    assert changed >= SESSIONS * 4, changed  # SYN, ACK, request, FIN at least per session

    testbed.set_mode(tbm.TRADITIONAL)
    testbed.start_intercept()
    summary_path = tmp_path / "tcpcopy-offline.json"
    replay = testbed.start_tcpcopy(
        ["--pcap", str(local), "-x", tbm.TRANSFER_HTTP, "-H", H_ADDR],
        name="tcpcopy-offline-h",
        summary=summary_path,
    )
    rc = replay.wait(timeout=120)
    if rc is None:
        replay.stop()
    got = tbm.with_prefix(testbed.access_log("target"), "/lh/")
    assert rc == 0, f"tcpcopy-mp did not exit 0 by itself (rc={rc})\n{replay.tail(30)}"
    assert sorted(r.uri for r in got) == sorted(f"/lh/{i}" for i in range(SESSIONS)), (
        f"{len(got)}/{SESSIONS} replayed\n{replay.tail(30)}"
    )
    assert {r.remote_addr for r in got} == {H_ADDR}
    assert testbed.client_leak_packets() == 0
