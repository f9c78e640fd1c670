"""The registry of benchmark rows: one named way of running a task, shared by ``demo`` and ``bench``.

A row is a function ``fn(ctx) -> PreparedRow`` for a task's context. Everything that must not be timed
(batch building, noise, calibration, compiling, CUDA-graph capture) happens inside ``fn``; the returned
``run()`` is the timed region and returns the task's output:

    task  context       run() returns                   counted unit
    gen   GenContext    latents (B, C, h, w) fp32        model calls (denoising evaluations)
    und   UndContext    flashu_fx.Answer                 new tokens

Baseline rows live here. Later rows register themselves from their own module,

    from harness.rows import register_row
    register_row("gen", "flashu-eager", my_row_fn)

and ``load_optional_rows()`` imports the known row modules that exist (nothing heavy at import time).

A row registered with ``variants=factory`` also answers to ``name[key=value,...]``: ``factory(options)``
builds that variant, so one process can A/B an option against the same baseline, e.g.
``--rows compiled-flashu,compiled-flashu[tune_decode=off]``.
"""

from __future__ import annotations

import importlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flashu_fx.config import Showo2Config
from flashu_fx.layout import GenBatch, build_gen_batch
from flashu_fx.mmu import Answer, all_position_logits, answer_question
from flashu_fx.model import Showo2
from flashu_fx.sampler import draw_noise, euler_sample, time_grid
from flashu_fx.t2i import eager_velocity
from flashu_fx.tokenizer import TextTokenizer
from harness.clocks import ClockSampler, nvml_reader

TASKS = ("gen", "und")
UNITS = {"gen": "calls", "und": "tokens"}
# The row every other row of the task is compared with: upstream's computation (gen: every position and
# lm_head at every call; und: upstream's mmu_generate, no KV cache).
BASELINES = {"gen": "eager", "und": "eager-nokv"}
# Generation's second reference: upstream's work with the lm_head product split (no slow cuBLAS path).
SPLIT_BASELINE = "eager-split"
# Modules that register more rows when they exist (FlashU eager, compiled backend); extend to add more.
OPTIONAL_ROW_MODULES: list[str] = ["harness.flashu_rows", "harness.compiled_rows", "harness.compiled_und_rows"]


@dataclass
class GenContext:
    """One text-to-image request: ``prompts`` as token ids; guidance 0 = no CFG."""

    model: Showo2
    prompts: list[list[int]]
    steps: int = 50  # grid points; model calls = steps - 1
    guidance: float = 10.0
    seed: int = 0
    tokenizer: TextTokenizer | None = None
    progress: bool = False
    flashu_layouts: dict = field(default_factory=dict)  # task -> (FFN layout, how scored): see flashu_rows
    flashu_configs: dict = field(default_factory=dict)  # task -> FlashUConfig of the FlashU rows (default: paper's)


@dataclass
class UndContext:
    """One understanding request: an image as latents (1, C, h, w) and a question (text or ids).

    Timed region of every und row: the whole request from the latents, i.e. the image features (SigLIP stack,
    fusion: 12.5 ms at 1.5B, 10.0 ms at 7B on an H200), the prompt embeddings, the prefill and every new
    token. Upstream builds the features once before ``mmu_generate``; the anchors (docs/REFERENCE_MEASUREMENTS.md) time
    ``mmu_generate`` alone, so against an anchor our numbers carry those milliseconds extra (BENCHMARKS.md
    says so beside each). They stay in because every und row (eager, flashu-eager, compiled-*) starts from the
    latents and the speedup column needs one region for all; FlashU does not change the features.
    """

    model: Showo2
    latents: Tensor
    question: str | list[int]
    tokenizer: TextTokenizer | None = None
    max_new_tokens: int = 32
    stop_at_eos: bool = True
    progress: bool = False
    flashu_layouts: dict = field(default_factory=dict)  # task -> (FFN layout, how scored): see flashu_rows
    flashu_configs: dict = field(default_factory=dict)  # task -> FlashUConfig of the FlashU rows (default: paper's)


