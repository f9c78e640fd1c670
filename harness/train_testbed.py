"""``python -m harness train-testbed``: train the nano Show-o2 on the synthetic world, check it, ship it.

    python -m harness train-testbed --out runs/testbed --time-budget 420          # one GPU, ~8 minutes in all
    python -m harness train-testbed --out runs/tb-cpu --steps 20 --pool 512 --device cpu   # a smoke run

Steps: render and tokenize the training pools (the world's "train" split), train (flow matching + answer
cross-entropy, bf16 autocast on CUDA, EMA weights), save the EMA weights in bf16 with the tokenizer, score the
baseline on held-out prompts over a small guidance sweep (two draws of prompts: the guidance that scores best on the
second becomes the sampling default, so the first draw's score at it is not a best of several tries) and on held-out
questions, calibrate FlashU for both tasks the paper's way (generation: Wanda over real denoising calls of
training captions; understanding: 20 image + question prefills), and write ``testbed.json`` with the command,
settings, loss log and scores, plus a grid PNG of held-out prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flashu_fx.calibration import calibrate
from flashu_fx.config import get_config
from flashu_fx.loading import from_pretrained, save_pretrained
from flashu_fx.mmu import answer_question
from flashu_fx.model import Showo2
from flashu_fx.testbed import codec, scorer, world
from flashu_fx.testbed.checkpoint import DEFAULT_STEPS, RECORD_FILE, flashu_config
from flashu_fx.testbed.data import build_gen_pool, build_und_pool, pool_to
from flashu_fx.testbed.diagnostics import (
    EDITS,
    caption_sensitivity,
    flow_loss_parts,
    grid_position_r2,
    score_generation,
    velocity_sensitivity,
    world_sensitivity,
)
from flashu_fx.testbed.tokenizer import WordTokenizer
from flashu_fx.testbed.train import (
    POSITION_INITS,
    TrainConfig,
    check_lr_scales,
    graft_sincos,
    init_for_training,
    param_groups,
    train,
)
from harness.arguments import command_parser

PRESET = "testbed-nano"
PROBE_PROMPTS = 16  # held-out prompts per caption edit in the training probe (one forward of 64 rows each)
FINAL_PROBE_PROMPTS = 64  # the same after training, on the weights that ship: half the probe's noise (about 0.03)
# The probe's t: 0.2, where the layout is being decided (the "<edit>_pull" keys), and the noise end, where the caption
# is the only evidence and the world's own share (world_sensitivity, t -> 0) applies ("<edit>_pull_noise_end")
PROBE_TIMES = {"": 0.2, "_noise_end": 0.01}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = command_parser("python -m harness train-testbed", __doc__)
    p.add_argument("--out", default="runs/testbed", help="directory for the checkpoint and its record")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps at most")
    p.add_argument("--time-budget", type=float, default=d.time_budget_s, help="seconds of training (0: no limit)")
    p.add_argument("--batch-gen", type=int, default=d.batch_gen, help="generation rows per step")
    p.add_argument("--batch-und", type=int, default=d.batch_und, help="understanding rows per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--foreground-weight", type=float, default=d.foreground_weight, metavar="W",
                   help="extra flow-loss weight on latent positions covered by objects, so the black background "
                        "does not dominate the MSE (0: unweighted)")
    p.add_argument("--time-shift", type=float, default=d.time_shift, metavar="S",
                   help="shift of the training t toward the noise, t / (t + S - S t); the sampler's grid uses 3 "
                        "(default 0: Show-o2's own, 1.62 at the testbed's 144 image tokens)")
    p.add_argument("--noise-end-share", type=float, default=d.noise_end_share, metavar="P",
                   help="share of the generation rows trained at the noise end (median t 0.02), where the caption is "
                        "the only evidence for the layout (0: Show-o2's t for every row)")
    p.add_argument("--compile", default=d.compile, metavar="BACKEND",
                   help='torch.compile backend for the training step, e.g. "inductor" (default: eager)')
    p.add_argument("--init", help="continue from this testbed checkpoint's weights (fresh optimizer and EMA)")
    p.add_argument("--position-init", choices=POSITION_INITS, default="normal",
                   help="a run from scratch: how the image position table starts (sincos: DiT's fixed 2-D sine-cosine "
                        "table, the only absolute 2-D position the image tokens get; normal: N(0, 0.02))")
    p.add_argument("--position-graft", type=float, metavar="S",
                   help="with --init: add S x the 2-D sine-cosine table to the trained image position table "
                        "(train.graft_sincos), giving the trunk the column a N(0, 0.02) start never taught it")
    p.add_argument("--eval-no-kv-cache", action="store_true", help="score answers with the no-cache decode loop")
    p.add_argument("--pool", type=int, default=d.pool_gen, help="rendered generation examples (and understanding "
                   "examples unless --pool-und is given)")
    p.add_argument("--pool-und", type=int, help="rendered understanding examples (default: --pool)")
    p.add_argument("--category-weights", type=category_weights, metavar="CAT=W,...",
                   help="how often each caption category is drawn, relative to 1 for the ones not named, e.g. "
                        f"position=3,color_attr=3 (categories: {', '.join(world.CATEGORIES)}; default: uniform)")
    p.add_argument("--lr-scales", type=lr_scales, default=d.lr_scales, metavar="PREFIX=X,...",
                   help="learning-rate multipliers for the parameters whose names start with PREFIX, e.g. "
                        "image_embedder_gen=4,image_embedder_und=4,fusion_proj=4 (default: none)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-prompts", type=int, default=60, help="held-out prompts scored after training")
    p.add_argument("--eval-questions", type=int, default=60, help="held-out questions scored after training")
    p.add_argument("--guidance-sweep", default="2,3,4,6", help="CFG scales tried on the held-out prompts")
    p.add_argument("--second-draw", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the sweep on a second draw of as many held-out prompts and choose the sampling "
                        "guidance there, so the first draw's score at it is not the best of several tries on the "
                        "same prompts (--no-second-draw: choose on the first draw)")
    p.add_argument("--eval-steps", type=int, default=DEFAULT_STEPS, help="grid points of the evaluation sampler")
    p.add_argument("--sensitivity-prompts", type=int, default=16,
                   help="prompt pairs per caption edit (a relation reversed, two colours exchanged) drawn with the "
                        "same noise after training, to see whether the pictures follow those words (0: skip)")
    p.add_argument("--final-probe-prompts", type=int, default=FINAL_PROBE_PROMPTS, metavar="N",
                   help="held-out prompts per caption edit in the binding probe of the final weights (the record's "
                        f"velocity_sensitivity; default {FINAL_PROBE_PROMPTS}: about 0.03 of noise; each costs four "
                        "model rows per edit and time)")
    p.add_argument("--probe-every", type=int, default=500, metavar="N",
                   help="every N steps, how far one model call's velocity moves when a relation is reversed or two "
                        "colours exchanged, as a share of the caption's whole pull, at t = 0.2 and at the noise "
                        f"end (the EMA weights, {PROBE_PROMPTS} held-out prompts per edit): the learning curve of "
                        "binding, in the loss log and the progress bar (0: never)")
    p.add_argument("--calib-gen", type=int, default=16, help="generation calibration prompts (0: no calibration)")
    p.add_argument("--calib-und", type=int, default=20, help="understanding calibration prefills (0: none)")
    return p


def binding_probe(tok: WordTokenizer, n: int = PROBE_PROMPTS) -> Callable[[Showo2], dict[str, float]]:
    """The training probe: ``diagnostics.velocity_sensitivity`` of each caption edit at each of PROBE_TIMES, as
    {"<edit>_pull<suffix>": share}, over ``n`` held-out prompts per edit."""

    def probe(model: Showo2) -> dict[str, float]:
        return {f"{edit}_pull{suffix}": velocity_sensitivity(model, tok, edit, n=n, t=t)
                for edit in EDITS for suffix, t in PROBE_TIMES.items()}

    return probe


def lr_scales(text: str) -> tuple[tuple[str, float], ...]:
    """``"fusion_proj=4,image_embedder_gen=4"`` -> (("fusion_proj", 4.0), ("image_embedder_gen", 4.0)); whether each
    prefix names a parameter is checked against the model when training starts."""
    pairs = []
    for item in filter(None, text.split(",")):
        prefix, _, value = item.partition("=")
        try:
            pairs.append((prefix.strip(), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr-scales: {item!r} in {text!r} needs a number after '=' "
                                             "(e.g. fusion_proj=4)") from None
    try:
        return check_lr_scales(pairs)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lr-scales {text!r}: {err}") from None


def category_weights(text: str) -> tuple[float, ...]:
    """``"position=3,color_attr=3"`` -> one weight per world.CATEGORIES entry (1 for those not named)."""
    weights = dict.fromkeys(world.CATEGORIES, 1.0)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise argparse.ArgumentTypeError(f"--category-weights: unknown category {name.strip()!r} in {text!r}; "
                                             f"allowed {', '.join(world.CATEGORIES)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--category-weights: {item!r} in {text!r} needs a number after '=' "
                                             "(e.g. position=3)") from None
    try:
        return world.check_category_weights(tuple(weights.values()))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--category-weights {text!r}: {err}") from None


def score_answers(model: Showo2, tok: WordTokenizer, items: list[world.QAItem], device, kv_cache: bool = True
                  ) -> tuple[list[bool], list]:
    images = torch.from_numpy(world.render_batch([it.scene for it in items]))
    latents = codec.encode(images).to(device)
    answers = [answer_question(model, latents[i : i + 1], it.question, tok, max_new_tokens=6, kv_cache=kv_cache).text
               for i, it in enumerate(items)]
    return [scorer.score_answer(a, it) for a, it in zip(answers, items, strict=True)], answers


def earlier_runs(init: str | None) -> list[dict]:
    """The runs that made ``init``'s weights, oldest first: its own history plus a summary of its run (empty for a
    run from scratch, or an init without a record), so a continued checkpoint names every command behind it."""
    record_path = Path(init) / RECORD_FILE if init else None
    if record_path is None or not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    final = record["loss_log"][-1] if record.get("loss_log") else {}
    heldout = record.get("heldout", {})
    summary = dict(command=record["command"], steps_done=record.get("steps_done"),
                   train_seconds=record.get("train_seconds"), device=record.get("device"),
                   final={k: round(final[k], 4) for k in ("loss", "flow", "answer") if k in final},
                   heldout_geneval_overall={g: v["overall"]["accuracy"]
                                            for g, v in (heldout.get("guidance_sweep") or {}).items()},
                   heldout_answers=heldout.get("answers", {}).get("overall"))
    return [*record.get("history", []), summary]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init and args.position_init != "normal":
        parser.error(f"--position-init {args.position_init} starts a run from scratch; --init {args.init} continues "
                     "trained weights, position table included")
    if args.position_graft is not None and not (args.init and args.position_graft > 0):
        parser.error(f"--position-graft {args.position_graft} is invalid: allowed a number > 0, with --init (it "
                     "changes trained weights; a run from scratch takes --position-init sincos)")
    for option in ("sensitivity_prompts", "probe_every"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)} is invalid: allowed an integer >= 0")
    if args.final_probe_prompts < 1:
        parser.error(f"--final-probe-prompts {args.final_probe_prompts} is invalid: allowed an integer >= 1")
    if not args.time_shift >= 0:  # also refuses NaN
        parser.error(f"--time-shift {args.time_shift} is invalid: allowed a number > 0 (0: Show-o2's own shift)")
    if not 0 <= args.noise_end_share <= 1:  # also refuses NaN
        parser.error(f"--noise-end-share {args.noise_end_share} is invalid: allowed a share in [0, 1]")
    started = time.perf_counter()
    device = torch.device(args.device)
    cfg = get_config(PRESET)
    tok = WordTokenizer(world.vocabulary(), cfg.specials)
    try:
        train_cfg = TrainConfig(steps=args.steps, batch_gen=args.batch_gen, batch_und=args.batch_und, lr=args.lr,
                                warmup=args.warmup, pool_gen=args.pool, pool_und=args.pool_und or args.pool,
                                seed=args.seed, time_budget_s=args.time_budget, compile=args.compile,
                                category_weights=args.category_weights, foreground_weight=args.foreground_weight,
                                lr_scales=args.lr_scales, probe_every=args.probe_every, time_shift=args.time_shift,
                                noise_end_share=args.noise_end_share)
    except ValueError as err:  # a value the parser's own checks let through (e.g. --compile)
        parser.error(str(err))
    with torch.device("meta"):  # the learning-rate prefixes checked before minutes of rendering, not after
        try:
            param_groups(Showo2(cfg), train_cfg)
        except ValueError as err:
            parser.error(f"--lr-scales: {err}")
    rng = world.rng_for("train", args.seed)
    gen_pool = pool_to(build_gen_pool(cfg, tok, rng, train_cfg.pool_gen,
                                      category_weights=train_cfg.category_weights), device)
    und_pool = pool_to(build_und_pool(cfg, tok, rng, train_cfg.pool_und), device)
    pools_s = time.perf_counter() - started
    print(f"pools: {train_cfg.pool_gen} + {train_cfg.pool_und} examples in {pools_s:.1f} s", flush=True)

    if args.init:  # a continued run: the earlier run's (EMA) weights, in fp32 for the optimizer
        model = from_pretrained(args.init, dtype=torch.float32, device=device).train()
        if args.position_graft:
            graft_sincos(model, args.position_graft)
    else:
        model = init_for_training(Showo2(cfg), seed=args.seed, position_init=args.position_init).to(device)
    ema, log = train(model, gen_pool, und_pool, train_cfg, probe=binding_probe(tok))
    del gen_pool, und_pool, model
    train_s = log[-1]["seconds"] if log else 0.0
    print(f"trained {log[-1]['step'] + 1} steps in {train_s:.1f} s: {log[-1]}", flush=True)

    out = Path(args.out)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shipped = ema.to(torch.bfloat16)
    save_pretrained(shipped, out, max_shard_bytes=12 * 2**20)  # files of at most 12 MiB
    tok.save(out)
    model = shipped.to(dtype).eval()  # evaluate what ships (bf16 weights; fp32 compute on the CPU)

    prompts = world.heldout_gen_prompts(args.eval_prompts)
    second = world.heldout_gen_prompts(args.eval_prompts, 1) if args.second_draw else []
    sweep, sweep_second, drawn = {}, {}, {}
    for g in (float(x) for x in args.guidance_sweep.split(",")):
        # each prompt's noise from its own seed (its index): the numbers do not depend on the batch, and match a
        # per-prompt evaluation elsewhere (docs/QUALITY.md measured run 6 so on the CPU)
        drawn[g] = score_generation(model, tok, prompts, g, args.eval_steps, seeds=range(len(prompts)))
        sweep[g] = scorer.geneval_summary(prompts, drawn[g].correct)
        line = f"guidance {g}: GenEval-style overall {sweep[g]['overall']['accuracy']:.3f}"
        if second:
            sweep_second[g] = scorer.geneval_summary(second, score_generation(
                model, tok, second, g, args.eval_steps, seeds=range(len(second))).correct)
            both = (sweep[g]["overall"]["accuracy"] + sweep_second[g]["overall"]["accuracy"]) / 2
            line += f", the second draw {sweep_second[g]['overall']['accuracy']:.3f} (both: {both:.3f})"
        print(line, flush=True)
    chooser = sweep_second or sweep  # the guidance is chosen on other prompts than the ones reported, when it can be
    chosen = max(chooser, key=lambda g: chooser[g]["overall"]["accuracy"])
    best = drawn[chosen]  # the first draw at that guidance
    print(f"sampling guidance {chosen} (chosen on the {'second' if sweep_second else 'first'} draw)", flush=True)
    # how the first draw's pictures at that guidance miss (scorer.MISS_CAUSES): which binding is still missing
    causes = scorer.miss_causes(prompts, best.found)
    for category in scorer.LAYOUT_CATEGORIES:
        if category in causes:
            print(f"{category} at guidance {chosen}: " + ", ".join(f"{k} {v}" for k, v in causes[category].items()),
                  flush=True)
    items = world.heldout_questions(args.eval_questions)
    correct_qa, answers = score_answers(model, tok, items, device, kv_cache=not args.eval_no_kv_cache)
    qa = scorer.answer_summary(items, correct_qa)
    print(f"answers: accuracy {qa['overall']['accuracy']:.3f}", flush=True)

    # What the flow loss is made of (flashu_fx.testbed.diagnostics): drawing against removing the noise
    flow_parts = flow_loss_parts(model, tok, n=min(32, args.eval_prompts))
    for part in flow_parts:
        print(f"flow loss at t={part.t}: {part.mse:.3f} = image directions {part.image_mse:.3f} + the 4 others "
              f"{part.null_mse:.3f}; noise removed per direction {min(part.removal):.2f}-{max(part.removal):.2f}",
              flush=True)

    # Whether the pictures follow the words that bind (flashu_fx.testbed.diagnostics): a relation reversed, two
    # colours exchanged, the noise fixed. The shipped weights barely move for either (docs/QUALITY.md).
    sensitivity = [caption_sensitivity(model, tok, edit, n=args.sensitivity_prompts, steps=args.eval_steps,
                                       guidance=chosen) for edit in EDITS] if args.sensitivity_prompts else []
    for found in sensitivity:
        print(f"caption edit {found.edit!r}: pictures changed in {found.changed:.0%} of {found.prompts} pairs "
              f"(mean pixel change {found.pixel_change:.2f} of 255)", flush=True)
    # the shipped weights' (the loss log holds the EMA's on the way)
    pull = binding_probe(tok, args.final_probe_prompts)(model)
    pull_of_world = {f"{edit}_pull": world_sensitivity(edit) for edit in EDITS}  # what a model knowing it moves
    print("velocity moved by each caption edit, as a share of the caption's pull: "
          + ", ".join(f"{edit} {pull[f'{edit}_pull']:.3f} at t={PROBE_TIMES['']}, "
                      f"{pull[f'{edit}_pull_noise_end']:.3f} at t={PROBE_TIMES['_noise_end']} "
                      f"(the world's own {pull_of_world[f'{edit}_pull']:.2f})" for edit in EDITS), flush=True)
    # Whether the image tokens know their grid row and column (what a layout needs), at the trunk's input and output
    position = grid_position_r2(model, tok, n=min(32, max(2, args.eval_prompts)))
    trunk = [k for k in position if k.startswith("layer.")]
    best_trunk = max(trunk, key=lambda k: position[k][1])  # the layer that knows the patch's column best
    shown = dict.fromkeys(("input", best_trunk, f"layer.{cfg.num_layers - 1}",
                           max((k for k in position if k.startswith("head.")), key=lambda k: position[k][3])))
    print("image tokens' grid position, held-out R^2 (row, column; where the velocity lands: row, column): "
          + "; ".join(f"{name} " + ", ".join(f"{r2:.2f}" for r2 in position[name]) for name in shown), flush=True)

    calib = {}
    crng = world.rng_for("train", args.seed + 1)
    if args.calib_gen:
        captions = [world.sample_gen_prompt(crng).caption for _ in range(args.calib_gen)]
        c = calibrate(model, "gen", captions, flashu_config("gen"), steps=args.eval_steps, guidance=chosen,
                      tokenizer=tok)
        c.save(out / "calibration_gen")
        calib["gen"] = dict(samples=len(captions), guidance=chosen, steps=args.eval_steps)
    if args.calib_und:
        qs = [world.sample_question(world.sample_scene(crng), crng) for _ in range(args.calib_und)]
        lat = codec.encode(torch.from_numpy(world.render_batch([q.scene for q in qs]))).to(device)
        c = calibrate(model, "und", [(lat[i : i + 1], q.question) for i, q in enumerate(qs)], flashu_config("und"),
                      tokenizer=tok)
        c.save(out / "calibration_und")
        calib["und"] = dict(samples=len(qs))

    record = dict(
        command="python -m harness train-testbed " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        preset=PRESET, train=train_cfg.to_dict(), init=args.init,
        position_init=None if args.init else args.position_init, position_graft=args.position_graft,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, pools_seconds=round(pools_s, 1), train_seconds=round(train_s, 1),
        steps_done=(log[-1]["step"] + 1) if log else 0, loss_log=log,
        sampling=dict(guidance=chosen, steps=args.eval_steps),
        heldout=dict(prompts=len(prompts), questions=len(items), guidance_sweep={str(k): v for k, v in sweep.items()},
                     guidance_sweep_second_draw={str(k): v for k, v in sweep_second.items()},
                     guidance_chosen_on="the second draw" if sweep_second else "the first draw", miss_causes=causes,
                     answers=qa),
        flow_loss_parts=[dataclasses.asdict(part) for part in flow_parts],
        caption_sensitivity=[dataclasses.asdict(found) for found in sensitivity],
        velocity_sensitivity=dict(model=pull, world=pull_of_world, prompts_per_edit=args.final_probe_prompts),
        grid_position_r2={name: list(r2) for name, r2 in position.items()},
        calibration=calib,
        history=earlier_runs(args.init),
    )
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1))
    try:
        from harness.grids import captioned_grid

        n = min(12, len(prompts))
        notes = [["ok" if ok else "wrong" for ok in best.correct[:n]]]
        captioned_grid([(f"baseline g={chosen}", list(best.images[:n]))], [p.caption for p in prompts[:n]],
                       out / "heldout_grid.png", title="testbed after training: held-out prompts", notes=notes)
    except ImportError:
        print("matplotlib is not installed: no grid PNG (pip install -e '.[plots]')")
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0
