"""
Tests of msa_ref.py, the definition every other implementation is compared with. So these tests do
not trust msa_ref's own helpers: the dense attention, the token support of a block selection, the
top-k and the KL are rebuilt here from DESIGN.md section 1, with plain loops where that is clearest.
Shapes are tiny and mostly float64, so comparisons can be tight and block scores have no ties
unless a test builds them on purpose.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import conftest
import msa_ref

f64 = torch.float64


def rand_inputs(*args, **kw):
    """conftest's random inputs, on the CPU even where a GPU is present: these references are CPU tensors."""
    return conftest.rand_inputs(*args, device="cpu", **kw)


# ---------------------------------------------------------------------------------------------
# independent references

def dense_gqa(q, k, v):
    """Causal GQA with an explicit softmax. q (B, Hq, T, D), k v (B, Hkv, T, D) -> out, lse (B, Hq, T)."""
    return masked_gqa(q, k, v, torch.ones(k.shape[0], k.shape[1], q.shape[2], k.shape[2], dtype=torch.bool))


def masked_gqa(q, k, v, mask):
    """Softmax attention of every head over mask (B, Hkv, T, T) & causal. Returns out, lse (B, Hq, T)."""
    G = q.shape[1] // k.shape[1]
    T = q.shape[2]
    mask = mask & torch.ones(T, T, dtype=torch.bool).tril()
    kk, vv, mm = (x.repeat_interleave(G, dim=1) for x in (k, v, mask))       # heads of a group share k, v
    s = (q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mm, float("-inf"))
    return torch.softmax(s, -1) @ vv, s.logsumexp(-1)


def support_from_idx(block_idx, bs):
    """bool (B, Hkv, T, T): key j is in a selected block of query t and j <= t. Plain loops."""
    B, Hkv, T, K = block_idx.shape
    mask = torch.zeros(B, Hkv, T, T, dtype=torch.bool)
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                blocks = {c for c in block_idx[b, g, t].tolist() if c >= 0}
                for j in range(t + 1):
                    mask[b, g, t, j] = j // bs in blocks
    return mask


