//! GPU timestamps around encoded work, for benchmarks (never for assertions).

use moe_ep::Result;

use crate::context::{GpuContext, READBACK, backend_error};

/// Times work on the GPU: each run is bracketed by two timestamps written into the encoder.
#[derive(Debug)]
pub struct GpuTimer {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    runs: u32,
    ns_per_tick: f64,
}

impl GpuTimer {
    /// A timer for up to `runs` runs per [`GpuTimer::time`] call. Errors when the device
    /// cannot write timestamps inside encoders (`TIMESTAMP_QUERY_INSIDE_ENCODERS`).
    pub fn new(ctx: &GpuContext, runs: u32) -> Result<Self> {
        if !ctx.has_encoder_timestamps() {
            return Err(backend_error(format!("{} offers no timestamps inside command encoders", ctx.describe())));
        }
        let count = 2 * runs.max(1);
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timer"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = 8 * u64::from(count);
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timer resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timer read"),
            size: bytes,
            usage: READBACK,
            mapped_at_creation: false,
        });
        Ok(GpuTimer { set, resolve, read, runs: runs.max(1), ns_per_tick: f64::from(ctx.queue.get_timestamp_period()) })
    }

    /// Encode `work` `runs` times (at most the capacity), each between two timestamps, submit
    /// once, wait, and return each run's GPU time in seconds.
    pub fn time(
        &self,
        ctx: &GpuContext,
        runs: u32,
        mut work: impl FnMut(&mut wgpu::CommandEncoder),
    ) -> Result<Vec<f64>> {
        let runs = runs.clamp(1, self.runs);
        let mut enc = ctx.encoder("timed");
        for i in 0..runs {
            enc.write_timestamp(&self.set, 2 * i);
            work(&mut enc);
            enc.write_timestamp(&self.set, 2 * i + 1);
        }
        let n = 2 * runs;
        enc.resolve_query_set(&self.set, 0..n, &self.resolve, 0);
        let bytes = 8 * u64::from(n);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, bytes);
        ctx.submit(enc)?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.read.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.wait()?;
        for r in ctx.mapped(&rx, 1)? {
            r.map_err(|e| backend_error(format!("mapping timestamps: {e}")))?;
        }
        let ticks: Vec<u64> = {
            let view = self.read.slice(..bytes).get_mapped_range().map_err(|e| backend_error(e.to_string()))?;
            bytemuck::cast_slice(&view).to_vec()
        };
        self.read.unmap();
        Ok(ticks.chunks(2).map(|p| p[1].wrapping_sub(p[0]) as f64 * self.ns_per_tick * 1e-9).collect())
    }
}
