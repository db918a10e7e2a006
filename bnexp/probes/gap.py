"""The train/inference discrepancy on the test set (docs/design.md section 2): f_train, the network with
batch statistics (no updates) on test batches of the training batch size, against f_eval, `model.eval()`.

    gap/accuracy = acc(f_train) − acc(f_eval)
    gap/logits   = mean over batches ‖f_train − f_eval‖_F / ‖f_eval‖_F
    gap/kl       = mean KL(softmax(f_train) ‖ softmax(f_eval))

plus gap/train_mode_accuracy and gap/eval_mode_accuracy themselves. A regression task has no accuracy
and no softmax: gap/loss = MSE(f_train) − MSE(f_eval), gap/train_mode_loss, gap/eval_mode_loss and
gap/logits (of its outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAGS = ["gap/accuracy", "gap/logits", "gap/kl", "gap/train_mode_accuracy", "gap/eval_mode_accuracy"]
REGRESSION_TAGS = ["gap/loss", "gap/logits", "gap/train_mode_loss", "gap/eval_mode_loss"]


def gap_batch_size(n: int, m: int, ghost_batch_size: int | None = None) -> int:
    """The size of the training-mode test batches of the gap, for n test examples and training batch size m.

    The training batch size m; a test set smaller than m is one batch of n. Ghost BN normalizes a batch as
    virtual batches of k and accepts a batch larger than k only as a multiple of k (a training batch always
    is one): a smaller test set is then covered by batches of the largest multiple of k it holds, so each
    test example is normalized within a virtual batch of k, as a training example is.
    """
    s = min(n, m)
    k = ghost_batch_size
    return s - s % k if k is not None and s > k else s


def cover_in_batches(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cover n test examples with batches of exactly m: indices (G, m) and a mask of the rows that count.

    The last batch is the final m examples, overlapping its predecessor, so every example gets a
    train-mode prediction from a batch of the training batch size and is counted once; the kept rows, in
    order, are examples 0..n-1. A test set smaller than m is one batch of n.
    """
    if n <= m:
        return torch.arange(n).view(1, n), torch.ones(n, dtype=torch.bool)
    starts = list(range(0, n - m + 1, m))
    covered = starts[-1] + m
    if covered < n:
        starts.append(n - m)
    idx = torch.stack([torch.arange(s, s + m) for s in starts])
    keep = torch.ones_like(idx, dtype=torch.bool)
    if covered < n:
        keep[-1, : covered - (n - m)] = False  # already predicted by the batch before
    return idx, keep.flatten()


def gap_values(test_logits: torch.Tensor, f_eval: torch.Tensor, y: torch.Tensor, test_idx: torch.Tensor,
               test_keep: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """`test_logits` (G, m, outputs): f_train of the batches `test_idx` covers; `f_eval` of the test set;
    float targets `y` are a regression."""
    # ‖f_train − f_eval‖_F / ‖f_eval‖_F per test batch as it was run, then the mean over batches.
    tr = test_logits
    ev = f_eval[test_idx.flatten()].view_as(tr)
    f_train = tr.reshape(-1, tr.shape[-1])[test_keep]  # each test example once, in order
    ratio = torch.linalg.vector_norm(tr - ev, dim=(1, 2)) / torch.linalg.vector_norm(ev, dim=(1, 2))
    if y.is_floating_point():
        loss_train = F.mse_loss(f_train.double(), y.double())
        loss_eval = F.mse_loss(f_eval.double(), y.double())
        return REGRESSION_TAGS, torch.stack([loss_train - loss_eval, ratio.mean().double(), loss_train, loss_eval])
    acc_train = (f_train.argmax(1) == y).double().mean()
    acc_eval = (f_eval.argmax(1) == y).double().mean()
    log_train, log_eval = F.log_softmax(f_train.double(), 1), F.log_softmax(f_eval.double(), 1)
    kl = F.kl_div(log_eval, log_train, log_target=True, reduction="none").sum(1).mean()
    return TAGS, torch.stack([acc_train - acc_eval, ratio.mean(), kl, acc_train, acc_eval])


def layout(regression: bool = False) -> dict[str, list]:
    """The network's gap: train mode against eval mode on one chart, and each measure of the gap on its own
    (their units differ)."""
    if regression:
        return {"loss: train mode vs eval mode": ["Multiline", ["gap/train_mode_loss", "gap/eval_mode_loss"]],
                "gap/loss (train - eval)": ["Multiline", ["gap/loss"]],
                "gap/logits (relative)": ["Multiline", ["gap/logits"]]}
    return {"accuracy: train mode vs eval mode": ["Multiline", ["gap/train_mode_accuracy", "gap/eval_mode_accuracy"]],
            "gap/accuracy (train - eval)": ["Multiline", ["gap/accuracy"]],
            "gap/logits (relative)": ["Multiline", ["gap/logits"]],
            "gap/kl (train ‖ eval)": ["Multiline", ["gap/kl"]]}


def layer_layout(bn_names: list[str]) -> dict[str, list]:
    """Batch Renorm's d and r of each layer, a chart each (r is about 1, d about 0)."""
    return {f"{name} {q}": ["Multiline", [f"gap/{name}/{q}"]] for name in bn_names for q in ("d", "r")}
