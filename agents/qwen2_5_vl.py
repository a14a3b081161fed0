"""Qwen2.5-VL model shard: Megatron tensor parallelism inside a stage, pipeline stages across
ranks, and our own batched decode loop with a KV cache.

Contract of one instance (stage-0 ranks receive them; later stages get ``None``)::

    inputs : [input_ids      int   [T]     prompt token ids (chat template already applied),
              pixel_values   float [P, D]  patches from the Qwen2.5-VL image processor (P = 0: no image),
              image_grid_thw int   [I, 3]  one (t, h, w) row per image (I = 0: no image),
              sampling       float [5]     [max_new_tokens, temperature, top_p, top_k, seed]]
    output : [output_ids     int64 [n]     generated tokens, the stop (EOS) token excluded]

``temperature == 0`` is greedy, ``top_k == 0`` and ``top_p == 1`` switch those filters off, a seed
``< 0`` draws from torch's global RNG. An instance stops at the first token in the checkpoint's
``generation_config.json`` ``eos_token_id`` list (shard option ``eos_token_id`` overrides) or after
``max_new_tokens`` tokens. Videos are not supported.

Layout: rank r is in stage ``r // tp``. Stage 0 holds the vision tower and the token embedding
(replicated over its TP ranks), every stage holds its contiguous slice of decoder layers as a
genuine smaller ``Qwen2_5_VLTextModel`` (sliced config, layers renumbered from 0, so its own
``DynamicCache`` and causal mask are right), and the output rank (first TP rank of the last
stage) holds the final norm and ``lm_head``. Each rank reads only its slices of the checkpoint.

One decode step: stage 0 embeds (prefill: + image features, 3-D mRoPE positions from the stock
``get_rope_index``), runs its layers and sends ``header, hidden, position_ids, attention_mask``
(prefill: + the sampling table) to the same TP rank of the next stage. The output rank computes
the last position's logits, picks one token per instance and broadcasts ``tokens + [all_done]``
from itself to every rank over the default group, so all ranks run the same number of steps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import AutoConfig, DynamicCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLTextModel,
    Qwen2_5_VLVisionRotaryEmbedding,
)

from agents.qwen_parallel import (
    BatchSampler,
    CheckpointReader,
    GenerationResult,
    check_tp_divisible,
    load_module_,
    parallelize_decoder_layer_,
    split_layers,
    torch_dtype,
)
from servable_framework.agent.shard import InstanceValues, ModelShard, ShardContext, WaitingBatch, register_shard

# stage -> stage messages: an int64 header, then the tensors it announces
_PREFILL, _DECODE, _ABORT, _EMPTY, _JOIN = 0, 1, 2, 3, 4  # header[0]
_ACCEPTED, _REJECTED_BAD_INPUT, _REJECTED_INTERNAL = 0, 1, 2  # per joining batch, after a JOIN header
_HEADER_LEN = 6  # [kind, batch, seq_len, mask_len, text_len, client_error]


@dataclass
class _Control:
    """ABORT (stage 0 rejected or failed the batch; ``text`` says why) or EMPTY (no instances)."""

    kind: int
    text: str
    client_error: bool  # ABORT: a ValueError (bad request) rather than an internal failure


@dataclass
class _Batch:
    """Stage-0 view of a validated, left-padded batch."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    pixel_values: torch.Tensor | None  # [sum P, D]
    image_grid_thw: torch.Tensor | None  # [sum I, 3]
    sampling: torch.Tensor  # [B, 5] float64


