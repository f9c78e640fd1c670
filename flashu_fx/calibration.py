"""Per-task FFN calibration: neuron scores from the activations a task really produces (paper Sec. 3.1, Eq. 1).

For every LLM FFN, a = silu(gate(x)) * up(x) is down_proj's input (rows, I). Forward pre-hooks on each
``mlp.down_proj`` accumulate ||a_j||_2^2 over every row and position of every calibration call, in fp32
(the reference accumulates in bf16, docs/SHOWO2.md §5.7: with thousands of positions bf16 sums stop growing).
From those norms:

    wanda: score_j = ||a_j||_2 * sum_i |W_down[i, j]|       (the reference's shipped pruning)
    obd:   score_j = ||a_j||_2 * ||W_down[:, j]||_2          (Eq. 1: ||Y - Y_without_j||_F, exactly)

OBD in closed form: the layer output is Y = h + W_down a (h = the residual stream after attention, which
does not depend on the FFN). Zeroing neuron j removes the rank-1 term W_down[:, j] a_j^T, so
||Y - Y_without_j||_F = ||W_down[:, j]||_2 * ||a_j||_2 — the same statistics as Wanda, no extra forwards
instead of the reference's one layer re-run per neuron (``calculate_obd_cache_new.py``, docs/SHOWO2.md §5.9).

Calibration inputs per task:
    gen, gen_source="denoise":   every denoising call of real generations (image tokens, time token, cond and
                                 null rows, all L positions) — what the pruned FFN will see;
    gen, gen_source="text_only": the reference's shortcut: one LLM forward over the conditional ids with the
                                 slot holding plain <|image_pad|> embeddings (no time token, no null row);
    und:                         the prefill of (image latents, question) prompts with their omni mask.

>>> from flashu_fx import Showo2, get_config, init_random_weights
>>> model = init_random_weights(Showo2(get_config("tiny"))).eval()
>>> calib = calibrate(model, "gen", ["a red cube"], steps=3, progress=False)
>>> calib.scores.shape, int(calib.keep_mask().sum(-1)[0])
(torch.Size([4, 256]), 192)
>>> layout = prepare_pruned_model(model, [calib])  # permutes the FFN weights in place
>>> layout.task_ranges("gen", 0)
((0, 192),)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flashu_fx.ffn_layout import FFNLayout, build_ffn_layout, permute_ffn_weights, top_k_mask, weight_signature
from flashu_fx.flashu_config import TASKS, FlashUConfig
from flashu_fx.layout import build_gen_batch, build_mmu_prompt
from flashu_fx.mmu import check_image_latents, prompt_embeddings
from flashu_fx.model import Showo2
from flashu_fx.t2i import eager_velocity, encode_prompts, generate_images
from flashu_fx.tokenizer import TextTokenizer, get_tokenizer

METHODS = ("wanda", "obd")
GEN_SOURCES = ("denoise", "text_only")
FORMAT_VERSION = 1


# ---- model identity -------------------------------------------------------------------------------------
def model_fingerprint(model: Showo2) -> str:
    """16 hex digits of sha256 over the model config and, per LLM layer, sum and abs-sum of W_down (fp64).

    Permutation-invariant on purpose: ``prepare_pruned_model`` reorders FFN neurons, which changes neither
    sum, so a calibration still matches the model it was computed on after pruning. The sums are rounded to
    7 significant digits so that fp64 summation order (device, neuron order) cannot flip the hash; they
    depend on the weight values, not the dtype they are held in (a bf16 checkpoint loaded in fp32 matches).
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for layer in model.showo.model.layers:
        w = layer.mlp.down_proj.weight.detach()
        total, absolute = torch.sum(w, dtype=torch.float64), torch.sum(w.abs(), dtype=torch.float64)
        digest.update(f"{float(total):.6e},{float(absolute):.6e};".encode())
    return digest.hexdigest()[:16]


def _check_fingerprint(expected: str, model: Showo2, what: str) -> None:
    actual = model_fingerprint(model)
    if actual != expected:
        raise ValueError(
            f"{what} was computed for model fingerprint {expected}, but this model ({model.config.name}) has "
            f"fingerprint {actual}: calibrate this model (neuron scores do not transfer between weights)"
        )


