"""engine/codec/wire.py: the extended (authenticated) intercept handshake, design §6,
docs/protocol.md.

Golden vectors are computed here with ``hmac``/``hashlib`` directly from the documented
layout, not with the module's own helpers.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.codec import wire
from engine.codec.wire import (
    EXT_HELLO,
    REFUSE_BAD_PROOF,
    REFUSE_MALFORMED,
    REFUSE_NO_SECRET,
    REFUSE_VERSION,
    ClientRecord,
    ClientStreamDecoder,
    ExtendedClientHandshake,
    HandshakeRefused,
    InterceptStreamDecoder,
    ProofMismatch,
    client_add,
)
from engine.errors import DecodeError

SECRET = b"correct horse battery staple 42"
SN = bytes(range(32))  # server nonce
CN = bytes(range(100, 132))  # client nonce
ADD = client_add(0xC6130105, 40000, 0xC6120203, 8080)
ADD_REC = ClientRecord(0xC6130105, 40000, wire.TYPE_CLIENT_ADD, 0xC6120203, 8080)


def mac(secret: bytes, context: bytes, sn: bytes = SN, cn: bytes = CN) -> bytes:
    return hmac.new(secret, sn + cn + context, hashlib.sha256).digest()


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- byte layout (docs/protocol.md) ----------------------------------------------------------


def test_hello_bytes_and_golden_exchange() -> None:
    assert bytes.fromhex("00000000 0000 4558 54434d50 0001") == EXT_HELLO
    challenge = b"TCMP" + bytes([1, 1, 0, 0]) + SN
    proof = b"TCMP" + bytes([2, 0, 0, 0]) + CN + mac(SECRET, b"tcpcopy-mp ext1 tcpcopy proof")
    accept = b"TCMP" + bytes([3, 0, 0, 0]) + mac(SECRET, b"tcpcopy-mp ext1 intercept proof")
    assert (len(challenge), len(proof), len(accept)) == (40, 72, 40)

    server = InterceptStreamDecoder(SECRET, SN)
    client = ExtendedClientHandshake(SECRET, CN)
    assert server.feed(client.hello) == [] and server.mode == "extended"
    assert server.take_output() == challenge
    assert client.feed(challenge) == proof
    assert not client.done
    assert server.feed(proof + ADD) == [ADD_REC]
    assert server.handshake_done and server.client_nonce == CN and server.refused is None
    assert server.take_output() == accept
    frame = wire.encode_frame([bytes(64)])
    assert client.feed(accept + frame) == b""
    assert client.done and client.take_leftover() == frame
    assert wire.encode_refuse(REFUSE_BAD_PROOF) == b"TCMP" + bytes([4, 1, 0, 0]) + bytes(32)


def test_the_two_proofs_differ_so_one_cannot_be_reflected() -> None:
    # A fake intercept that echoes the client's own MAC back as its ACCEPT is caught.
    client = ExtendedClientHandshake(SECRET, CN)
    proof = client.feed(wire.encode_challenge(SN))
    echoed = wire.encode_accept(proof[40:72])
    with pytest.raises(ProofMismatch):
        client.feed(echoed)
    with pytest.raises(ProofMismatch):  # sticky
        client.feed(b"")


def test_a_c_intercept_reads_the_hello_as_a_version_record() -> None:
    # Spec §1.2: C reads 8 bytes (ip/port zero: not an old client), only warns on the version,
    # then reads the other 6 and takes 14-byte records: our compat decoder models exactly that.
    dec = ClientStreamDecoder()
    assert dec.feed(EXT_HELLO + ADD) == [ADD_REC]
    assert dec.version == wire.EXT_HELLO_TYPE != wire.INTERNAL_VERSION


def test_client_rejects_what_a_c_intercept_would_send() -> None:
    client = ExtendedClientHandshake(SECRET, CN)
    frame = wire.encode_frame([bytes(64)])
    with pytest.raises(DecodeError, match="not an extended intercept"):
        client.feed(frame)
    assert not client.done


def test_client_rejects_other_version_and_unexpected_kinds() -> None:
    challenge_v2 = wire.EXT_SERVER_MSG.pack(b"TCMP", wire.EXT_KIND_CHALLENGE, 2, 0, SN)
    with pytest.raises(DecodeError, match="version 2"):
        ExtendedClientHandshake(SECRET, CN).feed(challenge_v2)
    with pytest.raises(DecodeError, match="kind 3"):
        ExtendedClientHandshake(SECRET, CN).feed(wire.encode_accept(bytes(32)))
    client = ExtendedClientHandshake(SECRET, CN)
    client.feed(wire.encode_challenge(SN))
    with pytest.raises(DecodeError, match="kind 1"):
        client.feed(wire.encode_challenge(SN))


@pytest.mark.parametrize("code", [REFUSE_BAD_PROOF, REFUSE_NO_SECRET, REFUSE_VERSION, 77])
def test_client_reports_refusal_code(code: int) -> None:
    client = ExtendedClientHandshake(SECRET, CN)
    with pytest.raises(HandshakeRefused) as info:
        client.feed(wire.encode_refuse(code))
    assert info.value.code == code
    assert "refused" in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ExtendedClientHandshake(b"", CN)
    with pytest.raises(ValueError):
        ExtendedClientHandshake(SECRET, CN[:31])
    with pytest.raises(ValueError):
        InterceptStreamDecoder(b"", SN)
    with pytest.raises(ValueError):
        InterceptStreamDecoder(SECRET, SN + b"x")


# --- intercept side: who gets in -------------------------------------------------------------


def test_wrong_secret_refused_and_nothing_routed() -> None:
    server = InterceptStreamDecoder(SECRET, SN)
    client = ExtendedClientHandshake(b"another secret entirely", CN)
    server.feed(client.hello)
    proof = client.feed(server.take_output())
    assert server.feed(proof + ADD) == []
    assert server.refused and server.refuse_code == REFUSE_BAD_PROOF
    assert not server.handshake_done
    refusal = server.take_output()
    assert refusal == wire.encode_refuse(REFUSE_BAD_PROOF)
    assert server.feed(ADD * 3) == []  # ignored after the refusal
    with pytest.raises(HandshakeRefused) as info:
        client.feed(refusal)
    assert info.value.code == REFUSE_BAD_PROOF


def test_extended_hello_without_a_secret_here_is_refused() -> None:
    server = InterceptStreamDecoder(None, SN)
    assert server.feed(EXT_HELLO) == []
    assert server.refuse_code == REFUSE_NO_SECRET
    assert server.take_output() == wire.encode_refuse(REFUSE_NO_SECRET)


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (wire.CLIENT_RECORD.pack(0, 0, wire.EXT_HELLO_TYPE, 0x41424344, 1), REFUSE_MALFORMED),
        (wire.CLIENT_RECORD.pack(0, 0, wire.EXT_HELLO_TYPE, 0x54434D50, 2), REFUSE_VERSION),
    ],
)
def test_bad_hello_refused_with_code(hello: bytes, code: int) -> None:
    server = InterceptStreamDecoder(SECRET, SN)
    assert server.feed(hello) == []
    assert server.refuse_code == code
    assert server.take_output() == wire.encode_refuse(code)


def test_garbage_instead_of_proof_is_malformed() -> None:
    server = InterceptStreamDecoder(SECRET, SN)
    server.feed(EXT_HELLO)
    server.take_output()
    server.feed(b"\x00" * 72)
    assert server.refuse_code == REFUSE_MALFORMED
    assert server.take_output() == wire.encode_refuse(REFUSE_MALFORMED)


def test_compat_peer_needs_allow_compat_when_a_secret_is_set() -> None:
    refused = InterceptStreamDecoder(SECRET, SN)
    assert refused.feed(wire.HANDSHAKE + ADD) == []
    assert refused.mode == "compat" and refused.refused and refused.refuse_code is None
    assert refused.take_output() == b""  # a C tcpcopy could not read a refusal anyway

    allowed = InterceptStreamDecoder(SECRET, SN, allow_compat=True)
    assert allowed.feed(wire.HANDSHAKE + ADD) == [ADD_REC]
    assert allowed.mode == "compat" and allowed.version == wire.INTERNAL_VERSION
    assert allowed.take_output() == b""


def test_without_a_secret_everything_compat_is_as_before() -> None:
    server = InterceptStreamDecoder(None, SN)
    hs5 = wire.CLIENT_RECORD.pack(0, 0, 5, 0xDEADBEEF, 7)
    assert server.feed(hs5[:13]) == [] and server.version is None
    assert server.feed(hs5[13:] + ADD) == [ADD_REC]
    assert server.version == 5 and server.handshake_done
    with pytest.raises(DecodeError, match="too old"):
        InterceptStreamDecoder(None, SN).feed(ADD)
    with pytest.raises(DecodeError, match="too old"):
        InterceptStreamDecoder(SECRET, SN).feed(ADD)


def test_records_pipelined_after_the_proof_wait_for_verification() -> None:
    server = InterceptStreamDecoder(SECRET, SN)
    client = ExtendedClientHandshake(SECRET, CN)
    server.feed(client.hello)
    proof = client.feed(server.take_output())
    stream = proof + ADD + ADD[:5]
    for i in range(len(proof) - 1):
        assert server.feed(stream[i : i + 1]) == []
    assert server.feed(stream[len(proof) - 1 :]) == [ADD_REC]
    assert server.pending_bytes == 5


# --- any split, any bytes ----------------------------------------------------------------------

secrets_st = st.binary(min_size=1, max_size=64)
nonces = st.binary(min_size=32, max_size=32)
records_st = st.lists(
    st.builds(
        ClientRecord,
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
    ),
    max_size=8,
)


def exchange(server, client, rng, records_after=b"", frames_after=b""):
    """Run the handshake over dribbled byte streams; returns (records, client leftover)."""
    got: list[ClientRecord] = []
    for part in splits(client.hello, rng):
        got += server.feed(part)
    to_client = server.take_output()
    proof = b""
    for part in splits(to_client, rng):
        proof += client.feed(part)
    for part in splits(proof + records_after, rng):
        got += server.feed(part)
    answer = server.take_output() + frames_after
    if answer:
        for part in splits(answer, rng):
            client.feed(part)
    return got, client.take_leftover() if client.done else b""


@settings(max_examples=150)
@given(secrets_st, nonces, nonces, records_st, st.randoms(use_true_random=False))
def test_same_secret_roundtrip_any_split(secret, sn, cn, records, rng) -> None:
    server = InterceptStreamDecoder(secret, sn)
    client = ExtendedClientHandshake(secret, cn)
    stream = b"".join(wire.encode_client_record(r) for r in records)
    frames = wire.encode_frame([bytes(64)] * 2)
    got, leftover = exchange(server, client, rng, stream, frames)
    assert client.done and server.handshake_done and server.mode == "extended"
    assert got == records and leftover == frames


@settings(max_examples=100)
@given(secrets_st, secrets_st, nonces, nonces, st.randoms(use_true_random=False))
def test_different_secrets_never_open(secret_a, secret_b, sn, cn, rng) -> None:
    server = InterceptStreamDecoder(secret_a, sn)
    client = ExtendedClientHandshake(secret_b, cn)
    # HMAC zero-pads keys up to its 64-byte block, so b"k" and b"k\0" are the same key.
    assume(secret_a.rstrip(b"\0") != secret_b.rstrip(b"\0"))
    with pytest.raises(HandshakeRefused):
        exchange(server, client, rng, ADD)
    assert server.refuse_code == REFUSE_BAD_PROOF and not server.handshake_done


def outcome(feed_parts, decoder) -> tuple:
    recs: list = []
    try:
        for part in feed_parts:
            recs += decoder.feed(part)
    except DecodeError as e:
        return ("error", type(e), str(e))
    return ("ok", recs, decoder.take_output(), decoder.refuse_code, decoder.mode)


@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=150).map(lambda b: EXT_HELLO + b),
    ),
    st.booleans(),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_intercept_decoder_any_bytes_any_split(data, with_secret, allow_compat, rng) -> None:
    secret = SECRET if with_secret else None
    whole = outcome([data], InterceptStreamDecoder(secret, SN, allow_compat))
    parts = splits(data, rng) if len(data) > 1 else [data]
    assert outcome(parts, InterceptStreamDecoder(secret, SN, allow_compat)) == whole


@given(
    st.one_of(
        st.binary(max_size=150),
        st.binary(max_size=120).map(lambda b: b"TCMP" + b),
        st.binary(max_size=80).map(lambda b: wire.encode_challenge(SN) + b"TCMP" + b),
    ),
    st.randoms(use_true_random=False),
)
def test_client_handshake_any_bytes_any_split(data, rng) -> None:
    def run(parts: list[bytes]) -> tuple:
        client = ExtendedClientHandshake(SECRET, CN)
        sent = b""
        try:
            for part in parts:
                sent += client.feed(part)
        except DecodeError as e:
            return ("error", type(e), str(e), sent)
        return ("ok", sent, client.done, client.take_leftover())

    whole = run([data])
    assert run(splits(data, rng) if len(data) > 1 else [data]) == whole


def test_layout_structs() -> None:
    assert wire.EXT_SERVER_MSG.size == 40 and wire.EXT_PROOF_MSG.size == 72
    assert struct.unpack("!IHHIH", EXT_HELLO) == (0, 0, 0x4558, 0x54434D50, 1)
