"""Supervised data for every WMSS phase: loading, tokenizers, tokenization, sampling, batching.

    tokenizer = load_tokenizer(TokenizerConfig(path="tok/sp.model"))
    data = tokenize_sft(DataConfig(paths=["train.jsonl"], max_length=2048), tokenizer)
    loader = build_sft_loader(data, config, pad_id=tokenizer.pad_id, dp_rank=r, dp_size=n)

Tokenizer training: ``python -m megatron_wmss.data.train_tokenizer`` (``train_sentencepiece``).
Importing this package loads neither ``datasets``, ``transformers`` nor ``torch``; each is
imported by the function that needs it.
"""

from megatron_wmss.data.collate import SFTDataset, build_sft_loader, collate_sft
from megatron_wmss.data.config import (
    OVERLENGTH_POLICIES,
    SCHEMAS,
    TOKENIZER_KINDS,
    DataConfig,
    TokenizerConfig,
)
from megatron_wmss.data.packing import IGNORE_INDEX
from megatron_wmss.data.sampler import DistributedEpochSampler, read_active_set, write_active_set
from megatron_wmss.data.schemas import DataFormatError, accepted_schemas, row_to_messages
from megatron_wmss.data.sources import load_sources
from megatron_wmss.data.tokenization import Status, TokenizedSFT, TokenizeSummary, tokenize_sft
from megatron_wmss.data.tokenizers import (
    ChatTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "OVERLENGTH_POLICIES",
    "SCHEMAS",
    "TOKENIZER_KINDS",
    "ChatTokenizer",
    "DataConfig",
    "DataFormatError",
    "DistributedEpochSampler",
    "HFTokenizer",
    "SFTDataset",
    "SentencePieceTokenizer",
    "Status",
    "TokenizeSummary",
    "TokenizedSFT",
    "TokenizerConfig",
    "accepted_schemas",
    "build_sft_loader",
    "collate_sft",
    "load_sources",
    "load_tokenizer",
    "read_active_set",
    "row_to_messages",
    "tokenize_sft",
    "write_active_set",
]
