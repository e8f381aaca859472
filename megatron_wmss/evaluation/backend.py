"""An lm-eval backend that evaluates a megatron checkpoint in process, tensor-parallel.

``MegatronLM`` (registered with lm-eval as ``wmss-megatron``) runs on every rank of a
tensor-parallel group: every rank reports lm-eval rank 0 of world size 1, so each receives all
requests and runs the same forward passes. Generation gathers the vocabulary-parallel logits of
the last position (``runtime_gather_output``), so every rank sees the full distribution, and the
token chosen at each decoding step is broadcast from the group's first rank (sampling draws
there only); loglikelihoods are computed vocab-parallel, never gathered.
Pipeline parallelism is refused: lm-eval's request loop has no stage schedule.

- ``loglikelihood``: one plain forward over context + continuation (right-padded batches under
  a causal mask) to the final hidden states; the continuation positions' logits only, fp32
  log-probabilities over the real vocabulary (vocab-parallel), summed over the continuation;
  the same truncation and pairing rules as lm-eval's ``hf`` backend (``TemplateLM``).
- ``generate_until``: ``generate_batch_size`` requests at a time (those with one setting,
  longest prompts first) in one megatron-core ``StaticInferenceContext`` KV cache: the
  shortest prompt's length is prefilled at once, then every row advances one position per
  forward (:meth:`MegatronLM.generate_batch`). Greedy unless the request asks for sampling.

The stop rule (``StopRule``, the same for both generation paths) is that of lm-eval's ``hf``
backend at batch size 1 (``MultiTokenEOSCriteria``, ``postprocess_generated_text``):

- the stop strings are the request's ``until`` plus the EOS token's text;
- EOS ends the generation and is dropped; the ``max_gen_toks``-th token ends it too;
- after every other token, the generated tokens' tail is decoded *with* special tokens, and the
  generation ends when any stop string occurs in it, so a stop string that is a special token
  (a chat template's ``<|im_end|>``) stops it. The tail is at least as long as the ``hf``
  backend's lookback (a stop string's own token count + 2), so generation never runs past a
  point where the ``hf`` backend stops;
- the returned text is the generated tokens decoded *without* special tokens, cut before the
  first occurrence of any stop string. A special-token stop is thus the generation's last token
  and vanishes from the text; a text stop is cut off with whatever followed it.

Tokenisation follows the ``hf`` backend for Hugging Face tokenizers (default special tokens,
the tokenizer's own chat template), so that both backends see the same ids; SentencePiece
models use the built-in chat template and decode as SentencePiece does (no special-token
skipping: the stop check and the text see the same string).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["EvalTokenizer", "MegatronLM", "StopRule", "load_eval_tokenizer"]

# Generated tokens re-decoded to look for a stop string (at least): enough for any stop string
# of up to ~40 characters even at one character per token, and cheap at every step.
_STOP_WINDOW_TOKENS = 48


class EvalTokenizer:
    """What the backend needs of a tokenizer, as lm-eval's ``hf`` backend uses it."""

    def __init__(self, name: str, hf: Any = None, chat: Any = None) -> None:
        self.name = name
        self.hf = hf          # transformers tokenizer, or None
        self.chat = chat      # megatron_wmss ChatTokenizer (SentencePiece), or None
        if hf is not None:
            self.eos_id = hf.eos_token_id
            self.bos_id = hf.bos_token_id
            self.bos_text = hf.bos_token
        else:
            self.eos_id, self.bos_id, self.bos_text = chat.eos_id, None, None
        if self.eos_id is None:
            raise ValueError(f"tokenizer {name} defines no EOS token")

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        if self.hf is None:
            return self.chat.encode(text)
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self.bos_text and text.startswith(self.bos_text):
            kwargs["add_special_tokens"] = False
        return self.hf.encode(text, **kwargs)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.hf is None:
            return self.chat.decode(ids)
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def eos_text(self) -> str:
        return self.decode([self.eos_id], skip_special_tokens=False)

    def apply_chat_template(self, history: list[dict], add_generation_prompt: bool) -> str:
        if self.hf is not None:
            if not self.hf.chat_template:
                raise ValueError(f"tokenizer {self.name} has no chat template; evaluate with "
                                 "--no-chat-template")
            return self.hf.apply_chat_template(history, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=not add_generation_prompt)
        pieces = self.chat.chat_pieces(history, add_generation_prompt)
        return "".join(text for text, _ in pieces)

    @property
    def template(self) -> str:
        if self.hf is not None:
            return str(self.hf.chat_template or "")
        return "wmss-sentencepiece-chat"


