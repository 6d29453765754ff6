"""The bot's connection to the Ray head: waited for at start, a lost or restarted head told apart, reconnected.

What Ray 2.60 does to a driver (this bot) whose head goes away, as measured (README, Ray recipe):

- Actor calls fail within seconds (``ActorUnavailableError``) for actors on the head's node; actors on
  other nodes keep answering until their own raylet gives up on the head.
- A GCS query through ``ray.nodes()`` hangs while the head is down, and once a restarted head (a new
  cluster id: no GCS fault tolerance) answers it, Ray aborts the process (a failed check on
  ``WrongClusterID``). Left alone, a driver is also ended after ``gcs_rpc_server_reconnect_timeout_s``
  (60 s) without its head.
- ``ray.shutdown()`` works while the head is down, and a later ``ray.init`` in the same process joins the
  restarted head. A Ray Client driver (``ray://``) gives up after its 30 s reconnection grace
  (``ConnectionError``, then "Ray Client is not connected") and reconnects the same way.

So nodes are listed here through a GCS client of our own that carries the cluster id (a restarted head
answers it with an error instead of aborting us), and a lost head is answered with ``ray.shutdown()``
and a new ``ray.init`` once the head's port accepts connections again (``ray.init`` itself would block
in a thread nothing can stop).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

CONNECT_RETRY_S = (1, 2, 5, 10, 30)  # waits between tries while the head cannot be reached
PROBE_TIMEOUT_S = 5.0  # a head that does not answer within this is taken as lost
GCS_TIMEOUT_S = 5  # per GCS query
CLIENT_GRACE_S = 40.0  # a Ray Client's own reconnection grace (30 s) and some
RECONNECT_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_TIMEOUT_S = "86400"  # Ray would end the whole bot after 60 s without its head; we reconnect instead
CLIENT_PREFIX = "ray://"
TOKEN_ENV = "RAY_AUTH_TOKEN"  # Ray's token authentication


class HeadLost(Exception):
    """The Ray head is unreachable, or it restarted (a new cluster) since we connected."""


def host_port(address: str) -> tuple[str, int] | None:
    """The host and port of ``host:port`` or ``ray://host:port``; None for "auto" or a local instance."""
    bare = address.removeprefix(CLIENT_PREFIX).rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reason(exc: BaseException) -> str:
    """A short reason for the log: the exception's type and its first line, without Ray's token."""
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        first = first.replace(token, "***")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


async def _pause(delay: float) -> None:
    await asyncio.sleep(delay)


