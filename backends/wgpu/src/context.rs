//! The device context: adapter choice, the adapter's own limits, the pipeline cache, the
//! buffer pool, uploads and readbacks, and wgpu errors turned into [`Error`]s.
//!
//! Devices are opened once per process and adapter (and feature set), and never closed:
//! every context on that adapter shares the one device and queue, with its own pipeline
//! cache, buffer pool and staging buffers. NVIDIA's Vulkan driver (580, H200) hangs or
//! crashes when devices and instances are created and destroyed on some threads while others
//! use their own devices (per-rank contexts, one per rank thread: 6 hangs and 4 segmentation
//! faults in 27 runs of the resident tests, stacks in `vkDestroyDevice`, `vkDestroyInstance`
//! and pipeline creation; BENCHMARKS.md). One instance and one device per adapter never
//! destroy anything while another thread works.

use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use moe_ep::{Error, Result};

use crate::pipelines::PipelineCache;
use crate::pool::{BufferPool, class_of};

/// Environment variable naming the adapter to use: a case-insensitive part of its name
/// (`llvmpipe`, `H100`, `Apple M3`). `WGPU_BACKEND` (`vulkan`, `metal`, `dx12`) picks the
/// backend, as in every wgpu program.
pub const ADAPTER_ENV: &str = "MOE_EP_ADAPTER";

/// Storage usage of every buffer a kernel reads or writes.
pub(crate) const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);
/// Usage of readback staging buffers.
pub(crate) const READBACK: wgpu::BufferUsages = wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);

/// How to open a device.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Part of the adapter's name (case-insensitive); `None` takes the best adapter: a
    /// discrete GPU, then an integrated one, then a virtual one, then a CPU driver.
    pub adapter: Option<String>,
    /// Which of several equally good adapters (the same best device type, after the name
    /// filter, in wgpu's enumeration order): one GPU per rank on a multi-GPU host takes
    /// `Some(rank)`. `None` takes the first.
    pub device_index: Option<usize>,
    /// A cap on the bytes of one storage binding, below the adapter's own limit (tests use it
    /// to reach the limit checks with small data).
    pub max_binding_bytes: Option<u64>,
    /// How long to wait for the GPU to finish one submission before giving up with an error.
    pub timeout: Duration,
    /// Use faster kernel variants where the adapter's capabilities allow (default); off, every
    /// kernel is the portable one (tests compare the two).
    pub fast_variants: bool,
    /// Exchange blocks read and written in place in device buffers the host maps
    /// (`MAPPABLE_PRIMARY_BUFFERS`): `None` where memory is unified (integrated GPUs, CPU
    /// drivers) and the adapter offers it; `Some(false)` always through staging; `Some(true)`
    /// wherever offered (an error where not).
    pub mapped_exchange: Option<bool>,
    /// Record GPU timestamps around every stage of a session (where the device can write them
    /// inside encoders), reported as `ForwardStats::gpu_times`. Off by default: benchmarks turn
    /// it on (the timestamps' readback is not counted in the host traffic).
    pub timestamps: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            adapter: None,
            device_index: None,
            max_binding_bytes: None,
            timeout: Duration::from_secs(60),
            fast_variants: true,
            mapped_exchange: None,
            timestamps: false,
        }
    }
}

impl ContextOptions {
    /// Defaults, with the adapter taken from [`ADAPTER_ENV`] when set.
    pub fn from_env() -> Self {
        let adapter = std::env::var(ADAPTER_ENV).ok().filter(|s| !s.trim().is_empty());
        ContextOptions { adapter, ..Default::default() }
    }
}

pub(crate) fn backend_error(what: impl Into<String>) -> Error {
    Error::Backend { rank: None, backend: "wgpu", what: what.into() }
}

/// The process's wgpu instance (created once, on first use, honouring `WGPU_BACKEND` then).
fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env()))
}

/// A device this process opened, kept open for the rest of the process (module doc).
struct Opened {
    /// The adapter's place in the instance's enumeration (identical GPUs can have equal infos).
    position: usize,
    info: wgpu::AdapterInfo,
    features: wgpu::Features,
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// wgpu errors reported on the device, for every context that shares it.
    errors: Arc<Mutex<Vec<String>>>,
    /// Set by the device-lost callback: a lost device is not handed out again.
    lost: Arc<std::sync::atomic::AtomicBool>,
}

/// Every device opened so far; held while a context opens, so contexts open one at a time.
static OPENED: Mutex<Vec<Opened>> = Mutex::new(Vec::new());

