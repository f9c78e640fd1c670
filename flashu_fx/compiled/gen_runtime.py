"""Generation runtime: turns each call's plan into a sequence of compiled pieces, on the host.

Exact optimizations (outputs equal the eager model up to float rounding):
- only the image slot (time token + image tokens) is computed per call: the logits, the trailing
  eoi/eos/pad positions and the text prefix's queries are dead for the velocity;
- the text prefix's K/V (LLM layers and head blocks) is computed once per image and per network
  variant (pruned/full FFN, skip set) and reused by every call;
- on a head-cache hit that does not measure, SigLIP, fusion, the LLM and diff_proj are not run.
FlashU approximations follow ``flashu_fx.schedule.gen_schedule`` exactly as the eager twin does
(``flashu_fx.flashu_gen``). Skip sets and cache hits are host decisions: a new skip set runs the same
compiled pieces in another order, so it never compiles.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flashu_fx.compiled import pieces
from flashu_fx.compiled.cuda_graphs import CudaGraphs
from flashu_fx.ffn_layout import FFNLayout, check_layout_matches
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import choose_skip_set
from flashu_fx.layers import rope_cos_sin
from flashu_fx.layout import GenBatch
from flashu_fx.masks import omni_mask
from flashu_fx.model import Showo2, unpatchify
from flashu_fx.schedule import StepPlan, gen_schedule
from passes.ffn_slicing import slice_ffn

log = logging.getLogger(__name__)

# compile_piece(fn, name, graph_passes) -> the compiled callable of one piece
PieceCompiler = Callable[[Callable, str, list[Callable]], Callable]


@dataclass
class CallRecord:
    """What one call did: for equivalence tests against the eager twin."""

    call: int
    skip_set: tuple[int, ...]
    head: str
    trunk_ran: bool
    importance: list[float] | None = None


@dataclass
class _Prefix:
    llm_kv: list[tuple[Tensor, Tensor] | None]  # per LLM layer; None where the variant skips it
    head_kv: list[tuple[Tensor, Tensor]]  # per head block


@dataclass
class _Buffers:
    """Static tensors of one (rows, prefix length) shape: everything a captured call reads or writes, so a
    CUDA graph replays on new inputs after ``copy_`` into them. Per image: RoPE, mask, prefix K/V."""

    x: Tensor  # (M, C, h, w) fp32 sampler state
    t: Tensor  # (M,) fp32
    llm_cos: Tensor  # (M, S, d)
    llm_sin: Tensor
    head_cos: Tensor
    head_sin: Tensor
    mask: Tensor  # bool (M, 1, S, P + S)
    in_slot: Tensor  # bool (M, S, 1), all True: the block is the slot
    head_cache: Tensor  # (M, S, D): the stored 10-block output
    prefix_tokens: Tensor  # (M, P) ids of the bucketed text prefix
    prefix: dict[tuple, _Prefix] = field(default_factory=dict)  # by (ffn_pruned, skip set)
    graphs: CudaGraphs = field(default_factory=CudaGraphs)  # by call kind


@dataclass
class _ImageState:
    batch: GenBatch
    plans: list[StepPlan]
    buf: _Buffers
    filled: set[tuple] = field(default_factory=set)  # prefix variants computed for this image
    skip_set: tuple[int, ...] = ()
    next_call: int = 0
    records: list[CallRecord] = field(default_factory=list)


PREFIX_BUCKET = 64  # prefix lengths are padded to a multiple of this, so prompt lengths share compiled pieces


def prefix_bucket(prefix_len: int, limit: int) -> int:
    """Pad the text prefix (bos, prompt, boi) to a bucket; padded keys are masked, so this is exact."""
    return min(-(-prefix_len // PREFIX_BUCKET) * PREFIX_BUCKET, limit)


class GenRuntime:
    """Per-image state plus the compiled pieces. Use ``begin(batch, num_calls, guidance)`` then call it as
    a ``VelocityFn`` with ``step`` = 0, 1, ... in order (a wrong order raises)."""

    def __init__(self, model: Showo2, config: FlashUConfig | None, layout: FFNLayout | None,
                 compile_piece: PieceCompiler, cuda_graphs: bool = True) -> None:
        self.model, self.config, self.layout, self.cuda_graphs = model, config, layout, cuda_graphs
        self._buffers: dict[tuple[int, int], _Buffers] = {}  # by (rows, bucketed prefix length)
        if config is not None and config.ffn_prune_ratio > 0 and layout is None:
            raise ValueError("FlashU generation with ffn_prune_ratio > 0 needs an FFN layout (calibrate first)")
        self.pruned_range = None if layout is None or config is None or config.ffn_prune_ratio == 0 else \
            layout.ranges["gen"][0]
        if self.pruned_range is not None and any(r != self.pruned_range for r in layout.ranges["gen"]):
            raise ValueError("generation's pruned FFN range must be the same in every layer (gen-first layout)")
        if self.pruned_range is not None:
            check_layout_matches(model, layout)  # the weights this runtime slices are the permuted ones
        self.llm_full = compile_piece(pieces.llm_layer, "llm_layer", [])
        self.llm_full_measured = compile_piece(pieces.llm_layer_measured, "llm_layer_measured", [])
        if self.pruned_range is not None:
            # The pruned variants are the full layer graphs rewritten by the FFN-slicing pass.
            lo, hi = self.pruned_range
            sliced = [functools.partial(slice_ffn, lo=lo, hi=hi)]
            self.llm_pruned = compile_piece(pieces.llm_layer, f"llm_layer_ffn_{lo}_{hi}", sliced)
            self.llm_pruned_measured = compile_piece(pieces.llm_layer_measured, f"llm_layer_measured_ffn_{lo}_{hi}",
                                                     sliced)
        self.llm_prefix_full = compile_piece(pieces.llm_prefix_layer, "llm_prefix_layer", [])
        self.llm_prefix_pruned = self.llm_prefix_full
        if self.pruned_range is not None:
            self.llm_prefix_pruned = compile_piece(pieces.llm_prefix_layer, f"llm_prefix_layer_ffn_{lo}_{hi}", sliced)
        self.head_prefix = compile_piece(pieces.head_prefix_block, "head_prefix_block", [])
        self.head_in_prefix = compile_piece(pieces.head_input, "head_input_prefix", [])
        self.embed = compile_piece(pieces.block_embeddings, "block_embeddings", [])
        self.embed_shared = compile_piece(pieces.block_embeddings_cfg_shared, "block_embeddings_cfg_shared", [])
        self.head_in = compile_piece(pieces.head_input, "head_input", [])
        self.head_block = compile_piece(pieces.head_block, "head_block", [])
        self.final = compile_piece(pieces.final_velocity, "final_velocity", [])
        self.state: _ImageState | None = None

    # ---- per image ----------------------------------------------------------------------------------
    @staticmethod
    def plans_for(config: FlashUConfig | None, num_calls: int, guidance: float) -> list[StepPlan]:
        """FlashU's schedule, or (config None: exact optimizations only) every call full at guidance g."""
        if config is None:
            return [StepPlan(s, guidance, False, "all", "compute") for s in range(1, num_calls + 1)]
        return gen_schedule(config, num_calls, guidance)

    @torch.no_grad()
    def begin(self, batch: GenBatch, num_calls: int, guidance: float) -> list[StepPlan]:
        """Reset per-image state and refresh the static buffers; returns the plans (their guidance drives CFG)."""
        m, cfg = self.model, self.model.config
        dtype = m.showo.model.embed_tokens.weight.dtype
        device = batch.tokens.device
        slot = cfg.image_slot_len
        prefix_len = prefix_bucket(int(batch.offsets.max()), cfg.max_seq_len - slot)  # one host read per image
        block_pos = batch.offsets[:, None] + torch.arange(slot, device=device)  # (M, S) true positions
        keys = torch.arange(prefix_len + slot, device=device)
        mask = (keys[None, :] < batch.offsets[:, None]) | (keys[None, :] >= prefix_len)  # (M, P + S)
        fresh = dict(
            llm_cos_sin=rope_cos_sin(block_pos, m.llm_inv_freq, dtype),
            head_cos_sin=rope_cos_sin(block_pos, m.head_inv_freq, dtype),
            mask=mask[:, None, None, :].expand(-1, 1, slot, -1),
        )
        rows = batch.tokens.shape[0]
        buf = self._buffers.get((rows, prefix_len))
        if buf is None:
            h, w = cfg.latent_size
            buf = _Buffers(
                torch.zeros(rows, cfg.latent_channels, h, w, device=device),
                torch.zeros(rows, device=device),
                *(torch.empty_like(v) for v in (*fresh["llm_cos_sin"], *fresh["head_cos_sin"])),
                torch.empty(fresh["mask"].shape, dtype=torch.bool, device=device),
                torch.ones(rows, slot, 1, dtype=torch.bool, device=device),
                torch.zeros(rows, slot, cfg.head_hidden_size, dtype=dtype, device=device),
                torch.zeros(rows, prefix_len, dtype=batch.tokens.dtype, device=device),
            )
            self._buffers[(rows, prefix_len)] = buf
        for dst, src in zip((buf.llm_cos, buf.llm_sin, buf.head_cos, buf.head_sin, buf.mask),
                            (*fresh["llm_cos_sin"], *fresh["head_cos_sin"], fresh["mask"]), strict=True):
            dst.copy_(src)
        buf.prefix_tokens.copy_(batch.tokens[:, :prefix_len])
        self.state = _ImageState(batch, self.plans_for(self.config, num_calls, guidance), buf)
        return self.state.plans

    def _ffn_ranges(self, pruned: bool):
        return (self.pruned_range,) if pruned and self.pruned_range is not None else None

    @torch.no_grad()
    def _fill_prefix(self, pruned: bool, skip: tuple[int, ...]) -> None:
        """Prefix K/V of every kept LLM layer and head block for this variant, once per image: a captured
        graph whose outputs are the static prefix buffers the call graphs read. They are read on every later call
        of the image, between other graphs' replays, so they are kept outside the graphs' shared pool."""
        st = self.state
        key = (pruned, skip)
        if key not in st.filled:
            body = functools.partial(self._prefix_body, pruned, skip)
            st.buf.prefix[key] = _Prefix(*self._graphed(("prefix", *key), body, keep_outputs=True))
            st.filled.add(key)

    def _prefix_body(self, pruned: bool, skip: tuple[int, ...]) -> tuple[list, list]:
        """(LLM layers' (k, v) or None, head blocks' (k, v)): ``_Prefix``'s fields, as a tree of tensors."""
        buf, m = self.state.buf, self.model
        n = buf.prefix_tokens.shape[1]
        x = m.showo.model.embed_tokens(buf.prefix_tokens)
        cos, sin, hcos, hsin = m.rope(n, x.dtype, x.device)
        causal = omni_mask(torch.full((x.shape[0],), n, device=x.device), n, 0)
        layer_fn = self.llm_prefix_pruned if pruned else self.llm_prefix_full
        llm_kv: list = []
        for i, layer in enumerate(m.showo.model.layers):
            if i in skip:
                llm_kv.append(None)
                continue
            x, k, v = layer_fn(layer, x, cos, sin, causal)
            llm_kv.append((k, v))
        h = self.head_in_prefix(m, x)
        head_kv = []
        for block in m.diffusion_head_a:
            h, k, v = self.head_prefix(block, h, hcos, hsin, causal)
            head_kv.append((k, v))
        return llm_kv, head_kv

    # ---- per call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, step: int, cfg_shared_latents: bool = False) -> Tensor:
        """One model call. ``cfg_shared_latents``: x's cond and null halves are equal (see the backend's step)."""
        st = self.state
        if st is None:
            raise RuntimeError("GenRuntime: call begin(batch, num_calls, guidance) before the first model call")
        if step != st.next_call:
            raise RuntimeError(f"GenRuntime: expected call {st.next_call} of this image, got step={step}; "
                               "calls must come in order, once each (begin() starts a new image)")
        if step >= len(st.plans):
            raise RuntimeError(f"GenRuntime: only {len(st.plans)} calls were planned, got step={step}")
        st.next_call += 1
        plan = st.plans[step]
        skip = st.skip_set if plan.layers == "skip" else ()
        record = CallRecord(plan.call, skip, plan.head, plan.needs_trunk)
        st.records.append(record)
        if plan.needs_trunk:
            self._fill_prefix(plan.ffn_pruned, skip)
            pruned = plan.ffn_pruned and self.pruned_range is not None
            shared = cfg_shared_latents and st.batch.guided
            kind = (True, pruned, skip, plan.layers == "measure", plan.head, shared)
        else:
            kind = (False, False, (), False, "reuse", False)
        st.buf.x.copy_(x)
        st.buf.t.copy_(t)
        velocity, importance = self._graphed(kind, lambda: self._call_body(kind))
        if importance is not None:
            record.importance = importance.tolist()  # the one host read of a measuring call
            st.skip_set = choose_skip_set(record.importance, self.config.num_skipped_layers(len(record.importance)))
        return velocity

    def _graphed(self, kind: tuple, body, keep_outputs: bool = False):
        """Run ``body`` on the static buffers; on CUDA, replay its CUDA graph (captured on first use: after a
        warm-up on a side stream, which compiles the pieces). Returns the body's (static) outputs;
        ``keep_outputs``: valid past other graphs' replays (``CudaGraphs.run``)."""
        buf = self.state.buf
        if not (self.cuda_graphs and buf.x.is_cuda):
            return body()
        return buf.graphs.run(kind, body, "call", keep_outputs)

    def _call_body(self, kind: tuple) -> tuple[Tensor, Tensor | None]:
        """One model call on the static buffers: (velocity (M, C, h, w), importance (L,) | None)."""
        trunk, pruned, skip, measure, head, shared = kind
        buf, m = self.state.buf, self.model
        c = m.time_embeds(buf.t)
        if not trunk:
            return self._velocity(buf.head_cache, c), None
        prefix = buf.prefix[(pruned, skip)]
        layer_fn = (self.llm_pruned_measured if pruned else self.llm_full_measured) if measure else \
            (self.llm_pruned if pruned else self.llm_full)
        h = self.embed_shared(m, buf.x, c) if shared else self.embed(m, buf.x, c)
        sims = []
        for i, layer in enumerate(m.showo.model.layers):
            if i in skip:
                continue
            pk, pv = prefix.llm_kv[i]
            if measure:
                h, s = layer_fn(layer, h, buf.llm_cos, buf.llm_sin, buf.mask, pk, pv)
                sims.append(s)
            else:
                h = layer_fn(layer, h, buf.llm_cos, buf.llm_sin, buf.mask, pk, pv)
        importance = 1 - torch.stack(sims) / (h.shape[0] * h.shape[1]) if measure else None
        if head == "reuse":  # a measuring call on a cache hit: the trunk ran only to measure
            return self._velocity(buf.head_cache, c), importance
        h = self.head_in(m, h)
        for block, (pk, pv) in zip(m.diffusion_head_a, prefix.head_kv, strict=True):
            h = self.head_block(block, h, c, buf.in_slot, buf.head_cos, buf.head_sin, buf.mask, pk, pv)
        if head == "store":
            buf.head_cache.copy_(h)
        return self._velocity(h, c), importance

    def _velocity(self, h: Tensor, c: Tensor) -> Tensor:
        v_tokens = self.final(self.model.diffusion_head_b, h, c, self.state.buf.in_slot)
        cfg = self.model.config
        return unpatchify(v_tokens, cfg.latent_size, cfg.latent_channels)

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per call kind and buffer shape, plus prefix variants)."""
        return sum(len(buf.graphs) for buf in self._buffers.values())

    @property
    def records(self) -> list[CallRecord]:
        return [] if self.state is None else self.state.records
