"""Hadamard matrices of the sizes LLMs use, and seeded random orthogonal matrices.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal.
Orders are 1, 2 or multiples of 4. We build them as Kronecker products ``H_m (x) H_p``
(index ``a * p + b``) of a small *base* order m and a power of two p (Sylvester), which is
also what the fast online transform computes: a dense m x m step and a Walsh-Hadamard
butterfly over p (``passes/rotate_online.py``).

Base orders we construct (``base_order_of`` picks the smallest that divides n with a
power-of-two quotient):

* 1, 2: Sylvester.
* q + 1 for a prime q = 3 (mod 4): Paley I (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, 104, 108,
  140, ...).
* 2 (q + 1) for a prime q = 1 (mod 4): Paley II (12, 28, 36, 60, 76, 84, 108, 124, 148, ...).
* 4 n from four circulant +-1 sequences of odd length n whose periodic autocorrelations sum
  to zero, through the Goethals-Seidel array (52 = 4*13, 92 = 4*23, 100 = 4*25, 116 = 4*29, 156 = 4*39 and 172 = 4*43 for
  Llama-2-7B's MLP 11008 = 172 * 64). The sequences below were found by our own seeded
  stochastic (tabu) search, ``_search_gs_sequences(n, seed=0)``, which reproduces them (43
  takes ~1-2 min, 39 ~4 min); the test suite checks H H^T = n I for every order we ship.

Prime powers (Paley over GF(p^k)) are not implemented; 28 = Paley II(13) and 52 = GS(13)
cover the small ones. A size with no construction raises ``ValueError`` suggesting
``random-orthogonal``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

import numpy as np

ROTATION_KINDS = ("hadamard", "random-orthogonal")

# Goethals-Seidel sequences: four +-1 sequences (as '+'/'-' strings) of odd length n with
# sum_j PAF_j(s) = 0 for s != 0. Found by _search_gs_sequences(n, seed=0).
_GS_SEQUENCES: Dict[int, Tuple[str, str, str, str]] = {
    13: ("+++----+-+--+", "+++++++-++--+", "+-+++--+-+---", "-+-+--+++-++-"),
    23: ("++---+++--+--+-++++--+-", "---++++++-+-+----+-++++", "++-++--+++-++-+-+++-+++",
         "+----++-++-+++-+++-+---"),
    25: ("++++++---+-+++----+++--++", "-+--++-+-++-++++-+-+++--+", "-+--+++-++-++-+--++-+++-+",
         "---+++-+--++--+++-+------"),
    29: ("++++++++--+++++---++---++-+-+", "--+++-+--+--++--+-+-+++-+-+-+", "--++---++-+++-++-+--++++-+--+",
         "+++++++----+-+-+--++++--+--++"),
    39: ("+--++-+--+-++++-+-+---+--+--+----+----+", "-+-+++---+-+----+--++-++-++-+---+------",
         "++++--+-++-+-+-+++-++---+-+-++----+---+", "++---++--++---+-++++-----+++-++++++--++"),
    43: ("-+++++----+--+------+-----+++-+-+----+-+++-",
         "-++-+-+---+++---++---++++--+--++--++-+-+---",
         "+++--+---+-+-++---+-+---+-++-+--+--+-++-+++",
         "--+---++--++-+++++++--++-++-++-+-+-++++++--"),
}


# ----------------------------------------------------------------------------- helpers

def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) over GF(q), q prime (chi: the Legendre symbol, chi(0) = 0)."""
    squares = np.zeros(q, dtype=np.int64)
    squares[[(x * x) % q for x in range(1, q)]] = 1
    chi = np.where(squares == 1, 1, -1)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


# ----------------------------------------------------------------------------- constructions

def sylvester(n: int) -> np.ndarray:
    """Sylvester's H_n for a power of two n: H[i, j] = (-1)^popcount(i & j)."""
    if not is_pow2(n):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def paley1(q: int) -> np.ndarray:
    """Paley I: order q + 1 for a prime q = 3 (mod 4). H = I + S, S skew conference matrix."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), got {q}")
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def paley2(q: int) -> np.ndarray:
    """Paley II: order 2 (q + 1) for a prime q = 1 (mod 4), from the symmetric conference matrix C."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), got {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                             np.array([[1, -1], [-1, -1]]))


def goethals_seidel(a, b, c, d) -> np.ndarray:
    """Order 4n from four +-1 sequences of length n with zero summed periodic autocorrelation."""
    n = len(a)
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    A, B, C, D = (np.asarray(s, dtype=np.int64)[idx] for s in (a, b, c, d))  # circulants
    R = np.eye(n, dtype=np.int64)[::-1]
    return np.block([
        [A, B @ R, C @ R, D @ R],
        [-B @ R, A, D.T @ R, -C.T @ R],
        [-C @ R, -D.T @ R, A, B.T @ R],
        [-D @ R, C.T @ R, -B.T @ R, A],
    ])


