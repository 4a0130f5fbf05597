"""
A lab tool for dev/kernels.md's K = 8 plan (section "The KL's gradient inside the backward, prototyped: slower"), not
part of the package: attention._bwd_kv_kernel with the KL's gradient products added (per tile: u = qi . ki for the
tile's entries, r, the mean of the tile's G head rows of p, then dki and the dqi partials), so that pass 2 of the KL
(_kl_loss_kernel) is not needed; pass 1 (the student's lse) still runs. Gradients only: no KL value. It checks its
dq, dk, dv, dqi, dki against attention._backward and index._kl_launch, then times both ways per case TxK (B = 32768
// T): kernel times under torch.profiler and the whole sequence in a CUDA graph.
    python dev/fused_kl_probe.py 16384x8 4096x8 1024x8                 # a GPU
    TRITON_INTERPRET=1 NANOMSA_CHECKS=1 python dev/fused_kl_probe.py    # the check alone, fp32, in the interpreter
"""
import math, os, sys, collections
import torch
import triton
import triton.language as tl
sys.path.insert(0, os.getcwd())
import msa_triton
from msa_triton import attention as A, index as I
from msa_triton.common import (LOG2E, LN2, LOG2E_K, _segment, _load_rows, _strides, _pow2, _cdiv, _split_segments,
                               _seg_len, _chunk_bounds, _token_major, _fixup_kernel, _combine_kernel, _combine_unroll,
                               _slot_tile, _segments, _prec)
from msa_triton.attention import _tile_rows, _kv_block, _delta_kernel, _tiles, _launch_opts, _consts