def brute_topk(qi, ki, bs, K):
    """DESIGN.md section 1 step by step, one query at a time: block max of the token scores, the K-1 best
    earlier blocks by descending score (ties: lower block first), the local block, -1 padding."""
    B, Hkv, T, Di = qi.shape
    s = (torch.einsum("bgtd,bjd->bgtj", qi.double(), ki.double()) / math.sqrt(Di)).tolist()
    out = torch.full((B, Hkv, T, K), -1, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                local = t // bs
                best = {}                                   # block -> max score over its tokens
                for j in range(local * bs):                 # tokens of the earlier blocks, all visible
                    best[j // bs] = max(best.get(j // bs, -math.inf), s[b][g][t][j])
                row = sorted(best, key=lambda c: (-best[c], c))[:K - 1] + [local]
                out[b, g, t, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def kl_reference(q, k, qi, ki, mask):
    """kl_loss from its formula, support mask (B, Hkv, T, T). Returns kl, p, r (B, Hkv, T, T)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kk, mm = k.repeat_interleave(G, dim=1), mask.repeat_interleave(G, dim=1)
    att = torch.softmax((q @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mm, float("-inf")), -1)
    p = att.view(B, Hkv, G, T, T).mean(2)                                       # teacher, heads averaged
    si = qi @ ki.unsqueeze(1).transpose(-1, -2) / math.sqrt(qi.shape[-1])
    r = torch.softmax(si.masked_fill(~mask, float("-inf")), -1)                 # student
    terms = torch.where(mask & (p > 0), p * (p.log() - r.log()), torch.zeros((), dtype=p.dtype))
    return terms.sum(-1).mean(), p, r


def check_invariants(block_idx, T, bs, K):
    """The contract of block_idx, row by row."""
    assert block_idx.dtype == torch.int32 and block_idx.shape[-2:] == (T, K)
    for row_t, rows in zip(range(T), block_idx.transpose(0, 2).reshape(T, -1, K)):
        local = row_t // bs
        n_valid = min(K, local + 1)
        for row in rows.tolist():
            assert row[n_valid:] == [-1] * (K - n_valid), f"t={row_t}: -1 padding after {n_valid} entries: {row}"
            valid = row[:n_valid]
            assert valid[-1] == local, f"t={row_t}: local block {local} must be the last valid entry: {row}"
            assert all(0 <= c <= local for c in valid), f"t={row_t}: future or negative block in {row}"
            assert len(set(valid)) == n_valid, f"t={row_t}: duplicate block in {row}"


# ---------------------------------------------------------------------------------------------
# sparse_attention

@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 4, 7, 13])
def test_full_selection_equals_dense_causal_gqa(T, G):
    B, Hkv, D, Di, bs = 2, 2, 8, 4, 4
    q, k, v, qi, ki = rand_inputs(B, Hkv * G, Hkv, T, D, Di, dtype=f64, seed=T * 10 + G)
    want_out, want_lse = dense_gqa(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(sdpa, want_out)                                  # the two dense references agree
    nb = math.ceil(T / bs)
    for K in (nb, nb + 2):                                                      # K * bs >= T: all blocks visible
        idx = msa_ref.index_topk(qi, ki, bs, K)
        out, lse = msa_ref.sparse_attention(q, k, v, idx, bs)
        assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3]
        torch.testing.assert_close(out, sdpa)
        torch.testing.assert_close(lse, want_lse)


def test_float32_and_bf16_inputs():
    q, k, v, qi, ki = rand_inputs(1, 4, 2, 9, 16, 8, dtype=torch.float32)
    idx = msa_ref.index_topk(qi, ki, 4, 3)
    out, lse = msa_ref.sparse_attention(q, k, v, idx, 4)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    out_b, lse_b = msa_ref.sparse_attention(qb, kb, vb, idx, 4)                 # computed in fp32, returned in bf16
    assert out_b.dtype == torch.bfloat16 and lse_b.dtype == torch.float32
    want = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out_b.float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("T,K", [(13, 1), (13, 2), (16, 3), (23, 2)])
def test_sparse_selection_equals_masked_softmax(T, K):
    """K * bs < T: the tokens of the chosen blocks only, with the support rebuilt by loops here."""
    B, Hkv, G, D, Di, bs = 2, 2, 2, 8, 4, 4
    q, k, v, qi, ki = rand_inputs(B, Hkv * G, Hkv, T, D, Di, dtype=f64, seed=T + K)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    want_out, want_lse = masked_gqa(q, k, v, support_from_idx(idx, bs))
    out, lse = msa_ref.sparse_attention(q, k, v, idx, bs)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    dense_out, _ = dense_gqa(q, k, v)
    assert not torch.allclose(out, dense_out), "the selection should matter at these sizes"


def test_local_block_only():
    """K = 1: each query reads its own block up to itself."""
    T, bs = 11, 4
    q, k, v, qi, ki = rand_inputs(2, 4, 2, T, 8, 4, dtype=f64)
    idx = msa_ref.index_topk(qi, ki, bs, 1)
    assert idx.tolist() == (torch.arange(T) // bs).view(1, 1, T, 1).expand(2, 2, T, 1).tolist()
    same_block = (torch.arange(T)[:, None] // bs) == (torch.arange(T)[None, :] // bs)   # (T, T)
    want_out, want_lse = masked_gqa(q, k, v, same_block.expand(2, 2, T, T))
    out, lse = msa_ref.sparse_attention(q, k, v, idx, bs)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_single_token():
    """T = 1: the only key is the token itself, so out = its v and lse = its own score."""
    q, k, v, qi, ki = rand_inputs(2, 4, 2, 1, 8, 4, dtype=f64)
    idx = msa_ref.index_topk(qi, ki, 128, 3)
    assert idx.tolist() == [[[[0, -1, -1]]] * 2] * 2
    out, lse = msa_ref.sparse_attention(q, k, v, idx, 128)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(lse, (q * k.repeat_interleave(2, dim=1)).sum(-1) / math.sqrt(8))
    assert msa_ref.kl_loss(q, k, qi, ki, idx, 128).item() == 0.0              # one token: p = r = 1


def test_block_larger_than_sequence():
    T, bs = 6, 16
    q, k, v, qi, ki = rand_inputs(1, 2, 1, T, 8, 4, dtype=f64)
    idx = msa_ref.index_topk(qi, ki, bs, 2)
    assert idx.tolist() == [[[[0, -1]] * T]]
    out, lse = msa_ref.sparse_attention(q, k, v, idx, bs)
    want_out, want_lse = dense_gqa(q, k, v)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_row_without_keys_gives_zero_and_minus_inf():
    """A hand-made block_idx without the local block: query 0 sees no key at all."""
    q, k, v, _, _ = rand_inputs(1, 2, 1, 5, 8, 4, dtype=f64)
    idx = torch.full((1, 1, 5, 1), -1, dtype=torch.int32)
    out, lse = msa_ref.sparse_attention(q, k, v, idx, 2)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_non_contiguous_inputs():
    B, Hq, Hkv, T, D, Di, bs, K = 2, 4, 2, 10, 8, 4, 4, 2
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=f64).transpose(1, 2)       # (B, Hq, T, D) view
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=f64).transpose(1, 2)
    v = torch.randn(B, Hkv, D, T, generator=g, dtype=f64).transpose(2, 3)
    qi = torch.randn(B, T, Hkv, Di, generator=g, dtype=f64).transpose(1, 2)
    ki = torch.randn(B, Di, T, generator=g, dtype=f64).transpose(1, 2)         # (B, T, Di) view
    assert not any(x.is_contiguous() for x in (q, k, v, qi, ki))
    idx = msa_ref.index_topk(qi, ki, bs, K)
    assert torch.equal(idx, msa_ref.index_topk(qi.contiguous(), ki.contiguous(), bs, K))
    idx_view = idx.transpose(1, 2).contiguous().transpose(1, 2)               # same values, other strides
    assert not idx_view.is_contiguous()
    c = [x.contiguous() for x in (q, k, v)]
    for got, want in zip(msa_ref.sparse_attention(q, k, v, idx_view, bs), msa_ref.sparse_attention(*c, idx, bs)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(msa_ref.kl_loss(q, k, qi, ki, idx_view, bs),
                               msa_ref.kl_loss(c[0], c[1], qi.contiguous(), ki.contiguous(), idx, bs))


def hand_made_idx(B, Hkv, T, bs, K, seed):
    """A block_idx as a caller may build one, which msa_ref takes as it comes: slots in any order, -1 holes
    anywhere, future blocks, a block listed twice (every other row, K >= 3) and block 0, a sink, in every row
    (so that no row is empty). int32 (B, Hkv, T, K)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, math.ceil(T / bs), (B, Hkv, T, K), generator=g)
    if K >= 3:
        idx[:, :, ::2, -1] = idx[:, :, ::2, -2]
    idx[..., 0] = 0
    return idx.to(torch.int32)


@pytest.mark.parametrize("G, K", [(1, 3), (2, 4), (2, 1), (1, 1)])
def test_hand_made_selections(G, K):
    """sparse_attention and kl_loss on hand_made_idx against the support rebuilt by loops: a repeated block counts
    once, a future block adds nothing, a -1 nothing."""
    B, Hkv, T, D, Di, bs = 2, 2, 11, 8, 4, 3
    q, k, v, qi, ki = rand_inputs(B, Hkv * G, Hkv, T, D, Di, dtype=f64, seed=40 + 4 * G + K)
    idx = hand_made_idx(B, Hkv, T, bs, K, seed=G + K)
    mask = support_from_idx(idx, bs)
    want_out, want_lse = masked_gqa(q, k, v, mask)
    out, lse = msa_ref.sparse_attention(q, k, v, idx, bs)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(msa_ref.kl_loss(q, k, qi, ki, idx, bs), kl_reference(q, k, qi, ki, mask)[0])


@pytest.mark.parametrize("T, G, K, sink", [(1, 2, 2, False),     # one token
                                           (7, 1, 1, False),     # G = 1, K = 1: the local block only
                                           (7, 2, 3, True)])     # block 0 in every row, with holes and repeats
def test_gradcheck_at_the_edges(T, G, K, sink):
    """Gradients of sparse_attention (through out and lse) and of kl_loss against finite differences."""
    B, Hkv, D, Di, bs = 2, 2, 3, 3, 2
    q, k, v, qi, ki = rand_inputs(B, Hkv * G, Hkv, T, D, Di, dtype=f64, seed=50 + T + G)
    idx = hand_made_idx(B, Hkv, T, bs, K, seed=T) if sink else msa_ref.index_topk(qi, ki, bs, K)
    q, k, v, qi, ki = (x.requires_grad_() for x in (q, k, v, qi, ki))
    assert torch.autograd.gradcheck(lambda q, k, v: msa_ref.sparse_attention(q, k, v, idx, bs), (q, k, v))
    assert torch.autograd.gradcheck(lambda qi, ki: msa_ref.kl_loss(q, k, qi, ki, idx, bs), (qi, ki))


# ---------------------------------------------------------------------------------------------
# index_topk

@pytest.mark.parametrize("K", [1, 2, 3, 6, 8])
def test_index_topk_matches_brute_force(K):
    B, Hkv, T, Di, bs = 2, 2, 23, 5, 4                                           # nb = 6, last block partial
    _, _, _, qi, ki = rand_inputs(B, Hkv, Hkv, T, 4, Di, dtype=f64, seed=K)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    check_invariants(idx, T, bs, K)
    assert idx.tolist() == brute_topk(qi, ki, bs, K).tolist()


def test_index_topk_float32_invariants():
    _, _, _, qi, ki = rand_inputs(1, 2, 2, 37, 4, 8, dtype=torch.float32, seed=5)
    check_invariants(msa_ref.index_topk(qi, ki, 8, 3), 37, 8, 3)


def test_index_topk_future_tokens_do_not_matter():
    """Changing tokens after t leaves row t's selection unchanged (no peeking into the local block's future)."""
    _, _, _, qi, ki = rand_inputs(1, 2, 2, 16, 4, 4, dtype=f64, seed=7)
    idx = msa_ref.index_topk(qi, ki, 4, 2)
    ki2 = ki.clone()
    ki2[:, 10:] = 100.0                                                          # huge future scores
    idx2 = msa_ref.index_topk(qi, ki2, 4, 2)
    assert torch.equal(idx[:, :, :10], idx2[:, :, :10])


def test_index_topk_ties_prefer_lower_block():
    """Block maxima [5, 1, 5, 3, ...] for every query: blocks 0 and 2 tie and beat 3, then 1."""
    bs, T = 4, 20
    ki = torch.zeros(1, T, 1, dtype=f64)
    for block, top in enumerate([5.0, 1.0, 5.0, 3.0, 2.0]):
        ki[0, block * bs + 1, 0] = top                                           # max of the block, others 0
    qi = torch.ones(1, 1, T, 1, dtype=f64)
    for K, want in ((2, [0, 4]), (3, [0, 2, 4]), (4, [0, 2, 3, 4]), (5, [0, 2, 3, 1, 4])):
        idx = msa_ref.index_topk(qi, ki, bs, K)
        assert idx[0, 0, 16:].tolist() == [want] * 4, f"K={K}"
    ki_flat = torch.ones(1, T, 1, dtype=f64)                                     # every block ties
    assert msa_ref.index_topk(qi, ki_flat, bs, 3)[0, 0, 19].tolist() == [0, 1, 4]


# ---------------------------------------------------------------------------------------------
# gradients

def test_sparse_attention_gradcheck():
    B, Hq, Hkv, T, D, bs, K = 2, 4, 2, 7, 3, 2, 2
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, 3, dtype=f64, seed=11)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: msa_ref.sparse_attention(q, k, v, idx, bs), (q, k, v))


