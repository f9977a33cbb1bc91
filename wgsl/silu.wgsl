// SwiGLU's activation, silu(g) * u, shared by the FFN kernels so that every path computes it
// with the same operations.
fn silu_mul(g: f32, u: f32) -> f32 {
    return g / (1.0 + exp(-g)) * u;
}
