"""`make lint`'s secret scan (scripts/check_secrets.py): a new secret fails it, a file without
one passes, and a finding the audited baseline lists passes wherever its line moved."""

import json
import shutil
import subprocess
import sys

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_secrets.py"
FAKE_AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key  # pragma: allowlist secret


def check(*files) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, files)], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_a_new_aws_key_fails_the_scan_naming_the_file(tmp_path):
    leaked = tmp_path / "settings_local.py"
    leaked.write_text(f'AWS_ACCESS_KEY_ID = "{FAKE_AWS_KEY}"\n')

    scan = check(leaked)

    assert scan.returncode == 1
    assert "AWS Access Key" in scan.stdout
    assert "settings_local.py" in scan.stdout


def test_a_file_without_secrets_passes(tmp_path):
    clean = tmp_path / "clean.py"
    clean.write_text('GREETING = "hello"\n')

    assert check(clean).returncode == 0


def test_every_baseline_finding_is_audited_as_not_a_secret():
    findings = json.loads((ROOT / ".secrets.baseline").read_text())["results"]

    assert findings
    assert all(finding["is_secret"] is False for items in findings.values() for finding in items)


def test_a_baseline_finding_that_moved_to_another_line_still_passes(tmp_path):
    findings = json.loads((ROOT / ".secrets.baseline").read_text())["results"]
    name = "tests/test_redaction.py"
    assert name in findings
    moved = tmp_path / "repo"
    (moved / "tests").mkdir(parents=True)
    shutil.copyfile(ROOT / ".secrets.baseline", moved / ".secrets.baseline")
    (moved / "scripts").mkdir()
    shutil.copyfile(SCRIPT, moved / "scripts" / "check_secrets.py")
    (moved / name).write_text("\n\n\n" + (ROOT / name).read_text())
    subprocess.run(["git", "init", "-q"], cwd=moved, check=True)

    scan = subprocess.run(
        [sys.executable, "scripts/check_secrets.py", name], cwd=moved, capture_output=True, text=True, check=False
    )

    assert scan.returncode == 0, scan.stdout
