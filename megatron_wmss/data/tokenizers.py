"""Tokenizers behind one interface: HF ``AutoTokenizer`` directories and SentencePiece models.

A chat is rendered as *pieces* of text, each either prompt (unsupervised) or assistant
(supervised). HF fast tokenizers encode the whole rendered conversation at once and mark as
supervised each token whose characters overlap a reply, so the ids are exactly those of the text
the template renders (as HF/TRL train on it; tests/unit/test_bpe_boundary.py shows encoding the
pieces apart changes them where a byte-level BPE merges across the generation prompt's end).
SentencePiece models (and slow HF tokenizers, which give no offsets) encode each piece on its
own: the built-in template's pieces meet at role markers, which are single pieces.

HF tokenizers render with their own Jinja chat template; the assistant spans are found by
rendering prefixes of the conversation (any template where earlier turns render the same way
whether or not later turns follow). SentencePiece models use the built-in template
``<|role|>\\n{content}\\n`` for prompt turns and ``<|assistant|>\\n{content}<EOS>`` for replies.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from megatron_wmss.config.vocab import padded_vocab_size
from megatron_wmss.data.config import TokenizerConfig

__all__ = [
    "SP_ROLE_MARKERS",
    "ChatTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
]

Message = dict[str, str]
Piece = tuple[str, bool]  # (text, supervised)

#: Role markers of the built-in SentencePiece chat template; trained models hold each as one piece.
SP_ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Bump when the rendering below changes: it is part of every tokenizer fingerprint (cache key).
_TEMPLATE_VERSION = "wmss-chat-1"


class ChatTokenizer(abc.ABC):
    """What the data pipeline, the model builder and evaluation need from a tokenizer."""

    #: Token ids closing every assistant piece, supervised (the built-in template's EOS).
    _assistant_end_ids: tuple[int, ...] = ()

    def __init__(self, name: str, eos_id: int, pad_id: int | None) -> None:
        self.name = name
        self.eos_id = eos_id
        # Padding positions are masked out of attention and loss, so EOS is a safe stand-in.
        self.pad_id = eos_id if pad_id is None or pad_id < 0 else pad_id

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (before padding for the model)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Hex digest of everything that decides the token ids (vocabulary, template)."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added around it."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, exactly as the tokenizer maps it (no whitespace clean-up)."""

    @abc.abstractmethod
    def chat_pieces(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> list[Piece]:
        """The rendered conversation as consecutive ``(text, supervised)`` pieces."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self.encode_batch([text])[0]

    def padded_vocab_size(self, tensor_parallel_size: int = 1, multiple: int = 128) -> int:
        """Embedding rows of the model: vocab_size padded for tensor parallelism."""
        return padded_vocab_size(self.vocab_size, tensor_parallel_size, multiple)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """``(ids, assistant_mask)`` of one conversation; see :meth:`encode_chat_batch`."""
        return self.encode_chat_batch([messages], add_generation_prompt)[0]

    def encode_chat_batch(self, conversations: Sequence[Sequence[Message]],
                          add_generation_prompt: bool = False, supervise_all: bool = False
                          ) -> list[tuple[list[int], list[bool]]]:
        """Token ids and a per-token mask (True: a token to learn) for each conversation.

        By default the mask holds the assistant replies, and a conversation ending with a reply
        ends with EOS, supervised. ``supervise_all``: every token of the conversation as the
        template renders it, nothing appended (data.loss_on = all)."""
        rendered = [self._merged_pieces(m, add_generation_prompt) for m in conversations]
        out = []
        for messages, (ids, mask, reply) in zip(conversations, self._encode_pieces(rendered)):
            if supervise_all:
                out.append((ids, [True] * len(ids)))
                continue
            ends_with_reply = messages and messages[-1]["role"] == "assistant"
            if ends_with_reply and not add_generation_prompt and self.eos_id not in reply:
                # Learning to stop: the reply's last target is EOS even where the template
                # closes turns with another marker.
                ids.append(self.eos_id)
                mask.append(True)
            out.append((ids, mask))
        return out

    def _encode_pieces(self, rendered: list[list[Piece]]
                       ) -> list[tuple[list[int], list[bool], list[int]]]:
        """``(ids, mask, ids of the last supervised piece)`` per conversation, each piece
        encoded on its own (one tokenizer call for the batch)."""
        encoded = iter(self.encode_batch([text for pieces in rendered for text, _ in pieces]))
        out = []
        for pieces in rendered:
            ids: list[int] = []
            mask: list[bool] = []
            reply: list[int] = []
            for _, supervised in pieces:
                piece_ids = next(encoded)
                if supervised:
                    reply = piece_ids = piece_ids + list(self._assistant_end_ids)
                ids.extend(piece_ids)
                mask.extend([supervised] * len(piece_ids))
            out.append((ids, mask, reply))
        return out

    def _merged_pieces(self, messages: Sequence[Message], add_generation_prompt: bool
                       ) -> list[Piece]:
        # Adjacent prompt pieces are encoded as one text, as inference encodes a prompt.
        merged: list[Piece] = []
        for text, supervised in self.chat_pieces(messages, add_generation_prompt):
            if merged and not supervised and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            elif text or supervised:
                merged.append((text, supervised))
        return merged


class SentencePieceTokenizer(ChatTokenizer):
    """A SentencePiece ``.model`` file with the built-in chat template."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {model_file} has no EOS piece (eos_id = -1); "
                             f"train it with eos_id >= 0 (train_tokenizer does)")
        super().__init__(model_file, eos, self._sp.pad_id())
        self._assistant_end_ids = (eos,)
        digest = hashlib.sha256(self._sp.serialized_model_proto())
        digest.update(_TEMPLATE_VERSION.encode())
        self._fingerprint = digest.hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts)) if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def chat_pieces(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> list[Piece]:
        pieces: list[Piece] = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "assistant":
                pieces += [(f"{SP_ROLE_MARKERS['assistant']}\n", False), (content, True)]
            else:
                pieces.append((f"{SP_ROLE_MARKERS.get(role, f'<|{role}|>')}\n{content}\n", False))
        if add_generation_prompt:
            pieces.append((f"{SP_ROLE_MARKERS['assistant']}\n", False))
        return pieces


class HFTokenizer(ChatTokenizer):
    """An HF tokenizer (``AutoTokenizer``) and its Jinja chat template."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"HF tokenizer {name} defines no eos_token; set one in its "
                             f"tokenizer_config.json")
        if not tokenizer.chat_template:
            raise ValueError(f"HF tokenizer {name} has no chat template; pass "
                             f"tokenizer.chat_template = <file.jinja> (a template over messages)")
        super().__init__(name, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self._tok = tokenizer
        digest = hashlib.sha256(_TEMPLATE_VERSION.encode())
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # A fast tokenizer serialises its whole state; a slow one is identified by its vocab.
        state = (backend.to_str() if backend is not None
                 else repr(sorted(tokenizer.get_vocab().items())))
        for part in (type(tokenizer).__name__, state, str(tokenizer.chat_template),
                     str(self.eos_id), str(self.pad_id)):
            digest.update(part.encode())
        self._fingerprint = digest.hexdigest()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # includes added special tokens, unlike tokenizer.vocab_size

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        # Special tokens come from the template text itself (e.g. its bos_token).
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def _encode_pieces(self, rendered: list[list[Piece]]
                       ) -> list[tuple[list[int], list[bool], list[int]]]:
        """The whole rendered conversation encoded at once, as the model sees it at training
        time in HF/TRL; a token is supervised when its characters overlap a reply. (Byte-level
        BPEs merge across the end of the generation prompt: a reply that starts with a newline
        shares one token with the header's newline, so encoding pieces alone changes ids.)"""
        if not getattr(self._tok, "is_fast", False):  # no offsets: pieces on their own
            return super()._encode_pieces(rendered)
        if not rendered:
            return []
        texts = ["".join(text for text, _ in pieces) for pieces in rendered]
        encoded = self._tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for pieces, ids, offsets in zip(rendered, encoded["input_ids"],
                                        encoded["offset_mapping"]):
            spans, at = [], 0
            for text, supervised in pieces:
                if supervised:
                    spans.append((at, at + len(text)))
                at += len(text)
            mask = [any(lo < end and hi > start for start, end in spans) for lo, hi in offsets]
            reply = []
            if spans:
                start, end = spans[-1]
                reply = [i for i, (lo, hi) in zip(ids, offsets) if lo < end and hi > start]
            out.append((list(ids), mask, reply))
        return out

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def chat_pieces(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> list[Piece]:
        pieces: list[Piece] = []
        done = ""  # rendered text covered by pieces so far
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not upto.startswith(prompt):
                raise ValueError(
                    f"chat template of {self.name} is not prefix-stable at message {i}: the "
                    f"conversation up to it, rendered with the generation prompt, is not a "
                    f"prefix of the rendering that includes the reply, so the reply's tokens "
                    f"cannot be located; use a template that renders earlier turns unchanged")
            pieces += [(prompt[len(done):], False), (upto[len(prompt):], True)]
            done = upto
        if not messages or messages[-1]["role"] != "assistant" or add_generation_prompt:
            full = self._render(messages, add_generation_prompt)
            if not full.startswith(done):
                raise ValueError(f"chat template of {self.name} renders the conversation "
                                 f"differently from its prefixes; cannot locate replies")
            pieces.append((full[len(done):], False))
        return pieces


def load_tokenizer(config: TokenizerConfig | str) -> ChatTokenizer:
    """Tokenizer named by ``config`` (or a path): SentencePiece for a file, HF otherwise."""
    if isinstance(config, str):
        config = TokenizerConfig(path=config)
    path = os.path.expanduser(config.path)
    kind = config.kind
    if kind == "auto":
        kind = "sentencepiece" if os.path.isfile(path) else "hf"
    if kind == "sentencepiece":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.path {config.path} is not a SentencePiece "
                                    f".model file")
        return SentencePieceTokenizer(path)
    from transformers import AutoTokenizer

    local = os.path.isdir(path)
    tokenizer = AutoTokenizer.from_pretrained(
        path if local else config.path, trust_remote_code=config.trust_remote_code,
        local_files_only=local)
    if config.chat_template is not None:
        with open(os.path.expanduser(config.chat_template), encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    return HFTokenizer(tokenizer, config.path)
