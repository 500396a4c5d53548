"""Attention-bias calibration (method.md §4, Eq. 8, "Ours-calibration").

At the question-prefill step, in every layer a rule names and before that layer's attention:

    a[h, j] = mean over the last r question rows of softmax_fp32(q · Kᵀ · scale)[h, j]
    E_h     = {cached context token j in the rule's region : a[h, j] > λ}
    m       = max_h |E_h|; every KV head also drops its lowest-attention tokens up to m
              (so the cache stays rectangular)

then E_h is removed from that layer's cache for good (decoding never sees it again) and the
layer's attention for this step runs on the reduced K/V (attention.py, Route 2).

Decisions (deviations from the official code are marked):
* Softmax domain: every key the row can see, i.e. the cached context *and* the question's own
  keys (causally), as in the official code, so λ means the same thing there and here.
* Candidates: cached chunk tokens, and the shared prefix (BOS, system prompt, instruction) when
  `calibrate_prefix` is on. Question tokens are never evicted (that would break the causal
  alignment of this very step; the official "recent" region mostly hit them).
* The prefix: the official code's chunks each start with BOS and the instruction, and its
  regions are indices from BOS, so its sink rule can evict the real attention sink. We store the
  prefix once, before the first kept chunk; `calibrate_prefix` makes it the head of that chunk
  (its sink region then starts at BOS). Off (the default outside the paper-calibration presets),
  the prefix is never a candidate, the fill included, and a sink rule only sees chunk starts.
* Regions: `per_chunk` (paper App. C, default): sink = the first N tokens of each kept chunk as
  stored in the merged cache (after compression, if any), recent = its last N, middle = the rest,
  all = the whole chunk. `global` (official code): the same over the merged chunk tokens as one
  sequence (the official code also counted the question in these ranges).
* GQA: a query head sees its KV head's tokens, and a token can only be removed for the whole KV
  head, so the G query heads' `a` are combined per KV head with `config.gqa_reduce` (mean by
  default, max: evict when any head of the group sees an outlier), as compression does.
* Several rules on one layer: a token is an outlier if any matching rule flags it.
* Equalisation fill: the lowest-`a` chunk tokens of that head (any region), ties to the earlier.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Iterator

import torch

from . import kv as kvops
from .attention import attention_function, last_rows_attention
from .config import CalibrationRule, ParallelCompConfig
from .errors import InputError


def rule_labels(rules: tuple[CalibrationRule, ...], num_layers: int) -> dict[str, list[int]]:
    """A readable, unique label per rule ("#2 sink layers 24-31") → the layers it covers.

    Raises ConfigError for layers the model lacks.
    """
    labels = {}
    for i, rule in enumerate(rules):
        layers = rule.layer_indices(num_layers)
        labels[f"#{i} {rule.region} " + (f"layers {layers[0]}-{layers[-1]}" if layers else "no layer")] = layers
    return labels


def layer_plan(rules: tuple[CalibrationRule, ...], num_layers: int) -> dict[int, list[tuple[str, CalibrationRule]]]:
    """Layer index → the (label, rule) pairs that apply there."""
    plan: dict[int, list[tuple[str, CalibrationRule]]] = {}
    for rule, (label, layers) in zip(rules, rule_labels(rules, num_layers).items()):
        for layer in layers:
            plan.setdefault(layer, []).append((label, rule))
    return plan


def chunk_spans(prefix_len: int, chunk_tokens: list[int], with_prefix: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each kept chunk in the merged cache, given their token counts in order.

    `with_prefix`: the prefix [0, prefix_len) is the head of the first chunk (a span of its own
    when no chunk is kept).
    """
    spans, start = [], prefix_len
    for n in chunk_tokens:
        spans.append((start, start + n))
        start += n
    if with_prefix and prefix_len:
        spans[:1] = [(0, spans[0][1] if spans else prefix_len)]
    return spans


