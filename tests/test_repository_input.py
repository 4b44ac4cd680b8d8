"""Repository input is checked on its parsed, normalised form (orchestrator_project.repositories,
sessions.workspaces.check_repository): every way out of the allowed roots and URL prefixes is a
400 that stores nothing and names no server path or configured root, what is accepted is stored
in its canonical form, and a tenant's narrowing in the admin can only narrow."""

import pytest
from django.core.exceptions import ValidationError

from sessions.models import Session
from tasks.tasks import dispatch_session
from tenants.models import Tenant
from tests.conftest import commit_repository, error_of, member_client

pytestmark = pytest.mark.django_db

SESSIONS = "/api/v1/sessions/"
PREFIX = "https://git.example.com/acme/"


@pytest.fixture
def allowed(tmp_path, settings):
    """REPOSITORY_ROOTS is tmp/allowed (with a repository in it, and a link to one outside it);
    WORKSPACE_ROOT lies inside it, with another session's workspace there."""
    root = tmp_path / "allowed"
    commit_repository(root / "repo", {"a.txt": "a\n"})
    commit_repository(tmp_path / "secret", {"secret.txt": "s\n"})
    (root / "link").symlink_to(tmp_path / "secret")
    settings.WORKSPACE_ROOT = root / "workspaces"
    commit_repository(root / "workspaces" / "other-session", {"b.txt": "b\n"})
    settings.REPOSITORY_ROOTS = [str(root)]
    settings.REPOSITORY_URL_PREFIXES = [PREFIX, "ssh://git.example.com/acme/"]
    return root


def post(api, repository: str, **fields):
    payload = {"requirements": "change it", "repository": repository, **fields}
    return api.post(SESSIONS, payload, format="json")


REFUSED = [
    # file:// is refused outright; git would URL-decode it past the root.
    ("file://{root}/%2e%2e/secret", "file:// URLs are not accepted"),
    ("file://{root}/repo", "file:// URLs are not accepted"),
    # Local paths: `..`, a link leading out of the root, a path outside, a session's workspace.
    ("{root}/../secret", "'..' is not allowed in a repository path"),
    ("{root}/repo/../../secret", "'..' is not allowed in a repository path"),
    ("{root}/link", "the repository is not under an allowed root"),
    ("{tmp}/secret", "the repository is not under an allowed root"),
    ("{root}/workspaces/other-session", "the repository is not under an allowed root"),
    ("relative/repo", "a local repository must be an absolute path"),
    # `..` in a URL's path, plain or percent-encoded.
    (PREFIX + "../other/x.git", "'..' is not allowed in a repository URL"),
    (PREFIX + "%2e%2e/other/x.git", "'..' is not allowed in a repository URL"),
    (PREFIX + "%2E%2E%2Fother/x.git", "'..' is not allowed in a repository URL"),
    (PREFIX + "x/..%2f..%2fother/x.git", "'..' is not allowed in a repository URL"),
    (PREFIX + "..\\other\\x.git", "backslashes"),
    # Prefixes compare scheme, host and port exactly and the path on segment boundaries.
    ("https://git.example.com/acme-evil/x.git", "the repository URL is not under an allowed prefix"),
    ("https://git.example.com/acmex.git", "the repository URL is not under an allowed prefix"),
    ("https://git.example.com.evil.org/acme/x.git", "the repository URL is not under an allowed prefix"),
    ("https://git.example.com:8443/acme/x.git", "the repository URL is not under an allowed prefix"),
    ("http://git.example.com/acme/x.git", "the repository URL is not under an allowed prefix"),
    ("git://git.example.com/acme/x.git", "the repository URL is not under an allowed prefix"),
    # No user name or credentials, and so no scp-like addresses.
    ("https://TOKEN@git.example.com/acme/x.git", "must not carry a user name or credentials"),
    ("https://bob:s3cret@git.example.com/acme/x.git", "must not carry a user name or credentials"),
    ("ssh://git@git.example.com/acme/x.git", "must not carry a user name or credentials"),
    ("https://git.example.com@evil.org/acme/x.git", "must not carry a user name or credentials"),
    ("git@git.example.com:acme/x.git", "scp-like addresses (host:path) are not accepted"),
    ("git.example.com:acme/x.git", "scp-like addresses (host:path) are not accepted"),
    # Other transports and option injection.
    ("ext::sh -c touch% /tmp/pwned", "git transports such as ext:: are not accepted"),
    ("fd::17", "git transports such as ext:: are not accepted"),
    ("ftp://git.example.com/acme/x.git", "only https://, http://, ssh:// and git:// URLs are accepted"),
    ("-uploadpack=touch /tmp/pwned", "the repository must not start with '-'"),
    ("--upload-pack=touch /tmp/pwned", "the repository must not start with '-'"),
    ("ssh://-oProxyCommand=touch%20pwned/acme/x.git", "the repository URL has no valid host"),
    # Anything git might read differently from us.
    (PREFIX + "x.git?ref=main", "must not have a query or a fragment"),
    (PREFIX + "x.git#main", "must not have a query or a fragment"),
    (PREFIX + "x%00.git", "control characters"),
    (PREFIX + "x%0a.git", "control characters"),
    ("https://git.example.com:99999/acme/x.git", "is not a valid URL"),
    ("https://git.example.com/", "names no repository"),
]


