"""Loading sr25519 hotkeys in every accepted form, and refusing the rest without ever
quoting the secret."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
from bittensor import sp_core

from platform_common.keys import (
    KeyLoadError,
    load_hotkey,
    load_signer,
    load_signer_file,
    verify_signature,
)

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
# Substrate's published development phrase; //Alice is derived from it.
DEV_PHRASE = "bottom drive obey lake curtain smoke basket hold race lonely fit walk"
# Alice's published sr25519 mini-secret (seed).
ALICE_SEED = "0xe5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a"


@pytest.mark.parametrize(
    "spec",
    [
        "//Alice",
        f"{DEV_PHRASE}//Alice",
        ALICE_SEED,
        ALICE_SEED.upper().replace("0X", "0x"),
        "  //Alice\n",
    ],
)
def test_every_form_of_alices_key_loads_as_alice(spec: str) -> None:
    assert load_signer(spec).ss58_address == ALICE


def test_a_mnemonic_loads_as_the_sdk_derives_it() -> None:
    mnemonic = sp_core.Keypair.generate_mnemonic(12)
    expected = sp_core.Keypair.from_mnemonic(mnemonic).ss58_address
    assert load_signer(mnemonic).ss58_address == expected
    assert load_signer(DEV_PHRASE).ss58_address != ALICE


def test_a_derivation_path_gives_another_key() -> None:
    assert load_signer("//platform-dev/master").ss58_address != ALICE


def test_signatures_verify_against_the_address_only() -> None:
    signer = load_signer("//platform-dev/master")
    signature = signer.sign(b"message")
    assert len(signature) == 64
    assert verify_signature(signer.ss58_address, b"message", signature)
    assert not verify_signature(signer.ss58_address, b"massage", signature)
    assert not verify_signature(ALICE, b"message", signature)
    assert not verify_signature(signer.ss58_address, b"message", signature[:32])
    with pytest.raises(ValueError, match="ss58"):
        verify_signature("not-an-address", b"message", signature)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "key: empty; expected a secret URI, a mnemonic or a 0x hex seed"),
        ("   \n", "key: empty; expected a secret URI, a mnemonic or a 0x hex seed"),
        (
            "0x1234abcd",
            "key: a hex seed must be 0x followed by 64 hex digits (32 bytes); got 8 digits",
        ),
        (
            "0x" + "zz" * 32,
            "key: the hex seed holds a character that is not a hex digit",
        ),
        (
            "correct horse battery staple",
            "key: not a valid secret URI or BIP39 mnemonic (4 words before any derivation "
            "path; a mnemonic has 12, 15, 18, 21 or 24 words from the BIP39 English list "
            "with a valid checksum)",
        ),
        (
            DEV_PHRASE.replace("walk", "talk") + "//hard",
            "key: not a valid secret URI or BIP39 mnemonic (12 words before any derivation "
            "path; a mnemonic has 12, 15, 18, 21 or 24 words from the BIP39 English list "
            "with a valid checksum)",
        ),
    ],
)
def test_bad_keys_are_refused_without_quoting_them(spec: str, message: str) -> None:
    with pytest.raises(KeyLoadError) as refused:
        load_signer(spec)
    assert str(refused.value) == message


def test_a_signer_shows_only_its_address() -> None:
    signer = load_signer(ALICE_SEED)
    assert repr(signer) == f"Signer({ALICE})"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)


def _key_file(tmp_path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "hotkey"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_key_file_holds_the_key_on_its_first_line(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "//Alice\nnotes the loader ignores\n")
    assert load_signer_file(path).ss58_address == ALICE


def test_a_bittensor_wallet_keyfile_loads(tmp_path: Path) -> None:
    keypair = sp_core.Keypair.from_uri("//Alice")
    path = _key_file(tmp_path, bytes(sp_core.serialized_keypair_to_keyfile_data(keypair)))
    assert load_signer_file(path).ss58_address == ALICE


@pytest.mark.parametrize(
    "data",
    # The headers of the SDK's encrypted keyfile formats (NaCl, Ansible vault); real
    # encryption takes seconds of key stretching and adds nothing here.
    [b"$NACL" + bytes(96), b"$ANSIBLE_VAULT;1.1;AES256\n3132"],
)
def test_an_encrypted_wallet_keyfile_is_refused(tmp_path: Path, data: bytes) -> None:
    assert sp_core.keyfile_data_is_encrypted(data)
    path = _key_file(tmp_path, data)
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(path)
    assert str(refused.value) == (
        f"{path}: the wallet keyfile is encrypted; the master signs unattended, so it needs "
        "an unencrypted hotkey file (or the secret in another form)"
    )


def test_a_public_only_keyfile_is_refused(tmp_path: Path) -> None:
    public = (
        '{"accountId":"0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d",'
        '"publicKey":"0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d",'
        f'"ss58Address":"{ALICE}"}}'
    )
    path = _key_file(tmp_path, public)
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(path)
    assert str(refused.value) == (
        f"{path}: the wallet keyfile holds a public key only; a signing key needs the secret"
    )


def test_a_broken_keyfile_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, '{"secretPhrase": ')
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(path)
    assert str(refused.value) == f"{path}: not a valid Bittensor wallet keyfile"


@pytest.mark.parametrize("mode", [0o604, 0o602, 0o601, 0o644, 0o666, 0o777])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, "//Alice\n", mode)
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(path)
    assert str(refused.value) == (
        f"{path}: permissions {mode:04o} give other users access to the key; allow the "
        "owner only (chmod 600)"
    )


def test_a_group_readable_key_file_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _key_file(tmp_path, "//Alice\n", 0o640)
    with caplog.at_level(logging.WARNING, logger="platform_common.keys"):
        assert load_signer_file(path).ss58_address == ALICE
    [record] = caplog.records
    assert record.getMessage() == (
        "key file is accessible by its group; allow the owner only (chmod 600)"
    )
    assert record.__dict__["mode"] == "0640"


def test_an_owner_only_key_file_loads_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _key_file(tmp_path, "//Alice\n", 0o400)
    with caplog.at_level(logging.DEBUG, logger="platform_common.keys"):
        load_signer_file(path)
    assert caplog.records == []


def test_key_file_errors_name_the_file_not_the_secret(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "correct horse battery staple\n")
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(path)
    assert str(refused.value).startswith(f"{path}: key: not a valid secret URI")
    assert "horse" not in str(refused.value)
    empty = _key_file(tmp_path, "\n\n")
    with pytest.raises(KeyLoadError, match="key: empty"):
        load_signer_file(empty)
    with pytest.raises(KeyLoadError) as refused:
        load_signer_file(tmp_path / "missing")
    assert (
        str(refused.value)
        == f"{tmp_path / 'missing'}: cannot read the key file (No such file or directory)"
    )
    binary = _key_file(tmp_path, b"\xff\xfe\x00")
    with pytest.raises(KeyLoadError, match="not UTF-8 text"):
        load_signer_file(binary)
    huge = _key_file(tmp_path, "x" * 70_000)
    with pytest.raises(KeyLoadError, match="larger than 65536 bytes"):
        load_signer_file(huge)


def test_a_hotkey_comes_from_either_the_environment_or_a_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "//Alice\n")
    for secret, file in ((" //Alice\n", ""), ("", str(path))):
        signer = load_hotkey(secret, file, env="PLATFORM_HOTKEY")
        assert signer is not None
        assert signer.ss58_address == ALICE
    assert load_hotkey("  ", "", env="PLATFORM_HOTKEY") is None


@pytest.mark.parametrize(
    ("secret", "file", "message"),
    [
        ("//Alice", "KEY", "set either PLATFORM_MINER_HOTKEY or --key-file, not both"),
        ("not a key", "", "PLATFORM_MINER_HOTKEY: key: not a valid"),
        ("", "MISSING", "--key-file: MISSING: cannot read the key file"),
    ],
)
def test_a_bad_hotkey_is_refused_naming_its_source(
    tmp_path: Path, secret: str, file: str, message: str
) -> None:
    paths = {"KEY": str(_key_file(tmp_path, "//Alice\n")), "MISSING": str(tmp_path / "missing")}
    with pytest.raises(KeyLoadError) as refused:
        load_hotkey(secret, paths.get(file, ""), env="PLATFORM_MINER_HOTKEY", flag="--key-file")
    assert str(refused.value).startswith(message.replace("MISSING", paths["MISSING"]))