/// One wgpu device (shared with every other context on the same adapter and features; module
/// doc) and everything this context cached on it. Cheap to share (`Arc`); thread-safe.
#[derive(Debug)]
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    max_binding: u64,
    timeout: Duration,
    unpack_f16: bool,
    matrix: Option<crate::ffn::MatrixUnits>,
    mapped_exchange: bool,
    timestamps: bool,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pool: BufferPool,
    /// Upload staging buffers (MAP_WRITE | COPY_SRC) that are mapped and ready to be written,
    /// by size; a used one comes back once the GPU has copied out of it and it is mapped again.
    staging: Arc<Mutex<Vec<wgpu::Buffer>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Set once the device is lost: every later check fails.
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// Benchmarks: FFN launches are timed one by one while set.
    pub(crate) profile: Mutex<Option<Arc<crate::timing::LaunchProfile>>>,
}

/// Name, backend and type of every adapter wgpu finds (honouring `WGPU_BACKEND`).
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all())).iter().map(|a| a.get_info()).collect()
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// What to do when no adapter is found, for error messages.
pub const NO_ADAPTER_HELP: &str = "wgpu found no adapter. On Linux install a Vulkan driver: \
     `apt-get install mesa-vulkan-drivers libvulkan1` gives lavapipe, a software Vulkan driver; \
     on macOS Metal is always present; set WGPU_BACKEND or MOE_EP_ADAPTER to choose among several";

/// The adapter `opts` asks for: the best device type among those whose name matches, then the
/// `device_index`-th of them; with its place in the instance's enumeration. Errors list the
/// adapters found.
fn pick_adapter(opts: &ContextOptions) -> Result<(usize, wgpu::Adapter)> {
    let mut adapters: Vec<(usize, wgpu::Adapter)> =
        pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all())).into_iter().enumerate().collect();
    let found: Vec<String> = adapters
        .iter()
        .map(|(_, a)| a.get_info())
        .map(|i| format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type))
        .collect();
    if let Some(want) = &opts.adapter {
        let w = want.to_lowercase();
        adapters.retain(|(_, a)| a.get_info().name.to_lowercase().contains(&w));
        if adapters.is_empty() {
            return Err(backend_error(format!(
                "no adapter's name contains {want:?} ({ADAPTER_ENV}); found: [{}]",
                found.join(", ")
            )));
        }
    }
    adapters.sort_by_key(|(_, a)| type_rank(a.get_info().device_type));
    let best = adapters.first().map(|(_, a)| a.get_info().device_type).ok_or_else(|| backend_error(NO_ADAPTER_HELP))?;
    adapters.retain(|(_, a)| a.get_info().device_type == best);
    let index = opts.device_index.unwrap_or(0);
    if index >= adapters.len() {
        return Err(backend_error(format!(
            "device {index} asked for, but there are {} {best:?} adapters; found: [{}]",
            adapters.len(),
            found.join(", ")
        )));
    }
    Ok(adapters.swap_remove(index))
}

/// A new device on `adapter` with `features` and `limits` (and wgpu's experimental features
/// for the cooperative-matrix kernel where `matrix`), its errors and loss collected.
fn open_device(
    position: usize,
    adapter: &wgpu::Adapter,
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: &wgpu::Limits,
    matrix: bool,
) -> Result<Opened> {
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("moe-ep"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: if matrix {
            // SAFETY: wgpu's experimental cooperative matrices, used only by the FFN's
            // cooperative variant, which the tests compare with the portable kernel.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        },
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| backend_error(format!("cannot open a device on {}: {e}", info.name)))?;
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
    }));
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sink, flag) = (errors.clone(), lost.clone());
    device.set_device_lost_callback(move |reason, msg| {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(format!("device lost ({reason:?}): {msg}"));
    });
    tracing::info!(adapter = %info.name, backend = ?info.backend, "wgpu device open");
    Ok(Opened { position, info: info.clone(), features, device, queue, errors, lost })
}

