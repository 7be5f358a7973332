"""OutputProcessor: turns sampled tokens into what callers see — text, logprobs, stops, RequestOutputs.

It owns the user-facing side of every request: the group of n samples a request id stands for, an
incremental detokenizer per sample, and the stop checks (EOS and stop token ids, stop strings found
in the tail of the text only, a structured output's grammar ending, max_tokens and the context
limit). The engine hands it each step's sampled tokens; it reports which samples finished so the
scheduler can free their blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from roofline.engine.pooling import PooledChunk, PoolingAccumulator
from roofline.engine.request import Request, RequestStatus
from roofline.engine.sampler import SampledToken
from roofline.loaders.tokenizer import IncrementalDetokenizer, TextTokenizer
from roofline.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class RequestGroup:
    """The n samples of one user request, and what they return."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]

    @property
    def finished(self) -> bool:
        return all(r.status.is_finished for r in self.samples)


class OutputProcessor:
    """Detokenizes, checks stops and builds RequestOutputs for every request group held."""

    def __init__(self, tokenizer: TextTokenizer, max_model_len: int,
                 finish: Callable[[Request, RequestStatus], None]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.finish = finish  # called when a sample stops: the scheduler frees its blocks
        self.groups: dict[str, RequestGroup] = {}
        self._owner: dict[str, str] = {}  # sample request id -> user request id
        self._pooling: dict[str, PoolingAccumulator] = {}  # embedding requests (one sample each) -> their sums

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], samples: list[Request]) -> None:
        """Hold a new request's samples."""
        skip = samples[0].sampling_params.skip_special_tokens
        self.groups[request_id] = RequestGroup(
            request_id, prompt, prompt_ids, samples,
            [IncrementalDetokenizer(self.tokenizer, prompt_ids, skip) for _ in samples],
            [CompletionOutput(i, "", []) for i in range(len(samples))])
        self._owner.update((r.request_id, request_id) for r in samples)
        if samples[0].sampling_params.pooling is not None:
            self._pooling[samples[0].request_id] = PoolingAccumulator(samples[0].sampling_params.pooling)

    def pop(self, request_id: str) -> RequestGroup | None:
        """Stop holding a request (aborted or finished); None if unknown."""
        group = self.groups.pop(request_id, None)
        if group is not None:
            for r in group.samples:
                self._owner.pop(r.request_id, None)
                self._pooling.pop(r.request_id, None)
        return group

    def process_pooled(self, samples: dict[str, Request], pooled: dict[str, PooledChunk]) -> list[RequestOutput]:
        """One step's pooled chunks of embedding requests in; the outputs of those whose prompt is done out."""
        outputs = []
        for rid, chunk in pooled.items():
            acc = self._pooling.get(rid)
            group = self.groups.get(self._owner.get(rid, ""))
            if acc is None or group is None:
                continue
            acc.add(chunk)
            if not chunk.is_last:
                continue
            req = samples[rid]
            req.finished_time = time.monotonic()
            group.outputs[0].finish_reason = RequestStatus.FINISHED_STOPPED.value
            self.finish(req, RequestStatus.FINISHED_STOPPED)
            out = self._make_output(group)
            out.embedding = acc.vector()
            outputs.append(out)
            self.pop(group.request_id)
        return outputs

    def process(self, samples: dict[str, Request], prompt_logprobs: dict[str, list[SampledToken]],
                sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        """One step's results (request id -> sample) in; the outputs of every group that advanced out."""
        for rid, entries in prompt_logprobs.items():
            samples[rid].prompt_logprobs.extend(self._logprob_dict(e, e.token_id) for e in entries)
        touched: dict[str, RequestGroup] = {}
        for rid, token in sampled.items():
            group = self.groups.get(self._owner.get(rid, ""))
            if group is None:
                continue
            req = samples[rid]
            if req.sampling_params.logprobs is not None:
                req.logprobs.append(self._logprob_dict(token, token.token_id))
            self._add_token(group, req, token.token_id, token.is_grammar_end)
            touched[group.request_id] = group
        outputs = [self._make_output(g) for g in touched.values()]
        for out in outputs:
            if out.finished:
                self.pop(out.request_id)
        return outputs

    def _logprob_dict(self, s: SampledToken, token_id: int) -> dict[int, Logprob]:
        d = {tid: Logprob(lp, rank + 1, self.tokenizer.token_text(tid))
             for rank, (tid, lp) in enumerate(zip(s.top_ids, s.top_logprobs))}
        if token_id not in d:
            d[token_id] = Logprob(s.logprob, s.rank, self.tokenizer.token_text(token_id))
        d[token_id].processed_logprob = s.processed_logprob
        return d

    def _add_token(self, group: RequestGroup, req: Request, token: int, is_grammar_end: bool = False) -> None:
        i = req.sample_index
        out = group.outputs[i]
        params = req.sampling_params
        delta = group.detokenizers[i].add([token])
        out.token_ids = req.output_token_ids
        out.text += delta
        status = None
        # a structured output ends when its grammar does (on an EOS id, which it is stripped like)
        if token in req.eos_token_ids or token in params.stop_token_ids or is_grammar_end:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
            if delta and not params.include_stop_str_in_output:
                out.text = out.text[: len(out.text) - len(delta)]
        if status is None and params.stop:
            # only the tail that could contain a new match is searched
            window = max(len(s) for s in params.stop) + len(delta)
            tail_start = max(len(out.text) - window, 0)
            for stop in params.stop:
                pos = out.text.find(stop, tail_start)
                if pos != -1:
                    status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
                    out.text = out.text[: pos + (len(stop) if params.include_stop_str_in_output else 0)]
                    break
        if status is None and (req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if params.logprobs is not None:
            out.logprobs = req.logprobs
        if status is not None:
            req.finished_time = time.monotonic()
            out.finish_reason = status.value
            out.stop_reason = req.stop_reason
            self.finish(req, status)

    def _make_output(self, group: RequestGroup) -> RequestOutput:
        first = group.samples[0]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs if first.sampling_params.prompt_logprobs is not None else None,
            outputs=group.outputs,
            finished=group.finished,
            num_cached_tokens=first.num_cached_tokens,
            queue_time=None if first.first_scheduled_time is None
            else first.first_scheduled_time - first.arrival_time,
            arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time,
            finished_time=max((r.finished_time for r in group.samples if r.finished_time is not None), default=None)
            if group.finished else None,
        )
