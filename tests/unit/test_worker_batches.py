"""engine/proc/worker.py hands each drain to the sender as one batch and the channels as one
announce batch, routes before packets (spec §1.2); the offline pcap run of
test_io_worker.py with batch-capable fakes."""

from __future__ import annotations

from collections import Counter

from engine.core.config import ReplayConfig, SessionConfig
from engine.io.capture import PcapFileSource, ReplayPacer, TransferFilter
from engine.proc.worker import Worker
from tests.unit.test_io_worker import ONLINE, PCAP, FakeChannels, FakeSender, FakeTable


class BatchSender(FakeSender):
    def __init__(self, log):
        super().__init__(log)
        self.batches: list[int] = []

    def send_batch(self, packets):
        self.batches.append(len(packets))
        for p in packets:
            self.send(p)
        return len(packets)


class BatchChannels(FakeChannels):
    def __init__(self, log):
        super().__init__(log)
        self.batches: list[int] = []

    def announce_batch(self, routes, now):
        self.batches.append(len(routes))
        for r in routes:
            self.announce(r, now)
        return len(routes)


def test_each_drain_is_one_send_batch_and_one_announce_batch():
    flt = TransferFilter(lambda ip, port: object() if (ip, port) == ONLINE else None)
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1.0), 1, flt)
    cfg = ReplayConfig(session=SessionConfig(), intercepts=(("198.18.2.4", 36524),))
    log: list[tuple[str, int]] = []
    sender = BatchSender(log)
    chans: list[BatchChannels] = []

    def make_channels(sel, on_records):
        chans.append(BatchChannels(log))
        return chans[0]

    table = FakeTable()
    worker = Worker(cfg, table, [src], sender, channels=make_channels, memory_rss=lambda: 0)
    try:
        assert worker.run() == 0
    finally:
        worker.close()
    sent = [port for kind, port in log if kind == "pkt"]
    assert sum(sender.batches) == len(sent) == src.counters["offline_packets"]
    assert 0 not in sender.batches and 0 not in chans[0].batches  # empty drains send nothing
    assert sum(chans[0].batches) == table.counters["syn cnt"] == 25
    for i, (kind, port) in enumerate(log):
        if kind == "route":
            assert ("pkt", port) not in log[:i]
    assert Counter(sender.counters)["send_packets"] == len(sent)


class BatchOnlyTable:
    """A table with the batch calls only: any per-packet call fails the test."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.packets = 0
        self.active = 0
        self.unsend = 0
        self.pending: list[bytes] = []

    def receive_client_ips(self, buf, offsets, lengths, n, now):
        self.calls["receive_client_ips"] += 1
        self.packets += n
        self.pending += [bytes(buf[offsets[i] : offsets[i] + lengths[i]]) for i in range(n)]
        return 0

    def receive_ring(self, *args):
        raise AssertionError("no ring here")

    def receive_records(self, buf, now, record_bytes=64):
        self.calls["receive_records"] += 1
        return len(buf)

    def drain_into(self, sendbuf):
        self.calls["drain_into"] += 1
        out, self.pending = self.pending[:3], self.pending[3:]  # a small buffer: several calls
        off = 0
        for i, p in enumerate(out):
            sendbuf.data[off : off + len(p)] = p
            sendbuf.lengths[i] = len(p)
            off += len(p)
        return [], len(out)

    def get_timer(self):
        return None

    def handle_timer(self, now):
        pass

    def __getattr__(self, name):
        raise AssertionError(f"the worker called table.{name}")


def test_the_worker_makes_batch_calls_only_one_per_source_batch():
    flt = TransferFilter(lambda ip, port: object() if (ip, port) == ONLINE else None)
    src = PcapFileSource([str(PCAP)], ReplayPacer(accelerate=1.0), 1, flt)
    cfg = ReplayConfig(session=SessionConfig(), intercepts=(("198.18.2.4", 36524),))
    log: list[tuple[str, int]] = []
    sender = BatchSender(log)
    table = BatchOnlyTable()
    batches: list[int] = []
    read_batch = src.read_batch

    def counted(now):
        items = read_batch(now)
        if items:
            batches.append(len(items))
        return items

    src.read_batch = counted  # type: ignore[method-assign]
    worker = Worker(
        cfg, table, [src], sender, channels=lambda s, r: BatchChannels(log), memory_rss=lambda: 0
    )
    try:
        assert worker.run() == 0
    finally:
        worker.close()
    assert table.calls["receive_client_ips"] == len(batches) > 0
    assert table.packets == sum(batches) == src.counters["offline_packets"]
    # Every packet went out, in order, from the send buffer (several drain_into per drain).
    assert [port for kind, port in log if kind == "pkt"] and sum(sender.batches) == table.packets
