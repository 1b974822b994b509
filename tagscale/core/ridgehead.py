"""A head solved in closed form while the tags train (`head.fit: closed_form` and `crossfit`).

Why: with a head started at the ridge probe and then trained by gradient, the residual the tags follow is the
residual of a fit made on those same training records, largely that sample's noise (docs/learning.md). Here the
head is no trainable parameter. It is a ridge solution on a *support set*: the features (final hidden states at
the function tag) of every training record of the head, held as a cache that each micro-batch refreshes with the
features its records have under the current tags. The tags follow an out-of-sample error of that solution:

- `closed_form` (variable projection): ridge on the whole support, the current rows included with their gradient,
  and the loss is the mean square of the exact leave-one-out residuals e_i / (1 - h_ii) of the current rows.
  Gradients reach the tags through the rows' features and through the solve (its Gram statistics).
- `crossfit`: K folds of the support; a row of fold k is predicted by the ridge solution on the other folds (no
  gradient through that solve: the head is fixed for the row, as a cross-fitted nuisance is).

The penalty is the probe's (chosen on validation at the start, `eval.ridge.ridge_fit`), in Gram units. The head a
validation step scores is the solution on the whole support cache; the run's saved head is refitted on every
training record at the kept step (`eval.probe.finish_closed_form_heads`), so run folders, predict and evaluate see
an ordinary linear head. Pure torch: the collectives come in as callables (`tagscale.runtime.distributed.dist` owns them).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch


class Collectives(NamedTuple):
    """What a support set needs of the process group (`tagscale.runtime.distributed.dist` makes them: `dist.ridge_collectives`)."""

    rank: int
    gather: Callable[[object], list]
    """Every rank's object, in rank order (`dist.all_gather_objects`)."""
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
    """A differentiable sum over ranks (`dist.all_reduce_sum_differentiable`): its backward sums the gradients."""


ONE_PROCESS = Collectives(0, lambda obj: [obj], lambda t: t)
"""A single process: nothing to gather or reduce."""


class Stats(NamedTuple):
    """The sufficient statistics of a ridge fit with a free intercept over some rows: count, sums, Gram matrices."""

    n: torch.Tensor
    sx: torch.Tensor  # (d,)
    sy: torch.Tensor  # (k,)
    sxx: torch.Tensor  # (d, d)
    sxy: torch.Tensor  # (d, k)

    def __add__(self, other: "Stats") -> "Stats":  # type: ignore[override]
        return Stats(*(a + b for a, b in zip(self, other)))

    def __sub__(self, other: "Stats") -> "Stats":
        return Stats(*(a - b for a, b in zip(self, other)))

    def flat(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in self])

    @staticmethod
    def unflat(flat: torch.Tensor, d: int, k: int) -> "Stats":
        sizes = [1, d, k, d * d, d * k]
        parts = torch.split(flat, sizes)
        return Stats(parts[0][0], parts[1], parts[2], parts[3].reshape(d, d), parts[4].reshape(d, k))


def stats(x: torch.Tensor, y: torch.Tensor) -> Stats:
    """Statistics of rows x (m, d) with targets y (m, k), in float64."""
    x, y = x.double(), y.double()
    return Stats(x.new_tensor(float(x.shape[0])), x.sum(0), y.sum(0), x.T @ x, x.T @ y)


class Solution(NamedTuple):
    """A ridge solution: predictions x @ w + b; `chol` is the Cholesky factor of centred Gram + penalty * I."""

    w: torch.Tensor  # (d, k)
    b: torch.Tensor  # (k,)
    mean_x: torch.Tensor
    n: torch.Tensor
    chol: torch.Tensor


def solve(s: Stats, penalty: float) -> Solution:
    """Ridge with a free (unpenalised) intercept: w = (Xc^T Xc + penalty I)^-1 Xc^T yc, b = mean y - mean x @ w."""
    mean_x, mean_y = s.sx / s.n, s.sy / s.n
    gram = s.sxx - s.n * torch.outer(mean_x, mean_x)
    cross = s.sxy - s.n * torch.outer(mean_x, mean_y)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(0.5 * (gram + gram.T) + penalty * eye)
    w = torch.cholesky_solve(cross, chol)
    return Solution(w, mean_y - mean_x @ w, mean_x, s.n, chol)


def loo_residuals(sol: Solution, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact leave-one-out residuals e_i / (1 - h_ii) of rows (x, y) that are part of the fit `sol`:
    h_ii = 1/n + (x_i - mean x)^T (Xc^T Xc + penalty I)^-1 (x_i - mean x), the ridge hat matrix's diagonal with a
    free intercept. (m, k)."""
    x, y = x.double(), y.double()
    centred = x - sol.mean_x
    leverage = 1.0 / sol.n + (centred * torch.cholesky_solve(centred.T, sol.chol).T).sum(1)
    return (y - x @ sol.w - sol.b) / (1.0 - leverage)[:, None]


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """Each support row's fold: a seeded permutation cut into `folds` near-equal parts."""
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng([seed, 7]).permutation(n)] = np.arange(n) % folds
    return out


