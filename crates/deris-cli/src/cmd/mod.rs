//! One module per subcommand: its clap `Args` and its `run`; plus the `--device` parser they share.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod dump;
pub mod eval;
pub mod metrics;
pub mod model_args;
pub mod prepare;
pub mod segment;
pub mod synth;
pub mod threads;
pub mod tokenize;
pub mod train;

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `--device`: `cpu`, `cuda` (GPU 0) or `cuda:N`, validated when the arguments are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(DeviceArg::Cuda(i)),
                _ => Err(format!("'{s}' is not a device: use cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device; CUDA in a build without the `cuda` feature is an error that says how
    /// to get one.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    bail!("--device cuda: this deris was built without the `cuda` feature (rebuild with `--features cuda`)");
                }
                Device::new_cuda(i).with_context(|| format!("opening CUDA device {i}"))
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("CUDA".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:1".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(1)));
        assert!("tpu".parse::<DeviceArg>().is_err());
    }
}