def _gs_matrix(n: int) -> np.ndarray:
    return goethals_seidel(*([1 if ch == "+" else -1 for ch in s] for s in _GS_SEQUENCES[n]))


def _base_construction(m: int):
    """A function building the base order m directly (no power-of-two factor split off), or None."""
    if m in (1, 2):
        return lambda: sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return lambda: paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return lambda: paley2(m // 2 - 1)
    if m // 4 in _GS_SEQUENCES:
        return lambda: _gs_matrix(m // 4)
    return None


def base_order_of(n: int) -> int:
    """The smallest constructible base order m with n = m * 2^j; ValueError if there is none."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    for j in range(twos + 1):
        if _base_construction(odd << j) is not None:
            return odd << j
    raise ValueError(
        f"no Hadamard construction for size {n} = {odd} x 2^{twos}: need a base order {odd} x 2^j that is "
        f"1, 2, a Paley order (q+1 or 2(q+1), q prime) or one of the Goethals-Seidel orders "
        f"{sorted(4 * k for k in _GS_SEQUENCES)}; use rotation kind 'random-orthogonal' for this size")


def supported(n: int) -> bool:
    try:
        base_order_of(n)
        return True
    except ValueError:
        return False


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> np.ndarray:
    h = _base_construction(m)()
    h.setflags(write=False)
    return h


def hadamard_factors(n: int) -> Tuple[np.ndarray, int]:
    """(H_m, p) with H_n = kron(H_m, H_p): H_m the +-1 base matrix, p = n / m a power of two."""
    m = base_order_of(n)
    return _base_matrix(m), n // m


def hadamard_matrix(n: int) -> np.ndarray:
    """A +-1 Hadamard matrix of order n (int64): kron(H_m, Sylvester H_p)."""
    hm, p = hadamard_factors(n)
    return np.kron(hm, sylvester(p))


# ----------------------------------------------------------------------------- transforms

def fwht(x: np.ndarray, normalize: bool = True) -> np.ndarray:
    """y = x H_n^T along the last axis (each row vector x -> H_n x), in float64.

    H_n = kron(H_m, H_p): a dense m x m step then the in-place butterfly over p. Normalized by
    1/sqrt(n) (orthogonal) unless ``normalize=False``. The reference for the TIR kernels.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    hm, p = hadamard_factors(n)
    lead = x.shape[:-1]
    y = np.einsum("ac,...cb->...ab", hm.astype(np.float64), x.reshape(*lead, n // p, p))
    h = 1
    while h < p:
        y = y.reshape(*lead, n // p, p // (2 * h), 2, h)
        u, v = y[..., 0, :], y[..., 1, :]
        y = np.stack([u + v, u - v], axis=-2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / np.sqrt(n) if normalize else y


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64, seeded."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """An n x n orthogonal matrix (float64) for offline (fused) rotations.

    ``hadamard``: QuaRot's randomized Hadamard diag(s) H_n / sqrt(n), s seeded random signs;
    ``random-orthogonal``: Haar-random. Raises ValueError for a kind or size we cannot build.
    """
    if kind == "hadamard":
        h = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
        return signs[:, None] * h
    if kind == "random-orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; valid: {', '.join(ROTATION_KINDS)}")


# ----------------------------------------------------------------------------- search (offline)

def _search_gs_sequences(n: int, seed: int = 0, max_steps: int = 1_000_000):
    """Tabu search for four +-1 sequences of odd length n with zero summed periodic
    autocorrelation (how _GS_SEQUENCES was made). Returns four '+'/'-' strings or None."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1, 1], size=(4, n)).astype(np.int64)
    shifts = np.arange(1, n // 2 + 1)  # PAF(s) == PAF(n - s)
    total = np.stack([(x * np.roll(x, -s, axis=1)).sum() for s in shifts])
    tabu = np.zeros((4, n), dtype=np.int64)
    for step in range(max_steps):
        if not total.any():
            return tuple("".join("+" if v > 0 else "-" for v in row) for row in x)
        plus = np.stack([np.roll(x, -s, axis=1) for s in shifts], axis=-1)
        minus = np.stack([np.roll(x, s, axis=1) for s in shifts], axis=-1)
        delta = -2 * x[..., None] * (plus + minus)  # change of every PAF(s) when flipping (j, i)
        cost = ((total[None, None, :] + delta) ** 2).sum(-1).astype(np.float64)
        cost = np.where(tabu > step, np.inf, cost) + rng.random(cost.shape)
        j, i = np.unravel_index(np.argmin(cost), cost.shape)
        total = total + delta[j, i]
        x[j, i] = -x[j, i]
        tabu[j, i] = step + rng.integers(n // 4, n // 2 + 2)
    return None
