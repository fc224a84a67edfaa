import json
import subprocess
import sys


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


def test_convert_round_trip_on_the_command_line(tiny_wan_dir, tmp_path):
    out = vigu("convert", str(tiny_wan_dir), str(tmp_path / "vigu"), "--set", "text.latent_dim=8")
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


def test_convert_missing_folder_is_one_line(tmp_path):
    out = vigu("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a diffusers pipeline folder (no model_index.json): give a local "
        "Wan2.1 diffusers folder or a vigu folder"
    ]
    assert not (tmp_path / "out").exists()