class _Rows:
    """Every rank's view of the rows being decoded: one KV cache and mask for all of them (a joined batch's
    cache is appended, the shorter side left-padded with masked zeros), and who each row belongs to.
    Row order is the same on every rank and matches the output rank's ``BatchSampler.active``."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [n, L], L = the cache length after the last forward
        self.next_pos: torch.Tensor | None = None  # stage 0: [n] decode position of each row's next token
        self.owners: list[tuple[int, int]] = []  # per row: (batch id, index in its batch)
        self.row_ids: dict[int, list[int]] = {}  # output rank: batch id -> its rows' sampler ids, in order
        self.owner_of_row_id: dict[int, tuple[int, int]] = {}  # output rank: sampler id -> (batch id, index)
        self.left: dict[int, int] = {}  # batch id -> rows still running

    @property
    def size(self) -> int:
        return len(self.owners)

    def append(self, batches: list[tuple[int, int]], cache: DynamicCache, mask: torch.Tensor,
               next_pos: torch.Tensor | None, ids: list[int]) -> None:
        """Append the rows of ``batches`` ([(batch id, rows)], in row order) prefilled together on ``cache``."""
        if self.cache is None or not self.owners:
            self.cache, self.mask, self.next_pos = cache, mask, next_pos
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
                old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            if next_pos is not None:
                self.next_pos = torch.cat([self.next_pos, next_pos])
        start = 0
        for key, count in batches:
            rows = ids[start:start + count]
            start += count
            self.owners.extend((key, i) for i in range(count))
            self.row_ids[key] = list(rows)
            self.owner_of_row_id.update({b: (key, i) for i, b in enumerate(rows) if b >= 0})
            self.left[key] = count

    def drop(self, finished: torch.Tensor, first_stage: bool) -> list[int]:
        """Remove the finished rows (every rank drops the same ones); the ids of the batches now complete."""
        if not bool(finished.any()):
            return []
        done = []
        for row in finished.nonzero().view(-1).tolist():
            key = self.owners[row][0]
            self.left[key] -= 1
            if self.left[key] == 0:
                del self.left[key]
                done.append(key)
        keep = (~finished).nonzero().view(-1)
        self.owners = [self.owners[i] for i in keep.tolist()]
        if self.owners:  # finished instances free their compute and their cache
            self.cache.batch_select_indices(keep)
            self.mask = self.mask[keep]
            if first_stage:
                self.next_pos = self.next_pos[keep]
            self._trim()
        return done

    def _trim(self) -> None:
        """Drop the leading cache columns no remaining row attends to (those of rows that left, and left
        padding): with batches joining, the loop can run for a long time and its cache would otherwise only
        grow. Masked columns add exact zeros to attention, so dropping them changes no result. Every rank
        holds the same mask here, so every rank drops the same columns."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        self.mask = self.mask[:, start:]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence dimension (-1 of a mask [B, L], -2 of a cache [B, H, L, D]) with zeros."""
    dim = -1 if t.dim() == 2 else -2
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = (missing, 0) if dim == -1 else (0, 0, missing, 0)
    return torch.nn.functional.pad(t, pad)