def test_kl_loss_gradcheck_and_no_grad_to_q_k():
    B, Hq, Hkv, T, D, Di, bs, K = 2, 4, 2, 7, 3, 3, 2, 2
    q, k, _, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di, dtype=f64, seed=12)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    qi, ki = qi.requires_grad_(), ki.requires_grad_()
    assert torch.autograd.gradcheck(lambda qi, ki: msa_ref.kl_loss(q, k, qi, ki, idx, bs), (qi, ki))
    q, k = q.requires_grad_(), k.requires_grad_()
    loss = msa_ref.kl_loss(q, k, qi, ki, idx, bs)
    gq, gk, gqi, gki = torch.autograd.grad(loss, (q, k, qi, ki), allow_unused=True)
    assert gq is None and gk is None, "the KL loss must not train the main branch"
    assert gqi.abs().sum() > 0 and gki.abs().sum() > 0


def test_kl_loss_value_and_analytic_gradient():
    """With ki = sqrt(Di) * identity (Di = T) the student's scores are s = qi itself, so qi.grad is
    d kl / d s, which must be (r - p) / (B * Hkv * T) on the support and 0 elsewhere."""
    B, Hq, Hkv, T, D, bs, K = 2, 4, 2, 9, 8, 2, 2
    q, k, _, qi, _ = rand_inputs(B, Hq, Hkv, T, D, T, dtype=f64, seed=13)
    ki = (math.sqrt(T) * torch.eye(T, dtype=f64)).expand(B, T, T)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    mask = support_from_idx(idx, bs)
    qi.requires_grad_()
    loss = msa_ref.kl_loss(q, k, qi, ki, idx, bs)
    loss.backward()
    want, p, r = kl_reference(q, k, qi.detach(), ki, mask)
    torch.testing.assert_close(loss.detach(), want)
    torch.testing.assert_close(qi.grad, torch.where(mask, (r - p) / (B * Hkv * T), 0.0))


