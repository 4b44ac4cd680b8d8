"""Circuit breakers whose state lives in Redis, so that every process calling one endpoint (an
agent's pool processes, the gateways, the API) sees one circuit for it."""

import logging

import pybreaker
import redis

from orchestrator_project.redis_client import redis_client

logger = logging.getLogger(__name__)


def redis_circuit_breaker(
    namespace: str, *, name: str, fail_max: int, reset_timeout: int, exclude=(), listeners=()
) -> tuple[pybreaker.CircuitBreaker, pybreaker.CircuitBreakerStorage]:
    """A breaker (and its storage) over the Redis key `namespace`. CircuitRedisStorage decodes
    the bytes it reads itself, so it needs a client without decode_responses, which
    redis_client() is. With Redis unreachable, the circuit is kept in this process only."""
    try:
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis_client(), namespace=namespace)
    except redis.RedisError:
        logger.warning("Redis unreachable: the circuit %s is kept in this process only", name)
        storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    breaker = pybreaker.CircuitBreaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        exclude=list(exclude),
        listeners=list(listeners),
        state_storage=storage,
        name=name,
    )
    return breaker, storage


def read_states(namespaces: list[str]) -> list[str | None]:
    """The state of each circuit (closed, open or half-open) in one round trip, without making
    breakers (which would write their keys): closed for one never used, None for every one when
    Redis is unreachable. The key is CircuitRedisStorage's own, <namespace>:pybreaker:state."""
    if not namespaces:
        return []
    keys = [f"{namespace}:{pybreaker.CircuitRedisStorage.BASE_NAMESPACE}:state" for namespace in namespaces]
    try:
        values = redis_client().mget(keys)
    except redis.RedisError:
        logger.warning("Redis unreachable: the state of %d circuits is unknown", len(keys))
        return [None] * len(keys)
    return [value.decode() if value else pybreaker.STATE_CLOSED for value in values]
