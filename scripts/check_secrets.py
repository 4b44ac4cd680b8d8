"""`make lint`'s secret scan: detect-secrets over every file git knows (tracked, and new files
not ignored), failing on any secret that .secrets.baseline does not already list.

The baseline lists the audited findings (local defaults such as guest:guest, and the fake
credentials the redaction tests feed in), each marked is_secret false. Findings are matched by
file and hash, not line: detect-secrets-hook rewrites the baseline when only line numbers moved
and exits 3, so it runs on a copy here and that case passes. After adding a finding that is
not a secret, refresh the baseline and audit it (docs/SECURITY.md, Scanning).

Usage: python scripts/check_secrets.py [FILE ...]   (default: the repository's files)
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from detect_secrets.pre_commit_hook import main as detect_secrets_hook

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".secrets.baseline"
# Not scanned: pinned hashes and the npm lock are long hex strings, not secrets (the same list
# is in the baseline's filters, for `detect-secrets scan --baseline`).
SKIPPED = ("package-lock.json", "requirements.txt", "requirements-dev.txt", ".secrets.baseline")
NEW_SECRETS = 1  # detect-secrets-hook's exit status when it found one


def repository_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if Path(name).name not in SKIPPED and (ROOT / name).is_file()]


def main(files: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline.json"
        shutil.copyfile(BASELINE, baseline)
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            status = detect_secrets_hook(["--baseline", str(baseline), *files])
    if status == NEW_SECRETS:
        print(report.getvalue())
        return 1
    return 0  # 3 says it updated line numbers in its copy: nothing new


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1:]))
    os.chdir(ROOT)  # the baseline names files relative to the repository
    sys.exit(main(repository_files()))
