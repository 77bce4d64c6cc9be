"""SS58 addresses: agreement with the Bittensor SDK's own keys, and each refusal reason."""

from __future__ import annotations

import hashlib

import pytest
from bittensor.sp_core import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st

from platform_common import ss58

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _raw_address(body: bytes) -> str:
    """Base58 of ``body`` + its SS58 checksum, whatever the prefix (to forge other formats)."""
    checksum = hashlib.blake2b(b"SS58PRE" + body, digest_size=64).digest()[:2]
    return ss58._b58encode(body + checksum)


def _swap_last(address: str) -> str:
    return address[:-1] + ("A" if address[-1] != "A" else "B")


@pytest.mark.parametrize("keypair", [ALICE, BOB], ids=["alice", "bob"])
def test_sdk_addresses_are_valid_and_round_trip(keypair: Keypair) -> None:
    address = keypair.ss58_address
    assert ss58.check(address) is None
    assert ss58.is_valid(address)
    assert ss58.decode(address) == keypair.public_key
    assert ss58.encode(keypair.public_key) == address


def test_sdk_mnemonic_keys_agree() -> None:
    for _ in range(5):
        keypair = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        assert ss58.encode(keypair.public_key) == keypair.ss58_address
        assert ss58.decode(keypair.ss58_address) == keypair.public_key


@given(st.binary(min_size=32, max_size=32))
@settings(max_examples=200, deadline=None)
def test_any_key_round_trips_through_the_pure_path(key: bytes) -> None:
    address = ss58.encode(key)
    assert ss58._check_uncached(address) is None
    assert ss58.decode(address) == key


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("", "not base58"),
        (ALICE.ss58_address[:-1] + "0", "not base58"),  # '0' is not in the alphabet
        (ALICE.ss58_address[:10] + "l" + ALICE.ss58_address[11:], "not base58"),
        ("5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNeh\u00e9XCPcNoHGKutQY", "not base58"),
        ("5GrwvaEF", "wrong length"),
        ("1" * 200, "wrong length"),
        (ALICE.ss58_address + "1", "wrong length"),  # one more (zero) byte
        (_raw_address(bytes([42]) + ALICE.public_key + b"\x00"), "wrong length"),
        (_raw_address(bytes([0]) + ALICE.public_key), "address format 0, expected 42"),
        (_raw_address(bytes([2]) + ALICE.public_key), "address format 2, expected 42"),
        (
            # Two-byte prefix 0b01xxxxxx: format 1000 in the SS58 layout.
            _raw_address(bytes([0x7A, 0x03]) + ALICE.public_key),
            "address format 1000, expected 42",
        ),
        (_raw_address(bytes([200]) + ALICE.public_key), "reserved address prefix"),
        (_swap_last(ALICE.ss58_address), "bad checksum"),
    ],
)
def test_each_refusal_reason(address: str, reason: str) -> None:
    assert ss58.check(address) == reason
    assert ss58._check_uncached(address) == reason
    assert not ss58.is_valid(address)
    with pytest.raises(ValueError, match="not a valid SS58 address"):
        ss58.decode(address)


def test_polkadot_address_of_the_same_key_is_refused_by_format() -> None:
    polkadot = ss58.encode(ALICE.public_key, ss58_format=0)
    assert polkadot != ALICE.ss58_address
    assert ss58.check(polkadot) == "address format 0, expected 42"


@given(st.integers(min_value=0, max_value=47), st.sampled_from(ALPHABET))
@settings(max_examples=200, deadline=None)
def test_any_single_character_change_is_refused(position: int, char: str) -> None:
    address = ALICE.ss58_address
    changed = address[:position] + char + address[position + 1 :]
    if changed != address:
        assert ss58.check(changed) is not None


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="32 bytes; got 31"):
        ss58.encode(bytes(31))
    with pytest.raises(ValueError, match=r"formats 0\.\.63"):
        ss58.encode(bytes(32), ss58_format=64)


def test_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ss58, "_CACHE_LIMIT", 64)
    monkeypatch.setattr(ss58, "_valid_cache", {})
    keys = [hashlib.sha256(str(i).encode()).digest() for i in range(200)]
    for key in keys:
        assert ss58.check(ss58.encode(key)) is None
    assert len(ss58._valid_cache) <= 64
    # The newest stay; a forgotten address is simply checked again.
    assert ss58.encode(keys[-1]) in ss58._valid_cache
    assert ss58.check(ss58.encode(keys[0])) is None