@triton.jit
def _bwd_kl_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqp_ptr, dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
                   ent_ptr, seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, seg_x_ptr,
                   qi_ptr, ki_ptr, lu_ptr, dqip_ptr, dki_ptr, dkip_ptr,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd, s_dob, s_doh, s_dot, s_dod,
                   s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid,
                   T, t0, Tc, K: tl.constexpr, NSEG, NX, Hkv, BS, D, scale, scale2, scale_i2, grad_scale,
                   G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, NSUB: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_P: tl.constexpr, DI: tl.constexpr, DI_P: tl.constexpr,
                   PREC: tl.constexpr, FRESH: tl.constexpr):
    b, g, bh, lo, hi, kb = _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv)
    sub = tl.program_id(2)
    if lo < hi:
        jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        n, kmask, d, dmask, kvm, k, v = _kv_block(k_ptr, v_ptr, b, g, kb, jn, T, BS, D, s_kb, s_kh, s_kt, s_kd,
                                                  s_vb, s_vh, s_vt, s_vd, D_P)
        di = tl.arange(0, DI_P)
        ki = tl.load(ki_ptr + b * s_kib + n[:, None] * s_kit + di[None, :] * s_kid,
                     mask=kmask[:, None] & (di[None, :] < DI), other=0.0)                     # (BLOCK_N, DI_P)
        dk = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
        dki = tl.zeros((BLOCK_N, DI_P), dtype=tl.float32)
        ent_b = ent_ptr + bh.to(tl.int64) * Tc * K
        STEP: tl.constexpr = ROWS // G_P
        ent, h, rv = _tile_rows(ent_b, lo, hi, G, G_P, ROWS)
        ent_n, h, rv_n = _tile_rows(ent_b, lo + STEP, hi, G, G_P, ROWS)
        t = t0 + ent // K
        q = _load_rows(q_ptr, b, g * G + h, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)
        do = _load_rows(do_ptr, b, g * G + h, t, rv, s_dob, s_doh, s_dot, s_dod, d, dmask)
        row = ((b * Hkv + g) * G + h) * T + t
        lse2 = tl.load(lse_ptr + row, mask=rv, other=0.0) * LOG2E_K
        delta = tl.load(delta_ptr + row, mask=rv, other=0.0)
        for i in range(lo, hi, STEP):
            ent_nn, h, rv_nn = _tile_rows(ent_b, i + 2 * STEP, hi, G, G_P, ROWS)
            t_n = t0 + ent_n // K
            q_n = _load_rows(q_ptr, b, g * G + h, t_n, rv_n, s_qb, s_qh, s_qt, s_qd, d, dmask)
            do_n = _load_rows(do_ptr, b, g * G + h, t_n, rv_n, s_dob, s_doh, s_dot, s_dod, d, dmask)
            row_n = ((b * Hkv + g) * G + h) * T + t_n
            lse2_n = tl.load(lse_ptr + row_n, mask=rv_n, other=0.0) * LOG2E_K
            delta_n = tl.load(delta_ptr + row_n, mask=rv_n, other=0.0)
            # the tile's entries, one row each (its ROWS rows are STEP entries x G_P heads)
            e = i + tl.arange(0, STEP)
            ev = e < hi
            ent_e = tl.load(ent_b + e, mask=ev, other=0)
            tl_e = ent_e // K
            t_e = (t0 + tl_e).to(tl.int64)
            qi = tl.load(qi_ptr + b * s_qib + g.to(tl.int64) * s_qih + t_e[:, None] * s_qit + di[None, :] * s_qid,
                         mask=ev[:, None] & (di[None, :] < DI), other=0.0)                # (STEP, DI_P)
            lu = tl.load(lu_ptr + bh.to(tl.int64) * T + t_e, mask=ev, other=0.0)        # (STEP,) student lse2
            tloc = ent // K
            slot = ent % K
            t = t0 + tloc
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            vis = rv[:, None] & kmask[None, :] & (n[None, :] <= t[:, None])
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
            po = ((bh.to(tl.int64) * Tc + tloc) * K + slot) * NSUB + sub
            tl.store(dqp_ptr + (po * G + h)[:, None] * D + d[None, :], dq.to(dqp_ptr.dtype.element_ty),
                     mask=rv[:, None] & dmask[None, :])
            # the KL: r - mean over the G heads of p, on the tile's entries
            pbar = tl.sum(tl.reshape(p, (STEP, G_P, BLOCK_N)), axis=1) / G                  # (STEP, BLOCK_N)
            vis_e = ev[:, None] & kmask[None, :] & (n[None, :] <= t_e[:, None])
            u = tl.dot(qi, tl.trans(ki), input_precision=PREC) * scale_i2
            r = tl.where(vis_e, tl.exp2(u - lu[:, None]), 0.0)
            dsu = (r - pbar) * grad_scale
            dki += tl.dot(tl.trans(dsu.to(qi.dtype)), qi, input_precision=PREC)
            dqi = tl.dot(dsu.to(ki.dtype), ki, input_precision=PREC)                        # (STEP, DI_P)
            pe = ((bh.to(tl.int64) * Tc + tl_e) * K + ent_e % K) * NSUB + sub
            tl.store(dqip_ptr + pe[:, None] * DI + di[None, :], dqi.to(dqip_ptr.dtype.element_ty),
                     mask=ev[:, None] & (di[None, :] < DI))
            q, do, lse2, delta, ent, rv, ent_n, rv_n = q_n, do_n, lse2_n, delta_n, ent_n, rv_n, ent_nn, rv_nn
        x = tl.load(seg_x_ptr + bh * NSEG + tl.program_id(0))
        kvo = (b * Hkv + g) * T * D + n[:, None] * D + d[None, :]
        kio = (b * Hkv + g) * T * DI + n[:, None] * DI + di[None, :]
        kim = kmask[:, None] & (di[None, :] < DI)
        if x < 0:
            dk = dk * scale
            if not FRESH:
                dk = tl.load(dk_ptr + kvo, mask=kvm, other=0.0) + dk
                dv = tl.load(dv_ptr + kvo, mask=kvm, other=0.0) + dv
                dki = tl.load(dki_ptr + kio, mask=kim, other=0.0) + dki
            tl.store(dk_ptr + kvo, dk, mask=kvm)
            tl.store(dv_ptr + kvo, dv, mask=kvm)
            tl.store(dki_ptr + kio, dki, mask=kim)
        else:
            xo = _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, D_P)
            tl.store(dkp_ptr + xo, dk * scale)
            tl.store(dvp_ptr + xo, dv)
            tl.store(dkip_ptr + _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, DI_P), dki)


