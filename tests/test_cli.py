import subprocess
import sys

import pytest

MISSION = ["build-dataset", "train", "caption", "generate", "joint", "eval"]


def vigu(*args):
    return subprocess.run([sys.executable, "-m", "vigu_cli", *args], capture_output=True, text=True)


def test_help_lists_every_mission_command():
    out = vigu("--help")
    assert out.returncode == 0
    for command in MISSION + ["recipe"]:
        assert command in out.stdout


UNBUILT = ["build-dataset", "train", "caption", "generate", "joint", "eval"]  # shrinks as commands land


@pytest.mark.parametrize("command", UNBUILT)
def test_unbuilt_commands_say_so_and_fail(command):
    out = vigu(command)
    assert "not built yet" in out.stderr and "arrives in vigu" in out.stderr
    assert out.returncode == 2
    assert out.stdout == ""


def test_bad_override_is_one_line_and_exit_1():
    out = vigu("recipe", "world-tiny", "--set", "sampling.stpes=3")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: unknown recipe key 'sampling.stpes' in sampling: did you mean 'steps'?"]
