//! The backend policy: which engine runs a forward call, and what a GPU failure does.
//!
//! A layer built with a GPU engine runs small calls (decode) on the CPU and large ones
//! (prefill) on the GPU. The boundary, the crossover N (tokens of this rank in the call), is
//! measured by [`crate::MoeLayer::warm_up`] for the layer's config on the machine it runs on;
//! [`LayerOptions`] and the environment ([`BACKEND_ENV`], [`GPU_ERRORS_ENV`]) override it.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
    /// Log a warning, count it in the stats, and let the CPU finish the call from the failed
    /// stage on (outside deterministic mode, where that would change bits: an error there).
    /// The default.
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
    /// Also hold the experts' weights (routed and shared) in the CPU GEMM's panels
    /// ([`crate::ExpertSet::with_cpu_gemm_panels`]): faster CPU prefill in f32 from 32 rows an
    /// expert, for as much host memory again as the dense expert weights. Off by default.
    #[serde(default)]
    pub cpu_gemm_panels: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            backend: BackendChoice::Auto,
            on_gpu_error: OnGpuError::Fallback,
            crossover_max_tokens: 1024,
            crossover_budget_s: 0.25,
            cpu_gemm_panels: false,
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
