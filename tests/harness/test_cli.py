"""``generate`` and ``answer`` on a random-weight testbed checkpoint, CPU only: the files and reports they write, the
prompt file, every validation error, data parallelism under torchrun (2 gloo processes), and the demo on a testbed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun import run_torchrun

from flashu_fx.loading import save_pretrained
from flashu_fx.model import Showo2, init_random_weights
from flashu_fx.t2i import generate_images
from flashu_fx.testbed import codec
from flashu_fx.testbed.checkpoint import flashu_config, load_testbed
from flashu_fx.testbed.scorer import describe, detect, judge_picture, score_prompt
from flashu_fx.testbed.tokenizer import FILE_NAME
from flashu_fx.testbed.world import parse_caption, parse_question
from harness import __main__ as cli
from harness import answer, demo, generate
from harness.cli_options import CAPTION_EXAMPLES, QUESTION_EXAMPLES, Text, uncoloured_caption, world_captions
from harness.runner import ExactCodecImages, shipped_testbed_present

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle",
           "a photo of a yellow diamond"]
QUESTIONS = ["what color is the circle", "how many squares are there"]
STEPS = "3"  # grid points: 2 model calls per picture


@pytest.fixture(scope="session")
def testbed_dir(random_testbed) -> Path:
    """The random-weight testbed directory of tests/harness/conftest.py (weights, tokenizer, both calibrations)."""
    return random_testbed


@pytest.fixture(scope="module")
def uncalibrated_dir(testbed_dir, tmp_path_factory) -> Path:
    """The same testbed without its calibrations (links to its other files)."""
    path = tmp_path_factory.mktemp("uncalibrated")
    for name in ("config.json", "model.safetensors", FILE_NAME):
        (path / name).symlink_to(testbed_dir / name)
    return path


@pytest.fixture
def fresh_dynamo():
    """A compiling test starts and leaves Dynamo's caches empty (each backend adds an entry to Showo2.forward's)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_generate(out: Path, *args: str) -> dict:
    assert generate.main(["--out", str(out), "--steps", STEPS, "--device", "cpu", *args]) == 0
    return json.loads((out / "generate.json").read_text())


