"""Many multinomial logistic regressions on one feature matrix, fitted together.

A probe's permutation test and cross-validation fit the same model to the same activations again and
again, with other labels and other training rows. `fit_many` fits all of them at once: every problem
keeps its own labels, training rows, standardization and solver state, but each solver step evaluates
all of them with two matrix products over the shared X ([n, d] @ [d, problems * classes]), and a
problem leaves the batch as soon as it has converged.

Each problem is exactly what `make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol))`
fits on its training rows (scikit-learn >= 1.2, lbfgs): the mean cross-entropy over training rows plus
||W||^2 / (2 C n_train) on the standardized coefficients, intercept unpenalized, stopped when the
gradient's largest entry is below tol. Two classes get scikit-learn's binomial objective (the same as a
two-class multinomial with twice the penalty); a class absent from a problem's training rows gets
probability 0, as scikit-learn, which never sees it, gives it.

The solver is L-BFGS preconditioned by the inverse Hessian at the start (W = 0: every class equally
likely, Hessian (Σ / K + λ I) on the feature side, Σ the standardized features' covariance, K classes).
On the untrained twin's scan, where four directions carry most of the variance, it reaches tol=1e-5
in ~36 steps where plain L-BFGS (scikit-learn's) takes ~230; on the trained model's, both ~60.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError

__all__ = ["MultinomialFits", "fit_many", "out_of_fold_probabilities"]

HISTORY = 5  # L-BFGS memory: on scans 5 pairs converge in as few steps as 10 or 20, and cost less
ARMIJO = 1e-4  # sufficient decrease of a line-search step
MAX_HALVINGS = 40  # line-search steps before a problem is given up as stalled
F_TOL = 64 * np.finfo(float).eps  # scipy's ftol as scikit-learn sets it: relative decrease that counts as none


@dataclass(frozen=True, eq=False)
class MultinomialFits:
    """P fitted problems. Coefficients are on standardized features, as a fitted pipeline's are."""

    coef: np.ndarray  # [P, n_classes, width] on (x - mean) / scale; rows of absent classes are 0
    intercept: np.ndarray  # [P, n_classes]; -inf for absent classes
    mean: np.ndarray  # [P, width] each problem's training mean
    scale: np.ndarray  # [P, width] each problem's training standard deviation (1 where constant)
    n_iter: np.ndarray  # [P] solver steps taken
    converged: np.ndarray  # [P] bool: gradient below tol or no decrease left (else max_iter or a stalled line search)

    def predict_proba(self, X) -> np.ndarray:
        """[P, n, n_classes] class probabilities of each problem's model for the rows of X [n, width]."""
        X = np.asarray(X, dtype=np.float64)
        raw = (self.coef / self.scale[:, None, :]).transpose(0, 2, 1)  # [P, width, n_classes] on X's own units
        logits = X @ raw  # [P, n, n_classes]
        logits += (self.intercept - np.einsum("pd,pdc->pc", self.mean, raw))[:, None, :]
        logits -= logits.max(axis=2, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=2, keepdims=True)


