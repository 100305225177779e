"""Small things the examples and tests share: a corpus on disk, a tokenizer and a model built in code.

Nothing here downloads anything: the tokenizer is byte-level with no files, the model is built
from a config, and the corpus is written to local JSONL (or Parquet) files.
"""
from __future__ import annotations

import json
import os
import random

WORDS = ("stream data token sample epoch pass model train loss step batch shard file metric chart "
         "axis run time seen learn rate grad norm").split()


def write_corpus(folder: str, files: int = 3, lines_per_file=(40, 55, 47), seed: int = 0,
                 fmt: str = "jsonl") -> list[str]:
    """Write ``files`` files of short texts of varying length; return their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        n = lines_per_file[i % len(lines_per_file)]
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]
        path = os.path.join(folder, f"part-{i:03d}.{fmt}")
        if fmt == "jsonl":
            with open(path, "w") as f:
                for text in texts:
                    f.write(json.dumps({"text": text}) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": texts}), path)
        paths.append(path)
    return paths


def read_texts(paths: list[str]) -> list[str]:
    """The corpus as the files hold it, for ground truths computed apart from the library."""
    texts = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path) as f:
                texts += [json.loads(line)["text"] for line in f if line.strip()]
        else:
            import pyarrow.parquet as pq

            texts += pq.read_table(path).column("text").to_pylist()
    return texts


def byte_tokenizer(max_length: int = 64):
    """A byte-level tokenizer needing no files: 256 byte tokens plus <pad> (0) and <eos> (1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   model_max_length=max_length)
    return fast


def token_count(text: str, max_length: int = 64) -> int:
    """Tokens ``byte_tokenizer`` gives ``text`` (one per UTF-8 byte, truncated): the ground truth."""
    return min(len(text.encode("utf-8")), max_length)


def byte_collate(texts: list[str], max_length: int = 64) -> dict:
    """Texts as ``byte_tokenizer`` would give them, right-padded with 0: ids, attention mask and labels
    (-100 on padding), without a tokenizer object (a DataLoader's ``collate_fn``)."""
    import torch

    ids = [list(text.encode("utf-8"))[:max_length] for text in texts]
    width = max(len(seq) for seq in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq) + 2  # 0 and 1 are <pad> and <eos>
        mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def tiny_model(vocab_size: int = 258, seed: int = 0):
    """A one-layer Llama causal LM with a few thousand parameters, built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config)


def streaming_dataset(paths: list[str], tokenizer, max_length: int = 64):
    """The corpus streamed with ``datasets.load_dataset(..., streaming=True)`` and tokenized lazily."""
    import datasets

    fmt = "json" if paths[0].endswith(".jsonl") else "parquet"
    ds = datasets.load_dataset(fmt, data_files=paths, split="train", streaming=True)
    return ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                  batched=True, remove_columns=["text"])