# ---------------------------------------------------------------------------------------------
# KL loss values

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_loss_matches_formula_and_is_nonnegative(seed):
    B, Hq, Hkv, T, D, Di, bs, K = 2, 4, 2, 14, 8, 4, 4, 2
    q, k, _, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di, dtype=f64, seed=seed)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    loss = msa_ref.kl_loss(q, k, qi, ki, idx, bs)
    want, _, _ = kl_reference(q, k, qi, ki, support_from_idx(idx, bs))
    torch.testing.assert_close(loss, want)
    assert loss.item() > 0 and msa_ref.kl_loss_dense(q, k, qi, ki, bs).item() > 0
    v = torch.randn_like(k)
    _, lse = msa_ref.sparse_attention(q, k, v, idx, bs)                      # the teacher's normaliser, given
    torch.testing.assert_close(msa_ref.kl_loss(q, k, qi, ki, idx, bs, lse=lse), want)
    assert msa_ref.kl_loss(q, k, qi, ki, idx, bs, lse=lse + 0.1).item() != pytest.approx(want.item())


def test_kl_loss_zero_when_student_equals_teacher():
    """Heads of a group share their query and all groups share their key, so the teacher is one
    softmax of q_g . k / sqrt(D). The student gets qi = sqrt(2) [q_g, 0], ki = [k, 0] (Di = 2D):
    qi . ki / sqrt(Di) = sqrt(2) q_g . k / sqrt(2 D), the same logits, hence the same softmax."""
    B, Hkv, G, T, D, bs, K = 2, 2, 2, 11, 4, 4, 2
    g = torch.Generator().manual_seed(21)
    qg = torch.randn(B, Hkv, T, D, generator=g, dtype=f64)                      # one query per group
    kshared = torch.randn(B, T, D, generator=g, dtype=f64)
    q = qg.repeat_interleave(G, dim=1)                                            # (B, Hq, T, D)
    k = kshared.unsqueeze(1).expand(B, Hkv, T, D)
    qi = math.sqrt(2) * torch.cat([qg, torch.zeros_like(qg)], -1)               # (B, Hkv, T, 2D)
    ki = torch.cat([kshared, torch.zeros_like(kshared)], -1)                     # (B, T, 2D)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    assert abs(msa_ref.kl_loss(q, k, qi, ki, idx, bs).item()) < 1e-12
    assert abs(msa_ref.kl_loss_dense(q, k, qi, ki, bs).item()) < 1e-12
    assert msa_ref.kl_loss(q, k, 2 * qi, ki, idx, bs).item() > 1e-3             # a sharper student is wrong