class _MRopeIndex:
    """Carries what the stock ``Qwen2_5_VLModel.get_rope_index`` reads (``config`` and
    ``get_vision_position_ids``), so we compute 3-D positions with HF's own code without a full
    model object and without its shared ``rope_deltas`` attribute (per-request state stays local)."""

    def __init__(self, config) -> None:
        self.config = config
        self._get_rope_index = Qwen2_5_VLModel.get_rope_index
        self.get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids.__get__(self)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        positions, _deltas = self._get_rope_index(
            self, input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return positions  # [3, B, T]


@register_shard("qwen2_5_vl")
class Qwen25VLShard(ModelShard):
    """One rank of a tensor/pipeline-parallel Qwen2.5-VL (see the module docstring).

    Shard options (``declare_servable(shard_options=...)``): ``dtype`` (default: the checkpoint's),
    ``attn_implementation`` (default ``"sdpa"``), ``eos_token_id`` (int or list; default from
    generation_config.json).
    """

    def __init__(self, ctx: ShardContext) -> None:
        super().__init__(ctx)
        path = Path(ctx.model_files[0])
        self.config = AutoConfig.from_pretrained(path)
        tcfg = self.config.text_config
        check_tp_divisible(tcfg, ctx.tp_size)  # before any communication or loading
        if ctx.tp_size > 1 and ctx.tp_group is None:
            raise ValueError("tp_group is required when tensor-parallel size > 1")
        self.layers = split_layers(tcfg.num_hidden_layers, ctx.stage_size)[ctx.stage]
        self.device = torch.device(ctx.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives run on the current device
        self.dtype = torch_dtype(ctx.options.get("dtype") or getattr(self.config, "dtype", None), torch.float32)
        self.attn_impl = ctx.options.get("attn_implementation", "sdpa")
        self.eos_ids = self._eos_ids(path, ctx.options.get("eos_token_id"))
        self.pad_id = self._pad_id(path)
        self.output_rank = (ctx.stage_size - 1) * ctx.tp_size  # global rank that samples and broadcasts
        self.hidden_size = tcfg.hidden_size
        self.vocab_size = tcfg.vocab_size
        vcfg = self.config.vision_config
        self.patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        self.merge_unit = vcfg.spatial_merge_size ** 2

        reader = CheckpointReader(path)
        try:
            self._build(reader)
        finally:
            reader.close()

    # ------------------------------------------------------------------ construction

    def _eos_ids(self, path: Path, override) -> set[int]:
        eos = override
        gen_file = path / "generation_config.json"
        if eos is None and gen_file.is_file():
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is None:
            eos = self.config.text_config.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _pad_id(self, path: Path) -> int:
        gen_file = path / "generation_config.json"
        pad = json.loads(gen_file.read_text()).get("pad_token_id") if gen_file.is_file() else None
        pad = pad if pad is not None else self.config.text_config.pad_token_id
        return int(pad) if pad is not None else min(self.eos_ids, default=0)

    def _build(self, reader: CheckpointReader) -> None:
        ctx, first, a = self.ctx, self.ctx.is_first_stage, self.layers[0]
        tcfg = copy.deepcopy(self.config.text_config)  # this stage's text model: layers a..b as 0..n-1
        tcfg.layer_types = list(tcfg.layer_types[a:self.layers[1]])
        tcfg.num_hidden_layers = self.layers[1] - a
        tcfg._attn_implementation = self.attn_impl
        self.text_config = tcfg

        with torch.device("meta"):  # skeletons only; parameters come from the checkpoint below
            text = Qwen2_5_VLTextModel(tcfg)
        text.norm = nn.Identity()  # the final norm lives on the output rank, next to lm_head
        if not first:
            text.embed_tokens = nn.Identity()
        if ctx.tp_size > 1:
            for layer in text.layers:
                parallelize_decoder_layer_(layer, ctx.tp_size, ctx.tp_rank, ctx.tp_group)

        def text_key(name: str) -> str:
            if name.startswith("layers."):
                idx, rest = name[len("layers."):].split(".", 1)
                return reader.text_key(f"layers.{int(idx) + a}.{rest}")
            return reader.text_key(name)

        load_module_(text, reader, text_key, self.device, self.dtype)
        text.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=tcfg).to(self.device)  # non-persistent buffers
        self.text = text.eval()

        self.visual = None
        self.mrope = None
        if first:
            vcfg = copy.deepcopy(self.config.vision_config)
            vcfg._attn_implementation = self.attn_impl
            with torch.device("meta"):
                visual = Qwen2_5_VisionTransformerPretrainedModel(vcfg)
            load_module_(visual, reader, reader.vision_key, self.device, self.dtype)
            visual.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(vcfg).to(self.device)
            self.visual = visual.eval()
            self.mrope = _MRopeIndex(self.config)

        self.final_norm = self.lm_head = None
        if ctx.is_output_rank:
            with torch.device("meta"):
                norm = Qwen2_5_VLRMSNorm(tcfg.hidden_size, eps=tcfg.rms_norm_eps)
                head = nn.Linear(tcfg.hidden_size, tcfg.vocab_size, bias=False)
            load_module_(norm, reader, lambda n: reader.text_key(f"norm.{n}"), self.device, self.dtype)
            head_key = "lm_head.weight"
            if head_key not in reader and self.config.tie_word_embeddings:
                head_key = reader.text_key("embed_tokens.weight")
            load_module_(head, reader, lambda n: head_key, self.device, self.dtype)
            self.final_norm, self.lm_head = norm.eval(), head.eval()

        for name, tensor in self.tensors():
            if tensor.is_meta:
                raise RuntimeError(f"{name} was not materialised from the checkpoint")

    def tensors(self):
        """(name, tensor) of every parameter and buffer this rank holds."""
        for prefix, mod in (("text", self.text), ("visual", self.visual), ("final_norm", self.final_norm),
                            ("lm_head", self.lm_head)):
            if mod is not None:
                for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
                    yield f"{prefix}.{n}", t

    # ------------------------------------------------------------------ serving API

    def predict(self, instances: list[InstanceValues] | None) -> list[InstanceValues] | None:
        result = self.generate(instances)
        if result is None:
            return None
        return [[np.asarray(tokens, dtype=np.int64)] for tokens in result.tokens]

    @torch.inference_mode()
    def generate(self, instances: list[InstanceValues] | None, collect_logits: bool = False
                 ) -> GenerationResult | None:
        """Run one batch to completion on every rank. The output rank gets its `GenerationResult` (with
        per-step logits of each instance when ``collect_logits``); other ranks get None.

        Continuous batching: batches that reach the Agents meanwhile join at a step boundary when their
        rows fit (``self.link``); each is prefilled on its own cache, then its cache is appended to the
        running one (the shorter side left-padded and masked), and it is completed through the link as its
        last row finishes. ``last_results`` (output rank) keeps every batch's result of this call by id.
        """
        ctx = self.ctx
        own = self.link.batch_id if self.link is not None else 0
        if ctx.is_first_stage:
            try:
                batch = self._prepare(instances)
                prefill = None if batch is None else self._prefill_inputs(batch)
            except Exception as exc:  # before any collective: tell the later stages, then fail alike
                self._send_control(_ABORT, str(exc), client_error=isinstance(exc, ValueError))
                raise
            if batch is None:
                self._send_control(_EMPTY)
                return GenerationResult([], []) if ctx.is_output_rank else None
            start = (*prefill, batch.sampling)
        else:
            message = self._recv_step()
            if isinstance(message, _Control):
                return self._on_control(message)
            start = message

        run = _Rows()
        sampler = BatchSampler(self.eos_ids, self.pad_id, collect_logits) if ctx.is_output_rank else None
        self.last_results: dict[int, GenerationResult] = {}
        parts = [self._prefill_rows(run, sampler, [(own, start[0].shape[0])], *start)]
        tokens = torch.empty(0, dtype=torch.int64, device=self.device)
        while True:
            sync_len = run.size  # rows taking part in this step (running + just joined)
            sync = torch.empty(2 * sync_len + 2, dtype=torch.int64, device=self.device)
            if sampler is not None:
                step = sampler.step(torch.cat(parts).float(), self._cancelled_rows(run, sampler))
                for b in sampler.finished_now:  # its answer is complete: return it now, not with the batch
                    key, index = run.owner_of_row_id[b]
                    self._emit(key, index, sampler.tokens[b])
                k_next = self.link.joinable(len(sampler.active)) if self.link is not None else 0
                sync.copy_(torch.cat([step, torch.tensor([k_next])]))
            # tokens + finished flags + [all_done, batches to take in], to every rank: all run the same steps
            dist.broadcast(sync, src=self.output_rank)
            tokens, finished = sync[:sync_len], sync[sync_len:2 * sync_len].bool()
            all_done, k_next = bool(sync[-2]), int(sync[-1])
            for key in run.drop(finished, ctx.is_first_stage):
                result = sampler.result(run.row_ids.pop(key)) if sampler is not None else None
                self._batch_done(key, result)
            tokens = tokens[~finished]
            if all_done and k_next == 0:
                break
            joining = self.link.join(k_next) if k_next else []
            parts = []
            if run.size:
                parts.append(self._decode_rows(run, tokens))
            if joining:
                part = self._join(run, sampler, joining)
                if part is not None:
                    parts.append(part)
            if not run.size:  # every joiner was rejected and nothing else runs
                break
        own_result = self.last_results.get(own)
        return own_result if ctx.is_output_rank else None

    def _cancelled_rows(self, run: _Rows, sampler: BatchSampler) -> set[int]:
        """Output rank: the sampler ids of running rows whose caller gave up; they finish at this step (the
        finished flags every rank receives drop them everywhere)."""
        gone = self.link.cancelled() if self.link is not None else set()
        if not gone:
            return set()
        rows = {b for b in sampler.active if run.owner_of_row_id[b] in gone}
        for b in rows:
            self.link.stopped(*run.owner_of_row_id[b])
        return rows

    def _emit(self, key: int, index: int, tokens: list[int]) -> None:
        if self.link is not None:
            self.link.emit(key, index, [np.asarray(tokens, dtype=np.int64)])

    def _batch_done(self, key: int, result: GenerationResult | None) -> None:
        if result is not None:
            self.last_results[key] = result
        if self.link is not None:
            outputs = None if result is None else [[np.asarray(t, dtype=np.int64)] for t in result.tokens]
            self.link.complete(key, outputs)

    def _forward(self, hidden, positions, mask, cache, sampling=None) -> torch.Tensor | None:
        """This stage's layers, then on to the next stage; the output rank returns last-position logits."""
        hidden = self.text(inputs_embeds=hidden, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).last_hidden_state
        if not self.ctx.is_last_stage:
            self._send_step(hidden, positions, mask, sampling)
        if self.ctx.is_output_rank:
            return self.lm_head(self.final_norm(hidden[:, -1]))
        return None

    def _prefill_rows(self, run: _Rows, sampler: BatchSampler | None, batches: list[tuple[int, int]], hidden,
                      positions, mask, sampling) -> torch.Tensor | None:
        """Prefill the rows of ``batches`` ([(batch id, rows)]) together on a fresh cache and append them to
        ``run``; their logits on the output rank."""
        cache = DynamicCache(config=self.text_config)  # this stage's layers only
        logits = self._forward(hidden, positions, mask, cache, sampling)
        # decode positions: one past the largest prefill position of each row (= past + rope_deltas for an
        # unpadded row, and right under left padding); kept per row, never on the model
        next_pos = positions.amax(dim=(0, 2)) + 1 if self.ctx.is_first_stage else None
        ids = sampler.add(sampling) if sampler is not None else [-1] * hidden.shape[0]  # ids: output rank only
        run.append(batches, cache, mask, next_pos, ids)
        return logits

    def _decode_rows(self, run: _Rows, tokens: torch.Tensor) -> torch.Tensor | None:
        """One decode step of the running rows (``tokens``: the last token of each)."""
        if self.ctx.is_first_stage:
            hidden = self.text.embed_tokens(tokens.view(-1, 1))
            positions = run.next_pos.view(1, -1, 1).expand(3, -1, -1)
            run.next_pos = run.next_pos + 1
            run.mask = torch.cat([run.mask, run.mask.new_ones(run.mask.shape[0], 1)], dim=1)
        else:
            hidden, positions, run.mask, _ = self._recv_step()
        return self._forward(hidden, positions, run.mask, run.cache)

    def _join(self, run: _Rows, sampler: BatchSampler | None, joining: list[WaitingBatch]) -> torch.Tensor | None:
        """Take in the batches that arrived while this one ran, prefilled together in one pass. A batch with
        bad input fails alone (stage 0 tells the later stages which, with a JOIN header); the running rows
        are unaffected. Returns the joined rows' logits on the output rank (None if none was accepted)."""
        assert self.link is not None
        joining = [w for w in joining if self._complete_if_empty(w)]
        if not joining:
            return None
        if self.ctx.is_first_stage:
            flags, texts, accepted = [], [], []
            for w in joining:
                try:
                    for i, inst in enumerate(w.instances or [None]):
                        try:
                            self._check_instance(inst)
                        except ValueError as exc:
                            raise ValueError(f"instance {i}: {exc}") from None
                except ValueError as exc:
                    flags.append(_REJECTED_BAD_INPUT)
                    texts.append(str(exc))
                else:
                    flags.append(_ACCEPTED)
                    texts.append("")
                    accepted.append(w)
            start = None
            if accepted:
                try:
                    batch = self._prepare([inst for w in accepted for inst in w.instances])
                    start = (*self._prefill_inputs(batch), batch.sampling)
                except Exception as exc:  # not the clients' fault: every accepted batch fails with it
                    texts = [f"{type(exc).__name__}: {exc}" if f == _ACCEPTED else t for f, t in zip(flags, texts)]
                    flags = [_REJECTED_INTERNAL if f == _ACCEPTED else f for f in flags]
                    accepted = []
        else:
            flags, texts = self._recv_join()
            accepted = [w for w, f in zip(joining, flags) if f == _ACCEPTED]
        self._send_join(flags, texts)
        for w, flag, text in zip(joining, flags, texts):
            if flag == _REJECTED_BAD_INPUT:
                self.link.fail(w.batch_id, ValueError(text))
            elif flag == _REJECTED_INTERNAL:
                self.link.fail(w.batch_id, RuntimeError(f"stage 0 failed: {text}"))
        if not accepted:
            return None
        if not self.ctx.is_first_stage:
            start = self._recv_step()
        return self._prefill_rows(run, sampler, [(w.batch_id, w.count) for w in accepted], *start)

    def _complete_if_empty(self, waiting: WaitingBatch) -> bool:
        """A batch without instances is done at once, on every rank alike (every rank knows its count)."""
        if waiting.count:
            return True
        assert self.link is not None
        self.link.complete(waiting.batch_id, [] if self.ctx.is_output_rank else None)
        return False

    def _send_join(self, flags: list[int], texts: list[str]) -> None:
        """JOIN header, then one flag per joining batch, then their texts (NUL-separated) when any."""
        if self.ctx.is_last_stage:
            return
        data = "\0".join(texts).encode() if any(texts) else b""
        peer = self._next_peer()
        dist.send(self._header(_JOIN, len(flags), 0, 0, len(data)), dst=peer)
        dist.send(torch.tensor(flags, dtype=torch.int64, device=self.device), dst=peer)
        if data:
            dist.send(torch.tensor(list(data), dtype=torch.uint8, device=self.device), dst=peer)

    def _recv_join(self) -> tuple[list[int], list[str]]:
        src = self.ctx.peer_in_stage(self.ctx.stage - 1)
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(header, src=src)
        kind, k, _, _, n_text, _ = header.tolist()
        if kind != _JOIN:
            raise RuntimeError(f"pipeline out of step: expected a JOIN header, got kind {kind}")
        flags = torch.empty(k, dtype=torch.int64, device=self.device)
        dist.recv(flags, src=src)
        texts = [""] * k
        if n_text:
            data = torch.empty(n_text, dtype=torch.uint8, device=self.device)
            dist.recv(data, src=src)
            texts = bytes(data.cpu().tolist()).decode(errors="replace").split("\0")
        return flags.tolist(), texts

    def _on_control(self, message: _Control) -> GenerationResult | None:
        """A later stage got ABORT/EMPTY instead of a prefill: pass it on, then end like stage 0 did."""
        self._send_control(message.kind, message.text, message.client_error)
        if message.kind == _ABORT:
            if message.client_error:
                raise ValueError(message.text)
            raise RuntimeError(f"stage 0 failed: {message.text}")
        return GenerationResult([], []) if self.ctx.is_output_rank else None

    def close(self) -> None:
        self.text = self.visual = self.final_norm = self.lm_head = None

    # ------------------------------------------------------------------ stage 0: inputs

    def _prepare(self, instances: list[InstanceValues] | None) -> _Batch | None:
        if instances is None:
            raise ValueError("stage-0 ranks must receive the instances")
        if len(instances) == 0:
            return None
        ids_list, pixels, grids, sampling = [], [], [], []
        for i, inst in enumerate(instances):
            try:
                ids, pv, thw, opts = self._check_instance(inst)
            except ValueError as exc:
                raise ValueError(f"instance {i}: {exc}") from None
            ids_list.append(ids)
            sampling.append(opts)
            if pv is not None:
                pixels.append(pv)
                grids.append(thw)
        B, T = len(ids_list), max(len(x) for x in ids_list)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(ids_list):  # left padding: the newest token is always at -1
            input_ids[b, T - len(ids):] = ids
            attention_mask[b, T - len(ids):] = 1
        dev = self.device
        return _Batch(
            input_ids=torch.from_numpy(input_ids).to(dev),
            attention_mask=torch.from_numpy(attention_mask).to(dev),
            pixel_values=torch.from_numpy(np.concatenate(pixels)).to(dev, self.dtype) if pixels else None,
            image_grid_thw=torch.from_numpy(np.concatenate(grids)).to(dev) if grids else None,
            sampling=torch.from_numpy(np.stack(sampling)).to(dev),
        )

    def _check_instance(self, inst: InstanceValues):
        if not isinstance(inst, (list, tuple)) or len(inst) != 4:
            raise ValueError("expected 4 inputs: input_ids, pixel_values, image_grid_thw, sampling")
        ids, pv, thw, opts = inst
        for name, v in (("input_ids", ids), ("pixel_values", pv), ("image_grid_thw", thw), ("sampling", opts)):
            if not isinstance(v, np.ndarray):
                raise ValueError(f"{name} must be a tensor, got {type(v).__name__}")
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size})")
        if int((ids == self.config.video_token_id).sum()):
            raise ValueError("video inputs are not supported")
        n_image_tokens = int((ids == self.config.image_token_id).sum())
        if pv.size == 0 and thw.size == 0:
            if n_image_tokens:
                raise ValueError(f"{n_image_tokens} image tokens in input_ids but no pixel_values")
            pv = thw = None
        else:
            if pv.ndim != 2 or pv.shape[1] != self.patch_dim or pv.dtype.kind != "f":
                raise ValueError(f"pixel_values must be float [P, {self.patch_dim}], got {pv.dtype} {list(pv.shape)}")
            if thw.ndim != 2 or thw.shape[1] != 3 or thw.dtype.kind not in "iu" or thw.shape[0] == 0:
                raise ValueError(f"image_grid_thw must be integer [I, 3], got {thw.dtype} {list(thw.shape)}")
            thw = thw.astype(np.int64)
            patches = int(np.prod(thw, axis=1).sum())
            if (thw <= 0).any() or (thw[:, 1:] % self.config.vision_config.spatial_merge_size).any():
                raise ValueError(f"image_grid_thw rows must be positive with h and w divisible by "
                                 f"{self.config.vision_config.spatial_merge_size}, got {thw.tolist()}")
            if patches != pv.shape[0]:
                raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has {pv.shape[0]}")
            if patches != n_image_tokens * self.merge_unit:
                raise ValueError(f"input_ids has {n_image_tokens} image tokens but the images need "
                                 f"{patches // self.merge_unit}")
            pv = pv.astype(np.float32)
        opts = opts.astype(np.float64).reshape(-1) if opts.dtype.kind in "iuf" else None
        if opts is None or opts.shape != (5,) or not np.isfinite(opts).all():
            raise ValueError("sampling must be 5 finite numbers [max_new_tokens, temperature, top_p, top_k, seed]")
        max_new, temperature, top_p, top_k, seed = opts.tolist()
        if max_new < 1 or max_new != int(max_new):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or top_k != int(top_k) or seed != int(seed):
            raise ValueError("top_k must be a non-negative integer and seed an integer")
        return ids, pv, thw, opts

    def _prefill_inputs(self, batch: _Batch):
        ids, mask = batch.input_ids, batch.attention_mask
        embeds = self.text.embed_tokens(ids)
        if batch.pixel_values is not None:
            feats = self.visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
            image_mask = (ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
        mm_token_type_ids = (ids == self.config.image_token_id).long()
        positions = self.mrope(ids, mm_token_type_ids, batch.image_grid_thw, mask)
        return embeds, positions, mask

    # ------------------------------------------------------------------ stage -> stage messages

    def _next_peer(self) -> int:
        return self.ctx.peer_in_stage(self.ctx.stage + 1)

    def _header(self, *fields: int) -> torch.Tensor:
        values = list(fields) + [0] * (_HEADER_LEN - len(fields))
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _send_control(self, kind: int, text: str = "", client_error: bool = True) -> None:
        """ABORT (with its error text) or EMPTY, to the next stage (nothing if this is the last)."""
        if self.ctx.is_last_stage:
            return
        data = text.encode()
        peer = self._next_peer()
        dist.send(self._header(kind, 0, 0, 0, len(data), int(client_error)), dst=peer)
        if data:
            dist.send(torch.tensor(list(data), dtype=torch.uint8, device=self.device), dst=peer)

    def _send_step(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   sampling: torch.Tensor | None) -> None:
        """Header first (shapes), then hidden [B,T,H], positions [3,B,T], mask [B,L] (+ sampling [B,5])."""
        B, T, _ = hidden.shape
        peer = self._next_peer()
        kind = _PREFILL if sampling is not None else _DECODE
        dist.send(self._header(kind, B, T, mask.shape[1]), dst=peer)
        dist.send(hidden.contiguous(), dst=peer)
        dist.send(positions.contiguous(), dst=peer)
        dist.send(mask.contiguous(), dst=peer)
        if sampling is not None:
            dist.send(sampling.contiguous(), dst=peer)

    def _recv_step(self):
        """(hidden, positions, mask, sampling or None), or a `_Control` in place of a prefill."""
        src = self.ctx.peer_in_stage(self.ctx.stage - 1)
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(header, src=src)
        kind, B, T, L, n_text, flag = header.tolist()
        if kind in (_ABORT, _EMPTY):
            text = ""
            if n_text:
                data = torch.empty(n_text, dtype=torch.uint8, device=self.device)
                dist.recv(data, src=src)
                text = bytes(data.cpu().tolist()).decode(errors="replace")
            return _Control(kind, text, bool(flag))
        hidden = torch.empty(B, T, self.hidden_size, dtype=self.dtype, device=self.device)
        positions = torch.empty(3, B, T, dtype=torch.int64, device=self.device)
        mask = torch.empty(B, L, dtype=torch.int64, device=self.device)
        for t in (hidden, positions, mask):
            dist.recv(t, src=src)
        sampling = None
        if kind == _PREFILL:
            sampling = torch.empty(B, 5, dtype=torch.float64, device=self.device)
            dist.recv(sampling, src=src)
        return hidden, positions, mask, sampling
