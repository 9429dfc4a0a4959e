"""Triton kernels of the Vision Mamba mixer: the multi-direction selective scan (forward and
backward) and the depthwise causal / anti-causal conv + SiLU (forward and backward).

Why they look like this (facts in ``../shared/reference/vision-scan-kernels.md``): vision
sequences are short (L ~ 200-4000) and wide (2E ~ 1500 channels), so one program owns one image
and a block of ``BLOCK_D`` channels of every direction, keeps the [BLOCK_D, N] state in fp32
registers and walks time sequentially; B / C are loaded once per step for the whole block and
dB / dC are reduced over the block in-program (per-block partials summed afterwards: no atomics,
deterministic). Tensors are read token-major (batch, L, direction, channel) through their
strides, so in_proj's output is read as it is. A reversed or column-major direction is only a
different token index per step (``order(s)`` below): no flipped or transposed copies, and both
directions of Vim (or VMamba's four) run in one launch, writing the combined output in place.

The forward keeps the state every ``CHUNK`` steps; the backward walks the chunks in reverse,
recomputes the chunk's states into a per-program fp32 scratch (a grid-stride loop over the
tiles keeps the number of programs, hence the scratch, bounded), then runs the adjoint
recurrence g_s = C_s gy_s + a_{s+1} g_{s+1} backwards, using a_s h_{s-1} = h_s - dt_s u_s B_s
(mamba-ssm's identity) so only h_s is read back.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly; the interpreter has no
bf16 arithmetic, so every load is cast to fp32 and every store cast back).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel reads must be a constexpr


# softplus(x) = log(1 + exp(x)) to fp32 rounding: max(x, 0) + log1p(y), y = exp(-|x|), with log1p(y)
# = log(v) - ((v - 1) - y) / v, v = 1 + y (no log1p in tl). Like the sigmoids, written inline.
# Token orders. Direction ``code`` (2 bits: bit 0 reversed, bit 1 column-major over the H x W map)
# reads at step s the token  pos = (r % hk) * wk + r // hk  with r = s, or L - 1 - s if reversed, and
# (hk, wk) = (H, W) for column-major, (L, 1) otherwise (an L x 1 map read column-major is the
# identity). Written out in each loop, not as a helper: a @triton.jit call per step costs the
# interpreter (the CI tests) more than the whole step.


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    L, E, N, K, H, W, dir_codes, scale,
    s_ub, s_ul, s_uk,
    s_db, s_dl, s_dk,
    s_Bb, s_Bl, s_Bk,
    s_Cb, s_Cl, s_Ck,
    s_zb, s_zl, s_zk,
    s_ob, s_ol, s_ok,
    n_saved,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ALL_DIRECTIONS: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE_STATES: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Grid (channel blocks, batch, K or 1). Token-major tensors are read through their (batch,
    token, direction) strides with channel (and state) stride 1; A is contiguous (K, N, E), D and
    bias (K, E); out (batch, L, K or 1, E); states (batch, K, n_saved, N, E) fp32.

    Layout: the state tile is [state, channel] with channels (contiguous in memory) along the
    lanes; every per-channel vector is a [1, BLOCK_D] row and every per-state vector a
    [BLOCK_N, 1] column, so all tensors share the tile's layout (no layout conversions per step).
    Addresses are a scalar offset per step plus one shared int32 channel offset (a pointer tensor
    per input kept across the loop would cost two registers per element)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    offs_n = tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, 1]
    mask_d = offs_d < E
    mask_nd = (offs_n < N) & mask_d
    offs_nd = offs_n * E + offs_d
    n_chunks = tl.cdiv(L, CHUNK)
    if ALL_DIRECTIONS:
        k_begin = 0
        k_end = K
    else:
        k_begin = tl.program_id(2)
        k_end = k_begin + 1
    for k in range(k_begin, k_end):
        code = (dir_codes >> (2 * k)) & 3
        rev = code & 1
        hk = (code >> 1) * (H - L) + L
        wk = (code >> 1) * (W - 1) + 1
        a = (
            tl.load(A_ptr + k * N * E + offs_nd, mask=mask_nd, other=0.0).to(tl.float32) * LOG2E
        )  # exp(x) = exp2(x log2 e)
        if HAS_D:
            d_skip = tl.load(D_ptr + k * E + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_bias = tl.load(bias_ptr + k * E + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        u_row = b * s_ub + k * s_uk
        d_row = b * s_db + k * s_dk
        B_row = b * s_Bb + k * s_Bk
        C_row = b * s_Cb + k * s_Ck
        z_row = b * s_zb + k * s_zk
        o_row = b * s_ob + k * s_ok
        st_row = (b * K + k) * n_saved * N * E
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for c in range(0, n_chunks):
            if SAVE_STATES:  # the state entering chunk c (c >= 1), for the backward
                tl.store(states_ptr + st_row + tl.maximum(c - 1, 0) * N * E + offs_nd, h, mask=mask_nd & (c > 0))
            for s in tl.range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L), num_stages=NUM_STAGES):
                r = s + rev * (L - 1 - 2 * s)
                pos = ((r % hk) * wk + r // hk).to(tl.int64)
                u = tl.load(u_ptr + (u_row + pos * s_ul) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + (d_row + pos * s_dl) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt += dt_bias
                if SOFTPLUS:
                    e = tl.exp(-tl.abs(dt))
                    v = 1.0 + e
                    dt = tl.maximum(dt, 0.0) + tl.log(v) - ((v - 1.0) - e) / v
                Bs = tl.load(B_ptr + (B_row + pos * s_Bl) + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                Cs = tl.load(C_ptr + (C_row + pos * s_Cl) + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                h = tl.exp2(dt * a) * h + Bs * (dt * u)
                y = tl.sum(h * Cs, axis=0, keep_dims=True)
                if HAS_D:
                    y += d_skip * u
                if HAS_Z:
                    zs = tl.load(z_ptr + (z_row + pos * s_zl) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    y = y * zs / (1.0 + tl.exp(-zs))
                y = y * scale
                o_off = o_row + pos * s_ol
                if ACCUMULATE:  # directions after the first add onto the combined output
                    y += tl.load(out_ptr + o_off + offs_d, mask=mask_d & (k > k_begin), other=0.0).to(tl.float32)
                tl.store(out_ptr + o_off + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        if ACCUMULATE:
            tl.debug_barrier()  # this direction's stores are visible to the next one's loads


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, states_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    L, E, N, K, H, W, dir_codes, scale,
    s_ub, s_ul, s_uk,
    s_db, s_dl, s_dk,
    s_Bb, s_Bl, s_Bk,
    s_Cb, s_Cl, s_Ck,
    s_zb, s_zl, s_zk,
    s_gb, s_gl, s_gk,
    s_dub, s_dul, s_duk,
    s_dzb, s_dzl, s_dzk,
    n_saved, n_tiles, n_dblocks, k_programs, batch,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ALL_DIRECTIONS: tl.constexpr, ACC_DU: tl.constexpr, ACC_DZ: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """A 1-D grid of programs looping over the (channel block, batch, direction program) tiles.

    Writes du / dz (u's / z's layout; accumulated over directions when shared), ddelta (batch, L,
    K, E), and fp32 partials: dA (batch, K, N, E) like A, dB / dC (channel blocks, batch, L, K, N),
    dD / dbias (batch, K, E). Scratch: (programs, CHUNK, BLOCK_N, BLOCK_D) fp32. Layout as in
    :func:`scan_fwd_kernel`."""
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)[:, None]
    mask_n = offs_n < N
    local = offs_n * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    scratch = scratch_ptr + pid.to(tl.int64) * (CHUNK * BLOCK_D * BLOCK_N)
    n_chunks = tl.cdiv(L, CHUNK)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        pid_d = tile % n_dblocks
        rest = tile // n_dblocks
        kp = rest % k_programs
        b = (rest // k_programs).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        mask_d = offs_d < E
        mask_nd = mask_n & mask_d
        offs_nd = offs_n * E + offs_d
        if ALL_DIRECTIONS:
            k_begin = 0
            k_end = K
        else:
            k_begin = kp
            k_end = kp + 1
        for k in range(k_begin, k_end):
            code = (dir_codes >> (2 * k)) & 3
            rev = code & 1
            hk = (code >> 1) * (H - L) + L
            wk = (code >> 1) * (W - 1) + 1
            a_raw = tl.load(A_ptr + k * N * E + offs_nd, mask=mask_nd, other=0.0).to(tl.float32)
            a = a_raw * LOG2E
            if HAS_D:
                d_skip = tl.load(D_ptr + k * E + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_bias = tl.load(bias_ptr + k * E + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            u_row = b * s_ub + k * s_uk
            d_row = b * s_db + k * s_dk
            B_row = b * s_Bb + k * s_Bk
            C_row = b * s_Cb + k * s_Ck
            z_row = b * s_zb + k * s_zk
            g_row = b * s_gb + k * s_gk
            du_row = b * s_dub + k * s_duk
            dz_row = b * s_dzb + k * s_dzk
            dd_row = (b * L * K + k) * E
            dBC_row = ((pid_d * batch + b) * L * K + k) * N
            st_row = (b * K + k) * n_saved * N * E
            g_h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dD_acc = tl.zeros([1, BLOCK_D], dtype=tl.float32)
            dbias_acc = tl.zeros([1, BLOCK_D], dtype=tl.float32)
            for ci in range(0, n_chunks):
                c = n_chunks - 1 - ci
                s0 = c * CHUNK
                s1 = tl.minimum(s0 + CHUNK, L)
                h = tl.load(states_ptr + st_row + tl.maximum(c - 1, 0) * N * E + offs_nd, mask=mask_nd & (c > 0),
                            other=0.0)  # fmt: skip
                # 1. the chunk's states h_s, recomputed from its saved start, into the scratch
                for s in tl.range(s0, s1, num_stages=NUM_STAGES):
                    r = s + rev * (L - 1 - 2 * s)
                    pos = ((r % hk) * wk + r // hk).to(tl.int64)
                    u = tl.load(u_ptr + (u_row + pos * s_ul) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    dt = tl.load(delta_ptr + (d_row + pos * s_dl) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        dt += dt_bias
                    if SOFTPLUS:
                        e = tl.exp(-tl.abs(dt))
                        v = 1.0 + e
                        dt = tl.maximum(dt, 0.0) + tl.log(v) - ((v - 1.0) - e) / v
                    Bs = tl.load(B_ptr + (B_row + pos * s_Bl) + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    h = tl.exp2(dt * a) * h + Bs * (dt * u)
                    tl.store(scratch + (s - s0) * (BLOCK_D * BLOCK_N) + local, h)
                tl.debug_barrier()
                # 2. the adjoint recurrence, backwards through the chunk
                for si in tl.range(0, s1 - s0, num_stages=NUM_STAGES):
                    s = s1 - 1 - si
                    r = s + rev * (L - 1 - 2 * s)
                    pos = ((r % hk) * wk + r // hk).to(tl.int64)
                    u = tl.load(u_ptr + (u_row + pos * s_ul) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    dt_raw = tl.load(delta_ptr + (d_row + pos * s_dl) + offs_d, mask=mask_d, other=0.0)
                    dt_raw = dt_raw.to(tl.float32)
                    if HAS_BIAS:
                        dt_raw += dt_bias
                    if SOFTPLUS:
                        e = tl.exp(-tl.abs(dt_raw))
                        v = 1.0 + e
                        dt = tl.maximum(dt_raw, 0.0) + tl.log(v) - ((v - 1.0) - e) / v
                    else:
                        dt = dt_raw
                    Bs = tl.load(B_ptr + (B_row + pos * s_Bl) + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    Cs = tl.load(C_ptr + (C_row + pos * s_Cl) + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    go = tl.load(g_ptr + (g_row + pos * s_gl) + offs_d, mask=mask_d, other=0.0).to(tl.float32) * scale
                    hs = tl.load(scratch + (s - s0) * (BLOCK_D * BLOCK_N) + local)
                    if HAS_Z:
                        zs = tl.load(z_ptr + (z_row + pos * s_zl) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                        sig = 1.0 / (1.0 + tl.exp(-zs))
                        y = tl.sum(hs * Cs, axis=0, keep_dims=True)
                        if HAS_D:
                            y += d_skip * u
                        dz = go * y * sig * (1.0 + zs * (1.0 - sig))
                        dz_off = dz_row + pos * s_dzl
                        if ACC_DZ:
                            dz += tl.load(dz_ptr + dz_off + offs_d, mask=mask_d & (k > k_begin), other=0.0).to(
                                tl.float32
                            )
                        tl.store(dz_ptr + dz_off + offs_d, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                        gy = go * zs * sig
                    else:
                        gy = go
                    dtu = dt * u
                    g_h += Cs * gy  # dL/dh_s
                    dBC_off = dBC_row + pos * (K * N)
                    tl.store(dC_ptr + dBC_off + offs_n, tl.sum(hs * gy, axis=1, keep_dims=True), mask=mask_n)
                    tl.store(dB_ptr + dBC_off + offs_n, tl.sum(g_h * dtu, axis=1, keep_dims=True), mask=mask_n)
                    d_dtu = tl.sum(g_h * Bs, axis=0, keep_dims=True)
                    w = g_h * (hs - Bs * dtu)  # dL/d(dt A) = g_s a_s h_{s-1}
                    dA_acc += w * dt
                    d_dt = tl.sum(w * a_raw, axis=0, keep_dims=True) + d_dtu * u
                    du = d_dtu * dt
                    if HAS_D:
                        du += d_skip * gy
                        dD_acc += gy * u
                    if SOFTPLUS:
                        d_dt = d_dt / (1.0 + tl.exp(-dt_raw))
                    dbias_acc += d_dt
                    tl.store(ddelta_ptr + (dd_row + pos * (K * E)) + offs_d, d_dt.to(ddelta_ptr.dtype.element_ty),
                             mask=mask_d)  # fmt: skip
                    du_off = du_row + pos * s_dul
                    if ACC_DU:
                        du += tl.load(du_ptr + du_off + offs_d, mask=mask_d & (k > k_begin), other=0.0).to(tl.float32)
                    tl.store(du_ptr + du_off + offs_d, du.to(du_ptr.dtype.element_ty), mask=mask_d)
                    g_h = g_h * tl.exp2(dt * a)  # carried to step s - 1
                tl.debug_barrier()  # the scratch is rewritten by the next chunk
            p_row = (b * K + k) * E
            tl.store(dA_ptr + p_row * N + offs_nd, dA_acc, mask=mask_nd)
            if HAS_D:
                tl.store(dD_ptr + p_row + offs_d, dD_acc, mask=mask_d)
            if HAS_BIAS:
                tl.store(dbias_ptr + p_row + offs_d, dbias_acc, mask=mask_d)


# ---- the depthwise conv -----------------------------------------------------------------------
@triton.jit
def conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    L, E, K, dir_codes,
    s_xb, s_xl, s_xe,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """out[b, t, k, e] = act(bias[k, e] + sum_j w[k, e, j] x[b, t + off_kj, e]) with off_kj = j - (W - 1)
    for a causal direction and (W - 1) - j for a reversed one (the causal conv of the flipped
    sequence, in token order). Grid (L blocks, E blocks, batch); out contiguous (batch, L, K, E)."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(2).to(tl.int64)
    mask_e = offs_e < E
    mask = (offs_l < L)[:, None] & mask_e[None, :]
    for k in range(0, K):
        sign = 1 - 2 * ((dir_codes >> (2 * k)) & 1)  # +1 causal, -1 reversed
        acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + k * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(WIDTH):
            t = offs_l + sign * (j - (WIDTH - 1))
            m = ((t >= 0) & (t < L))[:, None] & mask_e[None, :]
            xv = tl.load(x_ptr + b * s_xb + t[:, None] * s_xl + offs_e[None, :] * s_xe, mask=m, other=0.0)
            wj = tl.load(w_ptr + (k * E + offs_e) * WIDTH + j, mask=mask_e, other=0.0).to(tl.float32)
            acc += xv.to(tl.float32) * wj[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        o = out_ptr + ((b * L + offs_l[:, None]) * K + k) * E + offs_e[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, gpre_ptr, dw_ptr, dbias_ptr,
    L, E, K, dir_codes, n_lblocks,
    s_xb, s_xl, s_xe,
    s_gb, s_gl, s_gk, s_ge,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """The gradient at the pre-activation, gpre = g * silu'(pre) (recomputing pre), stored fp32
    (batch, L, K, E); and fp32 partials of dw (batch * L blocks, K, E, W), dbias (..., K, E)."""
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(2).to(tl.int64)
    mask_e = offs_e < E
    mask = (offs_l < L)[:, None] & mask_e[None, :]
    part = b * n_lblocks + pid_l
    for k in range(0, K):
        sign = 1 - 2 * ((dir_codes >> (2 * k)) & 1)
        g = tl.load(g_ptr + b * s_gb + offs_l[:, None] * s_gl + k * s_gk + offs_e[None, :] * s_ge, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if SILU:
            pre = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + k * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
            for j in tl.static_range(WIDTH):
                t = offs_l + sign * (j - (WIDTH - 1))
                m = ((t >= 0) & (t < L))[:, None] & mask_e[None, :]
                xv = tl.load(x_ptr + b * s_xb + t[:, None] * s_xl + offs_e[None, :] * s_xe, mask=m, other=0.0)
                wj = tl.load(w_ptr + (k * E + offs_e) * WIDTH + j, mask=mask_e, other=0.0).to(tl.float32)
                pre += xv.to(tl.float32) * wj[None, :]
            sig = 1.0 / (1.0 + tl.exp(-pre))
            g = g * sig * (1.0 + pre * (1.0 - sig))
        g = tl.where(mask, g, 0.0)
        tl.store(gpre_ptr + ((b * L + offs_l[:, None]) * K + k) * E + offs_e[None, :], g, mask=mask)
        for j in tl.static_range(WIDTH):
            t = offs_l + sign * (j - (WIDTH - 1))
            m = ((t >= 0) & (t < L))[:, None] & mask_e[None, :]
            xv = tl.load(x_ptr + b * s_xb + t[:, None] * s_xl + offs_e[None, :] * s_xe, mask=m, other=0.0)
            tl.store(dw_ptr + ((part * K + k) * E + offs_e) * WIDTH + j, tl.sum(g * xv.to(tl.float32), axis=0),
                     mask=mask_e)  # fmt: skip
        if HAS_BIAS:
            tl.store(dbias_ptr + (part * K + k) * E + offs_e, tl.sum(g, axis=0), mask=mask_e)


@triton.jit
def conv_bwd_x_kernel(
    gpre_ptr, w_ptr, dx_ptr,
    L, E, K, dir_codes,
    WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """dx[b, t, e] = sum_k sum_j w[k, e, j] gpre[b, t - off_kj, k, e]; dx contiguous (batch, L, E)."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(2).to(tl.int64)
    mask_e = offs_e < E
    mask = (offs_l < L)[:, None] & mask_e[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    for k in range(0, K):
        sign = 1 - 2 * ((dir_codes >> (2 * k)) & 1)
        for j in tl.static_range(WIDTH):
            t = offs_l - sign * (j - (WIDTH - 1))
            m = ((t >= 0) & (t < L))[:, None] & mask_e[None, :]
            gv = tl.load(gpre_ptr + ((b * L + t[:, None]) * K + k) * E + offs_e[None, :], mask=m, other=0.0)
            wj = tl.load(w_ptr + (k * E + offs_e) * WIDTH + j, mask=mask_e, other=0.0).to(tl.float32)
            acc += gv * wj[None, :]
    tl.store(dx_ptr + (b * L + offs_l[:, None]) * E + offs_e[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)
