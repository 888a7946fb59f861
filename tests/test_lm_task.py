"""The wordnet-minilm task (issue 17) on the shipped WordNet excerpt: the loader, the MiniLM + LoRA
model's GGN factors against finite differences, and one training step of TNGD-Adam and Adam.

Needs the ``[lm]`` extra (transformers, peft, the MiniLM wheel); not the Debian package: every
test reads ``tests/fixtures/wordnet``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from host.curvature import torch_curvature
from host.pool import PoolConfig
from host.tasks import train
from host.tasks_lm import (
    LABELS,
    PAD_ID,
    load_wordnet,
    minilm_lora_classifier,
    parse_data_noun,
    split_balanced,
    wordnet_file,
)
from protocol.errors import InvalidInputError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wordnet"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():  # 30 train + 10 test glosses per category, 16 tokens
    return load_wordnet(FIXTURE, n_train=30, n_test=10, max_len=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return minilm_lora_classifier()


def test_parser_reads_the_six_categories_and_strips_examples() -> None:
    syn = parse_data_noun(FIXTURE / "data.noun")
    counts = {c: sum(s.category == c for s in syn) for c in LABELS}
    assert counts == dict.fromkeys(LABELS, 40)  # the 5 synsets of other lexicographer files skipped
    by_lemma = {s.lemma: s for s in syn}
    assert by_lemma["exhumation"].category == "act"
    assert by_lemma["exhumation"].text == ("exhumation: the act of digging something out of the ground "
                                           "(especially a corpse) where it has been buried")
    # the quoted example goes, the gloss's own clauses stay; underscores become spaces
    tazir = by_lemma["Tazir crime"]
    assert tazir.gloss.startswith("(Islam) minor crimes committed by Muslims; crimes that are not")
    assert '"' not in tazir.gloss and tazir.gloss.endswith("appropriate way")


def test_split_is_balanced_disjoint_and_seeded() -> None:
    syn = parse_data_noun(FIXTURE / "data.noun")
    tr, te = split_balanced(syn, 30, 10, seed=0)
    assert len(tr) == 180 and len(te) == 60
    assert {s.text for s in tr}.isdisjoint({s.text for s in te})
    assert all(sum(s.category == c for s in te) == 10 for c in LABELS)
    assert split_balanced(syn, 30, 10, seed=0) == (tr, te)
    assert split_balanced(syn, 30, 10, seed=1) != (tr, te)


def test_loader_tokenises(data) -> None:
    assert data.x_train.shape == (180, 16) and data.x_test.shape == (60, 16) and data.n_classes == 6
    assert np.bincount(data.y_train).tolist() == [30] * 6
    ids = data.x_train.astype(np.int64)
    assert np.array_equal(ids, data.x_train)  # token ids survive the Dataset's float32
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert ((ids == 102).sum(1) == 1).all()  # one [SEP] per row, truncated or not
    assert (ids == PAD_ID).any() and ids.max() < 30522


def test_missing_wordnet_is_one_line_naming_the_package(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as err:
        wordnet_file(tmp_path)
    msg = str(err.value)
    assert "wordnet-base" in msg and "apt-get install wordnet-base" in msg and "\n" not in msg
    with pytest.raises(InvalidInputError, match="wordnet-base"):
        load_wordnet(tmp_path / "nowhere")


def test_only_the_adapters_and_head_are_parameters(model) -> None:
    named = dict(model.named_parameters())
    assert all(".lora_" in n or n.startswith("head.") for n in named)
    # r = 2 on Q, K, V and the attention output of 6 layers (384 wide): 24 x (2x384 + 384x2), + head
    assert sum(p.numel() for p in named.values()) == 24 * 2 * 768 + 384 * 6 + 6 == 39174
    assert sum(b.numel() for b in model.buffers()) > 22_000_000  # the frozen MiniLM, as constants


def test_ggn_factors_match_finite_differences(data, model) -> None:
    """J (per-sample output Jacobians) against central differences of the model along a random
    direction, the gradient against autograd, and the factor shapes of GGN and empirical Fisher."""
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at initialisation would zero the columns of A: move off it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    x = torch.from_numpy(data.x_train[:3])
    y = torch.from_numpy(data.y_train[:3])
    c = torch_curvature(model, x, y)
    n = 39174
    assert c.J.shape == (3 * 6, n) and c.H.shape == (18, 18) and c.grad.shape == (n,)
    assert np.allclose(c.H, c.H.T) and np.linalg.eigvalsh(c.H).min() > -1e-12
    params = [p for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    scale = float(torch.sqrt(sum((t ** 2).sum() for t in v)))
    eps = 1e-2
    outs = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.add_(sign * eps * d / scale)
            outs.append(model(x).double().numpy())
            for p, d in zip(params, v, strict=True):
                p.sub_(sign * eps * d / scale)
    fd = ((outs[0] - outs[1]) / (2 * eps)).reshape(-1)
    jv = c.J @ np.concatenate([t.reshape(-1).double().numpy() for t in v]) / scale
    assert np.linalg.norm(jv) > 1e-3
    assert np.linalg.norm(fd - jv) < 2e-2 * np.linalg.norm(jv), (fd, jv)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    auto = np.concatenate([p.grad.reshape(-1).double().numpy() for p in params])
    assert np.abs(c.grad - auto).max() < 1e-5 * max(1.0, np.abs(auto).max())
    ef = torch_curvature(model, x, y, kind="empirical")
    assert ef.J.shape == (3, n) and ef.H.shape == (3, 3)
    assert np.allclose(ef.J.sum(0) / 3, c.grad, atol=1e-6)  # mean of the per-sample gradients


@pytest.mark.parametrize("optimizer", ["tngd-adam", "adam"])
def test_one_training_step(data, optimizer: str) -> None:
    """One step from the registered task on the fixture: TNGD-Adam on the ideal emulator in
    tiles (N = 39,174 > its 4096 cells), Adam for comparison; the loss is finite and the
    adapters moved."""
    rec = train("wordnet-minilm", optimizer, steps=1, batch_size=8, data=data, eval_every=1,
                pool=PoolConfig(tiles="chunk") if optimizer == "tngd-adam" else None)
    assert rec.n_params == 39174 and len(rec.loss) == 1 and np.isfinite(rec.loss[0])
    assert 1.0 < rec.loss[0] < 3.0  # about ln 6 at a fresh head
    assert 0.0 <= rec.test_accuracy[0] <= 1.0 and rec.status == "ok"
    if optimizer == "tngd-adam":
        assert rec.hparams["analog_time"] == 0.4 and rec.hparams["damping"] == 1.0  # the task's defaults
        assert rec.emulator_s[0] > 0.0 and rec.tiles["info"]["tiles"]["tiles"] == 10


def test_registered_lazily_without_importing_transformers() -> None:
    code = ("import sys, host.tasks as t; assert 'wordnet-minilm' in t.TASKS; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules; "
            "task = t.TASKS['wordnet-minilm']; assert task.batch_size == 16; "
            "assert 'transformers' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
