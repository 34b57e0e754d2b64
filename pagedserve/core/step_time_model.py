"""The SLO controller's step-time model (core/slo_controller.py): a step's wall time as a linear
function of its composition, fitted online. Pure Python."""

from __future__ import annotations


class StepTimeModel:
    """Exponentially weighted ridge regression of step time on the step's composition.

    features x = [1, seqs, tokens, context / 1024, 1 if the step prefills]; the last one is the
    fixed extra cost of a mixed step (on a GPU decode-only steps replay CUDA graphs, mixed ones
    run eagerly). Keeps A = sum w x x^T and b = sum w x y (5 x 5 and 5), solved on demand. Tiny,
    so plain lists and Gaussian elimination.
    """

    DIM = 5

    def __init__(self, forgetting: float, ridge: float = 1e-8) -> None:
        self.forgetting = forgetting
        self.ridge = ridge
        self.a = [[0.0] * self.DIM for _ in range(self.DIM)]
        self.b = [0.0] * self.DIM
        self.num_samples = 0
        self._weights: list[float] | None = None

    @staticmethod
    def features(num_seqs: int, num_tokens: int, context_tokens: int, prefill: bool | None = None) -> list[float]:
        """prefill None: a step prefills when it has more tokens than requests."""
        mixed = num_tokens > num_seqs if prefill is None else prefill
        return [1.0, float(num_seqs), float(num_tokens), context_tokens / 1024.0, float(mixed)]

    def add(self, x: list[float], y: float) -> None:
        f = self.forgetting
        for i in range(self.DIM):
            self.b[i] = f * self.b[i] + x[i] * y
            row = self.a[i]
            for j in range(self.DIM):
                row[j] = f * row[j] + x[i] * x[j]
        self.num_samples += 1
        self._weights = None

    def weights(self) -> list[float] | None:
        """The fitted weights, or None before enough samples. Negative costs (noise, collinear
        features; the intercept too: a negative fixed cost let a cold start's slow steps inflate
        the per-token cost 7-fold) are clamped to 0 and the rest refitted, so predictions are
        monotone and no cost is negative."""
        if self.num_samples < 2 * self.DIM:
            return None
        if self._weights is None:
            active = list(range(self.DIM))
            while True:
                w = _solve([[self.a[i][j] for j in active] for i in active], [self.b[i] for i in active],
                           self.ridge)
                full = [0.0] * self.DIM
                for k, i in enumerate(active):
                    full[i] = w[k]
                negative = [i for i in active if full[i] < 0]
                if not negative:
                    break
                active = [i for i in active if i not in negative]
            self._weights = full
        return self._weights

    def predict(self, num_seqs: int, num_tokens: int, context_tokens: int,
                prefill: bool | None = None) -> float | None:  # fmt: skip
        w = self.weights()
        if w is None:
            return None
        x = self.features(num_seqs, num_tokens, context_tokens, prefill)
        return sum(wi * xi for wi, xi in zip(w, x))


def _solve(a: list[list[float]], b: list[float], ridge: float) -> list[float]:
    """Solve (a + ridge * diag(a)) w = b by Gaussian elimination with partial pivoting (the
    ridge is relative to each feature's own scale, so it only settles collinear directions)."""
    n = len(b)
    m = [[a[i][j] * (1 + ridge if i == j else 1.0) for j in range(n)] + [b[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= factor * m[col][c]
    w = [0.0] * n
    for r in range(n - 1, -1, -1):
        if abs(m[r][r]) < 1e-300:
            continue
        w[r] = (m[r][n] - sum(m[r][c] * w[c] for c in range(r + 1, n))) / m[r][r]
    return w
