"""``flashu_backend``: the torch.compile backend for Show-o2, one compiled artifact per task.

    backend = flashu_backend(task="gen", config=FlashUConfig.for_task("gen"), layout=layout)
    gen = torch.compile(model, backend=backend)
    latents = generate_images_compiled(gen, backend, prompts)          # or your own loop:

    plans = backend.begin_image(num_calls, guidance)                    # host plan of every call
    for k, plan in enumerate(plans):
        with backend.step(k):                                           # which call this is
            v = gen(tokens, x, t, offsets, mask, return_logits=False).velocity
        # CFG with plan.guidance, Euler update ...

Dynamo captures ``Showo2.forward`` once; the backend recognises the Show-o2 graph (``passes.showo2_graph``) and
returns a callable that runs that graph under FlashU's plan of each call (``gen_graph.GenGraphExecutor``): FlashU's
decisions and the exact optimizations as passes over the captured graph, the result split into parts at module
boundaries, each distinct part compiled once, each variant replayed as a CUDA graph. A model call outside
``backend.step(k)``, or out of order, raises. A graph that is not a Show-o2 forward is compiled unchanged
(inductor), with a warning. ``config=None`` gives the exact optimizations only.

``task="und"``: the answer loop's model calls (``Showo2.understand``: the prefill and each decode step) are captured
by Dynamo and run as FlashU-rewritten parts of those graphs (``und_graph.UndGraphExecutor``);
``answer_question(und, ...)`` or ``answer_question_compiled(und, backend, ...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, fx

from flashu_fx.compiled.cuda_graphs import tensor_addresses
from flashu_fx.compiled.gen_graph import CallRecord, GenGraphExecutor
from flashu_fx.compiled.part_compiler import PartSettings, make_part_compiler, merge_off_for_autotuning
from flashu_fx.compiled.und_graph import UndAnswerState, UndGraphExecutor, check_decode_attention
from flashu_fx.config import PRESETS, Showo2Config
from flashu_fx.ffn_layout import FFNLayout, check_layout_matches
from flashu_fx.flashu_config import FlashUConfig
from flashu_fx.flashu_gen import check_layout_has_task, layout_ranges
from flashu_fx.inputs import check_guidance, is_int
from flashu_fx.model import Showo2
from flashu_fx.projection_layout import colocate_projections
from flashu_fx.schedule import StepPlan, check_plans, exact_schedule, gen_schedule
from flashu_fx.und_cache import UndCache, cache_capacity
from passes.graph_utils import lifted_state_dict
from passes.partition import PartitionedGraph
from passes.showo2_graph import Showo2GraphMatch, match_showo2_graph

log = logging.getLogger(__name__)

MERGED_WEIGHT_SETS = 8  # weight sets whose merged-projection layout is remembered (``FlashUBackend._colocated``)


class FlashUBackend:
    """A torch.compile backend (callable on ``(gm, example_inputs)``) plus the per-call step protocol."""

    def __init__(self, task: str = "gen", config: FlashUConfig | None = None, layout: FFNLayout | None = None,
                 model_config: Showo2Config | None = None, piece_backend: str | None = None,
                 cuda_graphs: bool = True, merge_projections: bool = True, eager_numerics: bool = True,
                 tune_decode: bool = True, inductor_options: dict | None = None,
                 merge_ffn_slices: bool = False, decode_attention: str = "sdpa",
                 norm_in_products: bool = True, prefill_eager_numerics: bool = True) -> None:
        if task not in ("gen", "und"):
            raise ValueError(f"flashu_backend task must be 'gen' or 'und', got {task!r}")
        if config is not None and config.task != task:
            raise ValueError(f"FlashUConfig.task={config.task!r} does not match the backend task {task!r}")
        if config is not None:
            check_layout_has_task(config, layout, task)  # now, not inside Dynamo's first compile
        if piece_backend not in (None, "inductor", "eager"):
            raise ValueError(f"flashu_backend piece_backend={piece_backend!r} is invalid: allowed None, 'inductor' "
                             "or 'eager'")
        self.task, self.config, self.layout, self.model_config = task, config, layout, model_config
        self.piece_backend, self.cuda_graphs, self.merge_projections = piece_backend, cuda_graphs, merge_projections
        self.tune_decode, self.norm_in_products = tune_decode, norm_in_products  # understanding's one-row parts
        self.prefill_eager_numerics = prefill_eager_numerics  # understanding's prefill
        self.decode_attention = check_decode_attention(decode_attention)
        # How every part compiles; each executor's compiler varies it (_part_compiler). A bad inductor option name
        # fails here, not at compile.
        self.part_settings = PartSettings(merge_ffn_slices=merge_ffn_slices, eager_numerics=eager_numerics,
                                          inductor_options=inductor_options or {})
        self.captured: PartitionedGraph | None = None  # the parts of the last captured forward that ran
        self.captured_prefix: PartitionedGraph | None = None  # ... and of its last prefix graph (generation)
        self._und_graph: UndGraphExecutor | None = None  # understanding: the executor of every captured call
        self._gen_graph: GenGraphExecutor | None = None  # generation: the executor of the last captured forward
        self._plans: list[StepPlan] = []  # the current image's plans
        self.und_caches: dict[tuple, UndCache] = {}  # one cache per capacity, reused by answers
        # addresses of the weight sets laid out for merged projections, the most recently used last (at most
        # MERGED_WEIGHT_SETS: a loop that swaps weights in again and again keeps a bounded record)
        self._merged_weights: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self._num_calls: int | None = None
        self._guidance = 0.0
        self._step: int | None = None
        self._next_step = 0  # the call the current image expects next
        self._cfg_shared = False
        self._served = False  # whether the current step's model call reached this backend
        self.compiles = 0  # whole-graph captures handed to this backend
        self.piece_captures: Counter = Counter()  # per compiled part: captures (after warm-up: recompiles)
        self.part_compile_seconds: Counter = Counter()  # per compiled part: seconds spent compiling it

    # ---- the step protocol ----------------------------------------------------------------------------
    def begin_image(self, num_calls: int, guidance: float,
                    plans: Sequence[StepPlan] | None = None) -> list[StepPlan]:
        """Start a new image of ``num_calls`` model calls; returns every call's plan (guidance included).

        ``plans``: a schedule of the caller's own, one ``StepPlan`` per call (an ablation or a study of one kind
        of call); default: the backend's config's (``gen_schedule``), or every call exact without one.
        """
        if not is_int(num_calls) or num_calls < 1:
            raise ValueError(f"num_calls={num_calls!r} is invalid: allowed an integer >= 1")
        check_guidance(guidance, per_call=False)
        if plans is not None:
            check_plans(plans, num_calls)
            if not self._prunes_ffn and any(plan.ffn_pruned for plan in plans):  # the executor has no pruned FFN
                raise ValueError("plans with ffn_pruned=True are invalid for a backend without an FFN layout in use: "
                                 "allowed ffn_pruned=False, or a config with ffn_prune_ratio > 0 and its layout")
            plans = list(plans)
        elif self.config is None:
            plans = exact_schedule(num_calls, guidance)
        else:
            plans = gen_schedule(self.config, num_calls, guidance)
        self._num_calls, self._guidance, self._plans = num_calls, guidance, plans
        self._step, self._next_step = None, 0
        return self._plans

    @contextlib.contextmanager
    def step(self, k: int, cfg_shared_latents: bool = False) -> Iterator[None]:
        """The model call inside this block is call ``k`` (0-based) of the current image.

        ``cfg_shared_latents``: the caller promises the latents' cond and null halves are equal (true for the
        CFG sampler, which updates both halves with the same guided velocity), so SigLIP and fusion run on
        one half. Leave it False when in doubt: the result is the same, only slower.
        """
        if self._num_calls is None:
            raise RuntimeError("flashu_backend: call begin_image(num_calls, guidance) before step(k)")
        if not is_int(k) or not 0 <= k < self._num_calls:
            raise ValueError(f"step k={k!r} is invalid: allowed an integer in [0, {self._num_calls}) "
                             f"(begin_image planned {self._num_calls} calls)")
        if k != self._next_step:
            raise RuntimeError(f"flashu_backend: expected call {self._next_step} of this image, got step({k}): calls "
                               "run in order, and begin_image(num_calls, guidance) starts a new image")
        self._step, self._cfg_shared, self._served = k, cfg_shared_latents, False
        try:
            yield
            if not self._served:
                raise RuntimeError(
                    f"flashu_backend: the model call inside `with backend.step({k}):` never reached the backend, so "
                    "it ran without FlashU. Either the block called the uncompiled model, or torch.compile ran the "
                    "model eagerly: most often Dynamo's recompile limit (torch._dynamo.config.recompile_limit), "
                    "since every torch.compile of one model class with a new backend adds a cache entry to its "
                    "forward; call torch._dynamo.reset() before compiling again.")
            self._next_step = k + 1
        finally:
            self._step, self._cfg_shared = None, False

    @property
    def records(self) -> list[CallRecord]:
        """What each call of the last (or current) image did: ``CallRecord``s (skip set, head use, measurement)."""
        return [] if self._gen_graph is None else list(self._gen_graph.state.records)

    @property
    def cuda_graph_captures(self) -> int:
        """CUDA graphs captured by this backend's executors so far (a capture is not a compilation)."""
        executors = [e.cuda_graphs for e in (self._und_graph, self._gen_graph) if e is not None and e.cuda_graphs]
        return sum(sum(graphs.captures.values()) for graphs in executors)

    @property
    def variant_builds(self) -> int:
        """Graph variants built so far (FlashU's passes run, the result partitioned): one per skip set, head action
        and phase, never one per prompt length."""
        return sum(e.variant_builds for e in (self._und_graph, self._gen_graph) if e is not None)

    # ---- torch.compile entry ----------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> object:
        self.compiles += 1
        if is_und_call(gm):
            if self.task != "und":
                raise RuntimeError(
                    f"flashu_backend(task={self.task!r}) was handed an understanding call (the model called with "
                    "cache=...): compile the model for answers with flashu_backend('und')")
            return self._und_graph_runner(gm, example_inputs)
        if self.task == "und":
            return _refuse_und_forward
        expected = self._expected_keys(example_inputs, gm)
        match, why = match_showo2_graph(gm, expected) if expected else (None, "no Show-o2 embedding input found")
        if match is None and self._step is not None:
            # Compiled during a step: the model was supposed to be a Show-o2. A fragment here means Dynamo split
            # or skipped Showo2.forward, and running it unchanged would quietly drop FlashU.
            raise RuntimeError(
                f"flashu_backend: inside backend.step({self._step}) Dynamo handed over a graph that is not a whole "
                f"Show-o2 forward ({why}). Compile the Show-o2 module itself (not a module around it). If you "
                "did, Dynamo skips a forward for good once an exception escaped while tracing it (e.g. a call "
                "with wrong input shapes) and then compiles its pieces one by one: call torch._dynamo.reset() and "
                "compile the model again.")
        if match is None:
            warnings.warn(f"flashu_backend: not a Show-o2 forward ({why}); compiling the graph unchanged",
                          stacklevel=2)
            return self._exact_fallback(gm, example_inputs)
        return self._gen_graph_runner(gm, match, example_inputs)

    def und_cache(self, compiled: torch.nn.Module, positions: int, device) -> UndCache:
        """The cache an answer of ``positions`` (prompt + new tokens) uses, of capacity rounded up to CACHE_BUCKET;
        one per capacity, reused (a new capacity is new cache shapes: one recompile)."""
        dtype = compiled.showo.model.embed_tokens.weight.dtype
        capacity = cache_capacity(positions)
        key = (capacity, dtype, torch.device(device))
        cache = self.und_caches.get(key)
        if cache is None:
            cache = self.und_caches[key] = UndCache.for_model(compiled, capacity, dtype, device)
        return cache

    def _expected_keys(self, example_inputs: list, gm: fx.GraphModule) -> list[str]:
        """Checkpoint keys of a Show-o2 with the graph's depths (key names do not depend on widths)."""
        cfg = self.model_config
        if cfg is None:
            depths = graph_depths(gm)
            if depths is None:
                return []
            cfg = dataclasses.replace(PRESETS["tiny"], num_layers=depths[0], und_num_layers=depths[1],
                                      head_num_layers=depths[2])
        with torch.device("meta"):
            return list(Showo2(cfg).state_dict())

    def _exact_fallback(self, gm: fx.GraphModule, example_inputs: list):
        if self.piece_backend == "eager" or not any(isinstance(x, Tensor) and x.is_cuda for x in example_inputs):
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs)

        def run(*args):
            self._served = True  # the graph runs unchanged, as the warning said: a served step all the same
            return compiled(*args)

        # Inductor's callables may take their inputs as one list ("boxed"); keep the convention Dynamo sees.
        run._boxed_call = getattr(compiled, "_boxed_call", False)
        return run

    def _gen_graph_runner(self, gm: fx.GraphModule, match: Showo2GraphMatch, example_inputs: list):
        """The captured forward itself, rewritten per call by FlashU's passes (``gen_graph``) and split at module
        boundaries (``passes.partition``), each distinct part compiled once (``merge_projections`` merges each
        q/k/v and gate/up group, whose weights it first colocates in one buffer); on CUDA each variant replays as a
        CUDA graph."""
        cuda = example_inputs[match.user_inputs["latents"]].is_cuda
        weights = {k: example_inputs[i] for k, i in match.param_inputs.items()}
        merge = self._merged(weights)
        # Parts serve every batch length (the cut after the last slot follows the prompt): see dynamic_lengths.
        compile_part = self._part_compiler(cuda, merge=merge, dynamic_lengths=True)
        slot_len = weights["position_embedding.weight"].shape[0] + 1  # the time token and the configured grid
        ranges = self._graph_ffn_ranges("gen", weights)
        executor = GenGraphExecutor(gm, self.config, ranges, compile_part, slot_len, num_decoder_layers(weights),
                                    self.cuda_graphs and cuda)
        if self._gen_graph is not None and self._step:
            # Dynamo captured the forward again within an image (new input shapes or grad mode): the image goes on
            executor.continue_image(self._gen_graph.state)
        self._gen_graph = executor
        weight_inputs = list(match.param_inputs.items())

        @torch.no_grad()  # an inference backend: no autograd graph, whatever the caller's grad mode
        def run(*args: Tensor):
            self._serve(match)
            if self._step == 0:  # once per image: the weights do not change within one
                if merge or self._checks_layout:
                    self._prepare_weights({k: args[i] for k, i in weight_inputs}, merge)
                executor.begin()
            out = executor(self._plans[self._step], args, cfg_shared=self._cfg_shared)
            self.captured, self.captured_prefix = executor.graph, executor.prefix_graph
            return out

        return run

    def _und_graph_runner(self, gm: fx.GraphModule, example_inputs: list):
        """The captured prefill or decode step (``Showo2.understand``) run by this backend's ``UndGraphExecutor``:
        FlashU's token pruning, layer skipping and pruned FFN as passes over it."""
        weights = lifted_state_dict(gm, example_inputs)
        if self._und_graph is None:
            cuda = any(isinstance(x, Tensor) and x.is_cuda for x in example_inputs)
            merge = self._merged(weights)
            # No eager_numerics in the one-row parts: decode attention, and with tune_decode each one-row product,
            # is a multiply-and-sum reduction, where emulated rounding would round every product to bf16 (measured:
            # decode 1.70 -> 1.94 ms/token at 1.5B). With prefill_eager_numerics, the prefill's parts up to the
            # pruning layer (the ones the kept-token choice reads) round as eager and keep their projections
            # unmerged: a merged q/k/v is another GEMM, whose sums round otherwise (on the CPU in bf16, merging
            # alone moved the kept image tokens of 49 of 100 testbed questions). The prefill's parts serve every
            # prompt length (dynamic_lengths).
            decision = self._part_compiler(cuda, merge=False, eager_numerics=True, dynamic_lengths=True) \
                if self.prefill_eager_numerics else None
            self._und_graph = UndGraphExecutor(
                self.config, self._graph_ffn_ranges("und", weights),
                self._part_compiler(cuda, merge=merge, eager_numerics=False, dynamic_lengths=True),
                cuda_graphs=self.cuda_graphs and cuda,
                compile_one_row=self._part_compiler(cuda, merge=merge, eager_numerics=False,
                                                    coordinate_descent=self.tune_decode,
                                                    norm_in_products=self.norm_in_products),
                prepare_weights=functools.partial(self._prepare_weights, merge=merge)
                if merge or self._checks_layout else None,
                decode_attention=self.decode_attention, compile_decision_part=decision)
        return torch.no_grad()(self._und_graph.runner(gm, example_inputs))  # inference only, as generation

    def _graph_ffn_ranges(self, task: str, weights: dict[str, Tensor]) -> list[tuple[int, int]] | None:
        """The single neuron range per layer of ``task``'s pruned FFN (None: FFN pruning off), the layout checked
        against the config and the captured widths (``flashu_gen.layout_ranges``)."""
        if not self._prunes_ffn:
            return None
        inter = weights["showo.model.layers.0.mlp.gate_proj.weight"].shape[0]
        return [r[0] for r in layout_ranges(self.config, self.layout, task, num_decoder_layers(weights), inter)]

    def _merged(self, weights: dict[str, Tensor]) -> bool:
        """Whether the parts merge projections: the captured weights (the user's own Parameters) are colocated
        once, so merge_projections finds each q/k/v and gate/up group in one buffer in every layer."""
        if not self.merge_projections:
            return False
        if merge_off_for_autotuning(self.part_settings.inductor_options):  # the weights stay: no part merges
            return False
        if self._colocated(weights):
            return True
        warnings.warn("flashu_backend: some q/k/v or gate/up weights cannot share a buffer (mixed dtypes or "
                      "devices); projections stay separate matmuls", stacklevel=3)
        return False

    @property
    def _prunes_ffn(self) -> bool:
        """Whether the executors run a pruned FFN (the config prunes; the constructor checked its layout)."""
        return self.config is not None and self.config.ffn_prune_ratio > 0

    @property
    def _checks_layout(self) -> bool:
        """Whether the weights must match a pruned FFN's layout (FFN pruning on, a layout with a signature)."""
        return self._prunes_ffn and self.layout is not None

    def _prepare_weights(self, weights: dict[str, Tensor], merge: bool) -> None:
        """Before an image or an answer: the pruned FFN's layout must be the one these weights were permuted for
        (a user's own loop gets the check the pipelines make; weights checked once are not probed again), and with
        ``merge`` the weights are laid out for the merged projections (``_keep_merged``)."""
        if self._checks_layout:
            check_layout_matches([weights[f"showo.model.layers.{i}.mlp.down_proj.weight"]
                                  for i in range(num_decoder_layers(weights))], self.layout)
        if merge:
            self._keep_merged(weights)

    def _keep_merged(self, weights: dict[str, Tensor]) -> None:
        """Before an image or an answer: weights the merged parts have not seen (new tensors assigned to the model
        since the capture, e.g. ``load_state_dict(assign=True)``, pass the shape guards) are colocated first, since
        a merged projection reads its siblings' rows from one buffer."""
        if not self._colocated(weights):
            raise RuntimeError("flashu_backend: the model's new q/k/v or gate/up weights cannot share a buffer "
                               "(mixed dtypes or devices), but its compiled parts merge them: compile the model "
                               "again (torch._dynamo.reset()) or use merge_projections=False")

    def _colocated(self, weights: dict[str, Tensor]) -> bool:
        """Colocate ``weights`` (``colocate_projections``) unless this set, at these addresses, was laid out before;
        False when some group cannot share a buffer."""
        tensors = list(weights.values())
        addresses = tensor_addresses(tensors, range(len(tensors)))
        if addresses in self._merged_weights:
            self._merged_weights.move_to_end(addresses)
            return True
        if not colocate_projections(weights):
            return False
        self._merged_weights[tensor_addresses(tensors, range(len(tensors)))] = None  # the addresses after the move
        while len(self._merged_weights) > MERGED_WEIGHT_SETS:
            self._merged_weights.popitem(last=False)  # forgotten: met again, it is only checked again
        return True

    def _part_compiler(self, cuda: bool, **changes: object) -> Callable:
        """The part compiler of an executor: this backend's ``part_settings`` on the device's piece backend, with
        ``changes`` (``PartSettings`` fields) for that executor's kind of part."""
        backend = self.piece_backend or ("inductor" if cuda else "eager")
        settings = dataclasses.replace(self.part_settings, backend=backend, **changes)
        return make_part_compiler(settings, self.piece_captures, self.part_compile_seconds)

    @property
    def und_graphs(self) -> dict[str, PartitionedGraph]:
        """Understanding: the variants of the captured prefill and decode step that ran last, as parts."""
        return {} if self._und_graph is None else self._und_graph.graphs

    @property
    def und_state(self) -> UndAnswerState | None:
        """Understanding: the answer in progress or last answered (step records, kept prompt rows)."""
        return None if self._und_graph is None else self._und_graph.state

    def _serve(self, match: Showo2GraphMatch) -> None:
        """Checks before a model call, which then counts as served."""
        if self._step is None:
            raise RuntimeError("flashu_backend: the compiled model was called outside `with backend.step(k):` "
                               "(after backend.begin_image(num_calls, guidance)); it cannot tell which call this is")
        if match.num_outputs != 1:
            raise RuntimeError("flashu_backend(task='gen') computes no logits: call the model with "
                               "return_logits=False")
        self._served = True


