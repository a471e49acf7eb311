"""The step cost model: seconds = fixed + per_decode * decode tokens + per_token * chunk tokens, fitted by
least squares over the steps that ran. The scheduler sizes each step's budget from it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    """What one step ran and what it cost (the runner measures, the scheduler learns)."""

    decode_tokens: int
    chunk_tokens: int
    seconds: float


@dataclass
class CostModel:
    """Measured step cost: seconds = fixed + per_decode * decode tokens + per_token * chunk tokens,
    fitted by least squares over exponentially forgotten (tokens, seconds) samples of every step."""

    fixed_seconds: float = 0.0
    decode_seconds_per_token: float = 2e-4
    chunk_seconds_per_token: float = 2e-4
    alpha: float = 0.1
    samples: int = 0
    _xx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])
    _xy: list[float] = field(default_factory=lambda: [0.0] * 3)

    def observe(self, stats: StepStats) -> None:
        x = (1.0, float(stats.decode_tokens), float(stats.chunk_tokens))
        if x[1] + x[2] == 0:
            return
        a = self.alpha if self.samples else 1.0
        for i in range(3):
            self._xy[i] += a * (x[i] * stats.seconds - self._xy[i])
            for j in range(3):
                self._xx[i][j] += a * (x[i] * x[j] - self._xx[i][j])
        self.samples += 1
        self._solve()

    def _solve(self) -> None:
        """The least-squares fit, with a small ridge so one step shape so far still gives an answer;
        a negative coefficient (noise, too few shapes) keeps the previous estimate."""
        scale = max(self._xx[0][0], 1e-12)
        m = [[self._xx[i][j] + (1e-3 * scale * (self._xx[i][i] or 1.0) if i == j else 0.0) for j in range(3)] for i in range(3)]
        theta = _solve3(m, list(self._xy))
        if theta is None:
            return
        fixed, per_decode, per_chunk = theta
        if per_decode > 0:
            self.decode_seconds_per_token = per_decode
        if per_chunk > 0:
            self.chunk_seconds_per_token = per_chunk
        self.fixed_seconds = max(0.0, fixed)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / max(self.chunk_seconds_per_token, 1e-9)

    def decode_seconds(self, running: int) -> float:
        return self.fixed_seconds + self.decode_seconds_per_token * running

    def budget(self, spare_seconds: float, least: int, most: int) -> int:
        """Chunk tokens that fit `spare_seconds`, within [least, most]."""
        return int(max(least, min(most, spare_seconds / max(self.chunk_seconds_per_token, 1e-9))))


def _solve3(m: list[list[float]], y: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a 3x3 system (None if singular)."""
    a = [[*row, v] for row, v in zip(m, y)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            for c in range(col, 4):
                a[r][c] -= f * a[col][c]
    out = [0.0] * 3
    for r in (2, 1, 0):
        out[r] = (a[r][3] - sum(a[r][c] * out[c] for c in range(r + 1, 3))) / a[r][r]
    return out