@pytest.mark.parametrize("T", [8, 13])
def test_kl_loss_dense_equals_all_blocks_selected(T):
    q, k, _, qi, ki = rand_inputs(2, 4, 2, T, 8, 4, dtype=f64, seed=T)
    bs = 4
    nb = math.ceil(T / bs)
    dense = msa_ref.kl_loss_dense(q, k, qi, ki, bs)
    for K in (nb, nb + 3):
        torch.testing.assert_close(msa_ref.kl_loss(q, k, qi, ki, msa_ref.index_topk(qi, ki, bs, K), bs), dense)
    causal = torch.ones(2, 2, T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(dense, kl_reference(q, k, qi, ki, causal)[0])
    sparse = msa_ref.kl_loss(q, k, qi, ki, msa_ref.index_topk(qi, ki, bs, 1), bs)
    assert not torch.allclose(sparse, dense), "a smaller support gives another loss"


# ---------------------------------------------------------------------------------------------
# fp8 index scores

def test_fp8_quantize_scales_by_powers_of_two():
    """Each vector's scale is a power of two that puts its largest |value| in [128, 256] (the top of e4m3's
    range, 448, is never reached); x8 is x / scale rounded to nearest e4m3, within e4m3's half step (1/16
    of the value's binade) of x; zero and tiny vectors, float64 input."""
    x = torch.randn(3, 9, 16, dtype=f64) * torch.logspace(-35, 35, 9, dtype=f64).view(1, 9, 1)
    x[0, 0] = 0.0
    x8, scale = msa_ref.fp8_quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (3, 9)
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))           # powers of two
    top = x8.float().abs().amax(-1)
    assert top[0, 0] == 0 and ((top >= 128) & (top <= 256)).flatten()[1:].all()
    want = (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)                   # exact division, one rounding
    assert torch.equal(x8.view(torch.uint8), want.view(torch.uint8))
    err = (msa_ref.fp8_dequantize(x8, scale) - x).abs() / x.abs().clamp_min(1e-300)
    assert err[x.abs() > x.abs().amax(-1, keepdim=True) / 64].max() <= 1 / 16