# ---- generate ----------------------------------------------------------------------------------------------------
def test_generate_writes_pictures_grid_and_report(testbed_dir, tmp_path, capsys):
    out = tmp_path / "eager"
    report = run_generate(out, "--weights", str(testbed_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--seed", "5", "--no-flashu")
    for key in ("command", "weights", "checkpoint", "model", "path", "flashu", "settings", "world_size", "ranks",
                "seconds", "images_per_second", "steady_images_per_second", "grid", "images"):
        assert key in report
    # two batches of one prompt: the steady rate is the second batch's alone
    rank = report["ranks"][0]
    second = report["images"][1]["seconds"]
    assert rank["steady_images_per_second"] == pytest.approx(1 / second) == report["steady_images_per_second"]
    assert rank["first_batch_seconds"] == pytest.approx(report["images"][0]["seconds"])
    assert (report["checkpoint"], report["model"], report["path"], report["flashu"]) == (
        "testbed", "testbed-nano", "eager", None)
    tb = load_testbed(testbed_dir)
    assert report["settings"] == dict(steps=3, calls_per_image=2, guidance=tb.guidance, seed=5, batch=1, device="cpu",
                                      dtype="float32")
    assert report["world_size"] == 1 and report["ranks"][0]["indices"] == [0, 1]
    assert [(i["index"], i["prompt"], i["seed"], i["file"]) for i in report["images"]] == [
        (0, PROMPTS[0], 5, "000_a_photo_of_a_red_circle.png"),
        (1, PROMPTS[1], 6, "001_a_photo_of_two_blue_squares.png"),
    ]
    assert all(i["seconds"] > 0 and i["rank"] == 0 for i in report["images"])
    assert read_png(out / "grid.png").shape[2] == 3 and report["grid"] == "grid.png"
    # Each picture is the decoded image of its prompt alone, from noise seed 5 + index.
    for item in report["images"]:
        latents = generate_images(tb.model, [item["prompt"]], tb.tokenizer, steps=3, guidance=tb.guidance,
                                  seed=item["seed"])
        assert np.array_equal(read_png(out / item["file"]), codec.decode(latents)[0].numpy())
    printed = capsys.readouterr().out
    assert "2 picture(s)" in printed and str(out / "generate.json") in printed
    # The testbed's scorer judges each picture against its caption (random weights: whatever it drew); counting
    # prompts name no colour, so "two blue squares" is no caption of the world and goes unscored.
    first, second = report["images"]
    picture = read_png(out / first["file"])
    assert first["right"] == score_prompt(parse_caption(first["prompt"]), picture)
    assert first["found"] == describe(detect(picture)) and second["right"] is None
    assert report["score"] == dict(scored=1, right=int(first["right"]))
    assert f"the scorer: {int(first['right'])} of 1 scored picture(s) right" in printed


def test_generate_reads_prompts_as_captions_of_the_testbed_world(testbed_dir, tmp_path, capsys):
    """A text without the template is drawn as its caption ("a photo of ..."), with a note; one the world has no
    caption for is drawn as given, unscored, with a note naming the option."""
    report = run_generate(tmp_path / "captions", "--weights", str(testbed_dir), "--no-flashu",
                          "--prompt", "A red circle", "--prompt", "a photo of a circle and a circle")
    assert [(i["prompt"], i["right"] is None) for i in report["images"]] == [
        ("a photo of a red circle", False), ("a photo of a circle and a circle", True)]
    assert report["score"]["scored"] == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "--prompt: drawing 'a photo of a red circle' for 'A red circle'" in err
    assert "--prompt: 'a photo of a circle and a circle' is no caption of the testbed's world" in err
    assert "the nearest caption" not in err  # no colour to drop there
    assert all(parse_caption(example) is not None for example in CAPTION_EXAMPLES)
    capsys.readouterr()
    report = run_generate(tmp_path / "unscored", "--weights", str(testbed_dir), "--no-flashu", "--prompt",
                          "two green triangles")
    assert report["score"] == dict(scored=0, right=0) and report["images"][0]["right"] is None
    assert "the scorer: no picture scored, since no prompt was a caption" in capsys.readouterr().out


def test_generate_reads_a_prompt_file_and_uses_the_shipped_calibration(testbed_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# three prompts\n{PROMPTS[0]}\n\n   \n  {PROMPTS[1]}  \n#{PROMPTS[2]}\n{PROMPTS[3]}\n")
    report = run_generate(tmp_path / "flashu", "--weights", str(testbed_dir), "--prompts", str(prompts), "--batch", "2")
    assert [i["prompt"] for i in report["images"]] == [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    assert report["path"] == "flashu-eager" and report["flashu"].startswith("shipped calibration")
    assert report["settings"]["calls_per_image"] == flashu_config("gen").num_points(3) - 1


def test_generate_calibrates_when_no_calibration_ships(uncalibrated_dir, tmp_path, capsys):
    report = run_generate(tmp_path / "calibrated", "--weights", str(uncalibrated_dir), "--prompt", PROMPTS[0])
    assert report["flashu"] == "calibrated now on 1 input(s) of this request"
    assert "has no calibration_gen.json; calibrating gen now" in capsys.readouterr().err


def test_generate_compiled_flashu_on_the_cpu(testbed_dir, tmp_path, fresh_dynamo):
    report = run_generate(tmp_path / "compiled", "--weights", str(testbed_dir), "--prompt", PROMPTS[0], "--compile")
    assert report["path"] == "compiled-flashu" and len(report["images"]) == 1


def test_generate_applies_flashu_settings(testbed_dir, tmp_path):
    """--set step_fraction=1.0 gives FlashU the baseline's grid: every call runs (the default 0.7 drops some)."""
    default = run_generate(tmp_path / "default", "--weights", str(testbed_dir), "--prompt", PROMPTS[0], "--steps", "6")
    full = run_generate(tmp_path / "full", "--weights", str(testbed_dir), "--prompt", PROMPTS[0], "--steps", "6",
                        "--set", "step_fraction=1.0")
    assert default["flashu_settings"] == {} and full["flashu_settings"] == {"step_fraction": 1.0}
    assert full["settings"]["calls_per_image"] == 5 > default["settings"]["calls_per_image"]


# ---- answer ------------------------------------------------------------------------------------------------------
def test_answer_prints_and_reports(testbed_dir, tmp_path, capsys):
    picture = tmp_path / "scene.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "answers"
    argv = ["--weights", str(testbed_dir), "--image", str(picture), "--out", str(out), "--device", "cpu"]
    assert answer.main([*argv, "--question", QUESTIONS[0], "--question", QUESTIONS[1]]) == 0
    report = json.loads((out / "answer.json").read_text())
    for key in ("command", "weights", "checkpoint", "model", "path", "flashu", "image", "settings", "seconds",
                "answers"):
        assert key in report
    assert report["path"] == "flashu-eager" and report["flashu"].startswith("shipped calibration")
    assert report["settings"] == dict(max_new_tokens=8, device="cpu", dtype="float32")
    assert [a["question"] for a in report["answers"]] == QUESTIONS
    captured = capsys.readouterr()
    assert "--set token_prune_ratio=0 keeps them" in captured.err  # the testbed's pruning says what it costs
    printed = captured.out
    for item in report["answers"]:
        assert item["tokens"] == len(item["ids"]) <= 8 and f"Q: {item['question']}\nA: {item['answer']}\n" in printed


def test_answer_asks_in_the_testbed_world_s_wording(testbed_dir, tmp_path, capsys):
    """A world question with capitals and a "?" is asked in the world's wording (the same ids as that wording), with a
    note; another question is asked as given, less its "?", with a note that the testbed never learned it."""
    picture = tmp_path / "scene.png"
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(picture)
    argv = ["--weights", str(testbed_dir), "--image", str(picture), "--device", "cpu", "--no-flashu"]
    assert answer.main([*argv, "--out", str(tmp_path / "a"), "--question", "What color is the  circle?",
                        "--question", "what is the color of the circle?"]) == 0
    assert answer.main([*argv, "--out", str(tmp_path / "b"), "--question", QUESTIONS[0]]) == 0
    asked, plain = (json.loads((tmp_path / d / "answer.json").read_text())["answers"] for d in ("a", "b"))
    assert [a["question"] for a in asked] == [QUESTIONS[0], "what is the color of the circle"]
    assert asked[0]["ids"] == plain[0]["ids"]
    err = capsys.readouterr().err.replace("\n", " ")
    assert "--question: asking 'what color is the circle' for 'What color is the  circle?'" in err
    assert "'what is the color of the circle?' is no question of the testbed's world" in err
    assert all(parse_question(example) is not None for example in QUESTION_EXAMPLES)


def test_a_testbed_picture_file_encodes_exactly(testbed_dir, tmp_path):
    """A 48 x 48 picture needs no resizing: its latents are the codec's, exactly."""
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    latents = ExactCodecImages(load_testbed(testbed_dir).model).encode_file(tmp_path / "scene.png")
    assert torch.equal(latents, codec.encode(torch.from_numpy(pixels)[None]))


# ---- validation --------------------------------------------------------------------------------------------------
def test_errors_name_the_argument_and_exit_with_status_2(testbed_dir, tiny_model, tmp_path, capsys):
    tb = str(testbed_dir)
    show_o2 = str(save_pretrained(tiny_model, tmp_path / "show-o2"))
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text(f"{PROMPTS[0]}\na photo of a purple unicorn\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    cases = [
        (["generate", "--weights", str(tmp_path / "nowhere"), "--prompt", "x"],
         f"argument --weights: directory '{tmp_path / 'nowhere'}' does not exist"),
        (["generate", "--weights", tb, "--prompts", str(tmp_path / "missing.txt")],
         f"argument --prompts: file '{tmp_path / 'missing.txt'}' does not exist"),
        (["generate", "--weights", tb, "--prompts", str(tmp_path / "empty.txt")], "holds no lines of text"),
        (["answer", "--weights", tb, "--image", str(tmp_path / "missing.png"), "--question", "x"],
         f"argument --image: file '{tmp_path / 'missing.png'}' does not exist"),
        (["generate", "--weights", tb], "no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE"),
        (["generate", "--weights", tb, "--prompt", "  "], "argument --prompt: empty prompt '  '"),
        (["generate", "--weights", tb, "--prompt", "a photo of a red dog"],
         "argument --prompt: text 'a photo of a red dog' has words outside the testbed vocabulary: ['dog']; "
         "known words: "),
        (["generate", "--weights", tb, "--prompts", str(bad_file)],
         f"argument --prompts {bad_file} line 2: text 'a photo of a purple unicorn' has words outside the testbed "
         "vocabulary: ['unicorn']"),
        (["generate", "--weights", show_o2, "--prompt", "x"],
         f"--weights {show_o2} holds Show-o2 weights (no {FILE_NAME}, so not a testbed): they need --tokenizer DIR "
         "(a local Qwen2.5-Instruct tokenizer directory) and --vae DIR (a local diffusers-format Wan2.1 VAE "
         "directory)"),
        (["generate", "--weights", str(tmp_path), "--prompt", "x"],
         "is not a checkpoint directory: it has no config.json"),
        (["generate", "--weights", tb, "--vae", str(tmp_path), "--prompt", "x"],
         "has its own word tokenizer and exact codec; --vae is for real Show-o2 weights only"),
        (["generate", "--weights", tb, "--steps", "1", "--prompt", "x"],
         "argument --steps: 1 is too small (allowed: >= 2)"),
        (["generate", "--weights", tb, "--compile", "--guidance", "0", "--prompt", PROMPTS[0]],
         "argument --guidance: 0 (no classifier-free guidance) runs on the eager paths only"),
        (["answer", "--weights", tb, "--image", str(bad_file), "--question", QUESTIONS[0]],
         f"argument --image: {bad_file} is not an image Pillow can read"),
        (["answer", "--weights", tb, "--image", str(bad_file)], "no question given"),
        (["answer", "--weights", tb, "--image", str(bad_file), "--question", "what is the unicorn"],
         "argument --question: text 'what is the unicorn' has words outside the testbed vocabulary: ['unicorn']"),
        (["generate", "--weights", tb, "--set", "nope=1", "--prompt", "x"],
         "argument --set: setting 'nope=1' is invalid: allowed KEY=VALUE with KEY one of"),
        (["generate", "--weights", tb, "--set", "ffn_prune_ratio=0.5", "--prompt", "x"],
         "come with the calibration and cannot change"),
        (["generate", "--weights", tb, "--no-flashu", "--set", "skip_ratio=0", "--prompt", PROMPTS[0]],
         "argument --set: FlashU is off (--no-flashu), so there is nothing to set"),
        (["generate", "--weights", tb, "--set", "skip_ratio=1.5", "--steps", "3", "--prompt", PROMPTS[0]],
         "argument --set: FlashUConfig.skip_ratio=1.5 is invalid: allowed [0, 1)"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--weights", tb, "--device", "cuda", "--prompt", "x"],
                      "argument --device: cuda was asked for but torch sees no CUDA device"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert message in err.replace("\n", " "), (argv, err)
        assert "Traceback" not in err


# ---- data parallel -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flashu", "batch", "shares"), [
    ("--no-flashu", "1", [[0, 2], [1, 3]]),  # batches of one prompt: rank r takes prompts r, r + 2
    ("--flashu", "2", [[0, 1], [2, 3]]),  # batches of two: rank r takes batch r
])
def test_torchrun_shards_prompts_and_matches_one_process(testbed_dir, tmp_path, flashu, batch, shares):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--weights", str(testbed_dir), "--prompts", str(prompts), "--steps", STEPS, flashu, "--batch", batch,
            "--no-compile", "--device", "cpu"]
    done = run_torchrun("generate", [*args, "--out", str(tmp_path / "dp")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "dp" / "generate.json").read_text())
    assert report["world_size"] == 2 and [i["index"] for i in report["images"]] == [0, 1, 2, 3]
    assert [i["prompt"] for i in report["images"]] == PROMPTS and [i["seed"] for i in report["images"]] == [0, 1, 2, 3]
    assert [r["indices"] for r in report["ranks"]] == shares and [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["images"] == 2 and r["seconds"] > 0 and r["images_per_second"] > 0 for r in report["ranks"])
    slowest = max(r["seconds"] - r["first_batch_seconds"] for r in report["ranks"])  # each rank's later batches
    if batch == "1":
        assert report["steady_images_per_second"] == pytest.approx(2 / slowest)
    else:  # one batch per rank: nothing after the first
        assert report["steady_images_per_second"] is None
    assert (tmp_path / "dp" / "grid.png").is_file()

    single = tmp_path / "single"
    assert generate.main([*args, "--out", str(single)]) == 0
    for item in report["images"]:
        assert (tmp_path / "dp" / item["file"]).read_bytes() == (single / item["file"]).read_bytes(), item["file"]


# ---- demo --------------------------------------------------------------------------------------------------------
def test_demo_on_a_testbed_shows_pictures_and_answers(testbed_dir, tmp_path, capsys):
    argv = ["--weights", str(testbed_dir), "--steps", STEPS, "--rows", "eager,flashu-eager,eager-kv",
            "--out", str(tmp_path)]
    report = demo.main(argv)
    assert report["source"] == f"testbed {testbed_dir}" and report["prompts"] == list(demo.TESTBED_PROMPTS)
    assert [(r["task"], r["row"]) for r in report["rows"]] == [
        ("gen", "eager"), ("gen", "flashu-eager"), ("und", "eager-nokv"), ("und", "flashu-eager"), ("und", "eager-kv")]
    assert read_png(tmp_path / "demo.png").shape[2] == 3 and report["grid"] == str(tmp_path / "demo.png")
    assert read_png(tmp_path / "t2i_eager.png").shape == (48, 2 * 48 + 4, 3)  # decoded by the exact codec
    printed = capsys.readouterr().out
    for row in report["rows"][2:]:
        assert f"{row['answer'].strip()!r} ({row['count']} tokens)" in printed
    assert "image (eager, testbed codec)" in printed
    # the testbed's scorer judges each row's pictures, the demo's prompts being captions of its world
    eager_pictures = read_png(tmp_path / "t2i_eager.png")
    for row in report["rows"][:2]:
        assert [j["right"] is not None for j in row["judged"]] == [True, True]
    first = eager_pictures[:, :48]  # image_grid: the pictures side by side, 4 px apart
    assert report["rows"][0]["judged"][0] == judge_picture(parse_caption(demo.TESTBED_PROMPTS[0]), first)


@pytest.mark.skipif(shipped_testbed_present(), reason="the shipped testbed is in this checkout")
def test_demo_says_it_falls_back_to_the_tiny_model(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--steps", STEPS, "--max-new-tokens", "2", "--rows", "eager,eager-kv"])
    err = capsys.readouterr().err
    assert "the shipped testbed weights (flashu_fx/testbed/weights/) are not in this checkout" in err


# ---- real Show-o2 weights ----------------------------------------------------------------------------------------
def test_show_o2_weights_with_a_tokenizer_and_a_vae(tmp_path, capsys):
    """The other kind of checkpoint end to end: tiny Show-o2 weights with Qwen's token ids, a Qwen-shaped tokenizer
    directory and a tiny Wan2.1 VAE; pictures through the VAE's decoder, the question's image through its encoder."""
    diffusers = pytest.importorskip("diffusers")
    from tests.flashu_fx.test_tokenizer import CONFIG, QWEN_ADDED, save_tokenizer

    weights = save_pretrained(init_random_weights(Showo2(CONFIG), seed=0).eval(), tmp_path / "show-o2")
    tokenizer = save_tokenizer(tmp_path / "qwen", QWEN_ADDED)
    with torch.random.fork_rng():  # the VAE's random init draws from the global generator: leave it as it was
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
    vae.save_pretrained(tmp_path / "vae")
    real = ["--weights", str(weights), "--tokenizer", str(tokenizer), "--vae", str(tmp_path / "vae"), "--no-flashu"]
    report = run_generate(tmp_path / "gen", *real, "--prompt", "a red fox in the snow")
    assert (report["checkpoint"], report["model"], report["settings"]["guidance"]) == ("show-o2", CONFIG.name, 7.5)
    picture = tmp_path / "gen" / report["images"][0]["file"]
    assert read_png(picture).shape == (64, 64, 3)  # 8 x 8 latents through the VAE's 8x decoder
    assert answer.main([*real, "--image", str(picture), "--question", "What is it?", "--max-new-tokens", "3",
                        "--device", "cpu", "--out", str(tmp_path / "und")]) == 0
    answers = json.loads((tmp_path / "und" / "answer.json").read_text())["answers"]
    assert len(answers) == 1 and 1 <= answers[0]["tokens"] <= 3 and "Q: What is it?" in capsys.readouterr().out


@pytest.mark.parametrize("text, nearest", [
    ("a red circle left of a blue square", "a photo of a circle left of a square"),
    ("a photo of three green triangles", "a photo of three triangles"),
    ("a red circle and a red circle", None),
])
def test_an_unknown_caption_points_at_the_nearest_without_colours(text, nearest):
    found = uncoloured_caption(text)
    assert (found and found.caption) == nearest
    _, prompts, notes = world_captions([Text(text, "--prompt")])
    assert prompts == [None] and (f"the nearest caption is {nearest!r}" in notes[0]) == (nearest is not None)
