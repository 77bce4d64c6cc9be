"""Putting verified vectors on chain: one epoch at a time, each at most once.

The submitter takes the newest queued vector (older queued ones are closed as
``SKIPPED_SUPERSEDED``: weights are state, not increments, so only the newest matters),
claims it in the store (a conditional UPDATE: nobody claims an epoch twice), and submits
it with the chain interface's ``set_weights`` (the Bittensor SDK's ``SetWeights``: it
checks the rate limit before signing and picks the plaintext or commit-reveal extrinsic
from the subnet's settings). Before each attempt it reads the chain's hyperparameters
and refuses the vector (``REJECTED_INVALID``) when the SDK would now submit a different
u16 vector than the one the master signed.

* ``RATE_LIMITED``: nothing was signed; the submitter polls the chain head until the
  block the limit allows, then tries again. The wait ends early when the vector
  expires (outcome ``RATE_LIMITED``: nothing submitted), when a newer vector arrives
  (``SKIPPED_SUPERSEDED``) or at shutdown (the epoch goes back to the queue).
* ``FAILED``: retried ``--submit-attempts`` times in all, ``--submit-retry-delay`` apart,
  while the vector is fresh. A failure can be a lost answer rather than a refusal; if a
  retry then meets the rate limit counted from an update made after the epoch was
  claimed, that update was the "failed" attempt, and the epoch is not submitted again.
* ``SUBMITTED`` and ``COMMITTED`` (commit-reveal; the chain reveals it) are success.

Every final outcome is stored with its report in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from platform_common.chain.interface import Chain, ChainWeights, SubmitOutcome, SubmitResult
from platform_network.v1 import weights_pb2
from validator import telemetry
from validator.intake import count_outcome
from validator.reports import ReportFactory
from validator.store import Result, Store
from validator.verify import Position, chain_weights_of, check_chain_form, is_newer

log = logging.getLogger(__name__)

Outcome = weights_pb2.SubmissionOutcome
Clock = Callable[[], int]
_NS = 1_000_000_000

READY = "ready"
STOPPED = "stopped"
SUPERSEDED = "superseded"
EXPIRED = "expired"

UNKNOWN_AFTER_STOP = (
    "the agent stopped while submitting this epoch; whether its extrinsic reached the chain "
    "is unknown, and an epoch is never submitted twice"
)


@dataclass(frozen=True)
class SubmitSettings:
    mechanism_id: int
    attempts: int  # attempts of a FAILED submission, in all
    retry_delay: float  # seconds between two of them
    poll_interval: float  # seconds between reads of the chain head during a rate-limit wait


class Submitter:
    def __init__(
        self,
        store: Store,
        chain: Chain,
        keypair: Any,
        reports: ReportFactory,
        settings: SubmitSettings,
        *,
        on_report: Callable[[], None],
        clock: Clock = time.time_ns,
    ) -> None:
        self._store = store
        self._chain = chain
        self._keypair = keypair
        self._reports = reports
        self._settings = settings
        self._on_report = on_report
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        # What the submitter is doing, for /healthz and the tests.
        self.in_flight: weights_pb2.WeightVector | None = None
        self.waiting_for_block = 0
        self.submitted_epoch = 0

    def wake(self) -> None:
        """A vector was queued."""
        self._wake.set()

    def stop_soon(self) -> None:
        """Start no new attempt and leave any wait; the caller then waits for run()."""
        self._stopping = True
        self._wake.set()

    async def recover(self) -> int:
        """Close the epochs a previous run left pending (see :mod:`validator.store`)."""
        self._mark_submitted(await self._store.last_submitted_epoch())
        pending = await self._store.pending()
        for record in pending:
            result = Result(Outcome.SUBMISSION_OUTCOME_FAILED, UNKNOWN_AFTER_STOP)
            report = self._reports.make(record.epoch, record.epoch_id, result, self._clock())
            if await self._store.finish(record.epoch_id, result, report):
                count_outcome(result, "failed")
                log.warning(
                    "an epoch was being submitted when the agent last stopped; it is not "
                    "submitted again",
                    extra={"epoch": record.epoch, "epoch_id": record.epoch_id},
                )
        if pending:
            self._on_report()
        return len(pending)

    def _mark_submitted(self, epoch: int) -> None:
        """The newest epoch on chain, for /healthz and the gauge alike."""
        self.submitted_epoch = epoch
        telemetry.SUBMITTED_EPOCH.set(epoch)

    async def run(self) -> None:
        await self.recover()
        while True:
            self._wake.clear()
            while await self._step():
                pass
            if self._stopping:
                return
            await self._wake.wait()

    async def _close(
        self, vector: weights_pb2.WeightVector, result: Result, skipped: str | None
    ) -> None:
        report = self._reports.make(vector.epoch, vector.epoch_id, result, self._clock())
        if not await self._store.finish(vector.epoch_id, result, report):
            return
        count_outcome(result, skipped)
        self._on_report()
        extra = {
            "epoch": vector.epoch,
            "epoch_id": vector.epoch_id,
            "outcome": Outcome.Name(result.outcome),
            "reason": result.message,
        }
        if skipped is None:
            self._mark_submitted(vector.epoch)
            log.info(
                "weights set on chain",
                extra={**extra, "block": result.block, "extrinsic_hash": result.extrinsic_hash},
            )
        elif result.outcome == Outcome.SUBMISSION_OUTCOME_SKIPPED_SUPERSEDED:
            log.info("epoch not submitted: a newer one replaces it", extra=extra)
        else:
            log.warning("epoch not submitted", extra=extra)

    async def _step(self) -> bool:
        """Handle the newest queued vector; False when there is none (or on shutdown)."""
        if self._stopping:
            return False
        queued = await self._store.queued()
        if not queued:
            return False
        newest, older = queued[0], queued[1:]
        for vector in older:
            await self._close(vector, _superseded(newest), "superseded")
        if self._clock() >= newest.expire_time.ToNanoseconds():
            result = Result(
                Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE,
                f"expired at {newest.expire_time.ToJsonString()} before it could be submitted",
            )
            await self._close(newest, result, "expired")
            return True
        claim = await self._store.claim(newest)
        if claim == "not_newer":
            result = Result(
                Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE,
                "not newer than the last epoch taken for submission",
            )
            await self._close(newest, result, "not_newer")
            return True
        if claim != "claimed":
            return True
        self.in_flight = newest
        started = time.monotonic()
        try:
            final, skipped = await self._submit(newest)
        finally:
            self.in_flight = None
            self.waiting_for_block = 0
            telemetry.RATE_LIMIT_WAIT.set(0)
        if final is None:
            # Stopped before anything was sent: a restarted agent may still submit it.
            await self._store.unclaim(newest.epoch_id)
            return False
        telemetry.SUBMIT_SECONDS.observe(time.monotonic() - started)
        await self._close(newest, final, skipped)
        return True

    async def _submit(self, vector: weights_pb2.WeightVector) -> tuple[Result | None, str | None]:
        """Submit until an outcome is final: (result, skip reason or None on success), or
        (None, None) when stopping before any extrinsic of this attempt was sent."""
        settings = self._settings
        expire_ns = vector.expire_time.ToNanoseconds()
        weights = chain_weights_of(vector)
        floats = {w.uid: w.weight for w in vector.weights}
        failures = 0
        last_failure = ""
        next_block = 0
        extra = {"epoch": vector.epoch, "epoch_id": vector.epoch_id}
        claim_block = await self._head()
        while True:
            if self._stopping:
                return None, None
            if self._clock() >= expire_ns:
                expired_at = vector.expire_time.ToJsonString()
                if next_block:
                    return Result(
                        Outcome.SUBMISSION_OUTCOME_RATE_LIMITED,
                        f"the weights rate limit allows the next submission at block "
                        f"{next_block}; the vector expired at {expired_at} before that, and "
                        "nothing was submitted",
                    ), "rate_limited"
                return Result(
                    Outcome.SUBMISSION_OUTCOME_FAILED,
                    f"the vector expired at {expired_at} before a submission succeeded "
                    f"(last error: {last_failure})",
                ), "failed"
            submitted, rate_limit = await self._attempt(vector, weights, floats)
            if submitted is None:
                continue  # expired just before sending: decided at the top of the loop
            if isinstance(submitted, Result):
                return submitted, "rejected"
            if submitted.outcome in (SubmitOutcome.SUBMITTED, SubmitOutcome.COMMITTED):
                outcome = (
                    Outcome.SUBMISSION_OUTCOME_COMMITTED
                    if submitted.outcome is SubmitOutcome.COMMITTED
                    else Outcome.SUBMISSION_OUTCOME_SUBMITTED
                )
                return Result(
                    outcome, submitted.message, submitted.block, submitted.extrinsic_hash
                ), None
            if submitted.outcome is SubmitOutcome.RATE_LIMITED:
                landed = _landed_earlier(submitted, rate_limit, claim_block, failures)
                if landed is not None:
                    return Result(Outcome.SUBMISSION_OUTCOME_FAILED, landed), "failed"
                next_block = submitted.next_allowed_block
                self.waiting_for_block = next_block
                telemetry.RATE_LIMIT_WAIT.set(next_block)
                log.info(
                    "weights rate limit: waiting for the allowed block",
                    extra={**extra, "block": submitted.block, "next_allowed_block": next_block},
                )
                waited = await self._wait_for_block(vector, next_block, expire_ns)
            else:
                failures += 1
                last_failure = submitted.message
                log.warning(
                    "submission failed",
                    extra={
                        **extra,
                        "attempt": failures,
                        "attempts": settings.attempts,
                        "error": submitted.message,
                    },
                )
                if failures >= settings.attempts:
                    return Result(
                        Outcome.SUBMISSION_OUTCOME_FAILED,
                        submitted.message,
                        submitted.block if submitted.extrinsic_hash else 0,
                        submitted.extrinsic_hash,
                    ), "failed"
                waited = await self._pause(vector, settings.retry_delay, expire_ns)
            if waited == STOPPED:
                return None, None
            if waited == SUPERSEDED:
                return _superseded(None), "superseded"

    async def _attempt(
        self,
        vector: weights_pb2.WeightVector,
        weights: ChainWeights,
        floats: dict[int, float],
    ) -> tuple[SubmitResult | Result | None, int]:
        """One attempt: the chain-form check, then set_weights. A Result means the vector
        is refused; a SubmitResult is what the chain made of the attempt; None means the
        vector expired before anything was sent. With it, the chain's weights rate limit
        as read for the attempt."""
        chain = self._chain
        try:
            hyper = await chain.hyperparameters()
        except Exception as exc:  # the SDK and its transports raise many types
            message = f"cannot read the chain's hyperparameters: {exc}"
            return SubmitResult(SubmitOutcome.FAILED, 0, "", message), 0
        planned: ChainWeights | ValueError
        try:
            planned = chain.plan_weights(floats, hyper)
        except ValueError as exc:
            planned = exc
        refusal = check_chain_form(vector, hyper, planned)
        if refusal is not None:
            return Result(refusal.outcome, refusal.message), hyper.weights_rate_limit
        if self._clock() >= vector.expire_time.ToNanoseconds():
            return None, hyper.weights_rate_limit
        try:
            submitted = await chain.set_weights(
                self._keypair, weights, mechanism_id=self._settings.mechanism_id
            )
        except Exception as exc:
            message = f"set_weights: {type(exc).__name__}: {exc}"
            submitted = SubmitResult(SubmitOutcome.FAILED, 0, "", message)
        return submitted, hyper.weights_rate_limit

    async def _head(self) -> int | None:
        try:
            return await self._chain.current_block()
        except Exception as exc:
            log.warning("cannot read the chain head", extra={"error": str(exc)})
            return None

    async def _wait_for_block(
        self, vector: weights_pb2.WeightVector, target: int, expire_ns: int
    ) -> str:
        """Poll the chain head until ``target``; or why the wait ended early."""
        while True:
            waited = await self._pause(vector, self._settings.poll_interval, expire_ns)
            if waited != READY:
                return waited
            if self._clock() >= expire_ns:
                return EXPIRED
            head = await self._head()
            if head is not None and head >= target:
                return READY

    async def _pause(
        self, current: weights_pb2.WeightVector, seconds: float, expire_ns: int
    ) -> str:
        """Sleep ``seconds`` (at most until expiry), waking early for a shutdown or a
        newer queued vector."""
        loop = asyncio.get_running_loop()
        until_expiry = max(0.0, (expire_ns - self._clock()) / _NS)
        deadline = loop.time() + min(seconds, until_expiry)
        position = Position.of(current)
        while True:
            # Cleared before looking, so nothing queued after the look goes unnoticed.
            self._wake.clear()
            if self._stopping:
                return STOPPED
            if any(is_newer(Position.of(v), position) for v in await self._store.queued()):
                return SUPERSEDED
            remaining = deadline - loop.time()
            if remaining <= 0:
                return READY
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return READY


def _landed_earlier(
    limited: SubmitResult, rate_limit: int, claim_block: int | None, failures: int
) -> str | None:
    """Why a rate-limited retry must not go on, or None.

    The rate limit counts from the validator's last weights update: ``next_allowed_block
    - rate_limit``. If that update happened after this epoch was claimed, and an earlier
    attempt of it was reported as failed, the earlier attempt did reach the chain (the
    SDK or the connection lost its answer): submitting again would set the epoch twice.
    """
    if not failures or claim_block is None or rate_limit <= 0:
        return None
    updated = limited.next_allowed_block - rate_limit
    if updated < claim_block:
        return None
    return (
        f"an earlier attempt reached the chain although it was reported as failed: this "
        f"validator's weights were updated at block {updated}, after the epoch was taken for "
        f"submission at block {claim_block}; not submitted again"
    )


def _superseded(newest: weights_pb2.WeightVector | None) -> Result:
    which = f"epoch {newest.epoch}" if newest is not None else "a newer epoch"
    return Result(
        Outcome.SUBMISSION_OUTCOME_SKIPPED_SUPERSEDED,
        f"{which} arrived before this one was submitted; it is submitted instead, and nothing "
        "was submitted for this one",
    )
