"""The training loops: lora, fine_tune, rlhf (DPO) and distillation, one optimizer step at a time.

A trainer owns a LlamaTorch model, its optimizer and its examples; the runner calls `step(n)`
for each step and `checkpoint()` / `restore()` around restarts. Batches are drawn with an RNG
seeded by (seed, step), and nothing else is random after construction, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.

- lora: cross-entropy on the target tokens, only the adapters train; writes a LoRA adapter.
- fine_tune: the same loss, every tensor trains; writes a whole GGUF.
- rlhf: DPO (Rafailov et al. 2023) on prompt/chosen/rejected with LoRA adapters as the policy
  and the base (adapters off) as the reference: `-log sigmoid(beta * (dc - dr))` where `dc`,
  `dr` are policy-minus-reference log-likelihoods of the completions; writes a LoRA adapter.
- distillation: KL(teacher || student) of the next-token distributions on the target tokens,
  every student tensor trains; writes a whole GGUF. Teacher and student share the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from actors.learning.datasets import Dataset
from actors.learning.errors import UnsupportedModel
from actors.learning.export import write_lora_adapter, write_model_gguf
from actors.learning.llama_torch import LlamaTorch
from actors.learning.lora import LoraAdapter, attach_lora, lora_parameters
from actors.learning.spec import TrainParams
from actors.learning.tokenizer import Tokenizer

_CLIP = 1.0  # gradient-norm clip: keeps a bad batch from wrecking small models


@dataclass(frozen=True, slots=True)
class Example:
    """One training sequence; `mask[i]` says whether token i (i >= 1) is a target."""

    tokens: tuple[int, ...]
    mask: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class Pair:
    """A preference pair: the same prompt with the chosen and the rejected completion."""

    chosen: Example
    rejected: Example


def _completion(tok: Tokenizer, prompt: str, completion: str, seq_len: int) -> Example:
    head = tok.encode(prompt, bos=True)
    tail = tok.encode(completion) + ([tok.eos] if tok.eos is not None else [])
    tokens = (head + tail)[: seq_len + 1]
    mask = ([False] * len(head) + [True] * len(tail))[: seq_len + 1]
    return Example(tuple(tokens), tuple(mask))


def build_examples(dataset: Dataset, tok: Tokenizer, seq_len: int) -> list[Example] | list[Pair]:
    """Tokenize a dataset with the model's own tokenizer into examples of <= seq_len + 1 tokens."""
    if dataset.kind == "text":
        stream: list[int] = []
        for r in dataset.records:
            stream += tok.encode(r["text"], bos=True) + ([tok.eos] if tok.eos is not None else [])
        out: list[Example] = []
        for start in range(0, max(len(stream) - 1, 1), seq_len):
            chunk = stream[start : start + seq_len + 1]
            if len(chunk) >= 2:
                out.append(Example(tuple(chunk), (False,) + (True,) * (len(chunk) - 1)))
        return out
    if dataset.kind == "prompt_completion":
        return [_completion(tok, r["prompt"], r["completion"], seq_len) for r in dataset.records]
    return [
        Pair(
            _completion(tok, r["prompt"], r["chosen"], seq_len),
            _completion(tok, r["prompt"], r["rejected"], seq_len),
        )
        for r in dataset.records
    ]


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Split off a held-out set (a seeded shuffle); both halves non-empty when there are 2+."""
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(items))
    n_eval = int(round(len(items) * fraction))
    n_eval = min(max(n_eval, 1), len(items) - 1) if fraction > 0 and len(items) >= 2 else 0
    held = [items[i] for i in order[:n_eval]]
    train = [items[i] for i in order[n_eval:]]
    return train, held


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to one length: (inputs (B, T-1), targets (B, T-1), target mask (B, T-1))."""
    width = max(len(e.tokens) for e in examples)
    tokens = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = torch.tensor(e.tokens)
        mask[i, : len(e.mask)] = torch.tensor(e.mask)
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def sequence_logps(model: LlamaTorch, examples: list[Example]) -> torch.Tensor:
    """Return each example's summed log-likelihood of its target tokens."""
    inputs, targets, mask = collate(examples)
    logp = torch.log_softmax(model(inputs), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def cross_entropy(model: LlamaTorch, examples: list[Example]) -> torch.Tensor:
    """Return the mean cross-entropy over every target token of `examples`."""
    inputs, targets, mask = collate(examples)
    logits = model(inputs)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Trainer:
    """Shared machinery: the optimizer, seeded batches, checkpoints."""

    kind = "base"

    def __init__(self, model: LlamaTorch, tp: TrainParams, train: list[Any], held: list[Any]):
        if not train:
            raise UnsupportedModel("the dataset gives no training examples after tokenizing")
        self.model = model
        self.tp = tp
        self.train_items = train
        self.held = held or train
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokens_per_step = 0

    # -- to override ----------------------------------------------------------------------------

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Return the trained tensors by a stable name."""
        raise NotImplementedError

    def loss(self, batch: list[Any]) -> torch.Tensor:
        """Return the training loss of one batch."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Return the held-out metrics (lower `eval_loss` is better)."""
        raise NotImplementedError

    def export(self, path: Path, base_path: Path, name: str) -> Path:
        """Write the result to `path` as a GGUF and return it."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            params = list(self.trainable().values())
            self.optimizer = torch.optim.Adam(params, lr=self.tp.lr)
        return self.optimizer

    def batch(self, step: int) -> list[Any]:
        """Return the batch of step `step` (a function of seed and step only)."""
        rng = np.random.default_rng([self.tp.seed, step])
        n = len(self.train_items)
        idx = rng.choice(n, size=self.tp.batch_size, replace=n < self.tp.batch_size)
        return [self.train_items[int(i)] for i in idx]

    def step(self, step: int) -> float:
        """Take optimizer step `step` (1-based) and return its training loss."""
        opt = self._optimizer()
        self.model.train()
        batch = self.batch(step)
        opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(list(self.trainable().values()), _CLIP)
        opt.step()
        self.tokens_per_step = sum(_n_tokens(b) for b in batch)
        return float(loss.detach())

    def checkpoint(self) -> dict[str, Any]:
        """Return the trained tensors and the optimizer state (what a resume needs)."""
        return {
            "tensors": {n: p.detach().clone() for n, p in self.trainable().items()},
            "optimizer": self._optimizer().state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint written by `checkpoint`."""
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(state["tensors"][name])
        self._optimizer().load_state_dict(state["optimizer"])


def _n_tokens(item: Any) -> int:
    if isinstance(item, Pair):
        return len(item.chosen.tokens) + len(item.rejected.tokens)
    return len(item.tokens)


class _LoraMixin:
    model: LlamaTorch
    tp: TrainParams
    adapters: dict[str, LoraAdapter]

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{n}.lora_{ab}": getattr(self.adapters[n], ab)
            for n in sorted(self.adapters)
            for ab in ("a", "b")
        }

    def export(self, path: Path, base_path: Path, name: str) -> Path:
        tensors = {
            n: (a.a.detach().numpy(), a.b.detach().numpy()) for n, a in self.adapters.items()
        }
        return write_lora_adapter(
            path, arch=self.model.params.arch, alpha=self.tp.lora_alpha, tensors=tensors, name=name
        )


