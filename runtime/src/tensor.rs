//! `Tensor`: a contiguous, row-major buffer with a shape, a dtype and a device.
//!
//! Conventions:
//! - No strided views. `reshape` shares the storage under a new shape (free, since every tensor
//!   is contiguous); every other change of layout is an op that writes a new tensor.
//! - `clone()` is cheap and shares the storage; `deep_copy()` (or `Backend::copy`) copies.
//! - Storage has interior mutability: ops that accumulate (`+=`) into gradient buffers or update
//!   parameters in place write through a shared handle. Backends check that an output does not
//!   share storage with an input of the same op.

use crate::{DType, Device, Element, Error, Result};
use half::bf16;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Host memory of a CPU tensor, one typed vector per dtype (so every element is aligned).
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

macro_rules! each_storage {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::BF16($v) => $body,
            CpuStorage::F64($v) => $body,
            CpuStorage::I32($v) => $body,
            CpuStorage::U16($v) => $body,
            CpuStorage::U32($v) => $body,
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U16(_) => DType::U16,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    pub fn len(&self) -> usize {
        each_storage!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zero-initialised storage of `len` elements.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F64 => CpuStorage::F64(vec![0.0; len]),
            DType::I32 => CpuStorage::I32(vec![0; len]),
            DType::U16 => CpuStorage::U16(vec![0; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        }
    }

    /// The elements as `&[T]`, or `None` when `T` is not this storage's dtype.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(each_storage!(self, v => bytemuck::cast_slice(v.as_slice())))
    }

    /// The elements as `&mut [T]`, or `None` when `T` is not this storage's dtype.
    pub fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(each_storage!(self, v => bytemuck::cast_slice_mut(v.as_mut_slice())))
    }

    /// The raw bytes (native endianness, little-endian on every supported target).
    pub fn as_bytes(&self) -> &[u8] {
        each_storage!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    /// Storage owning `data`.
    pub fn from_vec<T: Element>(data: Vec<T>) -> Self {
        // Each arm is only taken when T is that exact type, so the casts are identities.
        fn cast<T: Element, U: Element>(v: Vec<T>) -> Vec<U> {
            bytemuck::allocation::cast_vec(v)
        }
        match T::DTYPE {
            DType::F32 => CpuStorage::F32(cast(data)),
            DType::BF16 => CpuStorage::BF16(cast(data)),
            DType::F64 => CpuStorage::F64(cast(data)),
            DType::I32 => CpuStorage::I32(cast(data)),
            DType::U16 => CpuStorage::U16(cast(data)),
            DType::U32 => CpuStorage::U32(cast(data)),
        }
    }

    /// Every element converted to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        each_storage!(self, v => v.iter().map(|x| x.as_f64()).collect())
    }

    /// Storage of `dtype` holding `data` converted (rounded to nearest) from f64.
    pub fn from_f64(data: &[f64], dtype: DType) -> Self {
        fn conv<T: Element>(d: &[f64]) -> Vec<T> {
            d.iter().map(|&x| T::from_f64(x)).collect()
        }
        match dtype {
            DType::F32 => CpuStorage::F32(conv(data)),
            DType::BF16 => CpuStorage::BF16(conv(data)),
            DType::F64 => CpuStorage::F64(conv(data)),
            DType::I32 => CpuStorage::I32(conv(data)),
            DType::U16 => CpuStorage::U16(conv(data)),
            DType::U32 => CpuStorage::U32(conv(data)),
        }
    }
}

/// Where the bytes of a tensor are: host memory, or an allocation of a [`crate::gpu::Gpu`]
/// (written by kernels through raw device pointers, so no lock).
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(RwLock<CpuStorage>),
    Gpu(crate::gpu::GpuBuffer),
}

/// A contiguous, row-major tensor. Cloning shares the storage.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.device)
    }
}

fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Wraps CPU storage; the shape must hold exactly its elements.
    pub fn from_cpu_storage(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        if numel_of(shape) != storage.len() {
            return Err(Error::shape(
                "Tensor::from_cpu_storage",
                format!(
                    "shape {shape:?} holds {} elements but {} were given",
                    numel_of(shape),
                    storage.len()
                ),
            ));
        }
        let dtype = storage.dtype();
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(RwLock::new(storage))),
            shape: shape.to_vec(),
            dtype,
            device: Device::Cpu,
        })
    }

    /// A CPU tensor owning `data`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        Self::from_cpu_storage(CpuStorage::from_vec(data), shape)
    }

    /// A CPU tensor copying `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        Self::from_vec(data.to_vec(), shape)
    }

    /// A CPU tensor of `dtype` from f64 values (rounded to nearest).
    pub fn from_f64(data: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
        Self::from_cpu_storage(CpuStorage::from_f64(data, dtype), shape)
    }

    /// A zero-filled CPU tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let storage = CpuStorage::zeros(dtype, numel_of(shape));
        Tensor {
            storage: Arc::new(Storage::Cpu(RwLock::new(storage))),
            shape: shape.to_vec(),
            dtype,
            device: Device::Cpu,
        }
    }

    /// A CPU tensor from little-endian bytes (as in a safetensors file).
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let want = numel_of(shape) * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::shape(
                "Tensor::from_bytes",
                format!(
                    "{dtype} tensor of shape {shape:?} needs {want} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let mut storage = CpuStorage::zeros(dtype, numel_of(shape));
        each_storage!(&mut storage, v => bytemuck::cast_slice_mut::<_, u8>(v.as_mut_slice()).copy_from_slice(bytes));
        Self::from_cpu_storage(storage, shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dims(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The same storage under another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel_of(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} ({} elements) as {shape:?}", self.shape, self.numel()),
            ));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// True when both tensors are views of the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Read access to CPU storage; an error for a tensor on another device.
    pub fn cpu_read(&self) -> Result<RwLockReadGuard<'_, CpuStorage>> {
        match &*self.storage {
            Storage::Cpu(lock) => Ok(lock.read().unwrap_or_else(|p| p.into_inner())),
            Storage::Gpu(_) => Err(Error::Device {
                op: "Tensor::cpu_read",
                expected: Device::Cpu,
                found: self.device,
            }),
        }
    }

    /// Write access to CPU storage; an error for a tensor on another device.
    pub fn cpu_write(&self) -> Result<RwLockWriteGuard<'_, CpuStorage>> {
        match &*self.storage {
            Storage::Cpu(lock) => Ok(lock.write().unwrap_or_else(|p| p.into_inner())),
            Storage::Gpu(_) => Err(Error::Device {
                op: "Tensor::cpu_write",
                expected: Device::Cpu,
                found: self.device,
            }),
        }
    }

    /// A tensor owning a device allocation of exactly `shape` × `dtype` bytes; its device is
    /// `Cuda(ordinal)` of the buffer's `Gpu`.
    pub fn from_gpu_buffer(
        buffer: crate::gpu::GpuBuffer,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let want = numel_of(shape) * dtype.size_in_bytes();
        if buffer.bytes() != want {
            return Err(Error::shape(
                "Tensor::from_gpu_buffer",
                format!(
                    "{dtype} tensor of shape {shape:?} needs {want} bytes, the buffer has {}",
                    buffer.bytes()
                ),
            ));
        }
        let device = Device::Cuda(buffer.gpu().ordinal());
        Ok(Tensor { storage: Arc::new(Storage::Gpu(buffer)), shape: shape.to_vec(), dtype, device })
    }

    /// The device allocation of a GPU tensor (`None` on the CPU).
    pub fn gpu_buffer(&self) -> Option<&crate::gpu::GpuBuffer> {
        match &*self.storage {
            Storage::Gpu(b) => Some(b),
            Storage::Cpu(_) => None,
        }
    }

    fn require_cpu(&self, op: &'static str) -> Result<()> {
        if self.device != Device::Cpu {
            return Err(Error::Device { op, expected: Device::Cpu, found: self.device });
        }
        Ok(())
    }

    /// The elements as a `Vec<T>`; `T` must be the tensor's dtype. CPU tensors only: copy a
    /// device tensor to the host with its backend first.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.require_cpu("Tensor::to_vec")?;
        let s = self.cpu_read()?;
        s.as_slice::<T>().map(<[T]>::to_vec).ok_or_else(|| {
            Error::dtype("Tensor::to_vec", self.dtype, format!("requested {}", T::DTYPE))
        })
    }

    /// The elements converted to f64, whatever the dtype (CPU tensors only).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.require_cpu("Tensor::to_f64_vec")?;
        Ok(self.cpu_read()?.to_f64_vec())
    }

    /// The little-endian bytes of a CPU tensor.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.require_cpu("Tensor::to_bytes")?;
        Ok(self.cpu_read()?.as_bytes().to_vec())
    }

    /// The single element of a one-element tensor, as f64.
    pub fn scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "Tensor::scalar",
                format!("shape {:?} is not one element", self.shape),
            ));
        }
        Ok(self.to_f64_vec()?[0])
    }

    /// A new tensor with its own copy of the data (CPU tensors; `Backend::copy` for any device).
    pub fn deep_copy(&self) -> Result<Tensor> {
        self.require_cpu("Tensor::deep_copy")?;
        let s = self.cpu_read()?.clone();
        Tensor::from_cpu_storage(s, &self.shape)
    }
}