@pytest.mark.parametrize(("repository", "message"), REFUSED)
def test_a_repository_outside_what_is_allowed_is_400_names_no_server_path_and_stores_nothing(
    api, allowed, tmp_path, repository, message
):
    response = post(api, repository.format(root=allowed, tmp=tmp_path))

    error = error_of(response, 400)
    assert message in error["details"]["repository"][0]
    assert str(tmp_path) not in response.content.decode()  # neither the input's path nor a root
    assert not Session.objects.exists()


@pytest.mark.parametrize(
    "branch", ["-x", "--upload-pack=x", "a..b", "HEAD", "@{-1}", "x y", "topic.lock", "a:b", "a~1"]
)
def test_a_base_branch_git_would_not_take_as_a_branch_name_is_400_on_base_branch(api, allowed, branch):
    error = error_of(post(api, str(allowed / "repo"), base_branch=branch), 400)

    assert error["details"]["base_branch"] == [f"{branch!r} is not a valid branch name"]
    assert not Session.objects.exists()


@pytest.mark.parametrize(
    ("repository", "stored"),
    [
        ("https://GIT.example.com:443/acme/./x.git", PREFIX + "x.git"),
        (PREFIX + "team//x.git/", PREFIX + "team/x.git"),
        (PREFIX + "My%20Project/x.git", PREFIX + "My%20Project/x.git"),
        (PREFIX + "%252e%252e/x.git", PREFIX + "%252e%252e/x.git"),  # decoded once: a literal name
        ("ssh://git.example.com:22/acme/x.git", "ssh://git.example.com/acme/x.git"),
        ("{root}//repo/./", "{root}/repo"),
    ],
)
def test_an_accepted_repository_is_stored_in_the_form_that_was_checked(api, allowed, repository, stored):
    response = post(api, repository.format(root=allowed))

    assert response.status_code == 201, response.content
    assert Session.objects.get().repository == stored.format(root=allowed)
    assert response.json()["repository"] == stored.format(root=allowed)


def test_a_tenants_roots_and_prefixes_narrow_what_its_sessions_may_name(api, allowed, settings):
    commit_repository(allowed / "team" / "repo", {"t.txt": "t\n"})
    Tenant.objects.filter(slug="acme").update(
        repository_roots=[str(allowed / "team")], repository_url_prefixes=[PREFIX + "team/"]
    )

    assert error_of(post(api, str(allowed / "repo")), 400)["details"]["repository"] == [
        "the repository is not under an allowed root"
    ]
    assert "not under an allowed prefix" in error_of(post(api, PREFIX + "x.git"), 400)["details"]["repository"][0]
    assert post(api, str(allowed / "team" / "repo")).status_code == 201
    assert post(api, PREFIX + "team/x.git").status_code == 201
    other_tenant = member_client("globex", "bob")
    assert post(other_tenant, str(allowed / "repo")).status_code == 201  # the settings' own


