"""sr25519 hotkeys: loading a signing key, signing, verifying against an SS58 address.

The cryptography is the Bittensor SDK's own (``bittensor.sp_core``, the chain's sp-core),
so what verifies here verifies wherever the chain's rules apply.

A key is given as one of (see docs/weights.md):

* a secret URI: ``//Alice``, ``//platform-dev/master``, or a mnemonic followed by a
  derivation path (``<mnemonic>//hard/soft``, ``<mnemonic>///password``);
* a BIP39 mnemonic (12 to 24 words);
* a 32-byte seed as ``0x`` followed by 64 hex digits;
* in a file only: a Bittensor wallet keyfile (the unencrypted JSON the SDK writes for
  hotkeys, ``~/.bittensor/wallets/<wallet>/hotkeys/<name>``).

No message, log line or repr produced here contains secret material.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

from bittensor import sp_core

SIGNATURE_BYTES = 64
SEED_BYTES = 32
MAX_KEY_FILE_BYTES = 64 * 1024

_log = logging.getLogger(__name__)


class KeyLoadError(ValueError):
    """A key could not be loaded; the message says why without quoting the secret."""


class Signer:
    """An sr25519 keypair that signs messages. Made by :func:`load_signer` or
    :func:`load_signer_file`; only the address and public key are ever shown."""

    __slots__ = ("_keypair", "public_key", "ss58_address")

    def __init__(self, keypair: Any) -> None:
        self._keypair = keypair
        self.ss58_address: str = str(keypair.ss58_address)
        self.public_key: bytes = bytes(keypair.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte sr25519 signature of ``message`` (randomized: two signatures of
        the same message differ, and both verify)."""
        return bytes(self._keypair.sign(message))

    @property
    def keypair(self) -> Any:
        """The SDK keypair, for SDK calls that sign themselves (e.g. ``bt.http_auth.sign``)."""
        return self._keypair

    def __repr__(self) -> str:
        return f"Signer({self.ss58_address})"

    def __reduce__(self) -> Any:
        # Pickling would copy the secret key into whatever stores the pickle.
        raise TypeError("a Signer cannot be pickled")


def verify_signature(ss58_address: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is an sr25519 signature of exactly ``message`` by the key of
    ``ss58_address``.

    False for a signature that is not 64 bytes. Raises ValueError when ``ss58_address``
    is not a valid SS58 address (a caller's configuration error, not a bad signature).
    """
    if len(signature) != SIGNATURE_BYTES:
        return False
    if not _sdk_verify(message, signature, ss58_address):
        return False
    # The SDK also accepts a signature over b"<Bytes>" + message + b"</Bytes>" (the
    # wrapping wallet extensions apply). Refuse that form, so that a signature is valid
    # for one byte string only.
    return not _sdk_verify(b"<Bytes>" + message + b"</Bytes>", signature, ss58_address)


def _sdk_verify(message: bytes, signature: bytes, ss58_address: str) -> bool:
    return bool(sp_core.verify(message, signature, ss58_address, sp_core.CRYPTO_SR25519))


def load_signer(spec: str) -> Signer:
    """A signer from a secret URI, a BIP39 mnemonic or a ``0x`` hex seed of 32 bytes.

    Surrounding whitespace is ignored. Raises :class:`KeyLoadError`.
    """
    text = spec.strip()
    if not text:
        raise KeyLoadError("key: empty; expected a secret URI, a mnemonic or a 0x hex seed")
    if text[:2].lower() == "0x":
        digits = text[2:]
        if len(digits) != 2 * SEED_BYTES:
            raise KeyLoadError(
                f"key: a hex seed must be 0x followed by {2 * SEED_BYTES} hex digits "
                f"({SEED_BYTES} bytes); got {len(digits)} digits"
            )
        try:
            seed = bytes.fromhex(digits)
        except ValueError:
            raise KeyLoadError(
                "key: the hex seed holds a character that is not a hex digit"
            ) from None
        return Signer(sp_core.Keypair.from_seed(seed, sp_core.CRYPTO_SR25519))
    try:
        # from_uri takes plain mnemonics too, with or without a derivation path.
        keypair = sp_core.Keypair.from_uri(text, sp_core.CRYPTO_SR25519)
    except ValueError:
        # The SDK's message is generic ("InvalidPhrase"); never echo the input.
        words = len(text.split("//", 1)[0].split())
        raise KeyLoadError(
            "key: not a valid secret URI or BIP39 mnemonic "
            f"({words} words before any derivation path; a mnemonic has 12, 15, 18, 21 or "
            "24 words from the BIP39 English list with a valid checksum)"
        ) from None
    return Signer(keypair)


def load_hotkey(secret: str, file: str, *, env: str, flag: str = "--hotkey-file") -> Signer | None:
    """The hotkey given either as a secret in the environment variable ``env`` or in the
    file ``file`` (flag ``flag``); None when neither is given. Raises
    :class:`KeyLoadError` naming the source, also when both are given."""
    if secret.strip() and file:
        raise KeyLoadError(f"set either {env} or {flag}, not both")
    try:
        if file:
            return load_signer_file(Path(file))
        if secret.strip():
            return load_signer(secret)
    except KeyLoadError as exc:
        raise KeyLoadError(f"{flag if file else env}: {exc}") from None
    return None


def load_signer_file(path: Path) -> Signer:
    """A signer from a file: its first line in any form :func:`load_signer` takes, or a
    Bittensor wallet keyfile (unencrypted JSON).

    Refuses a file whose permissions give others (not the owner, not the group) any
    access; warns when they give the group access (Kubernetes mounts secrets
    group-readable when the pod sets fsGroup). Raises :class:`KeyLoadError`, naming the path.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            raise KeyLoadError(
                f"{path}: permissions {mode:04o} give other users access to the key; "
                "allow the owner only (chmod 600)"
            )
        if mode & 0o070:
            _log.warning(
                "key file is accessible by its group; allow the owner only (chmod 600)",
                extra={"path": str(path), "mode": f"{mode:04o}"},
            )
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyLoadError(f"{path}: cannot read the key file ({exc.strerror})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyLoadError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes; not a key file")
    if sp_core.keyfile_data_is_encrypted(data):
        raise KeyLoadError(
            f"{path}: the wallet keyfile is encrypted; the master signs unattended, so it "
            "needs an unencrypted hotkey file (or the secret in another form)"
        )
    if data.lstrip().startswith(b"{"):
        return _load_keyfile(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyLoadError(f"{path}: not UTF-8 text") from None
    lines = text.strip().splitlines()
    try:
        return load_signer(lines[0] if lines else "")
    except KeyLoadError as exc:
        raise KeyLoadError(f"{path}: {exc}") from None


def _load_keyfile(path: Path, data: bytes) -> Signer:
    try:
        keypair = sp_core.deserialize_keypair_from_keyfile_data(data)
    except Exception:  # the binding raises several types; none is worth echoing
        raise KeyLoadError(f"{path}: not a valid Bittensor wallet keyfile") from None
    if keypair.crypto_type != sp_core.CRYPTO_SR25519:
        raise KeyLoadError(f"{path}: the wallet keyfile does not hold an sr25519 key")
    try:
        # A public-only keyfile (like coldkeypub.txt) loads but cannot sign; find out now
        # rather than at the first epoch. The probe signature is discarded.
        keypair.sign(b"platform-network/key-probe")
    except ValueError:
        raise KeyLoadError(
            f"{path}: the wallet keyfile holds a public key only; a signing key needs the secret"
        ) from None
    return Signer(keypair)
