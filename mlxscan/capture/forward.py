"""The hooked forward pass: mlx-lm's modules, composed per family, with a tap at every site.

The block arithmetic is written once, steered by the family adapter (what is added to the
residual, which activation the MLP uses); attention, projections, norms and embeddings are mlx-lm's
own modules. Nothing is attached to the model, so nothing needs restoring after a run. Batches are right-padded: with a causal mask, real tokens never attend to padding, so every
real position equals a one-by-one run.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import MlxscanError
from .interventions import Intervention
from .recording import InterventionEffect, Recording
from .sites import HEAD_SITES, LAYER_SITES, MODEL_SITES, check_site, is_layer_site


class _Taps:
    """Applies the interventions registered at a (site, layer), then records the value if asked."""

    def __init__(self, interventions, record_sites, record_layers, valid, lengths, pool_weights=None):
        self.by_place: dict[tuple[str, int | None], list[Intervention]] = {}
        for intervention in interventions:
            for layer in intervention.layers:
                self.by_place.setdefault((intervention.site, layer), []).append(intervention)
        self.record_sites = set(record_sites)
        self.record_layers = set(record_layers)
        self.valid = valid  # [batch, seq, 1] 1.0 on real tokens
        self.lengths = lengths
        self.recorded: dict[str, list[mx.array]] = {site: [] for site in record_sites}
        self.pool_weights = pool_weights  # {site: [batch, seq, 1]}: those sites become weighted sums over seq
        self.effects: list[tuple[Intervention, str, int | None, mx.array, mx.array]] = []

    def wants_heads(self, layer: int) -> bool:
        """Whether this layer's attention must run explicitly (a head site recorded or intervened on)."""
        recorded = layer in self.record_layers and any(site in self.record_sites for site in HEAD_SITES)
        return recorded or any((site, layer) in self.by_place for site in HEAD_SITES)

    def __call__(self, site: str, layer: int | None, x: mx.array) -> mx.array:
        for intervention in self.by_place.get((site, layer), ()):
            where = self._positions(intervention.positions, _token_axis(site, x))
            changed = intervention.transform(x)
            if where is not None:
                changed = mx.where(_along_tokens(site, where, x), changed, x)
            weight = self.valid if where is None else self.valid * where
            weight = _along_tokens(site, weight, x)
            change = mx.sqrt(mx.sum(mx.square((changed - x).astype(mx.float32)) * weight))
            size = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)) * weight))
            self.effects.append((intervention, site, layer, change / mx.maximum(size, 1e-30), mx.sum(weight)))
            x = changed
        if site in self.record_sites and (layer is None or layer in self.record_layers):
            weights = self.pool_weights.get(site)
            self.recorded[site].append(x if weights is None else mx.sum(x * weights, axis=1))
        return x

    def _positions(self, positions, seq_len: int) -> mx.array | None:
        if positions is None:
            return None
        columns = np.arange(seq_len)[None, :]
        lengths = self.lengths[:, None]
        mask = np.zeros((len(self.lengths), seq_len), bool)
        for position in positions:
            target = position if position >= 0 else lengths + position
            mask |= columns == target
        return mx.array(mask[..., None])


def _token_axis(site: str, x: mx.array) -> int:
    """Length of the token axis: the query axis of attn_pattern, axis 1 everywhere else."""
    return x.shape[2] if site == "attn_pattern" else x.shape[1]


def _along_tokens(site: str, mask: mx.array, x: mx.array) -> mx.array:
    """A [batch, seq, 1] token mask shaped to broadcast against the site's value."""
    batch, seq = mask.shape[:2]
    if site == "attn_pattern":  # [batch, heads, query, key]: positions are queries
        return mask.reshape(batch, 1, seq, 1)
    return mask.reshape(batch, seq, *([1] * (x.ndim - 2)))


