"""Assignment 1: block max-pooling (msa_ref.block_scores) and top-k with the local block (msa_ref.select_blocks).
Each function is compared with a brute-force loop written from DESIGN.md's definition. Inputs are small
integers, so every score is exact and ties really happen (the rule: the lower block index first)."""
import math

import pytest
import torch

import msa_ref
from conftest import assert_close


def ints(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).double()


def brute_scores(qi, ki, bs, q_pos):
    """S[b, g, t, c] = max over visible tokens j of block c of qi[b, g, t] . ki[b, j] / sqrt(Di), or -inf."""
    B, Hkv, Tq, Di = qi.shape
    Tk = ki.shape[1]
    nb = math.ceil(Tk / bs)
    S = torch.full((B, Hkv, Tq, nb), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for g in range(Hkv):
            for t in range(Tq):
                tq = int(q_pos[b, g, t])
                for j in range(min(Tk, tq + 1)):
                    S[b, g, t, j // bs] = max(S[b, g, t, j // bs], float(qi[b, g, t] @ ki[b, j]) / math.sqrt(Di))
    return S


def brute_select(S, q_pos, bs, K):
    """The K-1 best earlier blocks (descending score, ties: lower index first), the local block, then -1."""
    B, Hkv, Tq, nb = S.shape
    idx = torch.full((B, Hkv, Tq, K), -1, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            for t in range(Tq):
                local = int(q_pos[b, g, t]) // bs
                far = sorted(range(local), key=lambda c: (-float(S[b, g, t, c]), c))[:K - 1]
                row = far + [local]
                idx[b, g, t, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("B, Hkv, T, Di, bs", [(1, 1, 1, 4, 4), (2, 2, 19, 4, 4), (1, 3, 16, 3, 8), (1, 1, 23, 2, 1)])
def test_block_scores_prefill(B, Hkv, T, Di, bs):
    qi, ki = ints(B, Hkv, T, Di, seed=1), ints(B, T, Di, seed=2)
    q_pos = torch.arange(T)
    got = msa_ref.block_scores(qi, ki, bs, q_pos)
    want = brute_scores(qi, ki, bs, q_pos.expand(B, Hkv, T))
    assert_close(got.double(), want, what="block_scores")


def test_block_scores_one_query_per_row():
    """Decoding asks for one query per sequence at its own position: q_pos of shape (B, 1, 1)."""
    qi, ki = ints(3, 2, 1, 4, seed=3), ints(3, 21, 4, seed=4)
    q_pos = torch.tensor([0, 9, 20]).view(3, 1, 1)
    got = msa_ref.block_scores(qi, ki, 4, q_pos)
    assert_close(got.double(), brute_scores(qi, ki, 4, q_pos.expand(3, 2, 1)), what="block_scores")


@pytest.mark.parametrize("T, bs, K", [(1, 4, 3), (37, 4, 3), (37, 4, 1), (16, 4, 8), (30, 5, 4)])
def test_select_blocks(T, bs, K):
    nb = math.ceil(T / bs)
    S = ints(2, 2, T, nb, seed=T + K)   # many ties
    q_pos = torch.arange(T)
    got = msa_ref.select_blocks(S, q_pos, bs, K)
    assert_close(got, brute_select(S, q_pos.expand(2, 2, T), bs, K), what="select_blocks")   # int32 (2, 2, T, K), exact


def test_select_blocks_ignores_later_blocks():
    """Scores of the local block and of later blocks must not compete, however large they are."""
    S = torch.tensor([[1.0, 2.0, 9.0, 9.0, 9.0]])   # one query at position 11, bs 4: local block 2
    got = msa_ref.select_blocks(S, torch.tensor([11]), 4, 2)
    assert_close(got, torch.tensor([[1, 2]], dtype=torch.int32), what="select_blocks")


@pytest.mark.parametrize("B, Hkv, T, bs, K", [(1, 1, 1, 4, 2), (2, 2, 29, 4, 3), (1, 2, 24, 8, 16), (1, 1, 40, 4, 1)])
def test_index_topk_end_to_end(B, Hkv, T, bs, K):
    qi, ki = ints(B, Hkv, T, 4, seed=5), ints(B, T, 4, seed=6)
    got = msa_ref.index_topk(qi, ki, bs, K)
    want = brute_select(brute_scores(qi, ki, bs, torch.arange(T).expand(B, Hkv, T)), torch.arange(T).expand(B, Hkv, T), bs, K)
    assert_close(got, want, what="index_topk")
    valid = (got >= 0).sum(-1)                                   # min(K, l + 1) valid entries per query
    assert_close(valid, torch.clamp(torch.arange(T) // bs + 1, max=K).expand(B, Hkv, T).to(valid.dtype), what="valid entries per query")
