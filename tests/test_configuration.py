"""docs/CONFIGURATION.md and what the code reads agree: every variable settings.py reads is
documented, every documented setting is read, and the variables documented as read by make,
the Procfiles and the scripts are read there."""

import ast
import re

from tests.conftest import ROOT

DOC = ROOT / "docs" / "CONFIGURATION.md"
HELPERS = {
    "env_str",
    "env_bool",
    "env_int",
    "env_float",
    "env_list",
    "env_absolute_paths",
    "env_url_prefixes",
    "env_json_dict",
    "env_rate",
}


def variables_settings_reads() -> set[str]:
    """The names settings.py passes to its env_* helpers or to os.environ.get / os.environ[...]."""
    tree = ast.parse((ROOT / "orchestrator_project" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else ast.unparse(func)
            if called in HELPERS or called == "os.environ.get":
                names.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            names.add(ast.literal_eval(node.slice))
    return names


def documented(section: str) -> dict[str, str]:
    """{variable: its table row} for the tables under the `## section` heading of the doc."""
    text = DOC.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        match = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_variable_settings_reads_is_documented_and_nothing_else():
    read = variables_settings_reads()
    listed = set(documented("Settings"))

    assert read - listed == set(), "read by settings.py, missing from docs/CONFIGURATION.md"
    assert listed - read == set(), "in docs/CONFIGURATION.md's Settings, but settings.py does not read it"


def test_the_parser_of_this_test_sees_every_kind_of_read():
    # Guards the test itself: a helper call split over lines, os.environ.get, os.environ[...].
    read = variables_settings_reads()

    assert {"EAP_HEARTBEAT_INTERVAL_SECONDS", "API_THROTTLE_USER", "LOG_LEVEL", "SECRET_KEY"} <= read


def test_variables_of_make_the_procfiles_and_the_scripts_are_read_where_the_doc_says():
    for name, row in documented("Read by make, the Procfiles and the scripts").items():
        readers = re.findall(r"`([\w./-]+)`", row.split("|")[3])
        assert readers, f"{name}: the doc names no file that reads it"
        for reader in readers:
            assert re.search(rf"\b{name}\b", (ROOT / reader).read_text()), f"{name} is not read by {reader}"