@dataclass
class PreparedRow:
    """``run()`` is the timed region; ``count(output)`` its model calls (gen) or new tokens (und)."""

    run: Callable[[], Any]
    count: Callable[[Any], int]
    note: str = ""  # shown in reports (e.g. "49 calls, lm_head on")


RowFn = Callable[[Any], PreparedRow]
VariantFactory = Callable[[dict[str, Any]], RowFn]  # options -> the row with them (raises on a bad option)
_ROWS: dict[str, dict[str, RowFn]] = {task: {} for task in TASKS}
_VARIANTS: dict[str, dict[str, VariantFactory]] = {task: {} for task in TASKS}
_LOADED: set[str] = set()
_VARIANT_NAME = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<options>[^\[\]]*)\]$")


def register_row(task: str, name: str, fn: RowFn, replace: bool = False,
                 variants: VariantFactory | None = None) -> RowFn:
    """Add row ``name`` to ``task``; a second registration of a name raises unless ``replace``.
    ``variants``: builds ``name[key=value,...]`` from its options (see the module docstring)."""
    if task not in _ROWS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    if name in _ROWS[task] and not replace:
        raise ValueError(f"row {name!r} is already registered for task {task!r}")
    _ROWS[task][name] = fn
    if variants is not None:
        _VARIANTS[task][name] = variants
    return fn


def option_value(text: str) -> Any:
    """``on/off/true/false/yes/no`` -> bool, ``none`` -> None, numbers -> int/float, anything else as text."""
    lowered = text.strip().lower()
    words = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False, "none": None}
    if lowered in words:
        return words[lowered]
    for kind in (int, float):
        try:
            return kind(lowered)
        except ValueError:
            pass
    return text.strip()


def parse_option(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, option_value(value))``; raises on anything else."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"option {item!r} is not key=value")
    return key.strip(), option_value(value)


def split_row_names(text: str) -> list[str]:
    """``"a,b[x=1,y=2]"`` -> ``["a", "b[x=1,y=2]"]``: commas inside brackets belong to the variant."""
    names, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += char
    names.append(current.strip())
    return [n for n in names if n]


def parse_variant(name: str) -> tuple[str, dict[str, Any]] | None:
    """``"row[a=1,b=off]"`` -> ``("row", {"a": 1, "b": False})``; None for a plain row name."""
    match = _VARIANT_NAME.match(name)
    if match is None:
        return None
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in match["options"].split(","))):
        try:
            key, value = parse_option(item)
        except ValueError as err:
            raise ValueError(f"row {name!r}: {err}") from None
        if key in options:
            raise ValueError(f"row {name!r}: option {key!r} given twice")
        options[key] = value
    return match["base"].strip(), options


def rows_for(task: str) -> dict[str, RowFn]:
    """Registered rows of ``task``, the baseline first, then in registration order."""
    rows = _ROWS[task]
    return {BASELINES[task]: rows[BASELINES[task]], **{k: v for k, v in rows.items() if k != BASELINES[task]}}


