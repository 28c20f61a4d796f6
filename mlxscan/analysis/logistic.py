"""Many multinomial logistic regressions on one feature matrix, fitted together.

A probe's permutation test and cross-validation fit the same model to the same activations again and
again, with other labels and other training rows. `fit_many` fits all of them at once: every problem
keeps its own labels, training rows, standardization and solver state, but each solver step evaluates
all of them with two matrix products over the shared X ([(classes - 1) * problems, d + 1] @ [d + 1, n]:
the last class follows from the others), and a problem leaves the batch as soon as it has converged.

Each problem is exactly what `make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol))`
fits on its training rows (scikit-learn >= 1.2, lbfgs): the mean cross-entropy over training rows plus
||W||^2 / (2 C n_train) on the standardized coefficients, intercept unpenalized, stopped when the
gradient's largest entry is below tol. Two classes get scikit-learn's binomial objective (the same as a
two-class multinomial with twice the penalty); a class absent from a problem's training rows gets
probability 0, as scikit-learn, which never sees it, gives it.

The solver is L-BFGS preconditioned by the inverse Hessian at the start (W = 0: every class equally
likely, Hessian (Σ / K + λ I) on the feature side, Σ the standardized features' covariance, K classes).
On the untrained twin's scan, where four directions carry most of the variance, it reaches tol=1e-5
in ~36 steps where plain L-BFGS (scikit-learn's) takes ~230; on the trained model's, both ~60. After
REFRESH_AFTER steps it is rebuilt once from the rows' curvature at the current point (X' diag(c) X + λ,
c the mean p (1 - p) of each row in the reference problems), and the memory restarts: confidently
classified rows no longer count. On 6 labellings x 5 folds of the category scan, the median problem
then takes 29 / 38 / 52 steps at the trained model's layers 2 / 15 / 27 instead of 64 / 68 / 65, and
26-27 on the twin's instead of 34-46 (scripts/bench_probe_solver.py).
Its direction is computed in the compact form (Byrd, Nocedal & Schnabel 1994), the same matrix as the
two-loop recursion's: with M applied to each gradient once, and M y kept beside each step s, a step
costs one product with M and two passes over the memory. At tol=1e-5 on a scan layer (105 problems,
1,200 rows, 576 features, 10 classes) the three matrix products are ~70% of the time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from ..errors import MlxscanError

__all__ = ["MultinomialFits", "fit_many", "out_of_fold_probabilities"]

# Steps after which the preconditioner is rebuilt from the rows' curvature (see _solve). At W = 0 every
# row weighs alike; by step 10 the confidently classified ones have little curvature left, and the
# old preconditioner steps too timidly along the directions they dominate. Rebuilding at 5, 7, 12, 15
# or 20 steps, or twice, measured no faster.
REFRESH_AFTER = 10
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
        return _probabilities(self, np.arange(len(self.coef)), np.asarray(X, dtype=np.float64))


def _probabilities(fits: MultinomialFits, problems, X: np.ndarray) -> np.ndarray:
    """[len(problems), n, n_classes] probabilities of the problems' models for the rows of X [n, width]."""
    raw = (fits.coef[problems] / fits.scale[problems, None, :]).transpose(0, 2, 1)  # [P, width, K] on X's units
    logits = X @ raw  # [P, n, n_classes]
    logits += (fits.intercept[problems] - np.einsum("pd,pdc->pc", fits.mean[problems], raw))[:, None, :]
    logits -= logits.max(axis=2, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=2, keepdims=True)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[A] inner products of the rows of two [A, ...] arrays (a BLAS dot each: faster than einsum)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a[:, None, :] @ b[:, :, None])[:, 0, 0]


