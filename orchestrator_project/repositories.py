"""A session's `repository` in its parsed, normalised form, and whether it lies under allowed
roots and URL prefixes.

Repository input comes from the API and ends up on git's command line, so it is checked on the
form git acts on, never on the raw string: a URL is split with urllib.parse, its path
percent-decoded and normalised before it is compared, and what is stored and given to git is
the canonical form rebuilt from the checked parts. Prefixes are compared on parsed components
(scheme, host and port exactly, the path on segment boundaries), local paths on their real paths.

Pure functions: the roots and prefixes that apply (the settings, or a tenant's narrowing of them)
are passed in. The messages of RefusedRepository go back to the API client, so they name neither
server paths nor the configured roots or prefixes.
"""

import ipaddress
import os
import posixpath
import re
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

SCHEMES = ("https", "http", "ssh", "git")
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# Left alone when the decoded path is quoted again: unreserved characters and sub-delimiters,
# never "%", so that a decoded "%2e" stays a literal name and is not decoded a second time.
_PATH_SAFE = "/!$&'()*+,;=:@~"


class RefusedRepository(ValueError):
    """Repository input we do not accept; the message says why, for the API client."""


class GitUrl(NamedTuple):
    scheme: str
    host: str | None  # lowercased; None only in a prefix that names a scheme alone
    port: int | None  # None for the scheme's default port
    path: str  # percent-decoded and normalised, absolute

    @property
    def segments(self) -> list[str]:
        return [segment for segment in self.path.split("/") if segment]

    def __str__(self) -> str:
        if self.host is None:
            return f"{self.scheme}://"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{host}{port}{quote(self.path, safe=_PATH_SAFE)}"


def is_url(repository: str) -> bool:
    """Whether stored repository input names a remote repository (anything but a local path)."""
    return not repository.startswith("/")


def normalise_repository(raw: str) -> str:
    """The canonical form of repository input: a local path normalised (no `..`), or a URL
    rebuilt from its checked parts. Raises RefusedRepository."""
    if any(ord(char) < 32 or ord(char) == 127 for char in raw) or raw != raw.strip():
        raise RefusedRepository("the repository must not contain control characters or surrounding spaces")
    if raw.startswith("-"):
        raise RefusedRepository("the repository must not start with '-'")
    if raw.startswith("/"):
        return normalise_path(raw)
    if _SCHEME.match(raw):
        return str(parse_url(raw))
    if "::" in raw:
        raise RefusedRepository("git transports such as ext:: are not accepted; give an https:// or ssh:// URL")
    if re.match(r"^[^/]*:", raw):
        raise RefusedRepository("scp-like addresses (host:path) are not accepted; give an ssh:// URL")
    raise RefusedRepository("a local repository must be an absolute path (or give a git URL)")


def normalise_path(raw: str) -> str:
    """A local path with its `.` and repeated slashes removed; `..` is refused rather than
    resolved, so the stored path is the one that was checked."""
    if ".." in raw.split("/"):
        raise RefusedRepository("'..' is not allowed in a repository path")
    return "/" + posixpath.normpath(raw).lstrip("/")


def parse_url(raw: str) -> GitUrl:
    """A repository URL in parsed, normalised form. Refuses transports other than SCHEMES
    (file:// included: a local repository is named by its absolute path), any user name or
    password, a query or fragment, a host that is not a plain name or IP address, and a path
    that holds `..`, a backslash or a control character once percent-decoded."""
    url = _parse(raw)
    if not url.segments:
        raise RefusedRepository("the repository URL names no repository")
    return url


def parse_url_prefix(raw: str) -> GitUrl:
    """A URL prefix of the settings or a tenant: `scheme://` (any host of that scheme), or
    `scheme://host[:port]` with an optional path that matches on segment boundaries."""
    match = _SCHEME.match(raw)
    if match and raw == match.group(0):
        return GitUrl(_scheme(match.group(1)), None, None, "/")
    return _parse(raw)


def _scheme(name: str) -> str:
    scheme = name.lower()
    if scheme == "file":
        raise RefusedRepository("file:// URLs are not accepted; name a local repository by its absolute path")
    if scheme not in SCHEMES:
        raise RefusedRepository("only https://, http://, ssh:// and git:// URLs are accepted")
    return scheme


def _parse(raw: str) -> GitUrl:
    match = _SCHEME.match(raw)
    if not match:
        raise RefusedRepository("the repository URL must start with scheme://")
    scheme = _scheme(match.group(1))
    if any(ord(char) <= 32 or ord(char) == 127 for char in raw) or "\\" in raw:
        raise RefusedRepository("the repository URL must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise RefusedRepository("the repository URL is not a valid URL") from None
    if "?" in raw or "#" in raw:
        raise RefusedRepository("the repository URL must not have a query or a fragment")
    if "@" in parts.netloc:
        raise RefusedRepository(
            "the repository URL must not carry a user name or credentials: the workers' own are used "
            "(for ssh://, the user comes from their ssh config)"
        )
    host = _host(parts.hostname or "")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise RefusedRepository("the repository URL's path is not valid UTF-8 once decoded") from None
    if any(ord(char) < 32 or ord(char) == 127 for char in path) or "\\" in path:
        raise RefusedRepository("the repository URL's path holds control characters or backslashes once decoded")
    if ".." in path.split("/"):
        raise RefusedRepository("'..' is not allowed in a repository URL")
    path = "/" + posixpath.normpath("/" + path).lstrip("/")
    return GitUrl(scheme, host, None if port == _DEFAULT_PORTS[scheme] else port, path)


def _host(host: str) -> str:
    if not host or host.startswith("-") or "%" in host:
        raise RefusedRepository("the repository URL has no valid host")
    if _HOST.match(host):
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise RefusedRepository("the repository URL has no valid host") from None


def url_has_prefix(url: GitUrl, prefix: GitUrl) -> bool:
    """Whether `url` lies under `prefix`: the same scheme, and unless the prefix names a scheme
    alone, the same host and port and the prefix's path segments first."""
    if url.scheme != prefix.scheme:
        return False
    if prefix.host is None:
        return True
    if url.host is None or (url.host, url.port) != (prefix.host, prefix.port):
        return False
    return url.segments[: len(prefix.segments)] == prefix.segments


def url_allowed(url: GitUrl, prefixes: list[str]) -> bool:
    return any(url_has_prefix(url, parse_url_prefix(prefix)) for prefix in prefixes)


def path_under(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies inside it, both compared on their real paths (symbolic
    links resolved), so that a link under a root cannot lead outside it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def path_allowed(path: str, roots: list[str]) -> bool:
    return any(path_under(path, root) for root in roots)