impl GpuContext {
    /// A context on the adapter `opts` names (or the best one), with the adapter's own limits
    /// and, where offered, timestamp queries: on the device this process already opened there
    /// with the same features, else on a new one. Errors when no adapter matches (the message
    /// lists those found and says how to get one) or the device cannot be created.
    pub fn new(opts: &ContextOptions) -> Result<Self> {
        let _span = tracing::debug_span!("gpu_context").entered();
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        let (position, adapter) = pick_adapter(opts)?;
        let info = adapter.get_info();
        let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let mut features = adapter.features() & wanted;
        // Tensor cores (NVIDIA) or simdgroup matrices (Apple) for the FFN: only in a shape the
        // adapter offers and the kernel has (a shader with an unoffered shape can compile and
        // silently compute zeros).
        let matrix = crate::ffn::matrix_units(&adapter, opts.fast_variants);
        if matrix.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
        }
        let mappable = adapter.features().contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let unified = matches!(info.device_type, wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu);
        let mapped_exchange = match opts.mapped_exchange {
            None => mappable && unified,
            Some(false) => false,
            Some(true) if mappable => true,
            Some(true) => {
                return Err(backend_error(format!(
                    "in-place exchange buffers asked for, but {} does not offer MAPPABLE_PRIMARY_BUFFERS",
                    info.name
                )));
            }
        };
        if mapped_exchange {
            features |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let limits = adapter.limits();
        let unpack_f16 = opts.fast_variants
            && adapter.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let known = opened
            .iter()
            .find(|o| o.position == position && o.info == info && o.features == features && !o.lost.load(relaxed));
        let (device, queue, errors, lost) = match known {
            Some(o) => (o.device.clone(), o.queue.clone(), o.errors.clone(), o.lost.clone()),
            None => {
                let o = open_device(position, &adapter, &info, features, &limits, matrix.is_some())?;
                let shared = (o.device.clone(), o.queue.clone(), o.errors.clone(), o.lost.clone());
                opened.push(o);
                shared
            }
        };
        drop(opened);
        let mut max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if let Some(cap) = opts.max_binding_bytes {
            max_binding = max_binding.min(cap);
        }
        tracing::info!(adapter = %info.name, backend = ?info.backend, max_binding, "wgpu context open");
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            max_binding,
            timeout: opts.timeout,
            unpack_f16,
            matrix,
            mapped_exchange,
            timestamps: opts.timestamps,
            pipelines: PipelineCache::default(),
            pool: BufferPool::default(),
            staging: Arc::default(),
            errors,
            lost,
            profile: Mutex::new(None),
        })
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// `name (backend, type)` of the adapter, for logs and test output.
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }

    /// The device's limits (the adapter's own, not WebGPU's defaults).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Whether f16 kernels widen with `unpack2x16float` (SHADER_F16_IN_F32, fast variants on).
    pub fn unpack_f16(&self) -> bool {
        self.unpack_f16
    }

    /// The matrix units the FFN's cooperative-matrix kernel uses on this device, if any
    /// ([`crate::ffn::matrix_units`]; fast variants on).
    pub fn ffn_matrix(&self) -> Option<crate::ffn::MatrixUnits> {
        self.matrix
    }

    /// Whether exchange blocks are device buffers the host maps in place (see
    /// [`ContextOptions::mapped_exchange`]).
    pub fn mapped_exchange(&self) -> bool {
        self.mapped_exchange
    }

    /// Benchmarks: time every FFN launch recorded from now on with `profile` (its own pass
    /// between two timestamps), or stop with `None`. Launches in one pass may overlap where
    /// they do not depend on each other; profiled, they do not.
    pub fn profile_launches(&self, profile: Option<Arc<crate::timing::LaunchProfile>>) {
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = profile;
    }

    /// Largest storage binding, in bytes, any kernel may use on this device.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Whether `self` and `other` run on the same wgpu device (contexts on one adapter with
    /// the same features do: module doc).
    pub fn shares_device(&self, other: &GpuContext) -> bool {
        self.device == other.device
    }

    /// The wgpu device, for callers who encode their own work around the launches.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Pipelines compiled so far.
    pub fn compiled_pipelines(&self) -> usize {
        self.pipelines.len()
    }

    /// Whether sessions record GPU timestamps ([`ContextOptions::timestamps`], and the device
    /// can).
    pub fn session_timestamps(&self) -> bool {
        self.timestamps && self.has_encoder_timestamps()
    }

    /// Whether the device can write timestamps between commands of an encoder.
    pub fn has_encoder_timestamps(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    }

    /// Error unless `bytes` fit one storage binding of this device.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_binding {
            return Err(backend_error(format!(
                "{what} needs {bytes} bytes in one buffer binding, over the {} byte limit of {}; \
                 split the batch or use the CPU engine",
                self.max_binding, self.info.name
            )));
        }
        Ok(())
    }

    /// A storage buffer of at least `bytes` from the pool (contents undefined). Checks the
    /// binding limit first.
    pub fn storage(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_binding(what, bytes)?;
        Ok(self.take(STORAGE, bytes, what))
    }

    /// A storage buffer holding `data` (its length a multiple of 4).
    pub fn upload(&self, what: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let b = self.storage(what, data.len() as u64)?;
        if !data.is_empty() {
            self.queue.write_buffer(&b, 0, data);
        }
        Ok(b)
    }

    /// A mapped upload staging buffer of at least `bytes` (a size class), from the pool of
    /// those already mapped, else new (mapped at creation). Write it, unmap it, copy from it in
    /// a submit, then hand it to [`GpuContext::restage`] after that submit.
    pub(crate) fn take_staging(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let size = class_of(bytes);
        {
            let mut free = self.staging.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = free.iter().position(|b| b.size() == size) {
                return Ok(free.swap_remove(i));
            }
        }
        self.check_binding("upload staging", size)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload staging"),
            size,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        }))
    }

    /// Map a used staging buffer again (after the submit that copies out of it); it joins the
    /// pool when the mapping completes (at a later poll). At most a few are kept.
    pub(crate) fn restage(&self, b: wgpu::Buffer) {
        let pool = self.staging.clone();
        let keep = b.clone();
        b.slice(..).map_async(wgpu::MapMode::Write, move |r| {
            let mut free = pool.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_ok() && free.len() < 8 {
                free.push(keep);
            }
        });
    }

    /// Give a buffer back to the pool.
    pub fn recycle(&self, b: wgpu::Buffer) {
        self.pool.give(b);
    }

    pub(crate) fn take(&self, usage: wgpu::BufferUsages, bytes: u64, label: &str) -> wgpu::Buffer {
        // Past the largest power of two the device allows, an exact (16-byte rounded) size.
        let class = class_of(bytes);
        let size = if class <= self.limits.max_buffer_size { class } else { bytes.next_multiple_of(16) };
        self.pool.take(&self.device, usage, size, label)
    }

    /// The values of `n` `map_async` callbacks sent on `rx`, after [`GpuContext::wait`] has
    /// returned. Another thread polling the same device may be the one that runs a callback
    /// (after our wait has returned), so this keeps polling until all `n` have run, within the
    /// context's timeout; an error if they have not by then (or their senders were dropped).
    pub(crate) fn mapped<T>(&self, rx: &mpsc::Receiver<T>, n: usize) -> Result<Vec<T>> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(r) => got.push(r),
                Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {
                    let _ = self.device.poll(wgpu::PollType::Poll);
                }
                Err(_) => return Err(backend_error("a readback buffer was not mapped after the GPU finished")),
            }
        }
        Ok(got)
    }

    /// Submit `encoder` after appending a copy of `src[..out.len()]` to a staging buffer,
    /// wait (at most the context's timeout) and copy the bytes into `out`. One submit.
    pub fn submit_and_read(&self, mut encoder: wgpu::CommandEncoder, src: &wgpu::Buffer, out: &mut [u8]) -> Result<()> {
        let bytes = out.len() as u64;
        if bytes == 0 {
            self.submit(encoder)?;
            return Ok(());
        }
        let staging = self.take(READBACK, bytes, "readback");
        encoder.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        self.submit(encoder)?;
        let (tx, rx) = mpsc::channel();
        staging.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        let [mapped] = self.mapped(&rx, 1)?.try_into().expect("one callback");
        if let Err(e) = mapped {
            return Err(backend_error(format!("mapping the readback buffer failed: {e}")));
        }
        {
            let view = staging
                .slice(..bytes)
                .get_mapped_range()
                .map_err(|e| backend_error(format!("reading the readback buffer failed: {e}")))?;
            out.copy_from_slice(&view);
        }
        staging.unmap();
        self.pool.give(staging);
        self.check_errors()
    }

    /// Submit `encoder` and wait for the GPU (at most the context's timeout).
    pub fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([encoder.finish()]);
        self.check_errors()
    }

    /// Wait until the GPU has finished all submitted work, at most the context's timeout (on a
    /// device shared with other contexts: their work too).
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(self.timeout) })
            .map_err(|e| backend_error(format!("waiting for {} (timeout {:?}): {e}", self.info.name, self.timeout)))?;
        self.check_errors()
    }

    /// A new command encoder.
    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Error with every wgpu error reported since the last check (validation, out of memory,
    /// device lost) on this context's device, or Ok; once the device is lost, always an error.
    /// Contexts that share the device share its errors: whichever checks first reports an
    /// error raised through another (the ranks of a call agree on its outcome anyway).
    pub fn check_errors(&self) -> Result<()> {
        let mut errs = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errs.is_empty() {
            if self.lost.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(backend_error(format!("{}: the device was lost", self.info.name)));
            }
            return Ok(());
        }
        let all = errs.drain(..).collect::<Vec<_>>().join("; ");
        Err(backend_error(format!("{}: {all}", self.info.name)))
    }
}