def student_lse2(q, k, qi, ki, block_idx, bs, lists):
    """Pass 1 of the KL (student only), merged: lu2 (B * Hkv, T) in log2 units."""
    B, Hq, T, D = q.shape
    Hkv, Di, K = qi.shape[1], qi.shape[3], block_idx.shape[3]
    G, BH = Hq // Hkv, B * Hkv
    slots, ent, start, cnt = lists
    lo, hi, blk = _segments(start, cnt, T * K, I.STATS_SEG)
    lup = torch.full((BH, T, K), float("-inf"), dtype=torch.float32, device=q.device)
    meta = dict(G=G, BS=bs, D=D, D_P=_pow2(D), DI=Di, DI_P=_pow2(Di), BLOCK_Q=64 if q.is_cuda else 16,
                BLOCK_N=_pow2(bs), NCHUNK=1, PREC=_prec(q, qi),
                **_strides("q", q), **_strides("k", k), **_strides("qi", qi), **_strides("ki", ki, "btd"))
    I._kl_stats_kernel[(lo.shape[1], BH)](
        q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, ent_ptr=ent, seg_lo_ptr=lo, seg_hi_ptr=hi, seg_blk_ptr=blk,
        lqp_ptr=lup, lup_ptr=lup, T=T, t0=0, Tc=T, K=K, NSEG=lo.shape[1], Hkv=Hkv, scale_d2=LOG2E / math.sqrt(D),
        scale_i2=LOG2E / math.sqrt(Di), TEACHER=False, num_warps=4, **meta)
    return torch.logsumexp(lup * LN2, -1) * LOG2E                                 # (BH, T)


