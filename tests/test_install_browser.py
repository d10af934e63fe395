"""Without root, `make test` runs what it can: a missing Chromium skips the browser tests with the command that
installs it, unless SHADOWLAB_REQUIRE_BROWSER is set (CI), where it fails."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_browser import REQUIRE_BROWSER, _browser_binaries

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("required, outcome", [("", pytest.skip.Exception), ("1", pytest.fail.Exception)])
def test_a_missing_browser_skips_with_the_install_command_unless_required(monkeypatch, required, outcome):
    """Without Chromium (no root to install it) the browser tests skip and say what to run; with
    SHADOWLAB_REQUIRE_BROWSER=1 (CI) they fail instead."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv(REQUIRE_BROWSER, required)
    with pytest.raises(outcome, match=r"chromium, chromedriver is missing: run `sudo apt-get install -y chromium"):
        _browser_binaries()


def test_install_browser_says_what_to_run_without_root(tmp_path):
    """scripts/install-browser as a user without root or password-less sudo: exit 1 and the one command to run."""
    if not shutil.which("apt-get"):
        pytest.skip("not a Debian/Ubuntu machine: the script's no-root message is the apt-get one")
    # a PATH with bash, env and apt-get but no chromium, no sudo, and an `id` that says uid 1000
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "id", "apt-get"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").unlink(missing_ok=True)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")          # not root
    (bin_dir / "id").chmod(0o755)
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "install-browser")], capture_output=True,
                          text=True, env={"PATH": str(bin_dir)})
    assert proc.returncode == 1
    assert "sudo apt-get install -y chromium chromium-driver" in proc.stderr
    assert "skips the" in proc.stderr and "browser tests" in proc.stderr