def test_index_topk_fp8_selection_of_the_rounded_scores():
    """fp8=True selects on the e4m3-rounded qi and ki. Inputs that e4m3 holds exactly (3 mantissa bits, their
    top within range after a power-of-two scale) round to themselves: the same selection as without fp8;
    random inputs mostly keep it, and a different rounding of one key can change it."""
    B, Hkv, T, Di, bs, K = 2, 2, 64, 8, 4, 5
    _, _, _, qi, ki = rand_inputs(B, 2, Hkv, T, 8, Di, dtype=torch.float32, seed=41)
    exact = lambda x: (x * 4).round().clamp(-15, 15) / 4 * 2.0 ** torch.randint(-3, 4, x.shape[:-1] + (1,))  # 4 bits
    qe, ke = exact(qi), exact(ki)
    assert torch.equal(msa_ref.fp8_dequantize(*msa_ref.fp8_quantize(ke)), ke)
    assert torch.equal(msa_ref.index_topk(qe, ke, bs, K, fp8=True), msa_ref.index_topk(qe, ke, bs, K))
    got, want = msa_ref.index_topk(qi, ki, bs, K, fp8=True), msa_ref.index_topk(qi, ki, bs, K)
    assert torch.equal(got[..., -1], want[..., -1])                                    # the local block stays
    assert (got != want).any(-1).float().mean() < 0.5