class _FullMixin:
    model: LlamaTorch

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: self.model.weight(n) for n in self.model.names()}

    def export(self, path: Path, base_path: Path, name: str) -> Path:
        return write_model_gguf(base_path, path, self.model.state_arrays(), name=name)


class _LanguageModelling(Trainer):
    def loss(self, batch: list[Any]) -> torch.Tensor:
        return cross_entropy(self.model, batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in _chunks(self.held, self.tp.batch_size):
            n = sum(sum(e.mask[1:]) for e in chunk)
            total += float(cross_entropy(self.model, chunk)) * n
            count += n
        return {"eval_loss": total / max(count, 1)}


class LoraTrainer(_LoraMixin, _LanguageModelling):
    """Train LoRA adapters with next-token cross-entropy."""

    kind = "lora"

    def __init__(self, model: LlamaTorch, tp: TrainParams, train: list[Any], held: list[Any]):
        super().__init__(model, tp, train, held)
        self.adapters = attach_lora(model, rank=tp.lora_rank, alpha=tp.lora_alpha, seed=tp.seed)
        assert lora_parameters(self.adapters)


class FineTuneTrainer(_FullMixin, _LanguageModelling):
    """Train every tensor with next-token cross-entropy."""

    kind = "fine_tune"

    def __init__(self, model: LlamaTorch, tp: TrainParams, train: list[Any], held: list[Any]):
        super().__init__(model, tp, train, held)
        model.set_trainable(model.names())


class DpoTrainer(_LoraMixin, Trainer):
    """Direct preference optimisation with LoRA adapters; the reference is the base model."""

    kind = "rlhf"

    def __init__(self, model: LlamaTorch, tp: TrainParams, train: list[Any], held: list[Any]):
        super().__init__(model, tp, train, held)
        model.eval()
        # Reference log-likelihoods of the base, computed once before any adapter exists.
        self.ref: dict[int, tuple[float, float]] = {}
        with torch.no_grad():
            for chunk in _chunks(list({id(p): p for p in train + self.held}.values()), 16):
                c = sequence_logps(model, [p.chosen for p in chunk])
                r = sequence_logps(model, [p.rejected for p in chunk])
                for p, lc, lr in zip(chunk, c.tolist(), r.tolist(), strict=True):
                    self.ref[id(p)] = (lc, lr)
        self.adapters = attach_lora(model, rank=tp.lora_rank, alpha=tp.lora_alpha, seed=tp.seed)

    def _terms(self, batch: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = sequence_logps(self.model, [p.chosen for p in batch])
        rejected = sequence_logps(self.model, [p.rejected for p in batch])
        ref = torch.tensor([self.ref[id(p)] for p in batch])
        logits = self.tp.beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))
        return logits, chosen - rejected

    def loss(self, batch: list[Any]) -> torch.Tensor:
        logits, _ = self._terms(batch)
        return -F.logsigmoid(logits).mean()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        logits, margins = self._terms(self.held)
        return {
            "eval_loss": float(-F.logsigmoid(logits).mean()),
            "margin": float(margins.mean()),
            "accuracy": float((margins > 0).float().mean()),
        }


