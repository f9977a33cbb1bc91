//! The backend policy of a layer with a second ("GPU") engine: which engine runs a call, the
//! fallback to the CPU on a device error and the fatal setting, warm-up, metrics, and the
//! deterministic mode's batch invariance on the CPU. The second engine here is the CPU engine
//! under another name that can be told to fail, so that these tests need no GPU; the wgpu
//! crate's tests run the same policy on a real adapter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{TIMEOUT, check_batch_invariance, small_cfg};
use moe_ep::compute::session::{
    Buf, DeviceTensor, ExchangeFn, HostTraffic, Matrix, Routed, RouterSet, Session, Weights,
};
use moe_ep::{
    BackendChoice, CpuEngine, DType, Engine, Error, ExpertSet, Group, LayerMetrics, LayerOptions, LocalGroup,
    MoeConfig, MoeLayer, OnGpuError, Placement, Result, Routing, Tensor, random,
};

/// The CPU engine posing as an accelerator; its FFN fails with a device error while `fail`.
#[derive(Clone, Default)]
struct FakeGpu {
    fail: Arc<AtomicBool>,
    ffn_calls: Arc<AtomicUsize>,
}

impl Engine for FakeGpu {
    fn name(&self) -> String {
        "fake-gpu".into()
    }
    fn id(&self) -> u64 {
        0xfa4e
    }
    fn session(&self) -> Result<Box<dyn Session<'_> + '_>> {
        Ok(Box::new(FakeSession { inner: CpuEngine.session()?, gpu: self }))
    }
    fn is_accelerator(&self) -> bool {
        true
    }
}

/// A CPU session whose FFN fails while the engine says so (after scribbling on its output, as
/// a half-finished GPU stage might).
struct FakeSession<'a> {
    inner: Box<dyn Session<'a> + 'a>,
    gpu: &'a FakeGpu,
}

impl<'a> Session<'a> for FakeSession<'a> {
    fn upload(&mut self, t: &'a Tensor) -> Result<Buf> {
        self.inner.upload(t)
    }
    fn upload_owned(&mut self, t: Tensor) -> Result<Buf> {
        self.inner.upload_owned(t)
    }
    fn adopt(&mut self, t: &DeviceTensor) -> Result<Buf> {
        self.inner.adopt(t)
    }
    fn adopt_routing(&mut self, r: Routing) -> Result<Routed> {
        self.inner.adopt_routing(r)
    }
    fn alloc(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        self.inner.alloc(dtype, rows, cols)
    }
    fn alloc_send(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        self.inner.alloc_send(dtype, rows, cols)
    }
    fn alloc_recv(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        self.inner.alloc_recv(dtype, rows, cols)
    }
    fn route(&mut self, x: Buf, router: &RouterSet, cfg: &MoeConfig) -> Result<Routed> {
        self.inner.route(x, router, cfg)
    }
    fn scale_rows(&mut self, x: Buf, routed: Routed) -> Result<Buf> {
        self.inner.scale_rows(x, routed)
    }
    fn gate_scale(&mut self, x: Buf, gate: &Matrix) -> Result<Buf> {
        self.inner.gate_scale(x, gate)
    }
    fn gather_rows(&mut self, srcs: &[Buf], idx: &[u32], dst: Buf) -> Result<()> {
        self.inner.gather_rows(srcs, idx, dst)
    }
    fn ffn(&mut self, batch: Buf, offsets: &[usize], experts: &ExpertSet, det: bool, out: Buf) -> Result<()> {
        self.gpu.ffn_calls.fetch_add(1, Ordering::Relaxed);
        if self.gpu.fail.load(Ordering::Relaxed) {
            let junk = vec![0xff; out.bytes()];
            self.inner.write_rows(out, 0, &junk)?;
            return Err(Error::Backend { rank: None, backend: "fake", what: "device lost".into() });
        }
        self.inner.ffn(batch, offsets, experts, det, out)
    }
    fn weighted_sum(&mut self, srcs: &[Buf], idx: &[u32], w: Weights<'_>, k: usize, y: Buf) -> Result<()> {
        self.inner.weighted_sum(srcs, idx, w, k, y)
    }
    fn write_rows(&mut self, dst: Buf, first: usize, bytes: &[u8]) -> Result<()> {
        self.inner.write_rows(dst, first, bytes)
    }
    fn sync(&mut self) -> Result<()> {
        self.inner.sync()
    }
    fn routing(&mut self, r: Routed) -> Result<Routing> {
        self.inner.routing(r)
    }
    fn exchange(&mut self, send: Buf, recv: Buf, f: &mut ExchangeFn<'_>) -> Result<()> {
        self.inner.exchange(send, recv, f)
    }
    fn download(&mut self, b: Buf) -> Result<Tensor> {
        self.inner.download(b)
    }
    fn export(&mut self, b: Buf) -> Result<DeviceTensor> {
        self.inner.export(b)
    }
    fn traffic(&self) -> HostTraffic {
        self.inner.traffic()
    }
}