class _Problems:
    """The P objectives on the shared, globally standardized X; `problems[index]` is a subset of them.

    Parameters are [A, K, d + 1] per problem: coefficients on the problem's own standardized features,
    the intercept last. The two products with X run in float32, at twice float64's speed, and so does
    the gradient they make; parameters and the loss stay float64. The rounding limits agreement with a
    float64 fit to about 1e-4 in probability, far below what tol=1e-5 resolves on scans (~1e-2).
    """

    PER_PROBLEM = ("weights", "weights32", "labels", "mean", "mean32", "scale", "inverse_scale", "inverse_scale32",
                   "centre", "penalty32", "present", "absent", "l2")

    def __init__(self, X: np.ndarray, labels: np.ndarray, train: np.ndarray, n_classes: int, C: float):
        n = len(X)
        # A column of ones: the products then add each problem's offset and sum its residuals (the
        # intercept's gradient) themselves.
        self.X = np.hstack([X, np.ones((n, 1))]).astype(np.float32)  # [n, d + 1]
        counts = train.sum(axis=1).astype(np.float64)  # [P]
        self.weights = train / counts[:, None]  # [P, n]: the loss is a mean over training rows
        self.weights32, self.labels = self.weights.astype(np.float32), labels
        self.mean = self.weights @ X  # [P, d]
        variance = np.maximum(self.weights @ (X * X) - self.mean**2, 0.0)
        # Constant on the training rows: its coefficient only feels the penalty and stays 0, whatever the scale.
        self.scale = np.where(variance > 1e-24, np.sqrt(variance), 1.0)
        self.inverse_scale = 1.0 / self.scale
        self.centre = self.mean * self.inverse_scale  # [P, d]: a coefficient's share of the offset
        self.mean32, self.inverse_scale32 = self.mean.astype(np.float32), self.inverse_scale.astype(np.float32)
        self.present = np.stack([np.bincount(labels[p, train[p]], minlength=n_classes) > 0
                                 for p in range(len(labels))])  # [P, K]
        # A class a problem never trains on gets a logit far below the others (probability 0). Finite, so
        # that test rows of that class (weight 0) add 0, not 0 * inf, to the loss.
        self.absent = np.where(self.present, 0.0, -1e30)
        # scikit-learn fits two classes as one binomial model: a two-class multinomial with twice the penalty.
        self.l2 = np.where(self.present.sum(axis=1) == 2, 2.0, 1.0) / (C * counts)  # [P]
        self.penalty32 = (self.l2[:, None] * self.scale**2).astype(np.float32)  # l2 W = penalty32 raw / scale
        self.n_classes = n_classes
        self._locate_classes()

    def __getitem__(self, index) -> "_Problems":
        """The problems `index` alone, their arrays sliced once for the many evaluations of a batch."""
        subset = copy.copy(self)
        for name in self.PER_PROBLEM:
            setattr(subset, name, getattr(self, name)[index])
        subset._locate_classes()
        return subset

    def __len__(self) -> int:
        return len(self.l2)

    def _locate_classes(self):
        """Whether any class is absent, and where each row's true logit sits in the [K, A, n] logits (flattened)."""
        A, K, n = len(self), self.n_classes, len(self.X)
        self.has_absent = not self.present.all()
        positions = self.labels * (A * n) + np.arange(A)[:, None] * n + np.arange(n)  # [A, n]
        self.true_positions = positions.ravel()
        computed = self.labels < K - 1
        self.computed_positions, self.computed_weights32 = positions[computed], self.weights32[computed]

    def _logits(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([K - 1, A, d + 1] coefficients and offsets on the global X, [K, A, n] logits less each row's largest)."""
        (n, width), (A, K) = self.X.shape, theta.shape[:2]
        d = width - 1
        W = theta[:, :, :d]
        raw = np.empty((K - 1, A, width), dtype=np.float32)
        np.multiply(W[:, :-1].transpose(1, 0, 2), self.inverse_scale, out=raw[:, :, :d])
        raw[:, :, d] = (theta[:, :-1, d] - (W[:, :-1] @ self.centre[:, :, None])[:, :, 0]).T
        logits = np.empty((K, A, n), dtype=np.float32)  # classes outermost: max and sum are K passes over [A, n]
        np.matmul(raw.reshape(-1, width), self.X.T, out=logits[:-1].reshape(-1, n))
        np.negative(logits[:-1].sum(axis=0), out=logits[-1])
        if self.has_absent:
            logits += self.absent.T[:, :, None]
        logits -= logits.max(axis=0)
        return raw, logits

    def row_curvature(self, theta: np.ndarray) -> np.ndarray:
        """[n] each row's share of the loss's curvature at theta [A, K, d + 1], averaged over the A problems:
        its training weight times the mean over classes of p (1 - p)."""
        _, logits = self._logits(theta)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0)
        return np.mean(self.weights * np.mean(logits * (1 - logits), axis=0), axis=0)

    def loss_gradient(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([A] objectives, [A, K, d + 1] float32 gradients) at theta [A, K, d + 1].

        The solver keeps sum_k theta_k = 0 (every step it takes is a combination of gradients, and the
        classes' gradients sum to l2 sum_k W_k, as each row's residuals sum to 0), so the products run
        on K - 1 classes and the last class's logits and gradient are minus the sum of the others'.
        """
        (n, width), (A, K) = self.X.shape, theta.shape[:2]
        d = width - 1
        raw, logits = self._logits(theta)
        true_logit = logits.ravel().take(self.true_positions).reshape(A, n)
        np.exp(logits, out=logits)
        total = logits.sum(axis=0)  # [A, n]
        # ||W||^2 as the whole row's square less the intercepts': theta's rows are contiguous, W's are not.
        squares = _dot(theta, theta) - np.einsum("ak,ak->a", theta[:, :, d], theta[:, :, d])
        loss = _dot(self.weights, np.log(total) - true_logit) + 0.5 * self.l2 * squares
        residual = logits[:-1]  # [K - 1, A, n] d(loss) / d(logits) = weight * (probability - one-hot), in place
        residual *= self.weights32 / total
        residual.reshape(-1)[self.computed_positions] -= self.computed_weights32
        computed = (residual.reshape(-1, n) @ self.X).reshape(K - 1, A, width)  # sum(r x), then sum(r)
        # On the problem's own features (x - mean) / scale, plus the penalty's. float32, as the products
        # are: near the optimum the two terms cancel to ~tol, ~1e4 times their rounding.
        coef_gradient = computed[:, :, :d]
        coef_gradient -= computed[:, :, d:] * self.mean32
        coef_gradient += raw[:, :, :d] * self.penalty32
        coef_gradient *= self.inverse_scale32
        gradient = np.empty((A, K, width), dtype=np.float32)
        gradient[:, :-1] = computed.transpose(1, 0, 2)
        np.negative(computed.sum(axis=0), out=gradient[:, -1])
        if self.has_absent:  # exactly 0 (rather than a sum's rounding), so that absent classes' rows stay 0
            gradient *= self.present[:, :, None]
        return loss, gradient


def _standardize(X: np.ndarray) -> np.ndarray:
    """X centred and scaled over all rows: every problem's own standardization is then a mild correction."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise MlxscanError(f"X must be a finite [n, width] array; got shape {X.shape}")
    scale = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """The float32 inverse of a symmetric positive definite float64 matrix, by Cholesky (~2.5x faster than LU)."""
    factor, info = lapack.dpotrf(matrix, lower=False)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=False)  # the upper triangle only
    if info != 0:  # not numerically positive definite: a preconditioner only has to be good, not exact
        return np.linalg.pinv(matrix).astype(np.float32)
    return (np.triu(inverse) + np.triu(inverse, 1).T).astype(np.float32)


def _preconditioner(X: np.ndarray, n_classes: int, l2: float):
    """The inverse Hessian at W = 0 (all classes equally likely), as a function of [A, K, d + 1] arrays."""
    d = X.shape[1]
    X32 = X.astype(np.float32)
    covariance = (X32.T @ X32).astype(np.float64) / len(X)
    inverse = _inverse(covariance / n_classes + l2 * np.eye(d))

    def apply(q: np.ndarray, out: np.ndarray) -> None:
        """out = M q, both float32: a preconditioner's rounding changes the path a little, never the optimum."""
        A, K = q.shape[:2]
        out[:, :, :d] = (q.reshape(A * K, d + 1)[:, :d] @ inverse.T).reshape(A, K, d)
        out[:, :, d] = n_classes * q[:, :, d]

    return apply


def _curvature_preconditioner(X: np.ndarray, curvature: np.ndarray, l2: float):
    """The inverse of X' diag(curvature) X plus the penalty (intercept free), X [n, d + 1] with its ones
    column: the Hessian's feature side once the rows' curvatures have become unequal."""
    d = X.shape[1] - 1
    hessian = ((X * curvature[:, None].astype(np.float32)).T @ X).astype(np.float64)
    hessian[np.arange(d), np.arange(d)] += l2
    inverse = _inverse(hessian)

    def apply(q: np.ndarray, out: np.ndarray) -> None:
        A, K, width = q.shape
        out[...] = (q.reshape(A * K, width) @ inverse).reshape(A, K, width)  # the inverse is symmetric

    return apply


@dataclass
class _Batch:
    """Solver state of the problems still running, each row one problem, parameters flattened to [A, N].

    The L-BFGS memory is a ring of HISTORY pairs (s, M y): s a step, y the gradient's change, M the
    preconditioner. It is float32 (it only shapes the direction) and ends with M g, so that one product
    with it gives the direction, and one more all the inner products the compact form needs.
    """

    rows: np.ndarray  # [A] positions in the solve's output
    problems: _Problems  # [A]
    theta: np.ndarray  # [A, N]
    loss: np.ndarray  # [A]
    grad: np.ndarray  # [A, N] float32
    memory: np.ndarray  # [A, 2 HISTORY + 1, N] float32: s by slot, then M y by slot, then M g
    projection: np.ndarray  # [A, 2 HISTORY + 1] memory . g
    sy: np.ndarray  # [A, HISTORY, HISTORY] s_i . y_j (kept where slot i is no newer than slot j)
    ymy: np.ndarray  # [A, HISTORY, HISTORY] y_i . M y_j
    used: np.ndarray  # [A, HISTORY] bool: the slot holds a pair of positive curvature
    gamma: np.ndarray  # [A] scale of the preconditioner, s . y / (y . M y) of the newest pair

    @classmethod
    def start(cls, problems: _Problems, precondition) -> "_Batch":
        """Every problem at theta = 0, with an empty memory."""
        P, K, width = len(problems), problems.n_classes, problems.X.shape[1]
        theta = np.zeros((P, K * width))
        loss, grad = problems.loss_gradient(theta.reshape(P, K, width))
        memory = np.zeros((P, 2 * HISTORY + 1, K * width), dtype=np.float32)
        precondition(grad, memory[:, -1].reshape(P, K, width))
        grad = grad.reshape(P, -1)
        projection = (memory @ grad[:, :, None])[:, :, 0].astype(np.float64)
        return cls(np.arange(P), problems, theta, loss, grad, memory, projection, np.zeros((P, HISTORY, HISTORY)),
                   np.zeros((P, HISTORY, HISTORY)), np.zeros((P, HISTORY), dtype=bool), np.ones(P))

    def restart(self, precondition) -> None:
        """Forget the curvature memory (its M y belong to the old preconditioner) and take M g anew."""
        P, K = len(self.rows), self.problems.n_classes
        self.used[:], self.gamma[:] = False, 1.0
        precondition(self.grad.reshape(P, K, -1), self.memory[:, -1].reshape(P, K, -1))
        self.projection = (self.memory @ self.grad[:, :, None])[:, :, 0].astype(np.float64)

    def keep(self, mask: np.ndarray) -> "_Batch":
        """The problems of the rows in mask [A] alone."""
        return _Batch(*(getattr(self, name)[mask] for name in self.__dataclass_fields__))

    def remember(self, slot: int, step: np.ndarray, grad: np.ndarray, failed: np.ndarray, precondition) -> None:
        """Put the pair of the step just taken (s [A, N] float32, the new gradient grad) in the memory's slot."""
        memory, blocks = self.memory, (len(self.rows), self.problems.n_classes, -1)  # [A, K, d + 1]
        memory[:, slot] = step
        gradients = np.empty((2, *grad.shape), dtype=np.float32)  # g and y = g - g_old, for one product
        gradients[0] = grad
        np.subtract(grad, self.grad, out=gradients[1])
        grad_m = np.empty_like(gradients[0])
        precondition(gradients[0].reshape(blocks), grad_m.reshape(blocks))
        np.subtract(grad_m, memory[:, -1], out=memory[:, HISTORY + slot])
        memory[:, -1] = grad_m
        products = (memory @ gradients.transpose(1, 2, 0)).astype(np.float64)  # [A, 2 HISTORY + 1, 2]
        # The new pair's column: s_i . y and M y_i . y for every slot i, itself included.
        self.sy[:, :, slot] = products[:, :HISTORY, 1]
        self.ymy[:, :, slot] = self.ymy[:, slot, :] = products[:, HISTORY:-1, 1]
        curvature, y_my = products[:, slot, 1], products[:, HISTORY + slot, 1]
        # Both > 0 on this strictly convex objective, up to rounding: M y is a difference of float32
        # products, which at a tight tol can be all rounding.
        positive = (curvature > 0) & (y_my > 0) & ~failed
        self.used[:, slot] = positive
        self.gamma = np.where(positive, curvature / np.maximum(y_my, 1e-300), self.gamma)
        self.grad, self.projection = gradients[0], products[:, :, 0]


def _direction(batch: _Batch, newest: int) -> np.ndarray:
    """-H g, H the L-BFGS inverse Hessian with H0 = gamma M, by the compact form (float32 [A, N]).

    H = H0 + [S, H0 Y] [[R^-T (D + Y' H0 Y) R^-1, -R^-T], [-R^-1, 0]] [S'; Y' H0], R the upper triangle
    of S'Y with the pairs oldest first, D its diagonal: the matrix of the two-loop recursion. An unused
    slot gets a unit row in R and zeros elsewhere, which leaves it out.
    """
    order = (newest + 1 + np.arange(HISTORY)) % HISTORY  # slots, oldest first
    used = batch.used[:, order]
    both = used[:, :, None] & used[:, None, :]
    sy = batch.sy[:, order][:, :, order]
    r = np.where(both, np.triu(sy), 0.0) + (~used)[:, :, None] * np.eye(HISTORY)
    gamma = batch.gamma[:, None]
    s_g = np.where(used, batch.projection[:, order], 0.0)  # S' g
    h0y_g = np.where(used, gamma * batch.projection[:, HISTORY + order], 0.0)  # Y' H0 g
    w = np.linalg.solve(r, s_g[:, :, None])  # [A, H, 1] R^-1 S' g
    middle = np.where(both, gamma[:, :, None] * batch.ymy[:, order][:, :, order], 0.0)
    middle[:, np.arange(HISTORY), np.arange(HISTORY)] += np.where(used, np.diagonal(sy, axis1=1, axis2=2), 0.0)
    p = np.linalg.solve(r.transpose(0, 2, 1), middle @ w - h0y_g[:, :, None])[:, :, 0]
    coefficients = np.empty((len(r), 1, 2 * HISTORY + 1), dtype=np.float32)  # of -H g on the memory's rows
    coefficients[:, 0, order], coefficients[:, 0, HISTORY + order] = -p, gamma * w[:, :, 0]
    coefficients[:, 0, -1] = -batch.gamma
    return (coefficients @ batch.memory)[:, 0]


def _line_search(batch: _Batch, direction: np.ndarray, slope: np.ndarray, shape):
    """Backtracking to a sufficient decrease, each problem its own step, starting from the full step.

    Returns the new (theta, loss, grad), [A] bool for problems no step could decrease, and the [A] steps.
    """
    step = np.ones(len(batch.rows))
    theta = batch.theta + direction
    loss, grad = batch.problems.loss_gradient(theta.reshape(shape))
    grad = grad.reshape(theta.shape)
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
        theta[rows] = batch.theta[rows] + step[rows][:, None] * direction[rows]
        loss[rows], grad_rows = batch.problems[rows].loss_gradient(theta[rows].reshape(-1, *shape[1:]))
        grad[rows] = grad_rows.reshape(len(rows), -1)
        pending[rows] = ~(loss[rows] <= batch.loss[rows] + ARMIJO * step[rows] * slope[rows])
    return theta, loss, grad, pending, step


def _solve(problems: _Problems, precondition, tol: float, max_iter: int, reference: np.ndarray, l2: float):
    """([P, K, d + 1] parameters, [P] steps, [P] converged) by batched, preconditioned L-BFGS from 0.

    After REFRESH_AFTER steps the preconditioner is rebuilt from the rows' curvature in the `reference`
    problems (their current parameters), and every problem's memory restarts with it.
    """
    batch = _Batch.start(problems, precondition)
    shape = (problems.n_classes, problems.X.shape[1])
    theta_out = np.zeros((len(problems), *shape))
    n_iter, converged = np.zeros(len(problems), dtype=np.int64), np.zeros(len(problems), dtype=bool)
    newest, steps = HISTORY - 1, 0
    failed = flat = np.zeros(len(problems), dtype=bool)
    while True:
        small = np.maximum(batch.grad.max(axis=1), -batch.grad.min(axis=1)) <= tol
        finished = small | flat | failed | (steps >= max_iter)
        if finished.any():
            done = batch.rows[finished]
            theta_out[done], n_iter[done] = batch.theta[finished].reshape(-1, *shape), steps
            converged[done] = (small | flat)[finished]
            batch = batch.keep(~finished)
            if len(batch.rows) == 0:
                return theta_out, n_iter, converged
        if steps == REFRESH_AFTER:
            current = theta_out.copy()
            current[batch.rows] = batch.theta.reshape(-1, *shape)
            curvature = problems[reference].row_curvature(current[reference])
            precondition = _curvature_preconditioner(problems.X, curvature, l2)
            batch.restart(precondition)
        direction = _direction(batch, newest)
        slope = _dot(batch.grad, direction).astype(np.float64)
        uphill = slope >= 0  # a poor curvature memory: forget it and take the preconditioned gradient step
        if uphill.any():
            batch.used[uphill], batch.gamma[uphill] = False, 1.0
            direction[uphill] = -batch.memory[uphill, -1]
            slope[uphill] = _dot(batch.grad[uphill], direction[uphill])
        theta, loss, grad, failed, step = _line_search(batch, direction, slope, (len(batch.rows), *shape))
        # scipy's other stopping rule: a step that lowers the objective by a relative 64 eps or less.
        flat = (batch.loss - loss) <= F_TOL * np.maximum(np.maximum(np.abs(batch.loss), np.abs(loss)), 1.0)
        flat &= ~failed
        if failed.any():  # keep the last point that decreased; its pair stays unused
            theta[failed], loss[failed], grad[failed] = batch.theta[failed], batch.loss[failed], batch.grad[failed]
        shortened = np.flatnonzero(step != 1.0)
        direction[shortened] *= step[shortened, None]  # now the step taken
        newest = (newest + 1) % HISTORY
        batch.remember(newest, direction, grad, failed, precondition)
        batch.theta, batch.loss = theta, loss
        steps += 1


def fit_many(X, labels, train, n_classes: int, *, C: float = 1.0, tol: float = 1e-3,
             max_iter: int = 1000, reference=None) -> MultinomialFits:
    """Fit P standardized multinomial logistic regressions on the rows of one X [n, width].

    labels [P, n] class indices in 0..n_classes-1 (each problem its own), train [P, n] bool (each
    problem's training rows). Problem p is `linear_probe(C)` fitted on X[train[p]], labels[p, train[p]].
    `reference` (problem indices; default all) shapes the solver's second preconditioner: in exact
    arithmetic a problem's path depends on itself and on them alone, whatever else is in the batch (the
    float32 products round differently with the batch's size: ~1e-4 in probability).
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
    reference = np.arange(len(labels)) if reference is None else np.asarray(reference)
    theta, n_iter, converged = _solve(problems, precondition, tol, max_iter, reference, 1.0 / (C * len(X)))
    # Each problem standardized the globally standardized X again; in X's own units that is one affine map.
    center, spread = X.mean(axis=0), X.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    intercept = np.where(problems.present, theta[:, :, -1], -np.inf)
    return MultinomialFits(coef=theta[:, :, :-1], intercept=intercept,
                           mean=center + spread * problems.mean, scale=spread * problems.scale,
                           n_iter=n_iter, converged=converged)


def out_of_fold_probabilities(X, label_sets, fold_sets, n_classes: int, *, C: float = 1.0, tol: float = 1e-3,
                              max_iter: int = 1000) -> np.ndarray:
    """[S, n, n_classes] out-of-fold probabilities of each labelling label_sets[s] [n] under its folds fold_sets[s] [n].

    Every (labelling, fold) pair is one problem of one `fit_many`: the model trained off the fold
    predicts the fold's rows. The first labelling's problems shape the solver's second preconditioner,
    so its probabilities depend on the labellings fitted beside it only through rounding (~1e-4).
    """
    label_sets, fold_sets = np.atleast_2d(label_sets), np.atleast_2d(fold_sets)
    pairs = [(s, fold) for s in range(len(label_sets)) for fold in np.unique(fold_sets[s])]
    labels = np.stack([label_sets[s] for s, _ in pairs])
    train = np.stack([fold_sets[s] != fold for s, fold in pairs])
    fits = fit_many(X, labels, train, n_classes, C=C, tol=tol, max_iter=max_iter,
                    reference=[p for p, (s, _) in enumerate(pairs) if s == 0])
    X = np.asarray(X, dtype=np.float64)
    out = np.empty((len(label_sets), label_sets.shape[1], n_classes))
    for p, (s, _) in enumerate(pairs):  # each model on its own held-out rows only
        out[s, ~train[p]] = _probabilities(fits, [p], X[~train[p]])[0]
    return out