class DistillTrainer(_FullMixin, Trainer):
    """Match the student's next-token distribution to the teacher's (KL, temperature 1)."""

    kind = "distillation"

    def __init__(
        self,
        model: LlamaTorch,
        tp: TrainParams,
        train: list[Any],
        held: list[Any],
        teacher: LlamaTorch,
    ):
        super().__init__(model, tp, train, held)
        if teacher.params.n_vocab != model.params.n_vocab:
            raise UnsupportedModel(
                f"teacher has {teacher.params.n_vocab} tokens, student {model.params.n_vocab}; "
                "distillation needs one vocabulary"
            )
        self.teacher = teacher.eval()
        model.set_trainable(model.names())

    def kl(self, batch: list[Example]) -> torch.Tensor:
        """Return the mean KL(teacher || student) over the target positions of `batch`."""
        inputs, _, mask = collate(batch)
        with torch.no_grad():
            t_logp = torch.log_softmax(self.teacher(inputs), dim=-1)
        s_logp = torch.log_softmax(self.model(inputs), dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        return (kl * mask).sum() / mask.sum().clamp(min=1)

    def loss(self, batch: list[Any]) -> torch.Tensor:
        return self.kl(batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in _chunks(self.held, self.tp.batch_size):
            n = sum(sum(e.mask[1:]) for e in chunk)
            total += float(self.kl(chunk)) * n
            count += n
        return {"eval_loss": total / max(count, 1), "kl": total / max(count, 1)}


def make_trainer(
    job_type: str,
    model: LlamaTorch,
    tp: TrainParams,
    items: list[Any],
    teacher: LlamaTorch | None = None,
) -> Trainer:
    """Build the trainer for `job_type`, splitting `items` into training and held-out sets."""
    train, held = split_eval(items, tp.eval_fraction, tp.seed)
    if job_type == "lora":
        return LoraTrainer(model, tp, train, held)
    if job_type == "fine_tune":
        return FineTuneTrainer(model, tp, train, held)
    if job_type == "rlhf":
        return DpoTrainer(model, tp, train, held)
    if job_type == "distillation":
        if teacher is None:
            raise UnsupportedModel("distillation needs a teacher model")
        return DistillTrainer(model, tp, train, held, teacher)
    raise UnsupportedModel(f"unknown job type {job_type!r}")