class SupportSet:
    """A closed-form head's support: every training record's features (a cache refreshed as batches pass), its
    targets in the head's units (standardised labels, or one-hot classes), the probe's penalty, and the head the
    run started at (what it keeps when validation keeps step 0)."""

    def __init__(self, mode: str, features: np.ndarray, targets: np.ndarray, penalty: float,
                 offsets: dict[int, int], start_weight: torch.Tensor, start_bias: torch.Tensor,
                 temperature: float = 1.0, folds: int = 5, seed: int = 0):
        if mode not in ("closed_form", "crossfit"):
            raise ValueError(f"unknown closed-form head mode {mode!r}")
        self.mode = mode
        self.features = torch.as_tensor(np.asarray(features), dtype=torch.float64).clone()
        targets = np.asarray(targets, dtype=np.float64)
        self.targets = torch.as_tensor(targets.reshape(len(targets), -1)).clone()
        self.penalty = float(penalty)
        """lambda in Gram units: the solve is (Xc^T Xc + lambda I) w = Xc^T yc."""
        self.offsets = dict(offsets)
        """Task index -> the support row of that task's training example 0 (tasks sharing a head stack up)."""
        self.start_weight, self.start_bias = start_weight.detach().clone(), start_bias.detach().clone()
        self.temperature = float(temperature)
        """A classifier's logits are temperature * one-hot ridge scores (`eval.ridge.classifier_start`)."""
        self.folds = fold_of(len(self.features), folds, seed) if mode == "crossfit" else None

    # -- rows -----------------------------------------------------------------------------------
    def rows(self, tasks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Support rows of (task, row-in-task) pairs."""
        offsets = torch.tensor([self.offsets[int(t)] for t in tasks.tolist()], dtype=torch.long)
        return offsets + rows.cpu().long()

    # -- training ----------------------------------------------------------------------------------
    def loss(self, z: torch.Tensor, rows: torch.Tensor, comm: Collectives = ONE_PROCESS) -> torch.Tensor:
        """The summed squared out-of-sample residuals (mean over outputs) of this rank's rows `rows` whose current
        features are `z` (m, d); refreshes the cache with every rank's current rows. Collective: every rank calls it
        on every micro-batch, with zero rows too."""
        everyone = comm.gather((rows.tolist(), z.detach().double().cpu().numpy()))
        all_rows = [r for part_rows, _ in everyone for r in part_rows]
        for part_rows, values in everyone:  # every rank's cache sees every rank's current features
            if part_rows:
                self.features[torch.tensor(part_rows)] = torch.as_tensor(values)
        y = self.targets[rows]
        if self.mode == "crossfit":
            return self._crossfit_loss(z, rows, y)
        current = torch.zeros(len(self.features), dtype=torch.bool)
        if all_rows:
            current[torch.tensor(all_rows, dtype=torch.long)] = True
        rest = stats(self.features[~current], self.targets[~current])
        # this rank's rows, each counted once (a record twice in a global batch: its first place, rank order)
        first_place = {}
        for place, r in enumerate(all_rows):
            first_place.setdefault(r, place)
        start = sum(len(part_rows) for part_rows, _ in everyone[:comm.rank])
        counted = torch.tensor([first_place[r] == start + i for i, r in enumerate(rows.tolist())], dtype=torch.bool)
        zd = z.double().to("cpu")
        mine = stats(zd[counted], y[counted])
        d, k = self.features.shape[1], self.targets.shape[1]
        total = rest + Stats.unflat(comm.sum_over_ranks(mine.flat()), d, k)
        residuals = loo_residuals(solve(total, self.penalty), zd, y)
        return residuals.pow(2).mean(1).sum()

    def _crossfit_loss(self, z: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row predicted by the ridge fit on the support's other folds (the cache as refreshed), no gradient
        through the fit."""
        if len(rows) == 0:
            return z.sum() * 0.0
        zd = z.double().to("cpu")
        total = stats(self.features, self.targets)
        out = zd.new_zeros(())
        fold = torch.as_tensor(self.folds)[rows]
        for f in fold.unique().tolist():
            inside = torch.as_tensor(self.folds == f)
            with torch.no_grad():
                sol = solve(total - stats(self.features[inside], self.targets[inside]), self.penalty)
            at = fold == f
            out = out + (y[at] - zd[at] @ sol.w - sol.b).pow(2).mean(1).sum()
        return out

    # -- the head a step is scored with ---------------------------------------------------------------
    @torch.no_grad()
    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (k, d), bias (k,)) of the ridge solution on the whole support cache, in the head's units."""
        sol = solve(stats(self.features, self.targets), self.penalty)
        w, b = sol.w.T.float(), sol.b.float()
        return self.temperature * w, self.temperature * b

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "features": self.features.clone(), "targets": self.targets.clone(),
                "penalty": self.penalty, "offsets": self.offsets, "start_weight": self.start_weight,
                "start_bias": self.start_bias, "temperature": self.temperature, "folds": self.folds}

    @classmethod
    def from_state(cls, state: dict) -> "SupportSet":
        out = cls.__new__(cls)
        out.mode, out.features, out.targets = state["mode"], state["features"].clone(), state["targets"].clone()
        out.penalty, out.offsets = state["penalty"], dict(state["offsets"])
        out.start_weight, out.start_bias = state["start_weight"], state["start_bias"]
        out.temperature, out.folds = state["temperature"], state["folds"]
        return out


def support_targets(head_type: str, outputs: int, labels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A head's support targets in its own units: standardised labels (regression) or one-hot classes."""
    if head_type == "classification":
        return np.eye(outputs)[np.asarray(labels, dtype=int)]
    return ((np.asarray(labels, dtype=np.float64) - mean) / std)[:, None]