def _check_positions(interventions, lengths: np.ndarray) -> None:
    """A position must exist in every sequence of the batch: one that misses is an error, not a no-op."""
    for intervention in interventions:
        for position in intervention.positions or ():
            shortest = int(lengths.min())
            if not -shortest <= int(position) < shortest:
                raise MlxscanError(
                    f"{intervention.describe()}: position {position} is outside a sequence of {shortest} tokens; "
                    f"positions must lie in -{shortest}..{shortest - 1} for this batch"
                )


def _block(model, block, x, mask, tap, i, cache=None):
    """One transformer block; returns the residual stream leaving it.

    mlx-lm's own modules (norms, attention, the MLP's three projections), composed the way the
    family adds them to the residual; the MLP is spelled out so its neurons pass through a tap.
    """
    family = model.family
    x = tap("resid_pre", i, x)
    attn = _attention(block.self_attn, block.input_layernorm(x), mask, tap, i, cache)
    if family.sandwich_norms:
        attn = block.post_attention_layernorm(attn)
    attn = tap("attn_out", i, attn)
    h = tap("resid_mid", i, x + attn)
    mlp_in = (block.pre_feedforward_layernorm if family.sandwich_norms else block.post_attention_layernorm)(h)
    mlp = block.mlp
    neurons = tap("mlp_act", i, model.gated_activation(mlp.gate_proj(mlp_in), mlp.up_proj(mlp_in)))
    out = mlp.down_proj(neurons)
    if family.sandwich_norms:
        out = block.post_feedforward_layernorm(out)
    out = tap("mlp_out", i, out)
    return tap("resid_post", i, h + out)


def _attention(attn, x, mask, tap, i, cache=None):
    """mlx-lm's fused attention, or, where a head site is wanted, the same attention spelled out."""
    if not tap.wants_heads(i):
        if GROUPED_CPU_ATTENTION and mx.default_device() == mx.cpu and _plain_attention(attn):
            return _grouped_attention(attn, x, mask, cache)
        return attn(x, mask, cache)
    pattern, values = attention_pattern(attn, x, mask)
    pattern = tap("attn_pattern", i, pattern)  # [batch, heads, query, key]
    heads = tap("attn_head", i, (pattern @ values).transpose(0, 2, 1, 3))  # [batch, seq, heads, head_dim]
    return attn.o_proj(heads.reshape(*x.shape[:2], -1))


GROUPED_CPU_ATTENTION = True


def _plain_attention(attn) -> bool:
    """Attention that is projections, RoPE, softmax(q k^T * scale) v and an output projection, nothing else."""
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads",
                                                  "n_kv_heads", "scale")) and \
        not hasattr(attn, "q_norm") and not getattr(attn, "attn_logit_softcapping", None)


def _grouped_attention(attn, x: mx.array, mask, cache=None) -> mx.array:
    """mlx-lm's attention with the query heads of one key/value head stacked into one matrix product.

    On the CPU, mx.fast.scaled_dot_product_attention runs one small product per (row, head); stacking
    the heads that share keys (grouped-query attention) gives fewer, larger ones: 0.78 against 1.37 ms
    a layer for 32 x 9 tokens of SmolLM2. Same arithmetic (softmax in float32), same results to rounding.
    """
    batch, seq, _ = x.shape
    groups, per_group = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads
    queries = attn.q_proj(x).reshape(batch, seq, attn.n_heads, -1).transpose(0, 2, 1, 3)
    keys = attn.k_proj(x).reshape(batch, seq, groups, -1).transpose(0, 2, 1, 3)
    values = attn.v_proj(x).reshape(batch, seq, groups, -1).transpose(0, 2, 1, 3)
    offset = cache.offset if cache is not None else 0
    queries, keys = attn.rope(queries, offset=offset), attn.rope(keys, offset=offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    head_dim, n_keys = queries.shape[-1], keys.shape[2]
    stacked = (queries * attn.scale).reshape(batch, groups, per_group * seq, head_dim)  # head h: group h // per_group
    scores = (stacked @ keys.swapaxes(-1, -2)).reshape(batch, groups, per_group, seq, n_keys)
    if isinstance(mask, str):  # "causal"
        mask = mx.tril(mx.ones((seq, n_keys), dtype=mx.bool_), k=n_keys - seq)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(batch, groups, per_group * seq, n_keys)
    out = (weights @ values).reshape(batch, attn.n_heads, seq, head_dim)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, seq, -1))


