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
        self.finish(ctx, enc, runs)
    }

    /// Append the resolution of the first `runs` pairs of timestamps to `enc`, submit it,
    /// wait, and return each pair's interval in seconds.
    fn finish(&self, ctx: &GpuContext, mut enc: wgpu::CommandEncoder, runs: u32) -> Result<Vec<f64>> {
        let n = 2 * runs;
        enc.resolve_query_set(&self.set, 0..n, &self.resolve, 0);
        let bytes = 8 * u64::from(n);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, bytes);
        ctx.submit(enc)?;
        let ticks = self.read_ticks(ctx, bytes)?;
        Ok(ticks.chunks(2).map(|p| p[1].wrapping_sub(p[0]) as f64 * self.ns_per_tick * 1e-9).collect())
    }

    /// Wait for the submitted work, then read the first `bytes` of resolved timestamps.
    fn read_ticks(&self, ctx: &GpuContext, bytes: u64) -> Result<Vec<u64>> {
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
        Ok(ticks)
    }
}

/// Per-launch GPU times of FFN calls, for benchmarks: while installed on a context
/// ([`GpuContext::profile_launches`]), every FFN launch is recorded in a compute pass of its
/// own between two timestamps (up to the capacity; later launches run untimed).
#[derive(Debug)]
pub struct LaunchProfile {
    timer: GpuTimer,
    labels: std::sync::Mutex<Vec<String>>,
}

impl LaunchProfile {
    /// A profile of up to `launches` launches. Errors as [`GpuTimer::new`].
    pub fn new(ctx: &GpuContext, launches: u32) -> Result<Self> {
        Ok(LaunchProfile { timer: GpuTimer::new(ctx, launches)?, labels: Default::default() })
    }

    /// Record `launch` in its own pass, timed while there is room.
    pub(crate) fn encode(&self, enc: &mut wgpu::CommandEncoder, launch: &crate::ops::Launch) {
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        let i = labels.len() as u32;
        if i >= self.timer.runs {
            launch.encode_pass(enc);
            return;
        }
        enc.write_timestamp(&self.timer.set, 2 * i);
        launch.encode_pass(enc);
        enc.write_timestamp(&self.timer.set, 2 * i + 1);
        labels.push(format!("{} {:?}", launch.label(), launch.groups()));
    }

    /// After the recorded work was submitted: each timed launch's label and GPU seconds, in
    /// order; the profile is then empty again.
    pub fn take(&self, ctx: &GpuContext) -> Result<Vec<(String, f64)>> {
        let labels = std::mem::take(&mut *self.labels.lock().unwrap_or_else(|p| p.into_inner()));
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let secs = self.timer.finish(ctx, ctx.encoder("launch profile"), labels.len() as u32)?;
        Ok(labels.into_iter().zip(secs).collect())
    }
}
