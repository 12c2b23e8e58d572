"""What a Redis failure means, and what to tell the person who reads it: passing (Redis is
down, restarting, or a cluster is electing), refused for a while (memory, disk, a long script),
or refused for good (a user, a password, a certificate: a setting to fix). The connection
factories and every loop that talks to Redis decide by these."""

from __future__ import annotations

import re
import ssl

import redis
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError

from rendezvous.bus.urls import redacted

REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ClusterError,  # CLUSTERDOWN, a master down, redirects that went round in circles
    TryAgainError,  # a slot being migrated
    AskError,  # MOVED or ASK still, after a batch followed one: the slot's owner is changing
    RedisClusterException,  # no node covers a slot yet (a failover), no node reachable
)
"""Failures that pass: Redis unreachable, restarting or loading its data, or a cluster electing
a new master or moving a slot."""

REDIS_FAILURES: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException, OSError)
"""Anything a Redis call fails with that is not a bug in the caller (``TimeoutError`` is an
``OSError``): what a background loop
rides out (a cluster client raises ``RedisClusterException``, which is no ``RedisError``)."""


def permanent_refusal(exc: BaseException) -> str | None:
    """Why Redis will go on refusing this client however long it waits (a wrong user or
    password, a TLS certificate this host does not trust), else None. Such a failure is not
    retried as if Redis were still starting: it is a setting to fix."""
    if isinstance(exc, redis.AuthenticationError):
        where = "; ".join(getattr(exc, "__notes__", ()))  # the node, said by ``_give_up``
        exc = redis.AuthenticationError(f"{exc}{f', {where}' if where else ''}")
        if "required" in str(exc).lower():  # NOAUTH: it said "refused the user or password"
            return (f"Redis asks for a password and the URL gives none ({exc}): "
                    "redis://:password@host:port, or redis://user:password@host:port")  # fmt: skip
        return f"Redis refused the user or password in the URL ({exc})"
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.exceptions.NoPermissionError) and isinstance(
            exc, RedisClusterException
        ):
            # redis-py's cluster client turns a refused CLUSTER SLOTS into "Cluster mode is not
            # enabled on this node", and the start waited 30 s, then asked whether Redis was
            # running (a helper's probe, a user under -@dangerous on Redis 6)
            return (
                f"Redis refused this user a command it needs to find the cluster's nodes "
                f"({seen}): grant it +cluster|info +cluster|slots (Redis 6's -@dangerous "
                "takes both)"
            )
        if isinstance(seen, ssl.SSLCertVerificationError):
            if "hostname" in str(seen.verify_message).lower():  # the CA is trusted (a probe)
                return (
                    f"Redis's TLS certificate does not name the host in the URL "
                    f"({seen.verify_message}): use a name it holds, or ?ssl_check_hostname=false"
                )
            return (
                f"Redis's TLS certificate is not trusted here ({seen.verify_message}): "
                "?ssl_ca_certs=/path/ca.pem in the URL may name the CA that signed it"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_failure(exc: BaseException) -> BaseException | None:
    """The TLS failure under a connection failure, if any: an SSL error, or a handshake that
    timed out (a plain Redis reads a TLS hello as the start of a command, and waits)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "handshake" in str(seen).lower():
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def unreachable(exc: BaseException, url: str | None) -> str | None:
    """What to tell a command whose Redis did not answer however long it waited (None: not
    that failure)."""
    if not isinstance(exc, REDIS_DOWN):
        return None
    where = f" at {redacted(url)}" if url else ""
    if (tls := _tls_failure(exc)) is not None:  # read as "did not answer... running?"
        return (
            f"the TLS handshake with Redis{where} failed ({tls}): a rediss:// URL to a port "
            "that speaks plain Redis, or a client certificate the server wants "
            "(?ssl_certfile=...&ssl_keyfile=...)?"
        )
    if isinstance(exc, redis.exceptions.MovedError):  # read as "did not answer" (a probe)
        return (
            f"Redis{where} answered MOVED ({exc}): it is a node of a Redis Cluster that this "
            "user could not tell as one (it may run neither INFO nor CLUSTER INFO, as under "
            "-@dangerous on Redis 6): grant it +cluster|info +cluster|slots"
        )
    return (
        f"Redis{where} did not answer ({exc}). Is it running? RDV_REDIS_URL may name several "
        "nodes of a cluster (redis://host1:port1,host2:port2), found through any that answers"
    )


MEMORY_LIMIT = (
    "Redis is at its memory limit (maxmemory) and refuses writes; free memory or raise the "
    "limit (lower RDV_DECISIONS_MAXLEN, RDV_MAX_BACKLOG and RDV_REPLY_MAXLEN to fit it)"
)
BUSY_SCRIPT = (
    "Redis is busy running a script or function past its time limit (BUSY) and refuses every "
    "command until it ends or is killed (SCRIPT KILL, FUNCTION KILL)"
)
CANNOT_PERSIST = (
    "Redis cannot write its data to disk (MISCONF: its disk is full or unwritable) and "
    "refuses writes until it can; free its disk (it goes on by itself)"
)


_REFUSALS = {"OOM": MEMORY_LIMIT, "MISCONF": CANNOT_PERSIST, "BUSY": BUSY_SCRIPT}


def refused_for_a_while(exc: BaseException) -> str | None:
    """Why Redis refused a command for a while, or None: at its ``maxmemory`` (``noeviction``;
    writes, until memory frees or the limit is raised), unable to persist (``MISCONF``: its
    disk is full; writes, until it has room), or busy running a script past its time limit
    (``BUSY``: every command, until the script ends or is killed; a worker stopped on it, a
    helper's probe). A script's call carries the code inside its own error (``...:
    @user_script:6: -MISCONF ...``): a full disk under the data folder made every worker stop
    on an error, and the log bin log a traceback four times a second (found by a helper's
    probe)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return MEMORY_LIMIT
    if not isinstance(exc, redis.ResponseError):
        return None
    found = _REFUSED_CODE.search(str(exc))  # a pipeline's: "Command # 1 (...) caused error: X"
    return _REFUSALS[found.group(1)] if found else None


_REFUSED_CODE = re.compile(r"(?:^|-|error: )(OOM|MISCONF|BUSY) ")


def said(exc: BaseException) -> str:
    """A Redis failure in a loop's log line: a refusal for a while in its own words, else that
    Redis could not be reached ("cannot reach Redis" of a Redis refusing writes sent an
    operator looking at the network; a helper's disk probe)."""
    why = refused_for_a_while(exc)
    return f"Redis refuses: {why} ({exc})" if why else f"cannot reach Redis ({exc})"
