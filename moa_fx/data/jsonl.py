"""Training data from a JSONL file: ``{"prompt", "completion"}`` or ``{"text"}`` lines, tokenized
with a Hugging Face tokenizer; a fixed tenth held out for evaluation."""

from __future__ import annotations

import json
import pathlib

import torch

from ..errors import InputError
from .batch import IGNORE_INDEX, Batch

__all__ = ["JsonlData"]


class JsonlData:
    """Lines of ``{"prompt": ..., "completion": ...}`` (loss on the completion) or ``{"text": ...}``."""

    def __init__(self, path: str | pathlib.Path, tokenizer, max_length: int = 256) -> None:
        self.path = pathlib.Path(path)
        self.name = str(path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"JsonlData max_length = {max_length!r} must be an integer >= 2")
        if not self.path.is_file():
            raise InputError(f"--data '{path}' does not exist; give a .jsonl file with one JSON object per line")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else int(pad)
        eos = tokenizer.eos_token_id
        rows: list[tuple[list[int], list[int]]] = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
                p = tokenizer(obj["prompt"], add_special_tokens=True)["input_ids"]
                c = tokenizer(obj["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                p, c = [], tokenizer(obj["text"], add_special_tokens=True)["input_ids"]
            else:
                raise InputError(f"{path}:{lineno}: each line needs string fields 'prompt' and 'completion', "
                                 "or 'text'")
            ids = (p + c)[:max_length]
            mask_from = min(len(p), len(ids))
            if len(ids) - mask_from < 1 or len(ids) < 2:
                continue
            rows.append((ids, [IGNORE_INDEX] * mask_from + ids[mask_from:]))
        if len(rows) < 2:
            raise InputError(f"--data '{path}' has fewer than 2 usable examples")
        # a fixed 10% (at least 1) held out for evaluation, chosen by a fixed permutation
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = max(1, len(rows) // 10)
        self.eval_rows = [rows[i] for i in order[:n_eval]]
        self.train_rows = [rows[i] for i in order[n_eval:]]
        self.seq_len = max(len(r[0]) for r in rows)

    def describe(self) -> str:
        return f"{self.path} ({len(self.train_rows)} train / {len(self.eval_rows)} held-out examples)"

    def _stack(self, rows) -> Batch:
        ids = torch.full((len(rows), self.seq_len), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return Batch(ids, mask, labels)

    def batch(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.train_rows), (batch_size,), generator=gen).tolist()
        return self._stack([self.train_rows[i] for i in idx])

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return [self._stack(self.eval_rows[i:i + batch_size]) for i in range(0, len(self.eval_rows), batch_size)]