def fused_backward(q, k, v, out, lse, dout, qi, ki, lu2, lists, bs):
    """attention._backward plus the KL's gradients (one chunk of tokens only). Returns dq, dk, dv, dqi, dki."""
    B, Hq, T, D = q.shape
    Hkv, K, Di = k.shape[1], lists[0].shape[2], qi.shape[3]
    G = Hq // Hkv
    G_P = _pow2(G, 1)
    BH = B * Hkv
    c = _consts(q, bs)
    assert len(_chunk_bounds(B, Hkv, T, K, G * D, bs)) == 1
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(B * Hq, _cdiv(T, 64))](o_ptr=out, do_ptr=dout, delta_ptr=delta, T=T, Hq=Hq, **_strides("o", out),
                                         **_strides("do", dout), D=D, ROWS=64, D_P=c["D_P"])
    tiles = _launch_opts(_tiles("bwd", D, G_P, c["BLOCK_N"]))
    ct = _tiles("combine", D, G_P, c["BLOCK_N"])
    NSUB = _cdiv(bs, tiles["BLOCK_N"])
    slots, ent, start, cnt = lists
    seg = _seg_len(BH * T * K, A.BWD_SEG_SMALL, A.BWD_SEG)
    lo, hi, blk, x, xbase, xcnt, NX = _split_segments(start, cnt, T * K, seg)
    dk, dv = torch.empty(2, B, Hkv, T, D, device=q.device, dtype=torch.float32)
    dki = torch.empty(B, Hkv, T, Di, device=q.device, dtype=torch.float32)
    dkp, dvp = torch.empty(2, BH, NX, NSUB, tiles["BLOCK_N"], c["D_P"], device=q.device, dtype=torch.float32)
    dkip = torch.empty(BH, NX, NSUB, tiles["BLOCK_N"], _pow2(Di), device=q.device, dtype=torch.float32)
    dqp = torch.empty(BH, T, K * NSUB, G, D, device=q.device, dtype=q.dtype)
    dqip = torch.empty(BH, T, K * NSUB, Di, device=q.device, dtype=qi.dtype)
    _bwd_kl_kernel[(lo.shape[1], BH, NSUB)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=dout, lse_ptr=lse, delta_ptr=delta, dqp_ptr=dqp, dk_ptr=dk, dv_ptr=dv,
        dkp_ptr=dkp, dvp_ptr=dvp, ent_ptr=ent, seg_lo_ptr=lo, seg_hi_ptr=hi, seg_blk_ptr=blk, seg_x_ptr=x,
        qi_ptr=qi, ki_ptr=ki, lu_ptr=lu2, dqip_ptr=dqip, dki_ptr=dki, dkip_ptr=dkip,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("do", dout),
        **_strides("qi", qi), **_strides("ki", ki, "btd"),
        T=T, t0=0, Tc=T, K=K, NSEG=lo.shape[1], NX=NX, Hkv=Hkv, BS=bs, D=D,
        scale=1.0 / math.sqrt(D), scale2=LOG2E / math.sqrt(D), scale_i2=LOG2E / math.sqrt(Di),
        grad_scale=1.0 / (B * Hkv * T * math.sqrt(Di)),
        G=G, G_P=G_P, NSUB=NSUB, D_P=c["D_P"], DI=Di, DI_P=_pow2(Di), PREC=c["PREC"], FRESH=True, **tiles)
    dk_out = _token_major(B, Hkv, T, D, device=q.device, dtype=k.dtype)
    dv_out = _token_major(B, Hkv, T, D, device=q.device, dtype=v.dtype)
    for grad, partial, o in ((dk, dkp, dk_out), (dv, dvp, dv_out)):
        _fixup_kernel[(_cdiv(T, bs), BH, NSUB)](
            x_ptr=grad, xp_ptr=partial, xbase_ptr=xbase, xcnt_ptr=xcnt, cnt_ptr=cnt, o_ptr=o,
            **_strides("o", o, "bht_"), T=T, NBC=_cdiv(T, bs), NX=NX, BS=bs, D=D, HO=Hkv, NG=1, NSUB=NSUB,
            BLOCK_N=tiles["BLOCK_N"], D_P=c["D_P"], OUT=True, FRESH=True)
    dki_out = torch.empty(B, T, Di, dtype=ki.dtype, device=q.device)
    _fixup_kernel[(_cdiv(T, bs), B, NSUB)](
        x_ptr=dki, xp_ptr=dkip, xbase_ptr=xbase, xcnt_ptr=xcnt, cnt_ptr=cnt, o_ptr=dki_out,
        **_strides("o", dki_out[:, None], "bht_"), T=T, NBC=_cdiv(T, bs), NX=NX, BS=bs, D=Di, HO=1,
        NG=Hkv, NSUB=NSUB, BLOCK_N=tiles["BLOCK_N"], D_P=_pow2(Di), OUT=True, FRESH=True)
    dq = _token_major(B, Hq, T, D, device=q.device, dtype=q.dtype)
    _combine_kernel[(_cdiv(T, ct["ROWS"] // G_P), BH)](
        op_ptr=dqp, lp_ptr=dqp, slots_ptr=slots, o_ptr=dq, lse_ptr=dq, **_strides("o", dq, "bht_"), T=T, t0=0,
        Tc=T, K=K, Hkv=Hkv, D=D, G=G, G_P=G_P, D_P=c["D_P"], WITH_LSE=False, NSUB=NSUB,
        UNROLL=_combine_unroll(K, NSUB), **ct)
    dqi = _token_major(B, Hkv, T, Di, dtype=qi.dtype, device=q.device)
    _combine_kernel[(_cdiv(T, 32), BH)](
        op_ptr=dqip, lp_ptr=dqip, slots_ptr=slots, o_ptr=dqi, lse_ptr=dqi, **_strides("o", dqi, "bht_"), T=T,
        t0=0, Tc=T, K=K, Hkv=Hkv, D=Di, G=1, G_P=1, ROWS=32, D_P=_pow2(Di), WITH_LSE=False, NSUB=NSUB,
        UNROLL=_combine_unroll(K, NSUB), num_warps=4)
    return dq, dk_out, dv_out, dqi, dki_out


def case(B, T, K, dev, dt, Hq=8, Hkv=2, D=64, Di=64, bs=64, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=dt, generator=g) for h in (Hq, Hkv, Hkv))
    qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dt, generator=g)
    ki = torch.randn(B, T, Di, device=dev, dtype=dt, generator=g)
    dout = torch.randn(B, Hq, T, D, device=dev, dtype=dt, generator=g)
    idx = msa_triton.index_topk(qi, ki, bs, K)
    out, lse, lists = A._forward(q, k, v, idx, bs)
    return q, k, v, qi, ki, dout, idx, out, lse, lists


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(B, T, K, dev, dt, bs=64, D=64):
    q, k, v, qi, ki, dout, idx, out, lse, lists = case(B, T, K, dev, dt, D=D, Di=D, bs=bs)
    dq0, dk0, dv0 = A._backward(q, k, v, out, lse, dout, lists, bs)
    _, dqi0, dki0 = I._kl_launch(q, k, qi, ki, idx, bs, True, lse, lists)
    lu2 = student_lse2(q, k, qi, ki, idx, bs, lists)
    dq, dk, dv, dqi, dki = fused_backward(q, k, v, out, lse, dout, qi, ki, lu2, lists, bs)
    errs = dict(dq=rel(dq, dq0), dk=rel(dk, dk0), dv=rel(dv, dv0), dqi=rel(dqi, dqi0), dki=rel(dki, dki0))
    print(f"check B={B} T={T} K={K} {dt}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()), flush=True)
    return errs


if __name__ == "__main__":
    args = sys.argv[1:]
    if not torch.cuda.is_available():                                           # the interpreter, fp32
        errs = check(2, 40, 3, "cpu", torch.float32, bs=8, D=16)
        assert max(errs.values()) < 1e-4, errs
        sys.exit(0)
    msa_triton.checks(False)
    from torch.profiler import profile, ProfilerActivity
    from bench import graph_of, timed
    dt = torch.bfloat16
    for B, T, K in ((4, 1024, 8), (1, 4096, 8)):
        errs = check(B, T, K, "cuda", dt)
        assert max(errs.values()) < 2e-2, errs
    summary = []
    for c in [a for a in args if "x" in a] or ["16384x8", "4096x8", "1024x8"]:
        T, K = (int(x) for x in c.split("x"))
        B = 32768 // T
        q, k, v, qi, ki, dout, idx, out, lse, lists = case(B, T, K, "cuda", dt)

        def committed():
            A._backward(q, k, v, out, lse, dout, lists, 64)
            I._kl_launch(q, k, qi, ki, idx, 64, True, lse, lists)

        def fused():
            lu2 = student_lse2(q, k, qi, ki, idx, 64, lists)
            fused_backward(q, k, v, out, lse, dout, qi, ki, lu2, lists, 64)

        res = {}
        for name, fn in (("committed", committed), ("fused", fused)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            per = collections.defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name[:40]] += e.device_time / 3
            ms = timed(graph_of(fn))
            res[name] = ms
            print(f"{c} {name}: graphed {ms * 1e3:.1f} us; kernels " +
                  ", ".join(f"{n} {us:.1f}" for n, us in sorted(per.items(), key=lambda kv: -kv[1])[:8]), flush=True)
        s = f"{c}: committed bwd+kl {res['committed'] * 1e3:.1f} us, fused {res['fused'] * 1e3:.1f} us, saved {(res['committed'] - res['fused']) * 1e3:.1f} us"
        print(s, flush=True)
        summary.append(s)
    print("\n".join(summary))
