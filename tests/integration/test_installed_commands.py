"""The commands as installed, run the way an administrator or a test outside this
repository runs them: the ``twistd`` and ``mailsys`` scripts from the Python
installation, in an empty directory, with no PYTHONPATH.

Every other integration test starts the server through ``harness.TWISTD`` with the
checkout on sys.path, which would hide an installation that cannot find the
twistd plugin: setuptools' default editable mode maps the ``mailsys`` package
but not ``twisted/plugins/``, and ``twistd -n mailsys`` then said "Unknown
command: mailsys" everywhere but the checkout (.ci/test-all installs in "compat"
mode for that reason)."""
import os
import subprocess
import sysconfig

import pytest

pytestmark = pytest.mark.integration

SCRIPTS = sysconfig.get_path("scripts")


def run(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAILSYS_CONFIG")}
    return subprocess.run([os.path.join(SCRIPTS, argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_installed_twistd_finds_the_mailsys_plugin_outside_the_checkout(tmp_path):
    result = run(tmp_path, "twistd", "-n", "mailsys", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Usage: twistd [options] mailsys [options]\n")
    assert "Unknown command" not in result.stdout + result.stderr


def test_installed_mailsys_command_checks_the_embedded_default_outside_the_checkout(tmp_path):
    result = run(tmp_path, "mailsys", "config", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []     # a check creates nothing
