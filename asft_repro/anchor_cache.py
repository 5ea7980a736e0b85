"""The cached base-model anchor: top-k base log-probs per response row, on disk, and the KL estimator on them.

Format (one folder, ``<data folder>/anchor/<model name>-<fingerprint>-k<k>/``):

* ``shard-NNNNN.safetensors``, each holding a run of records (in dataset order, duplicates dropped):
  ``keys`` int64 [R] (the record keys, :func:`asft_repro.data.record_key`), ``offsets`` int64 [R + 1] (record i
  owns rows ``offsets[i]:offsets[i+1]``), ``ids`` int32 [N, k] (the base's top-k token ids, by decreasing
  probability), ``logprobs`` float16 [N, k] (their log-probabilities), ``log_rest`` float32 [N] (log of the base's
  probability mass outside the top k, computed in log space; ``-inf`` when k covers the vocabulary). The rows of
  a record are exactly those :func:`asft_repro.losses.response_rows` selects, in order.
* ``manifest.json``: model (name, path, weights fingerprint), data (sha256, file), template, max length, k,
  vocabulary size, build dtype and backend, and per shard its file name, sha256, record and row counts;
  ``complete`` is true once every shard is written. Shards are written to a temp name and renamed, then the
  manifest is updated (atomically), so a killed build leaves complete shards only and a rerun resumes.

The estimator (:func:`complete_log_probs`): with S the cached top-k set, q its base probabilities and r the base's
remaining mass, the base distribution is completed by spreading r over the other tokens the way the policy p
spreads its own mass there, q~_v = r * p_v / (1 - P_S) for v outside S. Then

    KL(q~ || p) = sum_S q (log q - log p) + r log(r / (1 - P_S))

and its exact gradient w.r.t. the policy logits is p - q~, which is what :func:`asft_repro.losses.chunk_grad`'s
forward formula computes from log q~. The reverse direction, KL(p || q~), uses the same completed q~ treated as
fixed in the gradient (q~ depends on p through the tail; that dependence is ignored): an approximation. With
k >= V the cache holds the whole distribution and both directions are exact.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from asft_repro.diskspace import naming_disk_errors
from asft_repro.errors import ProjectError
from asft_repro.files import sha256_file
from asft_repro.losses import IGNORE_INDEX, chunk_grad, chunks, response_rows

FORMAT = "asft-anchor-topk"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
_ST_DTYPES = {"I64": np.int64, "I32": np.int32, "F16": np.float16, "F32": np.float32}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class AnchorCacheError(ProjectError, ValueError):
    """A cache that cannot be used; one line naming what is wrong and the fix."""


# ---- the estimator ---------------------------------------------------------------------------------

@dataclass
class AnchorRows:
    """The cached base distribution at N response rows: top-k ids [N, k], their log-probs [N, k], log rest [N]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_rest: torch.Tensor

    def to(self, device: torch.device | str) -> "AnchorRows":
        return AnchorRows(self.ids.to(device, torch.int64), self.logprobs.to(device), self.log_rest.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]


def complete_log_probs(logp: torch.Tensor, ids: torch.Tensor, logq_topk: torch.Tensor,
                       log_rest: torch.Tensor) -> torch.Tensor:
    """log q~ [c, V]: the cached top-k base log-probs on S, ``log r + log(p_v / (1 - P_S))`` elsewhere.

    ``logp`` are the policy's log-probs (or logits: only their softmax matters) in the compute dtype. The tail's
    ``log(p_v / (1 - P_S))`` is the log_softmax of the logits with S masked to -inf (stable when P_S -> 1). The
    top-k values and log r are renormalised together (fp16 storage leaves them summing to 1 +- 1e-3). When the
    cache covers the vocabulary (k >= V) the stored distribution is returned as is.
    """
    ids = ids.to(logp.device, torch.int64)
    topk = logq_topk.to(logp.device, logp.dtype)
    if ids.shape[1] >= logp.shape[1]:  # the whole distribution: exact
        return torch.empty_like(logp).scatter_(1, ids, topk)
    rest = log_rest.to(logp.device, logp.dtype)
    norm = torch.logsumexp(torch.cat([topk, rest[:, None]], dim=1), dim=1, keepdim=True)
    logq = torch.log_softmax(logp.scatter(1, ids, float("-inf")), dim=-1)
    logq.add_(rest[:, None] - norm)
    return logq.scatter_(1, ids, topk - norm)


