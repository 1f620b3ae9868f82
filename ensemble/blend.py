"""Blending methods, fitted on validation probabilities and applied to any probabilities.

Every method fits to a `BlendSpec` (ensemble/spec.py, stored as JSON in ensemble.json);
`apply_blend(spec, probs)` is the one function that turns members' probabilities into blended ones,
offline here and online in the service.

>>> blender = Blender("weighted").fit(val_probs, val_labels)   # val_probs: [members, rows, classes]
>>> test_blend = blender.predict_proba(test_probs)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax
from sklearn.base import BaseEstimator
from threadpoolctl import threadpool_limits

from core.errors import ConfigError
from ensemble.scores import macro_f1
from ensemble.spec import METHODS, BlendSpec

LOG_FLOOR = 1e-12


class _OneBlasThread:
    """`with one_blas_thread:` BLAS and OpenMP run on one thread inside, and as before once all are out.

    L-BFGS's vectors are too small for BLAS threads, which only spin against each other and against
    other processes (a stacker fit 3x slower on a busy machine). Threads of a process share the
    setting: the first one in sets it and the last one out restores it, so blends fitted on several
    threads at once (ensemble.validation) never lift each other's limit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._limiter: Any = threadpool_limits(1)
            self._inside += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                self._limiter.restore_original_limits()


one_blas_thread = _OneBlasThread()


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """Natural log of probabilities, floored so that zeros stay finite."""
    return np.log(np.maximum(probs, LOG_FLOOR))


def apply_blend(spec: BlendSpec | dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """Blend members' probabilities [M, N, C] into [N, C] as the fitted spec says (a BlendSpec or its JSON)."""
    if not isinstance(spec, BlendSpec):
        spec = BlendSpec.from_dict(spec)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] != spec.member_count:
        raise ValueError(f"expected probabilities of {spec.member_count} members as [M, N, C], got {probs.shape}")
    if spec.method == "stack":
        return _apply_stack(spec, probs)
    if spec.powers is not None:
        scaled = np.asarray(spec.powers, dtype=np.float64)[:, None, None] * _log_probs(probs)
        probs = np.exp(scaled - logsumexp(scaled, axis=2, keepdims=True))
    return np.tensordot(np.asarray(spec.weights, dtype=np.float64), probs, axes=1)


def _stack_features(probs: np.ndarray, features: str) -> np.ndarray:
    """The stacker's inputs: log-probabilities or probabilities, [M, N, C] float64."""
    return _log_probs(probs) if features == "log" else probs.astype(np.float64)


