"""A/B timings of the eager understanding loops (the und rows ``eager-kv`` / ``eager-nokv``) and of their
attention calls, to find per-token overhead that is ours and not upstream's.

    python -m harness.profile_und check                       # CPU fp32: every variant's logits == "old"
    python -m harness.profile_und micro --preset showo2-1.5b  # per-call SDPA cost by mask kind / backend
    python -m harness.profile_und loops --preset showo2-1.5b  # whole decode loops, one line per variant
    python -m harness.profile_und lmhead --preset showo2-7b   # lm_head over all positions: plain vs split
    python -m harness.profile_und profile --preset showo2-7b --nokv old,pre-add --kv old,pre-slice

Every loop starts from the prompt embeddings (image features included, computed once outside, as upstream's
``mmu_generate`` receives them) and produces ``--new`` tokens greedily, the eos stop off. Variants:

  no KV cache (the whole LLM over the whole sequence, lm_head over every position, every token):
    old          the code as it was: RoPE tables and the bool omni mask rebuilt per token, SDPA enable_gqa
    pre-bool     RoPE and bool mask built once for the longest sequence, sliced per token; next id kept on device
    pre-add      the same with the mask additive in the model dtype (0 / -inf), built once
    pre-add-rep  pre-add, K/V heads repeated before SDPA (upstream's repeat_kv + SDPA pattern)
    step-add-rep upstream-like: an additive mask made per token (contiguous), K/V heads repeated
    new          flashu_fx.mmu.decode_uncached as it is now (pre-add + the aligned all-position lm_head on CUDA)
  KV cache (prefill once, one token per call):
    old          per token: host-made position and id tensors, gathered RoPE rows, a bool mask row, enable_gqa
    pre-bool     positions / RoPE rows as views of tables made once, id kept on device, bool mask row view
    pre-add      the same with an additive mask row view (model dtype)
    pre-add-rep  pre-add with K/V heads repeated
    pre-slice    the attention reads only the written cache prefix (keys 0..pos) with no mask, enable_gqa
                 (not bit-identical on the CPU: another key tiling; measured for information)
    new          flashu_fx.mmu.decode_cached as it is now
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import flashu_fx.qwen2 as qwen2_module
from flashu_fx.config import get_config
from flashu_fx.layers import attention as attention_gqa
from flashu_fx.layout import build_mmu_prompt
from flashu_fx.masks import decode_mask, omni_mask, pad_mask_to
from flashu_fx.mmu import all_position_logits, decode_cached, decode_uncached, make_kv_caches, prompt_embeddings
from harness.arguments import command_parser

NOKV = ["old", "pre-bool", "pre-add", "pre-add-rep", "step-add-rep", "new"]
KV = ["old", "pre-bool", "pre-add", "pre-add-rep", "pre-slice", "new"]


# ---- attention variants (monkeypatched into flashu_fx.qwen2) ----------------------------------------------
def repeat_heads(x: Tensor, n: int) -> Tensor:
    """(B, Hkv, L, d) -> (B, Hkv * n, L, d), each KV head repeated n times in place (HF ``repeat_kv``)."""
    if n == 1:
        return x
    b, h, seq, d = x.shape
    return x[:, :, None].expand(b, h, n, seq, d).reshape(b, h * n, seq, d)


def attention_rep(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    n = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_heads(k, n), repeat_heads(v, n), attn_mask=mask)
    b, h, lq, d = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * d)


class _State:
    kv_len: int | None = None  # when set, attention reads only cache slots [0, kv_len) (pre-slice variants)


STATE = _State()


def _sliced(attn):
    def fn(q, k, v, mask):
        if STATE.kv_len is not None and q.shape[2] == 1:
            k, v = k[:, :, : STATE.kv_len], v[:, :, : STATE.kv_len]
        return attn(q, k, v, mask)

    return fn


@contextlib.contextmanager
def attention_impl(rep: bool, sliced: bool = False):
    fn = attention_rep if rep else attention_gqa
    saved = qwen2_module.attention
    qwen2_module.attention = _sliced(fn) if sliced else fn
    try:
        yield
    finally:
        qwen2_module.attention = saved
        STATE.kv_len = None


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool (True = attend) -> 0 / -inf in ``dtype``."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


# ---- loops ---------------------------------------------------------------------------------------------
def production(model, x: Tensor, prompt, new: int, kv: bool) -> tuple[list[int], list[Tensor]]:
    """The loops of flashu_fx.mmu as they are now, greedy, recording every logit vector."""
    seen: list[Tensor] = []

    def step(logits: Tensor) -> int:
        seen.append(logits)
        return int(logits.argmax())

    with torch.no_grad():
        ids = (decode_cached if kv else decode_uncached)(model, x, prompt, new, step, False, False)
    return ids, seen


@torch.no_grad()
def nokv_loop(model, x: Tensor, prompt, new: int, variant: str) -> tuple[list[int], list[Tensor]]:
    if variant == "new":
        return production(model, x, prompt, new, kv=False)
    cfg, dev = model.config, x.device
    block = torch.tensor([prompt.block_offset], device=dev)
    n_last = x.shape[1] + new - 1
    ids, seen = [], []
    rep = variant.endswith("-rep")
    if variant.startswith("pre"):
        cos_all, sin_all, _, _ = model.rope(n_last, x.dtype, dev)
        mask_all = omni_mask(block, n_last, cfg.image_slot_len)
        if "add" in variant:
            mask_all = additive(mask_all, x.dtype)
    with attention_impl(rep):
        for step in range(new):
            n = x.shape[1]
            if variant.startswith("pre"):
                cos, sin, mask = cos_all[:n], sin_all[:n], mask_all[..., :n, :n]
            else:
                cos, sin, _, _ = model.rope(n, x.dtype, dev)
                mask = omni_mask(block, n, cfg.image_slot_len)
                if "add" in variant:
                    mask = additive(mask, x.dtype)
            hidden = model.showo(x, cos, sin, mask)
            logits = model.showo.lm_head(hidden)[0, -1]
            seen.append(logits)
            if variant == "old":
                ids.append(int(logits.argmax()))
                nxt = torch.tensor([[ids[-1]]], device=dev)
            else:
                nxt = logits.argmax().view(1, 1)
                ids.append(int(nxt))
            if step + 1 < new:
                x = torch.cat([x, model.showo.model.embed_tokens(nxt)], dim=1)
    return ids, seen


@torch.no_grad()
def kv_loop(model, x: Tensor, prompt, new: int, variant: str) -> tuple[list[int], list[Tensor]]:
    if variant == "new":
        return production(model, x, prompt, new, kv=True)
    cfg, dev, n0 = model.config, x.device, x.shape[1]
    max_len = n0 + new
    caches = make_kv_caches(model, 1, max_len, x.dtype, dev)
    cos_all, sin_all, _, _ = model.rope(max_len, x.dtype, dev)
    rep, sliced = variant.endswith("-rep"), "slice" in variant
    if variant == "old":
        mask = pad_mask_to(prompt.mask(cfg).to(dev), max_len)
    else:
        mask = pad_mask_to(omni_mask(torch.tensor([prompt.block_offset], device=dev), n0, cfg.image_slot_len), max_len)
        positions = torch.arange(max_len, device=dev)
        rows = (positions[None, :] <= positions[:, None])[:, None, None]  # (max_len, 1, 1, max_len) bool
        if "add" in variant:
            mask, rows = additive(mask, x.dtype), additive(rows, x.dtype)
    ids, seen = [], []
    with attention_impl(rep, sliced):
        hidden = model.showo(x, cos_all[:n0], sin_all[:n0], mask, caches, torch.arange(n0, device=dev))
        logits = model.showo.lm_head(hidden[0, -1])
        seen.append(logits)
        nxt = logits.argmax().view(1, 1)
        ids.append(int(nxt))
        for i in range(1, new):
            p = n0 + i - 1
            if variant == "old":
                pos = torch.tensor([p], device=dev)
                emb = model.showo.model.embed_tokens(torch.tensor([[ids[-1]]], device=dev))
                cos, sin, m = cos_all[pos], sin_all[pos], decode_mask(pos, max_len)
            else:
                pos = positions[p : p + 1]
                emb = model.showo.model.embed_tokens(nxt)
                cos, sin = cos_all[p : p + 1], sin_all[p : p + 1]
                m = None if sliced else rows[p : p + 1].view(1, 1, 1, max_len)
                if sliced:
                    STATE.kv_len = p + 1
            hidden = model.showo(emb, cos, sin, m, caches, pos)
            logits = model.showo.lm_head(hidden[0, -1])
            seen.append(logits)
            nxt = logits.argmax().view(1, 1)
            ids.append(int(nxt))
    return ids, seen


# ---- modes ---------------------------------------------------------------------------------------------
def setup(preset: str, device: torch.device, dtype: torch.dtype, prompt_len: int | None):
    from harness.bench import ChunkTokenizer, build_random_model, und_question_ids

    cfg = get_config(preset)
    if device.type == "cpu" and dtype == torch.float32:
        from flashu_fx import Showo2, init_random_weights

        model = init_random_weights(Showo2(cfg)).eval()
    else:
        model = build_random_model(cfg, device, dtype)
    tok = ChunkTokenizer(cfg)
    question = und_question_ids(cfg, tok, prompt_len or cfg.image_slot_len + 50)
    prompt = build_mmu_prompt(cfg, tok, question)
    latents = torch.randn(1, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    return model, prompt, latents.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=1, repeats=3) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def cmd_check(args) -> int:
    """CPU fp32: each variant's logits must be bit-identical to the old code's."""
    torch.set_num_threads(1)
    ok = True
    for preset in args.presets:
        model, prompt, latents = setup(preset, torch.device("cpu"), torch.float32, None)
        with torch.no_grad():
            x = prompt_embeddings(model, latents, prompt)
        for name, loop, variants in (("nokv", nokv_loop, NOKV), ("kv", kv_loop, KV)):
            ref_ids, ref = loop(model, x, prompt, args.new, "old")
            for v in variants[1:]:
                ids, seen = loop(model, x, prompt, args.new, v)
                same = ids == ref_ids and all(torch.equal(a, b) for a, b in zip(seen, ref, strict=True))
                diff = max(float((a - b).abs().max()) for a, b in zip(seen, ref, strict=True))
                ok &= same
                print(f"{preset} {name} {v}: {'bit-identical' if same else 'DIFFERS'} (max |d| {diff:.3g})")
        _, kv = kv_loop(model, x, prompt, args.new, "old")
        _, full = nokv_loop(model, x, prompt, args.new, "old")
        worst = max(float((a - b).abs().max()) for a, b in zip(kv, full, strict=True))
        print(f"{preset} kv vs nokv (old): max |d| {worst:.3g}")
    return 0 if ok else 1


def cmd_loops(args) -> int:
    device = torch.device(args.device)
    for preset in args.presets:
        model, prompt, latents = setup(preset, device, torch.bfloat16, args.prompt_len)
        with torch.no_grad():
            feat, _ = timed(lambda m=model, lat=latents, pr=prompt: prompt_embeddings(m, lat, pr), device, 2, 5)
            x = prompt_embeddings(model, latents, prompt)
        print(
            f"{preset}: prompt {x.shape[1]} positions; prompt embeddings (image features) {1e3 * feat:.1f} ms",
            flush=True,
        )
        for name, loop, variants in (("nokv", nokv_loop, args.nokv), ("kv", kv_loop, args.kv)):
            ref = None
            for v in variants:
                med, times = timed(lambda v=v, f=loop, m=model, x=x, pr=prompt: f(m, x, pr, args.new, v), device)
                ids, _ = loop(model, x, prompt, args.new, v)
                ref = ref or ids
                print(
                    f"  {preset} {name:4s} {v:13s} {med:.3f} s  ({', '.join(f'{t:.3f}' for t in times)})  "
                    f"{1e3 * med / args.new:.2f} ms/token  ids==first {ids == ref}",
                    flush=True,
                )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def cmd_micro(args) -> int:
    """Per-call cost of one SDPA by mask kind, head layout and forced backend (200 back-to-back calls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = torch.device(args.device), torch.bfloat16
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}
    for preset in args.presets:
        cfg = get_config(preset)
        hq, hkv, d, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        for lq, lk, kind in ((800, 800, "prefill"), (1, 812, "decode-full"), (1, 800, "decode-slice")):
            q = torch.randn(1, hq, lq, d, device=device, dtype=dtype)
            k = torch.randn(1, hkv, lk, d, device=device, dtype=dtype)
            v = torch.randn_like(k)
            qpos, kpos = torch.arange(lk - lq, lk, device=device), torch.arange(lk, device=device)
            bmask = (kpos[None, :] <= qpos[:, None])[None, None]
            if kind == "decode-full":
                bmask = (kpos[None, :] <= 799)[None, None]
            masks = {"none": None} if kind == "decode-slice" else {"bool": bmask, "add": additive(bmask, dtype)}
            for mname, mask in masks.items():
                for layout in ("gqa", "rep"):
                    if layout == "gqa":
                        call = lambda mask=mask, q=q, k=k, v=v: F.scaled_dot_product_attention(
                            q, k, v, attn_mask=mask, enable_gqa=True
                        )
                        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None, enable_gqa=True)
                    else:
                        call = lambda mask=mask, q=q, k=k, v=v, g=g: F.scaled_dot_product_attention(
                            q, repeat_heads(k, g), repeat_heads(v, g), attn_mask=mask
                        )
                        choice = torch._fused_sdp_choice(q, repeat_heads(k, g), repeat_heads(v, g), mask, 0.0, False)
                    for backend in ("default", "cudnn", "efficient", "flash"):
                        ctx = (
                            contextlib.nullcontext()
                            if backend == "default"
                            else sdpa_kernel(
                                {
                                    "cudnn": SDPBackend.CUDNN_ATTENTION,
                                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                    "flash": SDPBackend.FLASH_ATTENTION,
                                }[backend]
                            )
                        )
                        try:
                            with ctx:
                                for _ in range(20):
                                    call()
                                sync(device)
                                t0 = time.perf_counter()
                                for _ in range(200):
                                    call()
                                t_cpu = time.perf_counter() - t0
                                sync(device)
                                t_all = time.perf_counter() - t0
                            res = f"{1e6 * t_cpu / 200:7.1f} us CPU/call, {1e6 * t_all / 200:7.1f} us wall/call"
                        except RuntimeError as err:
                            res = f"not available ({str(err).splitlines()[0][:60]})"
                        tag = f"(default picks {names.get(int(choice), choice)})" if backend == "default" else ""
                        print(f"{preset} {kind:12s} mask={mname:4s} {layout} {backend:9s} {res} {tag}", flush=True)
    return 0