@dataclass
class AnchorTerms:
    """One chunk's per-row pieces of the cached KL, all O(c * k): log p and log q on S [c, k], log r [c] (the base's
    mass outside S, renormalised with q) and log(1 - P_S) [c] (the policy's, from a masked logsumexp)."""

    ids: torch.Tensor
    logp_s: torch.Tensor
    logq_s: torch.Tensor
    log_rest: torch.Tensor
    log_tail: torch.Tensor


def masked_log_tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log(1 - P_S) [c]: the logsumexp of ``logp`` with S masked to -inf (in place; ``logp`` is restored exactly)."""
    logp_s = logp.gather(1, ids)
    logp.scatter_(1, ids, float("-inf"))
    log_tail = torch.logsumexp(logp, dim=-1)
    logp.scatter_(1, ids, logp_s)
    return log_tail


def anchor_terms(logp: torch.Tensor, ids: torch.Tensor, logq_topk: torch.Tensor, log_rest: torch.Tensor,
                 log_tail: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> AnchorTerms:
    """The :class:`AnchorTerms` of policy log-probs ``logp`` [c, V] (k < V).

    ``log(1 - P_S)`` (unless ``log_tail``, saved by the forward, is given) is the log of the sum of the policy's
    probabilities off S: a sum of positive terms, so no cancellation however close P_S is to 1. By default it is a
    masked logsumexp; given ``probs`` (= exp(logp), e.g. a buffer the caller reuses for the gradient) it is the sum
    of ``probs`` with S zeroed (one pass; S is restored). A row whose whole tail underflows float32 (policy mass off
    S below ~1e-38) then gets -inf, which the caller recomputes with :func:`masked_log_tail`.
    """
    ids = ids.to(logp.device, torch.int64)
    topk = logq_topk.to(logp.device, logp.dtype)
    rest = log_rest.to(logp.device, logp.dtype)
    norm = torch.logsumexp(torch.cat([topk, rest[:, None]], dim=1), dim=1, keepdim=True)
    logp_s = logp.gather(1, ids)
    if log_tail is None and probs is not None:
        probs_s = probs.gather(1, ids)
        log_tail = probs.scatter_(1, ids, 0.0).sum(-1).log()
        probs.scatter_(1, ids, probs_s)
    elif log_tail is None:
        log_tail = masked_log_tail(logp, ids)
    return AnchorTerms(ids, logp_s, topk - norm, rest - norm[:, 0], log_tail.to(logp.dtype))


def anchor_kl_into(stats: torch.Tensor, terms: AnchorTerms) -> torch.Tensor:
    """Fill columns 1, 2 (KL forward, reverse) of ``stats`` [c, 4] (:func:`asft_repro.losses.chunk_pass`'s layout) with
    the completed cached base q~, in O(c * k): KL(q~ || p) = sum_S q (log q - log p) + r log(r / (1 - P_S)) and
    KL(p || q~) = sum_S p (log p - log q) + (1 - P_S) log((1 - P_S) / r)."""
    diff = terms.logq_s - terms.logp_s
    stats[:, 1] = (terms.logq_s.exp() * diff).sum(-1) + _xlog(terms.log_rest.exp(), terms.log_rest - terms.log_tail)
    stats[:, 2] = -(terms.logp_s.exp() * diff).sum(-1) + _xlog(terms.log_tail.exp(), terms.log_tail - terms.log_rest)
    return stats


def _xlog(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """weight * log_ratio with 0 where the weight is 0 (0 log 0 = 0)."""
    return torch.where(weight > 0, weight * log_ratio, torch.zeros_like(weight))


def anchor_grad(logp: torch.Tensor, targets: torch.Tensor, terms: AnchorTerms, stats: torch.Tensor, kl_coef: float,
                reverse: bool, grad_rows: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> torch.Tensor:
    """d(row loss)/d(logits) [c, V] like :func:`asft_repro.losses.chunk_grad` with log q~ as the base, in one pass.

    Forward: p - q~ is p_v (1 - rho) off S (rho = r / (1 - P_S)) and p_S - q_S on S. Reverse (q~ held fixed):
    p (log p - log q~ - KL) is p_v (beta - KL) off S (beta = log((1 - P_S) / r)) and p_S (log p_S - log q_S - KL) on S.
    So the gradient is a per-row multiple of p off S, and is written directly on the k columns of S (no
    cancellation when rho is large: a policy with much less mass than the base outside S). Unscaled without
    ``grad_rows``; written into ``probs`` (= exp(logp), consumed) when given.
    """
    a = stats[:, 3]
    scale, on_s = a, None
    if kl_coef:
        p_s = terms.logp_s.exp()
        if reverse:
            beta = terms.log_tail - terms.log_rest
            scale = a + kl_coef * (beta - stats[:, 2])
            on_s = p_s * (a[:, None] + kl_coef * (terms.logp_s - terms.logq_s - stats[:, 2, None]))
        else:
            rho = (terms.log_rest - terms.log_tail).clamp(max=_log_limit(logp.dtype)).exp()  # r / (1 - P_S)
            scale = a + kl_coef * (1.0 - rho)
            on_s = a[:, None] * p_s + kl_coef * (p_s - terms.logq_s.exp())
    g = (probs if probs is not None else logp.exp()).mul_(scale[:, None])
    if on_s is not None:
        g.scatter_(1, terms.ids, on_s)
    g.scatter_add_(1, targets[:, None], -a[:, None])
    if grad_rows is not None:
        g.mul_(grad_rows[:, None].to(g.dtype))
    if kl_coef:
        # rows whose policy tail underflows (p_v = 0 in this dtype while q~_v = r p_v / (1 - P_S) is not): the dense
        # formula on the completed log q~ (rare; the same value wherever the O(k) form is representable)
        extreme = (terms.log_rest - terms.log_tail > _log_limit(logp.dtype)) | (terms.log_tail < _log_tiny(logp.dtype))
        if extreme.any():
            rows = extreme.nonzero()[:, 0]
            lp = logp[rows]
            lq = complete_log_probs(lp, terms.ids[rows], terms.logq_s[rows], terms.log_rest[rows])
            ones = torch.ones(rows.numel(), dtype=g.dtype, device=g.device)
            dft_weight = bool((a[rows] != 1).any())  # a = p(y) (DFT weight) or 1; chunk_grad recomputes the same a
            g[rows] = chunk_grad(lp, targets[rows], lq, dft_weight, kl_coef, reverse,
                                 grad_rows[rows] if grad_rows is not None else ones)
    return g


def _log_limit(dtype: torch.dtype) -> float:
    """Below exp's overflow, with room for the product with p."""
    return math.log(torch.finfo(dtype).max) - 10.0


def _log_tiny(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 10.0


def topk_rows(base_logits: torch.Tensor, k: int) -> AnchorRows:
    """The cache's rows from base logits [c, V] (float32 math): top-k ids / log-probs and the tail's log mass."""
    logq = torch.log_softmax(base_logits.float(), dim=-1)
    kk = min(k, logq.shape[1])
    values, ids = logq.topk(kk, dim=-1)
    if kk < logq.shape[1]:
        rest = logq.scatter(1, ids, float("-inf")).logsumexp(-1)
    else:
        rest = torch.full((logq.shape[0],), float("-inf"), dtype=logq.dtype, device=logq.device)
    return AnchorRows(ids.to(torch.int32), values.clamp(min=-65000.0).to(torch.float16), rest.float())


# ---- the shard files (safetensors, read back memory-mapped) ----------------------------------------

def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend on the arrays and metadata only: a sorted-key compact JSON header
    (safetensors' own writer orders the metadata map at random) padded with spaces to 8 bytes, then the arrays by
    decreasing item size, then name (each one aligned to its item size)."""
    arrays = {name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for name, a in tensors.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(arrays[name].tobytes())


def write_shard(path: Path, keys: Sequence[int], row_counts: Sequence[int], rows: AnchorRows) -> dict:
    """Write one shard (byte-reproducible, :func:`save_safetensors`) to a temp name, then rename it into place;
    returns its manifest entry. A full disk is one AnchorCacheError line."""
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.asarray(row_counts, dtype=np.int64))
    if offsets[-1] != len(rows):
        raise ValueError(f"shard {path.name}: {len(rows)} rows for records owning {offsets[-1]}")
    tensors = {"keys": np.asarray(keys, dtype=np.int64), "offsets": offsets,
               "ids": rows.ids.cpu().numpy().astype(np.int32), "logprobs": rows.logprobs.cpu().numpy().astype(np.float16),
               "log_rest": rows.log_rest.cpu().numpy().astype(np.float32)}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with naming_disk_errors(f"anchor shard {path.name}", path.parent, AnchorCacheError,
                                "rerun the build command (complete shards are kept)"):
            save_safetensors(tmp, tensors, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)  # readable by the other users of a shared cache
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return {"file": path.name, "sha256": digest, "records": len(keys), "rows": int(offsets[-1]),
            "bytes": path.stat().st_size}


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """The shard's arrays, memory-mapped (safetensors: 8-byte header length, JSON header, raw little-endian data)."""
    with Path(path).open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if count == 0:
            arrays[name] = np.zeros(info["shape"], dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=tuple(info["shape"]))
        assert end - begin == count * dtype.itemsize
    return arrays




def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise AnchorCacheError(f"{path} is not valid JSON ({err}); delete {folder} and rebuild it") from None


class AnchorCache:
    """A complete cache folder opened for reading: ``rows(keys)`` gives a batch's rows from memory-mapped shards."""

    def __init__(self, folder: str | Path, verify: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("format") != FORMAT:
            raise AnchorCacheError(f"{self.folder} holds no anchor cache ({MANIFEST} missing or of another format)")
        if not self.manifest.get("complete"):
            raise AnchorCacheError(f"the anchor cache {self.folder} is half-built; rerun the command that built it "
                                   f"(`{self.manifest.get('command', 'python -m asft_repro.anchor ...')}`), which resumes it")
        self.k = int(self.manifest["k"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.shards: list[dict[str, np.ndarray]] = []
        self.index: dict[int, tuple[int, int, int]] = {}  # key -> (shard, first row, end row)
        for number, entry in enumerate(self.manifest["shards"]):
            path = self.folder / entry["file"]
            if not path.exists() or path.stat().st_size != entry["bytes"]:
                raise AnchorCacheError(f"shard {path} is missing or truncated; rerun "
                                       f"`{self.manifest.get('command', 'python -m asft_repro.anchor ...')}` to rebuild it")
            if verify and sha256_file(path) != entry["sha256"]:
                raise AnchorCacheError(f"shard {path} does not match its sha256 in {MANIFEST}; rerun "
                                       f"`{self.manifest.get('command', 'python -m asft_repro.anchor ...')}` to rebuild it")
            arrays = read_shard(path)
            self.shards.append(arrays)
            offsets = np.asarray(arrays["offsets"])
            for i, key in enumerate(np.asarray(arrays["keys"]).tolist()):
                self.index.setdefault(key, (number, int(offsets[i]), int(offsets[i + 1])))

    def __contains__(self, key: int) -> bool:
        return int(key) in self.index

    def missing(self, keys: Iterable[int]) -> list[int]:
        return [k for k in keys if int(k) not in self.index]

    def row_count(self, key: int) -> int:
        _, begin, end = self.index[int(key)]
        return end - begin

    def rows(self, keys: Iterable[int]) -> AnchorRows:
        """The rows of these records, concatenated in order (the order response_rows gives a padded batch)."""
        parts = []
        for key in keys:
            try:
                shard, begin, end = self.index[int(key)]
            except KeyError:
                raise AnchorCacheError(f"record key {int(key)} is not in the anchor cache {self.folder}; rebuild the "
                                       f"cache for this data (`python -m asft_repro.anchor ...`)") from None
            parts.append((self.shards[shard], begin, end))
        ids = np.concatenate([s["ids"][b:e] for s, b, e in parts]) if parts else np.zeros((0, self.k), np.int32)
        logprobs = np.concatenate([s["logprobs"][b:e] for s, b, e in parts]) if parts else np.zeros((0, self.k), np.float16)
        rest = np.concatenate([s["log_rest"][b:e] for s, b, e in parts]) if parts else np.zeros(0, np.float32)
        # stored dtypes (int32, float16): AnchorRows.to widens the ids on the device, the loss upcasts per chunk
        return AnchorRows(torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(np.ascontiguousarray(rest)))


def completed_base_logits(logits: torch.Tensor, labels: torch.Tensor, anchor: AnchorRows, chunk_rows: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """For the logits-level path: a float32 [B, T, V] tensor whose response rows hold log q~ (the completed cached
    base), usable as ``base_logits`` by :func:`asft_repro.losses.compute_loss` (its log_softmax is itself)."""
    vocab = logits.shape[-1]
    rows, _targets = response_rows(labels, ignore_index)
    if rows.numel() != len(anchor):
        raise AnchorCacheError(f"the anchor cache gave {len(anchor)} rows for a batch with {rows.numel()} response "
                               f"tokens; rebuild the cache for this data and template (`python -m asft_repro.anchor ...`)")
    flat = logits.detach().reshape(-1, vocab)
    out = torch.zeros(flat.shape, dtype=torch.promote_types(flat.dtype, torch.float32), device=flat.device)
    for sl in chunks(rows.numel(), chunk_rows):
        logp = torch.log_softmax(flat.index_select(0, rows[sl]).to(out.dtype), dim=-1)
        out.index_copy_(0, rows[sl], complete_log_probs(logp, anchor.ids[sl], anchor.logprobs[sl], anchor.log_rest[sl]))
    return out.view(logits.shape)