def num_decoder_layers(weights: dict[str, Tensor]) -> int:
    """The LLM's depth, from the captured weights' state-dict keys."""
    return len({k.split(".")[3] for k in weights if k.startswith("showo.model.layers.")})


def is_und_call(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a captured ``Showo2.understand`` call (its inputs include the cache's buffers)."""
    return any(n.op == "placeholder" and n.name.startswith("l_cache_") for n in gm.graph.nodes)


def _refuse_und_forward(*args):
    raise RuntimeError("flashu_backend(task='und') runs understanding (answer_question_compiled(compiled, backend, "
                       "latents, question), or the model called with cache=...); a forward without a cache is a "
                       "generation call: use flashu_backend('gen')")


def graph_depths(gm: fx.GraphModule) -> tuple[int, int, int] | None:
    """(LLM layers, SigLIP layers, head blocks) from the placeholder names, or None if any stack is absent."""
    names = " ".join(n.name for n in gm.graph.nodes if n.op == "placeholder")
    depths = []
    for stack in (r"showo_modules_model_modules_layers", r"und_trans_modules_layers", r"diffusion_head_a"):
        found = [int(i) for i in re.findall(stack + r"_modules_(\d+)_", names)]
        if not found:
            return None
        depths.append(max(found) + 1)
    return depths[0], depths[1], depths[2]


def flashu_backend(task: str = "gen", config: FlashUConfig | None = None, layout: FFNLayout | None = None,
                   model_config: Showo2Config | None = None, piece_backend: str | None = None,
                   cuda_graphs: bool = True, merge_projections: bool = True,
                   eager_numerics: bool = True, tune_decode: bool = True,
                   inductor_options: dict | None = None, merge_ffn_slices: bool = False,
                   decode_attention: str = "sdpa", norm_in_products: bool = True,
                   prefill_eager_numerics: bool = True) -> FlashUBackend:
    """The FlashU backend for ``task`` ("gen" or "und").

    ``config=None``: exact optimizations only. ``layout``: the FFN layout
    of a pruned model (``ffn_layout``); ``model_config``: the Show-o2 config, when the captured graph's depths do not
    name a preset's. ``piece_backend``: how each part of the captured graph compiles, "inductor" (CUDA default) or
    "eager" (the rewritten FX graph as it is); ``cuda_graphs``: replay each call's variant as one CUDA graph;
    ``merge_projections``: q/k/v and gate/up as one matmul each (on first use the model's weights are moved into shared
    buffers, in place: values, shapes and strides unchanged, no memory added); ``eager_numerics``: fused kernels of the
    generation parts round intermediates to the model dtype as eager does (bf16 results stay close to eager's);
    ``tune_decode``: understanding's one-row parts (the decode step) compile with inductor's coordinate-descent tuning,
    which lowers each one-row product to a tuned Triton reduction instead of a cuBLAS GEMV (gpt-fast's decode setting;
    False: cuBLAS); ``inductor_options``: inductor config patches for every compiled part, e.g. ``{"max_autotune_gemm":
    True}`` (names are checked now; the CUDA-graph, rounding and tuning settings this backend owns are refused);
    ``merge_ffn_slices``: with ``merge_projections``, a pruned FFN's gate and up slices run as one batched matmul
    over both row blocks (``passes.merge_projections``) instead of two matmuls (off: a tie in both tasks on an
    H100, BENCHMARKS.md); ``decode_attention``: how understanding's decode step attends over the cache, "sdpa" (the
    library kernel) or "reductions" (``passes.decode_attention``: plain reductions that inductor fuses and tunes;
    slower on an H100, 5.29 against 5.10 ms per 7B token); ``norm_in_products``: the decode step's RMSNorm
    statistics are computed inside the products that read the normalised row (``passes.norm_in_products``), two
    kernels fewer a layer (4.73 against 5.08 ms per 7B token on an H100); ``prefill_eager_numerics``: the
    understanding prefill's parts that the kept-token choice reads (up to the pruning layer) round as eager does
    too (fused kernels round as eager, and their projections stay unmerged, each the GEMM eager runs), so the
    V-norms that choose the kept image tokens are the eager twin's (on an H100, 98.0% of testbed questions kept
    eager's tokens against 49% without, at no measured cost; the one-row decode parts never do)."""
    return FlashUBackend(task, config, layout, model_config, piece_backend, cuda_graphs, merge_projections,
                         eager_numerics, tune_decode, inductor_options, merge_ffn_slices, decode_attention,
                         norm_in_products, prefill_eager_numerics)


BACKEND_OPTIONS = tuple(inspect.signature(flashu_backend).parameters)  # the keyword arguments, in order


def backend_from_options(options: dict) -> FlashUBackend:
    """The backend behind ``torch.compile(model, backend="flashu", options=options)``.

    ``options`` holds ``flashu_backend``'s keyword arguments (``task``, ``config``, ``layout``, ...). The
    backend is created once and kept in the dict, so the caller and the compiler share it:

    >>> opts = {"task": "gen"}
    >>> backend_from_options(opts) is backend_from_options(opts)
    True
    """
    backend = options.get(_OPTIONS_KEY)
    if backend is None:
        ours = {k: v for k, v in options.items() if k not in _TORCH_COMPILE_OPTIONS}
        unknown = set(ours) - set(BACKEND_OPTIONS)
        if unknown:
            raise ValueError(f"unknown flashu options {sorted(unknown)}")
        backend = options[_OPTIONS_KEY] = flashu_backend(**ours)
    return backend


_TORCH_COMPILE_OPTIONS = ("guard_filter_fn",)  # torch.compile takes these out of ``options`` itself


def lean_guard_options() -> dict:
    """``torch.compile(model, backend=..., options=lean_guard_options())``: skip Dynamo's per-call guards on the
    model's modules and parameters (~900 checks at Show-o2 size: 286 -> 75 us of host time per call on a 2-core
    CPU), keeping the ones on module-container lengths. Safe with this backend: the weights are inputs of the
    captured graph, shape guards stay, new weight tensors are laid out again for the merged projections before
    the image or answer that first reads them (``FlashUBackend._keep_merged``) and are part of every CUDA graph's
    key, and the kept length guards make a model of another depth retrace (else its extra layers would be
    invisible to the graph). A fresh dict per call, because torch.compile pops the entry."""
    return {"guard_filter_fn": keep_depth_guards_only}


def keep_depth_guards_only(guard_entries: list) -> list[bool]:
    """Dynamo guard filter: drop the guards on nn-module attributes and parameters except the lengths of module
    containers (layer stacks) and their key sets, which decide which layers the traced graph reads."""
    def keep(entry) -> bool:
        source = getattr(getattr(entry, "orig_guard", None), "source", None)
        if source is None or not source.is_unspecialized_nn_module():
            return True
        # A torch without the guard's type name keeps it: slower, never unsafe.
        return getattr(entry, "guard_type", "SEQUENCE_LENGTH") in ("SEQUENCE_LENGTH", "DICT_KEYS_MATCH")

    return [keep(entry) for entry in guard_entries]


_OPTIONS_KEY = "_flashu_backend"


def flashu_compiler(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """The compiler behind the backend name "flashu" (the package's ``torch_dynamo_backends`` entry point)."""
    if options is None:
        raise ValueError('torch.compile(model, backend="flashu") needs options={"task": "gen", ...}; '
                         "drive the steps through backend_from_options(options)")
    return backend_from_options(options)(gm, example_inputs)


def register_flashu_backend() -> None:
    """Make ``torch.compile(model, backend="flashu", options={...})`` available where the package is not installed
    (an installed package declares it as an entry point, which torch finds by itself); idempotent."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "flashu" not in _COMPILER_FNS:
        register_backend(flashu_compiler, name="flashu")