def load_optional_rows(modules: list[str] | None = None) -> list[str]:
    """Import the row modules that exist; returns the names imported. A missing module is skipped silently;
    one that exists but fails to import is reported on stderr and skipped (the baseline rows still run)."""
    loaded = []
    for name in OPTIONAL_ROW_MODULES if modules is None else modules:
        if name in _LOADED:
            loaded.append(name)
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                print(f"warning: rows of {name} not loaded: {err}", file=sys.stderr)
            continue
        except Exception as err:  # a broken optional row must not take the baseline down
            print(f"warning: rows of {name} not loaded: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        _LOADED.add(name)
        loaded.append(name)
    return loaded


def select_rows(task: str, names: list[str] | None) -> dict[str, RowFn]:
    """The rows named (all when None), always with the task's baseline first; unknown names raise, and so
    does a variant ``name[key=value,...]`` of a row without variants or with an option it does not take."""
    available = rows_for(task)
    if names is None:
        return available
    chosen: dict[str, RowFn] = {}
    unknown = []
    for name in names:
        variant = parse_variant(name)
        if variant is None:
            if name in available:
                chosen[name] = available[name]
            else:
                unknown.append(name)
            continue
        base, options = variant
        if base not in available:
            unknown.append(name)
        elif base not in _VARIANTS[task]:
            raise ValueError(f"row {base!r} takes no options (rows with options: {sorted(_VARIANTS[task])})")
        else:
            chosen[name] = _VARIANTS[task][base](options)
    if unknown:
        raise ValueError(f"unknown {task} row(s) {unknown}; registered: {sorted(available)}")
    baseline = BASELINES[task]
    return {baseline: available[baseline], **{n: fn for n, fn in chosen.items() if n != baseline}}


def fit_prompt(cfg: Showo2Config, ids: list[int], what: str) -> list[int]:
    """A built-in prompt's ids, cut to the model's text budget ``cfg.max_text_len`` (27 on the tiny preset) with
    a note on stderr. The pipelines refuse an over-long prompt instead of cutting it; the harness's own
    prompts are examples, so it cuts them, and says so."""
    if len(ids) <= cfg.max_text_len:
        return ids
    print(f"note: {what} cut from {len(ids)} to {cfg.max_text_len} tokens (config.max_text_len of {cfg.name})",
          file=sys.stderr)
    return ids[: cfg.max_text_len]


# ---- baseline rows -----------------------------------------------------------------------------------
def model_device(model: Showo2) -> torch.device:
    return next(model.parameters()).device


def gen_inputs(ctx: GenContext) -> tuple[GenBatch, Tensor, Tensor]:
    """The model batch, the initial noise (B, C, h, w) and the time grid of a request, on the model's device."""
    model, device = ctx.model, model_device(ctx.model)
    batch = build_gen_batch(model.config, ctx.prompts, guided=ctx.guidance != 0).to(device)
    h, w = model.config.latent_size
    noise = draw_noise((len(ctx.prompts), model.config.latent_channels, h, w), ctx.seed).to(device)
    return batch, noise, time_grid(ctx.steps)


def eager_gen(ctx: GenContext) -> PreparedRow:
    """Upstream's computation: every call runs all L positions, lm_head included; CFG batch 2B."""
    batch, noise, grid = gen_inputs(ctx)
    velocity = eager_velocity(ctx.model, batch, return_logits=True)
    guidance = ctx.guidance if ctx.guidance != 0 else None
    calls = ctx.steps - 1
    return PreparedRow(
        run=lambda: euler_sample(velocity, noise, grid, guidance, ctx.progress),
        count=lambda _: calls,
        note=f"{calls} full calls, batch {batch.tokens.shape[0]}, lm_head on",
    )


@contextmanager
def split_lm_head(model: Showo2) -> Iterator[None]:
    """Inside: every call of ``model`` computes its logits as ``mmu.all_position_logits`` does, two products split
    at the largest multiple of 16 of the vocabulary (the same logits and FLOPs), when asked for none itself.

    Show-o2's single product over every position (V = 151669) has unaligned output rows and cuBLAS takes a slow
    sm75 kernel for it on an H200 (8.7 ms of each 1.5B generation call); ``eager-split`` times upstream's work
    without that library path. A forward hook on the trunk sees its output, the hidden states the lm_head reads.
    """

    def logits(trunk: nn.Module, args: tuple, hidden: Tensor) -> None:
        all_position_logits(trunk.lm_head, hidden)  # computed and dropped, as the sampler drops upstream's

    handle = model.showo.register_forward_hook(logits)
    try:
        yield
    finally:
        handle.remove()


def eager_gen_split(ctx: GenContext) -> PreparedRow:
    """``eager`` with the lm_head product split (``split_lm_head``): upstream's work without the slow path."""
    batch, noise, grid = gen_inputs(ctx)
    velocity = eager_velocity(ctx.model, batch, return_logits=False)  # the hook computes them, split
    guidance = ctx.guidance if ctx.guidance != 0 else None
    calls = ctx.steps - 1

    def run() -> Tensor:
        with split_lm_head(ctx.model):
            return euler_sample(velocity, noise, grid, guidance, ctx.progress)

    note = f"{calls} full calls, batch {batch.tokens.shape[0]}, lm_head on, split at V // 16 * 16 on CUDA"
    return PreparedRow(run=run, count=lambda _: calls, note=note)


def eager_und(kv_cache: bool) -> RowFn:
    """The eager baselines. ``eager-nokv`` computes what upstream's ``mmu_generate`` computes per token (the
    whole LLM over the whole sequence, logits of every position); ``eager-kv`` is a plain eager decode loop over
    a static KV cache. Both keep no per-token work that upstream does not do (flashu_fx.mmu, decode_*)."""

    def row(ctx: UndContext) -> PreparedRow:
        def run() -> Answer:
            return answer_question(
                ctx.model,
                ctx.latents,
                ctx.question,
                ctx.tokenizer,
                max_new_tokens=ctx.max_new_tokens,
                kv_cache=kv_cache,
                stop_at_eos=ctx.stop_at_eos,
                progress=ctx.progress,
            )

        note = "static KV cache" if kv_cache else "upstream mmu_generate: whole sequence per token"
        return PreparedRow(run=run, count=lambda answer: len(answer.ids), note=note)

    return row


register_row("gen", "eager", eager_gen)
register_row("gen", SPLIT_BASELINE, eager_gen_split)
register_row("und", "eager-kv", eager_und(kv_cache=True))
register_row("und", "eager-nokv", eager_und(kv_cache=False))


# ---- running a row -----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds) with the device synchronised on both sides, under no_grad."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> float:
    """Median wall seconds of ``repeats`` ``timed`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


@dataclass
class RowResult:
    name: str
    seconds: float  # median over the timed repeats
    times: list[float]
    count: int  # model calls (gen) or new tokens (und) of one run
    unit: str
    peak_mem_gb: float | None  # torch.cuda.max_memory_allocated over the timed runs (weights included)
    output: Any = field(repr=False, default=None)
    note: str = ""
    clocks: dict | None = None  # ``ClockSampler.summary()`` over the timed runs (None: no GPU clock to read)

    @property
    def ms_per_unit(self) -> float:
        return 1e3 * self.seconds / max(self.count, 1)


def time_row(task: str, name: str, fn: RowFn, ctx, warmup: int = 1, repeats: int = 3) -> RowResult:
    """Prepare the row (untimed), run it ``warmup`` times, then time ``repeats`` runs with a device
    synchronisation on both sides of each; on a GPU with NVML the SM clock and power are sampled while the timed
    runs go on (``RowResult.clocks``)."""
    device = model_device(ctx.model)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.no_grad():
        prepared = fn(ctx)
        output = None
        for _ in range(warmup):
            output = prepared.run()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with ClockSampler(nvml_reader(device)) as clocks:
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                output = prepared.run()
                synchronize(device)
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return RowResult(
        name, statistics.median(times), times, prepared.count(output), UNITS[task], peak, output, prepared.note,
        clocks.summary(),
    )


# ---- describing outputs ------------------------------------------------------------------------------
def summarize(task: str, output: Any) -> str:
    """One line about a row's output, for tables."""
    if task == "gen":
        x = output.float()
        finite = "" if torch.isfinite(x).all() else " NON-FINITE"
        return f"latents {tuple(x.shape)} mean {x.mean():+.3f} std {x.std():.3f}{finite}"
    ids = output.ids
    shown = ",".join(map(str, ids[:6])) + (",..." if len(ids) > 6 else "")
    return f"ids [{shown}] text {output.text[:24]!r}"


def compare(task: str, output: Any, baseline: Any) -> dict[str, float | int]:
    """How a row's output relates to the baseline's: gen relative L2 error; und the shared id prefix."""
    if task == "gen":
        x, ref = output.float(), baseline.float()
        return {"rel_err": float((x - ref).norm() / ref.norm().clamp_min(1e-12))}
    same = 0
    for a, b in zip(output.ids, baseline.ids, strict=False):
        if a != b:
            break
        same += 1
    return {"same_prefix": same, "of": len(baseline.ids)}
