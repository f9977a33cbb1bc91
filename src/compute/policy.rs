//! The backend policy: which engine runs a forward call, and what a GPU failure does.
//!
//! A layer built with a GPU engine runs small calls (decode) on the CPU and large ones
//! (prefill) on the GPU. The boundary, the crossover N (tokens of this rank in the call), is
//! measured by [`crate::MoeLayer::warm_up`] for the layer's config on the machine it runs on;
//! [`LayerOptions`] and the environment ([`BACKEND_ENV`], [`GPU_ERRORS_ENV`]) override it.

use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::compute::engine::Engine;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::weights::ExpertSet;
use crate::tensor::Tensor;

/// Environment variable that overrides [`LayerOptions::backend`]: `auto`, `cpu`, `gpu`, or a
/// number of tokens (the crossover).
pub const BACKEND_ENV: &str = "MOE_EP_BACKEND";
/// Environment variable that overrides [`LayerOptions::on_gpu_error`]: `fallback` or `fatal`.
pub const GPU_ERRORS_ENV: &str = "MOE_EP_GPU_ERRORS";

/// Which engine runs a forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// The CPU below the crossover measured at warm-up, the GPU from it on (the CPU always
    /// when the layer has no GPU engine). In deterministic mode: the GPU always, if any.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// Always the GPU engine (an error at construction if the layer has none).
    Gpu,
    /// The GPU from this many tokens of the rank's call on, the CPU below.
    Crossover(usize),
}

impl FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" => Ok(BackendChoice::Gpu),
            other => other.parse::<usize>().map(BackendChoice::Crossover).map_err(|_| {
                Error::invalid(format!("backend {s:?}: expected auto, cpu, gpu or a crossover token count"))
            }),
        }
    }
}

/// What a failed GPU stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnGpuError {
    /// Log a warning, count it in the stats, and run the stage on the CPU. The default.
    #[default]
    Fallback,
    /// Return the error.
    Fatal,
}

impl FromStr for OnGpuError {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fallback" => Ok(OnGpuError::Fallback),
            "fatal" => Ok(OnGpuError::Fatal),
            _ => Err(Error::invalid(format!("GPU error policy {s:?}: expected fallback or fatal"))),
        }
    }
}

/// How a layer chooses its engine per call. Not part of the layer's semantics: ranks may
/// differ (each measures its own crossover).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerOptions {
    pub backend: BackendChoice,
    pub on_gpu_error: OnGpuError,
    /// Largest tokens per rank the warm-up tries when it measures the crossover.
    pub crossover_max_tokens: usize,
    /// Stop measuring the crossover once a point takes longer than this on either engine (seconds).
    pub crossover_budget_s: f64,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            backend: BackendChoice::Auto,
            on_gpu_error: OnGpuError::Fallback,
            crossover_max_tokens: 1024,
            crossover_budget_s: 0.25,
        }
    }
}

impl LayerOptions {
    /// These options with [`BACKEND_ENV`] and [`GPU_ERRORS_ENV`] applied where set. Errors
    /// on a value that does not parse (naming the variable).
    pub fn with_env(mut self) -> Result<Self> {
        if let Ok(v) = std::env::var(BACKEND_ENV) {
            self.backend = v.parse().map_err(|e: Error| Error::invalid(format!("{BACKEND_ENV}: {e}")))?;
        }
        if let Ok(v) = std::env::var(GPU_ERRORS_ENV) {
            self.on_gpu_error = v.parse().map_err(|e: Error| Error::invalid(format!("{GPU_ERRORS_ENV}: {e}")))?;
        }
        Ok(self)
    }
}

/// Whether an error of a GPU stage is the GPU's own (worth retrying on the CPU) rather than
/// bad input, which the CPU would reject as well.
pub fn is_device_error(e: &Error) -> bool {
    matches!(e, Error::Backend { .. })
}

/// A GPU engine whose failed stages run again on the CPU (or fail, with [`OnGpuError::Fatal`]).
/// Every stage writes only its output, so a rerun on the CPU is complete and local: no peer
/// sees a difference.
pub(crate) struct WithFallback<'a> {
    pub gpu: &'a dyn Engine,
    pub cpu: &'a dyn Engine,
    pub policy: OnGpuError,
    pub rank: usize,
    pub fallbacks: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
}

impl<'a> WithFallback<'a> {
    pub fn new(gpu: &'a dyn Engine, cpu: &'a dyn Engine, policy: OnGpuError, rank: usize) -> Self {
        WithFallback { gpu, cpu, policy, rank, fallbacks: AtomicUsize::new(0), first_error: Mutex::new(None) }
    }

    /// Run a stage writing `out` on the GPU; on a device error, again on the CPU.
    fn run<T: ?Sized>(
        &self,
        stage: &str,
        out: &mut T,
        gpu: impl FnOnce(&mut T) -> Result<()>,
        cpu: impl FnOnce(&mut T) -> Result<()>,
    ) -> Result<()> {
        match gpu(out) {
            Err(e) if self.policy == OnGpuError::Fallback && is_device_error(&e) => {
                tracing::warn!(rank = self.rank, stage, error = %e, "GPU stage failed; running it on the CPU");
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| format!("{stage}: {e}"));
                cpu(out)
            }
            r => r,
        }
    }
}

impl Engine for WithFallback<'_> {
    fn name(&self) -> String {
        self.gpu.name()
    }
    fn gather_rows(&self, srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()> {
        self.run("gather_rows", dst, |d| self.gpu.gather_rows(srcs, idx, d), |d| self.cpu.gather_rows(srcs, idx, d))
    }
    fn ffn(&self, batch: &Tensor, offsets: &[usize], experts: &ExpertSet, det: bool, out: &mut Tensor) -> Result<()> {
        self.run(
            "experts",
            out,
            |o| self.gpu.ffn(batch, offsets, experts, det, o),
            |o| self.cpu.ffn(batch, offsets, experts, det, o),
        )
    }
    fn combine(&self, srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()> {
        self.run(
            "combine",
            y,
            |y| self.gpu.combine(srcs, idx, weights, k, y),
            |y| self.cpu.combine(srcs, idx, weights, k, y),
        )
    }
    fn is_accelerator(&self) -> bool {
        self.gpu.is_accelerator()
    }
    fn warm_up(&self, experts: &ExpertSet, act: DType, max_rows: usize) -> Result<()> {
        self.run("warm_up", &mut (), |_| self.gpu.warm_up(experts, act, max_rows), |_| Ok(()))
    }
}