def region_mask(region: str, spans: list[tuple[int, int]], width: int, length: int) -> torch.Tensor:
    """(length,) bool: the tokens of `region` in each span (the prefix and question never are)."""
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        if region == "sink":
            mask[start : min(start + width, end)] = True
        elif region == "recent":
            mask[max(end - width, start) : end] = True
        elif region == "middle":
            mask[start + width : max(end - width, start + width)] = True
        else:  # "all"
            mask[start:end] = True
    return mask


def choose_evictions(attn: torch.Tensor, outliers: torch.Tensor, evictable: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per head: evict the outliers, then the lowest-attention evictable tokens up to m = max count.

    attn (H_kv, S) fp32; outliers (H_kv, S) bool (⊆ evictable); evictable (S,) bool.
    Returns (kept indices (H_kv, S - m) ascending, m).
    """
    m = int(outliers.sum(dim=-1).max()) if outliers.numel() else 0
    if m == 0:
        return torch.arange(attn.shape[-1]).expand(attn.shape[0], -1), 0
    # drop priority: outliers first (+inf), then evictable tokens by increasing attention, never the rest
    priority = torch.where(evictable, -attn, torch.tensor(float("-inf")))
    priority = torch.where(outliers, torch.tensor(float("inf")), priority)
    drop = torch.sort(priority, dim=-1, descending=True, stable=True).indices[:, :m]
    keep = torch.ones_like(outliers)
    keep.scatter_(1, drop, False)
    kept = keep.nonzero()[:, 1].view(attn.shape[0], -1)  # row-major → ascending per head
    return kept, m


class Calibrator:
    """One generation's calibration: plan, the merged cache, and what was evicted.

        calib = Calibrator.for_run(config, num_layers, question_len)   # None without rules
        with calib.attach(model, cache, spans):                        # the whole generation
            generate_tokens(..., question_step=calib.question_step())
        calib.evicted  # layer → tokens removed per KV head
        calib.by_rule  # rule label → layer → outliers that rule flagged (0: it did not fire)

    The attention switch lasts the whole generation, not just the question step: calibrated
    layers end up shorter than the others, and transformers sizes one mask for all layers from
    layer 0, which the eager backend would add to mismatched keys; our dispatch uses a mask
    function that needs no mask for one-token steps.
    """

    def __init__(self, config: ParallelCompConfig, num_layers: int):
        self.plan = layer_plan(config.calibration_rules, num_layers)
        self.rows = config.calibration_query_rows
        self.width = config.calibration_region_tokens
        self.reference = config.calibration_reference
        self.gqa_reduce = config.gqa_reduce
        self.with_prefix = config.calibrate_prefix
        self.evicted: dict[int, int] = {}
        self.by_rule = {label: dict.fromkeys(layers, 0) for label, layers in
                        rule_labels(config.calibration_rules, num_layers).items()}
        self.removed_bytes = 0
        self._cache = None
        self._spans: list[tuple[int, int]] = []
        self._armed = False

    @classmethod
    def for_run(cls, config: ParallelCompConfig, num_layers: int, question_len: int) -> Calibrator | None:
        """Validate the rules against the model and the question; None when there are none."""
        if not config.calibration_rules:
            return None
        if config.calibration_query_rows > question_len:
            msg = (
                f"calibration_query_rows={config.calibration_query_rows} exceeds the question "
                f"({question_len} tokens with its template); lower it"
            )
            raise InputError(msg)
        return cls(config, num_layers)

    @contextmanager
    def attach(self, model, cache, spans: list[tuple[int, int]], kernel: bool = False,
               causal: str = "") -> Iterator[None]:
        """Route the model's attention through this calibrator while the block runs (`kernel`:
        one-token steps may run the C decode kernel, attention.packed_one_query; `causal`: the
        question step may attend on that kernel, attention.packed_decode)."""
        self._cache, self._spans = cache, spans
        try:
            with attention_function(model, self._handle, kernel, causal):
                yield
        finally:
            self._cache = None

    def question_step(self) -> AbstractContextManager:
        """Entered around the question prefill: the only forward that evicts."""
        return self._arm()

    @contextmanager
    def _arm(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _handle(self, module, query, key, value, mask):
        layer = module.layer_idx
        if not self._armed or layer not in self.plan or layer in self.evicted:
            return key, value, mask
        q = query.shape[2]
        context = key.shape[2] - q  # cached tokens before this step's question keys
        if key.shape[0] != 1 or (self._spans and self._spans[-1][1] > context):
            raise RuntimeError("calibration expects the batch-1 merged cache its chunk spans describe")
        attn = self._scores(module, query, key, context)  # (H_kv, S)
        spans = self._regions(context)
        evictable = region_mask("all", spans, self.width, context)
        outliers = torch.zeros_like(attn, dtype=torch.bool)
        for label, rule in self.plan[layer]:
            flagged = region_mask(rule.region, spans, self.width, context) & (attn > rule.threshold)
            self.by_rule[label][layer] = int(flagged.sum(dim=-1).max())  # per KV head, like m
            outliers |= flagged
        kept, m = choose_evictions(attn, outliers, evictable)
        self.evicted[layer] = m
        if m == 0:
            return key, value, mask
        question = torch.arange(context, context + q).expand(kept.shape[0], -1)
        index = torch.cat([kept, question], dim=-1)[None].to(key.device)  # (1, H_kv, S - m + q)
        [(new_key, new_value)] = kvops.gather_tokens([(key, value)], [index])
        kvops.set_layer(self._cache, layer, new_key, new_value)
        self.removed_bytes += kvops.n_bytes([(key, value)]) - kvops.n_bytes([(new_key, new_value)])
        # every question row sees every context column, so dropping any m of them = the first m
        return new_key, new_value, (mask[..., m:] if mask is not None else None)

    def _scores(self, module, query, key, context: int) -> torch.Tensor:
        """(H_kv, S): the last r rows' mean attention on each cached token, group-reduced."""
        q = query.shape[2]
        r = min(self.rows, q)
        t = torch.arange(key.shape[2], device=key.device)
        last = context + q - r + torch.arange(r, device=key.device)  # absolute index of each row
        visible = (t[None] <= last[:, None])[None]  # (1, r, T): context + causal question
        probs = last_rows_attention(query[:, :, -r:], key, module.scaling, visible)  # (1, H_kv, G, r, T)
        a = probs.mean(dim=-2)  # (1, H_kv, G, T)
        a = a.mean(dim=2) if self.gqa_reduce == "mean" else a.amax(dim=2)
        return a[0, :, :context].cpu()

    def _regions(self, context: int) -> list[tuple[int, int]]:
        if self.reference == "global" and self._spans:
            return [(self._spans[0][0], self._spans[-1][1])]
        return self._spans

    def enter(self, stack: ExitStack, model, cache, reports, prefix_len: int, kernel: bool = False,
              causal: str = "") -> AbstractContextManager:
        """Attach for the rest of `stack` (the whole generation); returns the question-step guard.

        `reports` are the run's ChunkReports: kept chunks sit after the prefix in document order,
        each with its `kv_tokens` (so spans account for compression).
        """
        kept = [r.kv_tokens for r in sorted(reports, key=lambda r: r.index) if r.kept]
        spans = chunk_spans(prefix_len, kept, self.with_prefix)
        stack.enter_context(self.attach(model, cache, spans, kernel, causal))
        return self.question_step()

    def report(self, stats) -> None:
        """Record evictions in RunStats; kv_bytes then counts the context KV left after them."""
        stats.calibration_evicted = dict(sorted(self.evicted.items()))
        stats.calibration_evicted_by_rule = self.by_rule
        stats.kv_bytes -= self.removed_bytes