# ---- the result ---------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Neuron scores of one task. scores: fp32 (layers, I) in the model's neuron order at calibration time."""

    task: str
    scores: Tensor
    method: str
    config: dict[str, Any]  # FlashUConfig.to_dict() of the task
    samples_used: int
    fingerprint: str  # model_fingerprint of the calibrated model
    meta: dict[str, Any] = field(default_factory=dict)  # how it was gathered (gen_source, steps, positions ...)

    def flashu_config(self) -> FlashUConfig:
        return FlashUConfig.from_dict(self.config)

    def keep_mask(self, config: FlashUConfig | None = None) -> Tensor:
        """bool (layers, I): the top ``config.kept_ffn_width(I)`` neurons per layer (default: the stored config)."""
        config = config or self.flashu_config()
        if config.task != self.task:
            raise ValueError(f"keep_mask: config.task={config.task!r} but this calibration is for {self.task!r}")
        return top_k_mask(self.scores, config.kept_ffn_width(self.scores.shape[-1]))

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``{path}.safetensors`` (the scores) and ``{path}.json`` (everything else); returns both paths."""
        from safetensors.torch import save_file

        tensors_path, meta_path = _paths(path)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"scores": self.scores.float().contiguous().cpu()}, str(tensors_path), {"task": self.task})
        record = {k: v for k, v in dataclasses.asdict(self).items() if k != "scores"}
        record.update(version=FORMAT_VERSION, shape=list(self.scores.shape))
        meta_path.write_text(json.dumps(record, indent=1, sort_keys=True))
        return tensors_path, meta_path

    @classmethod
    def load(cls, path: str | Path, model: Showo2 | None = None) -> Calibration:
        """Read what ``save`` wrote (``path`` with or without suffix); with ``model``, check it is the same model."""
        from safetensors.torch import load_file

        tensors_path, meta_path = _paths(path)
        record = json.loads(meta_path.read_text())
        scores = load_file(str(tensors_path))["scores"]
        if list(scores.shape) != record["shape"]:
            raise ValueError(
                f"{tensors_path} holds scores {tuple(scores.shape)} but {meta_path} says {record['shape']}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"scores"}
        calib = cls(scores=scores, **{k: record[k] for k in names if k in record})
        if model is not None:
            _check_fingerprint(calib.fingerprint, model, f"calibration {meta_path}")
            expected = (model.config.num_layers, model.config.intermediate_size)
            if tuple(scores.shape) != expected:
                raise ValueError(f"calibration scores {tuple(scores.shape)} do not fit the model's FFNs {expected}")
        return calib


def _paths(path: str | Path) -> tuple[Path, Path]:
    stem = str(path)
    for suffix in (".safetensors", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return Path(stem + ".safetensors"), Path(stem + ".json")


# ---- gathering activation norms -----------------------------------------------------------------------------
def _gather_sq_norms(
    model: Showo2, samples: Sequence[Any], run: Callable[[int, Any], None], desc: str, progress: bool
) -> tuple[Tensor, int]:
    """Run ``run(i, sample)`` for every sample with pre-hooks on each down_proj.

    Returns sum over all calls, rows and positions of a^2 per neuron: fp32 (layers, I), and the row count
    (positions seen per layer).
    """
    layers = model.showo.model.layers
    device = layers[0].mlp.down_proj.weight.device
    sq = torch.zeros(len(layers), model.config.intermediate_size, dtype=torch.float32, device=device)
    seen = [0]

    def hook_for(index: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            # a: (rows * positions, I); the fp32 square is transient (73 MB per call at 1.5B, 2 x 1024 rows)
            a = args[0].reshape(-1, args[0].shape[-1])
            sq[index] += a.float().square().sum(0)
            if index == 0:
                seen[0] += a.shape[0]

        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        for i, sample in enumerate(tqdm(samples, desc=desc, disable=not progress)):
            run(i, sample)
    finally:
        for handle in handles:
            handle.remove()
    return sq, seen[0]


def _scores_from_norms(model: Showo2, sq: Tensor, method: str) -> Tensor:
    """sq: (layers, I) sum of a^2 -> scores (layers, I) fp32 on the CPU."""
    out = []
    for layer, s in zip(model.showo.model.layers, sq, strict=True):
        w = layer.mlp.down_proj.weight.detach().float()  # (H, I)
        weight_term = w.abs().sum(0) if method == "wanda" else w.norm(dim=0)
        out.append(s.sqrt() * weight_term)
    return torch.stack(out).cpu()


def _gen_runner(
    model: Showo2, gen_source: str, steps: int, guidance: float, seed: int, tokenizer: TextTokenizer | None
) -> Callable[[int, Any], None]:
    device = next(model.parameters()).device

    def run(i: int, prompt: str | Sequence[int]) -> None:
        ids = encode_prompts(model, [prompt], tokenizer)
        if gen_source == "text_only":  # reference: conditional row only, <|image_pad|> in the slot, no t
            batch = build_gen_batch(model.config, ids, guided=False).to(device)
            x = model.showo.model.embed_tokens(batch.tokens)
            cos, sin, _, _ = model.rope(x.shape[1], x.dtype, device)
            model.showo(x, cos, sin, batch.mask)
            return
        batch = build_gen_batch(model.config, ids, guided=guidance != 0).to(device)
        velocity = eager_velocity(model, batch, return_logits=False)  # logits never reach the FFNs
        generate_images(model, ids, steps=steps, guidance=guidance, seed=seed + i, velocity=velocity)

    return run


def _und_runner(model: Showo2, tokenizer: TextTokenizer | None) -> Callable[[int, Any], None]:
    device = next(model.parameters()).device
    tok = tokenizer or get_tokenizer(model.config)

    def run(i: int, sample: tuple[Tensor, str | list[int]]) -> None:
        latents, question = sample
        try:
            check_image_latents(model.config, latents)
        except ValueError as err:
            raise ValueError(f"und sample {i}: {err}") from None
        prompt = build_mmu_prompt(model.config, tok, question)
        x = prompt_embeddings(model, latents.to(device), prompt)  # (1, L0, H)
        cos, sin, _, _ = model.rope(x.shape[1], x.dtype, device)
        model.showo(x, cos, sin, prompt.mask(model.config).to(device))

    return run


@torch.no_grad()
def calibrate(
    model: Showo2,
    task: str,
    samples: Sequence[Any],
    config: FlashUConfig | None = None,
    method: str = "wanda",
    progress: bool = True,
    *,
    gen_source: str = "denoise",
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    tokenizer: TextTokenizer | None = None,
) -> Calibration:
    """Score every LLM FFN neuron for ``task`` from its calibration ``samples``; weights are not changed.

    gen: samples are prompts (str or token ids); each is one generation of ``steps`` grid points with CFG
    ``guidance`` (0 = unguided) and noise seed ``seed + i``, or one text-only forward (``gen_source``).
    und: samples are (latents (1, C, h, w), question) pairs; each is one prefill.
    All samples are used (``config.calibration_samples`` is the harness's default count, not a cap).
    Returns a Calibration with fp32 (layers, I) scores.
    """
    if task not in TASKS:
        raise ValueError(f"calibrate: task={task!r} is invalid: allowed one of {TASKS}")
    config = config or FlashUConfig.for_task(task)  # type: ignore[arg-type]
    if config.task != task:
        raise ValueError(f"calibrate: config.task={config.task!r} does not match task={task!r}")
    if method not in METHODS:
        raise ValueError(f"calibrate: method={method!r} is invalid: allowed one of {METHODS}")
    if gen_source not in GEN_SOURCES:
        raise ValueError(f"calibrate: gen_source={gen_source!r} is invalid: allowed one of {GEN_SOURCES}")
    if len(samples) == 0:
        raise ValueError("calibrate: samples is empty")
    fingerprint = model_fingerprint(model)  # before anything could touch the weights
    if task == "gen":
        run = _gen_runner(model, gen_source, steps, guidance, seed, tokenizer)
        meta: dict[str, Any] = {"gen_source": gen_source}
        if gen_source == "denoise":
            meta.update(steps=steps, guidance=guidance, seed=seed)
    else:
        run, meta = _und_runner(model, tokenizer), {}
    sq, positions = _gather_sq_norms(model, samples, run, f"calibrate {task}", progress)
    meta.update(positions=positions, accumulate_dtype="float32", model_dtype=str(model.showo.lm_head.weight.dtype))
    scores = _scores_from_norms(model, sq, method)
    return Calibration(task, scores, method, config.to_dict(), len(samples), fingerprint, meta)


# ---- applying it -------------------------------------------------------------------------------------------
def _by_task(items: Mapping[str, Any] | Iterable[Any] | None, what: str) -> dict[str, Any]:
    if items is None:
        return {}
    if isinstance(items, Mapping):
        for task, item in items.items():
            if item.task != task:
                raise ValueError(f"{what}[{task!r}] is for task {item.task!r}")
        return dict(items)
    out: dict[str, Any] = {}
    for item in [items] if hasattr(items, "task") else items:
        if item.task in out:
            raise ValueError(f"two {what} for task {item.task!r}")
        out[item.task] = item
    return out


def prepare_pruned_model(
    model: Showo2,
    calibrations: Mapping[str, Calibration] | Sequence[Calibration],
    configs: Mapping[str, FlashUConfig] | Sequence[FlashUConfig] | FlashUConfig | None = None,
) -> FFNLayout:
    """Permute every LLM FFN in place so each task's kept neurons are one contiguous range; return the layout.

    One or two tasks; ``configs`` default to each calibration's stored config. The full FFN computes the
    same function afterwards, up to fp summation order: fp32 tiny within 1e-6; 1.5B random bf16 on an H200,
    velocity relative change 2.0%, inside bf16's own noise (bf16 vs fp32 of the same model: 2.6%).
    Extra weight memory is zero: a task's pruned FFN
    is ``Qwen2MLP.forward(x, layout.task_ranges(task, layer))``, slices (views) of the permuted weights
    (``ffn_weight_bytes`` is unchanged). Tasks whose config prunes nothing get no range (full FFN).

    Calibrate the model BEFORE calling this, once: scores index neurons in the order at calibration time,
    and the fingerprint deliberately does not see the permutation, so a second call would mis-apply them.
    """
    calibs = _by_task(calibrations, "calibrations")
    cfgs = _by_task(configs, "configs")
    if not 1 <= len(calibs) <= 2:
        raise ValueError(f"prepare_pruned_model takes one or two tasks' calibrations, got {sorted(calibs)}")
    if set(cfgs) - set(calibs):
        raise ValueError(f"configs for tasks without a calibration: {sorted(set(cfgs) - set(calibs))}")
    size = model.config.intermediate_size
    keep: dict[str, Tensor] = {}
    for task, calib in calibs.items():
        _check_fingerprint(calib.fingerprint, model, f"the {task!r} calibration")
        if tuple(calib.scores.shape) != (model.config.num_layers, size):
            raise ValueError(f"the {task!r} calibration has scores {tuple(calib.scores.shape)} for this model's FFNs")
        mask = calib.keep_mask(cfgs.get(task))
        if int(mask[0].sum()) < size:
            keep[task] = mask
    if not keep:  # nothing pruned: identity order, full FFN for every task
        order = torch.arange(size).expand(model.config.num_layers, size).clone()
        return FFNLayout(order, {})
    layout = build_ffn_layout(keep)
    permute_ffn_weights(model, layout.order)
    return dataclasses.replace(layout, signature=weight_signature(model, layout))


def ffn_weight_bytes(model: Showo2) -> int:
    """Bytes of the distinct storages behind the LLM FFN weights (gate, up, down). Sliced variants are views."""
    storages: dict[int, int] = {}
    for layer in model.showo.model.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            storage = lin.weight.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---- analysis --------------------------------------------------------------------------------------------
def specialization(calib_gen: Calibration, calib_und: Calibration, top_fraction: float = 0.5) -> dict[str, Any]:
    """Per layer, where each task's top ``top_fraction`` neurons lie (paper Fig. 1).

    Returns {"top_fraction", "top_k", "intermediate_size", "layers": [{"layer", "gen_only", "und_only",
    "both", "neither"} ...], "totals": {same four counts summed over layers}}. Per layer gen_only + both =
    und_only + both = top_k and the four counts sum to I.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"specialization: top_fraction={top_fraction} is invalid: allowed (0, 1]")
    if calib_gen.scores.shape != calib_und.scores.shape:
        raise ValueError(f"score shapes differ: {tuple(calib_gen.scores.shape)} vs {tuple(calib_und.scores.shape)}")
    if calib_gen.fingerprint != calib_und.fingerprint:
        raise ValueError(
            f"the calibrations are for different models: fingerprints {calib_gen.fingerprint} (gen) and "
            f"{calib_und.fingerprint} (und)"
        )
    size = calib_gen.scores.shape[-1]
    top_k = max(1, int(size * top_fraction))
    g, u = top_k_mask(calib_gen.scores, top_k), top_k_mask(calib_und.scores, top_k)
    counts = {"gen_only": g & ~u, "und_only": u & ~g, "both": g & u, "neither": ~(g | u)}
    per_layer = {name: m.sum(-1).tolist() for name, m in counts.items()}
    layers = [{"layer": i, **{name: per_layer[name][i] for name in counts}} for i in range(g.shape[0])]
    totals = {name: sum(values) for name, values in per_layer.items()}
    return {"top_fraction": top_fraction, "top_k": top_k, "intermediate_size": size, "layers": layers, "totals": totals}
