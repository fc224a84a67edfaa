import json
import os
import subprocess
import sys

from conftest import TINY


MISSION = ["build-dataset", "train", "caption", "generate", "joint", "eval"]


def vigu(*args):
    return subprocess.run([sys.executable, "-m", "vigu_cli", *args], capture_output=True, text=True)


def test_help_lists_every_mission_command():
    out = vigu("--help")
    assert out.returncode == 0
    for command in MISSION + ["recipe"]:
        assert command in out.stdout


def test_bad_override_is_one_line_and_exit_1():
    out = vigu("recipe", "world-tiny", "--set", "sampling.stpes=3")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: unknown recipe key 'sampling.stpes' in sampling: did you mean 'steps'?"]
    planned = vigu("train", "--stage", "recall", "--accelerate-config", "8xh800-fsdp")  # without --dry-run
    assert planned.returncode == 1 and planned.stderr.strip().splitlines() == [
        "error: --accelerate-config plans a --dry-run; to train with 8xh800-fsdp, launch `accelerate launch "
        "--config_file 8xh800-fsdp -m vigu_cli train ...`"]
    dry = vigu("train", "--stage", "bogus", "--dry-run")
    assert dry.returncode == 1
    assert dry.stderr.strip().splitlines() == ["error: unknown stage 'bogus': use one of base, recall, refine"]


def test_convert_round_trip_on_the_command_line(tiny_wan_dir, tmp_path):
    tiny = [arg for o in TINY for arg in ("--set", o)]  # the recipe that describes the tiny folder
    out = vigu("convert", str(tiny_wan_dir), str(tmp_path / "vigu"), *tiny, "--set", "text.latent_dim=8")
    assert out.returncode == 0, out.stderr
    assert "UniViGUPipeline" in out.stderr
    index = json.loads((tmp_path / "vigu" / "model_index.json").read_text())
    assert index["_class_name"] == "UniViGUPipeline" and index["text_tokenizer"][1]
    config = json.loads((tmp_path / "vigu" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "UniViGUTransformer" and config["text_latent_dim"] == 8
    back = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "wan"))
    assert back.returncode == 0 and "WanPipeline" in back.stderr
    assert json.loads((tmp_path / "wan" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert not list(tmp_path.glob(".*tmp*"))
    # an existing folder is never replaced unasked, and the source never
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    kept = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "mine"))
    assert kept.returncode == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert kept.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'mine'} already exists: choose a new folder, or pass --overwrite to replace it")
    same = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "vigu"), "--overwrite")
    assert same.returncode == 1 and "is the folder being converted" in same.stderr
    assert json.loads((tmp_path / "vigu" / "model_index.json").read_text())["_class_name"] == "UniViGUPipeline"
    # --overwrite replaces a model folder only: not a user's folder, not a folder holding SRC, not a file
    mine = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "mine"), "--overwrite")
    assert mine.returncode == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert mine.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'mine'} is not a model folder (no model_index.json): --overwrite replaces model folders "
        "only; choose a new folder")
    parent = vigu("convert", str(tmp_path / "vigu"), str(tmp_path), "--overwrite")
    assert parent.returncode == 1 and "holds the folder being converted" in parent.stderr
    (tmp_path / "file.txt").write_text("mine")
    file = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "file.txt"), "--overwrite")
    assert file.stderr.strip().splitlines() == [f"error: DST {tmp_path / 'file.txt'} is a file: give a folder path"]
    assert (tmp_path / "file.txt").read_text() == "mine"
    replaced = vigu("convert", str(tmp_path / "vigu"), str(tmp_path / "wan"), "--overwrite")
    assert replaced.returncode == 0
    assert json.loads((tmp_path / "wan" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    # readable by others as the umask allows (tempfile makes folders 0700, safetensors files 0600)
    mask = os.umask(0)
    os.umask(mask)
    modes = {oct(p.stat().st_mode & 0o777) for p in [tmp_path / "wan", *(tmp_path / "wan").rglob("*")]}
    assert modes == {oct(0o777 & ~mask), oct(0o666 & ~mask)}
    # a recipe that describes another model is refused, not ignored: its text stream and shape would be wrong here
    other = vigu("convert", str(tiny_wan_dir), str(tmp_path / "other"), *tiny, "--set", "model.transformer.num_layers=3")
    assert other.returncode == 1 and not (tmp_path / "other").exists()
    assert other.stderr.strip().splitlines()[-1:] == [  # after diffusers' loading bars
        f"error: the model in {tiny_wan_dir} is not the one recipe 'world-tiny' describes (num_layers is 2 there, 3 in "
        "the recipe): pass the recipe of that model or make model.transformer match the folder"]


def test_convert_missing_folder_is_one_line(tmp_path):
    out = vigu("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a diffusers pipeline folder (no model_index.json): give a local "
        "Wan2.1 diffusers folder or a vigu folder"
    ]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_saying_how_to_go_on(monkeypatch, capsys):
    import pytest

    from vigu_cli import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted: what was finished is kept; run the same command again to go on (vigu train: add --resume)"]


def test_the_command_line_makes_openmp_threads_wait_passively_unless_told_otherwise():
    """Spinning OpenMP threads stall a small model next to any other busy process (10x, README): the CLI sets
    OMP_WAIT_POLICY=PASSIVE before torch loads, and keeps a user's own setting."""
    probe = "import os, vigu_cli.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    given = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                           capture_output=True, text=True, check=True)
    assert (unset.stdout.strip(), given.stdout.strip()) == ("PASSIVE", "ACTIVE")
