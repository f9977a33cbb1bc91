// The launch parameters of the FFN kernels (ffn.wgsl, ffn_gemv.wgsl, ffn_q.wgsl,
// ffn_qgemv.wgsl, ffn_reduce.wgsl, ffn_mma.wgsl), bound at group 0 binding 0: `FfnParams::words` in
// backends/wgpu/src/ffn/mod.rs writes them in this order.

struct Params {
    k_len: u32,        // K: elements per A row and per weight row
    n_len: u32,        // N: weight rows, the output columns
    expert_words: u32, // 32-bit words of one expert's matrix in the bound weight buffers
    zero: u32,         // always 0, unknown to the compiler: the accumulators' start (the
                       // cooperative kernel: a never-taken branch keeps every binding used)
    a_base: u32,       // row subtracted from A's row index
    o_base: u32,       // row subtracted from out's row index
    m_base: u32,       // cooperative kernel: row subtracted from amax's and omax's row index
    chunks: u32,       // decode kernel: chunks of K
    prows: u32,        // decode kernel: rows of the partial sums
    vec_stride: u32,   // f32 values per expert in `vecs`
    wscale_at: u32,    // offset of this projection's row scales in an expert's vecs (WS)
    bias_at: u32,      // offset of this projection's biases (BIAS)
    up_off: u32,       // up: offset of the up projection's vectors after the gate's
    alpha: u32,        // f32 bits of the clamped SwiGLU's alpha (ACT = 1)
    limit: u32,        // f32 bits of its limit
    scale_words: u32,  // packed kernels: 32-bit words of one expert's scales in the bound scale
                       // buffers (dense kernels: unused)
}
