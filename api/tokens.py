"""/api/v1/tokens/: the caller's own API tokens. Listed by their public prefix (never the key,
which exists only in the answer to its creation), created with a name and an expiry, revoked
one by one. Another user's token is a 404, as is an expired one (it no longer exists for us)."""

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import APIException
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from tokens import services
from tokens.models import ApiToken


class TooManyTokens(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class ApiTokenSerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(source="token_key", read_only=True, help_text="The token's first characters.")
    created_at = serializers.DateTimeField(source="created", read_only=True)
    expires_at = serializers.DateTimeField(source="expiry", read_only=True, help_text="null: never expires.")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "expires_at", "last_used_at"]
        read_only_fields = fields


class IssuedTokenSerializer(ApiTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="The key: shown in this answer only, never again.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class NewTokenSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, help_text="What the token is for, e.g. 'CI of payments'.")
    expires_at = serializers.DateTimeField(
        required=False, help_text="In the future, at most API_TOKEN_TTL_DAYS from now (the default)."
    )

    def validate_expires_at(self, value):
        now = timezone.now()
        if value <= now:
            raise serializers.ValidationError("must be in the future")
        latest = services.default_expiry(now)
        if latest is not None and value > latest:
            raise serializers.ValidationError(f"must be at most {latest.isoformat()} (API_TOKEN_TTL_DAYS)")
        return value


@extend_schema_view(
    list=extend_schema(summary="List your API tokens", description="Your valid tokens, newest first: prefixes only."),
    retrieve=extend_schema(
        summary="Get one of your API tokens", description="As the list shows it; another user's token is a 404."
    ),
    destroy=extend_schema(
        summary="Revoke one of your API tokens",
        description="It stops authenticating at once (this request too, if it is the token revoked).",
    ),
)
class TokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = ApiTokenSerializer
    permission_classes = [IsAuthenticated]
    lookup_value_regex = r"[0-9]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema's generation has no user
            return ApiToken.objects.none()
        return services.valid_tokens(self.request.user)

    @extend_schema(
        request=NewTokenSerializer,
        responses={201: IssuedTokenSerializer},
        summary="Create an API token",
        description=(
            "The answer's `token` is the only time the key is shown. A token created with a token expires no "
            "later than that one, so a leaked token cannot mint one that outlives it. 409 past 50 valid tokens."
        ),
    )
    def create(self, request):
        body = NewTokenSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        expiry = body.validated_data.get("expires_at") or services.default_expiry(timezone.now())
        creator = request.auth if isinstance(request.auth, ApiToken) else None
        if creator is not None and creator.expiry is not None:
            expiry = min(expiry or creator.expiry, creator.expiry)
        try:
            with transaction.atomic():
                row, key = services.issue_token(request.user, name=body.validated_data["name"], expiry=expiry)
        except services.TooManyTokens as exc:
            raise TooManyTokens(str(exc)) from None
        row.token = key
        return Response(IssuedTokenSerializer(row).data, status=status.HTTP_201_CREATED)