/// One rank's forward: output, the call's backend and fallbacks, the layer's metrics and crossover.
type RankRun = (Tensor, String, usize, LayerMetrics, Option<usize>);

/// Rank `g.rank()`'s layer of `cfg` (seed 5, contiguous placement) with `gpu` beside the CPU.
fn fake_gpu_layer(
    g: LocalGroup,
    cfg: &MoeConfig,
    gpu: &FakeGpu,
    options: &LayerOptions,
) -> Result<MoeLayer<LocalGroup>> {
    let placement = Placement::contiguous(cfg.num_experts, g.size())?;
    let mine = random::experts(cfg, 5, placement.experts_of(g.rank()));
    MoeLayer::with_gpu(g, cfg.clone(), placement, random::gate(cfg, 5), mine, Box::new(gpu.clone()), options.clone())
}

/// Run `tokens[r]` tokens on rank r of a layer with `gpu` beside the CPU; per rank the output,
/// the call's backend and fallbacks, and the layer's metrics (or the error).
fn run(options: &LayerOptions, gpu: &FakeGpu, tokens: &[usize]) -> Vec<Result<RankRun>> {
    let cfg = small_cfg(2);
    let world = tokens.len();
    LocalGroup::run(world, TIMEOUT, |g| {
        let rank = g.rank();
        let layer = fake_gpu_layer(g, &cfg, gpu, options)?;
        let x = random::input(&cfg, tokens[rank], 5, rank);
        let (y, s) = layer.forward_with_stats(&x)?;
        Ok((y, s.backend, s.fallbacks, layer.metrics(), layer.crossover()))
    })
    .unwrap()
    .into_iter()
    .map(|r| r.unwrap_or_else(|_| panic!("a rank panicked")))
    .collect()
}

fn opts(backend: BackendChoice) -> LayerOptions {
    LayerOptions { backend, ..LayerOptions::default() }
}

#[test]
fn the_choice_picks_the_engine_per_call_by_the_ranks_tokens() {
    let gpu = FakeGpu::default();
    let tokens = [1, 8, 0, 20];
    for (choice, want) in [
        (BackendChoice::Cpu, [false, false, false, false]),
        (BackendChoice::Gpu, [true, true, true, true]),
        (BackendChoice::Crossover(8), [false, true, false, true]),
    ] {
        let cpu_out = run(&opts(BackendChoice::Cpu), &gpu, &tokens);
        for (r, res) in run(&opts(choice), &gpu, &tokens).into_iter().enumerate() {
            let (y, backend, fallbacks, m, _) = res.unwrap();
            assert_eq!(backend == "fake-gpu", want[r], "{choice:?} rank {r} ran on {backend}");
            assert_eq!(fallbacks, 0);
            assert_eq!((m.calls, m.gpu_calls, m.cpu_calls), (1, want[r] as u64, !want[r] as u64), "rank {r}");
            assert_eq!(y.as_bytes(), cpu_out[r].as_ref().unwrap().0.as_bytes(), "rank {r}");
        }
    }
}

