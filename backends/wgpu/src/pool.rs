//! Device buffers reused across calls, by usage and power-of-two size class.

use std::collections::HashMap;
use std::sync::Mutex;

/// Smallest buffer handed out (bytes); also what an empty tensor gets, since a binding may
/// not be empty.
pub const MIN_BYTES: u64 = 256;
/// Buffers kept per (usage, class); more are dropped when given back.
const KEEP: usize = 4;

/// A pool of buffers on one device.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<HashMap<(u32, u64), Vec<wgpu::Buffer>>>,
}

/// The size class that holds `bytes`.
pub fn class_of(bytes: u64) -> u64 {
    bytes.max(MIN_BYTES).next_power_of_two()
}

impl BufferPool {
    /// A buffer of exactly `size` bytes (a [`class_of`] size, or an exact one past the
    /// device's largest class) and exactly `usage`, from the pool or new.
    pub fn take(&self, device: &wgpu::Device, usage: wgpu::BufferUsages, size: u64, label: &str) -> wgpu::Buffer {
        if let Some(b) = self.lock().get_mut(&(usage.bits(), size)).and_then(Vec::pop) {
            return b;
        }
        device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false })
    }

    /// Return a buffer taken from this pool.
    pub fn give(&self, b: wgpu::Buffer) {
        let key = (b.usage().bits(), b.size());
        let mut free = self.lock();
        let list = free.entry(key).or_default();
        if list.len() < KEEP {
            list.push(b);
        }
    }

    /// Bytes held by idle buffers.
    pub fn idle_bytes(&self) -> u64 {
        self.lock().values().flatten().map(|b| b.size()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u64), Vec<wgpu::Buffer>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}