def attention_pattern(attn, x: mx.array, mask) -> tuple[mx.array, mx.array]:
    """(pattern [batch, heads, query, key], values [batch, heads, key, head_dim]) from mlx-lm's attention.

    What the fused kernel computes, from the module's own projections, RoPE and scale; grouped-query
    heads share key/value head h // (heads / kv_heads), as in mlx.fast.scaled_dot_product_attention.
    Gemma 2's attention-logit soft-cap is applied before the mask, as mlx-lm and transformers do.
    """
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing or hasattr(attn, "q_norm"):
        raise MlxscanError(f"attention sites are not supported for {type(attn).__module__}.{type(attn).__name__} "
                           f"(missing {', '.join(missing) or 'nothing'}; q/k norms unsupported); record other sites")
    batch, seq, _ = x.shape
    queries = attn.q_proj(x).reshape(batch, seq, attn.n_heads, -1).transpose(0, 2, 1, 3)
    keys = attn.k_proj(x).reshape(batch, seq, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = attn.v_proj(x).reshape(batch, seq, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    queries, keys = attn.rope(queries), attn.rope(keys)
    repeats = attn.n_heads // attn.n_kv_heads
    if repeats > 1:
        keys, values = mx.repeat(keys, repeats, axis=1), mx.repeat(values, repeats, axis=1)
    scores = (queries * attn.scale) @ keys.swapaxes(-1, -2)  # [batch, heads, query, key]
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:
        scores = mx.tanh(scores / cap) * cap
    if isinstance(mask, str):  # "causal"
        mask = mx.tril(mx.ones((seq, seq), dtype=mx.bool_))
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    return mx.softmax(scores, axis=-1, precise=True), values


def _masks(model, seq_len: int, dtype):
    """Attention mask per layer: causal, or causal within the sliding window on local layers."""
    from ..models.mlx_lm_classes import model_module

    base = model_module("base")
    if model.family.attention_needs_array_mask or model.sliding_window:
        full = base.create_causal_mask(seq_len)
    else:
        full = "causal" if seq_len > 1 else None
    local = base.create_causal_mask(seq_len, window_size=model.sliding_window) if model.sliding_window else None
    return [local if i in model.sliding_layers else full for i in range(model.n_layers)]


def run_tokens(
    model,
    token_lists: Sequence[Sequence[int]],
    *,
    sites: Sequence[str] = (),
    layers: Sequence[int] | None = None,
    interventions: Sequence[Intervention] = (),
    pool_weights: np.ndarray | dict[str, np.ndarray] | None = None,
    resume: tuple[int, np.ndarray] | None = None,
    prefix_reuse: PrefixReuse | None = None,
) -> Recording:
    """Run a batch of token-id lists through the model, recording `sites` at `layers`.

    pool_weights [batch, seq] (zero on padding) pools every recorded site over tokens inside MLX,
    so a scan never holds token-level arrays: pooled sites come back as [batch, layers, width].
    A dict {site: weights} pools each site its own way (sites missing from it stay token-level).
    resume (layer, resid_pre [batch, seq, d_model]) starts the pass at that layer from a residual an
    earlier run recorded, skipping what comes before (patching reruns many variants of one prompt).
    prefix_reuse (a PrefixReuse, as scans pass) turns on shared prefixes: tokens every row begins with
    run once (see shared_prefix_length), and that pass is kept for the next call whose batch begins the
    same way. Off by default: runs compared with each other (an intervention against its baseline) then
    take the same arithmetic path, so an intervention that changes nothing changes nothing to the bit.
    """
    sites = tuple(dict.fromkeys(check_site(site) for site in sites))
    # Sorted and unique: values are recorded in forward order, and `Recording.layers` must say which.
    record_layers = tuple(range(model.n_layers)) if layers is None else tuple(sorted({int(l) for l in layers}))
    for layer in record_layers:
        if not 0 <= layer < model.n_layers:
            raise MlxscanError(f"layer {layer} does not exist (the model has layers 0..{model.n_layers - 1})")
    if not record_layers and any(is_layer_site(site) for site in sites):
        raise MlxscanError("layers=[] records nothing; give at least one layer, or None for all")
    pooled_heads = [site for site in HEAD_SITES if site in sites and pool_weights is not None
                    and (not isinstance(pool_weights, dict) or pool_weights.get(site) is not None)]
    if pooled_heads:
        raise MlxscanError(f"{', '.join(pooled_heads)} cannot be pooled over tokens; record it token by token")
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise MlxscanError(f"{intervention!r} is not an intervention "
                               "(use mlxscan.Add, Ablate, AblateHeads, Project, Scale or Map)")
        intervention.check(model)

    lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int64)
    _check_positions(interventions, lengths)
    batch, seq_len = len(token_lists), int(lengths.max())
    padded = np.zeros((batch, seq_len), dtype=np.int32)  # id 0 on padding: never attended to
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = tokens
    valid_np = np.arange(seq_len)[None, :] < lengths[:, None]
    valid = mx.array(valid_np[..., None].astype(np.float32))

    needed = [l for l in record_layers if any(is_layer_site(s) for s in sites)]
    needed += [l for i in interventions for l in i.layers if l is not None]
    wants_head = "final_norm" in sites or "logits" in sites or any(i.site == "final_norm" for i in interventions)
    last_layer = model.n_layers - 1 if wants_head else max(needed, default=-1)

    pooling = _pooling(pool_weights, sites, seq_len)
    first_layer = _check_resume(resume, sites, record_layers, interventions, (batch, seq_len, model.d_model))
    share = prefix_reuse is not None and _may_share_prefix(model, sites, interventions, resume)
    prefix = shared_prefix_length(token_lists) if share else 0
    taps = _Taps(interventions, sites, record_layers, valid, lengths, pooling)
    if prefix:
        recorded = _run_after_shared_prefix(model, padded, prefix, sites, record_layers, pooling, last_layer,
                                            wants_head, prefix_reuse)
    else:
        if resume is None:
            h = taps("embed", None, _embed(model, padded))
        else:
            h = mx.array(np.asarray(resume[1], np.float32)).astype(getattr(mx, model.dtype))
        _layers_and_head(model, h, _masks(model, seq_len, h.dtype), taps, first_layer, last_layer, wants_head)
        recorded = taps.recorded
    mx.eval(recorded, [effect[3:] for effect in taps.effects])

    arrays = {site: _to_numpy(site, recorded[site], site in pooling, valid_np) for site in sites}
    effects = [
        InterventionEffect(i.describe(), site, layer, float(change.item()), int(touched.item()))
        for i, site, layer, change, touched in taps.effects
    ]
    expected = sum(len(i.layers) for i in interventions)
    if len(effects) != expected:  # every intervention must have met its site at every layer it names
        raise MlxscanError(f"internal error: {expected} intervention placements but {len(effects)} were applied")
    return Recording(arrays=arrays, tokens=[list(t) for t in token_lists], lengths=lengths,
                     layers=record_layers if any(is_layer_site(s) for s in sites) else (), effects=effects)


def _embed(model, token_ids: np.ndarray) -> mx.array:
    h = model.module.model.embed_tokens(mx.array(token_ids))
    if model.family.scales_embeddings:
        h = h * mx.array(model.d_model**0.5, dtype=h.dtype)
    return h


def _layers_and_head(model, h, masks, taps, first_layer: int, last_layer: int, wants_head: bool,
                     caches=None) -> None:
    """The blocks first_layer..last_layer, then the final norm and LM head where something asks for them."""
    inner = model.module.model
    for i in range(first_layer, last_layer + 1):
        h = _block(model, inner.layers[i], h, masks[i], taps, i, None if caches is None else caches[i])
    if wants_head:
        h = taps("final_norm", None, inner.norm(h))
        if "logits" in taps.record_sites:
            taps("logits", None, model.lm_head(h))


# ---------------------------------------------------------------------------------------------
# Shared prefixes: stimuli in one frame ("She wrote the word ___ ...") begin with the same tokens, and with
# causal attention those tokens' activations do not depend on what follows. The prefix runs once; every row
# then runs only its own tokens, attending to the prefix's keys and values.

# A one-row pass costs what ~30 tokens of a batch do (it reads every weight once: measured 45-70 ms against
# ~2 ms a token in a batch of 32, bundled model): fewer tokens saved than this and it does not pay.
MIN_TOKENS_SAVED = 32


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two lists begin with alike."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens every list begins with, leaving each list at least one of its own; 0 when too few to pay."""
    length = min(min(len(tokens) - 1, common_prefix_length(token_lists[0], tokens)) for tokens in token_lists)
    return length if length * (len(token_lists) - 1) >= MIN_TOKENS_SAVED else 0


def _may_share_prefix(model, sites, interventions, resume) -> bool:
    """Interventions, resumed runs, head sites and sliding windows keep the plain path (rows may differ there)."""
    return not interventions and resume is None and not model.sliding_window and \
        not any(site in HEAD_SITES for site in sites)


class _PrefixCache:
    """One layer's keys and values of the shared prefix (batch 1), placed before every row's own."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:  # the prefix's own pass: keep them
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        rows = keys.shape[0]
        keys = mx.concatenate([mx.broadcast_to(self.keys, (rows, *self.keys.shape[1:])), keys], axis=2)
        values = mx.concatenate([mx.broadcast_to(self.values, (rows, *self.values.shape[1:])), values], axis=2)
        return keys, values


class PrefixReuse:
    """Shared prefixes on, for one sequence of run_tokens calls (a scan): the last prefix pass is kept for
    the next batch that begins the same way.

    A scan's batches come in token order, so the batches of one frame follow each other: with one of these
    passed to every run_tokens call, each frame's prefix runs once per scan instead of once per batch.
    """

    def __init__(self):
        self.model = self.key = self.state = None

    def get(self, model, key):
        return self.state if self.model is model and self.key == key else None

    def put(self, model, key, state) -> None:
        self.model, self.key, self.state = model, key, state


def _prefix_pass(model, prefix_ids: np.ndarray, sites, record_layers, last_layer: int, wants_head: bool):
    """(per-layer caches holding the prefix's keys and values, its token-level values of every site)."""
    caches = [_PrefixCache() for _ in range(model.n_layers)]
    taps = _Taps((), sites, record_layers, None, None, {})
    h = taps("embed", None, _embed(model, prefix_ids))
    _layers_and_head(model, h, _masks(model, prefix_ids.shape[1], h.dtype), taps, 0, last_layer,
                     wants_head, caches)
    mx.eval(taps.recorded, [(cache.keys, cache.values) for cache in caches if cache.keys is not None])
    return caches, taps.recorded


def _run_after_shared_prefix(model, padded: np.ndarray, prefix: int, sites, record_layers, pooling,
                             last_layer: int, wants_head: bool, reuse: PrefixReuse) -> dict[str, list[mx.array]]:
    """Each site's recorded values, as the plain path records them, from the prefix's pass and the rows' pass."""
    from ..models.mlx_lm_classes import model_module

    rows, seq_len = padded.shape
    key = (tuple(padded[0, :prefix].tolist()), tuple(sites), tuple(record_layers), last_layer)
    state = reuse.get(model, key)
    if state is None:
        state = _prefix_pass(model, padded[:1, :prefix], sites, record_layers, last_layer, wants_head)
        reuse.put(model, key, state)
    caches, head = state

    own = seq_len - prefix
    tail = _Taps((), sites, record_layers, None, None, {site: w[:, prefix:] for site, w in pooling.items()})
    h = tail("embed", None, _embed(model, padded[:, prefix:]))
    mask = model_module("base").create_causal_mask(own, offset=prefix)  # [own, prefix + own]: all of the prefix
    _layers_and_head(model, h, [mask] * model.n_layers, tail, 0, last_layer, wants_head, caches)

    recorded = {}
    for site in sites:
        weights = pooling.get(site)
        if weights is None:  # token-level: the prefix's values in front of every row's own
            recorded[site] = [mx.concatenate([mx.broadcast_to(a, (rows, *a.shape[1:])), b], axis=1)
                              for a, b in zip(head[site], tail.recorded[site])]
        else:  # pooled: the prefix's share of each row's weighted sum, added to the rest
            share = weights[:, :prefix, 0]  # [rows, prefix]
            recorded[site] = [b + (share @ a[0]) for a, b in zip(head[site], tail.recorded[site])]
    return recorded


def _pooling(pool_weights, sites, seq_len: int) -> dict[str, mx.array]:
    """One form inside: {site: [batch, seq, 1]}; each distinct weights array is copied to MLX once."""
    if pool_weights is not None and not isinstance(pool_weights, dict):
        pool_weights = {site: pool_weights for site in sites}
    converted: dict[int, mx.array] = {}
    pooling = {}
    for site, weights in (pool_weights or {}).items():
        if weights is not None:
            if id(weights) not in converted:
                converted[id(weights)] = mx.array(np.asarray(weights, np.float32)[:, :seq_len, None])
            pooling[site] = converted[id(weights)]
    return pooling


def _to_numpy(site: str, values: list[mx.array], pooled: bool, valid: np.ndarray) -> np.ndarray:
    """A site's recorded values as one float32 NumPy array, layers stacked on axis 1, padding zeroed."""
    stacked = mx.stack(values, axis=1) if is_layer_site(site) else values[0]
    array = np.array(stacked.astype(mx.float32) if stacked.dtype != mx.float32 else stacked)
    if pooled:
        return array
    return np.where(_real_tokens(site, valid), array, 0.0).astype(np.float32)  # zero the padding


def _check_resume(resume, sites, record_layers, interventions, shape) -> int:
    """The first layer to run: 0, or resume's layer once nothing asked for lies before it."""
    if resume is None:
        return 0
    layer, resid = int(resume[0]), np.asarray(resume[1])
    if resid.shape != shape:
        raise MlxscanError(f"resume residual has shape {resid.shape}; this batch needs {shape}")
    early_sites = "embed" in sites or (any(is_layer_site(s) for s in sites) and min(record_layers) < layer)
    early_changes = any(l is None or l < layer for i in interventions for l in i.layers if i.site != "final_norm")
    if early_sites or early_changes:
        raise MlxscanError(f"a run resumed at layer {layer} cannot record or change anything before it")
    return layer


def _real_tokens(site: str, valid: np.ndarray) -> np.ndarray:
    """valid [batch, seq] shaped against the recorded array: False wherever padding is involved."""
    if site == "attn_pattern":  # [batch, layers, heads, query, key]
        return valid[:, None, None, :, None] & valid[:, None, None, None, :]
    if site == "attn_head":  # [batch, layers, seq, heads, head_dim]
        return valid[:, None, :, None, None]
    return valid[:, None, :, None] if site in LAYER_SITES else valid[:, :, None]


MODEL_LEVEL_SITES = tuple(MODEL_SITES)