class _Problems:
    """The P objectives on the shared, globally standardized X, evaluated for any subset of them.

    The two products with X run in float32, at twice float64's speed; parameters, sums and the solver
    stay float64. The rounding limits agreement with a float64 fit to about 1e-4 in probability, far
    below what tol=1e-5 resolves on scans (~1e-2).
    """

    def __init__(self, X: np.ndarray, labels: np.ndarray, train: np.ndarray, n_classes: int, C: float):
        self.X = X.astype(np.float32)  # [n, d]
        counts = train.sum(axis=1).astype(np.float64)  # [P]
        weights = train / counts[:, None]  # [P, n]: the loss is a mean over training rows
        self.mean = weights @ X  # [P, d]
        variance = np.maximum(weights @ (X * X) - self.mean**2, 0.0)
        # Constant on the training rows: its coefficient only feels the penalty and stays 0, whatever the scale.
        self.scale = np.where(variance > 1e-24, np.sqrt(variance), 1.0)
        self.weights = np.ascontiguousarray(weights.T)  # [n, P]
        self.labels = np.ascontiguousarray(labels.T)  # [n, P]
        self.present = np.stack([np.bincount(labels[p, train[p]], minlength=n_classes) > 0
                                 for p in range(len(labels))])  # [P, K]
        # A class a problem never trains on gets a logit far below the others (probability 0). Finite, so
        # that test rows of that class (weight 0) add 0, not 0 * inf, to the loss.
        self.absent = np.where(self.present, 0.0, -1e30)
        # scikit-learn fits two classes as one binomial model: a two-class multinomial with twice the penalty.
        self.l2 = np.where(self.present.sum(axis=1) == 2, 2.0, 1.0) / (C * counts)  # [P]
        self.n_classes = n_classes

    def loss_gradient(self, theta: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([A] objectives, [d + 1, A, K] gradients) of the problems `index` [A] at theta [d + 1, A, K].

        theta holds each problem's coefficients on its own standardized features, the intercept last.
        """
        (n, d), A = self.X.shape, len(index)
        W, mean, inverse_scale = theta[:d], self.mean[index], 1.0 / self.scale[index].T[:, :, None]
        raw = W * inverse_scale  # [d, A, K] coefficients on X's own coordinates
        offset = theta[d] - np.einsum("ad,dak->ak", mean, raw) + self.absent[index]
        logits = (self.X @ raw.reshape(d, -1).astype(np.float32)).reshape(n, A, -1)
        logits += offset.astype(np.float32)
        logits -= logits.max(axis=2, keepdims=True)
        labels, weights = self.labels[:, index], self.weights[:, index]  # [n, A]
        true_logit = np.take_along_axis(logits, labels[..., None], axis=2)[..., 0]
        np.exp(logits, out=logits)
        total = logits.sum(axis=2)
        l2 = self.l2[index]
        loss = np.einsum("na,na->a", weights, np.log(total) - true_logit) + 0.5 * l2 * np.einsum("dak,dak->a", W, W)
        residual = logits  # [n, A, K] d(loss) / d(logits) = weight * (probability - one-hot), in place
        residual *= (weights / total).astype(np.float32)[..., None]
        residual.reshape(n * A, -1)[np.arange(n * A), labels.ravel()] -= weights.ravel().astype(np.float32)
        raw_gradient = (self.X.T @ residual.reshape(n, -1)).reshape(W.shape)
        intercept_gradient = residual.sum(axis=0, dtype=np.float64)  # [A, K]
        coef_gradient = (raw_gradient - mean.T[:, :, None] * intercept_gradient) * inverse_scale + l2[:, None] * W
        return loss, np.concatenate([coef_gradient, intercept_gradient[None]])


def _standardize(X: np.ndarray) -> np.ndarray:
    """X centred and scaled over all rows: every problem's own standardization is then a mild correction."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise MlxscanError(f"X must be a finite [n, width] array; got shape {X.shape}")
    scale = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def _preconditioner(X: np.ndarray, n_classes: int, l2: float):
    """The inverse Hessian at W = 0 (all classes equally likely), as a function of [d + 1, A, K] arrays."""
    d = X.shape[1]
    covariance = X.T @ X / len(X)
    inverse = np.linalg.inv(covariance / n_classes + l2 * np.eye(d)).astype(np.float32)

    def apply(q: np.ndarray) -> np.ndarray:
        # float32: a preconditioner's rounding changes the path a little, never the optimum.
        out = np.empty_like(q)
        out[:d] = (inverse @ q[:d].reshape(d, -1).astype(np.float32)).reshape(q[:d].shape)
        out[d] = n_classes * q[d]
        return out

    return apply


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[A] inner products of the problems' parameter blocks [d + 1, A, K]."""
    return np.einsum("dak,dak->a", a, b)


@dataclass
class _Batch:
    """Solver state of the problems still running: parameters [d + 1, A, K] and L-BFGS memory."""

    index: np.ndarray  # [A] problem ids
    theta: np.ndarray
    loss: np.ndarray  # [A]
    grad: np.ndarray
    s: np.ndarray  # [HISTORY, d + 1, A, K] past steps (a ring; rho = 0 marks an unused slot)
    y: np.ndarray  # [HISTORY, d + 1, A, K] past gradient changes
    rho: np.ndarray  # [HISTORY, A] 1 / (s . y)
    gamma: np.ndarray  # [A] scale of the preconditioner, s . y / (y . M y) of the newest pair

    def keep(self, mask: np.ndarray) -> "_Batch":
        return _Batch(self.index[mask], self.theta[:, mask], self.loss[mask], self.grad[:, mask],
                      self.s[:, :, mask], self.y[:, :, mask], self.rho[:, mask], self.gamma[mask])


def _direction(batch: _Batch, newest: int, precondition) -> np.ndarray:
    """-H grad by the two-loop recursion, per problem, with H0 = gamma * M."""
    q = batch.grad.copy()
    alphas = []
    for j in range(HISTORY):
        slot = (newest - j) % HISTORY
        alpha = batch.rho[slot] * _dot(batch.s[slot], q)
        q -= alpha[None, :, None] * batch.y[slot]
        alphas.append(alpha)
    r = batch.gamma[None, :, None] * precondition(q)
    for j in reversed(range(HISTORY)):
        slot = (newest - j) % HISTORY
        beta = batch.rho[slot] * _dot(batch.y[slot], r)
        r += (alphas[j] - beta)[None, :, None] * batch.s[slot]
    return -r


def _line_search(problems: _Problems, batch: _Batch, direction: np.ndarray, slope: np.ndarray):
    """Backtracking to a sufficient decrease, each problem its own step, starting from the full step.

    Returns the new (theta, loss, grad) and [A] bool for problems no step could decrease.
    """
    step = np.ones(len(batch.index))
    theta = batch.theta + direction
    loss, grad = problems.loss_gradient(theta, batch.index)
    pending = ~(loss <= batch.loss + ARMIJO * slope)
    for _ in range(MAX_HALVINGS):
        if not pending.any():
            break
        rows = np.flatnonzero(pending)
        # The minimum of the quadratic through f(0), f'(0) and f(step), kept within [0.1, 0.5] of the step.
        rise = loss[rows] - batch.loss[rows] - slope[rows] * step[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            shrink = -slope[rows] * step[rows] / (2 * rise)
        step[rows] *= np.clip(np.nan_to_num(shrink, nan=0.5), 0.1, 0.5)
        theta[:, rows] = batch.theta[:, rows] + step[rows][None, :, None] * direction[:, rows]
        loss[rows], grad[:, rows] = problems.loss_gradient(theta[:, rows], batch.index[rows])
        pending[rows] = ~(loss[rows] <= batch.loss[rows] + ARMIJO * step[rows] * slope[rows])
    return theta, loss, grad, pending


def _solve(problems: _Problems, precondition, tol: float, max_iter: int):
    """([d + 1, P, K] parameters, [P] steps, [P] converged) by batched, preconditioned L-BFGS from 0."""
    n_problems, (d, n_classes) = len(problems.l2), (problems.X.shape[1], problems.n_classes)
    theta_out = np.zeros((d + 1, n_problems, n_classes))
    n_iter, converged = np.zeros(n_problems, dtype=np.int64), np.zeros(n_problems, dtype=bool)
    index = np.arange(n_problems)
    loss, grad = problems.loss_gradient(theta_out, index)
    memory = np.zeros((HISTORY, d + 1, n_problems, n_classes))
    batch = _Batch(index, theta_out.copy(), loss, grad, memory, memory.copy(), np.zeros((HISTORY, n_problems)),
                   np.ones(n_problems))
    newest, steps = HISTORY - 1, 0
    failed = flat = np.zeros(n_problems, dtype=bool)
    while True:
        small = np.abs(batch.grad).max(axis=(0, 2)) <= tol
        finished = small | flat | failed | (steps >= max_iter)
        if finished.any():
            done = batch.index[finished]
            theta_out[:, done], n_iter[done] = batch.theta[:, finished], steps
            converged[done] = (small | flat)[finished]
            batch = batch.keep(~finished)
            if len(batch.index) == 0:
                return theta_out, n_iter, converged
        direction = _direction(batch, newest, precondition)
        slope = _dot(batch.grad, direction)
        uphill = slope >= 0  # a poor curvature memory: forget it and take the preconditioned gradient step
        if uphill.any():
            batch.rho[:, uphill], batch.gamma[uphill] = 0.0, 1.0
            direction[:, uphill] = -precondition(batch.grad[:, uphill])
            slope[uphill] = _dot(batch.grad[:, uphill], direction[:, uphill])
        theta, loss, grad, failed = _line_search(problems, batch, direction, slope)
        s, y = theta - batch.theta, grad - batch.grad
        curvature = _dot(s, y)  # > 0 on this strictly convex objective, up to rounding
        newest = (newest + 1) % HISTORY
        batch.s[newest], batch.y[newest] = s, y
        positive = (curvature > 0) & ~failed
        batch.rho[newest] = np.where(positive, 1.0 / np.where(positive, curvature, 1.0), 0.0)
        batch.gamma = np.where(positive, curvature / np.maximum(_dot(y, precondition(y)), 1e-300), batch.gamma)
        # scipy's other stopping rule: a step that lowers the objective by a relative 64 eps or less.
        flat = (batch.loss - loss) <= F_TOL * np.maximum(np.maximum(np.abs(batch.loss), np.abs(loss)), 1.0)
        keep = failed[None, :, None]
        batch.theta = np.where(keep, batch.theta, theta)
        batch.loss, batch.grad = np.where(failed, batch.loss, loss), np.where(keep, batch.grad, grad)
        flat &= ~failed
        steps += 1


def fit_many(X, labels, train, n_classes: int, *, C: float = 1.0, tol: float = 1e-3,
             max_iter: int = 1000) -> MultinomialFits:
    """Fit P standardized multinomial logistic regressions on the rows of one X [n, width].

    labels [P, n] class indices in 0..n_classes-1 (each problem its own), train [P, n] bool (each
    problem's training rows). Problem p is `linear_probe(C)` fitted on X[train[p]], labels[p, train[p]].
    """
    labels, train = np.asarray(labels), np.asarray(train, dtype=bool)
    X = np.asarray(X, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != train.shape or labels.shape[1] != len(X):
        raise MlxscanError(f"labels and train must both be [problems, {len(X)}]; got {labels.shape} and {train.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        raise MlxscanError(f"labels must be class indices in 0..{n_classes - 1}")
    if (train.sum(axis=1) == 0).any():
        raise MlxscanError("every problem needs at least one training row")
    standardized = _standardize(X)
    problems = _Problems(standardized, labels, train, n_classes, C)
    # The penalty of a problem trained on every row: the same for any batch, so a problem's path is too.
    precondition = _preconditioner(standardized, n_classes, 1.0 / (C * len(X)))
    theta, n_iter, converged = _solve(problems, precondition, tol, max_iter)
    # Each problem standardized the globally standardized X again; in X's own units that is one affine map.
    center, spread = X.mean(axis=0), X.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    intercept = np.where(problems.present, theta[-1], -np.inf)
    return MultinomialFits(coef=theta[:-1].transpose(1, 2, 0), intercept=intercept,
                           mean=center + spread * problems.mean, scale=spread * problems.scale,
                           n_iter=n_iter, converged=converged)


def out_of_fold_probabilities(X, label_sets, fold_sets, n_classes: int, *, C: float = 1.0, tol: float = 1e-3,
                              max_iter: int = 1000) -> np.ndarray:
    """[S, n, n_classes] out-of-fold probabilities of each labelling label_sets[s] [n] under its folds fold_sets[s] [n].

    Every (labelling, fold) pair is one problem of one `fit_many`: the model trained off the fold
    predicts the fold's rows.
    """
    label_sets, fold_sets = np.atleast_2d(label_sets), np.atleast_2d(fold_sets)
    pairs = [(s, fold) for s in range(len(label_sets)) for fold in np.unique(fold_sets[s])]
    labels = np.stack([label_sets[s] for s, _ in pairs])
    train = np.stack([fold_sets[s] != fold for s, fold in pairs])
    fits = fit_many(X, labels, train, n_classes, C=C, tol=tol, max_iter=max_iter)
    probabilities = fits.predict_proba(X)  # [P, n, K]
    out = np.empty((len(label_sets), label_sets.shape[1], n_classes))
    for p, (s, _) in enumerate(pairs):
        out[s, ~train[p]] = probabilities[p, ~train[p]]
    return out
