//! Compiled pipelines, cached by [`Variant`] behind a read-mostly lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::kernels::Variant;

/// A compute pipeline and the layout of its bind group 0.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline (entry point `main`).
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of bind group 0, derived from the shader.
    pub layout: wgpu::BindGroupLayout,
}

/// Pipelines compiled on one device, each at most once, by variant and by whether wgpu's
/// runtime bounds checks are compiled in.
#[derive(Debug, Default)]
pub struct PipelineCache {
    map: RwLock<HashMap<(Variant, bool), Arc<Pipeline>>>,
}

impl PipelineCache {
    /// The pipeline for `v` with wgpu's bounds checks, compiled on first use.
    pub fn get(&self, device: &wgpu::Device, v: Variant) -> Arc<Pipeline> {
        self.get_inner(device, v, true)
    }

    /// The pipeline for `v` without wgpu's runtime bounds checks, compiled on first use.
    ///
    /// # Safety
    /// Every launch of it must read and write in bounds: every index it is given is in
    /// range for the buffers bound. An out-of-range index is then undefined behaviour on the
    /// GPU rather than a clamped access.
    pub unsafe fn get_unchecked(&self, device: &wgpu::Device, v: Variant) -> Arc<Pipeline> {
        self.get_inner(device, v, false)
    }

    fn get_inner(&self, device: &wgpu::Device, v: Variant, checked: bool) -> Arc<Pipeline> {
        if let Some(p) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(&(v, checked)) {
            return p.clone();
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.entry((v, checked))
            .or_insert_with(|| {
                let _span = tracing::debug_span!("compile", kernel = v.label(), checked).entered();
                let label = v.label();
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(v.source().into()),
                };
                let module = if checked {
                    device.create_shader_module(desc)
                } else {
                    // SAFETY: `get_unchecked`'s contract: every launch stays in bounds.
                    unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
                };
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let layout = pipeline.get_bind_group_layout(0);
                Arc::new(Pipeline { pipeline, layout })
            })
            .clone()
    }

    /// Number of compiled pipelines.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing has been compiled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