def test_a_tenant_entry_the_settings_no_longer_allow_narrows_to_nothing(api, allowed, settings, tmp_path):
    commit_repository(allowed / "team" / "repo", {"t.txt": "t\n"})
    Tenant.objects.filter(slug="acme").update(repository_roots=[str(allowed / "team")])
    settings.REPOSITORY_ROOTS = [str(tmp_path / "elsewhere")]

    error = error_of(post(api, str(allowed / "team" / "repo")), 400)

    assert error["details"]["repository"] == ["the repository is not under an allowed root"]


def test_a_session_whose_repository_the_tenant_no_longer_allows_fails_at_its_start(api, allowed):
    created = post(api, str(allowed / "repo"), tasks=[{"key": "a", "title": "a", "capability": "testing"}])
    session_id = created.json()["id"]
    Tenant.objects.filter(slug="acme").update(repository_roots=[str(allowed / "team")])
    assert api.post(f"{SESSIONS}{session_id}/start/").status_code == 202

    assert dispatch_session(session_id) is False

    session = Session.objects.get(pk=session_id)
    assert session.status == "failed"
    assert session.events.order_by("-version").first().reason == (
        "could not prepare the workspace: the repository is not under an allowed root"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repository_roots", ["/"]),
        ("repository_roots", ["{tmp}/secret"]),
        ("repository_roots", ["relative"]),
        ("repository_url_prefixes", ["https://"]),
        ("repository_url_prefixes", ["https://git.example.com/"]),
        ("repository_url_prefixes", ["https://git.example.com/acme-evil/"]),
        ("repository_url_prefixes", ["https://git.example.com:8443/acme/"]),
        ("repository_url_prefixes", ["git@git.example.com:acme/"]),
        ("repository_url_prefixes", ["file:///"]),
    ],
)
def test_a_tenant_narrowing_that_would_widen_the_settings_is_refused(allowed, tmp_path, field, value):
    tenant = Tenant(slug="t", name="T", **{field: [v.format(tmp=tmp_path) for v in value]})

    with pytest.raises(ValidationError) as refused:
        tenant.full_clean()

    assert set(refused.value.message_dict) == {field}


def test_a_tenant_narrowing_inside_the_settings_is_accepted(allowed):
    tenant = Tenant(
        slug="t",
        name="T",
        repository_roots=[str(allowed / "team"), str(allowed)],
        repository_url_prefixes=[PREFIX + "team", "ssh://git.example.com/acme/x/"],
    )
    tenant.full_clean()


def test_the_admin_refuses_a_tenant_narrowing_that_widens(admin_client, allowed, tmp_path):
    form = {
        "slug": "t",
        "name": "T",
        "repository_roots": str(tmp_path / "secret"),
        "repository_url_prefixes": PREFIX + "team/",
        "weight": "1",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }

    response = admin_client.post("/admin/tenants/tenant/add/", form)

    assert response.status_code == 200
    assert "not under any of REPOSITORY_ROOTS" in response.content.decode()
    assert not Tenant.objects.filter(slug="t").exists()
    form["repository_roots"] = str(allowed / "team")
    assert admin_client.post("/admin/tenants/tenant/add/", form).status_code == 302
    assert Tenant.objects.get(slug="t").repository_roots == [str(allowed / "team")]


def test_a_preview_with_a_repository_needs_to_know_the_tenant(db, allowed):
    client = member_client("acme", "carol")
    member_client("globex", "carol")
    body = {"requirements": "change it", "repository": str(allowed / "repo")}

    error = error_of(client.post("/api/v1/decompositions/preview/", body, format="json"), 400)

    assert error["details"]["tenant"] == ["you belong to several tenants; name one"]
    named = client.post("/api/v1/decompositions/preview/", {**body, "tenant": "acme"}, format="json")
    assert named.status_code == 200, named.content
