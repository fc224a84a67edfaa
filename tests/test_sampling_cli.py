"""`vigu caption`, `vigu generate`, `vigu joint` and `vigu eval` end to end on a tiny model.

Most runs call the CLI's `main()` in this process (the same code as `python -m vigu_cli`, without
the ~4 s of imports per run); one test runs it as a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import nudged_pipeline, tiny_recipe
from vigu_cli import cli, evaluate
from vigu_cli.build_dataset import build_dataset
from vigu_cli.core.convert import load_pipeline, save_folder
from vigu_cli.core.pipeline import UniViGUPipeline
from vigu_cli.core.text import DiscreteTextFlow
from vigu_cli.data import world
from vigu_cli.data.video_io import frames_to_tensor, load_clip, read_video, write_video
from vigu_cli.recipe import dump_recipe, load_recipe
from vigu_cli.run_eval import world_items
from vigu_cli.sampling import SamplingOptions, load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left", "a blue square staying still", "a green triangle moving up"]
FLOAT32 = ("--dtype", "float32")  # what --dtype auto is on most CPUs, but not on one with AMX


@pytest.fixture(scope="session")
def model_dir(tiny_wan_dir, tmp_path_factory):
    """A tiny vigu folder whose weights are nudged off their init, so that the text stream says something."""
    return save_folder(nudged_pipeline(tiny_wan_dir), tmp_path_factory.mktemp("model") / "vigu")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    """A world clip at another canvas and length than the model's (24 x 20 x 12 vs 16 x 16 x 9)."""
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_video(path, world.render(world.sample_clip(np.random.default_rng(5), 24, 20, 12)), 8)
    return path


class Run:
    def __init__(self, code, out, err):
        self.code, self.stdout, self.stderr = code, out, err

    @property
    def lines(self):
        return self.stdout.splitlines()


