// The experts' activation act(g, u), shared by every FFN kernel so that every path computes
// it with the same operations, mirroring `Activation::apply` (src/model/config.rs):
//   ACT = 0: SwiGLU, silu(g) * u = g / (1 + exp(-g)) * u;
//   ACT = 1: gpt-oss's clamped SwiGLU: g' = min(g, limit), u' = clamp(u, -limit, limit),
//            (u' + 1) * (g' / (1 + exp(-alpha g'))).
// Prelude (added by the loader): ACT.
fn activate(g: f32, u: f32, alpha: f32, limit: f32) -> f32 {
    if ACT == 1u {
        let gc = min(g, limit);
        let uc = clamp(u, -limit, limit);
        return (uc + 1.0) * (gc / (1.0 + exp(-alpha * gc)));
    }
    return g / (1.0 + exp(-g)) * u;
}