def cmd_lmhead(args) -> int:
    """lm_head over all positions: the plain product against ``all_position_logits`` (split vocabulary)."""
    device, dtype = torch.device(args.device), torch.bfloat16
    for preset in args.presets:
        cfg = get_config(preset)
        n = args.prompt_len or cfg.image_slot_len + 50
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        torch.nn.init.normal_(head.weight, std=0.02)
        hidden = torch.randn(1, n, cfg.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            ref, new = head(hidden), all_position_logits(head, hidden)
            for name, fn in (
                ("plain", lambda h=head, x=hidden: h(x)),
                ("split", lambda h=head, x=hidden: all_position_logits(h, x)),
            ):
                med, _ = timed(lambda f=fn: [f() for _ in range(10)], device, 1, 3)
                print(f"{preset} lm_head {n}x{cfg.hidden_size}x{cfg.vocab_size} {name}: {100 * med:.2f} ms/call")
        print(
            f"{preset} split vs plain: max |d| {float((new.float() - ref.float()).abs().max()):.3g}, "
            f"max |ref| {float(ref.float().abs().max()):.3g}, equal {torch.equal(new, ref)}",
            flush=True,
        )
    return 0


def cmd_profile(args) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    for preset in args.presets:
        model, prompt, latents = setup(preset, device, torch.bfloat16, args.prompt_len)
        with torch.no_grad():
            x = prompt_embeddings(model, latents, prompt)
        for name, loop, variants in (("nokv", nokv_loop, args.nokv), ("kv", kv_loop, args.kv)):
            for v in variants:
                loop(model, x, prompt, args.new, v)
                sync(device)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t0 = time.perf_counter()
                    loop(model, x, prompt, args.new, v)
                    sync(device)
                    wall = time.perf_counter() - t0
                events = prof.key_averages()
                gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
                launches = sum(
                    e.count
                    for e in events
                    if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
                )
                print(
                    f"== {preset} {name} {v}: wall {wall:.3f} s (profiled), GPU busy {gpu:.3f} s "
                    f"({100 * gpu / wall:.0f}%), kernel launches {launches} ({launches / args.new:.0f}/token)"
                )
                print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m harness.profile_und", __doc__)
    p.add_argument("mode", choices=["check", "loops", "micro", "lmhead", "profile"], help="what to run (see above)")
    p.add_argument("--preset", dest="presets", action="append", default=None,
                   help="model shapes, repeatable (default: tiny for check, else showo2-1.5b)")
    p.add_argument("--new", type=int, default=32, help="new tokens per loop (check: 8 unless given)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt positions (default: slot + 50)")
    p.add_argument("--nokv", type=lambda s: [x for x in s.split(",") if x], default=NOKV,
                   help="no-cache variants, comma-separated")
    p.add_argument("--kv", type=lambda s: [x for x in s.split(",") if x], default=KV,
                   help="KV-cache variants, comma-separated")
    p.add_argument("--rows", type=int, default=25, help="profile table rows")
    p.add_argument("--device", default="cuda", help="where to run")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device (pass --device cpu for a CPU run)")
    if args.presets is None:
        args.presets = ["tiny"] if args.mode == "check" else ["showo2-1.5b"]
    if args.mode == "check" and args.new == 32:
        args.new = 8
    modes = {"check": cmd_check, "loops": cmd_loops, "micro": cmd_micro, "lmhead": cmd_lmhead, "profile": cmd_profile}
    return modes[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