@pytest.fixture
def vigu(capsys, monkeypatch):
    """`vigu ARGS...` through the CLI's `main()`: exit code, stdout, stderr."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["vigu", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------------
# Each command end to end
# ----------------------------------------------------------------------------------------------------


def test_generate_writes_an_mp4_and_a_sidecar_per_prompt(vigu, model_dir, tmp_path):
    out = tmp_path / "gen"
    (tmp_path / "prompts.txt").write_text(f"\n{PROMPTS[1]}\n\n")  # arguments first, then the file's lines
    run = vigu("generate", PROMPTS[0], "--prompts-file", tmp_path / "prompts.txt", "--model", model_dir, "--out", out,
               "--batch", "2", "--seed", "7", "--steps", "3", "--solver", "heun", "--video-eta", "0",
               "--guidance-video", "2.5")
    assert run.code == 0, run.stderr
    names = ["000-a-red-circle-moving-left", "001-a-blue-square-staying-still"]
    assert run.lines == [str(out / f"{name}.mp4") for name in names]
    for i, name in enumerate(names):
        assert read_video(out / f"{name}.mp4").shape == (9, 16, 16, 3)  # the model's shape
        sidecar = json.loads((out / f"{name}.json").read_text())
        assert {k: sidecar[k] for k in ("mode", "prompt", "index", "seed", "steps", "solver", "guidance_video",
                                         "text_stream", "fps", "model", "batch")} == {
            "mode": "generate", "prompt": PROMPTS[i], "index": i, "seed": 7 + i, "steps": 3, "solver": "heun",
            "guidance_video": 2.5, "text_stream": "prompt", "fps": 8, "model": str(model_dir), "batch": 2}
        assert sidecar["shift"] == 3.0 and sidecar["seconds"] > 0
        # generate's text, if any, is the prompt: the text's settings, which do nothing here, are left out
        assert not {"guidance_text", "text_shift", "text_temperature", "text_order", "caption_candidates"} & set(sidecar)
    assert no_temporary_files(out)

    negative = vigu("generate", PROMPTS[0], "--model", model_dir, "--out", tmp_path / "negative", "--seed", "7", "--steps",
                    "3", "--solver", "heun", "--video-eta", "0", "--guidance-video", "2.5", "--negative-prompt", PROMPTS[1],
                    "--json")
    record = json.loads(negative.stdout)
    assert record["negative_prompt"] == PROMPTS[1] and sidecar["negative_prompt"] == ""
    assert not np.array_equal(read_video(record["video"]), read_video(out / f"{names[0]}.mp4"))  # guided away from it

    plain = vigu("generate", PROMPTS[0], "--model", model_dir, "--out", tmp_path / "plain", "--seed", "7", "--steps", "3",
                 "--solver", "heun", "--video-eta", "0", "--guidance-video", "2.5", "--text-stream", "none", "--json")
    record = json.loads(plain.stdout)
    assert record["text_stream"] == "none"  # plain Wan: no text tokens, so another video from the same noise
    assert not np.array_equal(read_video(record["video"]), read_video(out / f"{names[0]}.mp4"))


def test_caption_of_an_mp4_equals_pipeline_caption_on_the_same_tensor(vigu, model_dir, clip_path, tmp_path):
    run = vigu("caption", clip_path, "--model", model_dir, "--seed", "3", "--json", "--out", tmp_path / "cap",
               *FLOAT32)  # as from_pretrained loads it
    assert run.code == 0, run.stderr
    [record] = [json.loads(line) for line in run.lines]
    pipe = UniViGUPipeline.from_pretrained(model_dir, local_files_only=True)
    clip = frames_to_tensor(load_clip(clip_path, 9, 16, 16))[None]  # fitted as build-dataset fits clips
    expected = pipe.caption(clip, generator=torch.Generator().manual_seed(3)).texts[0]
    assert record["caption"] == expected and expected.strip()
    assert record["clip"] == str(clip_path) and record["hint"] is None and record["seed"] == 3
    assert (tmp_path / "cap" / "000-clip.txt").read_text() == expected + "\n"
    assert json.loads((tmp_path / "cap" / "000-clip.json").read_text()) == record

    (tmp_path / "clips.txt").write_text(f"{clip_path}\n")
    hint = "a blue square staying still"  # one that moves this tiny model's coarse nearest-row decode
    hinted = vigu("caption", "--clips-file", tmp_path / "clips.txt", "--model", model_dir, "--seed", "3",
                  "--hint", hint, *FLOAT32)
    assert hinted.code == 0 and len(hinted.lines) == 1 and hinted.lines[0] != expected  # the hint conditions
    assert hinted.lines[0] == pipe.caption(clip, hint, generator=torch.Generator().manual_seed(3)).texts[0]


def test_text_sampling_options_reach_the_discrete_solver(vigu, tiny_wan_dir, clip_path, tmp_path):
    pipe = nudged_pipeline(tiny_wan_dir, "text.formulation=discrete")
    model = save_folder(pipe, tmp_path / "discrete")
    clip = frames_to_tensor(load_clip(clip_path, 9, 16, 16))[None]
    captions = {}
    for temperature, order, text_shift in (("0", "random", "3"), ("1", "random", "3"), ("0", "confidence", "0.5")):
        run = vigu("caption", clip_path, "--model", model, "--seed", "3", "--text-temperature", temperature,
                   "--text-order", order, "--text-shift", text_shift, "--json", *FLOAT32)
        record = json.loads(run.stdout)
        assert (record["text_temperature"], record["text_order"], record["text_shift"]) == (
            float(temperature), order, float(text_shift))
        expected = pipe.caption(clip, generator=torch.Generator().manual_seed(3), text_temperature=float(temperature),
                                text_order=order, text_shift=float(text_shift))
        assert record["caption"] == expected.texts[0]
        captions[temperature, order] = record["caption"]
    assert len(set(captions.values())) == 3


def test_a_stock_folder_converted_on_the_fly_samples_as_its_saved_conversion(tiny_wan_dir, tmp_path):
    """In bfloat16 a Wan folder converted on the fly gets the parameters its saved conversion loads with: values
    and dtypes, the modules diffusers keeps in float32 unrounded (the base's scores compare with its models')."""
    recipe = tmp_path / "tiny.yaml"  # the recipe of the tiny folder, as a user gives the recipe of theirs
    recipe.write_text(dump_recipe(tiny_recipe()))
    saved = save_folder(load_pipeline(tiny_wan_dir, load_recipe(recipe)), tmp_path / "vigu")
    converted, loaded = (load_model(SamplingOptions(model=str(path), recipe=str(recipe), dtype="bfloat16")).transformer
                         for path in (tiny_wan_dir, saved))
    params = dict(loaded.named_parameters())
    for name, param in converted.named_parameters():
        assert param.dtype == params[name].dtype and torch.equal(param, params[name]), name
    assert params["scale_shift_table"].dtype == torch.float32 and params["proj_out.weight"].dtype == torch.bfloat16


def test_joint_on_the_command_line_writes_mp4_caption_and_sidecar(model_dir, tmp_path):
    """The one subprocess run: `python -m vigu_cli joint`; stdout is `mp4<TAB>caption`, stderr stays quiet."""
    out = tmp_path / "joint"
    run = subprocess.run([sys.executable, "-m", "vigu_cli", "joint", PROMPTS[0], "--model", str(model_dir), "--out",
                          str(out)], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    video, caption = run.stdout.rstrip("\n").split("\t")
    name = "000-a-red-circle-moving-left"
    assert video == str(out / f"{name}.mp4") and read_video(video).shape == (9, 16, 16, 3)
    assert (out / f"{name}.txt").read_text() == caption + "\n"
    sidecar = json.loads((out / f"{name}.json").read_text())
    assert sidecar["mode"] == "joint" and sidecar["caption"] == caption and sidecar["prompt"] == PROMPTS[0]


# ----------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------


def joint_outputs(vigu, model_dir, out, *args):
    run = vigu("joint", *PROMPTS, "--model", model_dir, "--out", out, *args)
    assert run.code == 0, run.stderr
    rows = [line.split("\t") for line in run.lines]
    return [read_video(video).astype(int) for video, _ in rows], [caption for _, caption in rows]


def test_same_seed_same_output_whatever_the_batch(vigu, model_dir, tmp_path):
    """Sample i draws from its own generator (seed + i). Same batch: the same bits. Another batch: the
    same captions and frames up to rounding (BLAS picks other kernels for other matrix shapes, and the
    solver's 4 guided steps amplify the last bits at a few edge pixels: measured, under 1% of pixels more
    than 2 levels off, a mean of 0.07 levels; in float32), where another seed changes most pixels."""
    videos, captions = joint_outputs(vigu, model_dir, tmp_path / "a", "--batch", "3", "--seed", "11", *FLOAT32)
    again, again_captions = joint_outputs(vigu, model_dir, tmp_path / "b", "--batch", "3", "--seed", "11", *FLOAT32)
    assert captions == again_captions and all(np.array_equal(x, y) for x, y in zip(videos, again))

    single, single_captions = joint_outputs(vigu, model_dir, tmp_path / "c", "--batch", "1", "--seed", "11", *FLOAT32)
    assert single_captions == captions
    assert all(np.abs(x - y).mean() < 0.5 and np.mean(np.abs(x - y) > 2) < 0.02 for x, y in zip(videos, single))

    other, other_captions = joint_outputs(vigu, model_dir, tmp_path / "d", "--batch", "3", "--seed", "12", *FLOAT32)
    assert other_captions != captions and all(np.mean(x != y) > 0.5 for x, y in zip(videos, other))


def test_video_eta_reaches_the_video_solver_and_keeps_seeds(vigu, model_dir, tmp_path):
    """`--video-eta`: in the sidecar; the same seed gives the same clip; not the deterministic flow's clip."""
    clips = {}
    for name, eta in (("a", "0.7"), ("b", "0.7"), ("euler", "0")):
        run = vigu("generate", PROMPTS[0], "--model", model_dir, "--out", tmp_path / name, "--seed", "5", "--steps", "3",
                   "--video-eta", eta, *FLOAT32)
        assert run.code == 0, run.stderr
        assert json.loads(Path(run.lines[0]).with_suffix(".json").read_text())["video_eta"] == float(eta)
        clips[name] = read_video(run.lines[0])
    assert np.array_equal(clips["a"], clips["b"])
    assert np.mean(clips["a"] != clips["euler"]) > 0.5
    default = vigu("generate", PROMPTS[0], "--model", model_dir, "--out", tmp_path / "default", "--steps", "1")
    assert json.loads(Path(default.lines[0]).with_suffix(".json").read_text())["video_eta"] == tiny_recipe().sampling.video_eta