#[test]
fn a_failing_gpu_stage_falls_back_to_the_cpu_or_fails_when_fatal() {
    let gpu = FakeGpu::default();
    let tokens = [3, 0, 9];
    let want = run(&opts(BackendChoice::Cpu), &gpu, &tokens);
    gpu.fail.store(true, Ordering::Relaxed);
    for (r, res) in run(&opts(BackendChoice::Gpu), &gpu, &tokens).into_iter().enumerate() {
        let (y, backend, fallbacks, m, _) = res.unwrap();
        assert_eq!(backend, "fake-gpu");
        assert_eq!(y.as_bytes(), want[r].as_ref().unwrap().0.as_bytes(), "rank {r}: fallback output");
        // Every rank ran (and lost) the GPU FFN: its own experts' or its tokens' call.
        assert!(fallbacks == 1 && m.fallbacks == 1, "rank {r}: {fallbacks} fallbacks");
        assert_eq!(m.last_fallback_error.is_some(), fallbacks == 1, "rank {r}");
    }
    assert!(gpu.ffn_calls.load(Ordering::Relaxed) > 0);
    let fatal = LayerOptions { on_gpu_error: OnGpuError::Fatal, ..opts(BackendChoice::Gpu) };
    let res = run(&fatal, &gpu, &tokens);
    let errors: Vec<String> = res.iter().map(|r| r.as_ref().expect_err("every rank fails").to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("device lost")), "{errors:?}");
    assert!(errors.iter().all(|e| e.contains("rank")), "{errors:?}");
}

/// Deterministic mode: a GPU failure is an error (on every rank), never a CPU rerun with other bits.
#[test]
fn deterministic_mode_turns_a_gpu_failure_into_an_error() {
    let cfg = small_cfg(2).with_deterministic(true);
    let gpu = FakeGpu::default();
    gpu.fail.store(true, Ordering::Relaxed);
    let tokens = [3, 0, 5];
    let out = LocalGroup::run(tokens.len(), TIMEOUT, |g| {
        let rank = g.rank();
        let layer = fake_gpu_layer(g, &cfg, &gpu, &opts(BackendChoice::Gpu))?;
        layer.forward_with_stats(&random::input(&cfg, tokens[rank], 5, rank))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let e = o.unwrap().expect_err("a GPU failure in deterministic mode fails the call");
        let msg = e.to_string();
        assert!(msg.contains("rank"), "rank {r}: {msg}");
        if let Error::Backend { .. } = e {
            assert!(msg.contains("deterministic"), "rank {r}: {msg}");
        }
    }
}

#[test]
fn warm_up_measures_a_crossover_once_and_metrics_serialize() {
    let cfg = small_cfg(2);
    let gpu = FakeGpu::default();
    let options = LayerOptions { crossover_max_tokens: 16, ..LayerOptions::default() };
    let out = LocalGroup::run(2, TIMEOUT, |g| {
        let rank = g.rank();
        let layer = fake_gpu_layer(g, &cfg, &gpu, &options)?;
        let first = layer.warm_up()?;
        let second = layer.warm_up()?;
        let y = layer.forward(&random::input(&cfg, 4, 5, rank))?;
        Ok::<_, Error>((first, second, layer.metrics(), y.rows()))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let (first, second, metrics, rows) = o.unwrap().unwrap();
        assert_eq!(first.crossover_source, "measured", "rank {r}");
        assert!(!first.points.is_empty() && first.points.iter().all(|p| p.cpu_s > 0.0 && p.gpu_s > 0.0));
        assert_eq!(first.engines, vec!["cpu".to_string(), "fake-gpu".to_string()]);
        // The second call is free and reports the same.
        assert_eq!(second.total_s, 0.0);
        assert_eq!((second.crossover, &second.points), (first.crossover, &first.points));
        // Warm-up's own small forward counts in the metrics, then ours.
        assert_eq!(metrics.calls, 2, "rank {r}");
        assert_eq!(rows, 4);
        let json = serde_json::to_string(&metrics).unwrap();
        let back: LayerMetrics = serde_json::from_str(&json).unwrap();
        assert_eq!(back, metrics);
        assert!(json.contains("\"exchange_back\"") && json.contains("\"fallbacks\""), "{json}");
    }
}

#[test]
fn deterministic_mode_refuses_a_crossover_and_pins_auto_to_the_gpu() {
    let cfg = small_cfg(2).with_deterministic(true);
    let gpu = FakeGpu::default();
    let make =
        |options: LayerOptions| fake_gpu_layer(LocalGroup::world(1, TIMEOUT).unwrap().remove(0), &cfg, &gpu, &options);
    let e = make(opts(BackendChoice::Crossover(4))).unwrap_err();
    assert!(e.to_string().contains("deterministic"), "{e}");
    let layer = make(opts(BackendChoice::Auto)).unwrap();
    assert_eq!(layer.crossover(), Some(0));
    assert_eq!(layer.warm_up().unwrap().crossover_source, "deterministic");
}

#[test]
fn choices_parse_and_bad_ones_say_what_is_wrong() {
    assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
    assert_eq!(" GPU ".parse::<BackendChoice>().unwrap(), BackendChoice::Gpu);
    assert_eq!("64".parse::<BackendChoice>().unwrap(), BackendChoice::Crossover(64));
    let e = "fast".parse::<BackendChoice>().unwrap_err();
    assert!(e.to_string().contains("auto, cpu, gpu"), "{e}");
    assert_eq!("fatal".parse::<OnGpuError>().unwrap(), OnGpuError::Fatal);
    assert!("sometimes".parse::<OnGpuError>().is_err());
}

#[test]
fn deterministic_cpu_layer_is_batch_invariant() {
    for (act, w) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::BF16)] {
        let cfg = small_cfg(3).with_dtypes(act, w).with_deterministic(true);
        check_batch_invariance(&cfg, &|g, c, p, gate, e| MoeLayer::new(g, c, p, gate, e));
    }
}

