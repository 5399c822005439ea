"""Ensemble selection (Caruana et al. 2004, as AutoGluon and auto-sklearn do after their searches): greedy forward
selection, with replacement, of the trials whose averaged validation probabilities score best. A trial picked
again counts again, so the picks are the members' weights; complementary trials are picked over near copies of
the best one. Plain arithmetic on probability tables, tested with hand-made ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

ROUNDS = 10  # fixed: more rounds only refine weights below a tenth
KEPT_PREDICTIONS = "val_predictions.npz"  # in each trial's folder: its validation probabilities at its best


@dataclass(frozen=True)
class Selection:
    weights: dict[str, int]  # trial id -> times picked in the rounds kept, in the order first picked
    path: list[tuple[str, float]]  # each round: the trial added and the ensemble's score after it
    kept: int  # the rounds kept: those up to the best score (later ones only fit the validation set's noise)


def ensemble_score(probabilities: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """val_acc: the share whose top class is right; val_loss: the mean negative log-likelihood (cross-entropy)."""
    if metric == "val_acc":
        return float((probabilities.argmax(1) == labels).mean())
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def greedy_selection(tables: Mapping[str, np.ndarray], labels: np.ndarray, metric: str, rounds: int = ROUNDS,
                     most: Optional[int] = None) -> Selection:
    """`tables`: each usable trial's validation probabilities (images x classes, one image order), best trial
    first: ties go to the earlier one. Each round adds the trial (again, if it is already in) whose addition
    scores best; accuracy ties are broken by the lower loss, since a small validation set ties often. `most`: at
    most that many distinct trials (the members the final stage will train); once they are in, the later rounds
    only weight them. The rounds up to the best score are kept (of equal scores, the fewest rounds)."""
    if not tables:
        raise ValueError("no trial kept its validation predictions")
    ids = list(tables)
    stacked = np.stack([np.asarray(tables[trial], dtype=np.float32) for trial in ids])
    total = np.zeros_like(stacked[0])
    picked: list[int] = []
    path, ranks = [], []
    for number in range(1, rounds + 1):
        full = most is not None and len(set(picked)) >= most
        allowed = sorted(set(picked)) if full else range(len(ids))
        scored = {index: _rank((total + stacked[index]) / number, labels, metric) for index in allowed}
        best = min(scored, key=lambda index: (scored[index], index))
        total += stacked[best]
        picked.append(best)
        ranks.append(scored[best])
        path.append((ids[best], ensemble_score(total / number, labels, metric)))
    kept = min(range(rounds), key=lambda index: (ranks[index], index)) + 1
    weights: dict[str, int] = {}
    for index in picked[:kept]:
        weights[ids[index]] = weights.get(ids[index], 0) + 1
    return Selection(weights, path, kept)


def _rank(probabilities: np.ndarray, labels: np.ndarray, metric: str) -> tuple[float, float]:
    """Lower is better: (the metric, the loss)."""
    loss = ensemble_score(probabilities, labels, "val_loss")
    return (-ensemble_score(probabilities, labels, metric), loss) if metric == "val_acc" else (loss, 0.0)


def share_out(votes: list[float], members: int) -> list[int]:
    """`members` split among configurations in proportion to their votes (largest remainders; ties to the earlier):
    how many seeds each is trained with. A configuration the selection kept picking gets several."""
    quotas = [members * vote / sum(votes) for vote in votes]
    counts = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(votes)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for index in by_remainder[:members - sum(counts)]:
        counts[index] += 1
    return counts
