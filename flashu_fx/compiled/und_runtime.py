"""Understanding runtime: a request is one prefill and one decode step per new token, each a CUDA-graph replay.

    prefill (step 0), rows padded to a multiple of PROMPT_BUCKET (pad keys are never attended: causal):
      prompt_embeddings (SigLIP + fusion, once) ─ prefill_layer 0..p over all rows
        ─ prune_compact at p: vnorm_topk on p's input, rows/RoPE/mask compacted (original positions kept)
        ─ prefill_layer p+1.. over the kept rows ─ next_token on the last prompt position only
    decode step d (one token): embed(token) ─ decode_layer for every layer not skipped (a skipped layer is
      the identity: no K/V, its slot stays invalid) ─ decode_finish (norm, lm_head on one row, argmax,
      position and slots + 1).

On the GPU the prefill is one CUDA graph per row bucket and each decode step one per (skip set, measure):
a new skip set costs one capture, never a compile. Static state per cache capacity C (a multiple of
CACHE_BUCKET, shared by all requests and graphs): per-layer K/V caches and validity masks, RoPE tables, the
prefill's inputs (latents, padded ids, L0 and the slot offsets as device scalars, so one graph serves every
prompt of its bucket) and (1,)-sized buffers the decode graphs read and advance themselves: the token to
feed, its RoPE position, and the next slot of each layer group (layers <= p have slot base L0, layers > p
base K0). Per request the host writes the prefill inputs, then reads each id one step behind (the stop check,
``mmu.read_one_step_behind``: the next step already runs meanwhile), plus the importances on a measuring step and
the kept positions once.

Every rule (which steps measure, which layers skip, which tokens stay, slot bases, positions) is the eager
twin's: the host-side plan is a ``flashu_fx.flashu_und.FlashUUndDecoder`` (used for its rules, not run) and
the skip set comes from ``choose_skip_set``; docs/SEMANTICS.md section 2.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from flashu_fx.compiled import und_pieces
from flashu_fx.compiled.cuda_graphs import CudaGraphs
from flashu_fx.ffn_layout import FFNLayout
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import choose_skip_set, ffn_ranges_per_layer
from flashu_fx.flashu_und import FlashUUndDecoder, UndStepRecord
from flashu_fx.layout import MmuPrompt
from flashu_fx.masks import omni_mask
from flashu_fx.mmu import read_one_step_behind
from flashu_fx.model import Showo2
from flashu_fx.schedule import und_step_layers

log = logging.getLogger(__name__)

PROMPT_BUCKET = 64  # prefill rows are padded to a multiple of this, so prompt lengths share compiled pieces
CACHE_BUCKET = 256  # cache slots (and decode shapes) are a multiple of this
MAX_GRAPHS = 64  # captured variants kept per capacity, least recently used dropped (skip sets: C(L, L * r_LS))

# compile_piece(fn, name, graph_passes) -> the compiled callable of one piece
PieceCompiler = Callable[[Callable, str, list[Callable]], Callable]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class _Static:
    """Buffers of one cache capacity C; every captured graph reads and writes exactly these."""

    k: list[Tensor]  # per layer (1, KV, C, d)
    v: list[Tensor]
    valid: Tensor  # bool (L, C): slots each layer has written
    cos: Tensor  # (C, d) RoPE of positions 0..C-1
    sin: Tensor
    token: Tensor  # (1, 1) int64: the token the next decode step feeds (the greedy id of the last step)
    pos: Tensor  # (1,) int64: RoPE position of the next decode token
    slot_a: Tensor  # (1,) int64: its cache slot in layers <= p
    slot_b: Tensor  # (1,) int64: its cache slot in layers > p
    logits: Tensor  # (V,) of the last step
    importance: Tensor  # (L,) fp32 of the last measuring step
    prefills: dict = field(default_factory=dict)  # prefill key -> _PrefillInputs
    graphs: CudaGraphs = field(default_factory=lambda: CudaGraphs(MAX_GRAPHS))  # prefill key | (skip set, measure)


@dataclass
class _PrefillInputs:
    """What one prefill graph reads: everything that varies between prompts of one row bucket P."""

    latents: Tensor  # (1, C, h, w) as the caller gives them
    tokens: Tensor  # (1, P) int64, padded with [PAD]
    offset: Tensor  # (1,) int64: the time token's position
    block: Tensor  # (1,) int64: where the bidirectional block starts
    prompt_len: Tensor  # (1,) int64: L0
    kept: Tensor  # (P - n + keep,) int64 out: rows kept after layer p (prompt positions)


class UndRuntime:
    """Compiled pieces and static buffers for FlashU understanding on one model (``config=None``: exact only).

    ``answer(latents, prompt, max_new_tokens, stop_at_eos)`` -> (ids, kept positions, step records).
    ``graph_captures`` counts CUDA-graph captures per variant; ``keep_logits`` keeps every step's logits.
    ``compile_one_row``: the compiler of the one-row pieces (first token, decode); ``compile_piece`` if None.
    """

    def __init__(self, model: Showo2, config: FlashUConfig | None, layout: FFNLayout | None,
                 compile_piece: PieceCompiler, cuda_graphs: bool,
                 compile_one_row: PieceCompiler | None = None) -> None:
        self.model, self.layout, self.cuda_graphs = model, layout, cuda_graphs
        self.config = FlashUConfig.off("und") if config is None else config
        if self.config.task != "und":
            raise ValueError(f"FlashUConfig.task={self.config.task!r} is invalid here: understanding needs 'und'")
        cfg = model.config
        self.layers = list(model.showo.model.layers)
        self.ffn = [self._ffn_weights(layer.mlp, r)
                    for layer, r in zip(self.layers, ffn_ranges_per_layer(model, self.config, layout, "und"),
                                        strict=True)]
        prune = self.config.token_prune_ratio > 0
        self.first_kept_layer = self.config.token_prune_layer + 1 if prune else cfg.num_layers  # layer group b
        self.embed = compile_piece(und_pieces.prompt_embeddings, "und_prompt_embeddings", [])
        self.prefill_full = compile_piece(und_pieces.prefill_layer, "und_prefill_layer", [])
        self.prefill_kept = compile_piece(und_pieces.prefill_layer, "und_prefill_layer_kept", [])
        self.compact = compile_piece(und_pieces.prune_compact, "und_prune_compact", [])
        one_row = compile_one_row or compile_piece
        self.first_token = one_row(und_pieces.next_token, "und_next_token", [])
        self.decode_layer = one_row(und_pieces.decode_layer, "und_decode_layer", [])
        self.decode_measured = one_row(und_pieces.decode_layer_measured, "und_decode_layer_measured", [])
        self.decode_finish = one_row(und_pieces.decode_finish, "und_decode_finish", [])
        self.states: dict[int, _Static] = {}
        self.weights_key: tuple[int, ...] = ()  # the parameters' addresses this runtime was built over
        self.keep_logits = False
        self.logits: list[Tensor] = []  # every step's logits of the last answer, when keep_logits

    @property
    def graph_captures(self) -> Counter:
        """CUDA-graph captures per variant ("prefill", "measure", "skip[...]"), over every cache capacity."""
        return sum((st.graphs.captures for st in self.states.values()), Counter())

    @staticmethod
    def _ffn_weights(mlp: torch.nn.Module, ranges) -> tuple[Tensor, Tensor, Tensor]:
        """(w_gate, w_up, w_down) of the layer's "und" FFN: views of the permuted storage, no copy."""
        if ranges is None:
            return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        ((lo, hi),) = ranges
        down = mlp.down_proj.weight[:, lo:hi]
        if down.is_cuda and (down.data_ptr() % 16):
            log.warning("und FFN range starts at neuron %d: its down_proj slice is not 16-byte aligned, so "
                        "inductor copies it every call (a layout whose range starts are multiples of 8 avoids it)",
                        lo)
        return mlp.gate_proj.weight[lo:hi], mlp.up_proj.weight[lo:hi], down

    def _static(self, capacity: int, device: torch.device) -> _Static:
        st = self.states.get(capacity)
        if st is None:
            cfg, head = self.model.config, self.model.showo.lm_head.weight
            shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
            cos, sin, _, _ = self.model.rope(capacity, head.dtype, device)
            index = lambda: torch.zeros(1, dtype=torch.int64, device=device)
            st = _Static(
                k=[torch.zeros(shape, dtype=head.dtype, device=device) for _ in self.layers],
                v=[torch.zeros(shape, dtype=head.dtype, device=device) for _ in self.layers],
                valid=torch.zeros(len(self.layers), capacity, dtype=torch.bool, device=device),
                cos=cos, sin=sin, token=torch.zeros(1, 1, dtype=torch.int64, device=device),
                pos=index(), slot_a=index(), slot_b=index(),
                logits=torch.zeros(head.shape[0], dtype=head.dtype, device=device),
                importance=torch.zeros(len(self.layers), dtype=torch.float32, device=device),
            )
            self.states[capacity] = st
        return st

    # ---- one request ----------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, latents: Tensor, prompt: MmuPrompt, max_new_tokens: int,
               stop_at_eos: bool) -> tuple[list[int], tuple[int, ...] | None, list[UndStepRecord]]:
        """Greedy ids (the stop token included when reached), kept image positions, one record per step."""
        plan = FlashUUndDecoder(self.model, self.config, self.layout, prompt, max_new_tokens)  # the twin's rules
        self.logits = []
        st, pre = self._prefill(plan, latents)
        skip_set: tuple[int, ...] = ()
        layers = und_step_layers(self.config, 0)
        importance = None
        if layers == "measure":
            importance = tuple(st.importance.tolist())
            skip_set = choose_skip_set(importance, plan.num_skipped)
        kept_positions = None
        if plan.prune:
            kept_positions = tuple(pre.kept[plan.image_start : plan.image_start + plan.keep].tolist())
        steps = [UndStepRecord(0, plan.prompt_len - 1, layers, (), importance, skip_set)]
        self._keep(st)

        def decode_step(_previous: Tensor, i: int) -> Tensor:
            nonlocal skip_set
            d = i + 1
            layers = und_step_layers(self.config, d)
            skipped = skip_set if layers == "skip" else ()
            self._decode(st, skipped, layers == "measure")  # feeds itself st.token, on the device
            measured = None
            if layers == "measure":
                measured = tuple(st.importance.tolist())
                skip_set = choose_skip_set(measured, plan.num_skipped)
            steps.append(UndStepRecord(d, plan.prompt_len - 1 + d, layers, skipped, measured, skip_set))
            self._keep(st)
            return st.token.clone()  # the next step overwrites st.token

        # The host reads each id one step behind (the stop check) while the next step runs.
        eos = self.model.config.specials.eos if stop_at_eos else None
        ids = read_one_step_behind(decode_step, st.token.clone(), max_new_tokens, eos, progress=False)
        del self.logits[len(ids):]  # after a stop token one step more ran: its record and logits are dropped
        return ids, kept_positions, steps[: len(ids)]

    def _keep(self, st: _Static) -> None:
        if self.keep_logits:
            self.logits.append(st.logits.clone())

    def _prefill(self, plan: FlashUUndDecoder, latents: Tensor) -> tuple[_Static, _PrefillInputs]:
        """Step 0: write this prompt into its bucket's prefill inputs, then run (or replay) the prefill."""
        cfg, device = self.model.config, latents.device
        prompt_len, rows = plan.prompt_len, round_up(plan.prompt_len, PROMPT_BUCKET)
        st = self._static(round_up(max(rows, prompt_len + plan.max_new_tokens), CACHE_BUCKET), device)
        # The image slot's place is a Dynamo constant of the compaction piece: part of the key.
        key = ("prefill", rows, plan.image_start, tuple(latents.shape), latents.dtype)
        pre = st.prefills.get(key)
        if pre is None:
            index = lambda: torch.zeros(1, dtype=torch.int64, device=device)
            pre = st.prefills[key] = _PrefillInputs(
                torch.zeros_like(latents), torch.zeros(1, rows, dtype=torch.int64, device=device), index(), index(),
                index(), torch.zeros(rows - cfg.num_image_tokens + plan.keep, dtype=torch.int64, device=device))
        pre.latents.copy_(latents)
        pre.tokens.copy_(F.pad(plan.prompt.tokens, (0, rows - prompt_len), value=cfg.specials.pad))
        pre.offset.fill_(plan.prompt.offset)
        pre.block.fill_(plan.prompt.block_offset)
        pre.prompt_len.fill_(prompt_len)
        self._run(st, key, lambda: self._prefill_step(st, pre, plan))
        return st, pre

    def _prefill_step(self, st: _Static, pre: _PrefillInputs, plan: FlashUUndDecoder) -> None:
        """The prefill over the static buffers (what its CUDA graph captures): only ``pre`` varies by prompt."""
        m, cfg = self.model, self.model.config
        n, rows = cfg.num_image_tokens, pre.tokens.shape[1]
        prompt_len = pre.prompt_len
        kept_len = prompt_len - n + plan.keep if plan.prune else prompt_len  # K0: slot base of layers > p
        slots = torch.arange(st.valid.shape[1], device=prompt_len.device)
        st.valid[: self.first_kept_layer] = slots < prompt_len  # every prompt slot of its group, nothing after
        st.valid[self.first_kept_layer :] = slots < kept_len
        h = self.embed(m, pre.latents, pre.tokens, pre.offset)
        mask = omni_mask(pre.block, rows, cfg.image_slot_len)
        cos, sin = st.cos[:rows], st.sin[:rows]
        last, inputs, outputs = prompt_len - 1, [], []  # the last prompt position's row
        for i, layer in enumerate(self.layers):
            piece = self.prefill_kept if i >= self.first_kept_layer else self.prefill_full
            out = piece(layer, h, cos, sin, mask, st.k[i], st.v[i], *self.ffn[i])
            if plan.skipping:  # measured on the last prompt position, before any compaction
                inputs.append(h.index_select(1, last))
                outputs.append(out.index_select(1, last))
            if plan.prune and i == plan.prune_layer:
                out, cos, sin, mask, kept = self.compact(layer, h, out, cos, sin, mask, plan.image_start, n,
                                                         plan.keep)
                pre.kept.copy_(kept)
                last = kept_len - 1
            h = out
        self.first_token(m.showo.model.norm, m.showo.lm_head, h.index_select(1, last), st.token, st.logits)
        st.pos.copy_(prompt_len)
        st.slot_a.copy_(prompt_len)
        st.slot_b.copy_(kept_len)
        if plan.skipping:  # layer_importance of each layer's (input, output) pair, all layers at once
            cos_io = F.cosine_similarity(torch.cat(inputs).float(), torch.cat(outputs).float(), dim=-1)
            st.importance.copy_(1.0 - cos_io.flatten())

    def _decode_step(self, st: _Static, skip: tuple[int, ...], measure: bool) -> None:
        """One decode token over the static buffers (this is what a CUDA graph captures)."""
        m = self.model
        x = m.showo.model.embed_tokens(st.token)  # (1, 1, H)
        importance = []
        for i, layer in enumerate(self.layers):
            if i in skip:
                continue
            slot = st.slot_b if i >= self.first_kept_layer else st.slot_a
            args = (layer, x, st.cos, st.sin, st.pos, slot, st.k[i], st.v[i], st.valid[i], *self.ffn[i])
            if measure:
                x, imp = self.decode_measured(*args)
                importance.append(imp)
            else:
                x = self.decode_layer(*args)
        self.decode_finish(m.showo.model.norm, m.showo.lm_head, x, st.token, st.logits, st.pos, st.slot_a,
                           st.slot_b)
        if measure:
            torch.stack(importance, out=st.importance)

    def _decode(self, st: _Static, skip: tuple[int, ...], measure: bool) -> None:
        self._run(st, (skip, measure), lambda: self._decode_step(st, skip, measure))

    def _run(self, st: _Static, key: tuple, step: Callable[[], None]) -> None:
        """Run one step on the static buffers: on the GPU replay its graph, captured on first use."""
        if not self.cuda_graphs:
            step()
            return
        label = key[0] if key[0] == "prefill" else "measure" if key[1] else f"skip{list(key[0])}"
        st.graphs.run(key, step, label)
