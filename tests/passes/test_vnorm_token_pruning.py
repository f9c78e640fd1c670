"""passes.vnorm_token_pruning against its eager twin (the pruning step of ``FlashUUndDecoder.prefill``): the
rewritten prefill keeps the same rows and gives the same logits; it gathers exactly the values that cross the
pruning layer; a graph it cannot rewrite stays exact, with a warning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.flashu_und import select_kept_positions
from flashu_fx.layout import build_mmu_prompt, mark_length_dynamic
from flashu_fx.tokenizer import get_tokenizer
from flashu_fx.und_cache import UndCache
from passes.vnorm_token_pruning import kept_image_positions, kept_rows, prune_tokens_after_layer


def prefill_inputs(model, question_len: int, seed: int, dynamic: bool = True):
    cfg = model.config
    prompt = build_mmu_prompt(cfg, get_tokenizer(cfg), [(3 * i + 1) % 200 for i in range(question_len)])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    tokens, mask = prompt.tokens.clone(), prompt.mask(cfg)
    if dynamic:
        mark_length_dynamic(tokens, mask)
    return prompt, (tokens, latents, None, torch.tensor([prompt.offset]), mask)


def compile_prefill(model, inputs, transform=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.fx.GraphModule]:
    """Run the prefill through torch.compile with ``transform`` applied to the captured graph (a pass returning
    how many values it gathered, whose rewritten graph returns the kept rows last) -> (logits, kept rows, graph)."""
    seen: dict = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["count"] = gm, transform(gm) if transform else 0

        def call(*args):
            out = gm(*args)
            if seen["count"]:
                seen["rows"], out = out[-1], out[:-1]
            return out

        return call

    torch._dynamo.reset()
    cache = UndCache.for_model(model, 128, torch.float32, "cpu")
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(*inputs, cache=cache).logits
    torch._dynamo.reset()
    return logits, seen.get("rows"), seen["gm"]


@settings(deadline=None, max_examples=8)
@given(length=st.integers(20, 60), start=st.integers(1, 10), num_image=st.integers(2, 9), seed=st.integers(0, 99))
def test_kept_rows_are_the_non_image_rows_and_the_smallest_norms(length, start, num_image, seed) -> None:
    keep = max(1, num_image // 2)
    v = torch.randn(1, length, 8, generator=torch.Generator().manual_seed(seed))
    rows = kept_rows(v, torch.tensor([start - 1]), num_image, keep)  # offsets: the time token, before the image
    norms = v[0, start : start + num_image].norm(dim=-1)
    kept = (start + torch.sort(torch.argsort(norms, stable=True)[:keep]).values).tolist()
    expected = [*range(start), *kept, *range(start + num_image, length)]
    assert rows.tolist() == expected
    assert kept_image_positions(rows, start - 1, keep) == tuple(kept)


def test_the_pass_gathers_what_crosses_the_layer_and_matches_eager(tiny_model) -> None:
    cfg, layer, keep = tiny_model.config, 1, 8
    prompt, inputs = prefill_inputs(tiny_model, 4, 0)
    counts = []

    def prune(gm) -> int:
        counts.append(prune_tokens_after_layer(gm, layer, cfg.num_image_tokens, keep))
        return counts[-1]

    logits, rows, _ = compile_prefill(tiny_model, inputs, prune)
    # hidden state (1, L, H), RoPE cos and sin (L, d), mask (1, 1, L, L): exactly four values cross layer 1
    assert counts == [4]
    # eager twin: the rows select_kept_positions keeps from layer 1's input
    with torch.no_grad():
        h = tiny_model.embed_inputs(inputs[0], inputs[3], tiny_model.image_embeds(inputs[1]),
                                    tiny_model.time_embeds(torch.ones(1)))
        cache = UndCache.for_model(tiny_model, 128, torch.float32, "cpu")
        rope = cache.cos[: h.shape[1]], cache.sin[: h.shape[1]]
        for i in range(layer):
            h = tiny_model.showo.model.layers[i](h, *rope, inputs[4], cache.layers[i])
        want = select_kept_positions(tiny_model.showo.model.layers[layer], h, prompt.offset + 1,
                                     cfg.num_image_tokens, keep)
    assert rows.tolist() == want.tolist()
    exact, _, _ = compile_prefill(tiny_model, prefill_inputs(tiny_model, 4, 0)[1])
    assert logits.shape == exact.shape and not torch.equal(logits, exact)  # pruning changes the answer's logits


def test_a_static_prompt_length_is_left_exact_with_a_warning(tiny_model) -> None:
    _, _, gm = compile_prefill(tiny_model, prefill_inputs(tiny_model, 4, 0, dynamic=False)[1])
    before = [n.format_node() for n in gm.graph.nodes]
    with pytest.warns(UserWarning, match="the prompt length is static"):
        assert prune_tokens_after_layer(gm, 1, tiny_model.config.num_image_tokens, 8) == 0
    assert [n.format_node() for n in gm.graph.nodes] == before


def test_a_missing_layer_is_left_exact_with_a_warning(tiny_model) -> None:
    _, _, gm = compile_prefill(tiny_model, prefill_inputs(tiny_model, 4, 0)[1])
    last = tiny_model.config.num_layers - 1
    with pytest.warns(UserWarning, match=f"no decoder layer after layer {last}"):
        assert prune_tokens_after_layer(gm, last, tiny_model.config.num_image_tokens, 8) == 0
    with pytest.warns(UserWarning, match="found 0 v_proj calls of layer 9"):
        assert prune_tokens_after_layer(gm, 9, tiny_model.config.num_image_tokens, 8) == 0