#[test]
fn a_gpu_that_fails_at_warm_up_leaves_the_cpu_in_charge_unless_fatal() {
    let cfg = small_cfg(2);
    let gpu = FakeGpu::default();
    gpu.fail.store(true, Ordering::Relaxed);
    for policy in [OnGpuError::Fallback, OnGpuError::Fatal] {
        let options = LayerOptions { on_gpu_error: policy, ..LayerOptions::default() };
        let out = LocalGroup::run(2, TIMEOUT, |g| {
            let rank = g.rank();
            let layer = fake_gpu_layer(g, &cfg, &gpu, &options)?;
            let report = layer.warm_up()?;
            let (_, stats) = layer.forward_with_stats(&random::input(&cfg, 3, 5, rank))?;
            Ok::<_, Error>((report, stats.backend, layer.crossover()))
        })
        .unwrap();
        for (r, o) in out.into_iter().enumerate() {
            match (policy, o.unwrap()) {
                (OnGpuError::Fallback, Ok((report, backend, crossover))) => {
                    assert!(
                        report.gpu_error.as_deref().is_some_and(|e| e.contains("device lost")),
                        "rank {r}: {report:?}"
                    );
                    assert_eq!((backend.as_str(), crossover), ("cpu", None), "rank {r}");
                }
                (OnGpuError::Fatal, Err(e)) => assert!(e.to_string().contains("rank"), "rank {r}: {e}"),
                (p, other) => panic!("rank {r} with {p:?}: {other:?}"),
            }
        }
    }
}

/// `LayerOptions::cpu_gemm_panels`: routed and shared experts held in the CPU GEMM's panels,
/// at worlds 1-3 with uneven tokens (enough that some experts take the GEMM), in f32 and bf16,
/// against the f64 reference; the outcome the same as without them, within rounding.
#[test]
fn cpu_gemm_panels_layer_matches_the_reference_at_several_world_sizes() {
    use common::Case;
    for dt in [DType::F32, DType::BF16] {
        for (world, tokens) in [(1, vec![150]), (2, vec![90, 17]), (3, vec![0, 120, 41])] {
            let cfg = MoeConfig::new(4, 64, 96, 2).with_dtypes(dt, dt).with_shared_expert(80, false);
            // World 3: an uneven placement (2, 1, 1 experts).
            let map = (world == 3).then(|| vec![0, 0, 1, 2]);
            let case = Case { tokens, map, ..Case::new(cfg, world) };
            let options = LayerOptions { cpu_gemm_panels: true, ..LayerOptions::default() };
            let outs = LocalGroup::run(world, TIMEOUT, |g| {
                let rank = g.rank();
                let p = case.placement();
                let w = moe_ep::LayerWeights {
                    router: case.gate(),
                    ..random::layer_weights(&case.cfg, case.seed, &p, rank)
                };
                let layer = MoeLayer::from_weights(g, case.cfg.clone(), p, w, None, options.clone())?;
                assert!(layer.options().cpu_gemm_panels);
                layer.forward_with_stats(&case.input(rank))
            })
            .unwrap();
            let got: Vec<_> = outs.into_iter().map(|o| o.expect("no panic").expect("forward")).collect();
            // Some rank averages 32 rows an expert or more, so the f32 GEMM on panels runs.
            let p = case.placement();
            let busy = |r: usize| got[r].1.rows_received.iter().sum::<usize>() >= 32 * p.experts_of(r).len();
            assert!((0..world).any(busy), "{dt} world {world}: too few rows for the GEMM");
            case.check_outputs(got);
        }
    }
}