def test_heun_integrates_the_deterministic_flow_in_place_of_the_models_stochastic_step(vigu, model_dir, clip_path,
                                                                                     tmp_path):
    """The model's default video_eta (1: a stochastic Euler step) does not stop `--solver heun`: Heun integrates the
    deterministic flow (the sidecar says video_eta 0), the same clip as asking for it; caption takes Heun too."""
    assert tiny_recipe().sampling.video_eta > 0
    clips = {}
    for name, extra in (("heun", ()), ("explicit", ("--video-eta", "0"))):
        run = vigu("generate", PROMPTS[0], "--model", model_dir, "--out", tmp_path / name, "--seed", "5", "--steps", "3",
                   "--solver", "heun", *extra, *FLOAT32)
        assert run.code == 0, run.stderr
        sidecar = json.loads(Path(run.lines[0]).with_suffix(".json").read_text())
        assert (sidecar["solver"], sidecar["video_eta"]) == ("heun", 0.0)
        clips[name] = read_video(run.lines[0])
    assert np.array_equal(clips["heun"], clips["explicit"])
    caption = vigu("caption", clip_path, "--model", model_dir, "--steps", "3", "--solver", "heun", *FLOAT32)
    assert caption.code == 0 and caption.lines, caption.stderr
    # caption's video is given: the video's settings do nothing there, so they are neither refused nor recorded
    asked = vigu("caption", clip_path, "--model", model_dir, "--steps", "3", "--solver", "heun", "--video-eta", "0.5",
                 "--guidance-video", "3", "--json", *FLOAT32)
    assert asked.code == 0, asked.stderr
    record = json.loads(asked.stdout)
    assert record["caption"] == caption.lines[0] and not {"shift", "guidance_video", "video_eta"} & set(record)
    assert record["caption_candidates"] == 1
    several = vigu("caption", clip_path, "--model", model_dir, "--steps", "3", "--caption-candidates", "3", "--json",
                   *FLOAT32)
    assert several.code == 0 and json.loads(several.stdout)["caption_candidates"] == 3, several.stderr


