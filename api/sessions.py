"""/api/v1/sessions/: create, list and follow sessions, and move them through their lifecycle."""

import django_filters
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from orchestrator_project import logs
from sessions.models import Checkpoint, Session
from tasks import lifecycle
from tasks.summaries import add_task_counts
from tenants.permissions import TenantScopedMixin, membership_for_write

from .filters import FiltersNarrowListsOnly, UtcIsoDateTimeFilter
from .inputs import SessionCreateSerializer
from .pagination import Pagination, SessionCursorPagination, SessionPagination
from .serializers import (
    CheckpointSerializer,
    EventSerializer,
    SessionDetailSerializer,
    SessionSerializer,
    TaskSerializer,
)
from .tenant import QUOTA_EXCEEDED

IDEMPOTENCY_HEADER = "Idempotency-Key"


class SessionFilter(django_filters.FilterSet):
    # Not DISTINCT (django-filter's default for a multiple choice): status is a column of the row,
    # so no row can match twice, and DISTINCT sorts every matching session to page 50 of them.
    status = django_filters.MultipleChoiceFilter(choices=Session.Status.choices, distinct=False)
    priority = django_filters.NumberFilter()
    created_after = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    search = django_filters.CharFilter(method="filter_search", help_text="Words in the title or requirements.")

    class Meta:
        model = Session
        fields = ["status", "priority"]

    def filter_search(self, queryset, name, value):
        return queryset.search(value)


def _actor(request) -> str:
    return f"user:{request.user.get_username()}"


def _transition_action(name: str, service, summary: str, description: str, errors: dict | None = None):
    def transition(self, request, pk=None):
        session = self.get_object()
        service(session, actor=_actor(request))
        body = SessionSerializer(self.get_object(), context=self.get_serializer_context()).data
        return Response(body, status=status.HTTP_202_ACCEPTED)

    # DRF matches an action's function name to its attribute name.
    transition.__name__ = name
    decorated = action(detail=True, methods=["post"], url_path=name, url_name=name)(transition)
    responses = {202: SessionSerializer, **(errors or {})}
    schema = extend_schema(request=None, responses=responses, summary=summary, description=description)
    return schema(decorated)