# ---------------------------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("Hq, Hkv, K", [(4, 2, 2), (2, 2, 2), (4, 2, 1)])
def test_sparse_decode_equals_prefill_row(Hq, Hkv, K):
    """A ragged batch: row b's new token sits at cache_lens[b] - 1; the cache past it holds random
    numbers that must be ignored. The decoded output must be that row of sparse_attention with
    index_topk's selection (K = 2 of up to 5 blocks, so a different selection gives another output; G = 1; K = 1,
    the local block only)."""
    B, Tmax, D, Di, bs = 4, 19, 8, 4, 4
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, Tmax, D, Di, dtype=f64, seed=31 + Hq + K)
    lens = torch.tensor([1, 8, 14, 19])
    out_full, _ = msa_ref.sparse_attention(q, k, v, msa_ref.index_topk(qi, ki, bs, K), bs)
    dense_full, _ = dense_gqa(q, k, v)
    rows = torch.arange(B)
    pos = lens - 1
    out = msa_ref.sparse_decode(q[rows, :, pos], qi[rows, :, pos], k, v, ki, lens, bs, K)
    assert out.shape == (B, Hq, D)
    torch.testing.assert_close(out, out_full[rows, :, pos])
    assert not torch.allclose(out[2:], dense_full[rows, :, pos][2:]), "selection should matter for long rows"


def test_sparse_decode_fp8_cache_equals_fp8_prefill_row():
    """An fp8 index-key cache (fp8_quantize of the keys): the selection is index_topk(fp8=True)'s for that
    position, the output sparse_attention's row with it; a bf16-shaped call with the same numbers differs."""
    B, Hq, Hkv, Tmax, D, Di, bs, K = 3, 4, 2, 27, 8, 16, 4, 2
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, Tmax, D, Di, dtype=torch.float32, seed=32)
    lens = torch.tensor([27, 9, 1])
    rows, pos = torch.arange(B), lens - 1
    out_full, _ = msa_ref.sparse_attention(q, k, v, msa_ref.index_topk(qi, ki, bs, K, fp8=True), bs)
    ki8, ks = msa_ref.fp8_quantize(ki)
    out = msa_ref.sparse_decode(q[rows, :, pos], qi[rows, :, pos], k, v, ki8, lens, bs, K, ki_scale=ks)
    torch.testing.assert_close(out, out_full[rows, :, pos])
    args = (q[rows, :, pos], qi[rows, :, pos], k, v)
    for cache, scale, msg in ((ki8, None, "ki_cache must have qi's dtype"), (ki, ks, "must be float8_e4m3fn"),
                              (ki8, ks[:, :5], "ki_scale must be float32"), (ki8, ks.double(), "ki_scale must be float32")):
        with pytest.raises(ValueError, match=msg):
            msa_ref.sparse_decode(*args, cache, lens, bs, K, ki_scale=scale)


def test_sparse_decode_rejects_bad_cache_lens():
    q, k, v, qi, ki = rand_inputs(2, 2, 1, 6, 4, 4, dtype=f64)
    args = (q[:, :, 0], qi[:, :, 0], k, v, ki)
    for lens, msg in ((torch.tensor([0, 3]), "cache_lens must lie in"), (torch.tensor([3, 7]), "cache_lens must lie in"),
                      (torch.tensor([1.0, 2.0]), "cache_lens must be int"), (torch.tensor([1, 2, 3]), "cache_lens must be int")):
        with pytest.raises(ValueError, match=msg):
            msa_ref.sparse_decode(*args, lens, 4, 2)


