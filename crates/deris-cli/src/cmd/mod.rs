//! One module per subcommand: its clap `Args` and its `run`; plus the `--device` parser they share.

pub mod bench;
pub mod convert;
pub mod dump;
pub mod metrics;
pub mod prepare;
pub mod segment;
pub mod synth;
pub mod tokenize;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Opens the device named by `--device`: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device in a
/// build without the `cuda` feature is an error that says how to get one.
pub fn open_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().with_context(|| format!("--device {name}: '{n}' is not a GPU index"))?,
            None => bail!("--device {name}: expected cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!("--device {name}: this deris was built without the `cuda` feature (rebuild with `--features cuda`)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

const MIB: f64 = 1024.0 * 1024.0;

/// Samples the memory in use on the GPU of a device (the whole device, as the driver reports it)
/// every millisecond on a background thread, keeping the peak.
pub struct GpuMemWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
    first: usize,
}

impl GpuMemWatch {
    /// Starts watching; `Ok(None)` on the CPU.
    pub fn start(device: &Device) -> Result<Option<Self>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use std::sync::atomic::{AtomicBool, Ordering};
            let ctx = d.cuda_stream().context().clone();
            let used = move || ctx.mem_get_info().map(|(free, total)| total - free);
            let first = used().map_err(|e| anyhow::anyhow!("cuMemGetInfo: {e:?}"))?;
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = first;
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(used().unwrap_or(0));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                peak.max(used().unwrap_or(0))
            });
            return Ok(Some(Self { stop, thread, first }));
        }
        let _ = device;
        Ok(None)
    }

    /// MiB in use when the watch started.
    pub fn first_mib(&self) -> f64 {
        self.first as f64 / MIB
    }

    /// Stops the watch: the peak MiB in use since `start`.
    pub fn peak_mib(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().map_or(f64::NAN, |b| b as f64 / MIB)
    }
}