@extend_schema_view(
    list=extend_schema(
        summary="List sessions",
        description="Sessions of your tenants, newest first. Filter by status (repeatable), priority, "
        "created_after, created_before and search (words in the title or requirements). Paged by `page` "
        "(with a count), or by `cursor` (empty for the first page, then follow `next`): no count, and as "
        "fast on any page.",
        parameters=[
            OpenApiParameter(
                "cursor", str, description="Cursor paging: empty for the first page, then the `next` link's."
            )
        ],
    ),
    retrieve=extend_schema(
        summary="Get a session",
        description="With progress, task counts, the transitions allowed now, the critical path by "
        "expected duration and the estimated makespan.",
    ),
)
class SessionViewSet(
    FiltersNarrowListsOnly,
    TenantScopedMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Coding sessions of the caller's tenants: create, follow, and move through their lifecycle."""

    # pk breaks ties so that pages never overlap or skip. Task counts are added for the rows of
    # the page only (paginate_queryset): counting in the list's own query would join every
    # session's tasks before paging.
    queryset = Session.objects.select_related("tenant").order_by("-created_at", "-pk")
    serializer_class = SessionSerializer
    filterset_class = SessionFilter
    # The list's; a session's tasks, events and checkpoints page by number only (their actions
    # say so, and drf-spectacular documents each from its pagination_class).
    pagination_class = SessionPagination

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authenticates
        logs.bind(user_id=request.user.pk)

    def get_object(self):
        session = super().get_object()
        logs.bind(session_id=str(session.pk), tenant=session.tenant_id)
        return session

    def get_serializer_class(self):
        # The critical path needs the session's tasks and edges: detail only, not per list row.
        return SessionDetailSerializer if self.action == "retrieve" else SessionSerializer

    @extend_schema(
        summary="Create a session",
        description="From an explicit DAG (tasks), or from requirements that a template decomposes (named, or "
        "inferred). The session is pending until it is started. A request with an Idempotency-Key already used "
        "in the tenant gets the session that key created, with 200. 429 quota_exceeded when the tenant's quotas "
        "(active sessions, open tasks, tasks per session, the highest priority of your role) have no room for it.",
        request=SessionCreateSerializer,
        responses={201: SessionDetailSerializer, 200: SessionDetailSerializer, 429: QUOTA_EXCEEDED},
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
    )
    def create(self, request, *args, **kwargs):
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key) <= 128):
            raise ValidationError({IDEMPOTENCY_HEADER: ["must be 1 to 128 characters"]})
        payload = SessionCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        membership = membership_for_write(request.user, payload.validated_data.pop("tenant", None))
        tenant = membership.tenant
        session, created = lifecycle.create_session(
            tenant=tenant, user=request.user, data=payload.validated_data, idempotency_key=key, role=membership.role
        )
        logs.bind(session_id=str(session.pk), tenant=tenant.pk)
        body = SessionDetailSerializer(
            self.get_queryset().get(pk=session.pk), context=self.get_serializer_context()
        ).data
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(body, status=code, headers={"Location": f"{request.path}{session.pk}/"})

    start = _transition_action(
        "start",
        lifecycle.start_session,
        "Start: compile the DAG and dispatch it",
        "pending -> queued: the tasks without upstreams are queued and the DAG is sent to the agents. "
        "409 from any other status.",
    )
    pause = _transition_action(
        "pause",
        lifecycle.pause_session,
        "Pause: running tasks finish, nothing new starts",
        "queued, running or degraded -> paused. The session's deadline stops while it is paused. 409 otherwise.",
    )
    resume = _transition_action(
        "resume",
        lifecycle.resume_session,
        "Resume a paused session",
        "paused -> queued (running, if a task still runs) and the rest of the DAG is sent again. 409 unless paused.",
    )
    cancel = _transition_action(
        "cancel",
        lifecycle.cancel_session,
        "Cancel (stop, if running)",
        "A pending, queued or paused session is cancelled, a running or degraded one stopped: tasks not yet "
        "started are cancelled and running ones told to abort. 409 for a settled session.",
    )
    retry = _transition_action(
        "retry",
        lifecycle.retry_session,
        "Retry: completed tasks stay, the rest run again",
        "failed, timeout, stopped or orphaned -> queued, at most max_retries times: completed tasks keep their "
        "results and do not run again; every other task runs again. 409 otherwise; 429 quota_exceeded when the "
        "tenant's active sessions or open tasks quota has no room for it.",
        errors={429: QUOTA_EXCEEDED},
    )

    @property
    def paginator(self):
        """Page numbers, or cursors when the list is asked for with ?cursor=."""
        if not hasattr(self, "_paginator"):
            by_cursor = self.action == "list" and "cursor" in self.request.query_params
            self._paginator = SessionCursorPagination() if by_cursor else self.pagination_class()
        return self._paginator

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        if self.action == "list" and page is not None:
            add_task_counts(page)
        return page

    def _page(self, queryset, serializer_class, context_for_page=None):
        page = self.paginate_queryset(queryset)
        context = context_for_page(page) if context_for_page else {}
        return self.get_paginated_response(serializer_class(page, many=True, context=context).data)

    @extend_schema(
        responses=TaskSerializer(many=True),
        summary="A session's tasks",
        description="The session's DAG in order: each task's status, dependencies, agent, attempts, result and error.",
    )
    @action(detail=True, methods=["get"], pagination_class=Pagination)
    def tasks(self, request, pk=None):
        session = self.get_object()
        return self._page(session.tasks.select_related("agent").prefetch_related("depends_on"), TaskSerializer)

    @extend_schema(
        responses=EventSerializer(many=True),
        summary="A session's event log",
        description="Every status change, and every recovery note, in order. Append-only: replaying it gives "
        "the session's status.",
        parameters=[OpenApiParameter("after", int, description="Only events with a larger id.")],
    )
    @action(detail=True, methods=["get"], pagination_class=Pagination)
    def events(self, request, pk=None):
        session = self.get_object()
        events = session.events.all()
        after = request.query_params.get("after")
        if after is not None:
            # str.isdigit() accepts "²", which int() rejects: only ASCII digits are an id.
            if not (after.isascii() and after.isdigit()):
                raise ValidationError({"after": ["must be an event id (a whole number)"]})
            events = events.filter(id__gt=int(after))
        return self._page(events, EventSerializer)

    @extend_schema(
        responses=CheckpointSerializer(many=True),
        summary="The audit trail of completions",
        description="One entry per task the session completed, in order, with the keys completed up to it.",
    )
    @action(detail=True, methods=["get"], pagination_class=Pagination)
    def checkpoints(self, request, pk=None):
        return self._page(
            self.get_object().checkpoints.select_related("task"),
            CheckpointSerializer,
            lambda page: {"completed_keys": Checkpoint.completed_keys(page)},
        )