def test_discrete_jumps_draw_per_sample_with_a_list_of_generators():
    flow = DiscreteTextFlow(vocab_size=11)
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    state = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    seeds = [4, 5, 6]
    for sigma_next in (0.4, 0.0):  # a jump, and the last step's draw
        together = flow.step(state, logits, 0.6, sigma_next, [torch.Generator().manual_seed(s) for s in seeds])
        alone = [flow.step(state[i : i + 1], logits[i : i + 1], 0.6, sigma_next, [torch.Generator().manual_seed(s)])
                 for i, s in enumerate(seeds)]
        assert torch.equal(together, torch.cat(alone))
    noise = flow.noise(None, 3, 5, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(noise[1:2], flow.noise(None, 1, 5, [torch.Generator().manual_seed(5)]))


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, a non-zero exit, nothing written
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bad_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    write_video(folder / "short.mp4", world.render(world.sample_clip(np.random.default_rng(0), 16, 16, 4)), 8)
    return folder


BAD = {
    "missing clip": (["caption", "{clip}", "{bad}/nope.mp4"], "error: {bad}/nope.mp4: no such video file; check the path"),
    "corrupt clip": (["caption", "{clip}", "{bad}/corrupt.mp4"], "error: {bad}/corrupt.mp4: cannot be read as a video ("),
    "short clip": (["caption", "{bad}/short.mp4"],
                   "error: {bad}/short.mp4: has 4 frames, fewer than the 9 the model reads; give a clip of at least 9 frames"),
    "unknown solver": (["generate", "a red circle moving left", "--solver", "rk4"],
                       "error: unknown --solver 'rk4': use euler or heun"),
    "unknown dtype": (["joint", "a red circle moving left", "--dtype", "fp8"],
                      "error: unknown --dtype 'fp8': use auto, float32, bfloat16 or float16"),
    "unknown device": (["generate", "a red circle moving left", "--device", "tpu"],
                       "error: unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
    "unknown text stream": (["generate", "a red circle moving left", "--text-stream", "both"],
                            "error: unknown --text-stream 'both': use prompt or none"),
    "negative temperature": (["caption", "{clip}", "--text-temperature", "-0.5"],
                             "error: --text-temperature must be at least 0 (0: the most likely token), got -0.5"),
    "temperature of an embedding flow": (["caption", "{clip}", "--text-temperature", "0"],
                                         "error: --text-temperature: "),
    "unknown text order": (["caption", "{clip}", "--text-order", "sorted"],
                           "error: unknown --text-order 'sorted': use random or confidence"),
    "text order of an embedding flow": (["caption", "{clip}", "--text-order", "confidence"],
                                        "error: --text-order: "),
    "video eta out of range": (["generate", "a red circle moving left", "--video-eta", "2"],
                               "error: --video-eta must be between 0 (the deterministic flow) and 1, got 2.0"),
    "video eta with heun": (["joint", "a red circle moving left", "--video-eta", "0.5", "--solver", "heun"],
                            "error: --solver heun with --video-eta 0.5: the video's stochastic step is an Euler step; "
                            "leave --video-eta out (Heun integrates the deterministic flow) or use --solver euler"),
    "zero batch": (["generate", "a red circle moving left", "--batch", "0"], "error: --batch must be at least 1, got 0"),
    "zero caption candidates": (["caption", "{clip}", "--caption-candidates", "0"],
                                "error: --caption-candidates must be at least 1, got 0"),
    "zero shift": (["generate", "a red circle moving left", "--shift", "0"],
                   "error: --shift must be above 0 (1: the plain time grid), got 0.0"),
    "negative text shift": (["caption", "{clip}", "--text-shift", "-1"],
                            "error: --text-shift must be above 0 (1: the plain time grid), got -1.0"),
    "out of vocabulary": (["joint", "a red circle moving left", "a cat surfing"],
                          "error: the model's vocabulary has no words 'cat', 'surfing' (in \"a cat surfing\"): it knows "
                          "only: , . a against and background black blue bottom circle down frame from gray green in is "
                          "it large left moves moving of on orange purple quickly red right shape shows slowly small "
                          "square staying stays still the there top triangle up video white with yellow; use words it knows"),
    "out-of-vocabulary negative prompt": (["generate", "a red circle moving left", "--negative-prompt", "a blurry cat"],
                                          "error: the model's vocabulary has no words 'blurry', 'cat' (in \"a blurry "
                                          "cat\"): it knows only: "),
    "out-of-vocabulary hint": (["caption", "{clip}", "--hint", "a dog!"], "error: the model's vocabulary has no words "
                               "'dog', '!' (in \"a dog!\"): it knows only: "),
    "missing prompts file": (["generate", "--prompts-file", "{bad}/prompts.txt"],
                             "error: {bad}/prompts.txt: no such prompts file; check the path"),
    "no prompt": (["joint"], "error: no prompt given: pass one or more PROMPT arguments or --prompts-file FILE"),
    "empty clips file": (["caption", "--clips-file", "{bad}/empty.txt"],
                         "error: {bad}/empty.txt: holds no clips; write one clip per line"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_nothing_is_written(vigu, case, model_dir, clip_path, bad_clips, tmp_path):
    args, message = BAD[case]
    fill = lambda text: text.format(clip=clip_path, bad=bad_clips)  # noqa: E731
    run = vigu(*map(fill, args), "--model", model_dir, "--out", tmp_path / "out")
    assert run.code == 1
    [line] = run.stderr.splitlines()
    assert line.startswith(fill(message)) if message.endswith(("(", ": ")) else line == fill(message)
    assert run.stdout == "" and not (tmp_path / "out").exists()


def test_an_output_path_that_cannot_be_written_stops_before_any_sampling(vigu, model_dir, clip_path, tmp_path):
    """`--out`, `--json` and `--sheet` are checked before the model loads: one line, nothing sampled or written."""
    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    cases = [
        (["generate", PROMPTS[0], "--out", taken], f"error: --out {taken} is a file: give a folder path"),
        (["joint", PROMPTS[0], "--out", taken / "sub"],
         f"error: --out {taken / 'sub'}: {taken} is a file, not a folder; give another path"),
        (["caption", clip_path, "--out", taken], f"error: --out {taken} is a file: give a folder path"),
        (["eval", "--items", "1", "--json", tmp_path], f"error: --json {tmp_path} is a folder: give a file path"),
        (["eval", "--items", "1", "--sheet", taken / "sheet"],
         f"error: --sheet {taken / 'sheet'}.html: {taken} is a file, not a folder; give another path"),
    ]
    for args, message in cases:
        run = vigu(*args, "--model", model_dir)
        assert run.code == 1 and run.stderr.splitlines() == [message], args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]


def test_a_damaged_model_folder_or_an_unreadable_input_is_one_line(vigu, model_dir, tmp_path, monkeypatch):
    import io
    import shutil

    damaged, weights = {}, Path("transformer") / "diffusion_pytorch_model.safetensors"
    for name, damage in (("no-weights", lambda f: (f / weights).unlink()),
                         ("truncated", lambda f: os.truncate(f / weights, 1000)),
                         ("bad-index", lambda f: (f / "model_index.json").write_text("{bad"))):
        damaged[name] = shutil.copytree(model_dir, tmp_path / name)
        damage(damaged[name])
    for name, message in (("no-weights", "cannot be loaded: Error no file named"),
                          ("truncated", "cannot be loaded: Unable to load weights"),
                          ("bad-index", 'model_index.json is not a pipeline\'s model_index.json (no "_class_name"')):
        run = vigu("generate", PROMPTS[0], "--model", damaged[name], "--out", tmp_path / "out")
        assert run.code == 1 and len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe a red circle\n")
    run = vigu("generate", "--prompts-file", tmp_path / "latin1.txt", "--model", model_dir)
    assert run.code == 1 and run.stderr.splitlines() == [
        f"error: {tmp_path / 'latin1.txt'}: not UTF-8 text (invalid start byte at byte 0); save it as UTF-8"]
    run = vigu("caption", tmp_path, "--model", model_dir)
    assert run.stderr.splitlines() == [f"error: {tmp_path}: is a folder, not a video file; give the video's path"]
    # `-` reads the prompts from standard input, as a pipeline gives them
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n"))
    run = vigu("generate", "--prompts-file", "-", "--model", model_dir, "--steps", "1", "--out", tmp_path / "piped")
    assert run.code == 0 and len(run.lines) == 2, run.stderr
    assert [json.loads(Path(line).with_suffix(".json").read_text())["prompt"] for line in run.lines] == PROMPTS[:2]
    assert not (tmp_path / "out").exists()


def test_without_a_model_every_command_says_how_to_get_one(vigu, tmp_path, monkeypatch, clip_path):
    monkeypatch.chdir(tmp_path)
    for args in (["generate", "a red circle moving left"], ["caption", clip_path], ["joint", "a red square moving up"],
                 ["eval"]):
        run = vigu(*args)
        assert run.code == 1 and run.stdout == ""
        assert run.stderr.splitlines() == ["error: no model at runs/demo/model: run `make demo` or pass --model PATH"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# vigu eval
# ----------------------------------------------------------------------------------------------------


def test_eval_prints_the_tables_writes_json_and_a_contact_sheet(vigu, model_dir, tmp_path):
    run = vigu("eval", "--model", model_dir, "--items", "4", "--steps", "1,2", "--batch", "3",
               "--json", tmp_path / "eval.json", "--sheet", tmp_path / "sheet.html")
    assert run.code == 0, run.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["set"] == {"source": "world", "seed": 0, "stream": 0x5EED_E7A1, "items": 4}
    assert [row["steps"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert set(row["caption"]) == {*world.ATTRIBUTES, "macro", "hidden"}
        assert set(row["generation"]) == {"shape", "color", "motion", "macro"}
        assert {"shape", "color", "background", "size", "motion", "start", "macro"} <= set(row["joint"])
        assert set(row["text"]) == {"bleu4", "rouge_l", "cider"} and 0 < row["text"]["rouge_l"] < 1
        assert set(row["seconds_per_item"]) == {"caption", "generate", "joint"}
        assert set(row["generation_draws"]) == {*evaluate.HIDDEN, "mean"}
        assert all(0 <= row["generation_draws"][a]["tv"] <= 1 for a in evaluate.HIDDEN)
    # the curve: one row per step count, then the attribute table
    curve = [line.split() for line in run.lines if line.split()[:1] in (["1"], ["2"])]
    assert [cells[0] for cells in curve] == ["1", "2"]
    assert f"{report['results'][1]['text']['cider']:.3f}" in curve[1]
    assert "accuracy vs steps" in run.stdout and "joint coherence" in run.stdout
    assert "what the prompt leaves open" in run.stdout
    page = (tmp_path / "sheet.html").read_text()
    assert page.count("data:image/png;base64,") == 12  # 4 items x (caption, generate, joint)
    assert world.prompt_text(world.sample_clip(np.random.default_rng([0x5EED_E7A1, 0, 0]), 16, 16, 9)) in page
    assert Image.open(tmp_path / "sheet.png").size[1] > 12 * 96


def test_eval_of_a_video_that_does_not_read_the_text_scores_generation_on_the_joint_videos(vigu, tiny_wan_dir, tmp_path):
    """One-way video: `vigu eval` runs joint, not generate, and its generation score is that of the clips
    `generate` makes with the same seeds."""
    folder = save_folder(nudged_pipeline(tiny_wan_dir, "text.video_attends_text=false"), tmp_path / "one-way")
    run = vigu("eval", "--model", folder, "--items", "3", "--steps", "2", "--json", tmp_path / "eval.json", *FLOAT32)
    assert run.code == 0, run.stderr
    row = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert set(row["seconds_per_item"]) == {"caption", "joint"}
    items = world_items(3, 0, 9, 16, 16, 8)
    pipe = load_model(SamplingOptions(model=str(folder), dtype="float32"))
    videos = pipe.generate([item.prompt for item in items], generator=[torch.Generator().manual_seed(i) for i in range(3)],
                           steps=2).videos
    measured = [world.measure_video(video) for video in videos]
    assert row["generation"] == evaluate.prompt_following(measured, [item.prompt for item in items])
    assert row["generation_draws"] == evaluate.draw_gap(measured, [item.truth for item in items])


def test_eval_with_hint_scores_the_captions_conditioned_on_each_prompt(vigu, model_dir, tmp_path):
    run = vigu("eval", "--model", model_dir, "--items", "3", "--steps", "2", "--hint", "--json", tmp_path / "eval.json",
               "--sheet", tmp_path / "sheet.html", *FLOAT32)
    assert run.code == 0, run.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["caption_hint"] == "prompt" and "captions hinted by the prompt" in run.stdout
    items = world_items(3, 0, 9, 16, 16, 8)
    pipe = load_model(SamplingOptions(model=str(model_dir), dtype="float32"))
    clips = torch.stack([frames_to_tensor(item.load()) for item in items])
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731  (eval: sample i, seed 0 + i)
    hinted = pipe.caption(clips, [item.prompt for item in items], generator=seeds(), steps=2).texts
    alone = pipe.caption(clips, generator=seeds(), steps=2).texts
    page = (tmp_path / "sheet.html").read_text()  # the sheet shows each caption eval made
    assert all(f"caption: {text}<" in page for text in hinted)
    assert all(f"hint: {item.prompt}<" in page for item in items)
    assert any(f"caption: {text}<" not in page for text in alone)  # the hint conditions the captions
    assert report["results"][0]["caption"] == evaluate.caption_accuracy(hinted, [item.truth for item in items])


def test_eval_on_a_built_dataset_scores_its_held_out_split(vigu, model_dir, tmp_path):
    data = tmp_path / "data"
    build_dataset(tiny_recipe(f"data.out={data}", "data.num_items=8", "data.shard_size=8", "data.val_every=4"))
    run = vigu("eval", "--model", model_dir, "--data", data, "--steps", "1", "--json", tmp_path / "eval.json")
    assert run.code == 0, run.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["set"] == {"source": str(data), "split": "val", "items": 2}  # items 3 and 7 are held out
    assert report["results"][0]["caption"]["macro"] >= 0 and report["results"][0]["generation"] is not None
    assert "holds no items out" not in run.stderr
    # a dataset that holds nothing out is scored on its training items, and says so
    whole = tmp_path / "whole"
    build_dataset(tiny_recipe(f"data.out={whole}", "data.num_items=3", "data.shard_size=8", "data.val_every=0"))
    run = vigu("eval", "--model", model_dir, "--data", whole, "--steps", "1", "--json", tmp_path / "whole.json")
    assert run.code == 0 and json.loads((tmp_path / "whole.json").read_text())["set"]["split"] == "all"
    assert f"note: {whole} holds no items out for validation (data.val_every); scoring its training items" in run.stderr


def test_quiet_libraries_drops_only_torchs_unactionable_notes(caplog):
    """The bf16-autocast RMS norm note and torch.compile's note on DDP's profiler range are dropped; other
    warnings and log records of the same sources still show."""
    import logging
    import warnings

    from vigu_cli.sampling import quiet_libraries

    dynamo = logging.getLogger("torch._dynamo.variables.ctx_manager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("Mismatch dtype between input and weight: input dtype = c10::BFloat16, weight dtype = float")
        warnings.warn("a warning vigu knows nothing about")
        with caplog.at_level(logging.WARNING, logger=dynamo.name):
            dynamo.warning("Profiler record function %s will be ignored", "record_function")
            dynamo.warning("a graph break")
    assert [str(w.message) for w in seen] == ["a warning vigu knows nothing about"]
    assert [r.getMessage() for r in caplog.records] == ["a graph break"]