def load_eval_tokenizer(path: str) -> EvalTokenizer:
    """A SentencePiece ``.model`` file, or a Hugging Face tokenizer directory (local only)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        from megatron_wmss.data.tokenizers import SentencePieceTokenizer

        return EvalTokenizer(path, chat=SentencePieceTokenizer(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer {path} is neither a SentencePiece .model file nor a "
                                "Hugging Face tokenizer directory")
    from transformers import AutoTokenizer

    return EvalTokenizer(path, hf=AutoTokenizer.from_pretrained(path, local_files_only=True))


class StopRule:
    """When one generation ends and what text it returns (the module docstring's rule).

    ``until``: stop strings, EOS text included (lm-eval's ``handle_stop_sequences``);
    ``max_new_tokens``: the generation budget in tokens.
    """

    def __init__(self, tokenizer: EvalTokenizer, until: Sequence[str], max_new_tokens: int
                 ) -> None:
        self.tok = tokenizer
        self.until = [stop for stop in until if stop]
        self.max_new_tokens = max_new_tokens
        # The hf backend looks back over a stop string's token count + 2 tokens; never less.
        self.window = max([_STOP_WINDOW_TOKENS] + [
            len(tokenizer.encode(stop, add_special_tokens=False)) + 2 for stop in self.until])

    def add(self, generated: list[int], token: int) -> bool:
        """Append ``token`` to ``generated`` unless it is EOS; True when the generation ends."""
        if token == self.tok.eos_id:
            return True
        generated.append(token)
        if len(generated) >= self.max_new_tokens:
            return True
        if not self.until:
            return False
        tail = self.tok.decode(generated[-self.window:], skip_special_tokens=False)
        return any(stop in tail for stop in self.until)

    def text(self, generated: Sequence[int]) -> str:
        """The answer: ``generated`` decoded without special tokens, cut at the first stop."""
        from lm_eval.models.utils import postprocess_generated_text

        return postprocess_generated_text(self.tok.decode(generated, skip_special_tokens=True),
                                          self.until, None)


def _first_argmax(logits_cv: torch.Tensor, tp_group, vocab_size: int) -> torch.Tensor:
    """``[c]`` global index of each row's largest logit over the real vocabulary (the first
    one on a tie, as ``argmax`` of the gathered logits picks it), from this rank's
    ``[c, v]`` shard: one MAX and one MIN all-reduce over ``tp_group``."""
    from megatron_wmss.loss.vocab_parallel import real_columns_in_shard

    local = logits_cv.shape[-1]
    rank = dist.get_rank(group=tp_group) if tp_group is not None else 0
    real = real_columns_in_shard(vocab_size, rank * local, local)
    rows = logits_cv.shape[0]
    if real:
        best_c, index_c = logits_cv[:, :real].float().max(dim=-1)
        index_c = index_c + rank * local
    else:  # a shard of padding only
        best_c = logits_cv.new_full((rows,), -torch.inf, dtype=torch.float32)
        index_c = torch.zeros(rows, dtype=torch.long, device=logits_cv.device)
    if tp_group is None or dist.get_world_size(group=tp_group) == 1:
        return index_c
    top_c = best_c.clone()
    dist.all_reduce(top_c, op=dist.ReduceOp.MAX, group=tp_group)
    first_c = torch.where(best_c == top_c, index_c, torch.iinfo(torch.long).max)
    dist.all_reduce(first_c, op=dist.ReduceOp.MIN, group=tp_group)
    return first_c


def _register():
    # lm-eval's built-in backends register on import of lm_eval.models: import it first, or
    # registering ours would leave the registry without them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    return TemplateLM, register_model


_TemplateLM, _register_model = _register()


@_register_model("wmss-megatron")
class MegatronLM(_TemplateLM):
    """lm-eval ``LM`` over a megatron-core model already built on this rank.

    ``model``: the rank's ``GPTModel`` (TP shard, PP=1), in eval mode; ``vocab_size``: real
    vocabulary (padded logit columns are dropped); ``max_length``: longest context + generation
    in tokens (default: the model's ``max_position_embeddings``). ``generate_batch_size``:
    prompts decoded together in one KV cache (1: one at a time).
    """

    def __init__(self, model, tokenizer: EvalTokenizer, vocab_size: int, *,
                 max_length: int, batch_size: int = 8, max_gen_toks: int = 256,
                 seed: int = 1234, generate_batch_size: int = 16) -> None:
        super().__init__()
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("the wmss-megatron backend runs at pipeline-parallel size 1; "
                             "evaluate with --tp only (or export with `wmss export-hf`)")
        self.model = model
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self._max_length = max_length
        self.batch_size = batch_size
        if generate_batch_size < 1:
            raise ValueError(f"generate_batch_size must be >= 1, got {generate_batch_size}")
        self.generate_batch_size = generate_batch_size
        self.max_gen_toks = max_gen_toks
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_src = ps.get_tensor_model_parallel_src_rank()
        self.leader = dist.get_rank() == self.tp_src
        self._device = next(model.parameters()).device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    # --- what lm-eval asks of a model -----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens)

    # --- forward passes -------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, tokens_bs: torch.Tensor, inference_context=None,
                position_offset: int = 0) -> torch.Tensor:
        """fp32 logits ``[b, s', V]`` over the real vocabulary (``s' = 1`` when a KV-cache
        context materialises only the last position)."""
        from megatron_wmss.training.step import causal_attention_mask

        b, s = tokens_bs.shape
        positions = torch.arange(position_offset, position_offset + s,
                                 device=self._device).expand(b, s)
        mask = causal_attention_mask(s, self._device) if s > 1 else None
        logits = self.model(tokens_bs.to(self._device), positions, mask,
                            inference_context=inference_context, runtime_gather_output=True)
        return logits[..., : self.vocab_size].float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        out: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
        # Longest first, as the hf backend orders them (and so batches pad little).
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1] + requests[i][2]))
        bar = tqdm(total=len(requests), desc="loglikelihood",
                   disable=disable_tqdm or not self.leader)
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            rows, targets = [], []
            for i in batch:
                _, context_enc, continuation_enc = requests[i]
                # The hf backend's window: the last max_length+1 tokens, minus the final one.
                whole = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                rows.append(whole)
                targets.append(list(continuation_enc))
            for i, result in zip(batch, self._continuation_scores(rows, targets)):
                out[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
            bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _continuation_scores(self, rows: list[list[int]], targets: list[list[int]]
                             ) -> list[tuple[float, bool]]:
        """Per row: Σ log p of its continuation ``targets[r]`` (the tokens after its last
        ``len(targets[r])`` positions) and whether greedy decoding reproduces it.

        One forward of the right-padded rows to the final hidden states; only the continuation
        positions are multiplied by this rank's output-weight shard, a chunk of 2^24 logits at
        a time, and scored vocab-parallel in fp32 (``loss.cross_entropy`` over the real
        vocabulary; the greedy token is the first global argmax): no ``[b, s, V]`` tensor.
        """
        from megatron_wmss.loss import cross_entropy
        from megatron_wmss.training.step import causal_attention_mask

        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.tok.eos_id, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        tokens = tokens.to(self._device)
        positions = torch.arange(width, device=self._device).expand_as(tokens)
        hidden_sbh = self.model.final_hidden_states(
            tokens, positions, causal_attention_mask(width, self._device) if width > 1 else None)
        at_s = torch.tensor([p for r, t in zip(rows, targets)
                             for p in range(len(r) - len(t), len(r))], dtype=torch.long)
        at_b = torch.tensor([b for b, t in enumerate(targets) for _ in t], dtype=torch.long)
        target_n = torch.tensor([x for t in targets for x in t], dtype=torch.long,
                                device=self._device)
        selected_nh = hidden_sbh[at_s.to(self._device), at_b.to(self._device)]
        weight_vh = self.model.output_weight()
        step = max(1, (1 << 24) // weight_vh.shape[0])
        logprob_n, greedy_n = [], []
        for first in range(0, selected_nh.shape[0], step):
            logits_cv = selected_nh[first:first + step] @ weight_vh.t()
            target_c = target_n[first:first + step]
            logprob_n.append(-cross_entropy(logits_cv, target_c, self.tp_group,
                                            vocab_size=self.vocab_size))
            greedy_n.append(_first_argmax(logits_cv, self.tp_group, self.vocab_size) == target_c)
        logprob = torch.cat(logprob_n).double().cpu().split([len(t) for t in targets])
        greedy = torch.cat(greedy_n).cpu().split([len(t) for t in targets])
        return [(float(lp.sum()), bool(g.all())) for lp, g in zip(logprob, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (text,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                disable_tqdm=True)
            results.append(sum(score for score, _ in scores))
        return results

    def _choose(self, logits_bv: torch.Tensor, do_sample: bool, temperature: float,
                top_p: float) -> list[int]:
        """Next token of each row: argmax, or a draw at ``temperature`` / ``top_p`` (rows in
        order, from this backend's generator), decided on the group's first rank and broadcast
        (ranks hold identical gathered logits, but one decision keeps them in lockstep even
        where floating-point ties break differently)."""
        if not do_sample or temperature <= 0:
            choices = torch.argmax(logits_bv, dim=-1).to(torch.long)
        else:
            draws = []
            for row in logits_bv.cpu().double():
                probs = torch.softmax(row / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_p, idx = probs.sort(descending=True)
                    keep = sorted_p.cumsum(0) - sorted_p < top_p
                    probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
                draws.append(torch.multinomial(probs, 1, generator=self.generator))
            choices = torch.cat(draws)
        if dist.get_world_size(self.tp_group) > 1:
            choices = choices.to(self._device)
            dist.broadcast(choices, src=self.tp_src, group=self.tp_group)
        return [int(c) for c in choices.cpu()]

    @torch.no_grad()
    def generate_tokens(self, prompt: list[int], max_new_tokens: int, until: Sequence[str] = (),
                        do_sample: bool = False, temperature: float = 0.0,
                        top_p: float = 1.0) -> list[int]:
        """Token ids generated after ``prompt`` with a KV cache, up to where :class:`StopRule`
        ends the generation (EOS excluded, a stop string's tokens included)."""
        return self.generate_batch([prompt], max_new_tokens, until, do_sample, temperature,
                                   top_p)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[list[int]], max_new_tokens: int,
                       until: Sequence[str] = (), do_sample: bool = False,
                       temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
        """Token ids generated after each prompt, each row ended by :class:`StopRule` on its
        own, all rows in one KV cache (megatron-core's ``StaticInferenceContext``).

        The rows advance in lockstep, one position per forward, after one prefill of the
        shortest prompt's length: at each position a row still inside its prompt is fed its
        prompt token, a generating row its last choice, a finished row a pad whose cache entry
        nothing reads. Every cached position of a live row holds one of its own tokens, so no
        row attends to padding and each gets the tokens it would get alone (static batching
        as megatron's own text generation does it)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        generated: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0 or not prompts:
            return generated
        rule = StopRule(self.tok, until, max_new_tokens)
        lengths = [len(p) for p in prompts]
        position = min(lengths)
        context = StaticInferenceContext(max_batch_size=len(prompts),
                                         max_sequence_length=max(lengths) + max_new_tokens)
        logits = self._logits(torch.tensor([p[:position] for p in prompts], dtype=torch.long),
                              context)[:, -1]
        context.sequence_len_offset += position
        live = set(range(len(prompts)))
        while True:
            step = [p[position] if position < n else self.tok.eos_id
                    for p, n in zip(prompts, lengths)]
            choosing = [i for i in sorted(live) if position >= lengths[i]]
            if choosing:
                tokens = self._choose(logits[choosing], do_sample, temperature, top_p)
                for i, token in zip(choosing, tokens):
                    if rule.add(generated[i], token):
                        live.discard(i)
                    else:
                        step[i] = token
            if not live:
                return generated
            logits = self._logits(torch.tensor(step, dtype=torch.long)[:, None], context,
                                  position_offset=position)[:, -1]
            context.sequence_len_offset += 1
            position += 1

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
        from tqdm import tqdm

        jobs = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in the "
                                 f"model's max_length={self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            options = (max_new, tuple(until), bool(kwargs.get("do_sample", False)),
                       float(kwargs.get("temperature", 0.0) or 0.0),
                       float(kwargs.get("top_p", 1.0) or 1.0))
            jobs.append((context, gen_kwargs, prompt, options))
        results: list[str] = [""] * len(jobs)
        bar = tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm or not self.leader)
        # One batch holds one setting; within it the longest prompts go first, as the hf
        # backend orders them, so rows of a batch have similar lengths (a short prefill).
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job[3], []).append(i)
        for options, members in groups.items():
            members.sort(key=lambda i: -len(jobs[i][2]))
            rule = StopRule(self.tok, options[1], options[0])
            for start in range(0, len(members), self.generate_batch_size):
                batch = members[start: start + self.generate_batch_size]
                outputs = self.generate_batch([jobs[i][2] for i in batch], *options)
                for i, ids in zip(batch, outputs):
                    context, gen_kwargs = jobs[i][:2]
                    results[i] = rule.text(ids)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs),
                                                results[i])
                bar.update(len(batch))
        bar.close()
        return results