def _apply_stack(spec: BlendSpec, probs: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression with one coefficient per member and class, plus class biases."""
    if probs.shape[2] != len(spec.intercept):
        raise ValueError(f"the stacker was fitted on {len(spec.intercept)} classes, got {probs.shape[2]}")
    logits = np.einsum("mnc,mc->nc", _stack_features(probs, spec.features), np.asarray(spec.coef))
    return softmax(logits + np.asarray(spec.intercept), axis=1)


def fit_mean(probs: np.ndarray, labels: np.ndarray) -> BlendSpec:
    """The plain average."""
    m = probs.shape[0]
    return BlendSpec("mean", weights=(1.0 / m,) * m)


def fit_weighted(probs: np.ndarray, labels: np.ndarray, power: bool = False) -> BlendSpec:
    """Non-negative weights summing to 1 (softmax-parametrised) minimising validation log loss.

    With `power=True` each member's probabilities are also raised to a fitted power (a temperature)
    and renormalised before the weighted average.
    """
    m, n, _ = probs.shape
    rows = np.arange(n)
    if not power:
        true_class = probs[:, rows, labels].T.astype(np.float64)  # [N, M]: the only thing log loss needs

        def loss(z):
            w = softmax(z)
            blend = np.maximum(true_class @ w, LOG_FLOOR)
            grad_w = -(true_class / blend[:, None]).mean(0)
            return -np.log(blend).mean(), w * (grad_w - w @ grad_w)

        result = minimize(loss, np.zeros(m), jac=True, method="L-BFGS-B")
        return BlendSpec("weighted", weights=tuple(softmax(result.x).tolist()))

    logs = _log_probs(probs.astype(np.float64))
    true_logs = logs[:, rows, labels]  # [M, N]

    def loss(params):
        z, s = params[:m], params[m:]
        w, t = softmax(z), np.exp(s)
        scaled = t[:, None, None] * logs
        lse = logsumexp(scaled, axis=2)
        q = np.exp(t[:, None] * true_logs - lse)  # [M, N] renormalised true-class probabilities
        expected_log = (np.exp(scaled - lse[..., None]) * logs).sum(2)
        dq_dt = q * (true_logs - expected_log)
        blend = np.maximum(w @ q, LOG_FLOOR)
        grad_w = -(q / blend).mean(1)
        grad_t = -(w[:, None] * dq_dt / blend).mean(1)
        return -np.log(blend).mean(), np.concatenate([w * (grad_w - w @ grad_w), grad_t * t])

    bounds = [(None, None)] * m + [(np.log(0.1), np.log(10.0))] * m
    result = minimize(loss, np.zeros(2 * m), jac=True, method="L-BFGS-B", bounds=bounds)
    return BlendSpec("weighted", weights=tuple(softmax(result.x[:m]).tolist()),
                     powers=tuple(np.exp(result.x[m:]).tolist()))


def fit_hill_climb(
    probs: np.ndarray, labels: np.ndarray, iterations: int = 100, patience: int = 15
) -> BlendSpec:
    """Greedy ensemble selection with replacement maximising macro F1 (Caruana et al., 2004).

    Starts from the best single member, adds the member that most improves macro F1 at each step
    (even if none does, to escape plateaus), stops after `patience` steps without a new best, and
    keeps the selection counts of the best prefix as weights.
    """
    m, _, c = probs.shape
    counts = np.zeros(m)
    total = np.zeros(probs.shape[1:])
    best_score, best_counts, since_best = -1.0, counts.copy(), 0
    for _ in range(iterations):
        candidate = [macro_f1(labels, (total + probs[j]).argmax(1), c) for j in range(m)]
        j = int(np.argmax(candidate))
        counts[j] += 1
        total += probs[j]
        if candidate[j] > best_score + 1e-12:
            best_score, best_counts, since_best = candidate[j], counts.copy(), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    return BlendSpec("hill-climb", weights=tuple((best_counts / best_counts.sum()).tolist()),
                     selections=tuple(best_counts.astype(int).tolist()))


def _stack_loss(features: np.ndarray, labels: np.ndarray, c_reg: float) -> Callable[[np.ndarray], tuple]:
    """The stacker's loss and its gradient, one function of the packed parameters (beta, delta, bias).

    Loss: mean cross-entropy + (|deviations|^2 + |biases|^2) / (2 C N), as scikit-learn scales C.
    The sums over members and rows read the features in their own dtype (float32 in fit_stack: half
    the memory traffic, the same fit to 1e-4); everything else is float64.
    """
    m, n, c = features.shape
    rows = np.arange(n)
    penalty = 1.0 / (c_reg * n)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        beta, delta, bias = params[:m], params[m:m + m * c].reshape(m, c), params[m + m * c:]
        logits = np.einsum("mnc,mc->nc", features, (beta[:, None] + delta).astype(features.dtype)) + bias
        logits -= logits.max(axis=1, keepdims=True)
        grad_logits = np.exp(logits)
        total = grad_logits.sum(axis=1)
        value = (np.log(total) - logits[rows, labels]).mean() + 0.5 * penalty * ((delta**2).sum() + (bias**2).sum())
        grad_logits /= (total * n)[:, None]
        grad_logits[rows, labels] -= 1.0 / n
        grad_coef = np.einsum("mnc,nc->mc", features, grad_logits.astype(features.dtype))
        grad = np.concatenate([grad_coef.sum(1), (grad_coef + penalty * delta).ravel(),
                               grad_logits.sum(0) + penalty * bias])
        return value, grad

    return loss


def _fit_stack_once(
    features: np.ndarray, labels: np.ndarray, c_reg: float, start: np.ndarray | None = None
) -> np.ndarray:
    """Packed parameters minimising the stacker's loss at one C, by L-BFGS from `start`.

    The default start is equal member weights and no deviations or biases; a neighbouring C's
    solution (a warm start) reaches the same minimum in fewer steps.
    """
    m, _, c = features.shape
    if start is None:
        start = np.concatenate([np.full(m, 1.0 / m), np.zeros(m * c + c)])
    loss = _stack_loss(features, labels, c_reg)
    return minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 200}).x


def _unpack_stack(params: np.ndarray, m: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """coef [M, C] (member weight + deviation) and biases [C] from packed parameters."""
    beta, delta = params[:m], params[m:m + m * c].reshape(m, c)
    return beta[:, None] + delta, params[m + m * c:]


def _stack_log_loss(features: np.ndarray, labels: np.ndarray, params: np.ndarray) -> float:
    """Summed negative log-probability of the true classes under packed stacker parameters."""
    coef, bias = _unpack_stack(params, features.shape[0], features.shape[2])
    logits = np.einsum("mnc,mc->nc", features, coef) + bias
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    return float(-log_p[np.arange(len(labels)), labels].sum())


def _choose_c(
    x: np.ndarray, labels: np.ndarray, cs: tuple[float, ...], folds: int, seed: int
) -> tuple[float, np.ndarray | None]:
    """The C of the lowest stratified inner-CV log loss, and a warm start for the final fit.

    The folds walk the C path from the most regularised value up, each fit starting from the same
    fold's fit at the previous C, and stop once the loss rises above the lowest so far. The warm start
    returned is the mean of the chosen C's fold fits; None (and the middle C) without inner CV.
    """
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    inner = min(folds, int(counts[counts > 0].min()))
    if len(cs) < 2 or inner < 2:
        return cs[len(cs) // 2], None
    splits = list(StratifiedKFold(inner, shuffle=True, random_state=seed).split(labels, labels))
    parts = [(x[:, train], labels[train], x[:, held], labels[held]) for train, held in splits]
    fits: list[np.ndarray | None] = [None] * len(parts)
    losses, starts = {}, {}
    for value in sorted(set(cs)):
        fits = [_fit_stack_once(x_fit, y_fit, value, fits[k]) for k, (x_fit, y_fit, _, _) in enumerate(parts)]
        losses[value] = sum(_stack_log_loss(x_held, y_held, fits[k]) for k, (*_, x_held, y_held) in enumerate(parts))
        starts[value] = np.mean(fits, axis=0)
        if losses[value] > min(losses.values()):
            break  # past the lowest point of the C path: the larger Cs overfit more
    best = min(losses, key=losses.__getitem__)
    return best, starts[best]


def fit_stack(
    probs: np.ndarray, labels: np.ndarray, features: str = "log", cs: tuple[float, ...] = (0.1, 1.0, 10.0),
    folds: int = 3, seed: int = 0,
) -> BlendSpec:
    """Multinomial logistic regression on the members' log-probabilities (or probabilities).

    Each class's logit is a weighted sum of that class's member scores plus a bias; the weight is a
    member weight plus an L2-penalised per-class deviation. That keeps M*C + M + C parameters,
    not the (M*C)*C of a dense regression, which overfits badly with ~36 validation rows per class
    and takes 20 s a fit. The penalty strength C is chosen by stratified inner CV log loss along the
    C path, smallest C first, each fit warm-started from the previous one; the path stops at the first
    C whose loss is higher than the best so far (the larger ones overfit more). Fits run on float32
    features with one BLAS thread (see Blender.fit).
    """
    if features not in ("log", "probs"):
        raise ConfigError(f"stack features must be 'log' or 'probs', got {features!r}")
    x = _stack_features(probs, features).astype(np.float32)
    best_c, start = _choose_c(x, labels, cs, folds, seed)
    coef, bias = _unpack_stack(_fit_stack_once(x, labels, best_c, start), x.shape[0], x.shape[2])
    return BlendSpec("stack", features=features, C=float(best_c), coef=tuple(tuple(row) for row in coef.tolist()),
                     intercept=tuple(bias.tolist()))


class Blender(BaseEstimator):
    """A scikit-learn estimator of blends: `fit` on validation probabilities, `predict_proba` anywhere.

    Every option is an explicit keyword, so `get_params`, `set_params` and `sklearn.base.clone` work;
    each method reads only its own: `power` (weighted), `iterations` and `patience` (hill-climb),
    `features`, `cs`, `folds` and `seed` (stack). `fit` sets `spec_` (a BlendSpec), `weights_` (the
    convex weights, None for a stacker) and `importance_` (one number per member for every method).
    """

    def __init__(self, method: str = "mean", *, power: bool = False, iterations: int = 100, patience: int = 15,
                 features: str = "log", cs: tuple[float, ...] = (0.1, 1.0, 10.0), folds: int = 3,
                 seed: int = 0) -> None:
        self.method = method
        self.power = power
        self.iterations = iterations
        self.patience = patience
        self.features = features
        self.cs = cs
        self.folds = folds
        self.seed = seed

    def _fit_spec(self, probs: np.ndarray, labels: np.ndarray) -> BlendSpec:
        """Run this blender's method with its own options."""
        if self.method == "mean":
            return fit_mean(probs, labels)
        if self.method == "weighted":
            return fit_weighted(probs, labels, power=self.power)
        if self.method == "hill-climb":
            return fit_hill_climb(probs, labels, iterations=self.iterations, patience=self.patience)
        return fit_stack(probs, labels, features=self.features, cs=tuple(self.cs), folds=self.folds, seed=self.seed)

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> Blender:
        """Fit on probabilities [M, N, C] and integer labels [N]; returns self."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown blend method {self.method!r}; expected one of {METHODS}")
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[1] != len(labels):
            raise ValueError(
                f"expected probabilities [members, rows, classes] with {len(labels)} rows, got {probs.shape}"
            )
        with one_blas_thread:
            self.spec_ = self._fit_spec(probs, np.asarray(labels))
        self.weights_ = None if self.spec_.weights is None else np.asarray(self.spec_.weights)
        self.importance_ = np.asarray(self.spec_.importance)
        return self

    def predict_proba(self, probs: np.ndarray) -> np.ndarray:
        """Blended probabilities [N, C]."""
        return apply_blend(self.spec_, probs)

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Class index per row: the argmax of `predict_proba`."""
        return self.predict_proba(probs).argmax(axis=1)
