"""Request throttles (docs/SECURITY.md, "Throttling and lockout").

- Per user and per tenant (DRF throttles, scopes "user" and "tenant" of REST_FRAMEWORK's
  DEFAULT_THROTTLE_RATES): every authenticated API request counts against its user's budget and
  against the budget of each tenant the user belongs to, so the members of one tenant share one.
- Failed authentication, per client address (FailedAuthenticationMiddleware, scope
  "auth_failures"): a request carrying credentials that is answered 401 counts against its
  address; an address over its budget gets 429 for every request carrying credentials, before
  anything tries to authenticate it, until its window ends. The count does not depend on the
  authentication class: API tokens, EAP agent tokens and the event stream's tokens alike.

Counts are fixed windows in the default cache (Redis, shared by every process): one key per
scope, ident and window, incremented atomically, so concurrent requests in several processes
never pass more than the rate between them. A window allows at most the rate; a burst straddling
two windows can reach twice the rate in one window's length.

The client address is DRF's (REST_FRAMEWORK["NUM_PROXIES"]): REMOTE_ADDR, or with NUM_PROXIES
set above 0, the address that many proxies back in X-Forwarded-For.
"""

import ipaddress
import math

from django.core.cache import cache
from django.http import HttpRequest, JsonResponse
from rest_framework import throttling
from rest_framework.settings import api_settings

FAILED_AUTH_SCOPE = "auth_failures"
CREDENTIAL_HEADERS = ("HTTP_AUTHORIZATION", "HTTP_X_AGENT_TOKEN")


def client_address(request: HttpRequest) -> str | None:
    """The client's IP address, honouring NUM_PROXIES; None when what the proxies sent is not an
    IP address. Also django-axes' client address (AXES_CLIENT_IP_CALLABLE)."""
    ident = throttling.BaseThrottle().get_ident(request) or ""
    try:
        return ipaddress.ip_address(ident.strip()).compressed
    except ValueError:
        return None


class Window:
    """The fixed window of `duration` seconds that contains `now`, for one scope and ident."""

    def __init__(self, scope: str, ident: object, duration: int, now: float) -> None:
        index = int(now // duration)
        self.key = f"throttle:{scope}:{ident}:{index}"
        self.duration = duration
        self.seconds_left = (index + 1) * duration - now

    def count(self) -> int:
        return cache.get(self.key, 0)

    def add_one(self) -> int:
        # The key outlives its window, so an increment within the window always finds it
        # (Django's incr of a missing key raises) and never recreates it without an expiry.
        cache.add(self.key, 0, timeout=2 * self.duration)
        return cache.incr(self.key)


class WindowThrottle(throttling.SimpleRateThrottle):
    """A SimpleRateThrottle counting in fixed windows (Window) over every ident of
    `idents(request)`: a request passes when no ident has used up the rate in this window."""

    def get_rate(self):
        # Read at each request: DRF's THROTTLE_RATES is read once, at import.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def idents(self, request) -> list:
        raise NotImplementedError

    def allow_request(self, request, view) -> bool:
        if self.rate is None:
            return True
        now = self.timer()
        windows = [Window(self.scope, ident, self.duration, now) for ident in self.idents(request)]
        # Increment first, compare after: concurrent requests cannot all see the last free place.
        over = [window for window in windows if window.add_one() > self.num_requests]
        self.seconds_left = max((window.seconds_left for window in over), default=0)
        return not over

    def wait(self) -> float:
        return math.ceil(self.seconds_left)


class UserRateThrottle(WindowThrottle):
    """Scope "user": each user's requests (an external agent's are its own), or an
    unauthenticated client's by address."""

    scope = "user"

    def idents(self, request) -> list:
        user = request.user
        if user and user.is_authenticated:
            return [f"user-{user.pk}"]
        return [f"address-{client_address(request) or 'unknown'}"]


class TenantRateThrottle(WindowThrottle):
    """Scope "tenant": the requests of every member of a tenant together. A member of several
    tenants counts against each (which tenant a request is about is known only once its body is
    read). External agents and staff without a tenant have only their user budget."""

    scope = "tenant"

    def idents(self, request) -> list:
        user = request.user
        if not (user and user.is_authenticated and hasattr(user, "memberships")):
            return []
        return list(user.memberships.values_list("tenant_id", flat=True))


def carries_credentials(request: HttpRequest) -> bool:
    """Whether the request sends a token (Authorization or X-Agent-Token), good or bad."""
    return any(request.META.get(header) for header in CREDENTIAL_HEADERS)


class FailedAuthenticationThrottle(WindowThrottle):
    """Scope "auth_failures": failed authentications per client address. Not one of DRF's
    throttle classes (DRF's run after authentication): FailedAuthenticationMiddleware and the
    event stream call it."""

    scope = FAILED_AUTH_SCOPE

    def window(self, request: HttpRequest) -> Window:
        return Window(self.scope, client_address(request) or "unknown", self.duration, self.timer())

    def wait_before_trying(self, request: HttpRequest) -> int | None:
        """Seconds until the client's address may try credentials again; None while it is
        within its budget."""
        if self.rate is None:
            return None
        window = self.window(request)
        if window.count() < self.num_requests:
            return None
        return max(1, math.ceil(window.seconds_left))

    def record_failure(self, request: HttpRequest) -> None:
        if self.rate is not None:
            self.window(request).add_one()


def throttled_response(wait: int, message: str | None = None) -> JsonResponse:
    """429 in the API's error shape, with Retry-After."""
    message = message or f"Too many failed authentications from your address; try again in {wait} seconds."
    response = JsonResponse({"error": {"code": "throttled", "message": message, "details": {}}}, status=429)
    response["Retry-After"] = str(wait)
    return response


class FailedAuthenticationMiddleware:
    """Refuses (429) a request carrying credentials from an address over its budget of failed
    authentications, before any authentication runs; counts each 401 answered to a request
    carrying credentials. A request without credentials is neither refused nor counted: it
    guesses nothing."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not carries_credentials(request):
            return self.get_response(request)
        throttle = FailedAuthenticationThrottle()
        wait = throttle.wait_before_trying(request)
        if wait is not None:
            return throttled_response(wait)
        response = self.get_response(request)
        if response.status_code == 401:
            throttle.record_failure(request)
        return response
