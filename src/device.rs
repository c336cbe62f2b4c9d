//! `--device` / `run.device`: which burn backend a run uses. A device that is not compiled into
//! this binary, or not present on the machine, is a clear error rather than a panic.

use burn::tensor::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Flex,
    /// wgpu on the default adapter.
    Wgpu,
    /// wgpu on a CPU adapter (Mesa lavapipe): the GPU code path on a machine without a GPU.
    WgpuCpu,
    Cuda(usize),
}

pub fn parse_device_spec(spec: &str) -> Result<DeviceSpec> {
    let s = spec.trim().to_ascii_lowercase();
    let parsed = match s.as_str() {
        "flex" | "cpu" => DeviceSpec::Flex,
        "wgpu" => DeviceSpec::Wgpu,
        "wgpu-cpu" => DeviceSpec::WgpuCpu,
        "cuda" => DeviceSpec::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => DeviceSpec::Cuda(i),
            _ => {
                return Err(Error::usage(format!(
                    "unknown device `{spec}`: accepted values are flex, wgpu, wgpu-cpu, cuda, cuda:N"
                )));
            }
        },
    };
    Ok(parsed)
}

/// Creates the burn device for a spec, checking that it is compiled in and present.
pub fn make_device(spec: &str) -> Result<Device> {
    match parse_device_spec(spec)? {
        DeviceSpec::Flex => Ok(Device::flex()),
        DeviceSpec::Wgpu | DeviceSpec::WgpuCpu => wgpu_device(spec),
        DeviceSpec::Cuda(i) => cuda_device(spec, i),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(spec: &str) -> Result<Device> {
    use burn::tensor::DeviceKind;
    let kind = if parse_device_spec(spec)? == DeviceSpec::WgpuCpu {
        DeviceKind::Cpu
    } else {
        DeviceKind::DefaultDevice
    };
    let device = Device::wgpu(kind);
    probe(&device, spec)?;
    Ok(device)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(spec: &str) -> Result<Device> {
    Err(Error::usage(format!(
        "device `{spec}` is not compiled into this binary: rebuild with `cargo build --release --features wgpu`"
    )))
}

#[cfg(feature = "cuda-runtime")]
fn cuda_device(spec: &str, index: usize) -> Result<Device> {
    let device = Device::cuda(index);
    // The backend reports a missing driver from a worker thread; say what it usually means.
    probe(&device, spec).map_err(|e| {
        Error::runtime(format!("{e} (no CUDA GPU, or no NVIDIA driver: libcuda.so.1 and libnvrtc must load)"))
    })?;
    Ok(device)
}

#[cfg(not(feature = "cuda-runtime"))]
fn cuda_device(spec: &str, _index: usize) -> Result<Device> {
    Err(Error::usage(format!(
        "device `{spec}` is not compiled into this binary: rebuild with `cargo build --release --features cuda`"
    )))
}

/// Runs one tiny op on the device; a backend that cannot start (no driver, no adapter) panics
/// inside burn, which is caught here and turned into one readable error.
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
fn probe(device: &Device, spec: &str) -> Result<()> {
    let d = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(move || {
        let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &d);
        t.sum().into_scalar::<f32>()
    });
    std::panic::set_hook(hook);
    match ok {
        Ok(v) if v == 3.0 => Ok(()),
        Ok(v) => Err(Error::runtime(format!("device `{spec}` started but computed 1 + 2 = {v}"))),
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            Err(Error::runtime(format!(
                "device `{spec}` is not available on this machine: {}",
                why.lines().next().unwrap_or("")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(parse_device_spec("flex").unwrap(), DeviceSpec::Flex);
        assert_eq!(parse_device_spec("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(parse_device_spec("wgpu-cpu").unwrap(), DeviceSpec::WgpuCpu);
        let e = parse_device_spec("tpu").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message.contains("wgpu-cpu"));
    }
}