# ---------------------------------------------------------------------------------------------
# input validation: a ValueError that says what was expected and what came

def _bad_calls():
    B, Hq, Hkv, T, D, Di, bs, K = 1, 4, 2, 6, 8, 4, 4, 2
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di)
    idx = msa_ref.index_topk(qi, ki, bs, K)
    meta = torch.device("meta")
    sa, it, kl = msa_ref.sparse_attention, msa_ref.index_topk, msa_ref.kl_loss
    return [  # (name, call, message fragment)
        ("q rank", lambda: sa(q[0], k, v, idx, bs), "q must have 4 dims"),
        ("k rank", lambda: sa(q, k[..., None], v, idx, bs), "k must have 4 dims"),
        ("ki rank", lambda: it(qi, ki[None], bs, K), "ki must have 3 dims"),
        ("block_idx rank", lambda: sa(q, k, v, idx[0], bs), "block_idx must have 4 dims"),
        ("not a tensor", lambda: it(qi.tolist(), ki, bs, K), "qi must be a torch.Tensor"),
        ("Hq % Hkv", lambda: sa(q[:, :3], k, v, idx, bs), "Hq must be a multiple of Hkv"),
        ("q length", lambda: sa(q[:, :, :5], k, v, idx, bs), "q must be"),
        ("q batch", lambda: sa(torch.cat([q, q]), k, v, idx, bs), "q must be"),
        ("head dim", lambda: sa(q[..., :4], k, v, idx, bs), "k must have head dim"),
        ("v shape", lambda: sa(q, k, v[..., :4], idx, bs), "v must have the shape of k"),
        ("qi heads", lambda: kl(q, k, qi[:, :1], ki, idx, bs), "qi must be"),
        ("ki length", lambda: it(qi, ki[:, :5], bs, K), "ki must be"),
        ("ki dim", lambda: it(qi, ki[..., :3], bs, K), "ki must be"),
        ("block_idx length", lambda: sa(q, k, v, idx[:, :, :5], bs), "block_idx must be"),
        ("block_idx K = 0", lambda: sa(q, k, v, idx[..., :0], bs), "block_idx must be"),
        ("block_idx too big", lambda: sa(q, k, v, idx.clamp(max=0) + 2, bs), r"block_idx entries must be -1 \(padding\) or a block in \[0, 2\)"),
        ("block_idx below -1", lambda: sa(q, k, v, idx - 3, bs), "block_idx entries"),
        ("float block_idx", lambda: sa(q, k, v, idx.float(), bs), "block_idx must be an integer tensor"),
        ("topk 0", lambda: it(qi, ki, bs, 0), "topk must be an int >= 1"),
        ("topk float", lambda: it(qi, ki, bs, 2.0), "topk must be an int >= 1"),
        ("block_size 0", lambda: it(qi, ki, 0, K), "block_size must be an int >= 1"),
        ("block_size 0 attention", lambda: sa(q, k, v, idx, 0), "block_size must be an int >= 1"),
        ("block_size 0 kl", lambda: kl(q, k, qi, ki, idx, 0), "block_size must be an int >= 1"),
        ("block_size 0 dense kl", lambda: msa_ref.kl_loss_dense(q, k, qi, ki, 0), "block_size must be an int >= 1"),
        ("devices attention", lambda: sa(q, k.to(meta), v, idx, bs), "all tensors must be on one device"),
        ("devices index", lambda: it(qi, ki.to(meta), bs, K), "all tensors must be on one device"),
        ("devices kl", lambda: kl(q, k, qi.to(meta), ki, idx, bs), "all tensors must be on one device"),
        ("devices block_idx", lambda: sa(q, k, v, idx.to(meta), bs), "all tensors must be on one device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error(case):
    name, call, fragment = _bad_calls()[case]
    with pytest.raises(ValueError, match=fragment) as err:
        call()
    assert "got" in str(err.value), f"{name}: the message should say what came: {err.value}"