class HeadLink:
    """Connects to the head named by `address` ("" a local instance, "auto", "host:port", "ray://host:port")."""

    def __init__(self, ray: Any, address: str, namespace: str) -> None:
        self._ray = ray
        self._address = address
        self._namespace = namespace
        self.client = address.startswith(CLIENT_PREFIX)  # Ray Client: no GCS of ours to ask
        self._target = address  # what a reconnect joins ("" starts a local instance again)
        self._probe = address  # host:port that must accept a connection before ray.init is tried
        self._gcs: Any = None  # our GCS client, bound to the cluster we joined
        self._leaving: asyncio.Future[None] | None = None  # a ray.shutdown() under way in a thread
        self.down = False  # a lost head is being reconnected to
        self.lost_count = 0  # head losses since the start (health, tests)

    # -- connecting ------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Joins the head, waiting it out with one log line a try while it cannot be reached."""
        attempt = 0
        while True:
            why = await self._try_connect()
            if why is None:
                self.down = False
                return
            delay = CONNECT_RETRY_S[min(attempt, len(CONNECT_RETRY_S) - 1)]
            attempt += 1
            log.warning("Ray head at %s cannot be reached (%s); trying again in %d s", self._shown(), why, delay)
            await _pause(delay)

    async def reconnect(self) -> None:
        """Leaves the lost cluster and joins the head again once it is back."""
        try:
            await self._leave()
        except Exception as exc:
            log.warning("leaving the lost Ray cluster failed (%s)", _reason(exc))
        await self.connect()

    async def _leave(self) -> None:
        # Shielded: a stop that cancels a reconnect still lets the shutdown end (see `settle`).
        self._gcs = None
        self._leaving = asyncio.ensure_future(asyncio.to_thread(self._ray.shutdown))
        await asyncio.shield(self._leaving)

    async def settle(self, timeout_s: float = 15.0) -> None:
        """Waits for a shutdown that a cancelled reconnect left running."""
        if self._leaving is not None and not self._leaving.done():
            await asyncio.wait({self._leaving}, timeout=timeout_s)

    async def _try_connect(self) -> str | None:
        ray = self._ray
        if ray.is_initialized():  # joined already (the process's own ray.init): adopt that cluster if it lives
            target = self._address or self._gcs_address()
            try:
                await asyncio.to_thread(self._adopt, target)
                await asyncio.to_thread(self.nodes)
                return None
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await self._leave()
                return f"the cluster joined before is gone ({_reason(exc)})"
        where = host_port(self._probe)
        if where is not None:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(*where), PROBE_TIMEOUT_S)
                writer.close()
            except (OSError, TimeoutError) as exc:
                return _reason(exc) if str(exc) else "no answer"
        if not self.client and self._target:
            os.environ.setdefault(RECONNECT_TIMEOUT_ENV, RECONNECT_TIMEOUT_S)
        try:
            await asyncio.to_thread(ray.init, address=self._target or None, namespace=self._namespace,
                                    log_to_driver=False)
            await asyncio.to_thread(self._adopt, self._target)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._leave()
            return _reason(exc)
        return None

    def _adopt(self, target: str) -> None:
        # A reconnect joins `target` again ("" starts a local instance anew); it is tried once the
        # head's port (the GCS's, or the Ray Client server's) accepts connections.
        self._target = target
        if self.client:
            self._probe = target
            return
        self._probe = self._gcs_address()
        if not self._reachable():  # a GCS client of a closed port would wait 40 s
            raise HeadLost("its port refuses connections")
        self._gcs = self._gcs_client()

    def _gcs_address(self) -> str:
        return str(self._ray.get_runtime_context().gcs_address)

    def _gcs_client(self) -> Any:
        from ray._private import worker
        from ray._raylet import GcsClient

        cluster_id = worker.global_worker.gcs_client.cluster_id.hex()
        return GcsClient(address=self._gcs_address(), cluster_id=cluster_id)

    def _shown(self) -> str:
        return self._target or "(a local instance)"

    # -- watching ---------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as ``ray.nodes()`` lists them (NodeID, Alive, Resources, Labels); raises
        HeadLost when the head is gone or restarted. Blocking: call it in a thread."""
        ray = self._ray
        if self.down:
            raise HeadLost("reconnecting")
        if self.client:
            if not ray.is_initialized():
                raise HeadLost("Ray Client disconnected")
            try:
                return list(ray.nodes())
            except Exception as exc:  # the client retries by itself first: ConnectionError, a closed channel
                raise HeadLost(_reason(exc)) from exc
        gcs = self._gcs
        if gcs is None:
            raise HeadLost("not connected")
        if not self._reachable():  # at once, where the query would wait out its timeout
            raise HeadLost("its port refuses connections")
        try:
            infos = gcs.get_all_node_info(timeout=GCS_TIMEOUT_S)
        except Exception as exc:
            # A restarted head refuses our cluster id; a slow answer from a head whose port is open is no loss.
            if "WrongClusterID" in str(exc) or not self._reachable():
                raise HeadLost(_reason(exc)) from exc
            raise
        return [_node_dict(node_id, info) for node_id, info in infos.items()]

    def _reachable(self) -> bool:
        where = host_port(self._probe)
        if where is None:
            return True
        try:
            socket.create_connection(where, timeout=PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        return True

    async def lost(self) -> str | None:
        """Why the head counts as lost, or None while it answers as the cluster we joined."""
        if self.down:
            return "reconnecting"
        try:
            # A Ray Client reconnects by itself for 30 s before it gives up.
            wait_s = CLIENT_GRACE_S if self.client else 2 * PROBE_TIMEOUT_S
            await asyncio.wait_for(asyncio.to_thread(self.nodes), wait_s)
        except HeadLost as exc:
            return str(exc)
        except Exception:  # slow, or a passing error: the head still counts as there
            return None
        return None


def _node_dict(node_id: Any, info: Any) -> dict[str, Any]:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    return {"NodeID": node_id.hex(), "Alive": info.state == GcsNodeInfo.ALIVE,
            "Resources": dict(info.resources_total), "Labels": dict(info.labels)}
