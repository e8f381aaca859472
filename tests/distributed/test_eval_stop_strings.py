"""A stop string that is a special token ends generation in both lm-eval backends alike.

Chat tasks stop at the template's end-of-turn token (``<|im_end|>`` in ChatML), a special token
that is not EOS. lm-eval's ``hf`` backend looks for stop strings in the generated tokens decoded
*with* special tokens, so it stops there, and returns the text decoded *without* them. A scripted
model (tests/eval_fixtures.py) answers the two chat prompts with ``4<|im_end|> and then more
text`` and the plain prompt with `` 42 is it`` (then EOS each time). It is imported into a
megatron checkpoint and exported back to Hugging Face, so both backends run the same weights.
The megatron backend, one prompt at a time (KV cache) and all three prompts in one batch, at
TP=1 and TP=2, must return the ``hf`` backend's strings (batch size 1) exactly.

lm-eval's own ``hf`` backend breaks that rule in a batch: it stops only when every row has hit
the stop string, so in a batch of the three prompts the chat rows run on past ``<|im_end|>``
(the plain prompt never emits it) and return ``4 and then more text``. ``wmss eval --backend hf``
uses ``wmss-hf`` (megatron_wmss/evaluation/hf_backend.py), which must return the batch-size-1
strings at batch size 1 and 3 alike.
"""

from __future__ import annotations

import pytest

from megatron_wmss.testing import run_distributed
from tests.eval_fixtures import make_scripted_chat_model

pytest.importorskip("lm_eval")

END_OF_TURN = "<|im_end|>"
ANSWER = f"4{END_OF_TURN} and then more text"
SCRIPTS = [(f"<|im_start|>user\n{question}{END_OF_TURN}\n<|im_start|>assistant\n", ANSWER)
           for question in ("what is 2 + 2?", "and what is 3 + 3, please?")]
SCRIPTS.append(("The answer:", " 42 is it"))
NEW_TOKENS = 16
STOPS = {"end-of-turn": [END_OF_TURN], "none": []}


def _requests(until: list[str]):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (prompt, {"until": list(until),
                                                    "max_gen_toks": NEW_TOKENS,
                                                    "do_sample": False}), i)
            for i, (prompt, _) in enumerate(SCRIPTS)]


def _import_and_export(hf_dir: str, ckpt: str, exported: str) -> None:
    from megatron_wmss.interop import export_hf, import_hf

    import_hf(hf_dir, ckpt)
    export_hf(ckpt, exported)


def _megatron(ckpt: str) -> dict:
    from megatron_wmss.evaluation.backend import MegatronLM, load_eval_tokenizer
    from megatron_wmss.interop import read_model_metadata
    from megatron_wmss.interop.convert import load_checkpoint_model

    model, cfg = load_checkpoint_model(ckpt)
    tokenizer = load_eval_tokenizer(str(read_model_metadata(ckpt).tokenizer_dir))
    lm = MegatronLM(model, tokenizer, cfg.vocab_size, max_length=cfg.max_position_embeddings)
    out = {}
    for name, until in STOPS.items():
        lm.generate_batch_size = 1
        one = lm.generate_until(_requests(until), disable_tqdm=True)
        lm.generate_batch_size = len(SCRIPTS)
        out[name] = {"one": one, "batched": lm.generate_until(_requests(until), disable_tqdm=True)}
    return out


# lm-eval backend name and batch size of each hf-side run: lm-eval's own at batch size 1 (the
# reference), and the one `wmss eval --backend hf` uses, alone and in a mixed batch.
HF_RUNS = [("hf", 1), ("wmss-hf", 1), ("wmss-hf", len(SCRIPTS))]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(megatron checkpoint, {(backend, batch size): the hf-side texts per stop list})."""
    from lm_eval.api.registry import get_model

    import megatron_wmss.evaluation.hf_backend  # noqa: F401  (registers wmss-hf)

    root = tmp_path_factory.mktemp("scripted")
    hf, ckpt, exported = root / "hf", root / "megatron", root / "exported"
    make_scripted_chat_model(hf, SCRIPTS)
    run_distributed(_import_and_export, 1, tp=1, args=(str(hf), str(ckpt), str(exported)))
    texts = {}
    for backend, batch_size in HF_RUNS:
        lm = get_model(backend)(pretrained=str(exported), device="cpu", dtype="float32",
                                batch_size=batch_size)
        assert END_OF_TURN in lm.tokenizer.all_special_tokens
        assert lm.tokenizer.convert_tokens_to_ids(END_OF_TURN) != lm.tokenizer.eos_token_id
        texts[backend, batch_size] = {name: lm.generate_until(_requests(until), disable_tqdm=True)
                                      for name, until in STOPS.items()}
    return ckpt, texts


def test_wmss_hf_backend_stops_each_row_of_a_batch_as_at_batch_size_1(scripted):
    _, runs = scripted
    # lm-eval's hf backend cuts the chat answers at the end-of-turn token; without that stop it
    # generates past it (and drops the special token from the text).
    assert runs["hf", 1]["end-of-turn"] == ["4", "4", " 42 is it"]
    assert runs["hf", 1]["none"] == ["4 and then more text", "4 and then more text", " 42 is it"]
    for run in HF_RUNS[1:]:
        assert runs[run] == runs["hf", 1], run


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_backend_stops_at_a_special_token_as_the_hf_backend_does(scripted, tp):
    ckpt, runs = scripted
    ranks = run_distributed(_megatron, tp, tp=tp, args=(str(ckpt),))
    for run in HF_RUNS:
        for rank in ranks:
            for name, texts in runs[run].items():
                assert rank[name]["one"] == texts, (run, name, "one prompt at a time")
                assert rank[name]["batched"] == texts, (run, name, "batched")
