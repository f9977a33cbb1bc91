"""Golden outputs of MLX's own quantization, for tests/quant.rs.

Runs `mx.quantize` (mode affine: every bits / group size / dtype the library reads; mode
mxfp4) on MLX's CPU stream over seeded inputs, and writes the inputs and MLX's outputs as raw
bits (hex) to tests/data/mlx_quantize_golden.json. Needs `pip install "mlx[cpu]" numpy` (any
OS; MLX's Metal kernel, which mlx_lm.convert uses on a Mac, cannot run here: see
src/model/quant/affine.rs for how it differs).

    python3 tools/scripts/mlx_quantize_golden.py
"""

import json
import pathlib

import mlx.core as mx
import numpy as np

ROWS, COLS = 2, 256
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}


def hexbits(a):
    a = mx.array(a)
    return np.array(a.view(BITS[a.dtype]) if a.dtype in BITS else a).reshape(-1).tolist()


def inputs(seed):
    r = np.random.default_rng(seed)
    x = r.uniform(-0.3, 0.3, size=(ROWS, COLS)).astype(np.float32)
    x[0, :32] = -np.abs(x[0, :32]) - 0.01  # a group of negatives
    x[0, 128:160] = 0.125  # equal values
    x[1, 0:64] = 0.0  # zeros
    return x


def main():
    out = {"rows": ROWS, "cols": COLS, "mlx": mx.__version__, "affine": [], "mxfp4": []}
    with mx.stream(mx.cpu):
        for name, dt in DTYPES.items():
            w = mx.array(inputs(len(out["affine"]))).astype(dt)
            for bits in (4, 8):
                for group in (32, 64, 128):
                    q, s, b = mx.quantize(w, group_size=group, bits=bits)
                    out["affine"].append({
                        "dtype": name, "bits": bits, "group": group, "w": hexbits(w),
                        "q": np.array(q).reshape(-1).tolist(), "scales": hexbits(s), "biases": hexbits(b),
                    })
        w = mx.array(inputs(99))
        q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        deq = mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
        out["mxfp4"].append({
            "q": np.array(q).reshape(-1).tolist(), "scales": np.array(s).reshape(-1).tolist(),
            "dequantized": hexbits(deq),
        })
    path = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "mlx_quantize_golden.json"
    path.write_text(json.dumps(out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
