"""The docs stand on their own and point at code that exists: the README stays short, every
relative link resolves, and every file of ours a doc names in backticks is there."""

import re

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUR_FOLDERS = "api|tasks|sessions|agents|tenants|orchestrator_project|tests|bench|scripts|docs|mockllm|examples"
# A folder of ours and then folders ("tasks/decomposition/") or a file ("tasks/running.py"); an API
# path such as `tasks/next` is neither.
PATH = re.compile(rf"`((?:{OUR_FOLDERS})/(?:[\w.-]+/)*(?:[\w-]+\.\w+)?)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_fits_two_hundred_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{target} points outside the repository"
        assert resolved.exists(), f"{target} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_file_of_ours_a_doc_names_exists(doc):
    missing = [path for path in PATH.findall(doc.read_text()) if not (ROOT / path).exists()]
    assert missing == []


def test_the_path_check_sees_paths():
    # Guards the test above against a pattern that matches nothing.
    assert PATH.findall("see `tasks/running.py` and `api/`") == ["tasks/running.py", "api/"]
